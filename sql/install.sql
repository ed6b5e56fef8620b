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
--   idle                      sequence used as a flag: evictd sets it to 1 when it has
--                             drained the outbox; the first write after that sets it to 0
--                             and rings the doorbell (a NOTIFY carrying the change of a one-row
--                             statement under 8000 bytes, else empty). Under light load evictd
--                             sets a lease instead, the server's epoch ms a second ahead, and
--                             renews it while rows come: until then every write rings and leaves it set, except
--                             one whose ring would wait for another ringing transaction's
--                             commit (advisory lock 1702259043, 29796, held to commit); past it
--                             (evictd stopped reading, or idle for a second), it acts as 1. Sequences are read and
--                             written outside transaction visibility, so the flag is seen at
--                             once by every writer, whatever its isolation level.
--   watches                   one row per watched table
--   watch(tbl, columns, channel DEFAULT 'evictd', durable DEFAULT true)
--   unwatch(tbl)
--   capture_<table oid>_<event>()  generated trigger functions of one watched table, one per
--                             event (insert, update, delete, truncate): no dispatch on TG_OP
--
-- Trigger shape (names fixed; `evictd check --connect` looks for them):
--   durable:     evictd_insert / evictd_update / evictd_delete: AFTER ... FOR EACH STATEMENT
--                with transition tables (evictd_old / evictd_new), evictd_truncate:
--                AFTER TRUNCATE FOR EACH STATEMENT. Each statement writes its row images
--                in chunks of at most 500 per outbox row (a chunk closes early past about
--                1 MiB of images), then rings the doorbell if evictd is idle. A statement
--                that touched one row (the common write) costs one INSERT ... SELECT ...
--                LIMIT 2 and one expression: the INSERT reads the first rows from the
--                transition table(s), pairs them, renders each payload with format() (the
--                table's names are baked in, and checked after) and takes outbox ids. A
--                statement of more rows deletes the two rows written and streams its images
--                through a plpgsql loop that inserts a chunk every 500 images and at the end
--                (the two ids it took stay unused). The images hold the values that
--                json_build_object() would give, rendered per column type when generated, as
--                compact JSON (no blanks: the outbox row is WAL the writer waits for).
--                The functions are SECURITY DEFINER with search_path pinned to pg_catalog,
--                pg_temp; each reads the idle flag with pg_sequence_last_value() and takes an
--                outbox id, txid_current() and clock_timestamp() only when the statement
--                touched a row. (tests/bench/trigger_cost.sh measures what it costs a writer.)
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
-- Every name below is schema-qualified or resolved in pg_catalog: the caller's search_path
-- (a schema others can write to, listed before pg_catalog) cannot redirect this script.
SET LOCAL search_path = pg_catalog, pg_temp;

CREATE SCHEMA IF NOT EXISTS evictd;
REVOKE ALL ON SCHEMA evictd FROM PUBLIC;
COMMENT ON SCHEMA evictd IS 'evictd: change capture for cache invalidation (sql/install.sql)';

CREATE SEQUENCE IF NOT EXISTS evictd.outbox_id_seq AS bigint;
CREATE TABLE IF NOT EXISTS evictd.outbox (
    id      bigint PRIMARY KEY,
    payload text   NOT NULL
);
-- ALTER SEQUENCE only when needed: it takes a lock that waits for every open transaction that
-- wrote through a capture, and holds up new ones until this file commits.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                    WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
                      AND d.objid = 'evictd.outbox_id_seq'::pg_catalog.regclass
                      AND d.refobjid = 'evictd.outbox'::pg_catalog.regclass AND d.deptype = 'a') THEN
        ALTER SEQUENCE evictd.outbox_id_seq OWNED BY evictd.outbox.id;
    END IF;
END
$$;
-- A queue table: rows are inserted and soon deleted; vacuum it often so claims stay cheap.
ALTER TABLE evictd.outbox SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000,
                               autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 1000);
COMMENT ON TABLE evictd.outbox IS 'evictd: durable change payloads (JSON text), deleted by evictd once applied';

CREATE SEQUENCE IF NOT EXISTS evictd.idle AS bigint MINVALUE 0 NO MAXVALUE START 0 NO CYCLE;
DO $$
BEGIN
    IF (SELECT s.seqmax FROM pg_catalog.pg_sequence s
         WHERE s.seqrelid = 'evictd.idle'::pg_catalog.regclass) <> 9223372036854775807 THEN
        ALTER SEQUENCE evictd.idle NO MAXVALUE; -- an install from before the light-load lease (MAXVALUE 1)
    END IF;
END
$$;
COMMENT ON SEQUENCE evictd.idle IS
    'evictd idle flag: 0 busy (no ring); 1 idle (the next write rings and sets 0); > 1 light load until that epoch ms (every write rings unless another ringing transaction is in flight; past it, as 1)';

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

-- A type made after initdb (FirstNormalObjectId, 16384, and up, domains looked through):
-- enums, composites, ranges, arrays of them, extension types. Its functions and casts may be
-- its owner's: the capture renders and compares such values by their text forms.
CREATE OR REPLACE FUNCTION evictd._user_type(typ oid) RETURNS bool
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT evictd._base_type(typ) >= 16384
$$;

-- Earlier versions built notify-only images with json_build_object() (blanks after ':' and ',').
DROP FUNCTION IF EXISTS evictd._image_expr(regclass, text[], text);

-- Both captures render row images as text with format(): for `columns` read through
-- `alias` (a table alias, or NEW/OLD), keys[i] is '"column":%s' (the column name as a JSON
-- string, % doubled for format()) and args[i] an SQL expression whose text is the column's
-- JSON value, never NULL: the value json_build_object() would give, built without its
-- per-call type lookups. Payloads are compact JSON (no blank after ':' or ','): each byte of an outbox
-- row is WAL a writer waits to flush. A primary key column of an integer type is passed as it
-- is (format() prints it with the type's output function; it cannot be NULL); other integers
-- become their text or null, booleans true/false/null, numeric/real/double precision a JSON
-- string of their text form (which needs no escaping) or null, other built-in types to_json() or
-- null. A type made after initdb (oid 16384 and up: enums, composites, ranges, domains over them,
-- arrays of them, extension types) is a JSON string of its text form (its output function) or
-- null: to_json() would call a cast to json that the type's owner may have created, and these
-- functions run as their owner (SECURITY DEFINER), so that cast would run with the installer's
-- rights.
CREATE OR REPLACE FUNCTION evictd._image_parts(tbl regclass, columns text[], pk text[], alias text,
                                               OUT keys text[], OUT args text[])
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(array_agg(pg_catalog.replace(pg_catalog.to_json(a.attname::text)::text, '%', '%%') || ':%s'
                              ORDER BY u.ord), '{}'),
           coalesce(array_agg(
               CASE WHEN t.base IN ('pg_catalog.int2'::regtype, 'pg_catalog.int4'::regtype, 'pg_catalog.int8'::regtype)
                         AND a.attname = ANY (pk)
                    THEN pg_catalog.format('%s.%I', alias, a.attname)
                    WHEN t.base IN ('pg_catalog.int2'::regtype, 'pg_catalog.int4'::regtype, 'pg_catalog.int8'::regtype)
                    THEN pg_catalog.format('coalesce((%s.%I)::pg_catalog.text, ''null'')', alias, a.attname)
                    WHEN t.base = 'pg_catalog.bool'::regtype
                    THEN pg_catalog.format('CASE WHEN %1$s.%2$I THEN ''true'' WHEN NOT %1$s.%2$I THEN ''false'' ELSE ''null'' END',
                                           alias, a.attname)
                    WHEN t.base IN ('pg_catalog.numeric'::regtype, 'pg_catalog.float4'::regtype, 'pg_catalog.float8'::regtype)
                    THEN pg_catalog.format('coalesce(''"'' || (%s.%I)::pg_catalog.text || ''"'', ''null'')', alias, a.attname)
                    WHEN evictd._user_type(a.atttypid)
                    THEN pg_catalog.format('CASE WHEN pg_catalog.num_nulls(%1$s.%2$I) = 0 '
                                           'THEN (pg_catalog.to_json(pg_catalog.format(''%%s'', %1$s.%2$I)))::pg_catalog.text '
                                           'ELSE ''null'' END', alias, a.attname)
                    ELSE pg_catalog.format('coalesce((pg_catalog.to_json(%s.%I))::pg_catalog.text, ''null'')', alias, a.attname)
               END ORDER BY u.ord), '{}')
      FROM pg_catalog.unnest(columns) WITH ORDINALITY AS u(col, ord)
      JOIN pg_catalog.pg_attribute a
        ON a.attrelid = tbl AND a.attname = u.col AND a.attnum > 0 AND NOT a.attisdropped
     CROSS JOIN LATERAL (SELECT evictd._base_type(a.atttypid) AS base) AS t
$$;

-- SQL expression for pg_catalog.format(fmt, args...) (or the literal it gives when there are no args).
CREATE OR REPLACE FUNCTION evictd._format_call(fmt text, args text[]) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN cardinality(args) = 0 THEN quote_literal(replace(fmt, '%%', '%'))
                ELSE format('pg_catalog.format(%L, %s)', fmt, array_to_string(args, ', ')) END
$$;

-- SQL expression for prefix || <JSON image from _image_parts> || suffix: one format() call
-- per 90 columns (format() takes at most 100 arguments), joined with ||.
CREATE OR REPLACE FUNCTION evictd._image_sql(keys text[], args text[], prefix text, suffix text) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_n      int := cardinality(keys);
    v_last   int := (cardinality(keys) - 1) / 90;
    v_pieces text[] := '{}';
    v_i      int;
BEGIN
    IF v_n = 0 THEN
        RETURN quote_literal(prefix || '{}' || suffix);
    END IF;
    FOR v_i IN 0 .. v_last LOOP
        v_pieces := v_pieces || evictd._format_call(
            CASE WHEN v_i = 0 THEN replace(prefix, '%', '%%') || '{' ELSE ',' END
            || array_to_string(keys[v_i * 90 + 1 : v_i * 90 + 90], ',')
            || CASE WHEN v_i = v_last THEN '}' || replace(suffix, '%', '%%') ELSE '' END,
            args[v_i * 90 + 1 : v_i * 90 + 90]);
    END LOOP;
    RETURN array_to_string(v_pieces, ' || ');
END
$$;

-- SQL expression for a durable payload's "ts": the trigger's clock_timestamp() in epoch
-- milliseconds, a double precision (what date_part() gives; its text form is a JSON number, its
-- width varies with its digits). Cheaper than numeric arithmetic, which allocates at every step.
-- Notify-only payloads keep a numeric with 3 decimals (fixed width: a payload's size against
-- the NOTIFY limit does not depend on the clock; next to a NOTIFY its cost does not show).
CREATE OR REPLACE FUNCTION evictd._ts_sql() RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT 'pg_catalog.date_part(''epoch'', pg_catalog.clock_timestamp()) * 1000'
$$;

-- Durable capture, the common single-row write: one INSERT ... SELECT reads the statement's
-- first rows from the transition table(s) (from_clause), at most 2, and writes each as a
-- one-image chunk: its outbox id from nextval() and the same id in its payload from currval()
-- (a row's target list is evaluated in order; test_capture checks that the two agree). v_c
-- counts the rows written. One row, the table's names still those baked into the payload
-- (guard), and evictd busy: done; the common case costs one expression. One row and evictd
-- idle: the same payload again, from the transition table, for the doorbell (byte for byte the
-- row's: ts is taken once, in v_ts, and currval() is the row's id). Not read back from the
-- outbox: a plan kept in the function is made while the outbox is a page or two (drained,
-- vacuumed, truncated), is a sequential scan there and stays one while the table grows between
-- vacuums (at 2,000 writes/s under a lease, 60 % of the writes read up to 71 pages back each);
-- planned at each call (EXECUTE) it cost a ringing write 60,000 instructions more than this.
-- Otherwise the caller goes on with _chunk_sql. rows_fmt/rows_args are the format() text and
-- arguments of the "rows" array's content, over the transition tables' aliases. No separate
-- query counts the statement's rows: executor start-up is most of what a query costs a one-row
-- write.
DROP FUNCTION IF EXISTS evictd._fast_sql(text, text, text, text, text, text[], text, text[]);
CREATE OR REPLACE FUNCTION evictd._fast_sql(op text, names text, guard text, from_clause text,
                                            rows_fmt text, rows_args text[]) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT format($f$
        v_ts := %4$s;
        INSERT INTO evictd.outbox (id, payload)
        SELECT pg_catalog.nextval('evictd.outbox_id_seq'::pg_catalog.regclass),
               %1$s
          FROM %2$s
         LIMIT 2;
        GET DIAGNOSTICS v_c = ROW_COUNT;
        IF v_c = 1 AND %3$s AND COALESCE(pg_catalog.pg_sequence_last_value('evictd.idle'::pg_catalog.regclass), 0) = 0 THEN
            RETURN NULL;
        END IF;
        IF v_c = 1 AND %3$s THEN
            SELECT %1$s INTO v_p FROM %2$s;
        END IF;$f$,
        format('pg_catalog.format(%L,
                                 %s)',
               '{"v":1,"id":%s,"tx":%s,"ts":%s,' || names || ',"op":"' || op || '","rows":[' || rows_fmt || ']}',
               array_to_string(ARRAY['pg_catalog.currval(''evictd.outbox_id_seq''::pg_catalog.regclass)',
                                     'pg_catalog.txid_current()', 'v_ts'] || rows_args, ', ')),
        from_clause, guard, evictd._ts_sql())
$$;

-- Durable capture after the one-row INSERT (_fast_sql) when it did not return. v_c = 0: the
-- statement touched no row; write and ring nothing. One row with the right names: evictd is
-- idle, and _fast_sql has the doorbell's payload in v_p. Else (a statement of more rows, or a
-- table renamed since this function was generated): take back the rows just written (the
-- last has the id currval() gives; the one before it, the highest id below that whose payload
-- starts with its own id and this transaction's; both by EXECUTE, planned for the outbox's
-- size at the time, not kept from when it was small), then stream the statement's images (query:
-- one text column) and write them in chunks of at most chunk_rows, a chunk closing early when
-- the next image would take it past chunk_bytes (a chunk holds at least one image). The
-- caller's doorbell follows.
DROP FUNCTION IF EXISTS evictd._chunk_sql(text, int, int, text);
CREATE OR REPLACE FUNCTION evictd._chunk_sql(op text, guard text, chunk_rows int, chunk_bytes int, query text)
RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT format($f$
        IF v_c = 0 THEN
            RETURN NULL;
        END IF;
        IF v_c > 1 OR NOT (%5$s) THEN
            v_id := pg_catalog.currval('evictd.outbox_id_seq'::pg_catalog.regclass);
            EXECUTE 'DELETE FROM evictd.outbox AS o WHERE o.id = $1' USING v_id;
            IF v_c = 2 THEN
                EXECUTE $q$DELETE FROM evictd.outbox AS o
                 WHERE o.id = (SELECT pg_catalog.max(p.id) FROM evictd.outbox AS p
                                WHERE p.id < $1
                                  AND pg_catalog.starts_with(p.payload, pg_catalog.format('{"v":1,"id":%%s,"tx":%%s,',
                                                                                         p.id, pg_catalog.txid_current())))$q$
                USING v_id;
            END IF;
            v_k := 0;
            v_len := 0;
            FOR v_img IN %1$s LOOP
                IF v_k = %3$s OR (v_k > 0 AND v_len + pg_catalog.octet_length(v_img) > %4$s) THEN%2$s
                    v_k := 0;
                    v_len := 0;
                END IF;
                v_k := v_k + 1;
                v_buf[v_k] := v_img;
                v_len := v_len + pg_catalog.octet_length(v_img);
            END LOOP;
            IF v_k > 0 THEN%2$s
            END IF;
        END IF;$f$,
        query,
        format($f$
                    v_id := pg_catalog.nextval('evictd.outbox_id_seq'::pg_catalog.regclass);
                    INSERT INTO evictd.outbox (id, payload)
                    VALUES (v_id, pg_catalog.format(%1$L,
                                                    v_id, pg_catalog.txid_current(), %2$s,
                                                    pg_catalog.to_json(TG_TABLE_SCHEMA), pg_catalog.to_json(TG_TABLE_NAME),
                                                    pg_catalog.array_to_string(v_buf[1:v_k], ',')));$f$,
            '{"v":1,"id":%s,"tx":%s,"ts":%s,"schema":%s,"table":%s,"op":"' || op || '","rows":[%s]}',
            evictd._ts_sql()),
        chunk_rows, chunk_bytes, guard)
$$;

-- Durable capture of an INSERT (new images from evictd_new, alias n_) or a DELETE (old images
-- from evictd_old, alias o_): the one-row path, its images' values inline as format()
-- arguments when they fit in its 100 (head: format text, id, tx, ts), then the general path.
DROP FUNCTION IF EXISTS evictd._side_sql(text, text, text, text, text, text, text[], text[], text[], text[], text,
                                         int, int);
CREATE OR REPLACE FUNCTION evictd._side_sql(op text, tt text, alias text, side text, names text, guard text,
                                            keys text[], args text[], img text, chunk_rows int, chunk_bytes int)
RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN 4 + cardinality(args) <= 100
                THEN evictd._fast_sql(op, names, guard, tt || ' AS ' || alias,
                                      '{"' || side || '":' || img || '}', args)
                ELSE evictd._fast_sql(op, names, guard, tt || ' AS ' || alias, '%s',
                                      ARRAY[evictd._image_sql(keys, args, '{"' || side || '":', '}')]) END
           || evictd._chunk_sql(op, guard, chunk_rows, chunk_bytes,
                  format('SELECT %s FROM %s AS %s', evictd._image_sql(keys, args, '{"' || side || '":', '}'),
                         tt, alias))
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

-- Drop every capture function of the table with this oid (also capture_<oid>(), the one
-- function for all events of earlier versions).
CREATE OR REPLACE FUNCTION evictd._drop_captures(tbl oid) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_fn regprocedure;
BEGIN
    FOR v_fn IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
                 WHERE p.pronamespace = 'evictd'::regnamespace
                   AND (p.proname = 'capture_' || tbl OR p.proname LIKE 'capture\_' || tbl || '\_%') LOOP
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
    -- Row images per outbox row: at most c_chunk_rows (500); a chunk closes early when
    -- the next image would take it past c_chunk_bytes (it holds at least one image), so a
    -- mass update of wide rows cannot build one huge payload. Ordinary rows (under 2 KiB
    -- of captured JSON) give chunks of exactly 500.
    c_chunk_rows  CONSTANT int := 500;
    c_chunk_bytes CONSTANT int := 1048576;
    -- NOTIFY payloads must stay below 8000 bytes.
    c_notify_max  CONSTANT int := 8000;
    -- The advisory lock (two int4 keys: 'evic', 'td') a writer takes to ring while the idle
    -- flag is 2; evictd never takes it.
    c_ring_lock1  CONSTANT int := 1702259043;
    c_ring_lock2  CONSTANT int := 29796;
    w          evictd.watches%ROWTYPE;
    v_cols     text[];
    v_gone     text[];
    -- The events, their triggers and their functions, in this order.
    c_events   CONSTANT text[] := ARRAY['insert', 'update', 'delete', 'truncate'];
    v_fns      text[] := ARRAY(SELECT format('evictd.%I', 'capture_' || tbl::oid || '_' || e) FROM unnest(c_events) AS e);
    v_bodies   text[];
    v_i        int;
    v_head     text;
    v_new      text;
    v_old      text;
    v_pk       text[];
    v_okeys    text[];
    v_oargs    text[];
    v_nkeys    text[];
    v_nargs    text[];
    v_oimg     text;
    v_nimg     text;
    v_names    text;
    v_guard    text;
    v_inline   bool;
    v_pkeq     text;
    v_sep      text;
    v_upd      text;
    v_ins      text;
    v_del      text;
    v_body     text;
    v_trg      record;
    v_old_fns  oid[];
    v_float    bool;
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

    IF w.durable THEN
        -- Primary key columns, to pair UPDATE images (read even when not captured).
        SELECT array_agg(a.attname ORDER BY k.ord)
          INTO v_pk
          FROM pg_catalog.pg_index i
         CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = tbl AND i.indisprimary AND k.ord <= i.indnkeyatts;
        SELECT p.keys, p.args INTO v_okeys, v_oargs FROM evictd._image_parts(tbl, v_cols, v_pk, 'o_') AS p;
        SELECT p.keys, p.args INTO v_nkeys, v_nargs FROM evictd._image_parts(tbl, v_cols, v_pk, 'n_') AS p;
        -- The one-row path bakes the table's current names into its payload and checks them
        -- at run time (a table renamed without this function being regenerated takes the
        -- general path, which reads them at run time).
        SELECT replace(format('"schema":%s,"table":%s', to_json(n.nspname::text), to_json(c.relname::text)), '%', '%%'),
               format('TG_TABLE_NAME = %L AND TG_TABLE_SCHEMA = %L', c.relname, n.nspname)
          INTO v_names, v_guard
          FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = tbl;
        -- An image's format() text: {"col":%s,...}.
        v_oimg := '{' || array_to_string(v_okeys, ',') || '}';
        v_nimg := '{' || array_to_string(v_nkeys, ',') || '}';
        -- The images' values are arguments of the payload's format() when they fit in its 100
        -- arguments (head: format text, id, tx, ts); else each image is one expression (_image_sql).
        v_inline := 4 + 2 * cardinality(v_oargs) + 1 <= 100;

        -- UPDATE: pair old and new by primary key; without one, images come unpaired.
        IF v_pk IS NOT NULL THEN
            -- Keys of a type made after initdb compare by their text forms: its '=' may not be in
            -- pg_catalog (the pinned search_path: ltree, isn), and one that is found may be the
            -- type owner's function, which would run with the installer's rights.
            v_pkeq := (SELECT string_agg(CASE WHEN evictd._user_type(a.atttypid)
                                              THEN format('pg_catalog.format(''%%s'', o_.%1$I) = pg_catalog.format(''%%s'', n_.%1$I)', k.k)
                                              ELSE format('o_.%1$I = n_.%1$I', k.k) END, ' AND ' ORDER BY k.ord)
                         FROM unnest(v_pk) WITH ORDINALITY AS k(k, ord)
                         JOIN pg_catalog.pg_attribute a ON a.attrelid = tbl AND a.attname = k.k);
            v_sep := format($s$CASE WHEN %s THEN ',"new":' ELSE '},{"new":' END$s$, v_pkeq);
            v_upd := CASE WHEN v_inline
                THEN evictd._fast_sql('UPDATE', v_names, v_guard, 'evictd_old AS o_, evictd_new AS n_',
                         '{"old":' || v_oimg || '%s' || v_nimg || '}', v_oargs || v_sep || v_nargs)
                ELSE evictd._fast_sql('UPDATE', v_names, v_guard, 'evictd_old AS o_, evictd_new AS n_',
                         '{"old":%s%s%s}', ARRAY[evictd._image_sql(v_okeys, v_oargs, '', ''), v_sep,
                                                 evictd._image_sql(v_nkeys, v_nargs, '', '')]) END
                || evictd._chunk_sql('UPDATE', v_guard, c_chunk_rows, c_chunk_bytes, format(
                       'SELECT CASE WHEN o_.%1$I IS NULL THEN %2$s WHEN n_.%1$I IS NULL THEN %3$s ELSE %4$s END'
                       '  FROM evictd_old AS o_ FULL JOIN evictd_new AS n_ ON %5$s',
                       v_pk[1], evictd._image_sql(v_nkeys, v_nargs, '{"new":', '}'),
                       evictd._image_sql(v_okeys, v_oargs, '{"old":', '}'),
                       CASE WHEN 1 + 2 * cardinality(v_oargs) <= 100
                            THEN evictd._format_call('{"old":' || v_oimg || ',"new":' || v_nimg || '}', v_oargs || v_nargs)
                            ELSE evictd._image_sql(v_okeys, v_oargs, '{"old":', '') || ' || '
                                 || evictd._image_sql(v_nkeys, v_nargs, ',"new":', '}') END,
                       v_pkeq));
        ELSE
            v_upd := CASE WHEN v_inline
                THEN evictd._fast_sql('UPDATE', v_names, v_guard, 'evictd_old AS o_, evictd_new AS n_',
                         '{"old":' || v_oimg || '},{"new":' || v_nimg || '}', v_oargs || v_nargs)
                ELSE evictd._fast_sql('UPDATE', v_names, v_guard, 'evictd_old AS o_, evictd_new AS n_',
                         '{"old":%s},{"new":%s}', ARRAY[evictd._image_sql(v_okeys, v_oargs, '', ''),
                                                        evictd._image_sql(v_nkeys, v_nargs, '', '')]) END
                || evictd._chunk_sql('UPDATE', v_guard, c_chunk_rows, c_chunk_bytes, format(
                       'SELECT %s FROM evictd_old AS o_ UNION ALL SELECT %s FROM evictd_new AS n_',
                       evictd._image_sql(v_okeys, v_oargs, '{"old":', '}'),
                       evictd._image_sql(v_nkeys, v_nargs, '{"new":', '}')));
        END IF;

        -- INSERT (new images) and DELETE (old images).
        v_ins := evictd._side_sql('INSERT', 'evictd_new', 'n_', 'new', v_names, v_guard,
                                  v_nkeys, v_nargs, v_nimg, c_chunk_rows, c_chunk_bytes);
        v_del := evictd._side_sql('DELETE', 'evictd_old', 'o_', 'old', v_names, v_guard,
                                  v_okeys, v_oargs, v_oimg, c_chunk_rows, c_chunk_bytes);

        -- One function per event (a test of TG_OP would cost every call an expression). Queries
        -- qualify every column (o_., n_., o., p.); use_variable keeps a watched column named like
        -- TG_TABLE_NAME or v_id from making the guard or a chunk ambiguous (an error, a failed write).
        -- No variable has an initial value: each would be an expression evaluated at every call.
        v_body := $b$
#variable_conflict use_variable
DECLARE
    v_c   pg_catalog.int8;        -- rows the one-row INSERT wrote (at most 2)
    v_k   pg_catalog.int4;        -- images in the chunk being built ...
    v_len pg_catalog.int8;        -- ... their bytes ...
    v_buf pg_catalog.text[];      -- ... and the images, 1 .. v_k
    v_img pg_catalog.text;
    v_id  pg_catalog.int8;
    v_p   pg_catalog.text;        -- the one-row path's payload: the doorbell carries it
    v_ts  pg_catalog.float8;      -- the one-row path's ts (its payload is built twice when ringing)
    v_f   pg_catalog.int8;        -- the idle flag
BEGIN%1$s
    -- Doorbell: evictd is idle (drained the outbox and waits); wake it once. A one-row
    -- statement's doorbell carries its change (evictd applies it at once, and again when it
    -- claims the row); any other rings empty.
    -- Flag 1 (idle): ring once, clearing it. Flag > 1 (light load; evictd renews it while rows come): until
    -- that epoch ms, ring, leaving it set, unless a transaction that rang has not ended yet
    -- (the advisory lock, held to commit): then at most one ringing transaction is ever in
    -- flight, and PostgreSQL, which serialises the commits of notifying transactions, never
    -- makes a writer wait for another's. Past it (evictd stopped reading, or idle), as flag 1.
    v_f := pg_catalog.pg_sequence_last_value('evictd.idle'::pg_catalog.regclass);
    IF v_f = 1 OR (v_f > 1 AND v_f <= pg_catalog.date_part('epoch', pg_catalog.clock_timestamp()) * 1000) THEN
        PERFORM pg_catalog.setval('evictd.idle'::pg_catalog.regclass, 0);
        PERFORM pg_catalog.pg_notify(%2$L, CASE WHEN pg_catalog.octet_length(v_p) < %3$s THEN v_p ELSE '' END);
    ELSIF v_f > 1 AND pg_catalog.pg_try_advisory_xact_lock(%4$s, %5$s) THEN
        PERFORM pg_catalog.pg_notify(%2$L, CASE WHEN pg_catalog.octet_length(v_p) < %3$s THEN v_p ELSE '' END);
    END IF;
    RETURN NULL;
END
$b$;
        v_bodies := ARRAY(SELECT format(v_body, op, w.channel, c_notify_max, c_ring_lock1, c_ring_lock2)
                            FROM unnest(ARRAY[v_ins, v_upd, v_del, format($t$
        v_id := pg_catalog.nextval('evictd.outbox_id_seq'::pg_catalog.regclass);
        INSERT INTO evictd.outbox (id, payload)
        VALUES (v_id, pg_catalog.format(%L, v_id, pg_catalog.txid_current(), %s,
                                        pg_catalog.to_json(TG_TABLE_SCHEMA), pg_catalog.to_json(TG_TABLE_NAME)));$t$,
                                '{"v":1,"id":%s,"tx":%s,"ts":%s,"schema":%s,"table":%s,"op":"TRUNCATE"}',
                                evictd._ts_sql())]) WITH ORDINALITY AS u(op, i) ORDER BY u.i);
    ELSE
        v_body := $b$
DECLARE
    v_p pg_catalog.text;
BEGIN
    v_p := %1$s;
    IF pg_catalog.octet_length(v_p) >= %2$s THEN
        -- Too big for NOTIFY: send a reference; evictd widens (nothing kept to resolve it).
        v_p := pg_catalog.format('{"v":1,"id":null,"ref":true,"schema":%%s,"table":%%s,"op":"%%s"}',
                                 pg_catalog.to_json(TG_TABLE_SCHEMA), pg_catalog.to_json(TG_TABLE_NAME), TG_OP);
    END IF;
    PERFORM pg_catalog.pg_notify(%3$L, v_p);
    RETURN NULL;
END
$b$;
        -- The payload, compact JSON like the durable capture's: its head "v","id","tx","ts",
        -- "schema","table","op" (tx and ts taken only here, where a row changed), then the row's
        -- images. ts keeps 3 decimals (fixed width: a payload's size against the NOTIFY limit
        -- does not depend on the clock).
        v_head := $h$pg_catalog.format('{"v":1,"id":null,"tx":%s,"ts":%s,"schema":%s,"table":%s,"op":"%s"', $h$
               || $h$pg_catalog.txid_current(), pg_catalog.round(EXTRACT(epoch FROM pg_catalog.clock_timestamp()) * 1000, 3), $h$
               || $h$pg_catalog.to_json(TG_TABLE_SCHEMA), pg_catalog.to_json(TG_TABLE_NAME), TG_OP)$h$;
        SELECT p.keys, p.args INTO v_okeys, v_oargs FROM evictd._image_parts(tbl, v_cols, NULL, 'OLD') AS p;
        SELECT p.keys, p.args INTO v_nkeys, v_nargs FROM evictd._image_parts(tbl, v_cols, NULL, 'NEW') AS p;
        v_new := ' || ' || evictd._image_sql(v_nkeys, v_nargs, ',"new":', '');
        v_old := ' || ' || evictd._image_sql(v_okeys, v_oargs, ',"old":', '');
        v_bodies := ARRAY(SELECT format(v_body, v_head || a || ' || ''}''', c_notify_max, w.channel)
                            FROM unnest(ARRAY[v_new, v_old || v_new, v_old, '']) WITH ORDINALITY AS u(a, i)
                           ORDER BY u.i);
    END IF;

    -- The text form of real and double precision depends on extra_float_digits, which a writer's
    -- session may change: pinned to its default (the shortest exact form, as Python prints a
    -- float) in the functions of a table that captures one. A SET costs every call, so only there.
    v_float := EXISTS (SELECT 1 FROM unnest(v_cols) AS u(col)
                         JOIN pg_catalog.pg_attribute a ON a.attrelid = tbl AND a.attname = u.col
                        WHERE evictd._has_float(a.atttypid));
    FOR v_i IN 1 .. 4 LOOP
        EXECUTE format('CREATE OR REPLACE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER '
                       'SET search_path = pg_catalog, pg_temp %s AS %L', v_fns[v_i],
                       CASE WHEN v_float THEN 'SET extra_float_digits = 1' ELSE '' END, v_bodies[v_i]);
        EXECUTE format('REVOKE ALL ON FUNCTION %s() FROM PUBLIC', v_fns[v_i]);
        EXECUTE format('COMMENT ON FUNCTION %s() IS %L', v_fns[v_i],
                       format('evictd capture of %s for %s (%s, columns %s, channel %s); generated by evictd.watch()',
                              upper(c_events[v_i]), tbl, CASE WHEN w.durable THEN 'durable' ELSE 'notify-only' END,
                              v_cols, w.channel));
    END LOOP;

    -- Triggers missing, or calling another function (e.g. capture_<old oid>_update after a
    -- dump and restore gave the table a new oid, or the one function of earlier versions):
    -- recreate them even when only the functions were to be regenerated.
    IF NOT with_triggers AND (
           SELECT count(*) FROM pg_catalog.pg_trigger t
             JOIN unnest(c_events, v_fns) AS e(event, fn) ON t.tgname = 'evictd_' || e.event
            WHERE t.tgrelid = tbl AND NOT t.tgisinternal AND t.tgfoid = (e.fn || '()')::regprocedure) <> 4 THEN
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
                           'FOR EACH STATEMENT EXECUTE FUNCTION %s()', tbl, v_fns[1]);
            EXECUTE format('CREATE TRIGGER evictd_update AFTER UPDATE ON %s REFERENCING OLD TABLE AS evictd_old '
                           'NEW TABLE AS evictd_new FOR EACH STATEMENT EXECUTE FUNCTION %s()', tbl, v_fns[2]);
            EXECUTE format('CREATE TRIGGER evictd_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS evictd_old '
                           'FOR EACH STATEMENT EXECUTE FUNCTION %s()', tbl, v_fns[3]);
        ELSE
            EXECUTE format('CREATE TRIGGER evictd_insert AFTER INSERT ON %s FOR EACH ROW EXECUTE FUNCTION %s()', tbl, v_fns[1]);
            EXECUTE format('CREATE TRIGGER evictd_update AFTER UPDATE ON %s FOR EACH ROW EXECUTE FUNCTION %s()', tbl, v_fns[2]);
            EXECUTE format('CREATE TRIGGER evictd_delete AFTER DELETE ON %s FOR EACH ROW EXECUTE FUNCTION %s()', tbl, v_fns[3]);
        END IF;
        EXECUTE format('CREATE TRIGGER evictd_truncate AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                       tbl, v_fns[4]);
        PERFORM evictd._drop_orphans(v_old_fns);
    END IF;
END
$gen$;

-- Does the text form of type typ print a real or double precision (with extra_float_digits)?
-- Looks through domains, arrays, ranges and composites; the geometric types are floats.
CREATE OR REPLACE FUNCTION evictd._has_float(typ oid) RETURNS bool
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    WITH RECURSIVE t(oid, depth) AS (
        SELECT typ, 0
        UNION
        SELECT s.sub, t.depth + 1
          FROM t JOIN pg_catalog.pg_type p ON p.oid = t.oid
         CROSS JOIN LATERAL (SELECT p.typbasetype AS sub
                             UNION ALL SELECT p.typelem
                             UNION ALL SELECT r.rngsubtype FROM pg_catalog.pg_range r WHERE r.rngtypid = p.oid
                             UNION ALL SELECT a.atttypid FROM pg_catalog.pg_attribute a
                                        WHERE a.attrelid = p.typrelid AND a.attnum > 0 AND NOT a.attisdropped) AS s
         WHERE s.sub <> 0 AND t.depth < 16
    )
    SELECT EXISTS (SELECT 1 FROM t WHERE t.oid IN ('pg_catalog.float4'::pg_catalog.regtype, 'pg_catalog.float8'::pg_catalog.regtype,
                                                   'pg_catalog.point'::pg_catalog.regtype, 'pg_catalog.line'::pg_catalog.regtype,
                                                   'pg_catalog.lseg'::pg_catalog.regtype, 'pg_catalog.box'::pg_catalog.regtype,
                                                   'pg_catalog.path'::pg_catalog.regtype, 'pg_catalog.polygon'::pg_catalog.regtype,
                                                   'pg_catalog.circle'::pg_catalog.regtype))
$$;

-- Is tbl a partition, an inheritance child or an inheritance parent?
CREATE OR REPLACE FUNCTION evictd._in_tree(tbl oid) RETURNS bool
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i WHERE i.inhrelid = tbl OR i.inhparent = tbl)
$$;

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
            HINT = 'Watch each partition with durable => false: statement-level triggers on the parent miss writes addressed to a partition, and a durable watch of a partition misses those addressed to the parent.';
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
    IF durable AND evictd._in_tree(tbl) THEN
        RAISE EXCEPTION 'evictd.watch: % is a partition or in an inheritance tree', tbl USING ERRCODE = 'wrong_object_type',
            DETAIL = 'A durable watch captures with statement-level triggers, which miss writes addressed to another table of the tree.',
            HINT = 'Watch it with durable => false: row-level triggers fire however a write is addressed.';
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
    PERFORM evictd._drop_captures(tbl::oid);
    DELETE FROM evictd.watches WHERE watches.tbl = unwatch.tbl;
END
$$;
COMMENT ON FUNCTION evictd.unwatch(regclass) IS
    'evictd: stop reporting changes of tbl (drops its triggers and capture functions). Idempotent.';

-- ---------------------------------------------------------------------------
-- Keeping generated functions in step with DDL (event triggers: superuser only).
-- ---------------------------------------------------------------------------

-- After ALTER TABLE, CREATE TABLE or ALTER TYPE: regenerate the capture functions of the watched
-- tables it may have changed (columns renamed or dropped leave the capture; type and primary key
-- changes are followed): those the command names, their inheritance descendants (a column renamed
-- on the parent is renamed on them) and typed tables (ALTER TYPE ... CASCADE). Then refuse the command
-- if it made a durably watched table part of an inheritance tree or a partition (ATTACH
-- PARTITION, INHERIT, CREATE TABLE ... INHERITS): its statement-level triggers would miss the
-- writes addressed to the rest of the tree.
CREATE OR REPLACE FUNCTION evictd._on_alter_table() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_tbl  regclass;
    v_bad  text;
    v_cmd  oid[];
    v_tree oid[];
BEGIN
    SELECT array_agg(c.objid) INTO v_cmd
      FROM pg_catalog.pg_event_trigger_ddl_commands() AS c WHERE c.classid = 'pg_catalog.pg_class'::regclass;
    -- The command's tables, their parents (CREATE TABLE ... INHERITS, PARTITION OF) and their
    -- descendants (a column renamed on a parent is renamed on them; ATTACH PARTITION).
    WITH RECURSIVE tree(rel) AS (
        SELECT u.rel FROM unnest(v_cmd) AS u(rel)
        UNION
        SELECT i.inhparent FROM pg_catalog.pg_inherits AS i WHERE i.inhrelid = ANY (v_cmd)
        UNION
        SELECT i.inhrelid FROM pg_catalog.pg_inherits AS i JOIN tree AS t ON i.inhparent = t.rel)
    SELECT array_agg(tree.rel) INTO v_tree FROM tree;
    FOR v_tbl IN SELECT w.tbl FROM evictd.watches AS w
                  WHERE w.tbl::oid = ANY (v_tree)
                     OR (TG_TAG = 'ALTER TYPE' AND EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                                                            WHERE c.oid = w.tbl AND c.reloftype <> 0))
                  ORDER BY 1 LOOP
        PERFORM evictd._generate(v_tbl, false);
    END LOOP;
    SELECT string_agg(w.tbl::text, ', ' ORDER BY w.tbl) INTO v_bad
      FROM evictd.watches AS w WHERE w.durable AND w.tbl::oid = ANY (v_tree) AND evictd._in_tree(w.tbl);
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'evictd: durably watched table(s) % would be part of a partitioned table or an inheritance tree', v_bad
            USING ERRCODE = 'wrong_object_type',
                  DETAIL = 'Their statement-level capture would miss writes addressed to another table of the tree.',
                  HINT = 'Run evictd.watch() for them with durable => false first (or evictd.unwatch()).';
    END IF;
END
$$;

-- After a watched table is dropped: forget its watch and drop its capture function. After a
-- column of one is dropped (also by DROP DOMAIN or DROP TYPE ... CASCADE, which run no ALTER
-- TABLE): regenerate its capture, which would otherwise name the column at every write.
CREATE OR REPLACE FUNCTION evictd._on_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v record;
BEGIN
    FOR v IN SELECT w.tbl::oid AS oid, bool_or(d.objsubid = 0) AS gone
               FROM pg_catalog.pg_event_trigger_dropped_objects() AS d
               JOIN evictd.watches AS w ON w.tbl::oid = d.objid
              WHERE d.classid = 'pg_catalog.pg_class'::regclass
              GROUP BY 1 ORDER BY 1 LOOP
        IF v.gone THEN
            DELETE FROM evictd.watches WHERE tbl::oid = v.oid;
            PERFORM evictd._drop_captures(v.oid);
        ELSE
            PERFORM evictd._generate(v.oid::regclass, false);
        END IF;
    END LOOP;
END
$$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA evictd FROM PUBLIC;

DO $$
DECLARE
    v_enabled "char";
BEGIN
    IF NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user) THEN
        RAISE WARNING 'evictd: not a superuser, so no event triggers: after ALTER TABLE on a watched table run evictd.watch() for it again';
        RETURN;
    END IF;
    -- Earlier versions listened to ALTER TABLE only (re-created as it was: enabled or not).
    SELECT e.evtenabled INTO v_enabled FROM pg_catalog.pg_event_trigger e
     WHERE e.evtname = 'evictd_alter_table' AND e.evttags <> ARRAY['ALTER TABLE', 'CREATE TABLE', 'ALTER TYPE'];
    IF v_enabled IS NOT NULL THEN
        DROP EVENT TRIGGER evictd_alter_table;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'evictd_alter_table') THEN
        CREATE EVENT TRIGGER evictd_alter_table ON ddl_command_end WHEN TAG IN ('ALTER TABLE', 'CREATE TABLE', 'ALTER TYPE')
            EXECUTE FUNCTION evictd._on_alter_table();
        IF v_enabled = 'D' THEN
            ALTER EVENT TRIGGER evictd_alter_table DISABLE;
        END IF;
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
            IF evictd._in_tree(v_oid) AND (SELECT w.durable FROM evictd.watches w WHERE w.tbl::oid = v_oid) THEN
                RAISE WARNING 'evictd: % is watched durably but is in a partitioned table or an inheritance tree: writes addressed to another table of the tree are missed',
                    v_oid::regclass USING HINT = 'Run evictd.watch() for it again with durable => false.';
            END IF;
        ELSE
            DELETE FROM evictd.watches WHERE tbl::oid = v_oid;
            PERFORM evictd._drop_captures(v_oid);
        END IF;
    END LOOP;
END
$$;

COMMIT;
