#!/usr/bin/env python3
"""late_commit.py: a transaction that commits late, under sustained write load: when does evictd apply it?

    python3 tests/soak/late_commit.py [--load-s 10] [--writers 12] [--hold-ms 500] [--bound-s 1.0] [--reps 3]

Outbox ids come from a sequence when the capture trigger runs, not when the transaction commits.
A transaction that writes early and commits late (a slow request, a batch job) therefore commits a
row whose id is lower than rows other transactions committed meanwhile. evictd claims with
`WHERE id > cursor`; under sustained write load (evictd behind, every claim full) the cursor only
moves onward, so the late row would wait until the load pauses. evictd's floor check (every
postgres.poll_interval_ms, off the claim path) finds a row below the cursor and moves the cursor
back below it.

This script starts a throwaway PostgreSQL + Redis + evictd (one rule on `products`). While
--writers processes commit single-row UPDATEs as fast as they can, it runs one transaction that
UPDATEs a row, waits --hold-ms, and commits. It then measures how long that row stays in the
outbox after COMMIT, and the backlog of newer rows while it waits. Exit status 1 when the late row
waits longer than --bound-s in any repetition, and no longer than the load lasted if the load stopped
first (that is the bug). Everything is stopped by PID; every wait is bounded.
"""

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))

import harness  # noqa: E402,F401
from harness import Postgres, Redis, evictd_bin  # noqa: E402

import psycopg2  # noqa: E402

CTX = mp.get_context("fork")


def hammer(dsn, stop_at, q):
    conn = psycopg2.connect(dsn, connect_timeout=5)
    conn.autocommit = True
    cur = conn.cursor()
    n = 0
    while time.time() < stop_at:
        cur.execute("UPDATE products SET stock = stock + 1 WHERE id = %s", (n % 50 + 1,))
        n += 1
    conn.close()
    q.put(n)


def one(pg, opts):
    q = CTX.Queue()
    t0 = time.time()
    stop_at = t0 + opts.load_s
    ws = [CTX.Process(target=hammer, args=(pg.dsn(), stop_at, q)) for _ in range(opts.writers)]
    for w in ws:
        w.start()
    try:
        time.sleep(min(1.0, opts.load_s / 5))
        slow = pg.connect()
        cur = slow.cursor()
        cur.execute("UPDATE products SET stock = stock + 1 WHERE id = 99")
        cur.execute("SELECT currval('evictd.outbox_id_seq')")
        myid = cur.fetchone()[0]
        time.sleep(opts.hold_ms / 1000.0)
        slow.commit()
        t_commit = time.time()
        slow.close()
        chk = pg.connect(autocommit=True)
        c2 = chk.cursor()
        acked, backlog = None, []
        while time.time() < stop_at + 10:
            c2.execute("SELECT count(*) FILTER (WHERE id = %s), count(*) FILTER (WHERE id > %s) FROM evictd.outbox",
                       (myid, myid))
            mine, newer = c2.fetchone()
            if mine == 0:
                acked = time.time()
                break
            backlog.append(newer)
            time.sleep(0.01)
        chk.close()
        total = sum(q.get(timeout=60) for _ in ws)
    finally:
        for w in ws:
            w.join(timeout=30)
            if w.is_alive():
                w.terminate()
                w.join(timeout=5)
    b = sorted(backlog) or [0]
    return {"commits_per_s": round(total / opts.load_s), "late_row_id": myid,
            "committed_at_s": round(t_commit - t0, 2), "load_left_s": round(stop_at - t_commit, 2),
            "applied_after_s": None if acked is None else round(acked - t_commit, 3),
            "applied_after_load_s": None if acked is None else round(acked - stop_at, 3),
            "newer_rows_backlog_median": b[len(b) // 2], "newer_rows_backlog_max": b[-1]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--load-s", type=float, default=10.0)
    ap.add_argument("--writers", type=int, default=12)
    ap.add_argument("--hold-ms", type=float, default=500.0)
    ap.add_argument("--bound-s", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=3)
    opts = ap.parse_args()
    work = tempfile.mkdtemp(prefix="evictd-late-")
    pg, rd = Postgres(), Redis()
    proc = None
    try:
        pg.psql(file=os.path.join(ROOT, "sql", "install.sql"))
        pg.psql("CREATE TABLE products (id int PRIMARY KEY, stock int NOT NULL);"
                "INSERT INTO products SELECT g, 0 FROM generate_series(1, 100) g;")
        cfg = {"postgres": {"url": pg.dsn()}, "redis": {"default": {"url": rd.url(0)}},
               "rules": [{"table": "public.products", "keys": ["routex:1:product_{id}", "routex:1:products_list"]}],
               "dead_letter": {"path": os.path.join(work, "dl.jsonl")}, "log": {"format": "json"}}
        cfg_path = os.path.join(work, "evictd.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        p = subprocess.run([evictd_bin(), "sql", "--config", cfg_path], capture_output=True, text=True, timeout=30)
        pg.psql(p.stdout)
        with open(os.path.join(work, "evictd.stderr"), "wb") as logf:
            proc = subprocess.Popen([evictd_bin(), "run", "--config", cfg_path], stdout=logf, stderr=logf)
        deadline = time.time() + 20
        while int(pg.psql("SELECT last_value FROM evictd.idle").strip() or 0) < 1:
            if time.time() > deadline or proc.poll() is not None:
                raise SystemExit("evictd did not become idle")
            time.sleep(0.05)
        bad = 0
        for i in range(opts.reps):
            r = one(pg, opts)
            late = r["applied_after_s"] is None or r["applied_after_s"] > opts.bound_s
            bad += late
            print("rep %d: %s%s" % (i + 1, json.dumps(r), "  <- late" if late else ""))
        print("late-committed row applied within %.1f s in %d of %d repetitions" % (opts.bound_s, opts.reps - bad, opts.reps))
        return 1 if bad else 0
    finally:
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        rd.cleanup()
        pg.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
