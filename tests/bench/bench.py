#!/usr/bin/env python3
"""bench.py: evictd side by side with a Python peer worker, on throwaway PostgreSQL and Redis servers.

    python3 tests/bench/bench.py [--quick] [--reps N] [--json FILE] [--perf]

Starts a private PostgreSQL and Redis on free 127.0.0.1 ports (tests/integration/harness.py;
fsync off as in the harness, with fsync=on runs of the outbox drain, the latency and the write
path beside), builds build-bench/evictd when missing, and
measures evictd and the peer (tests/bench/peer_worker.py) with the same rules
(`routex:1:products_list`, `routex:1:product_{id}` on table products), the same payloads and
the same Redis:

  1. burst drain of N NOTIFY payloads (notify-only watch) sent while the worker is SIGSTOPped,
     evictd's drain of N durable outbox rows, and the Redis UNLINK ceiling;
  2. commit-to-key-gone latency at a paced 2,000 commits/s (Redis keyspace-notification probe);
  3. write-path TPS under pgbench with no capture, a bare outbox trigger, evictd durable and
     evictd notify-only capture;
  4. one 100,000-row UPDATE: commit to last key gone, outbox rows / NOTIFYs made;
  and the time from the last of 10,000 sequential single-row commits to the last key deleted.

Every figure is the median of --reps repetitions (default 3; --quick: 1) with min-max; evictd/peer ratios
are ratios of the medians from this run (with the min-max of the per-repetition ratios).
Prints markdown tables on stdout, progress on stderr. See tests/bench/README.md.
Everything it starts is stopped by PID; every wait is bounded.
"""

import argparse
import atexit
import bisect
import json
import os
import platform
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))

import harness  # noqa: E402,F401  (may re-exec under /usr/bin/python3 for psycopg2 + redis-py)
from harness import HarnessError, Postgres, Redis  # noqa: E402

import psycopg2  # noqa: E402
import psycopg2.extensions  # noqa: E402

PEER = os.path.join(HERE, "peer_worker.py")
INSTALL_SQL = os.path.join(ROOT, "sql", "install.sql")
LIST_KEY = "routex:1:products_list"
CLK_TCK = os.sysconf("SC_CLK_TCK")
T0 = time.monotonic()


def log(msg):
    sys.stderr.write("[bench %7.1fs] %s\n" % (time.monotonic() - T0, msg))
    sys.stderr.flush()


def pkey(i):
    return "routex:1:product_%d" % i


# ------------------------------------------------------------------------------------------ servers

class BenchPostgres(Postgres):
    """harness.Postgres started with the benchmark's settings instead of the harness's `-c fsync=off`.

    fsync and synchronous_commit are not on the command line (which would override ALTER SYSTEM),
    so set_durability() can switch them with ALTER SYSTEM + pg_reload_conf() between sections.
    """

    def __init__(self, settings):
        self.settings = dict(settings)
        super().__init__()

    def set_durability(self, conn, fsync, sync_commit):
        with conn.cursor() as cur:
            cur.execute("ALTER SYSTEM SET fsync = %s" % ("on" if fsync == "on" else "off"))
            cur.execute("ALTER SYSTEM SET synchronous_commit = %s" % sync_commit)
            cur.execute("SELECT pg_reload_conf()")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                cur.execute("SELECT current_setting('fsync'), current_setting('synchronous_commit')")
                if cur.fetchone() == (fsync, sync_commit):
                    break
                time.sleep(0.05)
            else:
                raise HarnessError("fsync/synchronous_commit did not change to %s/%s" % (fsync, sync_commit))
            cur.execute("CHECKPOINT")

    def start(self):
        opts = "-p %d -k %s -c listen_addresses=127.0.0.1" % (self.port, self.dir)
        for k, v in self.settings.items():
            opts += " -c %s=%s" % (k, v)
        self._server_cmd([os.path.join(self.bindir, "pg_ctl"), "start", "-D", self.data, "-l", self.log,
                          "-w", "-t", str(int(harness.START_TIMEOUT)), "-o", opts], "pg_ctl start")
        self._running = True
        return self


# ------------------------------------------------------------------------------------------ processes

_procs = []


class Proc:
    """A worker process (evictd or the peer) watched through /proc; stopped by its PID."""

    def __init__(self, name, argv, logpath, env=None):
        self.name = name
        self.logpath = logpath
        self.logf = open(logpath, "ab")
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.logf, stderr=self.logf, env=env)
        self.pid = self.p.pid
        self.stopped = False
        self.term_wall = None
        _procs.append(self)

    def alive(self):
        return self.p.poll() is None

    def sigstop(self):
        os.kill(self.pid, signal.SIGSTOP)
        self.stopped = True

    def sigcont(self):
        os.kill(self.pid, signal.SIGCONT)
        self.stopped = False

    def cpu(self):
        """utime + stime in seconds, all threads."""
        with open("/proc/%d/stat" % self.pid) as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / CLK_TCK

    def status(self):
        """VmHWM, VmRSS, RssAnon in kB."""
        out = {}
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmHWM", "VmRSS", "RssAnon"):
                    out[k] = int(v.split()[0])
        return out

    def stop(self, timeout=15):
        if self.p.poll() is None:
            try:
                if self.stopped:
                    self.sigcont()
                self.term_wall = time.time()
                self.p.terminate()
                self.p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log("%s (pid %d) ignored SIGTERM for %ss; SIGKILL" % (self.name, self.pid, timeout))
                self.p.kill()
                self.p.wait(timeout=10)
            except ProcessLookupError:
                pass
        if not self.logf.closed:
            self.logf.close()
        if self in _procs:
            _procs.remove(self)
        return self.p.returncode

    def log_tail(self, n=15):
        try:
            with open(self.logpath, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


@atexit.register
def _stop_all():
    for p in list(_procs):
        try:
            p.stop(timeout=5)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


class RssSampler(threading.Thread):
    """Samples /proc/PID/status every `interval` s: peak RssAnon and VmHWM."""

    def __init__(self, proc, interval=0.01):
        super().__init__(daemon=True)
        self.proc = proc
        self.interval = interval
        self.halt = threading.Event()
        self.peak_anon = 0
        self.peak_hwm = 0
        self.samples = 0

    def run(self):
        while not self.halt.is_set():
            try:
                st = self.proc.status()
            except (OSError, ValueError):
                return
            self.samples += 1
            self.peak_anon = max(self.peak_anon, st.get("RssAnon", 0))
            self.peak_hwm = max(self.peak_hwm, st.get("VmHWM", 0))
            self.halt.wait(self.interval)

    def finish(self):
        self.halt.set()
        self.join(timeout=5)


class BareDrain(threading.Thread):
    """The write path's control for draining: the bare outbox trigger's table emptied by the least a
    consumer can do, with no evictd and no Redis. Every `pace` s one statement locks up to 2,000 of
    the oldest rows (FOR UPDATE SKIP LOCKED, as evictd's claims), deletes them and returns their
    payloads, synchronous_commit off. evictd paces its claims at 12 ms when rows arrive this fast."""

    def __init__(self, pg, seconds, pace=0.012):
        super().__init__(daemon=True)
        self.pg = pg
        self.pace = pace
        self.deadline = time.monotonic() + seconds + 60  # bounded whatever happens to the caller
        self.halt = threading.Event()
        self.rows = 0
        self.statements = 0
        self.error = None

    def run(self):
        try:
            conn = self.pg.connect(autocommit=True)
        except Exception as e:  # noqa: BLE001 - reported by finish()
            self.error = e
            return
        try:
            with conn.cursor() as cur:
                cur.execute("SET synchronous_commit = off")
                while not self.halt.is_set() and time.monotonic() < self.deadline:
                    cur.execute("DELETE FROM bench_outbox WHERE id = ANY (ARRAY(SELECT id FROM bench_outbox "
                                "ORDER BY id LIMIT 2000 FOR UPDATE SKIP LOCKED)) RETURNING payload")
                    self.rows += len(cur.fetchall())
                    self.statements += 1
                    self.halt.wait(self.pace)
        except Exception as e:  # noqa: BLE001 - reported by finish()
            self.error = e
        finally:
            conn.close()

    def finish(self):
        self.halt.set()
        self.join(timeout=30)
        if self.error:
            raise HarnessError("bare drain failed: %s" % self.error)


# ------------------------------------------------------------------------------------------ the bench

class Bench:
    def __init__(self, args):
        self.args = args
        self.work = tempfile.mkdtemp(prefix="evictd-bench-")
        self.results = {}
        self.notes = []
        self.perf_reports = []
        self.nstarts = 0
        self.load_start = "?"
        self.settings = {"max_connections": 60, "max_wal_size": "4GB", "shared_buffers": "256MB"}
        log("starting PostgreSQL and Redis (work dir %s)" % self.work)
        self.pg = BenchPostgres(self.settings)
        self.rd = Redis()
        self.r = self.rd.client(socket_timeout=60)
        self.admin = self.pg.connect(autocommit=True)
        self.fsync = None
        self.durability(args.fsync)
        self.pg.psql(file=INSTALL_SQL)
        self.pg.psql("CREATE TABLE IF NOT EXISTS bench_outbox (id bigserial PRIMARY KEY, payload jsonb NOT NULL);\n"
                     + BARE_FN)
        self.cfg = {}
        self.watch_sql = {}
        for mode in ("durable", "notify"):
            path = os.path.join(self.work, "evictd-%s.json" % mode)
            rule = {"table": "products", "keys": [LIST_KEY, "routex:1:product_{id}"]}
            if mode == "notify":
                rule["durable"] = False
            cfg = {"postgres": {"url": self.pg.dsn(), "channels": ["evictd"]},
                   "redis": {"default": {"url": self.rd.url(0)}},
                   "rules": [rule],
                   "dead_letter": {"path": os.path.join(self.work, "dead-letter-%s.jsonl" % mode)},
                   "log": {"level": "warn", "stats_interval_s": 0}}
            with open(path, "w") as f:
                json.dump(cfg, f, indent=1)
            self.cfg[mode] = path
            p = subprocess.run([args.evictd, "sql", "--config", path], capture_output=True, text=True, timeout=30)
            if p.returncode != 0:
                raise HarnessError("evictd sql failed: %s" % p.stderr)
            self.watch_sql[mode] = p.stdout
        self.products_rows = None
        self.capture = None

    # -- helpers --------------------------------------------------------------------------------
    def durability(self, fsync):
        """fsync on/off for what follows; synchronous_commit follows --synchronous-commit."""
        if fsync != self.fsync:
            self.pg.set_durability(self.admin, fsync, self.args.synchronous_commit)
            self.fsync = fsync
            log("server: fsync=%s synchronous_commit=%s" % (fsync, self.args.synchronous_commit))

    def sql(self, q, args=None):
        with self.admin.cursor() as cur:
            cur.execute(q, args)
            return cur.fetchall() if cur.description else None

    def reset_products(self, n):
        """products(id int primary key, stock int) with ids 0..n, no capture."""
        log("products table with ids 0..%d" % n)
        self.set_capture(None)
        self.sql("DROP TABLE IF EXISTS products")
        self.sql("CREATE TABLE products (id int PRIMARY KEY, stock int NOT NULL DEFAULT 0)")
        self.sql("INSERT INTO products (id, stock) SELECT g, 0 FROM generate_series(0, %s) AS g", (n,))
        self.sql("VACUUM ANALYZE products")
        self.products_rows = n
        self.capture = None

    def set_capture(self, mode):
        """None (no trigger), 'bare' (bench outbox trigger), 'durable' or 'notify' (evictd.watch)."""
        if mode == self.capture:
            return
        if self.table_exists():
            self.sql("DROP TRIGGER IF EXISTS bench_bare ON products")
            self.sql("SELECT evictd.unwatch('products')")
        if mode in ("durable", "notify"):
            self.pg.psql(self.watch_sql[mode])
        elif mode == "bare":
            self.sql("CREATE TRIGGER bench_bare AFTER INSERT OR UPDATE OR DELETE ON products "
                     "FOR EACH ROW EXECUTE FUNCTION bench_bare_capture()")
        self.capture = mode

    def table_exists(self):
        return self.sql("SELECT to_regclass('public.products') IS NOT NULL")[0][0]

    def clear_outbox(self):
        self.sql("DELETE FROM evictd.outbox")
        self.sql("VACUUM evictd.outbox")

    def preload(self, ids, with_list=True):
        """FLUSHDB, then SET routex:1:product_{id} for each id (plain MSET batches), plus the list key."""
        self.r.flushdb()
        pipe = self.r.pipeline(transaction=False)
        batch = {}
        for i in ids:
            batch[pkey(i)] = b"x"
            if len(batch) == 10000:
                pipe.mset(batch)
                batch = {}
                if len(pipe) >= 10:
                    pipe.execute()
        if batch:
            pipe.mset(batch)
        if with_list:
            pipe.set(LIST_KEY, b"x")
        pipe.execute()
        return self.r.dbsize()

    def wait_keys_gone(self, timeout, interval=0.002, proc=None):
        """Polls DBSIZE until 0; returns the monotonic time it was seen 0 (None on timeout)."""
        deadline = time.monotonic() + timeout
        n = 0
        while True:
            n += 1
            if self.r.dbsize() == 0:
                return time.monotonic()
            if time.monotonic() >= deadline:
                return None
            if proc is not None and n % 256 == 0 and not proc.alive():
                raise HarnessError("%s exited (%s) while draining:\n%s" % (proc.name, proc.p.returncode, proc.log_tail()))
            time.sleep(interval)

    def start_worker(self, kind):
        """Starts evictd (kind 'durable'/'notify') or the peer ('peer'); returns its Proc once it deletes keys."""
        name = "evictd-%s" % kind if kind != "peer" else "peer"
        self.nstarts += 1
        logpath = os.path.join(self.work, "%s-%03d.log" % (name, self.nstarts))
        if kind == "peer":
            argv = [sys.executable, PEER, "--dsn", self.pg.dsn(), "--redis", self.rd.url(0),
                    "--channel", "evictd", "--max-seconds", "3600"]
        else:
            argv = [self.args.evictd, "run", "--config", self.cfg[kind], "--log-level", self.args.evictd_log_level]
        proc = Proc(name, argv, logpath)
        try:
            self.ready(proc)
        except BaseException:
            self.stop_worker(proc)
            raise
        return proc

    def stop_worker(self, proc):
        """SIGTERM by PID; notes a non-zero exit and any lines the worker logged (evictd logs at warn)."""
        rc = proc.stop()
        if rc not in (0, None):
            self.notes.append("%s exited with status %s on SIGTERM" % (proc.name, rc))
        try:
            with open(proc.logpath, errors="replace") as f:
                lines = [line.rstrip() for line in f if line.strip()]
        except OSError:
            lines = []
        if proc.name == "peer":
            lines = [line for line in lines if "exiting after" not in line]
        if lines:
            when = ""
            m = re.match(r"ts=(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z", lines[0])
            if m and proc.term_wall:
                import calendar
                t = calendar.timegm(time.strptime(m.group(1).split(".")[0], "%Y-%m-%dT%H:%M:%S"))
                t += float("0." + m.group(1).split(".")[1])
                when = " (%+.3f s from its SIGTERM)" % (t - proc.term_wall)
            self.notes.append("%s (%s) logged %d line(s), first%s: %s"
                              % (proc.name, os.path.basename(proc.logpath), len(lines), when, lines[0][:300]))
        return rc

    def ready(self, proc, timeout=30):
        """Row 0 is updated until its key is deleted: the worker is LISTENing and deleting."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise HarnessError("%s exited (%s):\n%s" % (proc.name, proc.p.returncode, proc.log_tail()))
            self.r.set(pkey(0), b"x")
            self.sql("UPDATE products SET stock = stock + 1 WHERE id = 0")
            t_end = time.monotonic() + 1.0
            while time.monotonic() < t_end:
                if not self.r.exists(pkey(0)):
                    time.sleep(0.3)  # let it finish acknowledging and settle
                    self.r.delete(LIST_KEY)
                    return
                time.sleep(0.005)
        raise HarnessError("%s did not delete a key within %ss:\n%s" % (proc.name, timeout, proc.log_tail()))

    def record(self, section, metric, who, value):
        self.results.setdefault(section, {}).setdefault(metric, {}).setdefault(who, []).append(value)

    # -- 1. burst drain ---------------------------------------------------------------------------
    def gen_notify_burst(self, n):
        """UPDATE ids 1..n in transactions of 10k rows: one NOTIFY per row (notify-only watch)."""
        conn = self.pg.connect()
        t = time.monotonic()
        with conn.cursor() as cur:
            for lo in range(1, n + 1, 10000):
                cur.execute("UPDATE products SET stock = stock + 1 WHERE id BETWEEN %s AND %s",
                            (lo, min(n, lo + 9999)))
                conn.commit()
        conn.close()
        return time.monotonic() - t

    def gen_outbox_rows(self, n):
        """n single-row UPDATE statements (server-side loop, 10k per transaction): n outbox rows."""
        conn = self.pg.connect(autocommit=True)
        t = time.monotonic()
        with conn.cursor() as cur:
            for lo in range(1, n + 1, 10000):
                cur.execute("DO $$ BEGIN FOR k IN %d..%d LOOP "
                            "UPDATE products SET stock = stock + 1 WHERE id = k; END LOOP; END $$"
                            % (lo, min(n, lo + 9999)))
        conn.close()
        return time.monotonic() - t

    def drain_run(self, kind, n, section, perf=False):
        """One repetition: start the worker, SIGSTOP it, generate n changes, SIGCONT, time the drain."""
        who = "peer" if kind == "peer" else "evictd"
        proc = self.start_worker(kind)
        perf_proc = None
        try:
            proc.sigstop()
            dbsize = self.preload(range(1, n + 1))
            if kind == "durable":
                gen_s = self.gen_outbox_rows(n)
                backlog = self.sql("SELECT count(*) FROM evictd.outbox")[0][0]
                self.record(section, "backlog_rows", who, backlog)
                what = "outbox rows %d" % backlog
            else:
                gen_s = self.gen_notify_burst(n)
                what = "notify queue usage %.4f" % self.sql("SELECT pg_notification_queue_usage()")[0][0]
            log("  %s: %d changes generated in %.1fs (%s), %d keys loaded; SIGCONT" % (proc.name, n, gen_s, what, dbsize))
            if perf:
                perf_proc = self.perf_start(proc)
            sampler = RssSampler(proc)
            cpu0 = proc.cpu()
            sampler.start()
            t0 = time.monotonic()
            proc.sigcont()
            t_gone = self.wait_keys_gone(timeout=max(120.0, n / 2000.0), proc=proc)
            cpu1 = proc.cpu()
            if t_gone is None:
                sampler.finish()
                raise HarnessError("%s: %d keys left after the drain timeout" % (proc.name, self.r.dbsize()))
            t_done = t_gone
            if kind == "durable":
                deadline = time.monotonic() + 60
                while self.sql("SELECT EXISTS (SELECT 1 FROM evictd.outbox)")[0][0]:
                    if time.monotonic() > deadline:
                        sampler.finish()
                        raise HarnessError("outbox not empty 60 s after the keys were gone")
                    time.sleep(0.005)
                t_done = time.monotonic()
                cpu1 = proc.cpu()
            if perf_proc:
                self.perf_stop(perf_proc, "%s (%s, %d changes)" % (section, proc.name, n))
                perf_proc = None
            time.sleep(1.0)
            sampler.finish()
            after = proc.status()
            secs = t_done - t0
            self.record(section, "rate", who, n / secs)
            self.record(section, "keys_gone_s", who, t_gone - t0)
            self.record(section, "cpu_us", who, (cpu1 - cpu0) / n * 1e6)
            self.record(section, "hwm_mb", who, max(sampler.peak_hwm, after["VmHWM"]) / 1024.0)
            self.record(section, "anon_peak_mb", who, sampler.peak_anon / 1024.0)
            self.record(section, "anon_after_mb", who, after["RssAnon"] / 1024.0)
            log("  %s: drained in %.2fs = %.0f changes/s, CPU %.2f us/change, VmHWM %.1f MB, "
                "RssAnon peak %.1f MB (%d samples) after %.1f MB"
                % (proc.name, secs, n / secs, (cpu1 - cpu0) / n * 1e6, after["VmHWM"] / 1024.0,
                   sampler.peak_anon / 1024.0, sampler.samples, after["RssAnon"] / 1024.0))
        finally:
            if perf_proc:
                self.perf_stop(perf_proc, section)
            self.stop_worker(proc)

    def perf_start(self, proc):
        out = os.path.join(self.work, "perf-%d.data" % proc.pid)
        cg = ["--call-graph", "dwarf,16384"] if self.args.perf == "dwarf" else ["-g"]
        p = subprocess.Popen(["perf", "record", "-F", "999"] + cg + ["-o", out, "-p", str(proc.pid)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        return (p, out)

    def perf_stop(self, perf_proc, what):
        p, out = perf_proc
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        try:
            flat = subprocess.run(["perf", "report", "-i", out, "--stdio", "--no-children", "-g", "none",
                                   "--percent-limit", "0.5"], capture_output=True, text=True, timeout=180).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            flat = "perf report failed: %s" % exc
        lines = [line for line in flat.splitlines() if line.strip() and not line.startswith("#")]
        self.perf_reports.append((what, "\n".join(lines[:40])))

    def redis_ceiling(self, n):
        """Keys/s deleted by pipelined UNLINK of 512 pre-loaded keys per command (raw-socket client)."""
        self.r.flushdb()
        pipe = self.r.pipeline(transaction=False)
        for lo in range(0, n, 10000):
            pipe.mset({"ceil:%d" % i: b"x" for i in range(lo, min(n, lo + 10000))})
        pipe.execute()
        parts = []
        ncmd = 0
        for lo in range(0, n, 512):
            keys = ["ceil:%d" % i for i in range(lo, min(n, lo + 512))]
            parts.append(b"*%d\r\n$6\r\nUNLINK\r\n" % (len(keys) + 1))
            parts.append(b"".join(b"$%d\r\n%s\r\n" % (len(k), k.encode()) for k in keys))
            ncmd += 1
        payload = b"".join(parts)
        s = socket.create_connection(("127.0.0.1", self.rd.port), timeout=60)
        sender = threading.Thread(target=s.sendall, args=(payload,), daemon=True)
        buf = b""
        t0 = time.monotonic()
        sender.start()
        deadline = t0 + 120
        while buf.count(b"\r\n") < ncmd and time.monotonic() < deadline:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
        t1 = time.monotonic()
        sender.join(timeout=10)
        s.close()
        deleted = sum(int(x) for x in re.findall(rb":(\d+)\r\n", buf))
        if deleted != n:
            raise HarnessError("redis ceiling: %d of %d keys deleted" % (deleted, n))
        return n / (t1 - t0)

    # -- 2. latency -------------------------------------------------------------------------------
    def latency_run(self, kind, rate, seconds, rep, section, conns):
        who = "peer" if kind == "peer" else "evictd"
        m = int(rate * seconds)
        first = 1 + (rep * m) % max(1, self.products_rows - m)
        ids = range(first, first + m)
        # Like every other phase, from a vacuumed outbox (not a million dead rows of the drains),
        # and, like the write path, after a checkpoint (not while the drains' pages are written).
        self.clear_outbox()
        self.sql("CHECKPOINT")
        proc = self.start_worker(kind)
        probe = None
        try:
            self.preload(ids, with_list=False)
            self.r.config_set("notify-keyspace-events", "Kg")
            probe_out = os.path.join(self.work, "probe-%s-%s-%d.json" % (section, who, rep))
            writer_out = os.path.join(self.work, "writer-%s-%s-%d.json" % (section, who, rep))
            probe = subprocess.Popen([sys.executable, os.path.abspath(__file__), "_probe", "--port", str(self.rd.port),
                                      "--out", probe_out, "--max-seconds", str(seconds + 60)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=None)
            r, _, _ = select.select([probe.stdout], [], [], 20)
            if not r or probe.stdout.readline().strip() != b"ready":
                raise HarnessError("latency probe did not subscribe")
            w = subprocess.run([sys.executable, os.path.abspath(__file__), "_writer", "--dsn", self.pg.dsn(),
                                "--first", str(first), "--count", str(m), "--rate", str(rate), "--conns", str(conns),
                                "--out", writer_out], stdin=subprocess.DEVNULL, timeout=seconds * 3 + 60)
            if w.returncode != 0:
                raise HarnessError("latency writer failed (%d)" % w.returncode)
            self.wait_keys_gone(timeout=5)
            time.sleep(0.2)
            probe.send_signal(signal.SIGTERM)
            probe.wait(timeout=30)
            probe = None
            with open(writer_out) as f:
                wr = json.load(f)
            with open(probe_out) as f:
                gone = {int(k): v for k, v in json.load(f).items()}
            lat = []
            missing = 0
            for i, t_commit in wr["commits"]:
                if i in gone:
                    lat.append((gone[i] - t_commit) * 1000.0)
                else:
                    missing += 1
            if not lat:
                raise HarnessError("latency: no deletion seen")
            lat.sort()
            achieved = len(wr["commits"]) / wr["elapsed"]
            p50 = lat[len(lat) // 2]
            p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
            self.record(section, "p50_ms", who, p50)
            self.record(section, "p99_ms", who, p99)
            self.record(section, "max_ms", who, lat[-1])
            self.record(section, "rate", who, achieved)
            self.record(section, "missing", who, missing)
            self.record(section, "commit_ms_p50", who, wr["commit_ms_p50"])
            log("  %s: %d commits at %.0f/s over %d connection(s) (commit p50 %.2f ms), latency p50 %.3f ms "
                "p99 %.3f ms max %.3f ms, %d never seen deleted"
                % (proc.name, len(wr["commits"]), achieved, conns, wr["commit_ms_p50"], p50, p99, lat[-1], missing))
        finally:
            if probe is not None and probe.poll() is None:
                probe.kill()
                probe.wait(timeout=10)
            try:
                self.r.config_set("notify-keyspace-events", "")
            except Exception:  # noqa: BLE001 - best effort
                pass
            self.stop_worker(proc)

    # -- 3. write path ----------------------------------------------------------------------------
    def pgbench(self, seconds, rate=None):
        """TPS of pgbench -c 8 -j 2, a single-row UPDATE of a random product; flat out, or at
        rate transactions/s (-R)."""
        script = os.path.join(self.work, "update.sql")
        with open(script, "w") as f:
            f.write("\\set id random(1, %d)\nUPDATE products SET stock = stock + 1 WHERE id = :id;\n" % self.products_rows)
        argv = [os.path.join(self.pg.bindir, "pgbench"), "-n", "-h", "127.0.0.1", "-p", str(self.pg.port),
                "-U", "postgres", "-c", "8", "-j", "2", "-T", str(seconds), "-M", "prepared", "-f", script, "postgres"]
        if rate:
            argv[-3:-3] = ["-R", str(rate)]  # before -f script postgres
        p = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
        if p.returncode != 0:
            raise HarnessError("pgbench failed: %s %s" % (p.stdout[-2000:], p.stderr[-2000:]))
        m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", p.stdout)
        if not m:
            raise HarnessError("no tps in pgbench output: %s" % p.stdout)
        return float(m.group(1))

    def write_mode(self, mode, seconds):
        """Sets up a write-path mode for a run of seconds: none, bare, bare_drained (bare trigger +
        BareDrain), durable_trigger (durable capture, no evictd, the flag at 0), durable, notify
        (evictd running). Returns (evictd Proc or None, BareDrain or None), both started."""
        self.set_capture({"none": None, "durable_trigger": "durable", "bare_drained": "bare"}.get(mode, mode))
        self.sql("SELECT setval('evictd.idle', 0)")
        self.sql("TRUNCATE bench_outbox")
        self.clear_outbox()
        self.sql("VACUUM products")
        self.sql("CHECKPOINT")
        if mode in ("durable", "notify"):
            return self.start_worker(mode), None
        if mode == "bare_drained":
            drain = BareDrain(self.pg, seconds)
            drain.start()
            return None, drain
        return None, None

    def write_path_run(self, mode, seconds, section):
        """One pgbench run of a write-path mode (write_mode)."""
        proc, drain = self.write_mode(mode, seconds)
        try:
            cpu0 = proc.cpu() if proc else 0.0
            wal = "SELECT wal_bytes, wal_sync FROM pg_stat_wal"
            wal0 = self.sql(wal)[0]
            tps = self.pgbench(seconds)
            # With fsync on the writers wait on WAL flushes (LWLock WALWrite, IO WALSync in
            # pg_stat_activity): what a capture adds to the WAL is what it costs them.
            wal1 = self.sql(wal)[0]
            self.record(section, "wal_bytes_tx_" + mode, "evictd", float(wal1[0] - wal0[0]) / max(tps * seconds, 1))
            self.record(section, "wal_syncs_s_" + mode, "evictd", float(wal1[1] - wal0[1]) / seconds)
            extra = ""
            if proc:
                cpu = proc.cpu() - cpu0
                self.record(section, "evictd_cpu_pct_" + mode, "evictd", cpu / seconds * 100)
                extra = ", evictd CPU %.0f%% of a core" % (cpu / seconds * 100)
            if drain:
                drain.finish()
                left = self.sql("SELECT count(*) FROM bench_outbox")[0][0]
                self.record(section, "backlog_" + mode, "evictd", left)
                extra = ", drained %d rows in %d statements, rows left %d" % (drain.rows, drain.statements, left)
            if mode == "durable":
                backlog = self.sql("SELECT count(*) FROM evictd.outbox")[0][0]
                self.record(section, "backlog_durable", "evictd", backlog)
                extra += ", outbox rows left at the end %d" % backlog
            self.record(section, "tps_" + mode, "evictd", tps)
            log("  capture %-15s: %.0f TPS%s" % (mode, tps, extra))
        finally:
            if proc:
                self.stop_worker(proc)
            if drain and drain.is_alive():
                drain.halt.set()
                drain.join(timeout=30)

    # -- 4. bulk and the 10k figure --------------------------------------------------------------
    def bulk_run(self, kind, n):
        who = "peer" if kind == "peer" else "evictd"
        proc = self.start_worker(kind)
        try:
            self.preload(range(1, n + 1))
            seq0 = self.sql("SELECT last_value FROM evictd.outbox_id_seq")[0][0]
            conn = self.pg.connect()
            with conn.cursor() as cur:
                t = time.monotonic()
                cur.execute("UPDATE products SET stock = stock + 1 WHERE id BETWEEN 1 AND %s", (n,))
                updated = cur.rowcount
                # The statement's outbox rows, counted before commit, before evictd can claim them
                # (ids taken would also count the two the one-row path takes back).
                cur.execute("SELECT count(*) FROM evictd.outbox WHERE id > %s", (seq0,))
                rows = cur.fetchone()[0]
                conn.commit()
                t_commit = time.monotonic()
            conn.close()
            t_gone = self.wait_keys_gone(timeout=120, interval=0.0005, proc=proc)
            if t_gone is None:
                raise HarnessError("bulk: %d keys left after 120 s" % self.r.dbsize())
            made = rows if kind == "durable" else updated
            self.record("bulk", "ms", who, (t_gone - t_commit) * 1000.0)
            self.record("bulk", "stmt_ms", who, (t_commit - t) * 1000.0)
            self.record("bulk", "made", who, made)
            log("  %s: %d-row UPDATE took %.0f ms; commit to last key gone %.1f ms; %s %d"
                % (proc.name, updated, (t_commit - t) * 1000, (t_gone - t_commit) * 1000,
                   "outbox rows" if kind == "durable" else "NOTIFYs", made))
        finally:
            self.stop_worker(proc)

    def tenk_run(self, n):
        proc = self.start_worker("durable")
        try:
            self.preload(range(1, n + 1))
            conn = self.pg.connect(autocommit=True)
            t_first = time.monotonic()
            with conn.cursor() as cur:
                for i in range(1, n + 1):
                    cur.execute("UPDATE products SET stock = stock + 1 WHERE id = %s", (i,))
            t_last = time.monotonic()
            conn.close()
            t_gone = self.wait_keys_gone(timeout=60, interval=0.0005, proc=proc)
            if t_gone is None:
                raise HarnessError("10k: %d keys left after 60 s" % self.r.dbsize())
            hwm = proc.status()["VmHWM"] / 1024.0
            self.record("tenk", "ms", "evictd", (t_gone - t_last) * 1000.0)
            self.record("tenk", "hwm_mb", "evictd", hwm)
            self.record("tenk", "write_rate", "evictd", n / (t_last - t_first))
            log("  evictd: %d sequential commits at %.0f/s; last commit to last key gone %.1f ms; VmHWM %.1f MB"
                % (n, n / (t_last - t_first), (t_gone - t_last) * 1000, hwm))
        finally:
            self.stop_worker(proc)

    # -- driver ---------------------------------------------------------------------------------
    def guarded(self, what, fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except Exception as exc:  # noqa: BLE001 - one failed repetition must not lose the others
            log("FAILED %s: %s" % (what, exc))
            traceback.print_exc(file=sys.stderr)
            self.notes.append("%s failed: %s" % (what, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
            return None

    def run(self):
        a = self.args
        reps = a.reps
        sz = a.sizes
        sections = set(a.only.split(",")) if a.only else set(SECTIONS)
        variants = a.fsync_variants and a.fsync == "off"

        if sections & {"burst", "durable", "ceiling"}:
            self.reset_products(max(sz["burst"], sz["durable"]))
        if "burst" in sections:
            self.durability(a.fsync)
            log("1. burst drain: %d NOTIFY payloads, %d repetitions" % (sz["burst"], reps))
            self.set_capture("notify")
            for rep in range(reps):
                for kind in ("notify", "peer"):
                    self.guarded("burst %s rep %d" % (kind, rep + 1), self.drain_run, kind, sz["burst"], "burst",
                                 perf=a.perf and rep == 0 and kind == "notify")
        if "durable" in sections:
            self.set_capture("durable")
            for section, fs in (("outbox", a.fsync), ("outbox_fsync", "on")):
                if section == "outbox_fsync" and not variants:
                    continue
                self.durability(fs)
                log("1. durable outbox drain: %d outbox rows, fsync=%s, %d repetitions" % (sz["durable"], fs, reps))
                for rep in range(reps):
                    self.clear_outbox()
                    self.sql("VACUUM products")
                    self.guarded("durable drain fsync=%s rep %d" % (fs, rep + 1), self.drain_run, "durable",
                                 sz["durable"], section, perf=a.perf and rep == 0 and section == "outbox")
        if "ceiling" in sections:
            log("1. Redis ceiling: pipelined UNLINK of %d keys, 512 per command" % sz["ceiling"])
            for rep in range(reps):
                v = self.guarded("redis ceiling", self.redis_ceiling, sz["ceiling"])
                if v:
                    self.record("ceiling", "keys_s", "redis", v)
                    log("  redis: %.0f keys/s" % v)
        if "latency" in sections:
            rate, secs = sz["lat_rate"], sz["lat_seconds"]
            need = int(rate * secs * (reps + 1)) + 1
            if (self.products_rows or 0) < need:
                self.reset_products(max(need, 100000))
            for section, fs, conns in (("latency", a.fsync, a.lat_conns or (1 if a.fsync == "off" else 16)),
                                       ("latency_fsync", "on", 16)):
                if section == "latency_fsync" and not variants:
                    continue
                self.durability(fs)
                log("2. latency at %d commits/s for %ss from %d connection(s), fsync=%s, %d repetitions"
                    % (rate, secs, conns, fs, reps))
                for rep in range(reps):
                    for kind in ("durable", "peer"):
                        self.set_capture("durable" if kind == "durable" else "notify")
                        self.guarded("latency %s fsync=%s rep %d" % (kind, fs, rep + 1), self.latency_run, kind,
                                     rate, secs, rep, section, conns)
        if "write" in sections:
            self.reset_products(sz["pgbench_rows"])
            for fs in a.write_fsync.split(","):
                self.durability(fs)
                log("3. write path: pgbench -c 8 -j 2 -T %d, single-row UPDATE on %d rows, fsync=%s, %d repetitions"
                    % (sz["pgbench_seconds"], sz["pgbench_rows"], fs, a.write_reps))
                for rep in range(a.write_reps):
                    # Each repetition starts one mode later: a mode does not always follow the same
                    # one (what a mode leaves, WAL, dead rows, the machine's drift, falls on all alike).
                    k = rep % len(WRITE_MODES)
                    for mode in WRITE_MODES[k:] + WRITE_MODES[:k]:
                        self.guarded("write path %s fsync=%s rep %d" % (mode, fs, rep + 1), self.write_path_run,
                                     mode, sz["pgbench_seconds"], "write_" + fs)
        self.durability(a.fsync)
        if "bulk" in sections:
            if self.products_rows != sz["bulk"]:
                self.reset_products(sz["bulk"])
            log("4. bulk: one UPDATE of %d rows, %d repetitions" % (sz["bulk"], reps))
            for rep in range(reps):
                for kind in ("durable", "peer"):
                    self.set_capture("durable" if kind == "durable" else "notify")
                    self.clear_outbox()
                    self.sql("VACUUM products")
                    self.guarded("bulk %s rep %d" % (kind, rep + 1), self.bulk_run, kind, sz["bulk"])
        if "tenk" in sections:
            if (self.products_rows or 0) < sz["tenk"]:
                self.reset_products(sz["tenk"])
            self.set_capture("durable")
            log("10k figure: %d sequential single-row commits, %d repetitions" % (sz["tenk"], reps))
            for rep in range(reps):
                self.clear_outbox()
                self.guarded("10k rep %d" % (rep + 1), self.tenk_run, sz["tenk"])

    def server_info(self):
        rows = self.sql("SELECT name, setting FROM pg_settings WHERE name IN "
                        "('fsync','synchronous_commit','shared_buffers','max_wal_size','wal_sync_method',"
                        "'server_version','max_notify_queue_pages') ORDER BY name")
        info = {k: v for k, v in rows}
        info["redis_version"] = self.r.info("server").get("redis_version")
        return info

    def cleanup(self):
        _stop_all()
        try:
            self.admin.close()
        except Exception:  # noqa: BLE001
            pass
        self.rd.cleanup()
        self.pg.cleanup()
        if self.args.keep:
            log("work dir kept: %s" % self.work)
        else:
            import shutil
            shutil.rmtree(self.work, ignore_errors=True)


with open(os.path.join(HERE, "bare_capture.sql")) as _f:
    BARE_FN = _f.read()


# ------------------------------------------------------------------------------------------ report

def med(xs):
    return statistics.median(xs) if xs else None


def fmt(x, unit=""):
    if x is None:
        return "n/a"
    ax = abs(x)
    if ax >= 10000:
        s = "{:,.0f}".format(x)
    elif ax >= 100:
        s = "%.0f" % x
    elif ax >= 10:
        s = "%.1f" % x
    elif ax >= 1:
        s = "%.2f" % x
    else:
        s = "%.3f" % x
    return s + unit


def cell(xs, unit=""):
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return fmt(xs[0], unit) + " (1 run)"
    return "%s (%s–%s)" % (fmt(med(xs), unit), fmt(min(xs)), fmt(max(xs)))


def ratio_cell(a, b):
    """Ratio of medians a/b, with the min–max of paired per-repetition ratios."""
    if not a or not b or not med(b):
        return "n/a"
    r = med(a) / med(b)
    pairs = [x / y for x, y in zip(a, b) if y]
    s = "%.2f×" % r
    if len(pairs) > 1:
        s += " (%.2f–%.2f)" % (min(pairs), max(pairs))
    return s


def verdict(ok):
    return "" if ok is None else (" **met**" if ok else " **not met**")


def report(b, elapsed):
    R = b.results
    g = lambda sec, met, who="evictd": R.get(sec, {}).get(met, {}).get(who, [])  # noqa: E731
    sz = b.args.sizes
    fs = b.args.fsync
    n = "{:,}".format
    out = []
    info = b.server_info()
    src = b.src_at_start
    out.append("## evictd benchmark (%s, %d repetition%s, %.1f min)\n"
               % ("quick" if b.args.quick else "full", b.args.reps, "" if b.args.reps == 1 else "s", elapsed / 60))
    out.append("Machine: %d CPUs, %s, load average %s at start and %s at end. PostgreSQL %s (wal_sync_method=%s, "
               "shared_buffers=%s×8kB, max_wal_size=%s MB; fsync=%s and synchronous_commit=%s unless a row says "
               "otherwise), Redis %s; evictd %s, source tree %s. Cells: median (min–max); ratios: ratio of the "
               "medians (min–max of the per-repetition ratios).\n"
               % (os.cpu_count(), platform.platform(), b.load_start,
                  " ".join("%.2f" % x for x in os.getloadavg()), info.get("server_version"),
                  info.get("wal_sync_method"), info.get("shared_buffers"), info.get("max_wal_size"), fs,
                  b.args.synchronous_commit, info.get("redis_version"), b.args.evictd, src or "?"))

    out.append("| # | figure | evictd | peer | evictd/peer | goal |")
    out.append("|---|---|---|---|---|---|")

    def row(num, name, ev, pe="—", ratio="", goal=""):
        out.append("| %s | %s | %s | %s | %s | %s |" % (num, name, ev, pe, ratio, goal))

    def both(num, name, sec, met, goal="", ok=None):
        e, p = g(sec, met), g(sec, met, "peer")
        if not e and not p:
            return
        row(num, name, cell(e), cell(p), ratio_cell(e, p), goal + (verdict(ok(e, p)) if ok and e and p else ""))

    ceil = med(g("ceiling", "keys_s", "redis"))
    er, pr = g("burst", "rate"), g("burst", "rate", "peer")
    if er or pr:
        both("1", "burst drain of %s NOTIFYs (notify-only watch), changes/s" % n(sz["burst"]), "burst", "rate",
             "≥ 2× peer", lambda e, p: med(e) >= 2 * med(p))
        if ceil:
            row("1", "… as a fraction of the Redis ceiling (product keys/s ÷ ceiling keys/s)",
                "%.1f%%" % (100 * med(er) / ceil) if er else "n/a",
                "%.1f%%" % (100 * med(pr) / ceil) if pr else "n/a")
        both("1", "burst CPU per change, µs (worker process, user+sys)", "burst", "cpu_us", "≤ 0.5× peer",
             lambda e, p: med(e) <= 0.5 * med(p))
        both("1", "burst peak RSS, VmHWM MB", "burst", "hwm_mb")
        both("1", "burst peak RssAnon MB (sampled every 10 ms)", "burst", "anon_peak_mb", "evictd ≤ 10 MB",
             lambda e, p: max(e) <= 10)
        both("1", "RssAnon 1 s after the drain, MB", "burst", "anon_after_mb", "flat afterwards")
    for sec, label in (("outbox", "fsync=%s" % fs), ("outbox_fsync", "fsync=on")):
        orate = g(sec, "rate")
        if not orate:
            continue
        orr = med(orate) / med(pr) if pr else None
        row("1", "durable outbox drain of %s rows (%s), rows/s until all keys gone and outbox empty"
            % (n(sz["durable"]), label), cell(orate), "—", ("%.2f× the peer's burst rate" % orr) if orr else "",
            "≥ peer burst rate" + verdict(orr >= 1 if orr else None))
        row("1", "… time to all keys gone / to outbox empty, s",
            "%s / %s" % (cell(g(sec, "keys_gone_s")), cell([sz["durable"] / r for r in orate])))
        row("1", "… evictd CPU per change, µs", cell(g(sec, "cpu_us")))
        oa = g(sec, "anon_peak_mb")
        row("1", "… VmHWM / peak RssAnon / RssAnon 1 s after, MB",
            "%s / %s / %s" % (cell(g(sec, "hwm_mb")), cell(oa), cell(g(sec, "anon_after_mb"))), "—", "",
            "RssAnon ≤ 10 MB" + verdict(max(oa) <= 10 if oa else None))
    if ceil:
        row("1", "Redis ceiling: pipelined UNLINK of pre-loaded keys, 512 per command, keys/s",
            cell(g("ceiling", "keys_s", "redis")), "", "", "")

    lat_conns = b.args.lat_conns or (1 if fs == "off" else 16)
    for sec, label in (("latency", "fsync=%s, %d writer connection%s" % (fs, lat_conns, "" if lat_conns == 1 else "s")),
                       ("latency_fsync", "fsync=on, 16 writer connections")):
        if not (g(sec, "p50_ms") or g(sec, "p50_ms", "peer")):
            continue
        for met, name in (("p50_ms", "p50"), ("p99_ms", "p99"), ("max_ms", "max")):
            both("2", "latency commit→key gone at %d/s (%s), %s ms" % (sz["lat_rate"], label, name), sec, met,
                 "≤ 2 ms" if met == "p99_ms" else "", (lambda e, p: med(e) <= 2) if met == "p99_ms" else None)
        row("2", "… achieved commit rate /s; writer's commit p50 ms; changes never seen deleted",
            "%s; %s; %s" % (cell(g(sec, "rate")), cell(g(sec, "commit_ms_p50")), cell(g(sec, "missing"))),
            "%s; %s; %s" % (cell(g(sec, "rate", "peer")), cell(g(sec, "commit_ms_p50", "peer")),
                            cell(g(sec, "missing", "peer"))))

    if g("bulk", "ms") or g("bulk", "ms", "peer"):
        both("4", "bulk UPDATE of %s rows: commit → last key gone, ms" % n(sz["bulk"]), "bulk", "ms",
             "< 1000 ms (evictd)", lambda e, p: med(e) < 1000)
        em = g("bulk", "made")
        row("4", "… outbox rows (evictd, durable) / NOTIFYs (peer, notify-only) it made", cell(em),
            cell(g("bulk", "made", "peer")), "",
            "≪ %s" % n(sz["bulk"]) + verdict(med(em) < sz["bulk"] / 10 if em else None))
        both("4", "… the UPDATE statement itself (capture cost inside the write), ms", "bulk", "stmt_ms")
    if g("tenk", "ms"):
        row("10k", "last of %s sequential single-row commits → last key gone, ms (durable)" % n(sz["tenk"]),
            cell(g("tenk", "ms")))
        row("10k", "… evictd VmHWM MB; the client's commit rate /s",
            "%s; %s" % (cell(g("tenk", "hwm_mb")), cell(g("tenk", "write_rate"))))

    for wfs in b.args.write_fsync.split(","):
        sec = "write_" + wfs
        if not R.get(sec):
            continue
        out.append("")
        out.append("Write path, fsync=%s, synchronous_commit=%s: pgbench -c 8 -j 2 -T %d -M prepared, a single-row "
                   "UPDATE of a random row of %s; %d repetitions, each starting one mode later. The peer's capture "
                   "is evictd's notify-only one (a per-row NOTIFY trigger). evictd CPU is its own process only."
                   % (wfs, b.args.synchronous_commit, sz["pgbench_seconds"], n(sz["pgbench_rows"]),
                      b.args.write_reps))
        out.append("")
        out.append("| capture | TPS | vs no capture | vs bare outbox trigger | vs bare trigger, drained "
                   "| WAL bytes per transaction | WAL flushes /s | evictd CPU, % of a core | goal |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        none_, bare, drained = g(sec, "tps_none"), g(sec, "tps_bare"), g(sec, "tps_bare_drained")
        labels = (("none", "no trigger"),
                  ("bare", "bare outbox trigger (plpgsql AFTER ROW, one jsonb row, nothing drains it)"),
                  ("bare_drained", "bare outbox trigger, its table drained by a bare SQL loop (no evictd, "
                                   "no Redis: the control for draining)"),
                  ("durable_trigger", "evictd durable capture, evictd not running (trigger cost only)"),
                  ("durable", "evictd durable (default), evictd running and draining"),
                  ("notify", "evictd notify-only (per-row NOTIFY), evictd running"))
        for mode, label in labels:
            t = g(sec, "tps_" + mode)
            goal = ""
            if mode in ("durable", "durable_trigger"):
                r = med(t) / med(bare) if t and bare else None
                goal = "≥ 0.90× bare" + (" (%.3f)" % r if r else "") + verdict(r >= 0.9 if r else None)
            left = g(sec, "backlog_" + mode)
            if left and max(left) > 0:
                goal += "; rows left at the end %s" % cell(left)
            out.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                label, cell(t), ratio_cell(t, none_) if mode != "none" else "1",
                ratio_cell(t, bare) if mode != "bare" else "1",
                ratio_cell(t, drained) if mode in ("durable", "durable_trigger") else "",
                cell(g(sec, "wal_bytes_tx_" + mode)), cell(g(sec, "wal_syncs_s_" + mode)),
                cell(g(sec, "evictd_cpu_pct_" + mode)) if mode in ("durable", "notify") else "", goal.lstrip("; ")))
    if b.notes:
        out.append("")
        out.append("Notes:")
        for note in b.notes:
            out.append("- " + note)
    for what, flat in b.perf_reports:
        out.append("")
        out.append("perf profile of evictd during %s (self time, top entries):" % what)
        out.append("```")
        out.append(flat)
        out.append("```")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ helper roles

def role_probe(argv):
    """Subscribes to keyspace events of routex:1:product_*; on SIGTERM writes {id: first del time}."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-seconds", type=float, default=120)
    a = ap.parse_args(argv)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    pat = b"__keyspace@0__:routex:1:product_*"
    s = socket.create_connection(("127.0.0.1", a.port), timeout=10)
    s.sendall(b"*2\r\n$10\r\nPSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(pat), pat))
    first = b""
    while b"psubscribe" not in first or not first.endswith(b"\r\n:1\r\n"):
        data = s.recv(4096)
        if not data:
            raise SystemExit("probe: connection closed")
        first += data
    s.setblocking(False)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    chunks = []
    deadline = time.monotonic() + a.max_seconds
    while not stop and time.monotonic() < deadline:
        try:
            r, _, _ = select.select([s], [], [], 0.2)
        except InterruptedError:
            continue
        if r:
            try:
                data = s.recv(1 << 18)
            except BlockingIOError:
                continue
            t = time.monotonic()
            if not data:
                break
            chunks.append((t, data))
    ends = []
    pos = 0
    for t, d in chunks:
        pos += len(d)
        ends.append(pos)
    buf = b"".join(d for _, d in chunks)
    gone = {}
    for m in re.finditer(rb"__keyspace@0__:routex:1:product_(\d+)\r\n\$\d+\r\n(\w+)\r\n", buf):
        if m.group(2) != b"del":
            continue
        i = int(m.group(1))
        if i not in gone:
            gone[i] = chunks[bisect.bisect_left(ends, m.end())][0]
    with open(a.out, "w") as f:
        json.dump(gone, f)


def role_writer(argv):
    """Paced single-row autocommit UPDATEs of ids first..first+count-1; writes commit times.

    Change k is due at t0 + k/rate and goes out on connection k % conns (one thread each), so
    several connections can sustain the rate when one commit takes longer than 1/rate.
    """
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--first", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--conns", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    conns = []
    for _ in range(a.conns):
        c = psycopg2.connect(a.dsn, connect_timeout=10, application_name="bench_writer")
        c.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
        conns.append(c)
    results = [[] for _ in conns]
    t0 = time.monotonic() + 0.1
    bound = t0 + a.count / a.rate * 2 + 30

    def worker(j):
        cur = conns[j].cursor()
        out = results[j]
        for k in range(j, a.count, a.conns):
            target = t0 + k / a.rate
            now = time.monotonic()
            if now > bound:
                break
            if target > now:
                time.sleep(target - now)
            ts = time.monotonic()
            cur.execute("UPDATE products SET stock = stock + 1 WHERE id = %s", (a.first + k,))
            t = time.monotonic()
            out.append((a.first + k, t, (t - ts) * 1000))

    threads = [threading.Thread(target=worker, args=(j,), daemon=True) for j in range(a.conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, bound - time.monotonic() + 10))
    elapsed = time.monotonic() - t0
    rows = sorted((x for r in results for x in r), key=lambda x: x[1])
    durations = sorted(x[2] for x in rows)
    with open(a.out, "w") as f:
        json.dump({"commits": [(i, t) for i, t, _ in rows], "elapsed": elapsed,
                   "commit_ms_p50": durations[len(durations) // 2] if durations else None}, f)


# ------------------------------------------------------------------------------------------ main

SECTIONS = ("burst", "durable", "ceiling", "latency", "write", "bulk", "tenk")
WRITE_MODES = ("none", "bare", "bare_drained", "durable_trigger", "durable", "notify")
FULL = {"burst": 1000000, "durable": 1000000, "ceiling": 1000000, "lat_rate": 2000, "lat_seconds": 10,
        "pgbench_rows": 100000, "pgbench_seconds": 10, "bulk": 100000, "tenk": 10000}
QUICK = {"burst": 50000, "durable": 20000, "ceiling": 200000, "lat_rate": 2000, "lat_seconds": 2,
         "pgbench_rows": 100000, "pgbench_seconds": 2, "bulk": 20000, "tenk": 2000}


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_probe":
        return role_probe(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_writer":
        return role_writer(sys.argv[2:])
    ap = argparse.ArgumentParser(description="evictd vs a Python peer worker: burst, latency, write path, bulk.")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run of about two minutes")
    ap.add_argument("--reps", type=int, help="repetitions per figure (default 3; 1 with --quick)")
    ap.add_argument("--evictd", default=os.environ.get("EVICTD_BIN") or os.path.join(ROOT, "build-bench", "evictd"),
                    help="evictd binary (default build-bench/evictd, built when missing)")
    ap.add_argument("--burst", type=int, help="override the burst size N")
    ap.add_argument("--durable", type=int, help="override the durable outbox drain size")
    ap.add_argument("--write-reps", type=int,
                    help="repetitions of the write path (default 5; 1 with --quick): pgbench on a shared machine "
                         "swings by a fifth between runs of one mode")
    ap.add_argument("--only", help="comma list of sections: burst,durable,ceiling,latency,write,bulk,tenk")
    ap.add_argument("--fsync", default="off", choices=("on", "off"),
                    help="fsync for burst, outbox drain, latency, bulk and 10k (default off, as the test harness)")
    ap.add_argument("--no-fsync-variants", dest="fsync_variants", action="store_false",
                    help="skip the extra fsync=on runs of the outbox drain and the latency")
    ap.add_argument("--write-fsync", default="on,off", help="fsync settings for the write path (default on,off)")
    ap.add_argument("--synchronous-commit", default="on", choices=("on", "off", "local"))
    ap.add_argument("--lat-conns", type=int, help="writer connections for the main latency run (default 1)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (configs, logs, probe data)")
    ap.add_argument("--evictd-log-level", default="warn", choices=("debug", "info", "warn", "error"),
                    help="evictd's log level (default warn; info adds a line per batch and, at exit, the counts of "
                         "doorbells, idle flags set, claims and rows claimed)")
    ap.add_argument("--perf", nargs="?", const="fp", choices=("fp", "dwarf"),
                    help="perf record evictd during the first burst and outbox drain (call graphs by frame pointer, "
                         "or dwarf); the report gets the top of `perf report`")
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args()
    args.sizes = dict(QUICK if args.quick else FULL)
    if args.burst:
        args.sizes["burst"] = args.burst
    if args.durable:
        args.sizes["durable"] = args.durable
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    if args.write_reps is None:
        args.write_reps = 1 if args.quick else 5
    if args.reps < 1 or args.write_reps < 1:
        ap.error("--reps and --write-reps must be at least 1")

    if not os.path.exists(args.evictd):
        build = os.path.dirname(args.evictd)
        log("building %s" % args.evictd)
        subprocess.run(["cmake", "-S", ROOT, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DEVD_WERROR=ON"],
                       check=True, stdout=subprocess.DEVNULL, timeout=600)
        subprocess.run(["cmake", "--build", build, "--target", "evictd", "-j2"], check=True,
                       stdout=subprocess.DEVNULL, timeout=1800)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load_start = " ".join("%.2f" % x for x in os.getloadavg())
    src = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True,
                         text=True).stdout.strip() or "?"
    built = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(args.evictd)))
    b = Bench(args)
    b.load_start = load_start
    b.src_at_start = "%s at the start (binary built %s)" % (src, built)
    t = time.monotonic()
    try:
        b.run()
        text = report(b, time.monotonic() - t)
        print(text)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"sizes": args.sizes, "reps": args.reps, "results": b.results, "notes": b.notes,
                           "server": b.server_info(),
                           "perf": b.perf_reports}, f, indent=1)
    finally:
        b.cleanup()


if __name__ == "__main__":
    main()
