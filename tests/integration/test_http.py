"""test_http.py: /healthz, /readyz and /metrics of a running evictd, against real servers."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Postgres, Redis, evictd_bin, free_port, repo_root, wait_until  # noqa: E402

SCHEMA = """
CREATE TABLE products (id int PRIMARY KEY, stock int NOT NULL DEFAULT 0);
INSERT INTO products SELECT g, 0 FROM generate_series(1, 10) g;
"""


def get(url, timeout=5):
    """(status, body) of a GET with curl, as an operator or a probe would make it."""
    p = subprocess.run(["curl", "-sS", "--max-time", str(timeout), "-o", "-", "-w", "\n%{http_code}", url],
                       capture_output=True, text=True, timeout=timeout + 5)
    if p.returncode != 0:
        raise OSError("curl %s: %s" % (url, p.stderr.strip()))
    body, _, code = p.stdout.rpartition("\n")
    return int(code), body


def metric(text, name, labels=""):
    """Value of one sample, e.g. metric(t, 'evictd_changes_total', '{table="public.products",op="UPDATE"}')."""
    for line in text.splitlines():
        if line.startswith(name + labels + " "):
            return float(line.split()[-1])
    return None


class HttpTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.pg = Postgres()
        cls.rd = Redis()
        cls.pg.psql(file=os.path.join(repo_root(), "sql", "install.sql"))
        cls.pg.psql(SCHEMA)
        cls.tmp = tempfile.mkdtemp(prefix="evictd-http-")
        cls.http_port = free_port()
        cls.password = "s3cret-http-pw"
        cls.cfg = os.path.join(cls.tmp, "config.json")
        # The Redis target carries a password in its URL: it must never reach a log line.
        cls.rd.client().execute_command("CONFIG", "SET", "requirepass", cls.password)
        with open(cls.cfg, "w") as f:
            json.dump({
                "postgres": {"url": cls.pg.dsn()},
                "redis": {"default": {"url": "redis://:%s@127.0.0.1:%d/0" % (cls.password, cls.rd.port),
                                      "timeout_ms": 300}},
                "rules": [{"table": "products", "keys": ["p:{id}", "plist"]}],
                "retry": {"max_attempts": 1000, "initial_backoff_ms": 10, "max_backoff_ms": 100},
                "dead_letter": {"path": os.path.join(cls.tmp, "dl.jsonl")},
                "http": {"listen": "127.0.0.1:%d" % cls.http_port},
                "log": {"stats_interval_s": 1},
            }, f)
        sql = subprocess.run([evictd_bin(), "sql", "--config", cls.cfg], check=True, capture_output=True,
                             text=True, timeout=30).stdout
        cls.pg.psql(sql)
        cls.log = open(os.path.join(cls.tmp, "evictd.log"), "w+")
        cls.proc = subprocess.Popen([evictd_bin(), "run", "--config", cls.cfg], stdin=subprocess.DEVNULL,
                                    stdout=cls.log, stderr=cls.log)
        cls.base = "http://127.0.0.1:%d" % cls.http_port
        wait_until(lambda: cls._ready(), timeout=20, what="evictd /readyz 200")

    @classmethod
    def _ready(cls):
        try:
            return get(cls.base + "/readyz", timeout=1)[0] == 200
        except OSError:
            return False

    @classmethod
    def tearDownClass(cls):
        if cls.proc.poll() is None:
            cls.proc.send_signal(signal.SIGTERM)
            try:
                cls.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                cls.proc.kill()
                cls.proc.wait(timeout=5)
        cls.log.close()
        cls.rd.cleanup()
        cls.pg.cleanup()
        with open(cls.log.name) as f:
            text = f.read()
        for mark in ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:"):
            if mark in text:
                raise AssertionError("sanitizer report in evictd's log:\n" + text[-4000:])
        if cls.proc.returncode != 0:
            raise AssertionError("evictd exited with %s after SIGTERM" % cls.proc.returncode)
        shutil.rmtree(cls.tmp, ignore_errors=True)  # kept above when a check failed, for its log

    def redis(self):
        return self.rd.client(password=self.password)

    def test_healthz_and_404(self):
        self.assertEqual(get(self.base + "/healthz"), (200, "ok\n"))
        code, _ = get(self.base + "/nope")
        self.assertEqual(code, 404)

    def test_metrics_counters_move(self):
        r = self.redis()
        code, before = get(self.base + "/metrics")
        self.assertEqual(code, 200)
        upd = metric(before, "evictd_changes_total", '{table="public.products",op="UPDATE"}') or 0
        keys = metric(before, "evictd_keys_deleted_total", '{target="default"}')
        self.assertIsNotNone(keys)
        lag_n = metric(before, "evictd_lag_seconds_count")
        for i in range(1, 4):
            r.set("p:%d" % i, "x")
        for i in range(1, 4):
            self.pg.psql("UPDATE products SET stock = stock + 1 WHERE id = %d" % i)
        wait_until(lambda: r.exists("p:1", "p:2", "p:3") == 0, timeout=10, what="keys deleted")

        def moved():
            t = get(self.base + "/metrics")[1]
            return (metric(t, "evictd_changes_total", '{table="public.products",op="UPDATE"}') or 0) >= upd + 3
        wait_until(moved, timeout=5, what="changes counter")
        after = get(self.base + "/metrics")[1]
        self.assertGreaterEqual(metric(after, "evictd_keys_deleted_total", '{target="default"}'), keys + 3)
        self.assertGreaterEqual(metric(after, "evictd_lag_seconds_count"), lag_n + 3)
        self.assertIsNotNone(metric(after, "evictd_pending"))
        self.assertIsNotNone(metric(after, "evictd_outbox_backlog"))
        self.assertIsNotNone(metric(after, "evictd_reconnects_total", '{conn="listen"}'))
        self.assertIsNotNone(metric(after, "evictd_dead_letters_total", '{reason="retries_exhausted"}'))
        self.assertIn("# TYPE evictd_lag_seconds histogram", after)

    def test_dashboard_metrics_exist(self):
        names_file = os.path.join(repo_root(), "deploy", "grafana", "metrics.txt")
        if not os.path.exists(names_file):
            self.skipTest("deploy/grafana/metrics.txt not present")
        # One change first, so the per-table counters have a sample.
        self.redis().set("p:7", "x")
        self.pg.psql("UPDATE products SET stock = stock + 1 WHERE id = 7")
        wait_until(lambda: self.redis().exists("p:7") == 0, timeout=10, what="p:7 deleted")
        # The key can go from the doorbell's payload before the row is claimed, and a change is
        # counted when its row is claimed: wait for the count, not only for the key.
        wait_until(lambda: metric(get(self.base + "/metrics")[1], "evictd_changes_total",
                                  '{table="public.products",op="UPDATE"}') is not None,
                   timeout=5, what="evictd_changes_total sample")
        text = get(self.base + "/metrics")[1]
        served = {line.split("{")[0].split()[0] for line in text.splitlines() if line and not line.startswith("#")}
        with open(names_file) as f:
            names = [line.split()[0] for line in f if line.strip() and not line.startswith("#")]
        self.assertGreaterEqual(len(names), 10)
        for name in names:
            self.assertIn(name, served, "dashboard metric %s is not served" % name)

    def test_readyz_follows_redis(self):
        self.assertEqual(get(self.base + "/readyz")[0], 200)
        self.rd.stop()
        try:
            # A change makes evictd try Redis and notice it is gone.
            self.pg.psql("UPDATE products SET stock = stock + 1 WHERE id = 5")
            wait_until(lambda: get(self.base + "/readyz")[0] == 503, timeout=10, what="/readyz 503")
            code, body = get(self.base + "/readyz")
            self.assertEqual(code, 503)
            self.assertIn("redis default", body)
        finally:
            self.rd.start()
            self.rd.client().execute_command("CONFIG", "SET", "requirepass", self.password)
        wait_until(lambda: get(self.base + "/readyz")[0] == 200, timeout=20, what="/readyz 200 again")

    def test_slow_and_bad_clients_do_not_stall(self):
        # A client that connects and says nothing, and one that sends a huge head.
        idle = socket.create_connection(("127.0.0.1", self.http_port), timeout=5)
        big = socket.create_connection(("127.0.0.1", self.http_port), timeout=5)
        try:
            big.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000)
            resp = big.recv(200)
            self.assertIn(b"431", resp)
            self.assertEqual(get(self.base + "/healthz")[0], 200)
            bad = socket.create_connection(("127.0.0.1", self.http_port), timeout=5)
            bad.sendall(b"garbage\r\n\r\n")
            self.assertIn(b"400", bad.recv(200))
            bad.close()
        finally:
            idle.close()
            big.close()

    def test_listen_on_a_name(self):
        """http.listen takes a host name (resolved once at start); one that does not resolve stops
        evictd with exit 1 and an error naming the setting."""
        with open(self.cfg) as f:
            cfg = json.load(f)
        port = free_port()
        cfg["http"]["listen"] = "localhost:%d" % port
        cfg["dead_letter"]["path"] = os.path.join(self.tmp, "dl-named.jsonl")
        path = os.path.join(self.tmp, "named.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        with open(os.path.join(self.tmp, "named.log"), "w+") as log:
            proc = subprocess.Popen([evictd_bin(), "run", "--config", path], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log)
            try:  # localhost's IPv4 address
                wait_until(lambda: self._get_ok("http://127.0.0.1:%d/healthz" % port), timeout=20,
                           what="/healthz on localhost")
            finally:
                proc.send_signal(signal.SIGTERM)
                self.assertEqual(proc.wait(timeout=15), 0)
        cfg["http"]["listen"] = "no-such-host.invalid:%d" % port
        with open(path, "w") as f:
            json.dump(cfg, f)
        p = subprocess.run([evictd_bin(), "run", "--config", path], stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=60)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn("http.listen", p.stderr)
        self.assertIn("no-such-host.invalid", p.stderr)

    @staticmethod
    def _get_ok(url):
        try:
            return get(url, timeout=1)[0] == 200
        except OSError:
            return False

    def test_zz_no_password_in_logs(self):
        self.log.flush()
        with open(self.log.name) as f:
            text = f.read()
        self.assertIn("msg=connected", text)
        self.assertNotIn(self.password, text)


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    failed = len(result.failures) + len(result.errors)
    print("%d passed, %d failed" % (result.testsRun - failed - len(result.skipped), failed))
    sys.exit(1 if failed else 0)
