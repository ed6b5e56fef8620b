"""test_http.py: /healthz, /readyz and /metrics of a running evictd, against real servers."""

import contextlib
import json
import os
import re
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


def raw(port, request, timeout=5):
    """Everything the server sends back to one request written on a raw socket, up to its close."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk


# One sample line of the Prometheus text format: label values escape \\, \" and newline.
SAMPLE = re.compile(r'[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
                    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*")*\})? \S+')


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

    @contextlib.contextmanager
    def _second(self, name, change=None, binary=None, env=None):
        """A second evictd on this class's servers, with its own port, dead-letter file and log
        (yields (port, log path)); change(cfg) edits its config first. It must stop with 0."""
        with open(self.cfg) as f:
            cfg = json.load(f)
        port = free_port()
        cfg["http"]["listen"] = "127.0.0.1:%d" % port
        cfg["dead_letter"]["path"] = os.path.join(self.tmp, "dl-%s.jsonl" % name)
        if change:
            change(cfg)
        path = os.path.join(self.tmp, "%s.json" % name)
        with open(path, "w") as f:
            json.dump(cfg, f)
        log_path = os.path.join(self.tmp, "%s.log" % name)
        with open(log_path, "w+") as log:
            proc = subprocess.Popen([binary or evictd_bin(), "run", "--config", path], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, env=env)
            try:
                wait_until(lambda: self._get_ok("http://127.0.0.1:%d/readyz" % port), timeout=20,
                           what="/readyz of the second evictd")
                yield port, log_path
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                code = proc.wait(timeout=15)
        with open(log_path) as f:
            text = f.read()
        for mark in ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:"):
            self.assertNotIn(mark, text)
        self.assertEqual(code, 0, text[-4000:])

    def test_head_gets_the_get_headers_without_a_body(self):
        for path in (b"/healthz", b"/nope", b"/metrics"):
            with self.subTest(path=path):
                got = raw(self.http_port, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
                head = raw(self.http_port, b"HEAD %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
                got_head, _, got_body = got.partition(b"\r\n\r\n")
                head_head, sep, head_body = head.partition(b"\r\n\r\n")
                self.assertEqual(sep, b"\r\n\r\n", head)
                self.assertEqual(head_body, b"", head)
                self.assertEqual(head_head.split(b"\r\n")[0], got_head.split(b"\r\n")[0])
                if path != b"/metrics":  # its body changes between two requests
                    self.assertEqual(head_head, got_head)
                    self.assertIn(b"\r\nContent-Length: %d" % len(got_body), head_head)
                else:
                    self.assertRegex(head_head, rb"\r\nContent-Length: [1-9][0-9]*\r\n")

    def test_metrics_escape_label_values(self):
        """A target name may hold any character: \\, \" and newline are escaped in its labels, so
        every line of the scrape still parses."""
        weird = 'we"ird\\na\nme'
        url = "redis://:%s@127.0.0.1:%d/0" % (self.password, self.rd.port)

        def change(cfg):
            cfg["redis"][weird] = {"url": url}
        with self._second("weird", change) as (port, _):
            code, text = get("http://127.0.0.1:%d/metrics" % port)
        self.assertEqual(code, 200)
        for line in text.splitlines():
            if line and not line.startswith("#"):
                self.assertRegex(line, SAMPLE)
        escaped = 'we\\"ird\\\\na\\nme'
        self.assertIsNotNone(metric(text, "evictd_keys_deleted_total", '{target="%s"}' % escaped), text)
        self.assertIsNotNone(metric(text, "evictd_reconnects_total", '{conn="redis:%s"}' % escaped), text)

    def test_dead_letters_count_only_lines_written(self):
        """A bad payload is a dead letter (bad_payload); past dead_letter.max_bytes it is dropped,
        and then counted as dropped, in /metrics and in stats, not as a dead letter."""
        text = get(self.base + "/metrics")[1]
        before = metric(text, "evictd_dead_letters_total", '{reason="bad_payload"}')
        self.assertEqual(metric(text, "evictd_dead_letters_dropped_total"), 0)
        self.pg.psql("NOTIFY evictd, 'not json'")
        wait_until(lambda: metric(get(self.base + "/metrics")[1], "evictd_dead_letters_total",
                                  '{reason="bad_payload"}') == before + 1, timeout=10, what="a dead letter counted")

        def full(cfg):
            cfg["dead_letter"]["max_bytes"] = 1 << 20
            with open(cfg["dead_letter"]["path"], "w") as f:
                f.write(("{\"pad\":\"%s\"}\n" % ("x" * 1000)) * 1100)
        with self._second("full", full) as (port, log_path):
            dl = os.path.join(self.tmp, "dl-full.jsonl")
            size = os.path.getsize(dl)
            self.pg.psql("NOTIFY evictd, 'not json either'")
            url = "http://127.0.0.1:%d/metrics" % port
            wait_until(lambda: metric(get(url)[1], "evictd_dead_letters_dropped_total") == 1, timeout=10,
                       what="a dropped dead letter counted")
            self.assertEqual(metric(get(url)[1], "evictd_dead_letters_total", '{reason="bad_payload"}'), 0)
            self.assertEqual(os.path.getsize(dl), size)

            def stats():
                with open(log_path) as f:
                    return [line for line in f if "msg=stats" in line]
            wait_until(lambda: any(" dead_letters_dropped=1 " in line for line in stats()), timeout=10,
                       what="dead_letters_dropped=1 in a stats line")
            for line in stats():
                self.assertIn(" dead_letters=0 ", line)

    def test_accept_out_of_memory_keeps_listening(self):
        """evictd_oom (tests/oom/alloc_fail.c) fails every 2nd of evictd's own allocations: a
        connection that gets no memory is closed at once, and the listener keeps serving (it used
        to stop accepting for good)."""
        binary = os.path.join(os.path.dirname(os.path.abspath(evictd_bin())), "evictd_oom")
        if not os.path.exists(binary):
            self.skipTest("no evictd_oom next to %s" % evictd_bin())
        flag = os.path.join(self.tmp, "oom.on")
        with self._second("oom", binary=binary, env=dict(os.environ, EVD_OOM_FILE=flag)) as (port, log_path):
            with open(flag, "w") as f:
                f.write("2\n")
            try:
                refused = False
                for _ in range(300):
                    try:  # an answer or a closed connection both do; a stalled listener does not
                        raw(port, b"GET /healthz HTTP/1.1\r\n\r\n", timeout=3)
                    except ConnectionError:  # reset, or closed before the request was sent
                        pass
                    except socket.timeout:
                        self.fail("no answer and no close: the listener stalled")
                    with open(log_path) as f:
                        if "connection refused" in f.read():
                            refused = True
                            break
                self.assertTrue(refused, "no allocation failed at accept")
            finally:
                os.unlink(flag)
            # The file is looked at every 64 allocations: connections go on until it is seen.
            wait_until(lambda: self._get_ok("http://127.0.0.1:%d/healthz" % port), timeout=20,
                       what="/healthz 200 once allocations succeed again")

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
