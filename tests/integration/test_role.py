#!/usr/bin/env python3
"""test_role.py: evictd end to end as the least-privilege role of sql/role.sql.

One throwaway PostgreSQL and Redis (127.0.0.1, free ports, temp dirs) serve the module:
  - sql/install.sql, then RouteX tables (products, drivers, shipments) with a few rows;
  - a RouteX-like config (the rules of config/routex.json; secrets as ${VAR} references),
    `evictd sql --config` applied as the superuser;
  - sql/role.sql with -v evictd_password=... -v lookup_tables='public.drivers';
  - pg_hba asks the evictd role for its password (scram-sha-256), so the password in
    DATABASE_URL really is what lets evictd in;
  - an application role `app` with DML on the three tables and no privilege on schema evictd.
Then: `evictd check --connect` as evictd exits 0; `evictd run` as evictd deletes the keys of
committed UPDATEs made by `app` (a shipments change included, whose lookup reads drivers) and
exits 0 on SIGTERM; the password never appears in evictd's output; and the evictd role cannot
UPDATE an application table (InsufficientPrivilege, "permission denied for table ...").

Run: python3 tests/integration/test_role.py [-v]
The binary is $EVICTD_BIN, else build/evictd, else it is built into build-role/. Every wait is
bounded; every process started here is stopped by PID. Prints "N passed, N failed" last and
exits non-zero on any failure.
"""

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402,F401  (may re-exec under /usr/bin/python3)
from harness import HarnessError, Postgres, Redis, repo_root, wait_until  # noqa: E402

import psycopg2  # noqa: E402
import psycopg2.errors  # noqa: E402

ROOT = repo_root()
INSTALL = os.path.join(ROOT, "sql", "install.sql")
ROLE = os.path.join(ROOT, "sql", "role.sql")
BUILD_DIR = os.path.join(ROOT, "build-role")

SCHEMA_SQL = """
CREATE TABLE products (id int PRIMARY KEY, name text, stock int NOT NULL DEFAULT 0);
CREATE TABLE drivers (id int PRIMARY KEY, user_id int, is_active bool NOT NULL DEFAULT true);
CREATE TABLE shipments (id int PRIMARY KEY, product_id int REFERENCES products, driver_id int REFERENCES drivers);
INSERT INTO products (id, name, stock) SELECT g, 'p' || g, 10 FROM generate_series(1, 5) AS g;
INSERT INTO drivers (id, user_id) VALUES (1, 101), (2, 102), (3, 103);
INSERT INTO shipments (id, product_id, driver_id) VALUES (1, 3, 1), (2, 5, NULL);
"""

# The application: DML on its tables, nothing on schema evictd (the capture is SECURITY DEFINER).
APP_SQL = """
CREATE ROLE app LOGIN;
GRANT SELECT, INSERT, UPDATE, DELETE ON products, drivers, shipments TO app;
"""

CACHE_PAGE = "routex:1:views.decorators.cache.cache_page.*"
CACHE_HEADER = "routex:1:views.decorators.cache.cache_header.*"

# The rules of config/routex.json.
RULES = [
    {"table": "public.products",
     "keys": ["routex:1:products_list", "routex:1:product_{id}"],
     "patterns": [CACHE_PAGE, CACHE_HEADER]},
    {"table": "public.shipments",
     "lookups": [{"as": "driver_user_id",
                  "sql": "SELECT user_id FROM drivers WHERE id = $1",
                  "args": ["driver_id"]}],
     "keys": ["routex:1:products_list", "routex:1:product_{product_id}",
              "routex:1:drivers_list", "routex:1:driver_status_{driver_user_id}"],
     "patterns": [CACHE_PAGE, CACHE_HEADER]},
    {"table": "public.drivers",
     "keys": ["routex:1:drivers_list", "routex:1:driver_status_{user_id}"],
     "patterns": [CACHE_PAGE, CACHE_HEADER]},
]

PL = "routex:1:products_list"
DL = "routex:1:drivers_list"
OTHER = "other:key"


def P(i):
    return "routex:1:product_%s" % i


def DS(user):
    return "routex:1:driver_status_%s" % user


def _md5(s):
    return hashlib.md5(s.encode()).hexdigest()


# Keys as Django's cache_page writes them (django/utils/cache.py, _generate_cache_key and
# _generate_cache_header_key): md5 of the absolute URL, md5 of the varied headers (none here),
# then the language and time zone (USE_I18N, USE_TZ), all under django-redis' "routex:1:".
_URL = "http://testserver/api/v1/products/"
CP = "routex:1:views.decorators.cache.cache_page..GET.%s.%s.en-us.UTC" % (_md5(_URL), _md5(""))
CH = "routex:1:views.decorators.cache.cache_header..%s.en-us.UTC" % _md5(_URL)

SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:", "SUMMARY: UndefinedBehavior")


def evictd_binary():
    """$EVICTD_BIN, else build/evictd, else build the evictd target into build-role/."""
    if os.environ.get("EVICTD_BIN"):
        return os.environ["EVICTD_BIN"]
    default = os.path.join(ROOT, "build", "evictd")
    if os.path.exists(default):
        return default
    built = os.path.join(BUILD_DIR, "evictd")
    for argv in (["cmake", "-S", ROOT, "-B", BUILD_DIR, "-DEVD_WERROR=ON"],
                 ["cmake", "--build", BUILD_DIR, "--target", "evictd"]):
        p = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        if p.returncode != 0:
            raise HarnessError("%s failed (%d):\n%s%s" % (" ".join(argv), p.returncode, p.stdout[-3000:], p.stderr[-3000:]))
    return built


class RoleTest(unittest.TestCase):
    pg = None
    rd = None
    proc = None

    @classmethod
    def setUpClass(cls):
        try:
            cls._set_up()
        except BaseException:
            cls.tearDownClass()  # unittest skips it when setUpClass fails
            raise

    @classmethod
    def _set_up(cls):
        cls.bin = evictd_binary()
        if not os.path.exists(cls.bin):
            raise HarnessError("no evictd binary at %s" % cls.bin)
        cls.tmp = tempfile.mkdtemp(prefix="evictd-test-role-")
        # Hex only: safe in a URL without escaping, and distinctive enough to grep for.
        cls.password = "evdpw" + secrets.token_hex(12)
        cls.pg = Postgres()
        cls.rd = Redis()
        cls.pg.psql(file=INSTALL)
        cls.pg.psql(SCHEMA_SQL)
        cls.pg.psql(APP_SQL)

        cls.env = dict(os.environ)
        for k in ("PGPASSWORD", "PGUSER", "PGHOST", "PGPORT", "PGDATABASE", "PGSERVICE", "PGPASSFILE"):
            cls.env.pop(k, None)
        cls.env["PGPASSFILE"] = os.devnull  # no ~/.pgpass may supply the password instead
        cls.env["DATABASE_URL"] = "postgresql://evictd:%s@127.0.0.1:%d/postgres" % (cls.password, cls.pg.port)
        cls.env["REDIS_URL"] = cls.rd.url(1)
        cls.env["EVICTD_DEAD_LETTER"] = os.path.join(cls.tmp, "dead-letter.jsonl")

        cls.cfg = os.path.join(cls.tmp, "routex.json")
        with open(cls.cfg, "w") as f:
            json.dump({
                "postgres": {"url": "${DATABASE_URL}", "channels": ["evictd"], "poll_interval_ms": 100},
                "redis": {"default": {"url": "${REDIS_URL}", "password": "${REDIS_PASSWORD:-}",
                                      "timeout_ms": 2000}},
                "rules": RULES,
                "retry": {"max_attempts": 20, "initial_backoff_ms": 10, "max_backoff_ms": 200},
                "dead_letter": {"path": "${EVICTD_DEAD_LETTER}"},
                "log": {"format": "json", "level": "info", "stats_interval_s": 1},
                "shutdown_timeout_ms": 3000,
            }, f, indent=1)

        # The capture, installed by the superuser exactly as the README says.
        p = cls.evictd("sql", "--config", cls.cfg)
        if p.returncode != 0:
            raise HarnessError("evictd sql failed (%d): %s" % (p.returncode, p.stderr))
        cls.pg.psql(p.stdout)
        # The least-privilege role.
        cls.pg.psql(file=ROLE, variables={"evictd_password": cls.password, "lookup_tables": "public.drivers"})
        # Make the server check evictd's password (initdb's default here is trust).
        hba = os.path.join(cls.pg.data, "pg_hba.conf")
        with open(hba) as f:
            text = f.read()
        with open(hba, "w") as f:  # rewritten in place: owner and mode stay
            f.write("host all evictd 127.0.0.1/32 scram-sha-256\n" + text)
        cls.pg.psql("SELECT pg_reload_conf()")

        def password_required():
            try:
                psycopg2.connect(host="127.0.0.1", port=cls.pg.port, user="evictd", dbname="postgres",
                                 password="wrong", connect_timeout=5).close()
                return False
            except psycopg2.OperationalError as exc:
                return "password authentication failed" in str(exc)
        wait_until(password_required, timeout=10, what="pg_hba.conf reload (scram-sha-256 for evictd)")

    @classmethod
    def tearDownClass(cls):
        cls.stop_daemon()
        if cls.rd:
            cls.rd.cleanup()
        if cls.pg:
            cls.pg.cleanup()
        shutil.rmtree(getattr(cls, "tmp", "/nonexistent"), ignore_errors=True)

    # -- helpers -------------------------------------------------------------------------------
    @classmethod
    def evictd(cls, *args, timeout=60):
        return subprocess.run([cls.bin] + list(args), capture_output=True, text=True, timeout=timeout,
                              env=cls.env, stdin=subprocess.DEVNULL, cwd=cls.tmp)

    @classmethod
    def stop_daemon(cls, timeout=15.0):
        """SIGTERM by PID, wait up to timeout, then SIGKILL. Returns the exit status (None: killed)."""
        proc = cls.proc
        if proc is None:
            return None
        if proc.poll() is not None:
            return proc.returncode
        os.kill(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            return None

    def connect_as(self, user, password=None):
        conn = psycopg2.connect(host="127.0.0.1", port=self.pg.port, user=user, dbname="postgres",
                                password=password, connect_timeout=10)
        return conn

    def q1(self, sql, *args):
        conn = self.pg.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchone()[0]
        finally:
            conn.close()

    def app(self, *stmts):
        """Commits statements in one transaction as the application role."""
        conn = self.connect_as("app")
        try:
            with conn.cursor() as cur:
                for s in stmts:
                    cur.execute(s)
            conn.commit()
        finally:
            conn.close()

    def r(self):
        return self.rd.client(db=1)

    def fill(self, keys):
        p = self.r().pipeline(transaction=False)
        for k in keys:
            p.set(k, "cached")
        p.execute()

    def present(self, keys):
        p = self.r().pipeline(transaction=False)
        for k in keys:
            p.exists(k)
        return [k for k, e in zip(keys, p.execute()) if e]

    def log_text(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def records(self):
        out = []
        for line in self.log_text().splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def tail(self, n=60):
        lines = self.log_text().splitlines()
        return "--- evictd stderr (last %d of %d lines) ---\n%s\n--- end ---" % (
            min(n, len(lines)), len(lines), "\n".join(lines[-n:]))

    def wait(self, pred, timeout, what):
        deadline = time.monotonic() + timeout
        while True:
            v = pred()
            if v:
                return v
            if self.proc is not None and self.proc.poll() is not None:
                self.fail("evictd exited (status %s) while waiting for %s\n%s" % (self.proc.returncode, what, self.tail()))
            if time.monotonic() >= deadline:
                self.fail("timed out after %.1fs waiting for %s\n%s" % (timeout, what, self.tail()))
            time.sleep(0.05)

    def step(self, stmt, gone, survive, timeout=15.0):
        """Fills gone+survive, commits stmt as the app role, waits for gone to go, checks survive."""
        self.fill(list(gone) + list(survive))
        n_before = sum(1 for r in self.records() if r.get("msg") == "invalidated")
        self.app(stmt)
        self.wait(lambda: not self.present(list(gone)), timeout, "keys %s to go after %r" % (list(gone), stmt))
        self.wait(lambda: sum(1 for r in self.records() if r.get("msg") == "invalidated") > n_before, 5,
                  "an invalidated log line after %r" % stmt)
        time.sleep(0.3)
        left = [k for k in survive if k not in self.present(list(survive))]
        self.assertEqual(left, [], "keys deleted that should have survived %r\n%s" % (stmt, self.tail()))

    def assert_no_password(self, text, where):
        self.assertNotIn(self.password, text, "the evictd password appears in %s" % where)

    # -- tests ---------------------------------------------------------------------------------
    def test_1_role_has_only_its_grants(self):
        """role.sql: evictd may read the outbox and the lookup table, nothing else of the app's;
        the app role has no privilege on schema evictd."""
        self.assertFalse(self.q1("SELECT has_schema_privilege('app', 'evictd', 'USAGE')"))
        self.assertFalse(self.q1("SELECT rolsuper OR rolcreatedb OR rolcreaterole OR rolbypassrls "
                                 "FROM pg_roles WHERE rolname = 'evictd'"))
        privs = "SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER"
        for tbl in ("public.products", "public.shipments"):
            self.assertFalse(self.q1("SELECT has_any_column_privilege('evictd', %s, 'SELECT, INSERT, UPDATE, REFERENCES') "
                                     "OR has_table_privilege('evictd', %s, %s)", tbl, tbl, privs), tbl)
        self.assertTrue(self.q1("SELECT has_table_privilege('evictd', 'public.drivers', 'SELECT')"))
        self.assertFalse(self.q1("SELECT has_table_privilege('evictd', 'public.drivers', "
                                 "'INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER')"))
        self.assertTrue(self.q1("SELECT has_table_privilege('evictd', 'evictd.outbox', 'SELECT, UPDATE, DELETE')"))
        self.assertFalse(self.q1("SELECT has_table_privilege('evictd', 'evictd.outbox', 'INSERT')"))
        # The password is checked: a wrong one is refused.
        with self.assertRaises(psycopg2.OperationalError) as cm:
            self.connect_as("evictd", "not-" + self.password).close()
        self.assertIn("password authentication failed", str(cm.exception))

    def test_2_cannot_update_application_tables(self):
        """The evictd role cannot change application data (issue 6, must show)."""
        conn = self.connect_as("evictd", self.password)
        try:
            for stmt, table in (("UPDATE products SET stock = 0", "products"),
                                ("UPDATE drivers SET is_active = false", "drivers"),
                                ("DELETE FROM shipments", "shipments"),
                                ("INSERT INTO products (id) VALUES (99)", "products")):
                with self.subTest(stmt=stmt):
                    with conn.cursor() as cur:
                        with self.assertRaises(psycopg2.errors.InsufficientPrivilege) as cm:
                            cur.execute(stmt)
                    conn.rollback()
                    self.assertEqual(cm.exception.pgcode, "42501")
                    self.assertIn("permission denied for table %s" % table, str(cm.exception))
            # ... while what it needs works: the lookup table and the outbox.
            with conn.cursor() as cur:
                cur.execute("SELECT user_id FROM drivers WHERE id = 1")
                self.assertEqual(cur.fetchone()[0], 101)
                cur.execute("SELECT id FROM evictd.outbox ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED")
            conn.rollback()
        finally:
            conn.close()
        self.assertEqual(self.q1("SELECT sum(stock) FROM products"), 50)

    def test_3_check_connect_as_role(self):
        p = self.evictd("check", "--connect", "--config", self.cfg)
        out = p.stdout + p.stderr
        self.assertEqual(p.returncode, 0, "evictd check --connect as evictd exited %d:\n%s" % (p.returncode, out))
        self.assert_no_password(out, "the output of evictd check --connect")

    def test_4_run_end_to_end_as_role(self):
        cls = type(self)
        self.r().flushdb()
        self.assertEqual(self.q1("SELECT count(*) FROM evictd.outbox"), 0)
        self.log_path = os.path.join(self.tmp, "run.stderr")
        with open(self.log_path, "wb") as log:
            cls.proc = subprocess.Popen([self.bin, "run", "--config", self.cfg], stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=log, env=self.env, cwd=self.tmp)
        try:
            for conn in ("listen", "outbox"):
                self.wait(lambda: any(r.get("msg") == "connected" and r.get("conn") == conn for r in self.records()),
                          20, "connected conn=%s" % conn)
            self.wait(lambda: self.q1("SELECT last_value FROM evictd.idle") >= 1, 20, "evictd's idle flag")
            # It is connected as evictd, not as anyone else.
            self.assertEqual(self.q1("SELECT count(*) FROM pg_stat_activity WHERE usename = 'evictd'") >= 2, True)

            bystanders = [OTHER, "routex:2:product_1", DS(103)]
            # A product's stock: its keys and the cache_page/cache_header entries.
            self.step("UPDATE products SET stock = stock - 1 WHERE id = 2",
                      [PL, P(2), CP, CH], [P(1), P(3), DL, DS(101)] + bystanders)
            # A shipment moves to another product and another driver: both products, both
            # drivers' statuses (the lookup reads drivers, which evictd may SELECT).
            self.step("UPDATE shipments SET product_id = 4, driver_id = 2 WHERE id = 1",
                      [PL, P(3), P(4), DL, DS(101), DS(102), CP, CH], [P(1), P(2), P(5)] + bystanders)
            # A shipment without a driver: no driver_status key, nothing widened.
            self.step("UPDATE shipments SET product_id = 1 WHERE id = 2",
                      [PL, P(5), P(1), DL, CP], [P(2), DS(101), DS(102)] + bystanders)
            # A driver's status.
            self.step("UPDATE drivers SET is_active = false WHERE id = 3",
                      [DL, DS(103), CP], [PL, P(1), DS(101), DS(102), OTHER, "routex:2:product_1"])
            self.wait(lambda: self.q1("SELECT count(*) FROM evictd.outbox") == 0, 15, "an empty outbox")
            msgs = [r.get("msg") for r in self.records()]
            for bad in ("widened", "lookup_failed", "claim_failed", "ack_failed", "idle_flag_failed",
                        "capture_mismatch", "dead_letter", "bad_input"):
                self.assertNotIn(bad, msgs, self.tail())
        finally:
            rc = cls.stop_daemon()
        text = self.log_text()
        self.assertEqual(rc, 0, "evictd did not exit 0 on SIGTERM (status %s)\n%s" % (rc, self.tail()))
        self.assertIn("shutdown", [r.get("msg") for r in self.records()])
        self.assert_no_password(text, "evictd's stderr")
        for mark in SANITIZER_MARKS:
            self.assertNotIn(mark, text, self.tail(120))
        self.assertFalse(os.path.exists(self.env["EVICTD_DEAD_LETTER"])
                         and os.path.getsize(self.env["EVICTD_DEAD_LETTER"]) > 0, "dead letters written")


def main():
    runner = unittest.TextTestRunner(verbosity=2 if "-v" in sys.argv else 1)
    prog = unittest.main(exit=False, testRunner=runner, verbosity=2 if "-v" in sys.argv else 1)
    r = prog.result
    failed = len({t.id() for t, _ in r.failures + r.errors} | {t.id() for t in r.unexpectedSuccesses})
    passed = max(0, r.testsRun - failed - len(r.skipped))
    print("%d passed, %d failed" % (passed, failed))
    sys.exit(0 if failed == 0 and r.wasSuccessful() else 1)


if __name__ == "__main__":
    main()
