-- The reference of issue 4's write-path goal, shared by bench.py and trigger_cost.sh: a bare
-- plpgsql AFTER ROW trigger function inserting one jsonb row (table, op, old and new id, ts)
-- into bench_outbox(id bigserial PRIMARY KEY, payload jsonb), nothing else.
CREATE OR REPLACE FUNCTION bench_bare_capture() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bench_outbox (payload)
    VALUES (jsonb_build_object('table', TG_TABLE_NAME, 'op', TG_OP,
                               'old', CASE WHEN TG_OP <> 'INSERT' THEN OLD.id END,
                               'new', CASE WHEN TG_OP <> 'DELETE' THEN NEW.id END,
                               'ts', clock_timestamp()));
    RETURN NULL;
END
$$;
