-- install.sql: the evictd schema in PostgreSQL: outbox, idle flag, watch()/unwatch() and the capture triggers they generate.
--
-- Run as the role that should own the capture functions (a superuser or the
-- owner of the watched tables), e.g. `psql -v ON_ERROR_STOP=1 -f sql/install.sql`.
-- Idempotent: running it again upgrades the functions in place and regenerates
-- the capture function of every existing watch (no table lock is taken for that;
-- triggers are recreated only where missing or calling a stale function, e.g.
-- after a dump and restore changed table oids).
--
-- Objects (all in schema evictd, none granted to PUBLIC; see sql/role.sql):
--   outbox (id, payload)      durable changes, one row per statement chunk; evictd deletes a
--                             row once Redis confirmed the deletion or it was dead-lettered
--   outbox_id_seq             outbox ids; the trigger takes nextval first and writes the id
--                             into the payload too
--   idle                      sequence used as a flag (0/1): evictd sets it to 1 when it has
--                             drained the outbox; the first write after that sets it to 0
--                             and rings the doorbell (an empty NOTIFY). Sequences are read
--                             and written outside transaction visibility, so the flag is
--                             seen at once by every writer, whatever its isolation level.
--   watches                   one row per watched table
--   watch(tbl, columns, channel DEFAULT 'evictd', durable DEFAULT true)
--   unwatch(tbl)
--   capture_<table oid>()     generated trigger function of one watched table
--
-- Trigger shape (names fixed; `evictd check --connect` looks for them):
--   durable:     evictd_insert / evictd_update / evictd_delete: AFTER ... FOR EACH STATEMENT
--                with transition tables (evictd_old / evictd_new), evictd_truncate:
--                AFTER TRUNCATE FOR EACH STATEMENT. Each statement writes its row images
--                in chunks of at most 500 (fewer for images over 2 KiB: about 1 MiB) per
--                outbox row, then rings the doorbell if evictd is idle.
--   notify-only: evictd_insert / evictd_update / evictd_delete: AFTER ... FOR EACH ROW,
--                evictd_truncate as above; each row is one NOTIFY carrying the change
--                (a "ref" payload when the change would reach 8000 bytes).
--
-- The triggers never make a write fail because of evictd, by construction and
-- without EXCEPTION blocks: payload sizes are bounded before pg_notify, the
-- channel name is validated by watch(), and the doorbell is a sequence read.
-- If the outbox insert itself fails, the write fails (losing a change silently
-- is worse). With a superuser installer, event triggers keep the generated
-- functions in step with ALTER TABLE (a dropped or renamed watched column is
-- removed from the capture with a WARNING instead of breaking every write) and
-- forget dropped tables.

\set ON_ERROR_STOP 1
SET client_min_messages = warning;

BEGIN;

CREATE SCHEMA IF NOT EXISTS evictd;
REVOKE ALL ON SCHEMA evictd FROM PUBLIC;
COMMENT ON SCHEMA evictd IS 'evictd: change capture for cache invalidation (sql/install.sql)';

CREATE SEQUENCE IF NOT EXISTS evictd.outbox_id_seq AS bigint;
CREATE TABLE IF NOT EXISTS evictd.outbox (
    id      bigint PRIMARY KEY,
    payload text   NOT NULL
);
ALTER SEQUENCE evictd.outbox_id_seq OWNED BY evictd.outbox.id;
-- A queue table: rows are inserted and soon deleted; vacuum it often so claims stay cheap.
ALTER TABLE evictd.outbox SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000,
                               autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 1000);
COMMENT ON TABLE evictd.outbox IS 'evictd: durable change payloads (JSON text), deleted by evictd once applied';

CREATE SEQUENCE IF NOT EXISTS evictd.idle AS bigint MINVALUE 0 MAXVALUE 1 START 0 NO CYCLE;
COMMENT ON SEQUENCE evictd.idle IS
    'evictd idle flag: evictd runs setval(''evictd.idle'', 1) when drained; the next write resets it to 0 and sends an empty NOTIFY';

CREATE TABLE IF NOT EXISTS evictd.watches (
    tbl     regclass PRIMARY KEY,
    columns text[]   NOT NULL,
    channel text     NOT NULL,
    durable bool     NOT NULL
);
COMMENT ON TABLE evictd.watches IS 'evictd: watched tables, maintained by evictd.watch() / evictd.unwatch()';

REVOKE ALL ON evictd.outbox, evictd.watches, evictd.outbox_id_seq, evictd.idle FROM PUBLIC;

-- ---------------------------------------------------------------------------
-- Internal helpers (not for direct use).
-- ---------------------------------------------------------------------------

-- The type a column's values have once domains are looked through.
CREATE OR REPLACE FUNCTION evictd._base_type(typ oid) RETURNS oid
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    WITH RECURSIVE d(oid, base, depth) AS (
        SELECT t.oid, t.typbasetype, 0 FROM pg_catalog.pg_type t WHERE t.oid = typ
        UNION ALL
        SELECT t.oid, t.typbasetype, d.depth + 1
          FROM d JOIN pg_catalog.pg_type t ON t.oid = d.base
         WHERE d.base <> 0 AND d.depth < 64
    )
    SELECT d.oid FROM d ORDER BY d.depth DESC LIMIT 1
$$;

-- SQL expression for the JSON image of `columns` read through `alias` (a table alias
-- or NEW/OLD). Only the listed columns; integers and booleans stay JSON numbers and
-- booleans, numeric/real/double precision become strings in PostgreSQL's text form,
-- anything else is what to_json() makes of it. json_build_object takes at most 100
-- arguments, so wider images are built in pieces of 50 columns and spliced.
CREATE OR REPLACE FUNCTION evictd._image_expr(tbl regclass, columns text[], alias text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_pairs text[];
    v_pieces text[] := '{}';
    v_i int;
BEGIN
    SELECT coalesce(array_agg(
               format('%L, %s', a.attname,
                      CASE WHEN evictd._base_type(a.atttypid) IN ('pg_catalog.numeric'::regtype,
                                                                  'pg_catalog.float4'::regtype,
                                                                  'pg_catalog.float8'::regtype)
                           THEN format('(%s.%I)::pg_catalog.text', alias, a.attname)
                           ELSE format('%s.%I', alias, a.attname) END)
               ORDER BY u.ord), '{}')
      INTO v_pairs
      FROM unnest(columns) WITH ORDINALITY AS u(col, ord)
      JOIN pg_catalog.pg_attribute a
        ON a.attrelid = tbl AND a.attname = u.col AND a.attnum > 0 AND NOT a.attisdropped;

    IF cardinality(v_pairs) <= 50 THEN
        RETURN format('pg_catalog.json_build_object(%s)', array_to_string(v_pairs, ', '));
    END IF;
    FOR v_i IN 0 .. (cardinality(v_pairs) - 1) / 50 LOOP
        v_pieces := v_pieces || format(
            'pg_catalog.left(pg_catalog.substr((pg_catalog.json_build_object(%s))::pg_catalog.text, 2), -1)',
            array_to_string(v_pairs[v_i * 50 + 1 : v_i * 50 + 50], ', '));
    END LOOP;
    RETURN format('((''{'' || %s || ''}'')::pg_catalog.json)', array_to_string(v_pieces, ' || '', '' || '));
END
$$;

-- Drop capture functions (of those given) that no trigger calls any more.
CREATE OR REPLACE FUNCTION evictd._drop_orphans(fns oid[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_fn regprocedure;
BEGIN
    FOR v_fn IN SELECT DISTINCT p.oid::regprocedure FROM pg_catalog.pg_proc p
                 WHERE p.oid = ANY (fns) AND p.pronamespace = 'evictd'::regnamespace AND p.proname LIKE 'capture\_%'
                   AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t WHERE t.tgfoid = p.oid) LOOP
        EXECUTE format('DROP FUNCTION %s', v_fn);
    END LOOP;
END
$$;

-- (Re)generate the capture function of a watched table from its evictd.watches row
-- and, when with_triggers, drop and recreate its triggers. Watched columns that no
-- longer exist are removed from the watch with a WARNING.
CREATE OR REPLACE FUNCTION evictd._generate(tbl regclass, with_triggers bool) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $gen$
DECLARE
    -- Row images per outbox row: at most c_chunk_rows (500), fewer when the statement's
    -- largest image is big: least(500, c_chunk_bytes / largest image), at least 1, so
    -- a chunk stays near c_chunk_bytes and a mass update of wide rows cannot build one
    -- huge payload. Ordinary rows (under 2 KiB of captured JSON) give exactly 500.
    c_chunk_rows  CONSTANT int := 500;
    c_chunk_bytes CONSTANT int := 1048576;
    -- NOTIFY payloads must stay below 8000 bytes.
    c_notify_max  CONSTANT int := 8000;
    w          evictd.watches%ROWTYPE;
    v_cols     text[];
    v_gone     text[];
    v_fn       text := format('evictd.%I', 'capture_' || tbl::oid);
    v_head     text;
    v_pk       text[];
    v_pairs    text;
    v_chunked  text;
    v_body     text;
    v_trg      record;
    v_old_fns  oid[];
BEGIN
    SELECT * INTO w FROM evictd.watches WHERE watches.tbl = _generate.tbl;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'evictd: table % is not watched', tbl;
    END IF;

    -- Keep only columns that still exist (ALTER TABLE may have dropped or renamed one).
    SELECT coalesce(array_agg(u.col ORDER BY u.ord) FILTER (WHERE a.attnum IS NOT NULL), '{}'),
           coalesce(array_agg(u.col ORDER BY u.ord) FILTER (WHERE a.attnum IS NULL), '{}')
      INTO v_cols, v_gone
      FROM unnest(w.columns) WITH ORDINALITY AS u(col, ord)
      LEFT JOIN pg_catalog.pg_attribute a
        ON a.attrelid = tbl AND a.attname = u.col AND a.attnum > 0 AND NOT a.attisdropped;
    IF cardinality(v_gone) > 0 THEN
        RAISE WARNING 'evictd: capture of table % no longer includes column(s) %: they are gone', tbl, v_gone
            USING HINT = 'Keys built from them are widened to patterns; run evictd.watch() again with the new column names.';
        UPDATE evictd.watches SET columns = v_cols WHERE watches.tbl = _generate.tbl;
    END IF;

    -- Common payload head: "v","id","tx","ts","schema","table","op" (the id argument is filled
    -- per mode). tx and ts are computed only where a payload is built: a statement that
    -- touches no row must not force a transaction id on a transaction that had none.
    v_head := $h$'v', 1, 'id', %s, 'tx', pg_catalog.txid_current(), $h$
           || $h$'ts', pg_catalog.round(EXTRACT(epoch FROM pg_catalog.clock_timestamp()) * 1000, 3), $h$
           || $h$'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'op', TG_OP$h$;

    IF w.durable THEN
        -- Primary key columns, to pair UPDATE images (read even when not captured).
        SELECT array_agg(a.attname ORDER BY k.ord)
          INTO v_pk
          FROM pg_catalog.pg_index i
         CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = tbl AND i.indisprimary AND k.ord <= i.indnkeyatts;

        -- %1$s: the SELECT producing one JSON "img" per row image; numbers the images,
        -- groups them into chunks, takes an outbox id per chunk (MATERIALIZED: nextval
        -- runs exactly once per chunk, in chunk order) and inserts one outbox row each.
        v_chunked := format($c$
        WITH c AS MATERIALIZED (
            SELECT pg_catalog.nextval('evictd.outbox_id_seq'::pg_catalog.regclass) AS id, g.rows
              FROM (SELECT pg_catalog.json_agg(s.img) AS rows, s.chunk
                      FROM (SELECT x.img,
                                   (pg_catalog.row_number() OVER w - 1)
                                   / GREATEST(1, LEAST(%2$s, %3$s / pg_catalog.max(pg_catalog.octet_length((x.img)::pg_catalog.text)) OVER w)) AS chunk
                              FROM (%1$s) AS x
                            WINDOW w AS ()) AS s
                     GROUP BY s.chunk
                     ORDER BY s.chunk) AS g)
        INSERT INTO evictd.outbox (id, payload)
        SELECT c.id, (pg_catalog.json_build_object(%4$s, 'rows', c.rows))::pg_catalog.text FROM c;
        GET DIAGNOSTICS v_n = ROW_COUNT;$c$,
            '%1$s', c_chunk_rows, c_chunk_bytes, format(v_head, 'c.id'));

        IF v_pk IS NOT NULL THEN
            v_pairs := format(
                'SELECT CASE WHEN o_.%1$I IS NULL THEN pg_catalog.json_build_object(''new'', %2$s)'
                '            WHEN n_.%1$I IS NULL THEN pg_catalog.json_build_object(''old'', %3$s)'
                '            ELSE pg_catalog.json_build_object(''old'', %3$s, ''new'', %2$s) END AS img'
                '  FROM evictd_old AS o_ FULL JOIN evictd_new AS n_ ON %4$s',
                v_pk[1], evictd._image_expr(tbl, v_cols, 'n_'), evictd._image_expr(tbl, v_cols, 'o_'),
                (SELECT string_agg(format('o_.%1$I = n_.%1$I', k), ' AND ') FROM unnest(v_pk) AS k));
        ELSE
            v_pairs := format(
                'SELECT pg_catalog.json_build_object(''old'', %1$s) AS img FROM evictd_old AS o_'
                ' UNION ALL '
                'SELECT pg_catalog.json_build_object(''new'', %2$s) AS img FROM evictd_new AS n_',
                evictd._image_expr(tbl, v_cols, 'o_'), evictd._image_expr(tbl, v_cols, 'n_'));
        END IF;

        v_body := format($b$
DECLARE
    v_n pg_catalog.int8 := 0;
BEGIN
    IF TG_OP = 'INSERT' THEN%1$s
    ELSIF TG_OP = 'UPDATE' THEN%2$s
    ELSIF TG_OP = 'DELETE' THEN%3$s
    ELSIF TG_OP = 'TRUNCATE' THEN
        v_n := pg_catalog.nextval('evictd.outbox_id_seq'::pg_catalog.regclass);
        INSERT INTO evictd.outbox (id, payload)
        VALUES (v_n, (pg_catalog.json_build_object(%4$s))::pg_catalog.text);
        v_n := 1;
    END IF;
    -- Doorbell: evictd is idle (drained the outbox and waits); wake it once.
    IF v_n > 0 AND (SELECT s.last_value FROM evictd.idle AS s) = 1 THEN
        PERFORM pg_catalog.setval('evictd.idle'::pg_catalog.regclass, 0);
        PERFORM pg_catalog.pg_notify(%5$L, '');
    END IF;
    RETURN NULL;
END
$b$,
            format(v_chunked, format('SELECT pg_catalog.json_build_object(''new'', %s) AS img FROM evictd_new AS n_',
                                     evictd._image_expr(tbl, v_cols, 'n_'))),
            format(v_chunked, v_pairs),
            format(v_chunked, format('SELECT pg_catalog.json_build_object(''old'', %s) AS img FROM evictd_old AS o_',
                                     evictd._image_expr(tbl, v_cols, 'o_'))),
            format(v_head, 'v_n'),
            w.channel);
    ELSE
        v_body := format($b$
DECLARE
    v_p pg_catalog.text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        v_p := (pg_catalog.json_build_object(%1$s, 'new', %2$s))::pg_catalog.text;
    ELSIF TG_OP = 'UPDATE' THEN
        v_p := (pg_catalog.json_build_object(%1$s, 'old', %3$s, 'new', %2$s))::pg_catalog.text;
    ELSIF TG_OP = 'DELETE' THEN
        v_p := (pg_catalog.json_build_object(%1$s, 'old', %3$s))::pg_catalog.text;
    ELSE
        v_p := (pg_catalog.json_build_object(%1$s))::pg_catalog.text;
    END IF;
    IF pg_catalog.octet_length(v_p) >= %4$s THEN
        -- Too big for NOTIFY: send a reference; evictd widens (nothing kept to resolve it).
        v_p := (pg_catalog.json_build_object('v', 1, 'id', NULL, 'ref', true, 'schema', TG_TABLE_SCHEMA,
                                             'table', TG_TABLE_NAME, 'op', TG_OP))::pg_catalog.text;
    END IF;
    PERFORM pg_catalog.pg_notify(%5$L, v_p);
    RETURN NULL;
END
$b$,
            format(v_head, 'NULL'), evictd._image_expr(tbl, v_cols, 'NEW'), evictd._image_expr(tbl, v_cols, 'OLD'),
            c_notify_max, w.channel);
    END IF;

    EXECUTE format('CREATE OR REPLACE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER '
                   'SET search_path = pg_catalog, pg_temp AS %L', v_fn, v_body);
    EXECUTE format('REVOKE ALL ON FUNCTION %s() FROM PUBLIC', v_fn);
    EXECUTE format('COMMENT ON FUNCTION %s() IS %L', v_fn,
                   format('evictd capture for %s (%s, columns %s, channel %s); generated by evictd.watch()',
                          tbl, CASE WHEN w.durable THEN 'durable' ELSE 'notify-only' END, v_cols, w.channel));

    -- Triggers missing, or calling another function (e.g. capture_<old oid> after a
    -- dump and restore gave the table a new oid): recreate them even when only the
    -- function was to be regenerated.
    IF NOT with_triggers AND (
           SELECT count(*) FROM pg_catalog.pg_trigger t
            WHERE t.tgrelid = tbl AND NOT t.tgisinternal AND t.tgfoid = (v_fn || '()')::regprocedure
              AND t.tgname IN ('evictd_insert', 'evictd_update', 'evictd_delete', 'evictd_truncate')) <> 4 THEN
        with_triggers := true;
    END IF;

    IF with_triggers THEN
        v_old_fns := '{}';
        FOR v_trg IN SELECT t.tgname, t.tgfoid FROM pg_catalog.pg_trigger t
                      WHERE t.tgrelid = tbl AND NOT t.tgisinternal
                        AND t.tgname IN ('evictd_insert', 'evictd_update', 'evictd_delete', 'evictd_truncate') LOOP
            EXECUTE format('DROP TRIGGER %I ON %s', v_trg.tgname, tbl);
            v_old_fns := v_old_fns || v_trg.tgfoid;
        END LOOP;
        IF w.durable THEN
            EXECUTE format('CREATE TRIGGER evictd_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS evictd_new '
                           'FOR EACH STATEMENT EXECUTE FUNCTION %s()', tbl, v_fn);
            EXECUTE format('CREATE TRIGGER evictd_update AFTER UPDATE ON %s REFERENCING OLD TABLE AS evictd_old '
                           'NEW TABLE AS evictd_new FOR EACH STATEMENT EXECUTE FUNCTION %s()', tbl, v_fn);
            EXECUTE format('CREATE TRIGGER evictd_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS evictd_old '
                           'FOR EACH STATEMENT EXECUTE FUNCTION %s()', tbl, v_fn);
        ELSE
            EXECUTE format('CREATE TRIGGER evictd_insert AFTER INSERT ON %s FOR EACH ROW EXECUTE FUNCTION %s()', tbl, v_fn);
            EXECUTE format('CREATE TRIGGER evictd_update AFTER UPDATE ON %s FOR EACH ROW EXECUTE FUNCTION %s()', tbl, v_fn);
            EXECUTE format('CREATE TRIGGER evictd_delete AFTER DELETE ON %s FOR EACH ROW EXECUTE FUNCTION %s()', tbl, v_fn);
        END IF;
        EXECUTE format('CREATE TRIGGER evictd_truncate AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                       tbl, v_fn);
        PERFORM evictd._drop_orphans(v_old_fns);
    END IF;
END
$gen$;

-- ---------------------------------------------------------------------------
-- Public API.
-- ---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION evictd.watch(tbl regclass, columns text[], channel text DEFAULT 'evictd',
                                        durable bool DEFAULT true) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_rel     record;
    v_cols    text[];
    v_missing text;
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'evictd.watch: table must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT c.relkind, c.relpersistence, n.nspname INTO v_rel
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = tbl;
    IF v_rel.relkind = 'p' THEN
        RAISE EXCEPTION 'evictd.watch: % is a partitioned table', tbl USING ERRCODE = 'wrong_object_type',
            HINT = 'Watch each partition: statement-level triggers on the parent miss writes addressed to a partition.';
    ELSIF v_rel.relkind IS DISTINCT FROM 'r' THEN
        RAISE EXCEPTION 'evictd.watch: % is not a table', tbl USING ERRCODE = 'wrong_object_type';
    ELSIF v_rel.relpersistence = 't' THEN
        RAISE EXCEPTION 'evictd.watch: % is a temporary table', tbl USING ERRCODE = 'wrong_object_type';
    ELSIF v_rel.nspname = 'evictd' THEN
        RAISE EXCEPTION 'evictd.watch: evictd''s own tables cannot be watched' USING ERRCODE = 'wrong_object_type';
    END IF;

    IF columns IS NULL OR array_position(columns, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'evictd.watch: columns must be an array of column names without nulls'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    -- De-duplicate, keeping first-seen order.
    SELECT coalesce(array_agg(s.col ORDER BY s.ord), '{}') INTO v_cols
      FROM (SELECT u.col, min(u.ord) AS ord FROM unnest(columns) WITH ORDINALITY AS u(col, ord) GROUP BY u.col) AS s;
    SELECT string_agg(format('%I', u.col), ', ') INTO v_missing
      FROM unnest(v_cols) AS u(col)
     WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                        WHERE a.attrelid = tbl AND a.attname = u.col AND a.attnum > 0 AND NOT a.attisdropped);
    IF v_missing IS NOT NULL THEN
        RAISE EXCEPTION 'evictd.watch: table % has no column %', tbl, v_missing USING ERRCODE = 'undefined_column',
            HINT = 'Column names are case-sensitive and unquoted: pass ARRAY[''id'', ''name''].';
    END IF;

    IF channel IS NULL OR channel = '' OR octet_length(channel) > 63 THEN
        RAISE EXCEPTION 'evictd.watch: channel must be a name of 1 to 63 bytes, not %', quote_nullable(channel)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF durable IS NULL THEN
        RAISE EXCEPTION 'evictd.watch: durable must be true or false' USING ERRCODE = 'null_value_not_allowed';
    END IF;

    INSERT INTO evictd.watches AS w (tbl, columns, channel, durable)
    VALUES (watch.tbl, v_cols, watch.channel, watch.durable)
    ON CONFLICT ON CONSTRAINT watches_pkey
    DO UPDATE SET columns = excluded.columns, channel = excluded.channel, durable = excluded.durable;

    PERFORM evictd._generate(tbl, true);
END
$$;
COMMENT ON FUNCTION evictd.watch(regclass, text[], text, bool) IS
    'evictd: report changes of tbl (only the given columns) on channel; durable => outbox + doorbell, else NOTIFY only. Idempotent; replaces any previous watch.';

CREATE OR REPLACE FUNCTION evictd.unwatch(tbl regclass) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_trg     record;
    v_old_fns oid[] := '{}';
BEGIN
    FOR v_trg IN SELECT t.tgname, t.tgfoid FROM pg_catalog.pg_trigger t
                  WHERE t.tgrelid = tbl AND NOT t.tgisinternal
                    AND t.tgname IN ('evictd_insert', 'evictd_update', 'evictd_delete', 'evictd_truncate') LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', v_trg.tgname, tbl);
        v_old_fns := v_old_fns || v_trg.tgfoid;
    END LOOP;
    PERFORM evictd._drop_orphans(v_old_fns);
    EXECUTE format('DROP FUNCTION IF EXISTS evictd.%I()', 'capture_' || tbl::oid);
    DELETE FROM evictd.watches WHERE watches.tbl = unwatch.tbl;
END
$$;
COMMENT ON FUNCTION evictd.unwatch(regclass) IS
    'evictd: stop reporting changes of tbl (drops its triggers and capture function). Idempotent.';

-- ---------------------------------------------------------------------------
-- Keeping generated functions in step with DDL (event triggers: superuser only).
-- ---------------------------------------------------------------------------

-- After ALTER TABLE on a watched table: regenerate its capture function (columns
-- renamed or dropped leave the capture; type and primary key changes are followed).
CREATE OR REPLACE FUNCTION evictd._on_alter_table() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_tbl regclass;
BEGIN
    FOR v_tbl IN SELECT DISTINCT w.tbl
                   FROM pg_catalog.pg_event_trigger_ddl_commands() AS c
                   JOIN evictd.watches AS w ON w.tbl = c.objid
                  WHERE c.classid = 'pg_catalog.pg_class'::regclass LOOP
        PERFORM evictd._generate(v_tbl, false);
    END LOOP;
END
$$;

-- After a watched table is dropped: forget its watch and drop its capture function.
CREATE OR REPLACE FUNCTION evictd._on_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_oid oid;
BEGIN
    FOR v_oid IN SELECT w.tbl::oid
                   FROM pg_catalog.pg_event_trigger_dropped_objects() AS d
                   JOIN evictd.watches AS w ON w.tbl::oid = d.objid
                  WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objsubid = 0 LOOP
        DELETE FROM evictd.watches WHERE tbl::oid = v_oid;
        EXECUTE format('DROP FUNCTION IF EXISTS evictd.%I()', 'capture_' || v_oid);
    END LOOP;
END
$$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA evictd FROM PUBLIC;

DO $$
BEGIN
    IF NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user) THEN
        RAISE WARNING 'evictd: not a superuser, so no event triggers: after ALTER TABLE on a watched table run evictd.watch() for it again';
        RETURN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'evictd_alter_table') THEN
        CREATE EVENT TRIGGER evictd_alter_table ON ddl_command_end WHEN TAG IN ('ALTER TABLE')
            EXECUTE FUNCTION evictd._on_alter_table();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'evictd_drop') THEN
        CREATE EVENT TRIGGER evictd_drop ON sql_drop EXECUTE FUNCTION evictd._on_drop();
    END IF;
END
$$;

-- Upgrade in place: regenerate the capture function of every existing watch with
-- this file's generator; forget watches of tables that no longer exist.
DO $$
DECLARE
    v_oid oid;
BEGIN
    FOR v_oid IN SELECT w.tbl::oid FROM evictd.watches w ORDER BY 1 LOOP
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_class WHERE oid = v_oid) THEN
            PERFORM evictd._generate(v_oid::regclass, false);
        ELSE
            DELETE FROM evictd.watches WHERE tbl::oid = v_oid;
            EXECUTE format('DROP FUNCTION IF EXISTS evictd.%I()', 'capture_' || v_oid);
        END IF;
    END LOOP;
END
$$;

COMMIT;
