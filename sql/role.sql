-- role.sql: the least-privilege login role `evictd` the daemon connects as (run after install.sql, as its owner or a superuser).
--
--   psql -v ON_ERROR_STOP=1 -v evictd_password='secret' -f sql/role.sql
--
-- Without -v evictd_password the role is created without a password (use
-- peer/cert auth, or set one later with psql's \password evictd, which keeps it
-- out of the server log). Running the script again only re-applies the grants
-- (and the password, when given).
--
-- What evictd needs, and nothing more:
--   - USAGE on schema evictd;
--   - SELECT, UPDATE, DELETE on evictd.outbox: read changes, claim them with
--     SELECT ... FOR UPDATE SKIP LOCKED (needs UPDATE), delete them once applied;
--   - SELECT on evictd.watches: `evictd check --connect` compares the capture with the rules;
--   - SELECT, UPDATE, USAGE on sequence evictd.idle: read it, and
--     setval('evictd.idle', 0|1|2) as the load changes (setval needs UPDATE).
--   LISTEN needs no grant: any role may LISTEN on any channel.
--   No privilege on application tables, except SELECT on the tables rule
--   lookups read (e.g. "SELECT user_id FROM drivers WHERE id = $1"); grant those
--   one by one, e.g.
--       GRANT USAGE ON SCHEMA public TO evictd;      -- (already true for public)
--       GRANT SELECT ON public.drivers TO evictd;
--   or run this script with -v lookup_tables='public.drivers, public.catalog_category'.
--   evictd.watch()/unwatch() stay with the installer: the daemon never changes triggers.
--
-- To remove the role later: DROP OWNED BY evictd; DROP ROLE evictd;  (in every database it was used in)

\set ON_ERROR_STOP 1

DO $$
BEGIN
    IF to_regnamespace('evictd') IS NULL THEN
        RAISE EXCEPTION 'schema evictd is missing: run sql/install.sql first';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'evictd') THEN
        CREATE ROLE evictd LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
    END IF;
END
$$;

\if :{?evictd_password}
ALTER ROLE evictd PASSWORD :'evictd_password';
\endif

BEGIN;
GRANT USAGE ON SCHEMA evictd TO evictd;
GRANT SELECT, UPDATE, DELETE ON evictd.outbox TO evictd;
GRANT SELECT ON evictd.watches TO evictd;
GRANT SELECT, UPDATE, USAGE ON SEQUENCE evictd.idle TO evictd;
COMMIT;

\if :{?lookup_tables}
GRANT SELECT ON :lookup_tables TO evictd;
\endif
