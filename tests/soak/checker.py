#!/usr/bin/env python3
"""checker.py: measures evictd's cache consistency under live RouteX traffic.

    python3 tests/soak/checker.py [--duration S] [--writers N] [--readers N] [--redelete-ms MS]
                                  [--evictd CONFIG | --no-evictd] [--json FILE] [--seed N]

Starts a throwaway PostgreSQL and Redis on free 127.0.0.1 ports (tests/integration/harness.py),
creates the RouteX tables (products, drivers, shipments), installs the capture with `evictd sql`,
starts evictd (config/routex.json, or --evictd CONFIG, with the settings below laid over it) and
then, for --duration seconds:

* writer processes commit random changes: a product's stock, a shipment moving to another
  product and/or driver (stock follows), a shipment created or deleted, a driver toggling
  is_active, a multi-row stock UPDATE. Each writer reports the transaction id, the time COMMIT was
  sent and returned, the keys the RouteX rules name for the change and the keys whose cached value
  the change alters ("dirty" keys). A COMMIT whose connection died is resolved with txid_status().
* reader processes fill the cache the way django-redis' cache.get_or_set does: GET; on a miss,
  read the DB (one statement that also returns pg_current_snapshot(), so the checker knows exactly
  which commits the read saw), "think" a little (--think-ms, plus a few --slow-ms readers), then
  SET NX EX. The cached value is "<fill id> <JSON of the DB rows>"; every fill's read start, SET
  start/end and snapshot go to a side log.
* a MONITOR connection records, with Redis' own timestamps, every UNLINK, pattern SCAN and SET
  that Redis executes (reconnecting after a Redis restart; the gaps are recorded).
* the checker, CHECK_DELAY (--check-delay-ms, 200 ms) after each commit, GETs every key the change
  affects and reads the DB: a key is consistent when it is absent or equal to the DB now. A
  differing value is stale only when its fill missed (by snapshot visibility) a change to its
  rows that committed at least CHECK_DELAY ago; a fill that missed only newer changes is left to
  those changes' own checks.

Then it quiesces: writers stop, readers stop, the outbox must drain (bounded), and every key is
checked once more against the DB (readers never re-fill after they stop; nothing is flushed).

Each stale value is classified, after the run, from the side logs:
  race          the fill read the DB before the change committed and its SET landed after evictd
                had already deleted the key (the read-before-write race every delete-based
                invalidator has); `batch.redelete_after_ms` narrows it.
  late          evictd's delete came, but after the check (evictd was slower than CHECK_DELAY,
                e.g. while Redis or PostgreSQL was down in the chaos soak).
  indeterminate the MONITOR connection was down when it mattered (after a Redis restart).
  unexplained   none of the above: a committed change whose key evictd did not delete.
It also reports every "stale fill" (each SET of a value already stale when it landed because of
the race, whether or not a check saw it), how long each stale value lived (from the later of its
SET and the commit it missed, to its UNLINK), the invalidation lag (commit to the first UNLINK of
the key after it), and "lost": committed changes with a key that was never deleted after the
commit (and not wiped by a Redis restart), plus outbox rows left after quiescing.

Figures go to stdout (and --json). Everything it starts is stopped by PID; every wait is bounded.
"""

import argparse
import bisect
import copy
import fnmatch
import hashlib
import heapq
import json
import multiprocessing as mp
import os
import queue as queue_mod
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))

import harness  # noqa: E402,F401  (may re-exec under /usr/bin/python3 for psycopg2 + redis-py)
from harness import HarnessError, Postgres, Redis, evictd_bin  # noqa: E402

import psycopg2  # noqa: E402
import redis as redis_py  # noqa: E402

T0 = time.monotonic()
CTX = mp.get_context("fork")

# ------------------------------------------------------------------------------------------ model

N_PRODUCTS = 40
N_DRIVERS = 12
N_SHIPMENTS = 300
USER_BASE = 1000  # driver d belongs to auth_user USER_BASE + d
TTL_S = 300  # cache_page(60 * 5)

PL = "routex:1:products_list"
DL = "routex:1:drivers_list"
_NOHDR = hashlib.md5(b"").hexdigest()
PAGE_P = "routex:1:views.decorators.cache.cache_page.products.GET.%s.%s.en-us.UTC" % (
    hashlib.md5(b"/api/v1/products/").hexdigest(), _NOHDR)
PAGE_D = "routex:1:views.decorators.cache.cache_page.drivers.GET.%s.%s.en-us.UTC" % (
    hashlib.md5(b"/api/v1/drivers/").hexdigest(), _NOHDR)
PAGES = (PAGE_P, PAGE_D)


def pkey(i):
    return "routex:1:product_%d" % i


def dskey(uid):
    return "routex:1:driver_status_%d" % uid


def all_keys():
    return [PL, DL, PAGE_P, PAGE_D] + [pkey(i) for i in range(1, N_PRODUCTS + 1)] + \
        [dskey(USER_BASE + d) for d in range(1, N_DRIVERS + 1)]


def key_kind(key):
    if key in (PL, DL):
        return "list"
    if key in PAGES:
        return "page"
    return "product" if key.startswith("routex:1:product_") else "driver_status"


def canon(obj):
    return json.dumps(obj, separators=(",", ":"))


SCHEMA_SQL = """
CREATE TABLE products (id int PRIMARY KEY, name text NOT NULL, stock int NOT NULL DEFAULT 0);
CREATE TABLE drivers (id int PRIMARY KEY, user_id int NOT NULL UNIQUE, is_active bool NOT NULL DEFAULT true);
CREATE TABLE shipments (id serial PRIMARY KEY, product_id int NOT NULL REFERENCES products,
                        driver_id int REFERENCES drivers, status text NOT NULL DEFAULT 'new');
"""

# Reader queries: one statement each, so pg_current_snapshot() is the snapshot the data came from.
Q_PRODUCT = ("SELECT pg_current_snapshot()::text, "
             "(SELECT json_build_array(id, name, stock) FROM products WHERE id = %s)")
Q_PRODUCTS = ("SELECT pg_current_snapshot()::text, "
              "(SELECT coalesce(json_agg(json_build_array(id, name, stock) ORDER BY id), '[]'::json) FROM products)")
Q_DSTATUS = "SELECT pg_current_snapshot()::text, (SELECT to_json(is_active) FROM drivers WHERE user_id = %s)"
Q_DRIVERS = ("SELECT pg_current_snapshot()::text, "
             "(SELECT coalesce(json_agg(json_build_array(d.id, d.user_id, d.is_active, "
             "(SELECT count(*) FROM shipments s WHERE s.driver_id = d.id)) ORDER BY d.id), '[]'::json) "
             "FROM drivers d)")


def reader_query(key):
    if key in (PL, PAGE_P):
        return Q_PRODUCTS, ()
    if key in (DL, PAGE_D):
        return Q_DRIVERS, ()
    if key.startswith("routex:1:product_"):
        return Q_PRODUCT, (int(key.rsplit("_", 1)[1]),)
    return Q_DSTATUS, (int(key.rsplit("_", 1)[1]),)


def read_model(cur):
    """Every key's DB value (canonical JSON), from one snapshot (the caller's transaction)."""
    cur.execute("SELECT id, name, stock FROM products ORDER BY id")
    prods = cur.fetchall()
    cur.execute("SELECT d.id, d.user_id, d.is_active, (SELECT count(*) FROM shipments s WHERE s.driver_id = d.id) "
                "FROM drivers d ORDER BY d.id")
    drvs = cur.fetchall()
    vals = {}
    plist = [[i, n, s] for (i, n, s) in prods]
    vals[PL] = vals[PAGE_P] = canon(plist)
    for row in plist:
        vals[pkey(row[0])] = canon(row)
    dlist = [[i, u, a, c] for (i, u, a, c) in drvs]
    vals[DL] = vals[PAGE_D] = canon(dlist)
    for (i, u, a, c) in drvs:
        vals[dskey(u)] = canon(a)
    return vals


def parse_snapshot(text):
    xmin, xmax, xip = text.split(":")
    return int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x)


def visible(xid, snap):
    xmin, xmax, xip = snap
    return xid < xmin or (xid < xmax and xid not in xip)


def log(msg):
    sys.stderr.write("[soak %7.1fs] %s\n" % (time.monotonic() - T0, msg))
    sys.stderr.flush()


def pct(values, p):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100.0 * (len(v) - 1))))]


# ------------------------------------------------------------------------------------------ servers + evictd

class Daemon:
    """evictd as a subprocess: start/SIGKILL/SIGTERM by PID, RSS samples and exit codes per run."""

    SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                       "SUMMARY: UndefinedBehavior", "SUMMARY: AddressSanitizer")

    def __init__(self, workdir, cfg_path, env):
        self.cfg_path = cfg_path
        self.env = env
        self.log_path = os.path.join(workdir, "evictd.stderr")
        self.proc = None
        self.runs = []  # {"pid","started","ended","rc","expected","rss":[(t, rss_kb, anon_kb)]}
        self.lock = threading.Lock()
        self._stop_sampler = threading.Event()
        self._sampler = threading.Thread(target=self._sample_loop, daemon=True)
        self._sampler.start()

    def start(self):
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                return self  # already running (a crash restart and a chaos restart raced)
            if self.runs and self.runs[-1]["ended"] is None:
                self._ended(self.proc.returncode, False)  # exited by itself, unnoticed so far
            with open(self.log_path, "ab") as logf:
                self.proc = subprocess.Popen([evictd_bin(), "run", "--config", self.cfg_path],
                                             stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                             env=self.env, cwd=os.path.dirname(self.cfg_path))
            self.runs.append({"pid": self.proc.pid, "started": time.time(), "ended": None, "rc": None,
                              "expected": False, "rss": []})
        return self

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def _ended(self, rc, expected):
        run = self.runs[-1]
        if run["ended"] is None:
            run["ended"], run["rc"], run["expected"] = time.time(), rc, expected

    def kill(self):
        """SIGKILL (an expected exit) and reap."""
        with self.lock:
            if self.proc is None:
                return
            self._sample(self.proc.pid, self.runs[-1])
            self.runs[-1]["expected"] = True
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
            rc = self.proc.wait(timeout=10)
            self._ended(rc, rc == -signal.SIGKILL)

    def stop(self, timeout=15.0):
        """SIGTERM, wait (bounded), SIGKILL if needed. Returns the exit status (None if it had to be killed)."""
        with self.lock:
            if self.proc is None:
                return None
            if self.proc.poll() is None:
                self._sample(self.proc.pid, self.runs[-1])
                os.kill(self.proc.pid, signal.SIGTERM)
                try:
                    rc = self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    os.kill(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=10)
                    self._ended("killed after SIGTERM timeout", False)
                    return None
                self._ended(rc, rc == 0)
                return rc
            self._ended(self.proc.returncode, False)
            return self.proc.returncode

    def check_exit(self):
        """If evictd exited on its own, records the (unexpected) exit and returns its status."""
        with self.lock:
            if self.proc is not None and self.proc.poll() is not None and self.runs[-1]["ended"] is None:
                self._ended(self.proc.returncode, False)
                return self.proc.returncode
        return None

    @staticmethod
    def _sample(pid, run):
        try:
            with open("/proc/%d/status" % pid) as f:
                text = f.read()
        except OSError:
            return
        rss = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
        anon = re.search(r"^RssAnon:\s+(\d+) kB", text, re.M)
        if rss:
            run["rss"].append((time.time(), int(rss.group(1)), int(anon.group(1)) if anon else None))

    def _sample_loop(self):
        while not self._stop_sampler.wait(0.25):
            with self.lock:
                if self.proc is not None and self.proc.poll() is None and self.runs:
                    self._sample(self.proc.pid, self.runs[-1])

    def close(self):
        self._stop_sampler.set()
        self._sampler.join(timeout=5)
        if self.running():
            self.stop()

    def text(self):
        try:
            with open(self.log_path, "r", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def tail(self, n=40):
        lines = self.text().splitlines()
        return "\n".join(lines[-n:])

    def log_summary(self):
        text = self.text()
        msgs = {}
        for m in re.finditer(r'"msg":"(\w+)"|\bmsg=(\w+)', text):
            k = m.group(1) or m.group(2)
            msgs[k] = msgs.get(k, 0) + 1
        levels = {}
        for m in re.finditer(r'"level":"(\w+)"|\blevel=(\w+)', text):
            k = m.group(1) or m.group(2)
            levels[k] = levels.get(k, 0) + 1
        marks = [line for line in text.splitlines() if any(mk in line for mk in self.SANITIZER_MARKS)]
        # lines in neither log format (json / logfmt): e.g. libpq printing a server notice itself
        foreign = [line for line in text.splitlines()
                   if line.strip() and not line.startswith("{") and not line.startswith("ts=")]
        return {"msgs": msgs, "levels": levels, "sanitizer_lines": marks[:20],
                "foreign_lines": len(foreign), "foreign_samples": sorted(set(foreign))[:5]}

    def rss_report(self):
        out = []
        for run in self.runs:
            s = run["rss"]
            if not s:
                out.append({"pid": run["pid"], "samples": 0})
                continue
            t0 = run["started"]
            steady = [x for x in s if x[0] - t0 >= 1.0] or s
            up = s[-1][0] - t0

            def at(frac):
                t = t0 + frac * up
                return min(s, key=lambda x: abs(x[0] - t))[1]
            out.append({"pid": run["pid"], "samples": len(s), "uptime_s": round(up, 1),
                        "q25_kb": at(0.25), "mid_kb": at(0.5), "q75_kb": at(0.75),
                        "start_kb": steady[0][1], "peak_kb": max(x[1] for x in s), "end_kb": s[-1][1],
                        "anon_start_kb": steady[0][2], "anon_peak_kb": max((x[2] or 0) for x in s),
                        "anon_end_kb": s[-1][2], "rc": run["rc"], "expected_exit": run["expected"]})
        return out


def build_config(opts, workdir, chaos):
    """config/routex.json (or --evictd CONFIG) with the run's settings laid over it."""
    base_path = opts.evictd or os.path.join(ROOT, "config", "routex.json")
    with open(base_path) as f:
        cfg = json.load(f)
    cfg = copy.deepcopy(cfg)
    if not opts.evictd:
        cfg.setdefault("postgres", {})["poll_interval_ms"] = 250
        red = cfg["redis"]["default"]
        red["timeout_ms"] = opts.redis_timeout_ms
        cfg["retry"] = {"max_attempts": 100000, "initial_backoff_ms": 10, "max_backoff_ms": 500}
        cfg["log"] = {"format": "json", "level": "info", "stats_interval_s": 10}
        cfg["shutdown_timeout_ms"] = 3000
    if opts.redelete_ms is not None:
        cfg.setdefault("batch", {})["redelete_after_ms"] = opts.redelete_ms
    cfg["dead_letter"] = {"path": os.path.join(workdir, "dead-letter.jsonl")}
    path = os.path.join(workdir, "evictd.json")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)
    return path, cfg


# ------------------------------------------------------------------------------------------ child processes

def _pg_connect(dsn, autocommit):
    conn = psycopg2.connect(dsn, connect_timeout=3, options="-c statement_timeout=10000")
    conn.autocommit = autocommit
    return conn


def _close(conn):
    try:
        if conn is not None:
            conn.close()
    except Exception:
        pass


def writer_main(idx, dsn, rate, deadline, stop, q, seed):
    """Commits random RouteX changes at about `rate` per second until stop/deadline."""
    rnd = random.Random(seed)
    conn = None
    stats = {"committed": 0, "recovered": 0, "aborted": 0, "unknown": 0, "errors": 0}
    seq = 0
    ops = ["stock"] * 30 + ["move"] * 35 + ["toggle"] * 15 + ["bulk"] * 6 + ["insert"] * 7 + ["delete"] * 7
    next_t = time.time()
    while not stop.is_set() and time.time() < deadline:
        now = time.time()
        if next_t > now:
            time.sleep(min(next_t - now, 0.5))
            continue
        next_t = max(next_t + 1.0 / rate, now - 1.0)
        if conn is None or conn.closed:
            try:
                conn = _pg_connect(dsn, autocommit=False)
            except psycopg2.Error:
                stats["errors"] += 1
                time.sleep(0.1)
                continue
        op = rnd.choice(ops)
        xid = None
        try:
            cur = conn.cursor()
            cur.execute("SELECT pg_current_xact_id()::text")
            xid = int(cur.fetchone()[0])
            rule, dirty = _do_op(cur, op, rnd)
            if rule is None:
                conn.rollback()
                continue
            # the outbox rows this transaction wrote (visible to itself): the checker watches
            # when evictd acknowledges them
            cur.execute("SELECT coalesce(array_agg(id), '{}') FROM evictd.outbox WHERE xmin = pg_current_xact_id()::xid")
            ids = tuple(cur.fetchone()[0])
        except psycopg2.Error:
            stats["errors"] += 1
            try:
                conn.rollback()
            except psycopg2.Error:
                _close(conn)
                conn = None
                time.sleep(0.05)
            continue
        seq += 1
        wid = "w%d.%d" % (idx, seq)
        cs = time.time()
        how = "ok"
        try:
            conn.commit()
            ce = time.time()
        except psycopg2.Error:
            # The COMMIT may or may not have happened: ask the server (bounded).
            _close(conn)
            conn = None
            status = None
            for _ in range(300):
                if stop.is_set() and time.time() > deadline + 30:
                    break
                try:
                    c2 = _pg_connect(dsn, autocommit=True)
                    try:
                        cur2 = c2.cursor()
                        cur2.execute("SELECT txid_status(%s)", (xid,))
                        status = cur2.fetchone()[0]
                    finally:
                        _close(c2)
                    if status != "in progress":
                        break
                except psycopg2.Error:
                    pass
                time.sleep(0.1)
            ce = time.time()
            if status == "aborted":
                stats["aborted"] += 1
                continue
            how = "recovered" if status == "committed" else "unknown"
            stats[how] += 1
        stats["committed"] += 1
        q.put(("w", wid, xid, cs, ce, op, tuple(sorted(rule)), tuple(sorted(dirty)), how, ids))
    _close(conn)
    q.put(("ws", idx, stats))


def _pick_shipment(cur, rnd):
    cur.execute("SELECT id, product_id, driver_id FROM shipments "
                "WHERE id >= (SELECT (%s * last_value)::int FROM shipments_id_seq) ORDER BY id LIMIT 1 "
                "FOR UPDATE SKIP LOCKED", (rnd.random(),))
    row = cur.fetchone()
    if row is None:
        cur.execute("SELECT id, product_id, driver_id FROM shipments ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED")
        row = cur.fetchone()
    return row


def _driver_keys(cur, *driver_ids):
    out = set()
    for d in driver_ids:
        if d is not None:
            out.add(dskey(USER_BASE + d))
    return out


def _do_op(cur, op, rnd):
    """Runs one change in the open transaction; returns (rule keys, dirty keys) or (None, None)."""
    pages = set(PAGES)  # every rule also deletes the cache_page pattern
    if op == "stock":
        pid = rnd.randint(1, N_PRODUCTS)
        delta = rnd.choice([-3, -2, -1, 1, 2, 3])
        cur.execute("UPDATE products SET stock = stock + %s WHERE id = %s", (delta, pid))
        return {PL, pkey(pid)} | pages, {PL, pkey(pid), PAGE_P}
    if op == "bulk":
        ids = sorted(rnd.sample(range(1, N_PRODUCTS + 1), rnd.randint(3, 8)))
        cur.execute("UPDATE products SET stock = stock + 1 WHERE id = ANY(%s)", (ids,))
        keys = {pkey(i) for i in ids}
        return {PL} | keys | pages, {PL, PAGE_P} | keys
    if op == "toggle":
        did = rnd.randint(1, N_DRIVERS)
        cur.execute("UPDATE drivers SET is_active = NOT is_active WHERE id = %s RETURNING user_id", (did,))
        uid = cur.fetchone()[0]
        return {DL, dskey(uid)} | pages, {DL, dskey(uid), PAGE_D}
    if op == "move":
        row = _pick_shipment(cur, rnd)
        if row is None:
            return None, None
        sid, old_p, old_d = row
        new_p, new_d = old_p, old_d
        while (new_p, new_d) == (old_p, old_d):
            if rnd.random() < 0.7:
                new_p = rnd.randint(1, N_PRODUCTS)
            if rnd.random() < 0.5:
                new_d = None if rnd.random() < 0.1 else rnd.randint(1, N_DRIVERS)
        cur.execute("UPDATE shipments SET product_id = %s, driver_id = %s, status = %s WHERE id = %s",
                    (new_p, new_d, rnd.choice(["new", "picked", "transit", "delivered"]), sid))
        dirty = set()
        if new_p != old_p:
            cur.execute("UPDATE products SET stock = stock + CASE WHEN id = %s THEN 1 ELSE -1 END "
                        "WHERE id = ANY(%s)", (old_p, sorted([old_p, new_p])))
            dirty |= {PL, PAGE_P, pkey(old_p), pkey(new_p)}
        if new_d != old_d:
            dirty |= {DL, PAGE_D}
        rule = {PL, DL, pkey(old_p), pkey(new_p)} | _driver_keys(cur, old_d, new_d) | pages
        return rule, dirty
    if op == "insert":
        pid = rnd.randint(1, N_PRODUCTS)
        did = None if rnd.random() < 0.1 else rnd.randint(1, N_DRIVERS)
        cur.execute("INSERT INTO shipments (product_id, driver_id) VALUES (%s, %s)", (pid, did))
        cur.execute("UPDATE products SET stock = stock - 1 WHERE id = %s", (pid,))
        dirty = {PL, PAGE_P, pkey(pid)} | ({DL, PAGE_D} if did is not None else set())
        return {PL, DL, pkey(pid)} | _driver_keys(cur, did) | pages, dirty
    if op == "delete":
        row = _pick_shipment(cur, rnd)
        if row is None:
            return None, None
        sid, pid, did = row
        cur.execute("DELETE FROM shipments WHERE id = %s", (sid,))
        cur.execute("UPDATE products SET stock = stock + 1 WHERE id = %s", (pid,))
        dirty = {PL, PAGE_P, pkey(pid)} | ({DL, PAGE_D} if did is not None else set())
        return {PL, DL, pkey(pid)} | _driver_keys(cur, did) | pages, dirty
    raise ValueError(op)


def reader_main(idx, dsn, rport, rate, think_ms, slow_ratio, slow_ms, deadline, stop, path, seed):
    """get_or_set traffic: GET; on a miss read the DB, think, SET NX EX. Fills go to `path`."""
    rnd = random.Random(seed)
    keys = [PL] * 10 + [DL] * 10 + [PAGE_P] * 8 + [PAGE_D] * 8 + \
        [pkey(i) for i in range(1, N_PRODUCTS + 1)] + [dskey(USER_BASE + d) for d in range(1, N_DRIVERS + 1)] * 2
    stats = {"gets": 0, "hits": 0, "misses": 0, "fills": 0, "nx_lost": 0, "set_unknown": 0,
             "db_errors": 0, "redis_errors": 0, "slow": 0}
    r = redis_py.Redis(host="127.0.0.1", port=rport, db=0, socket_timeout=10, socket_connect_timeout=2)
    conn = None
    seq = 0
    out = open(path, "w", buffering=1 << 16)
    next_t = time.time()
    while not stop.is_set() and time.time() < deadline:
        now = time.time()
        if next_t > now:
            time.sleep(min(next_t - now, 0.5))
            continue
        next_t = max(next_t + 1.0 / rate, now - 1.0)
        key = rnd.choice(keys)
        try:
            stats["gets"] += 1
            if r.get(key) is not None:
                stats["hits"] += 1
                continue
        except redis_py.RedisError:
            stats["redis_errors"] += 1
            time.sleep(0.05)
            continue
        stats["misses"] += 1
        if conn is None or conn.closed:
            try:
                conn = _pg_connect(dsn, autocommit=True)
            except psycopg2.Error:
                stats["db_errors"] += 1
                time.sleep(0.1)
                continue
        sql, args = reader_query(key)
        rs = time.time()
        try:
            cur = conn.cursor()
            cur.execute(sql, args)
            snap, data = cur.fetchone()
        except psycopg2.Error:
            stats["db_errors"] += 1
            _close(conn)
            conn = None
            time.sleep(0.05)
            continue
        if rnd.random() < slow_ratio:
            stats["slow"] += 1
            time.sleep(rnd.uniform(slow_ms / 3.0, slow_ms) / 1000.0)
        elif think_ms > 0:
            time.sleep(rnd.uniform(0, think_ms) / 1000.0)
        seq += 1
        fid = "r%d.%d" % (idx, seq)
        ss = time.time()
        try:
            ok = r.set(key, "%s %s" % (fid, canon(data)), nx=True, ex=TTL_S)
            status = 1 if ok else 0
        except redis_py.RedisError:
            stats["redis_errors"] += 1
            status = 2  # may or may not have landed: MONITOR knows
        se = time.time()
        if status == 0:
            stats["nx_lost"] += 1
            continue
        if status == 1:
            stats["fills"] += 1
        else:
            stats["set_unknown"] += 1
        out.write("%s\t%s\t%.6f\t%.6f\t%.6f\t%s\t%d\n" % (fid, key, rs, ss, se, snap, status))
    out.write("#%s\n" % json.dumps(stats))
    out.close()
    _close(conn)


_MON_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')


def monitor_main(rport, stop, path):
    """MONITOR: writes 'D ts key' (UNLINK/DEL), 'S ts pattern' (SCAN MATCH), 'F ts fill' (SET),
    'X ts' (FLUSH*), 'G ts' / 'g ts' (connection lost / MONITOR again) and 'U ts nkeys' (an UNLINK)."""
    out = open(path, "w", buffering=1 << 16)
    connected = False
    last_flush = time.time()
    while not stop.is_set():
        try:
            s = socket.create_connection(("127.0.0.1", rport), timeout=0.5)
        except OSError:
            time.sleep(0.02)
            continue
        try:
            s.settimeout(0.5)
            s.sendall(b"MONITOR\r\n")
            buf = b""
            while b"\r\n" not in buf and not stop.is_set():
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    continue
                if not chunk:
                    raise OSError("closed")
                buf += chunk
            if stop.is_set():
                break
            line, buf = buf.split(b"\r\n", 1)
            if line != b"+OK":
                raise OSError("MONITOR refused: %r" % line)
            out.write("g %.6f\n" % time.time())
            connected = True
            while not stop.is_set():
                try:
                    chunk = s.recv(1 << 18)
                except socket.timeout:
                    if time.time() - last_flush > 0.5:
                        out.flush()
                        last_flush = time.time()
                    continue
                if not chunk:
                    raise OSError("closed")
                buf += chunk
                lines = buf.split(b"\r\n")
                buf = lines.pop()
                for raw in lines:
                    _monitor_line(raw, out)
                if time.time() - last_flush > 0.5:
                    out.flush()
                    last_flush = time.time()
        except OSError:
            pass
        finally:
            try:
                s.close()
            except OSError:
                pass
        if connected:
            out.write("G %.6f\n" % time.time())
            connected = False
        time.sleep(0.02)
    out.close()


def _monitor_line(raw, out):
    i = raw.find(b'] "')
    if i < 0 or not raw.startswith(b"+"):
        return
    j = raw.find(b'"', i + 3)
    cmd = raw[i + 3:j].upper()
    if cmd not in (b"UNLINK", b"DEL", b"SCAN", b"SET", b"FLUSHALL", b"FLUSHDB"):
        return
    ts = raw[1:raw.find(b" ")].decode()
    args = _MON_ARG.findall(raw[j + 1:].decode(errors="replace"))
    if cmd in (b"UNLINK", b"DEL"):
        out.write("U %s %d\n" % (ts, len(args)))
        for k in args:
            out.write("D %s %s\n" % (ts, k))
    elif cmd == b"SCAN":
        up = [a.upper() for a in args]
        if "MATCH" in up and up.index("MATCH") + 1 < len(args):
            out.write("S %s %s\n" % (ts, args[up.index("MATCH") + 1].replace("\\\\", "\\")))
    elif cmd == b"SET":
        if len(args) >= 2:
            out.write("F %s %s\n" % (ts, args[1].split(" ", 1)[0]))
    else:
        out.write("X %s\n" % ts)


# ------------------------------------------------------------------------------------------ the run

class Run:
    """One checker run: servers, evictd, traffic, checks, quiesce, analysis."""

    RECOVERY = 5.0  # seconds after a chaos fault during which late deletes are put down to it
    ACK_POLL = 0.02  # seconds between polls of the watched outbox rows

    def __init__(self, opts, chaos=False):
        self.opts = opts
        self.chaos = chaos
        self.workdir = tempfile.mkdtemp(prefix="evictd-soak-")
        self.pg = None
        self.rd = None
        self.daemon = None
        self.children = []
        self.writes = {}  # wid -> record
        self.writer_stats = {}
        self.checks = 0
        self.checks_present = 0
        self.checks_deferred = 0
        self.suspects = []  # (T, key, value, wid or "final", delay)
        self.final = None
        self.wipes = []  # Redis data loss times (kill)
        self.events = []  # chaos log: (time, what, detail)
        self.faults = []  # (start, end, kind): servers or evictd down / frozen
        self.crashes = []
        self.outbox_seq_start = 0
        self._ck_conn = None
        self._ck_redis = None
        self._ack_conn = None
        self.pending_ids = {}  # outbox id -> change, until evictd deletes (acknowledges) the row
        self.ids_left = {}
        self.ack_lo = {}  # change -> last time all its rows were not yet known to be acked
        self.acks = {}  # change -> (lo, hi): its last outbox row was acknowledged in [lo, hi]
        self._last_ack_poll = 0.0

    # -- setup ------------------------------------------------------------------------------
    def setup(self):
        o = self.opts
        log("workdir %s; starting PostgreSQL and Redis" % self.workdir)
        self.pg = Postgres()
        self.rd = Redis()
        self.pg.psql(file=os.path.join(ROOT, "sql", "install.sql"))
        self.pg.psql(SCHEMA_SQL)
        rnd = random.Random(o.seed)
        rows = []
        for s in range(1, N_SHIPMENTS + 1):
            d = rnd.randint(1, N_DRIVERS)
            rows.append("(%d, %d, %s)" % (s, rnd.randint(1, N_PRODUCTS), "NULL" if rnd.random() < 0.1 else d))
        self.pg.psql(
            "INSERT INTO products SELECT g, 'p' || g, 1000 FROM generate_series(1, %d) g;\n"
            "INSERT INTO drivers SELECT g, %d + g, true FROM generate_series(1, %d) g;\n"
            "INSERT INTO shipments (id, product_id, driver_id) VALUES %s;\n"
            "SELECT setval('shipments_id_seq', %d);\n" % (N_PRODUCTS, USER_BASE, N_DRIVERS, ",".join(rows), N_SHIPMENTS))
        self.cfg_path, self.cfg = build_config(o, self.workdir, self.chaos)
        self.env = dict(os.environ, DATABASE_URL=self.pg.dsn(), REDIS_URL=self.rd.url(0),
                        EVICTD_DEAD_LETTER=os.path.join(self.workdir, "dead-letter.jsonl"))
        p = subprocess.run([evictd_bin(), "sql", "--config", self.cfg_path], capture_output=True, text=True,
                           timeout=30, env=self.env)
        if p.returncode != 0:
            raise HarnessError("evictd sql failed (%d): %s" % (p.returncode, p.stderr))
        self.pg.psql(p.stdout)
        self.outbox_seq_start = int(self.pg.psql("SELECT last_value FROM evictd.outbox_id_seq").strip() or 0)

    def start_evictd(self, wait_ready=True):
        if self.opts.no_evictd:
            return
        if self.daemon is None:
            self.daemon = Daemon(self.workdir, self.cfg_path, self.env)
        self.daemon.start()
        if wait_ready:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    if int(self.pg.psql("SELECT last_value FROM evictd.idle", timeout=5).strip() or 0) >= 1:
                        return
                except HarnessError:
                    pass
                if not self.daemon.running():
                    break
                time.sleep(0.05)
            raise HarnessError("evictd did not become idle within 20 s\n%s" % self.daemon.tail())

    def record_event(self, what, detail=""):
        self.events.append((time.time(), what, detail))

    def poll_evictd(self):
        """Records and restarts an evictd that exited by itself (a crash)."""
        if self.daemon is None:
            return
        rc = self.daemon.check_exit()
        if rc is not None:
            self.crashes.append({"time": time.time(), "rc": rc, "pid": self.daemon.runs[-1]["pid"],
                                 "log_tail": self.daemon.tail(30)})
            log("evictd exited by itself with %s; restarting" % rc)
            self.record_event("evictd_crash", str(rc))
            self.daemon.start()

    # -- traffic ----------------------------------------------------------------------------
    def start_traffic(self):
        o = self.opts
        self.q = CTX.Queue()
        self.stop_w = CTX.Event()
        self.stop_r = CTX.Event()
        self.stop_m = CTX.Event()
        self.mon_path = os.path.join(self.workdir, "monitor.log")
        deadline = time.time() + o.duration + 600  # the stop events end the traffic; this is a backstop
        m = CTX.Process(target=monitor_main, args=(self.rd.port, self.stop_m, self.mon_path), name="monitor")
        m.start()
        self.monitor = m
        time.sleep(0.2)
        self.writers, self.readers, self.reader_paths = [], [], []
        for i in range(o.writers):
            p = CTX.Process(target=writer_main, name="writer%d" % i,
                            args=(i, self.pg.dsn(), o.write_rate, deadline, self.stop_w, self.q, o.seed * 1000 + i))
            p.start()
            self.writers.append(p)
        for i in range(o.readers):
            path = os.path.join(self.workdir, "fills.%d" % i)
            p = CTX.Process(target=reader_main, name="reader%d" % i,
                            args=(i, self.pg.dsn(), self.rd.port, o.read_rate, o.think_ms, o.slow_ratio, o.slow_ms,
                                  deadline, self.stop_r, path, o.seed * 1000 + 500 + i))
            p.start()
            self.readers.append(p)
            self.reader_paths.append(path)
        self.children = [m] + self.writers + self.readers
        self.heap = []
        self.traffic_started = time.time()

    def _drain_queue(self, limit=5000):
        n = 0
        while n < limit:
            try:
                msg = self.q.get_nowait()
            except queue_mod.Empty:
                break
            n += 1
            if msg[0] == "w":
                _, wid, xid, cs, ce, op, rule, dirty, how, ids = msg
                self.writes[wid] = {"wid": wid, "xid": xid, "cs": cs, "ce": ce, "op": op, "rule": rule,
                                    "dirty": dirty, "how": how, "ids": ids}
                for i in ids:
                    self.pending_ids[i] = wid
                self.ids_left[wid] = len(ids)
                self.ack_lo[wid] = cs
                heapq.heappush(self.heap, (ce + self.opts.check_delay_ms / 1000.0, wid))
            elif msg[0] == "ws":
                self.writer_stats[msg[1]] = msg[2]
        return n

    def poll_acks(self, force=False):
        """Which watched outbox rows evictd has deleted since the last poll (every ACK_POLL s)."""
        now = time.time()
        if not self.pending_ids or (not force and now - self._last_ack_poll < self.ACK_POLL):
            return
        self._last_ack_poll = now
        ids = list(self.pending_ids)
        try:
            if self._ack_conn is None or self._ack_conn.closed:
                self._ack_conn = _pg_connect(self.pg.dsn(), autocommit=True)
            q0 = time.time()
            with self._ack_conn.cursor() as cur:
                cur.execute("SELECT id FROM evictd.outbox WHERE id = ANY(%s)", (ids,))
                present = {r[0] for r in cur.fetchall()}
            q1 = time.time()
        except psycopg2.Error:
            _close(self._ack_conn)
            self._ack_conn = None
            return
        touched = set()
        for i in ids:
            wid = self.pending_ids[i]
            if i in present:
                touched.add(wid)
                continue
            del self.pending_ids[i]
            self.ids_left[wid] -= 1
            if self.ids_left[wid] == 0:
                self.acks[wid] = (self.ack_lo[wid], q1)
        for wid in touched:
            self.ack_lo[wid] = max(self.ack_lo[wid], q0)

    def _checker_conns(self):
        if self._ck_redis is None:
            self._ck_redis = redis_py.Redis(host="127.0.0.1", port=self.rd.port, db=0, socket_timeout=0.5,
                                            socket_connect_timeout=0.5)
        if self._ck_conn is None or self._ck_conn.closed:
            self._ck_conn = _pg_connect(self.pg.dsn(), autocommit=False)
            self._ck_conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
        return self._ck_redis, self._ck_conn

    def _check_keys(self, keys):
        """GET the keys, then read the DB. Returns (T, {key: cached or None}, {key: db value}) or None."""
        try:
            r, conn = self._checker_conns()
            T = time.time()
            vals = r.mget(keys)
        except redis_py.RedisError:
            self._ck_redis = None
            return None
        except psycopg2.Error:
            _close(self._ck_conn)
            self._ck_conn = None
            return None
        try:
            with conn.cursor() as cur:
                db = read_model(cur)
            conn.rollback()
        except psycopg2.Error:
            _close(self._ck_conn)
            self._ck_conn = None
            return None
        return T, dict(zip(keys, [v.decode() if v is not None else None for v in vals])), db

    def check_tick(self):
        """Runs the checks that are due; a check that cannot reach a server is retried shortly."""
        now = time.time()
        due = []
        while self.heap and self.heap[0][0] <= now and len(due) < 400:
            due.append(heapq.heappop(self.heap)[1])
        if not due:
            return 0
        keys = sorted({k for wid in due for k in self.writes[wid]["rule"]})
        got = self._check_keys(keys)
        if got is None:
            self.checks_deferred += len(due)
            for wid in due:
                heapq.heappush(self.heap, (now + 0.1, wid))
            return len(due)
        T, cached, db = got
        seen = set()
        delay = self.opts.check_delay_ms / 1000.0
        for wid in due:
            for k in self.writes[wid]["rule"]:
                self.checks += 1
                v = cached[k]
                if v is None:
                    continue
                self.checks_present += 1
                data = v.split(" ", 1)[1] if " " in v else v
                if data == db.get(k):
                    continue
                if (k, v) in seen:
                    self.suspects.append((T, k, v, wid, delay, True))
                    continue
                seen.add((k, v))
                self.suspects.append((T, k, v, wid, delay, False))
        return len(due)

    def traffic_loop(self, until, on_tick=None):
        """Consumes writes and runs checks until `until` (time.time()); on_tick() between."""
        last_poll = 0
        while time.time() < until:
            self._drain_queue()
            self.poll_acks()
            n = self.check_tick()
            if time.time() - last_poll > 0.2:
                last_poll = time.time()
                self.poll_evictd()
                if on_tick:
                    on_tick()
            if not n:
                time.sleep(0.005)

    # -- quiesce ----------------------------------------------------------------------------
    def _join(self, procs, what, timeout):
        deadline = time.time() + timeout
        for p in procs:
            while p.is_alive() and time.time() < deadline:
                self._drain_queue()
                self.poll_acks()
                self.check_tick()
                p.join(timeout=0.05)
            if p.is_alive():
                log("%s %s did not stop in %ss; terminating pid %d" % (what, p.name, timeout, p.pid))
                p.terminate()
                p.join(timeout=5)

    def quiesce(self):
        o = self.opts
        log("quiescing: stopping writers")
        self.stop_w.set()
        self._join(self.writers, "writer", 60)
        self._drain_queue(10 ** 9)
        self.writes_done = time.time()
        log("stopping readers")
        self.stop_r.set()
        self._join(self.readers, "reader", 30)
        # the last timed checks
        deadline = time.time() + 60
        while self.heap and time.time() < deadline:
            self._drain_queue()
            self.poll_acks()
            if not self.check_tick():
                time.sleep(0.01)
        # outbox drained (bounded), then evictd's in-flight deletes and re-deletes
        self.outbox_left = None
        if not o.no_evictd:
            deadline = time.time() + o.quiesce_timeout
            while time.time() < deadline:
                self.poll_evictd()
                try:
                    self.outbox_left = int(self.pg.psql("SELECT count(*) FROM evictd.outbox", timeout=10).strip())
                    self.poll_acks(force=True)
                    if self.outbox_left == 0:
                        break
                except HarnessError:
                    pass
                time.sleep(0.1)
            log("outbox left after quiesce: %s" % self.outbox_left)
        else:
            self.outbox_left = int(self.pg.psql("SELECT count(*) FROM evictd.outbox").strip())
        time.sleep(0.3 + 2 * (o.redelete_ms or 0) / 1000.0)
        # final check: every key, against the DB
        keys = all_keys()
        got = None
        for _ in range(100):
            got = self._check_keys(keys)
            if got:
                break
            time.sleep(0.1)
        if got is None:
            raise HarnessError("final check could not read Redis/PostgreSQL")
        T, cached, db = got
        self.final = {"T": T, "keys": len(keys), "present": 0, "suspects": []}
        for k in keys:
            v = cached[k]
            if v is None:
                continue
            self.final["present"] += 1
            data = v.split(" ", 1)[1] if " " in v else v
            if data != db.get(k):
                self.final["suspects"].append((T, k, v, "final", 0.0, False))
        self.outbox_seq_end = int(self.pg.psql("SELECT last_value FROM evictd.outbox_id_seq").strip() or 0)
        time.sleep(0.3)
        self.stop_m.set()
        self.monitor.join(timeout=10)
        if self.monitor.is_alive():
            self.monitor.terminate()
            self.monitor.join(timeout=5)
        try:  # after MONITOR stopped: this SCAN is not one of evictd's deletes
            r, _ = self._checker_conns()
            known = set(keys)
            extra = [k.decode() for k in r.scan_iter(match="*", count=1000) if k.decode() not in known]
        except redis_py.RedisError:
            extra = None
        self.final["unexpected_keys"] = extra

    def cleanup(self):
        for p in self.children:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        for c in (self._ck_conn, self._ack_conn):
            _close(c)
        if self.rd is not None and self.rd._stopped_by_signal:
            self.rd.sigcont()
        if self.daemon is not None:
            self.daemon.close()
        if self.rd is not None:
            self.rd.cleanup()
        if self.pg is not None:
            self.pg.cleanup()
        if not self.opts.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            log("kept %s" % self.workdir)

    # -- analysis ---------------------------------------------------------------------------
    def load_logs(self):
        self.fills = {}
        self.reader_stats = []
        for path in self.reader_paths:
            try:
                f = open(path)
            except OSError:
                continue
            with f:
                for line in f:
                    if line.startswith("#"):
                        self.reader_stats.append(json.loads(line[1:]))
                        continue
                    parts = line.rstrip("\n").split("\t")
                    if len(parts) != 7:
                        continue
                    fid, key, rs, ss, se, snap, st = parts
                    self.fills[fid] = (key, float(rs), float(ss), float(se), parse_snapshot(snap), int(st))
        self.unlinks = {}  # key -> sorted UNLINK times
        self.scans = []  # (t, pattern)
        self.fill_exec = {}
        self.gaps = []  # (lost, regained)
        self.unlink_cmds = 0
        self.unlink_keys = 0
        lost_at = None
        first_g = True
        with open(self.mon_path) as f:
            for line in f:
                parts = line.rstrip("\n").split(" ", 2)
                kind, ts = parts[0], float(parts[1])
                if kind == "D":
                    self.unlinks.setdefault(parts[2], []).append(ts)
                    self.unlink_keys += 1
                elif kind == "U":
                    self.unlink_cmds += 1
                elif kind == "S":
                    self.scans.append((ts, parts[2]))
                elif kind == "F":
                    self.fill_exec.setdefault(parts[2], ts)
                elif kind == "G":
                    lost_at = ts
                elif kind == "g":
                    if not first_g:
                        self.gaps.append((lost_at if lost_at is not None else ts, ts))
                    first_g = False
                    lost_at = None
                elif kind == "X":
                    self.wipes.append(ts)
        if lost_at is not None:
            self.gaps.append((lost_at, float("inf")))
        for v in self.unlinks.values():
            v.sort()
        # delete attempts per key: UNLINK of the key, or a SCAN whose pattern matches it
        self.attempts = {}
        keys = all_keys()
        for k in keys:
            lst = list(self.unlinks.get(k, []))
            for ts, pat in self.scans:
                if fnmatch.fnmatchcase(k, pat):
                    lst.append(ts)
            lst.sort()
            self.attempts[k] = lst
        self.wipes.sort()
        # writes per dirty key and per rule key, by commit start
        self.by_dirty = {}
        self.by_rule = {}
        self.max_commit = 0.0
        for w in self.writes.values():
            self.max_commit = max(self.max_commit, w["ce"] - w["cs"])
            for k in w["dirty"]:
                self.by_dirty.setdefault(k, []).append(w)
            for k in w["rule"]:
                self.by_rule.setdefault(k, []).append(w)
        for d in (self.by_dirty, self.by_rule):
            for k in d:
                d[k].sort(key=lambda w: w["cs"])
        self.by_dirty_cs = {k: [w["cs"] for w in v] for k, v in self.by_dirty.items()}
        self.by_rule_cs = {k: [w["cs"] for w in v] for k, v in self.by_rule.items()}

    @staticmethod
    def _any_in(sorted_ts, lo, hi):
        i = bisect.bisect_left(sorted_ts, lo)
        return i < len(sorted_ts) and sorted_ts[i] <= hi

    @staticmethod
    def _first_after(sorted_ts, t):
        i = bisect.bisect_right(sorted_ts, t)
        return sorted_ts[i] if i < len(sorted_ts) else None

    def _gap_overlaps(self, lo, hi):
        return any(a <= hi and b >= lo for a, b in self.gaps)

    def missed_writes(self, key, fill, upto_ce=None, upto_cs=None, first_only=False):
        """Changes to the key's value that committed but are invisible to the fill's snapshot
        (optionally only those whose COMMIT returned by upto_ce / was sent by upto_cs)."""
        _, rs, _, _, snap, _ = fill
        lst = self.by_dirty.get(key, [])
        i = bisect.bisect_left(self.by_dirty_cs.get(key, []), rs - self.max_commit - 0.001)
        out = []
        stop_cs = min(x for x in (upto_cs, upto_ce, float("inf")) if x is not None)
        for j in range(i, len(lst)):
            w = lst[j]
            if w["cs"] > stop_cs:
                break
            if upto_ce is not None and w["ce"] > upto_ce:
                continue
            if not visible(w["xid"], snap):
                out.append(w)
                if first_only:
                    break
        return out

    def _in_fault(self, lo, hi, recovery=None):
        """A chaos fault (plus `recovery` s, default RECOVERY, to recover) overlaps [lo, hi]."""
        rec = self.RECOVERY if recovery is None else recovery
        return any(a <= hi and b + rec >= lo for a, b, _ in self.faults)

    def _next_change(self, key, t):
        """Commit start of the first change naming the key that began committing after t."""
        lst = self.by_rule_cs.get(key, [])
        i = bisect.bisect_right(lst, t)
        return lst[i] if i < len(lst) else float("inf")

    def classify(self, T, key, value, delay):
        """(class, detail) of a cached value that differs from the DB at check time T."""
        fid = value.split(" ", 1)[0]
        fill = self.fills.get(fid)
        if fill is None or fill[0] != key:
            return "unexplained", {"why": "value not written by a reader fill (%r)" % value[:60]}
        fe = self.fill_exec.get(fid, fill[3])  # when the SET landed (MONITOR), else its reply time
        missed_old = self.missed_writes(key, fill, upto_ce=T - delay)
        if not missed_old:
            if self.missed_writes(key, fill, first_only=True):
                return "pending", {}
            return "unexplained", {"why": "model: value differs from the DB but its fill missed no change",
                                   "fill": fid}
        after = [w for w in missed_old if w["cs"] > fe]
        wl = max(missed_old, key=lambda w: w["cs"])
        det = {"fill": fid, "read_start": fill[1], "set": fe, "write": wl["wid"], "commit_start": wl["cs"],
               "commit_end": wl["ce"], "missed": len(missed_old)}
        att = self.attempts.get(key, [])
        later = self._first_after(self.unlinks.get(key, []), T)
        if not after and self._any_in(att, wl["cs"], fe):
            det["delete"] = att[bisect.bisect_left(att, wl["cs"])]
            return "race", det
        if after:
            det["why"] = "SET landed before the change committed"
            wl = min(after, key=lambda w: w["cs"])
            det.update(write=wl["wid"], commit_start=wl["cs"], commit_end=wl["ce"])
        ack = self.acks.get(wl["wid"])
        if ack is not None:
            det["acked_ms_after_commit"] = [round((ack[0] - wl["ce"]) * 1000.0, 1), round((ack[1] - wl["ce"]) * 1000.0, 1)]
        if later is not None:
            det["delete"] = later
            det["lag_ms"] = round((later - wl["ce"]) * 1000.0, 1)
        if ack is not None and wl["ids"]:
            # evictd deletes a change's keys before it deletes its outbox rows
            if ack[1] < T:
                det["why"] = "evictd acknowledged the change before the check, yet the key held the old value"
                return "unexplained", det
            return "late", det  # evictd applied the change after the check
        if later is not None and (later < self._next_change(key, T) or self._in_fault(wl["cs"], T)):
            # no ack evidence: evictd deleted the key after the check and before any newer change
            # to it could have asked for that delete (or a chaos fault explains the delay)
            return "late", det
        if self._gap_overlaps(wl["cs"], T):
            return "indeterminate", det
        return "unexplained", det

    def stale_end(self, key, after):
        """When a value set at `after` left the cache: its key's next UNLINK, or a Redis data loss."""
        cands = [x for x in (self._first_after(self.unlinks.get(key, []), after),
                             self._first_after(self.wipes, after)) if x is not None]
        return min(cands) if cands else None

    def analyse(self):
        o = self.opts
        self.load_logs()
        res = {}
        # timed checks
        classes = {}
        unique = {}
        worst = {"race": 0.0, "late": 0.0, "unexplained": 0.0}
        samples = {"race": [], "late": [], "unexplained": [], "indeterminate": []}
        stale_checks = {"race": 0, "late": 0, "unexplained": 0, "indeterminate": 0}
        for (T, k, v, wid, delay, dup) in self.suspects:
            c, det = self.classify(T, k, v, delay)
            if c == "pending":
                continue
            stale_checks[c] += 1
            if (k, v) in unique:
                continue
            unique[(k, v)] = (c, det)
            classes[c] = classes.get(c, 0) + 1
            if len(samples[c]) < 5:
                samples[c].append(dict(det, key=k, check_time=T, change=wid))
        for (k, v), (c, det) in unique.items():
            if "set" in det and c in worst:
                start = max(det["set"], det["commit_end"])
                end = self.stale_end(k, det["set"]) or self.final["T"]
                worst[c] = max(worst[c], end - start)
        nstale = sum(stale_checks.values())
        res["timed"] = {
            "check_delay_ms": o.check_delay_ms, "checks": self.checks, "present": self.checks_present,
            "deferred": self.checks_deferred,
            "stale_checks": stale_checks, "stale_values": {c: classes.get(c, 0) for c in stale_checks},
            "consistency": (1.0 - nstale / self.checks) if self.checks else None,
            "consistency_excl_race": (1.0 - (nstale - stale_checks["race"]) / self.checks) if self.checks else None,
            "samples": samples,
        }
        # final check after quiescing
        fclasses = {}
        fsamples = []
        for (T, k, v, _, delay, _) in self.final["suspects"]:
            c, det = self.classify(T, k, v, delay)
            fclasses[c] = fclasses.get(c, 0) + 1
            fsamples.append(dict(det, key=k, cls=c))
        res["final"] = {"keys": self.final["keys"], "present": self.final["present"],
                        "stale": fclasses, "stale_race": fclasses.get("race", 0),
                        "stale_unexplained": sum(n for c, n in fclasses.items() if c != "race"),
                        "samples": fsamples[:10], "unexpected_keys": self.final["unexpected_keys"]}
        # every fill: which landed already stale because of the race, and for how long
        stale_fills = []
        durations = []
        open_at_end = 0
        nfills = 0
        for fid, fill in self.fills.items():
            key = fill[0]
            fe = self.fill_exec.get(fid)
            if fe is None:
                if fill[5] != 1:
                    continue  # an unknown SET that MONITOR never saw
                fe = fill[3]
            nfills += 1
            missed = self.missed_writes(key, fill, upto_cs=fe)
            if not missed:
                continue
            wl = max(missed, key=lambda w: w["cs"])
            if not self._any_in(self.attempts.get(key, []), wl["cs"], fe):
                continue  # evictd's delete came after the SET: transient, not the race
            start = max(fe, min(w["ce"] for w in missed))
            end = self.stale_end(key, fe)
            if end is None:
                end = self.final["T"]
                open_at_end += 1
            d = max(0.0, end - start)
            stale_fills.append((fid, key, fe - fill[1], d, fill[1], fe, end))
            durations.append(d)
        red = (o.redelete_ms or 0) / 1000.0
        slow_race = sum(1 for s in stale_fills if s[2] > red)
        by_kind = {}
        escaped = []
        for (fid, key, r2s, d, rs, fe, end) in stale_fills:
            kind = key_kind(key)
            b = by_kind.setdefault(kind, {"stale_fills": 0, "max_ms": 0.0, "over_redelete": 0, "stale_ms_total": 0.0})
            b["stale_fills"] += 1
            b["max_ms"] = max(b["max_ms"], round(d * 1000.0, 1))
            b["stale_ms_total"] = round(b["stale_ms_total"] + d * 1000.0, 1)
            b["over_redelete"] += r2s > red
            # the reader was faster than the re-delete delay, so the re-delete (due after the SET)
            # should have removed the value: patterns are not re-deleted, so only plain keys count
            if red > 0 and kind != "page" and r2s < red and d > red + 0.05:
                escaped.append({"fill": fid, "key": key, "read_start": rs, "set": fe, "gone": end,
                                "read_to_set_ms": round(r2s * 1000.0, 1), "stale_ms": round(d * 1000.0, 1),
                                # a re-delete is in memory only and not retried: a fault (Redis
                                # down or frozen, evictd killed) around it drops it
                                "in_fault": self._in_fault(fe - red, fe + red + 0.05, recovery=1.0)})
        res["race"] = {
            "fills": nfills, "stale_fills": len(stale_fills),
            "stale_fill_ratio": (len(stale_fills) / nfills) if nfills else None,
            "stale_fills_read_to_set_over_redelete": slow_race,
            "staleness_ms_p50": _ms(pct(durations, 50)), "staleness_ms_p99": _ms(pct(durations, 99)),
            "staleness_ms_max": _ms(max(durations) if durations else None),
            "stale_ms_total": round(sum(durations) * 1000.0, 1),
            "open_at_end": open_at_end, "by_kind": by_kind,
            "escaped_redelete": len(escaped), "escaped_samples": escaped[:10],
            "escaped_redelete_outside_faults": sum(1 for e in escaped if not e["in_fault"]),
        }
        # delete coverage and invalidation lag per (change, key)
        pairs = 0
        missing = []
        unverifiable = 0
        lags = []
        for w in self.writes.values():
            for k in w["rule"]:
                pairs += 1
                att = self.attempts.get(k, [])
                first = self._first_after(att, w["cs"] - 1e-6)
                if first is not None:
                    lags.append(max(0.0, first - w["ce"]))
                    continue
                if self._first_after(self.wipes, w["cs"]) is not None:
                    continue
                if self._gap_overlaps(w["cs"], float("inf")):
                    unverifiable += 1
                    continue
                missing.append((w["wid"], k))
        lost_changes = sorted({wid for wid, _ in missing})
        res["deletes"] = {
            "change_key_pairs": pairs, "missing": len(missing), "unverifiable_monitor_gap": unverifiable,
            "missing_samples": [{"change": wid, "key": k, "commit_end": self.writes[wid]["ce"]}
                                for wid, k in missing[:10]],
            "lag_ms_p50": _ms(pct(lags, 50)), "lag_ms_p99": _ms(pct(lags, 99)), "lag_ms_max": _ms(max(lags) if lags else None),
            "unlink_commands": self.unlink_cmds, "unlinked_keys": self.unlink_keys,
            "pattern_scans": len(self.scans),
        }
        apply = [self.acks[w["wid"]][1] - w["ce"] for w in self.writes.values() if w["wid"] in self.acks]
        slow_apply = sorted(((self.acks[w["wid"]][1] - w["ce"], w["wid"]) for w in self.writes.values()
                             if w["wid"] in self.acks), reverse=True)[:5]
        res["apply"] = {"acked": len(apply), "not_acked": sum(1 for w in self.writes.values() if w["ids"] and w["wid"] not in self.acks),
                        "no_outbox_ids": sum(1 for w in self.writes.values() if not w["ids"]),
                        "lag_ms_p50": _ms(pct(apply, 50)), "lag_ms_p99": _ms(pct(apply, 99)),
                        "lag_ms_p999": _ms(pct(apply, 99.9)), "lag_ms_max": _ms(max(apply) if apply else None),
                        "over_check_delay": sum(1 for a in apply if a * 1000.0 > o.check_delay_ms),
                        "slowest": [{"change": wid, "ms": _ms(a), "ids": self.writes[wid]["ids"],
                                     "commit_ms": _ms(self.writes[wid]["ce"] - self.writes[wid]["cs"])}
                                    for a, wid in slow_apply]}
        # changes that committed after a change holding a higher outbox id had committed: evictd's
        # claim cursor may already be past their rows
        inv, ordered = [], []
        top = -1
        for w in sorted(self.writes.values(), key=lambda w: w["ce"]):
            if not w["ids"]:
                continue
            a = self.acks.get(w["wid"])
            lag = (a[1] - w["ce"]) if a else None
            if lag is not None:
                (inv if min(w["ids"]) < top else ordered).append(lag)
            top = max(top, max(w["ids"]))
        res["apply"]["out_of_id_order"] = {"changes": len(inv), "lag_ms_p50": _ms(pct(inv, 50)), "lag_ms_p99": _ms(pct(inv, 99)),
                                           "lag_ms_max": _ms(max(inv) if inv else None),
                                           "over_check_delay": sum(1 for a in inv if a * 1000.0 > o.check_delay_ms)}
        res["apply"]["in_id_order"] = {"changes": len(ordered), "lag_ms_p50": _ms(pct(ordered, 50)),
                                       "lag_ms_p99": _ms(pct(ordered, 99)), "lag_ms_max": _ms(max(ordered) if ordered else None),
                                       "over_check_delay": sum(1 for a in ordered if a * 1000.0 > o.check_delay_ms)}
        changes = len(self.writes)
        res["changes"] = {"committed": changes,
                          "by_op": _count(w["op"] for w in self.writes.values()),
                          "commit_outcome_recovered": sum(1 for w in self.writes.values() if w["how"] == "recovered"),
                          "commit_outcome_unknown": sum(1 for w in self.writes.values() if w["how"] == "unknown"),
                          "outbox_ids_taken": self.outbox_seq_end - self.outbox_seq_start,
                          "writer_stats": self.writer_stats}
        res["readers"] = _sum_dicts(self.reader_stats)
        res["outbox_left"] = self.outbox_left
        res["lost"] = len(lost_changes) + (self.outbox_left or 0)
        res["worst_staleness_ms"] = {c: _ms(v) for c, v in worst.items()}
        res["worst_staleness_ms"]["race_any_fill"] = res["race"]["staleness_ms_max"]
        res["monitor_gaps"] = len(self.gaps)
        res["redis_wipes"] = len(self.wipes)
        # evictd
        if self.daemon is not None:
            res["evictd"] = {"runs": self.daemon.rss_report(), "log": self.daemon.log_summary(),
                             "crashes": self.crashes}
            dl = self.cfg["dead_letter"]["path"]
            lines = []
            if os.path.exists(dl):
                with open(dl) as f:
                    lines = [json.loads(x) for x in f if x.strip()]
            res["dead_letters"] = {"count": len(lines), "reasons": _count(x.get("reason") for x in lines),
                                   "samples": lines[:3]}
        res["settings"] = {"duration_s": o.duration, "writers": o.writers, "readers": o.readers,
                           "write_rate": o.write_rate, "read_rate": o.read_rate, "think_ms": o.think_ms,
                           "slow_ratio": o.slow_ratio, "slow_ms": o.slow_ms, "redelete_ms": o.redelete_ms,
                           "check_delay_ms": o.check_delay_ms, "evictd": None if o.no_evictd else evictd_bin(),
                           "config": self.cfg_path if o.keep else (o.evictd or "config/routex.json + overrides")}
        res["events"] = _count(e[1] for e in self.events)
        res["traffic_started"] = self.traffic_started
        return res


def _ms(v):
    return None if v is None else round(v * 1000.0, 1)


def _count(it):
    out = {}
    for x in it:
        out[x] = out.get(x, 0) + 1
    return out


def _sum_dicts(ds):
    out = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def run(opts, chaos_factory=None):
    """One full run; returns the results dict. chaos_factory(run) -> object with start()/tick()/stop()."""
    r = Run(opts, chaos=chaos_factory is not None)
    try:
        r.setup()
        r.start_evictd()
        log("evictd %s; traffic for %ss: %d writers x %s/s, %d readers x %s/s, redelete_after_ms=%s" % (
            "not started" if opts.no_evictd else "ready", opts.duration, opts.writers, opts.write_rate,
            opts.readers, opts.read_rate, opts.redelete_ms))
        r.start_traffic()
        chaos = chaos_factory(r) if chaos_factory else None
        if chaos:
            chaos.start()
        try:
            end = r.traffic_started + opts.duration
            last = time.time()
            while time.time() < end:
                r.traffic_loop(min(end, time.time() + 5))
                if time.time() - last >= 10:
                    last = time.time()
                    log("%d changes, %d checks, %d suspects" % (len(r.writes), r.checks, len(r.suspects)))
        finally:
            if chaos:
                chaos.stop()
        r.poll_evictd()
        r.quiesce()
        res = r.analyse()
        if r.daemon is not None:
            rc = r.daemon.stop()
            r.poll_evictd()
            res["evictd"]["final_exit"] = rc
            res["evictd"]["runs"] = r.daemon.rss_report()
            res["evictd"]["log"] = r.daemon.log_summary()
            bad = [x for x in r.daemon.runs if not x["expected"]]
            res["crashes"] = len(bad) + (1 if res["evictd"]["log"]["sanitizer_lines"] else 0)
            res["evictd"]["unexpected_exits"] = [{"pid": x["pid"], "rc": x["rc"]} for x in bad]
        else:
            res["crashes"] = 0
        res["chaos"] = chaos.report() if chaos else None
        return res
    finally:
        r.cleanup()


# ------------------------------------------------------------------------------------------ CLI

def add_args(ap, duration):
    ap.add_argument("--duration", type=float, default=duration, help="seconds of traffic (default %(default)s)")
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--readers", type=int, default=4)
    ap.add_argument("--write-rate", type=float, default=20.0, help="commits/s per writer (default %(default)s)")
    ap.add_argument("--read-rate", type=float, default=150.0, help="requests/s per reader (default %(default)s)")
    ap.add_argument("--think-ms", type=float, default=5.0,
                    help="reader's time between DB read and SET: uniform 0..think-ms (default %(default)s)")
    ap.add_argument("--slow-ratio", type=float, default=0.03, help="share of slow fills (default %(default)s)")
    ap.add_argument("--slow-ms", type=float, default=150.0,
                    help="a slow fill thinks uniform slow-ms/3..slow-ms (default %(default)s)")
    ap.add_argument("--redelete-ms", type=int, default=None,
                    help="sets evictd's batch.redelete_after_ms (default: leave the config's, 0 = off)")
    ap.add_argument("--check-delay-ms", type=float, default=200.0,
                    help="check each change's keys this long after its commit (default %(default)s)")
    ap.add_argument("--redis-timeout-ms", type=int, default=500, help="evictd's redis timeout_ms (default %(default)s)")
    ap.add_argument("--quiesce-timeout", type=float, default=120.0, help="longest wait for the outbox to drain")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--evictd", metavar="CONFIG", default=None,
                   help="start evictd with this config (it must use ${DATABASE_URL} and ${REDIS_URL}); "
                        "default config/routex.json with soak settings")
    g.add_argument("--no-evictd", action="store_true", help="run without evictd (the checker must then see stale keys)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, side logs, config)")


def summary_lines(res):
    t = res["timed"]
    f = res["final"]
    rc = res["race"]
    d = res["deletes"]
    sc = t["stale_checks"]
    out = [
        "changes committed          %d  (outbox ids taken %d; %s)" % (
            res["changes"]["committed"], res["changes"]["outbox_ids_taken"],
            ", ".join("%s %d" % kv for kv in sorted(res["changes"]["by_op"].items()))),
        "keys checked (timed)       %d  (%d present) %s ms after each commit" % (t["checks"], t["present"], t["check_delay_ms"]),
        "stale at timed checks      race %d, late %d, unexplained %d, indeterminate %d  (distinct values: %s)" % (
            sc["race"], sc["late"], sc["unexplained"], sc["indeterminate"],
            ", ".join("%s %d" % kv for kv in sorted(t["stale_values"].items()))),
        "consistency                %s  (excluding race-stale: %s)" % (_pct(t["consistency"]), _pct(t["consistency_excl_race"])),
        "final check (quiesced)     %d keys, %d cached, stale: race %d, unexplained %d" % (
            f["keys"], f["present"], f["stale_race"], f["stale_unexplained"]),
        "outbox left                %s" % res["outbox_left"],
        "lost                       %d  (changes with a key never deleted after commit: %d pairs; unverifiable %d)" % (
            res["lost"], d["missing"], d["unverifiable_monitor_gap"]),
        "stale fills (race)         %d of %d fills (%s); staleness p50 %s ms, p99 %s ms, max %s ms; %d open at end" % (
            rc["stale_fills"], rc["fills"], _pct(rc["stale_fill_ratio"], 4), rc["staleness_ms_p50"],
            rc["staleness_ms_p99"], rc["staleness_ms_max"], rc["open_at_end"]),
        "worst staleness            race %s ms, late %s ms, unexplained %s ms (stale values seen by checks)" % (
            res["worst_staleness_ms"]["race"], res["worst_staleness_ms"]["late"], res["worst_staleness_ms"]["unexplained"]),
        "apply lag (commit -> ack)  p50 %s ms, p99 %s ms, p99.9 %s ms, max %s ms; %d changes over the check delay (+0-%d ms poll)" % (
            res["apply"]["lag_ms_p50"], res["apply"]["lag_ms_p99"], res["apply"]["lag_ms_p999"], res["apply"]["lag_ms_max"],
            res["apply"]["over_check_delay"], int(Run.ACK_POLL * 1000)),
        "  by outbox id order       committed in id order: %d changes, max %s ms, %d over the delay; "
        "out of id order: %d changes, p99 %s ms, max %s ms, %d over the delay" % (
            res["apply"]["in_id_order"]["changes"], res["apply"]["in_id_order"]["lag_ms_max"],
            res["apply"]["in_id_order"]["over_check_delay"], res["apply"]["out_of_id_order"]["changes"],
            res["apply"]["out_of_id_order"]["lag_ms_p99"], res["apply"]["out_of_id_order"]["lag_ms_max"],
            res["apply"]["out_of_id_order"]["over_check_delay"]),
        "invalidation lag           commit -> UNLINK p50 %s ms, p99 %s ms, max %s ms; %d UNLINK commands, %d keys, %d pattern SCANs" % (
            d["lag_ms_p50"], d["lag_ms_p99"], d["lag_ms_max"], d["unlink_commands"], d["unlinked_keys"], d["pattern_scans"]),
        "readers                    %s" % ", ".join("%s %d" % kv for kv in sorted(res["readers"].items())),
    ]
    if "evictd" in res:
        ev = res["evictd"]
        runs = [x for x in ev["runs"] if x.get("samples")]
        out.append("crashes                    %d  (final SIGTERM exit %s; sanitizer lines %d)" % (
            res["crashes"], ev.get("final_exit"), len(ev["log"]["sanitizer_lines"])))
        for x in runs:
            out.append("evictd RSS pid %-8d     start %d kB, peak %d kB, end %d kB (anon %s/%s/%s kB) over %.0f s, exit %s" % (
                x["pid"], x["start_kb"], x["peak_kb"], x["end_kb"], x["anon_start_kb"], x["anon_peak_kb"],
                x["anon_end_kb"], x["uptime_s"], x["rc"]))
        out.append("dead letters               %d %s" % (res["dead_letters"]["count"], res["dead_letters"]["reasons"] or ""))
        m = ev["log"]["msgs"]
        out.append("evictd log                 %s" % ", ".join("%s %d" % kv for kv in sorted(m.items())))
        if ev["log"]["foreign_lines"]:
            out.append("evictd stderr not in log format: %d lines, e.g. %r" % (
                ev["log"]["foreign_lines"], ev["log"]["foreign_samples"][:2]))
    return out


def _pct(x, digits=4):
    if x is None:
        return "n/a"
    return ("%." + str(digits) + "f%%") % (100.0 * x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(ap, 30.0)
    opts = ap.parse_args(argv)
    if not opts.no_evictd and not os.path.exists(evictd_bin()):
        sys.exit("no evictd binary at %s (build it, or set EVICTD_BIN)" % evictd_bin())
    res = run(opts)
    print("\n".join(summary_lines(res)))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    ok = res["lost"] == 0 and res["final"]["stale_unexplained"] == 0 and res["crashes"] == 0 \
        and res["timed"]["stale_checks"]["unexplained"] == 0
    if opts.no_evictd:
        return 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
