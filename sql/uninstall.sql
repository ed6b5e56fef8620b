-- uninstall.sql: removes everything install.sql created (all watches, their triggers, schema evictd, event triggers); idempotent.
--
-- Pending outbox rows are lost: stop writers or let evictd drain the outbox first.
-- The role from role.sql is cluster-wide and stays; drop it yourself if wanted:
--   DROP OWNED BY evictd; DROP ROLE evictd;

\set ON_ERROR_STOP 1
SET client_min_messages = warning;

BEGIN;
-- The caller's search_path cannot redirect this script (see install.sql).
SET LOCAL search_path = pg_catalog, pg_temp;

DROP EVENT TRIGGER IF EXISTS evictd_alter_table;
DROP EVENT TRIGGER IF EXISTS evictd_drop;

DO $$
DECLARE
    v_oid oid;
BEGIN
    IF to_regclass('evictd.watches') IS NULL THEN
        RETURN;
    END IF;
    FOR v_oid IN EXECUTE 'SELECT tbl::oid FROM evictd.watches ORDER BY 1' LOOP
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_class WHERE oid = v_oid)
           AND to_regprocedure('evictd.unwatch(regclass)') IS NOT NULL THEN
            EXECUTE 'SELECT evictd.unwatch($1)' USING v_oid::regclass;
        END IF;
    END LOOP;
END
$$;

-- CASCADE also takes any trigger still pointing at a capture function (e.g. a
-- watches row deleted by hand).
DROP SCHEMA IF EXISTS evictd CASCADE;

COMMIT;
