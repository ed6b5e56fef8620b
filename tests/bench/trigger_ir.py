#!/usr/bin/env python3
"""trigger_ir.py: what a capture trigger costs a single-row write, in CPU instructions.

pgbench TPS on a shared 2-core machine moves by 10-20 % between runs, more than the
difference being looked for. Instructions do not: this counts them with callgrind in a
single-user PostgreSQL backend (`postgres --single`: no client, no network, no other
backend), so the same tree gives the same figure to within a few hundred instructions.

For each capture mode it recreates products(id int PRIMARY KEY, stock int) with ROWS rows,
installs the mode's trigger, stops the server and runs N1 and then N2 single-row UPDATEs
(each its own transaction, synchronous_commit off, fsync off) under callgrind; the cost of
one statement is (Ir(N2) - Ir(N1)) / (N2 - N1), so start-up and shutdown cancel out. Then
it checks that the capture wrote one outbox row per statement.

Modes (-m, comma-separated; default none,bare,bare_definer,durable):
  none          no trigger
  bare          the reference of issue 4's write-path goal (bare_capture.sql): a plpgsql
                AFTER ROW trigger inserting one jsonb row into a plain table, nothing else
  bare_definer  the same function with the attributes the SPEC requires of evictd's capture
                function: SECURITY DEFINER and a pinned search_path
  durable       evictd's durable capture: sql/install.sql, evictd.watch('products', ['id']),
                the idle flag at 0 (busy: no doorbell), as while evictd drains under load
  durable_row   a reference, not what evictd installs: the durable capture of an UPDATE
                written as a row trigger (the same payload, attributes and flag test, reading
                OLD and NEW instead of the transition tables); the bulk goal needs the
                statement-level shape, this shows what that shape costs a one-row write
  NAME          (-i NAME=FILE) durable with another install.sql, e.g. an older revision:
                git show HEAD~3:sql/install.sql > /tmp/old.sql; trigger_ir.py -i old=/tmp/old.sql

Prints, per mode, instructions per statement, what the trigger adds to no trigger, and that
as a ratio to the bare trigger's. `--keep DIR` keeps the callgrind files (callgrind_annotate
--inclusive=yes DIR/durable.N2 shows where the instructions go). Needs valgrind and the
PostgreSQL 15 server binaries; everything runs in a temp dir, the server on a free 127.0.0.1
port, stopped by pg_ctl; each callgrind run is bounded by a timeout.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))
sys.path.insert(0, HERE)

import harness  # noqa: E402  (re-executes under /usr/bin/python3 when psycopg2 is missing)
from bench import BenchPostgres  # noqa: E402

RUN_TIMEOUT = 900
MODES = ("none", "bare", "bare_definer", "durable", "durable_row")

# durable_row's function: what the one-row path of evictd's generated UPDATE capture writes,
# and the same flag test, from a row trigger.
ROW_CAPTURE = r"""$$
DECLARE
    v_id pg_catalog.int8;
    v_p  pg_catalog.text;
BEGIN
    v_id := pg_catalog.nextval('evictd.outbox_id_seq'::pg_catalog.regclass);
    INSERT INTO evictd.outbox (id, payload)
    VALUES (v_id, pg_catalog.format('{"v":1,"id":%s,"tx":%s,"ts":%s,"schema":"public","table":"products","op":"UPDATE","rows":[{"old":{"id":%s},"new":{"id":%s}}]}',
                                    v_id, pg_catalog.txid_current(),
                                    pg_catalog.date_part('epoch', pg_catalog.clock_timestamp()) * 1000,
                                    OLD.id, NEW.id))
    RETURNING payload INTO v_p;
    IF COALESCE(pg_catalog.pg_sequence_last_value('evictd.idle'::pg_catalog.regclass), 0) = 0 THEN
        RETURN NULL;
    END IF;
    PERFORM pg_catalog.pg_notify('evictd', v_p);
    RETURN NULL;
END
$$"""


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("-m", "--modes", default="none,bare,bare_definer,durable")
    ap.add_argument("-i", "--install", action="append", default=[], metavar="NAME=FILE",
                    help="another install.sql as mode NAME (repeatable)")
    ap.add_argument("--n1", type=int, default=200, help="statements of the short run (200)")
    ap.add_argument("--n2", type=int, default=1200, help="statements of the long run (1200)")
    ap.add_argument("--rows", type=int, default=100000, help="rows in products (100000)")
    ap.add_argument("--keep", metavar="DIR", help="copy the callgrind files to DIR")
    a = ap.parse_args()
    installs = {"durable": os.path.join(REPO, "sql", "install.sql")}
    for spec in a.install:
        name, sep, path = spec.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in MODES:
            ap.error("-i wants NAME=FILE with a new NAME, not %r" % spec)
        if not os.access(path, os.R_OK):
            ap.error("cannot read %s" % path)
        installs[name] = os.path.abspath(path)
        a.modes += "," + name
    a.modes = a.modes.split(",")
    for m in a.modes:
        if m not in MODES and m not in installs:
            ap.error("unknown mode %s" % m)
    if not 0 < a.n1 < a.n2 or a.rows < 2:
        ap.error("want 0 < --n1 < --n2 and --rows >= 2")
    if shutil.which("valgrind") is None:
        ap.error("valgrind is not installed (apt-get install -y valgrind)")
    a.installs = installs
    return a


def as_postgres(cmd):
    """argv running the shell command cmd as the server's owner (postgres refuses root)."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", "sh", "-c", cmd]
    return ["sh", "-c", cmd]


def setup(pg, a, mode):
    """products afresh with mode's capture; returns the outbox table it writes (or None)."""
    pg.psql("DROP TABLE IF EXISTS products; DROP TABLE IF EXISTS bench_outbox; DROP SCHEMA IF EXISTS evictd CASCADE;"
            "CREATE TABLE products (id int PRIMARY KEY, stock int NOT NULL DEFAULT 0);"
            "INSERT INTO products SELECT g, 0 FROM generate_series(1, %d) AS g;"
            "CREATE TABLE bench_outbox (id bigserial PRIMARY KEY, payload jsonb NOT NULL);" % a.rows)
    pg.psql(file=os.path.join(HERE, "bare_capture.sql"))
    outbox = None
    if mode in ("bare", "bare_definer"):
        if mode == "bare_definer":
            pg.psql("ALTER FUNCTION bench_bare_capture() SECURITY DEFINER SET search_path = pg_catalog, pg_temp")
        pg.psql("CREATE TRIGGER bench_bare AFTER INSERT OR UPDATE OR DELETE ON products "
                "FOR EACH ROW EXECUTE FUNCTION bench_bare_capture()")
        outbox = "bench_outbox"
    elif mode != "none":
        pg.psql(file=a.installs["durable" if mode == "durable_row" else mode])
        pg.psql("SELECT evictd.watch('public.products', ARRAY['id']); SELECT pg_catalog.setval('evictd.idle', 0)")
        if mode == "durable_row":
            pg.psql("CREATE FUNCTION evictd.bench_row_capture() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER "
                    "SET search_path = pg_catalog, pg_temp AS %s;"
                    "DROP TRIGGER evictd_update ON products;"
                    "CREATE TRIGGER evictd_update AFTER UPDATE ON products "
                    "FOR EACH ROW EXECUTE FUNCTION evictd.bench_row_capture()" % ROW_CAPTURE)
        outbox = "evictd.outbox"
    pg.psql("VACUUM ANALYZE products")
    pg.psql("CHECKPOINT")
    return outbox


def single_user_run(pg, a, mode, n, outbox, keep_as):
    """Ir of n single-row UPDATEs (plus the count query) in a callgrind'ed single-user backend."""
    sql = os.path.join(pg.dir, "stmts.%d.sql" % n)
    with open(sql, "w") as f:
        for i in range(n):
            # spread over the table (a fixed sequence: every mode updates the same rows)
            f.write("UPDATE products SET stock = stock + 1 WHERE id = %d\n" % (1 + (i * 7919) % a.rows))
        if outbox:
            f.write("SELECT count(*) AS outbox_rows FROM %s\n" % outbox)
    os.chmod(sql, 0o644)
    out = os.path.join(pg.dir, "callgrind.%s.%d" % (mode, n))
    log = out + ".log"
    cmd = ("exec valgrind --tool=callgrind --callgrind-out-file=%s %s --single -D %s "
           "-c fsync=off -c synchronous_commit=off -c shared_buffers=256MB -c autovacuum=off postgres < %s > %s.stdout 2> %s"
           % (out, os.path.join(pg.bindir, "postgres"), pg.data, sql, out, log))
    p = subprocess.run(as_postgres(cmd), timeout=RUN_TIMEOUT)
    text = open(log).read()
    m = re.search(r"Collected : (\d+)", text)
    if p.returncode != 0 or not m:
        raise harness.HarnessError("callgrind run failed (%s, %d statements): %s" % (mode, n, text[-2000:]))
    rows = None
    if outbox:
        found = re.search(r'outbox_rows = "(\d+)"', open(out + ".stdout").read())
        rows = int(found.group(1)) if found else None
    if keep_as:
        shutil.copy(out, os.path.join(keep_as, "%s.%d" % (mode, n)))
    return int(m.group(1)), rows


def main():
    a = parse_args()
    if a.keep:
        os.makedirs(a.keep, exist_ok=True)
    pg = BenchPostgres({"max_connections": 20, "shared_buffers": "256MB", "fsync": "off"})
    results = {}
    try:
        os.chmod(pg.dir, 0o755)  # the statement files are read by the postgres user
        for i, mode in enumerate(a.modes):
            if i:
                pg.start()  # stopped for the previous mode's single-user runs
            outbox = setup(pg, a, mode)
            pg.stop()
            ir1, rows1 = single_user_run(pg, a, mode, a.n1, outbox, a.keep)
            ir2, rows2 = single_user_run(pg, a, mode, a.n2, outbox, a.keep)
            if outbox and (rows1 != a.n1 or rows2 != a.n1 + a.n2):
                raise harness.HarnessError("%s: the capture wrote %s and %s outbox rows for %d and %d statements"
                                           % (mode, rows1, rows2, a.n1, a.n1 + a.n2))
            results[mode] = (ir2 - ir1) / float(a.n2 - a.n1)
            sys.stderr.write("[trigger_ir] %-14s %9.0f instructions a statement\n" % (mode, results[mode]))
    finally:
        pg.cleanup()

    base = results.get("none")
    bare = results.get("bare")
    print("Single-row UPDATE, one statement a transaction, postgres --single under callgrind "
          "(instructions a statement, mean of %d):" % (a.n2 - a.n1))
    print("%-14s %12s %14s %12s" % ("mode", "instructions", "trigger adds", "/ bare's"))
    for mode in a.modes:
        adds = results[mode] - base if base is not None else None
        ratio = adds / (bare - base) if mode != "none" and adds is not None and bare is not None and bare != base else None
        print("%-14s %12.0f %14s %12s" % (mode, results[mode], "" if adds is None else "%.0f" % adds,
                                          "" if ratio is None else "%.2f×" % ratio))
    return 0


if __name__ == "__main__":
    sys.exit(main())
