"""test_security.py: row values cannot steer SQL or widen deletes, and a NOTIFY flood cannot grow memory."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Postgres, Redis, evictd_bin, repo_root, wait_until  # noqa: E402
from test_daemon import Evictd, SANITIZER_MARKS  # noqa: E402

SCHEMA = r"""
CREATE TABLE drivers (id int PRIMARY KEY, user_id int NOT NULL, name text NOT NULL);
CREATE TABLE shipments (id int PRIMARY KEY, driver_name text);
CREATE TABLE pages (id int PRIMARY KEY, slug text NOT NULL);
CREATE TABLE pings (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
"""

# Names that would change the statement if they were ever pasted into SQL.
EVIL = [
    "x'; DROP TABLE drivers; --",
    "$1",
    "back\\slash \\' ''",
    "\" OR 1=1 --",
    "7k:" + "y" * 7000,
]

RULES = [
    {"table": "shipments",
     "lookups": [{"as": "uid", "sql": "SELECT user_id FROM drivers WHERE name = $1", "args": ["driver_name"]}],
     "keys": ["sec:driver_{uid}"]},
    {"table": "pages", "keys": ["sec:page_{slug}"], "patterns": ["sec:frag_{slug}:*"]},
    {"table": "pings", "keys": ["sec:ping_{id}"], "durable": False},
]


class SecurityTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.root = tempfile.mkdtemp(prefix="evictd-test-security-")
        cls.pg = Postgres()
        cls.rd = Redis()
        cls.pg.psql(file=os.path.join(repo_root(), "sql", "install.sql"))
        cls.pg.psql(SCHEMA)
        cls.cfg = {
            "postgres": {"url": cls.pg.dsn(), "poll_interval_ms": 100},
            "redis": {"default": {"url": cls.rd.url(0), "timeout_ms": 60000}},
            "rules": RULES,
            "batch": {"max_pending": 500},
            "retry": {"max_attempts": 1000, "initial_backoff_ms": 10, "max_backoff_ms": 100},
            "dead_letter": {"path": os.path.join(cls.root, "dl.jsonl")},
            "log": {"format": "json", "stats_interval_s": 1},
        }
        cfg_path = os.path.join(cls.root, "sql.json")
        with open(cfg_path, "w") as f:
            json.dump(cls.cfg, f)
        out = subprocess.run([evictd_bin(), "sql", "--config", cfg_path], check=True, capture_output=True,
                             text=True, timeout=30).stdout
        cls.pg.psql(out)

    @classmethod
    def tearDownClass(cls):
        cls.rd.cleanup()
        cls.pg.cleanup()
        shutil.rmtree(cls.root, ignore_errors=True)

    def setUp(self):
        self.r = self.rd.client()
        self.r.flushall()
        self.d = Evictd(self.root, self.cfg, name=self._testMethodName)
        self.d.start()
        self.d.wait_log("connected", 15, where=lambda rec: rec.get("conn") == "outbox")
        wait_until(lambda: int(self.pg.psql("SELECT last_value FROM evictd.idle").strip()) >= 1, timeout=15,
                   what="evictd idle")

    def tearDown(self):
        self.d.stop(timeout=15)
        text = self.d.text()
        for mark in SANITIZER_MARKS:
            self.assertNotIn(mark, text, self.d.tail(80))

    def settle(self):
        """Waits until evictd has applied and acknowledged every change so far."""
        wait_until(lambda: self.pg.psql("SELECT count(*) FROM evictd.outbox").strip() == "0", timeout=15,
                   what="outbox drained")

    def exec(self, sql, params=None):
        conn = self.pg.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
            conn.commit()
        finally:
            conn.close()

    def test_lookup_values_are_bound_never_pasted(self):
        self.exec("DELETE FROM shipments; DELETE FROM drivers")
        for i, name in enumerate(EVIL, start=1):
            self.exec("INSERT INTO drivers VALUES (%s, %s, %s)", (i, 1000 + i, name))
        self.settle()
        keys = ["sec:driver_%d" % (1000 + i) for i in range(1, len(EVIL) + 1)]
        for k in keys + ["sec:driver_other"]:
            self.r.set(k, "x")
        for i, name in enumerate(EVIL, start=1):
            self.exec("INSERT INTO shipments VALUES (%s, %s)", (i, name))
        # Each lookup found exactly its driver: the value travelled as a parameter.
        wait_until(lambda: self.r.exists(*keys) == 0, timeout=15, what="driver keys deleted")
        self.assertEqual(self.r.get("sec:driver_other"), b"x")
        self.assertEqual(self.pg.psql("SELECT count(*) FROM drivers").strip(), str(len(EVIL)))
        self.assertEqual(self.d.count("widened"), 0, self.d.tail())
        self.assertEqual(self.d.count("lookup_failed"), 0, self.d.tail())

    def test_nul_in_a_payload_is_bad_input(self):
        self.r.set("sec:ping_5", "x")
        payload = '{"v":1,"id":null,"schema":"public","table":"pings","op":"INSERT","new":{"id":"a\\u0000b"}}'
        self.exec("SELECT pg_notify('evictd', %s)", (payload,))
        self.d.wait_log("bad_input", 10)
        self.exec("INSERT INTO pings VALUES (5, 1) ON CONFLICT (id) DO UPDATE SET n = pings.n + 1")
        wait_until(lambda: self.r.exists("sec:ping_5") == 0, timeout=10, what="next change still works")

    def test_forged_notify_for_a_durable_table_is_refused(self):
        # pages is watched durably: its capture only rings an empty doorbell. A full change sent
        # by NOTIFY (any role may NOTIFY) must not delete anything.
        self.r.set("sec:page_forged", "x")
        payload = ('{"v":1,"id":null,"schema":"public","table":"pages","op":"UPDATE",'
                   '"old":{"slug":"forged"},"new":{"slug":"forged"}}')
        self.exec("SELECT pg_notify('evictd', %s)", (payload,))
        self.d.wait_log("bad_input", 10, where=lambda rec: rec.get("table") == "public.pages")
        time.sleep(0.3)
        self.assertEqual(self.r.get("sec:page_forged"), b"x")
        # the real capture still works
        self.exec("INSERT INTO pages VALUES (99, 'forged') ON CONFLICT (id) DO UPDATE SET slug = 'forged'")
        wait_until(lambda: self.r.exists("sec:page_forged") == 0, timeout=10, what="real change applied")

    def test_row_value_star_never_widens(self):
        self.exec("DELETE FROM pages")
        self.exec("INSERT INTO pages VALUES (1, 'a'), (2, 'b')")
        self.settle()
        keep = ["sec:page_a", "sec:page_b", "sec:frag_a:1", "sec:frag_b:1", "sec:page_x?", "unrelated"]
        for k in keep + ["sec:page_*", "sec:frag_*:1", "sec:page_[ab]"]:
            self.r.set(k, "x")
        self.exec("INSERT INTO pages VALUES (3, '*'), (4, '[ab]')")
        wait_until(lambda: self.r.exists("sec:page_*", "sec:page_[ab]", "sec:frag_*:1") == 0, timeout=10,
                   what="literal star keys deleted")
        time.sleep(0.3)
        for k in keep:
            self.assertEqual(self.r.get(k), b"x", "%s was deleted by a row value" % k)
        # TRUNCATE widens on purpose, within the templates' literal prefixes only.
        self.exec("TRUNCATE pages")
        wait_until(lambda: self.r.exists("sec:page_a") == 0, timeout=10, what="truncate widened")
        self.assertEqual(self.r.get("unrelated"), b"x")

    def test_notify_flood_is_bounded(self):
        # Redis frozen: nothing completes, so evictd must stop reading at max_pending.
        self.rd.sigstop()
        try:
            self.exec("DO $$ BEGIN FOR i IN 1..30000 LOOP PERFORM pg_notify('evictd', "
                      "format('{\"v\":1,\"id\":null,\"schema\":\"public\",\"table\":\"pings\",\"op\":\"INSERT\","
                      "\"new\":{\"id\":%s,\"pad\":\"%s\"}}', i, repeat('p', 300))); END LOOP; END $$")
            peak = 0
            deadline = time.time() + 4
            while time.time() < deadline:
                with open("/proc/%d/status" % self.d.proc.pid) as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            peak = max(peak, int(line.split()[1]))
                time.sleep(0.05)
        finally:
            self.rd.sigcont()
        # 30,000 notifications of ~400 bytes are 12 MB; with max_pending 500 evictd holds few of them.
        self.assertLess(peak, 40 * 1024, "RssAnon peaked at %d kB" % peak)
        self.assertTrue(self.d.running())
        pending = [r.get("pending") for r in self.d.records() if r.get("msg") == "stats"]
        self.assertTrue(pending and max(p for p in pending if p is not None) <= 500 + 1, pending[-5:])


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    failed = len(result.failures) + len(result.errors)
    print("%d passed, %d failed" % (result.testsRun - failed - len(result.skipped), failed))
    sys.exit(1 if failed else 0)
