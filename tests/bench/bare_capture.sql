-- The reference of issue 4's write-path goal, shared by bench.py, trigger_cost.sh and
-- trigger_ir.py: a bare plpgsql AFTER ROW trigger function inserting one jsonb row (table, op,
-- old and new id, ts) into bench_outbox(id bigserial PRIMARY KEY, payload jsonb), nothing
-- else. Its names are qualified so that trigger_ir.py can also run it with a pinned search_path.
CREATE OR REPLACE FUNCTION bench_bare_capture() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.bench_outbox (payload)
    VALUES (pg_catalog.jsonb_build_object('table', TG_TABLE_NAME, 'op', TG_OP,
                                          'old', CASE WHEN TG_OP <> 'INSERT' THEN OLD.id END,
                                          'new', CASE WHEN TG_OP <> 'DELETE' THEN NEW.id END,
                                          'ts', pg_catalog.clock_timestamp()));
    RETURN NULL;
END
$$;
