#!/usr/bin/env python3
"""test_capture.py: checks sql/install.sql, role.sql and uninstall.sql against a real PostgreSQL (payload form, chunks, doorbell, privileges).

Run: python3 tests/integration/test_capture.py [-v] [TestClass.test_name ...]
Needs the PostgreSQL server binaries, psql and psycopg2 (deploy/install-deps.sh).
Prints "N passed, N failed" last; exits non-zero on any failure.
"""

import json
import os
import re
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# (importing harness may re-exec this script under /usr/bin/python3 for psycopg2)
from harness import Postgres, collect_notifies, evictd_bin, repo_root  # noqa: E402

import subprocess  # noqa: E402
import tempfile  # noqa: E402

import psycopg2  # noqa: E402
import psycopg2.errors  # noqa: E402

SQL_DIR = os.path.join(repo_root(), "sql")
INSTALL = os.path.join(SQL_DIR, "install.sql")
UNINSTALL = os.path.join(SQL_DIR, "uninstall.sql")
ROLE = os.path.join(SQL_DIR, "role.sql")

HEAD_KEYS = ["v", "id", "tx", "ts", "schema", "table", "op"]
FAST_CHANNEL = "evictd_fast"

SCHEMA_SQL = """
CREATE TABLE products (id serial PRIMARY KEY, name text, stock int, price numeric(10,2), weight real, active bool);
CREATE TABLE drivers (id serial PRIMARY KEY, user_id int, is_active bool, notes text);
CREATE TABLE shipments (id serial PRIMARY KEY, product_id int, driver_id int NULL, status text);
CREATE TABLE events (kind text, n int);                                  -- no primary key
CREATE TABLE pings (id serial PRIMARY KEY, val numeric, ratio double precision, flag bool, body text);
CREATE TABLE gadgets (id serial PRIMARY KEY, code text, size int, price numeric);
CREATE TABLE scratch (id int PRIMARY KEY, x int);
CREATE TABLE wide (id int PRIMARY KEY, %s);
CREATE ROLE app LOGIN;
GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA public TO app;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO app;
ALTER TABLE gadgets OWNER TO app;        -- app runs "migrations" on this one
""" % ", ".join("c%02d int" % i for i in range(1, 61))

WATCH_SQL = """
SELECT evictd.watch('products', ARRAY['id', 'name', 'stock', 'price', 'weight', 'active']);
SELECT evictd.watch('drivers', ARRAY['id', 'user_id', 'is_active']);
SELECT evictd.watch('shipments', ARRAY['id', 'product_id', 'driver_id']);
SELECT evictd.watch('events', ARRAY['kind', 'n']);
SELECT evictd.watch('pings', ARRAY['id', 'val', 'ratio', 'flag', 'body'], '%s', false);
SELECT evictd.watch('gadgets', ARRAY['id', 'code', 'size', 'price']);
SELECT evictd.watch('scratch', ARRAY['id', 'x']);
SELECT evictd.watch('wide', ARRAY['id', %s]);
""" % (FAST_CHANNEL, ", ".join("'c%02d'" % i for i in range(60, 0, -1)))


def strict_int(x):
    return type(x) is int


class CaptureTest(unittest.TestCase):
    pg = None

    @classmethod
    def setUpClass(cls):
        cls.pg = Postgres()
        cls.pg.psql(file=INSTALL)
        cls.pg.psql(file=INSTALL)  # idempotent
        cls.pg.psql(SCHEMA_SQL)
        cls.pg.psql(WATCH_SQL)
        cls.pg.psql(WATCH_SQL)  # idempotent
        cls.su = cls.pg.connect(autocommit=True)

    @classmethod
    def tearDownClass(cls):
        cls.su.close()
        cls.pg.cleanup()

    def setUp(self):
        self.q("DELETE FROM evictd.outbox")
        self.q("SELECT setval('evictd.idle', 0)")
        self.app = self.pg.connect(user="app")
        self._listeners = []

    def tearDown(self):
        self.app.close()
        for c in self._listeners:
            c.close()

    # -- helpers ----------------------------------------------------------
    def q(self, sql, args=None, conn=None):
        conn = conn or self.su
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else None

    def app_exec(self, *stmts):
        """Run statements as role app in one committed transaction; return the last result."""
        res = None
        with self.app.cursor() as cur:
            for s in stmts:
                cur.execute(s)
                res = cur.fetchall() if cur.description else None
        self.app.commit()
        return res

    def outbox(self, compact=False):
        """[(id, payload dict)] in id order; checks every payload is JSON with its own id and, when
        compact, that it has no blank outside its strings (the trigger writes compact JSON)."""
        out = []
        for oid, text in self.q("SELECT id, payload FROM evictd.outbox ORDER BY id"):
            p = json.loads(text)
            self.assertEqual(p["id"], oid, "payload id must be the outbox row id")
            if compact:
                self.assertNotRegex(re.sub(r'"(?:[^"\\]|\\.)*"', '""', text), r"\s", text)
            out.append((oid, p))
        return out

    def listen(self, channel):
        c = self.pg.connect(autocommit=True)
        self._listeners.append(c)
        self.q('LISTEN "%s"' % channel, conn=c)
        return c

    def assert_head(self, p, table, op, durable=True, extra=()):
        keys = list(p.keys())
        self.assertEqual(keys[:7], HEAD_KEYS, p)
        self.assertEqual(keys[7:], list(extra), p)
        self.assertEqual(p["v"], 1)
        self.assertTrue(strict_int(p["v"]))
        if durable:
            self.assertTrue(strict_int(p["id"]) and p["id"] > 0, p)
        else:
            self.assertIsNone(p["id"])
        self.assertTrue(strict_int(p["tx"]) and p["tx"] > 0, p)
        self.assertIn(type(p["ts"]), (int, float))
        self.assertLess(abs(p["ts"] - time.time() * 1000), 120000, "ts is epoch milliseconds")
        self.assertEqual(p["schema"], "public")
        self.assertEqual(p["table"], table)
        self.assertEqual(p["op"], op)

    def captures(self, oid):
        """Names of the capture functions of the table with this oid."""
        return [r[0] for r in self.q("SELECT proname FROM pg_proc WHERE pronamespace = 'evictd'::regnamespace "
                                     "AND (proname = %s OR proname LIKE %s) ORDER BY 1",
                                     ("capture_%s" % oid, "capture\\_%s\\_%%" % oid))]

    def triggers(self, table):
        return self.q("SELECT tgname, tgtype FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal "
                      "ORDER BY tgname", (table,))

    # -- payload form -----------------------------------------------------
    def test_insert_payload_types(self):
        res = self.app_exec("INSERT INTO products (name, stock, price, weight, active) "
                            "VALUES ('widget', 5, 3.5, 1e-7, true) RETURNING id, txid_current()")
        pid, tx = res[0]
        (oid, p), = self.outbox()
        self.assert_head(p, "products", "INSERT", extra=["rows"])
        self.assertEqual(p["tx"], tx)
        self.assertEqual(p["rows"], [{"new": {"id": pid, "name": "widget", "stock": 5, "price": "3.50",
                                             "weight": "1e-07", "active": True}}])
        img = p["rows"][0]["new"]
        self.assertEqual(list(img.keys()), ["id", "name", "stock", "price", "weight", "active"])
        self.assertTrue(strict_int(img["id"]) and strict_int(img["stock"]))
        self.assertIs(img["active"], True)

    def test_only_captured_columns_and_nulls(self):
        self.app_exec("INSERT INTO drivers (user_id, is_active, notes) VALUES (42, false, 'secret')")
        self.app_exec("INSERT INTO shipments (product_id, driver_id, status) VALUES (3, NULL, 'new')")
        (_, d), (_, s) = self.outbox()
        self.assertEqual(list(d["rows"][0]["new"].keys()), ["id", "user_id", "is_active"])
        self.assertIs(d["rows"][0]["new"]["is_active"], False)
        self.assertEqual(list(s["rows"][0]["new"].keys()), ["id", "product_id", "driver_id"])
        self.assertIsNone(s["rows"][0]["new"]["driver_id"])

    def test_update_delete_truncate(self):
        pid = self.app_exec("INSERT INTO products (name, stock, price, weight, active) "
                            "VALUES ('a', 1, 10, 0.5, true) RETURNING id")[0][0]
        self.q("DELETE FROM evictd.outbox")
        self.app_exec("UPDATE products SET stock = 2, price = 10.25 WHERE id = %d" % pid)
        self.app_exec("DELETE FROM products WHERE id = %d" % pid)
        self.app_exec("TRUNCATE products")
        (_, u), (_, d), (_, t) = self.outbox(compact=True)
        self.assert_head(u, "products", "UPDATE", extra=["rows"])
        old = {"id": pid, "name": "a", "stock": 1, "price": "10.00", "weight": "0.5", "active": True}
        new = dict(old, stock=2, price="10.25")
        self.assertEqual(u["rows"], [{"old": old, "new": new}])
        self.assertEqual(list(u["rows"][0].keys()), ["old", "new"])
        self.assert_head(d, "products", "DELETE", extra=["rows"])
        self.assertEqual(d["rows"], [{"old": new}])
        self.assert_head(t, "products", "TRUNCATE", extra=[])

    def test_zero_row_statement_writes_nothing(self):
        # ... and does not force a transaction id on a transaction that had none
        res = self.app_exec("UPDATE products SET stock = 0 WHERE false", "DELETE FROM shipments WHERE id < 0",
                            "SELECT txid_current_if_assigned()")
        self.assertEqual(res, [(None,)])
        self.assertEqual(self.outbox(), [])

    def test_install_repairs_stale_triggers(self):
        # As after a dump/restore that gave the table a new oid: triggers call another
        # capture function; and one trigger went missing. Re-running install.sql fixes both.
        oid = self.q("SELECT 'scratch'::regclass::oid")[0][0]
        self.q("ALTER FUNCTION evictd.capture_%s_update() RENAME TO capture_1" % oid)
        self.q("DROP TRIGGER evictd_truncate ON scratch")
        self.pg.psql(file=INSTALL)
        self.assertEqual(self.q("SELECT tgname, tgfoid::regproc::text FROM pg_trigger "
                                "WHERE tgrelid = 'scratch'::regclass ORDER BY 1"),
                         [("evictd_%s" % e, "evictd.capture_%s_%s" % (oid, e))
                          for e in ("delete", "insert", "truncate", "update")])
        self.assertEqual(self.q("SELECT to_regproc('evictd.capture_1')"), [(None,)])
        self.assertEqual(self.captures(oid), ["capture_%s_%s" % (oid, e) for e in ("delete", "insert", "truncate", "update")])
        self.app_exec("INSERT INTO scratch VALUES (77, 1)", "TRUNCATE scratch")
        self.assertEqual([p["op"] for _, p in self.outbox()], ["INSERT", "TRUNCATE"])

    def test_update_without_captured_change_reports(self):
        did = self.app_exec("INSERT INTO drivers (user_id, is_active) VALUES (7, true) RETURNING id")[0][0]
        self.q("DELETE FROM evictd.outbox")
        self.app_exec("UPDATE drivers SET notes = 'only an uncaptured column' WHERE id = %d" % did)
        (_, p), = self.outbox()
        img = {"id": did, "user_id": 7, "is_active": True}
        self.assertEqual(p["rows"], [{"old": img, "new": img}])

    def test_chunks_of_500_paired_by_pk(self):
        self.app_exec("INSERT INTO products (name, stock, price) "
                      "SELECT 'p' || g, g, g / 100.0 FROM generate_series(1, 1200) g")
        ins = self.outbox()
        self.assertEqual([len(p["rows"]) for _, p in ins], [500, 500, 200])
        self.q("DELETE FROM evictd.outbox")
        tx = self.app_exec("UPDATE products SET stock = stock + 1 WHERE name LIKE 'p%' RETURNING txid_current()")[0][0]
        chunks = self.outbox(compact=True)
        self.assertEqual([len(p["rows"]) for _, p in chunks], [500, 500, 200])
        seen = set()
        for _, p in chunks:
            self.assert_head(p, "products", "UPDATE", extra=["rows"])
            self.assertEqual(p["tx"], tx)
            for r in p["rows"]:
                self.assertEqual(list(r.keys()), ["old", "new"])
                self.assertEqual(r["old"]["id"], r["new"]["id"])
                self.assertEqual(r["new"]["stock"], r["old"]["stock"] + 1)
                seen.add(r["new"]["id"])
        self.assertEqual(len(seen), 1200)
        self.q("DELETE FROM evictd.outbox")
        self.app_exec("DELETE FROM products WHERE name LIKE 'p%'")
        self.assertEqual([len(p["rows"]) for _, p in self.outbox()], [500, 500, 200])

    def test_pk_change_is_unpaired(self):
        pid = self.app_exec("INSERT INTO products (name) VALUES ('mover') RETURNING id")[0][0]
        self.q("DELETE FROM evictd.outbox")
        self.app_exec("UPDATE products SET id = %d WHERE id = %d" % (pid + 100000, pid))
        (_, p), = self.outbox()
        self.assertEqual(sorted(p["rows"], key=lambda r: list(r)), sorted(
            [{"old": {"id": pid, "name": "mover", "stock": None, "price": None, "weight": None, "active": None}},
             {"new": {"id": pid + 100000, "name": "mover", "stock": None, "price": None, "weight": None,
                      "active": None}}], key=lambda r: list(r)))

    def test_table_without_pk_gives_unpaired_rows(self):
        self.app_exec("INSERT INTO events VALUES ('a', 1), ('b', 2)")
        self.q("DELETE FROM evictd.outbox")
        self.app_exec("UPDATE events SET n = n * 10")
        (_, p), = self.outbox()
        self.assert_head(p, "events", "UPDATE", extra=["rows"])
        olds = sorted(r["old"]["n"] for r in p["rows"] if "old" in r)
        news = sorted(r["new"]["n"] for r in p["rows"] if "new" in r)
        self.assertEqual((olds, news), ([1, 2], [10, 20]))
        self.assertTrue(all(len(r) == 1 for r in p["rows"]), "no pk: every entry carries one image")

    def test_statements_of_two_or_more_rows_leave_only_their_chunks(self):
        # The one-row path writes the first two rows of any statement; one of more rows takes
        # them back and writes its chunks. Rows earlier statements of the transaction wrote stay.
        self.q("INSERT INTO scratch SELECT g, 0 FROM generate_series(601, 605) AS g")
        self.q("DELETE FROM evictd.outbox")
        tx = self.app_exec("UPDATE scratch SET x = 1 WHERE id = 601",
                           "UPDATE scratch SET x = 2 WHERE id IN (602, 603)",
                           "INSERT INTO scratch VALUES (606, 6)",
                           "INSERT INTO scratch VALUES (607, 7), (608, 8), (609, 9)",
                           "DELETE FROM scratch WHERE id IN (604, 605)",
                           "DELETE FROM scratch WHERE id = 601",
                           "SELECT txid_current()")[0][0]
        got = [(p["op"], sorted(img["id"] for r in p["rows"] for img in r.values()), p["tx"])
               for _, p in self.outbox(compact=True)]
        self.assertEqual(got, [("UPDATE", [601, 601], tx), ("UPDATE", [602, 602, 603, 603], tx),
                               ("INSERT", [606], tx), ("INSERT", [607, 608, 609], tx),
                               ("DELETE", [604, 605], tx), ("DELETE", [601], tx)])
        self.q("DELETE FROM scratch WHERE id > 600")

    def test_stale_names_take_the_general_path(self):
        # A table renamed while the event trigger that regenerates its capture is away (a
        # non-superuser install has none): the one-row path's baked names are stale, so every
        # statement is written by the general path, which reads the names at run time.
        self.q("ALTER EVENT TRIGGER evictd_alter_table DISABLE")
        try:
            self.q("ALTER TABLE scratch RENAME TO scratch_r")
            self.app_exec("INSERT INTO scratch_r VALUES (701, 1)", "INSERT INTO scratch_r VALUES (702, 2), (703, 3)",
                          "UPDATE scratch_r SET x = 10 WHERE id = 701", "DELETE FROM scratch_r WHERE id > 700")
        finally:
            self.q("ALTER EVENT TRIGGER evictd_alter_table ENABLE")
            self.q("ALTER TABLE scratch_r RENAME TO scratch")
        got = [(p["table"], p["op"], sorted(img["id"] for r in p["rows"] for img in r.values()))
               for _, p in self.outbox(compact=True)]
        self.assertEqual(got, [("scratch_r", "INSERT", [701]), ("scratch_r", "INSERT", [702, 703]),
                               ("scratch_r", "UPDATE", [701, 701]), ("scratch_r", "DELETE", [701, 702, 703])])
        self.q("DELETE FROM evictd.outbox")
        self.app_exec("INSERT INTO scratch VALUES (704, 4)")
        (_, p), = self.outbox()
        self.assertEqual((p["table"], p["rows"]), ("scratch", [{"new": {"id": 704, "x": 4}}]))
        self.q("DELETE FROM scratch WHERE id > 700")

    def test_rollback_leaves_nothing(self):
        with self.app.cursor() as cur:
            cur.execute("INSERT INTO products (name) VALUES ('ghost')")
            cur.execute("UPDATE drivers SET notes = 'x'")
        self.app.rollback()
        self.assertEqual(self.outbox(), [])

    def test_large_value_durable(self):
        big = "x" * 20000
        self.app_exec("INSERT INTO products (name) VALUES ('%s')" % big)
        (_, p), = self.outbox()
        self.assertEqual(p["rows"][0]["new"]["name"], big)

    def test_large_value_notify_only_sends_ref(self):
        lc = self.listen(FAST_CHANNEL)
        self.app_exec("INSERT INTO pings (val, body) VALUES (1, '%s')" % ("y" * 20000))
        n, = collect_notifies(lc, timeout=2, want=1)
        p = json.loads(n.payload)
        self.assertEqual(p, {"v": 1, "id": None, "ref": True, "schema": "public", "table": "pings", "op": "INSERT"})
        self.assertEqual(list(p.keys()), ["v", "id", "ref", "schema", "table", "op"])
        self.assertEqual(collect_notifies(lc, timeout=0.3), [])
        self.assertEqual(self.outbox(), [])

    def test_notify_size_boundary(self):
        # Bodies around the limit, in one transaction (same tx, fixed-width ids): every
        # payload under 8000 bytes arrives whole, from 8000 bytes on a ref arrives.
        lc = self.listen(FAST_CHANNEL)
        self.app_exec("INSERT INTO pings (id, body) VALUES (1000000, 'm')")
        probe, = collect_notifies(lc, timeout=2, want=1)
        base = len(probe.payload.encode()) - 1
        lengths = list(range(8000 - base - 12, 8000 - base + 12))
        self.app_exec("INSERT INTO pings (id, body) VALUES %s"
                      % ", ".join("(%d, repeat('b', %d))" % (1000001 + i, n) for i, n in enumerate(lengths)))
        got = collect_notifies(lc, timeout=3, want=len(lengths))
        got += collect_notifies(lc, timeout=0.3)
        whole, refs = {}, []
        for note in got:
            p = json.loads(note.payload)
            if p.get("ref"):
                refs.append(p)
            else:
                whole[len(p["new"]["body"])] = len(note.payload.encode())
        # PostgreSQL folds identical payloads within a transaction: the refs arrive once.
        self.assertEqual(len(refs), 1, refs)
        self.assertIn(7999, whole.values(), whole)
        self.assertTrue(all(sz < 8000 for sz in whole.values()), whole)
        self.assertEqual(sorted(whole), [n for n in lengths if n <= max(whole)], "whole below the limit, refs above")
        self.assertLess(max(whole), max(lengths))
        self.app_exec("DELETE FROM pings WHERE id >= 1000000")

    def test_non_superuser_installer(self):
        # A database owner that is no superuser installs evictd for its own tables.
        self.q("CREATE ROLE owner LOGIN")
        self.q("CREATE DATABASE owned OWNER owner")
        try:
            self.pg.psql(file=INSTALL, user="owner", db="owned")
            self.pg.psql(file=INSTALL, user="owner", db="owned")
            out = self.pg.psql("CREATE TABLE t (id int PRIMARY KEY, v numeric);"
                               "SELECT evictd.watch('t', ARRAY['id', 'v']);"
                               "INSERT INTO t VALUES (1, 2.50);"
                               "SELECT payload::json->'rows' FROM evictd.outbox;"
                               "SELECT count(*) FROM pg_event_trigger;"
                               "SELECT DISTINCT pg_get_userbyid(proowner) FROM pg_proc "
                               " WHERE pronamespace = 'evictd'::regnamespace;",
                               user="owner", db="owned")
            self.assertEqual([line for line in out.split("\n") if line], ['[{"new":{"id":1,"v":"2.50"}}]', "0", "owner"])
            self.pg.psql(file=UNINSTALL, user="owner", db="owned")
            self.pg.psql(file=UNINSTALL, user="owner", db="owned")
            self.assertEqual(self.pg.psql("SELECT to_regnamespace('evictd') IS NULL, count(*) FROM pg_trigger "
                                          "WHERE tgname LIKE 'evictd%'", db="owned").strip(), "t|0")
        finally:
            self.q("DROP DATABASE IF EXISTS owned")
            self.q("DROP ROLE owner")

    def test_notify_only_row_payloads(self):
        lc = self.listen(FAST_CHANNEL)
        ids = [r[0] for r in self.app_exec(
            "INSERT INTO pings (val, ratio, flag) VALUES (1.50, 0.1, true), (2, 1e-7, false) RETURNING id")]
        self.app_exec("UPDATE pings SET val = 3 WHERE id = %d" % ids[0])
        self.app_exec("DELETE FROM pings WHERE id = %d" % ids[1])
        self.app_exec("TRUNCATE pings")
        got = collect_notifies(lc, timeout=3, want=5)
        self.assertEqual(len(got), 5, [n.payload for n in got])
        self.assertTrue(all(n.channel == FAST_CHANNEL for n in got))
        ps = [json.loads(n.payload) for n in got]
        i1 = {"id": ids[0], "val": "1.50", "ratio": "0.1", "flag": True, "body": None}
        i2 = {"id": ids[1], "val": "2", "ratio": "1e-07", "flag": False, "body": None}
        self.assert_head(ps[0], "pings", "INSERT", durable=False, extra=["new"])
        self.assert_head(ps[1], "pings", "INSERT", durable=False, extra=["new"])
        self.assertEqual([ps[0]["new"], ps[1]["new"]], [i1, i2])
        self.assert_head(ps[2], "pings", "UPDATE", durable=False, extra=["old", "new"])
        self.assertEqual((ps[2]["old"], ps[2]["new"]), (i1, dict(i1, val="3")))
        self.assert_head(ps[3], "pings", "DELETE", durable=False, extra=["old"])
        self.assertEqual(ps[3]["old"], i2)
        self.assert_head(ps[4], "pings", "TRUNCATE", durable=False, extra=[])
        self.assertEqual(self.outbox(), [], "notify-only writes nothing to the outbox")
        self.assertEqual(sorted(t[0] for t in self.triggers("pings")),
                         ["evictd_delete", "evictd_insert", "evictd_truncate", "evictd_update"])

    def test_rewatch_switches_mode_cleanly(self):
        def shape():
            # tgtype bit 0: FOR EACH ROW
            return [(name, tgtype & 1) for name, tgtype in self.triggers("scratch")]
        durable_shape = [("evictd_delete", 0), ("evictd_insert", 0), ("evictd_truncate", 0), ("evictd_update", 0)]
        self.assertEqual(shape(), durable_shape)
        try:
            self.q("SELECT evictd.watch('scratch', ARRAY['x'], 'other', false)")
            self.assertEqual(shape(), [("evictd_delete", 1), ("evictd_insert", 1), ("evictd_truncate", 0),
                                       ("evictd_update", 1)])
            self.assertEqual(self.q("SELECT columns, channel, durable FROM evictd.watches WHERE tbl = 'scratch'::regclass"),
                             [(["x"], "other", False)])
            lc = self.listen("other")
            self.app_exec("INSERT INTO scratch VALUES (1, 1)")
            n, = collect_notifies(lc, timeout=2, want=1)
            self.assertEqual(json.loads(n.payload)["new"], {"x": 1})
        finally:
            self.q("SELECT evictd.watch('scratch', ARRAY['id', 'x'])")
        self.assertEqual(shape(), durable_shape)
        self.q("DELETE FROM evictd.outbox")
        self.app_exec("INSERT INTO scratch VALUES (2, 2)")
        (_, p), = self.outbox()
        self.assertEqual(p["rows"], [{"new": {"id": 2, "x": 2}}])
        self.assertEqual(len(self.q("SELECT 1 FROM pg_proc WHERE proname LIKE 'capture\\_%%' "
                                    "AND pronamespace = 'evictd'::regnamespace")),
                         4 * self.q("SELECT count(*) FROM evictd.watches")[0][0])

    def test_quoted_identifiers(self):
        self.q('CREATE SCHEMA "Odd Schema"; '
               'CREATE TABLE "Odd Schema"."My Table" ("Key" int PRIMARY KEY, "a ""b""" numeric, "x" text); '
               'GRANT USAGE ON SCHEMA "Odd Schema" TO app; GRANT ALL ON "Odd Schema"."My Table" TO app')
        try:
            self.q("""SELECT evictd.watch('"Odd Schema"."My Table"', ARRAY['Key', 'a "b"'], 'Odd Channel')""")
            lc = self.listen("Odd Channel")
            self.q("SELECT setval('evictd.idle', 1)")
            self.app_exec('UPDATE "Odd Schema"."My Table" SET x = \'n\'',
                          'INSERT INTO "Odd Schema"."My Table" VALUES (1, 2.0, \'q\')')
            (_, p), = self.outbox()
            self.assertEqual((p["schema"], p["table"]), ("Odd Schema", "My Table"))
            self.assertEqual(p["rows"], [{"new": {"Key": 1, 'a "b"': "2.0"}}])
            got = collect_notifies(lc, timeout=1)
            self.assertEqual([n.channel for n in got], ["Odd Channel"])
            self.assertEqual(json.loads(got[0].payload), p, "the doorbell carries the change")
        finally:
            self.q('DROP SCHEMA "Odd Schema" CASCADE')

    def test_wide_table_60_columns(self):
        self.app_exec("INSERT INTO wide VALUES (1, %s)" % ", ".join(str(i * 10) for i in range(1, 61)))
        (_, p), = self.outbox()
        img = p["rows"][0]["new"]
        self.assertEqual(list(img.keys()), ["id"] + ["c%02d" % i for i in range(60, 0, -1)])
        self.assertEqual([img["c%02d" % i] for i in range(1, 61)], [i * 10 for i in range(1, 61)])

    @staticmethod
    def json_build_object_sql(cols, as_text, alias):
        """The oracle: json_build_object() of cols read through alias (the columns of as_text as
        their text form, as the payload section says), 50 columns a call (it takes at most 100
        arguments), spliced."""
        def arg(c):
            return "(%s.%s)::text" % (alias, c) if c in as_text else "%s.%s" % (alias, c)
        pieces = ["left(substr((json_build_object(%s))::text, 2), -1)"
                  % ", ".join("'%s', %s" % (c, arg(c)) for c in cols[i:i + 50]) for i in range(0, len(cols), 50)]
        return "('{' || %s || '}')" % " || ', ' || ".join(pieces)

    def test_rendering_matches_json_build_object(self):
        """Both captures render images themselves (format(), per column type); on every path the
        durable one writes (one-row, many-row, >100 format() arguments, a renamed table, columns
        named like its variables), and in notify-only payloads, each image must equal what
        json_build_object() gives for the row."""
        wide = ", ".join("w%03d int" % i for i in range(1, 121))
        self.q("CREATE TABLE typed (id bigint PRIMARY KEY, s smallint, i int, b bigint, n numeric, f4 real, "
               "f8 double precision, ok bool, t text, j json, jb jsonb, ts timestamptz, u uuid, a int[], "
               "v_id int, tg_table_name text, d date, %s); GRANT ALL ON typed TO app" % wide)
        cols = ["id", "s", "i", "b", "n", "f4", "f8", "ok", "t", "j", "jb", "ts", "u", "a", "v_id",
                "tg_table_name", "d"] + ["w%03d" % i for i in range(1, 121)]
        try:
            self.q("SELECT evictd.watch('typed', %s)", (cols,))
            expr = self.json_build_object_sql(cols, ("n", "f4", "f8"), "x")

            def expected(where, table="typed"):
                return [json.loads(r[0]) for r in self.q(
                    "SELECT (%s)::text FROM %s AS x WHERE %s ORDER BY x.id" % (expr, table, where))]

            values = ("(%d, -3, NULL, 9007199254740993, 12.500, 'NaN', '-Infinity', NULL, "
                      "E'q\"uo%%s\\\\te\\n\u00e9\u20ac \x01', '{\"k\": [1, 2.50]}', '{\"b\": 1, \"a\": null}', "
                      "'2024-02-29 12:00:00+00', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{1,NULL,3}', 7, "
                      "'%%%%', 'infinity', %s)")
            row = lambda k: values % (k, ", ".join(str(k * 1000 + i) for i in range(1, 121)))

            def images(op, side):
                out = []
                for _, p in self.outbox():
                    self.assertEqual((p["table"], p["op"]), ("typed", op))
                    out += [r[side] for r in p["rows"]]
                self.q("DELETE FROM evictd.outbox")
                return sorted(out, key=lambda img: img["id"])

            # one row (the one-row path), then three (the general path)
            self.app_exec("INSERT INTO typed VALUES %s" % row(1))
            self.assertEqual(images("INSERT", "new"), expected("x.id = 1"))
            self.app_exec("INSERT INTO typed VALUES %s" % ", ".join(row(k) for k in (2, 3, 4)))
            self.assertEqual(images("INSERT", "new"), expected("x.id IN (2, 3, 4)"))
            old = expected("true")
            self.app_exec("UPDATE typed SET t = t || '!', n = NULL, ok = NOT coalesce(ok, false) WHERE id = 1")
            (_, p), = self.outbox()
            self.assertEqual(p["rows"], [{"old": old[0], "new": expected("x.id = 1")[0]}])
            self.q("DELETE FROM evictd.outbox")
            self.app_exec("UPDATE typed SET w120 = -w120, f4 = 0.1")
            new = expected("true")
            chunk = self.outbox()
            self.assertEqual(len(chunk), 1)
            rows = sorted(chunk[0][1]["rows"], key=lambda r: r["old"]["id"])
            self.assertEqual([r["new"] for r in rows], new)
            self.assertEqual([r["old"] for r in rows][1:], old[1:])
            self.q("DELETE FROM evictd.outbox")
            # a renamed table: the payload names it as it is now
            self.q("ALTER TABLE typed RENAME TO typed2")
            self.app_exec("DELETE FROM typed2 WHERE id = 4")
            (_, p), = self.outbox()
            self.assertEqual((p["table"], p["op"]), ("typed2", "DELETE"))
            self.assertEqual(p["rows"], [{"old": new[3]}])
            self.q("DELETE FROM evictd.outbox")
            self.app_exec("DELETE FROM typed2 WHERE id < 3")
            (_, p), = self.outbox()
            self.assertEqual((p["table"], p["op"]), ("typed2", "DELETE"))
            self.assertEqual(sorted((r["old"] for r in p["rows"]), key=lambda img: img["id"]), new[:2])
            self.q("DELETE FROM evictd.outbox")
            # notify-only: the same images, in compact payloads (no blank after ':' or ',')
            self.q("SELECT evictd.watch('typed2', %s, 'typed_fast', false)", (cols,))
            lc = self.listen("typed_fast")
            self.app_exec("INSERT INTO typed2 VALUES %s" % row(5))
            self.app_exec("UPDATE typed2 SET t = 'u', f8 = 2.5 WHERE id = 5")
            got = collect_notifies(lc, timeout=2, want=2)
            self.assertEqual(len(got), 2, [n.payload for n in got])
            ps = [json.loads(n.payload) for n in got]
            self.assertEqual([(p["table"], p["op"], p["id"]) for p in ps], [("typed2", "INSERT", None), ("typed2", "UPDATE", None)])
            now = expected("x.id = 5", "typed2")
            self.assertEqual(ps[1]["new"], now[0])
            self.assertEqual(ps[1]["old"], ps[0]["new"])
            self.assertEqual(dict(ps[1]["old"], t="u", f8="2.5"), now[0])
            self.assertTrue(got[0].payload.startswith('{"v":1,"id":null,"tx":'), got[0].payload[:80])
            self.assertIn('"schema":"public","table":"typed2","op":"INSERT","new":{"id":5,"s":-3,"i":null,',
                          got[0].payload)
            self.assertIn('"op":"UPDATE","old":{"id":5,', got[1].payload)
            self.assertEqual(self.outbox(), [])
        finally:
            self.q("DROP TABLE IF EXISTS typed; DROP TABLE IF EXISTS typed2; DELETE FROM evictd.watches "
                   "WHERE NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = tbl)")

    def test_chunks_close_near_one_mebibyte(self):
        """Wide images: a chunk closes before it would pass ~1 MiB of images (at least one each)."""
        self.app_exec("INSERT INTO products (name) SELECT repeat('x', 3000) FROM generate_series(1, 1000)")
        chunks = self.outbox()
        self.assertEqual(sum(len(p["rows"]) for _, p in chunks), 1000)
        self.assertGreater(len(chunks), 2)
        for _, p in chunks:
            self.assertLessEqual(len(json.dumps(p["rows"])), 1048576 + 4096)
        self.assertEqual(len({r["new"]["id"] for _, p in chunks for r in p["rows"]}), 1000)
        self.q("DELETE FROM evictd.outbox")
        self.app_exec("UPDATE products SET name = repeat('y', 600000) WHERE id IN (SELECT id FROM products ORDER BY id LIMIT 4)")
        self.assertEqual([len(p["rows"]) for _, p in self.outbox()], [1, 1, 1, 1])

    # -- the idle flag / doorbell -----------------------------------------
    def test_idle_flag_doorbell(self):
        lc = self.listen("evictd")
        self.q("SELECT setval('evictd.idle', 1)")
        self.app_exec("UPDATE products SET stock = 1 WHERE false")  # touches 0 rows: no ring
        self.assertEqual(self.q("SELECT last_value FROM evictd.idle"), [(1,)])
        self.app_exec("INSERT INTO products (name) VALUES ('bell1')")
        self.app_exec("INSERT INTO shipments (product_id) VALUES (1)")
        got = collect_notifies(lc, timeout=1.5)
        # a one-row statement's doorbell carries its change: the outbox row's payload, byte for byte
        self.assertEqual([n.channel for n in got], ["evictd"], "exactly one doorbell")
        first = self.outbox()[0]
        self.assertEqual(json.loads(got[0].payload), first[1])
        self.assertEqual(first[1]["rows"][0]["new"]["name"], "bell1")
        self.assertEqual(self.q("SELECT payload FROM evictd.outbox WHERE id = %s" % first[0]), [(got[0].payload,)])
        self.assertEqual(self.q("SELECT last_value FROM evictd.idle"), [(0,)])
        self.app_exec("INSERT INTO products (name) VALUES ('bell2')")
        self.assertEqual(collect_notifies(lc, timeout=0.7), [], "flag 0: no doorbell")
        self.assertEqual(len(self.outbox()), 3)
        # a statement of several rows rings empty (its chunks are read from the outbox)
        self.q("SELECT setval('evictd.idle', 1)")
        self.app_exec("INSERT INTO products (name) VALUES ('bell3'), ('bell4')")
        got = collect_notifies(lc, timeout=1.5)
        self.assertEqual([(n.channel, n.payload) for n in got], [("evictd", "")], "one empty doorbell")
        # a change of 8000 bytes or more rings empty too
        self.q("SELECT setval('evictd.idle', 1)")
        self.app_exec("INSERT INTO products (name) VALUES (repeat('z', 9000))")
        got = collect_notifies(lc, timeout=1.5)
        self.assertEqual([(n.channel, n.payload) for n in got], [("evictd", "")], "oversize: empty doorbell")

    LEASE = "SELECT setval('evictd.idle', (date_part('epoch', clock_timestamp()) * 1000)::int8 + %d)"

    def seq_scans(self, table):
        """Sequential scans of table so far, counting the app connection's (flushed first)."""
        self.app_exec("SELECT pg_stat_force_next_flush()")  # flushed as its transaction ends
        self.q("SELECT pg_stat_clear_snapshot()")
        return self.q("SELECT seq_scan FROM pg_stat_user_tables WHERE relid = %s::regclass", (table,))[0][0]

    def test_ringing_writes_read_nothing_back(self):
        """Under a lease every one-row write rings with its payload, byte for byte its outbox
        row's, and reads nothing from the outbox: a plan kept from when the outbox was a page
        would scan it sequentially, however large it has grown since (the capture once read
        the payload back so: at 2,000 writes/s, most writes read 70-odd pages)."""
        lc = self.listen("evictd")
        self.q(self.LEASE % 60000)
        for i in range(3):
            self.app_exec("INSERT INTO products (name) VALUES ('warm%d')" % i)
        self.q("VACUUM ANALYZE evictd.outbox")  # a page, in pg_class too
        for i in range(8):  # plans made now, generic ones from the sixth call
            self.app_exec("INSERT INTO products (name) VALUES ('small%d')" % i)
        collect_notifies(lc, timeout=1.0)
        # The outbox grows (a backlog: evictd away), with no vacuum or analyze to replan.
        self.q("INSERT INTO evictd.outbox (id, payload) SELECT nextval('evictd.outbox_id_seq'), "
               "'{\"v\":1,\"filler\":\"' || repeat('x', 300) || '\"}' FROM generate_series(1, 20000)")
        before = self.seq_scans("evictd.outbox")
        for i in range(8):
            self.app_exec("INSERT INTO products (name) VALUES ('big%d')" % i)
        self.app_exec("UPDATE products SET stock = stock + 1 WHERE name = 'big0'")
        self.app_exec("DELETE FROM products WHERE name = 'big1'")
        self.assertEqual(self.seq_scans("evictd.outbox") - before, 0, "a ringing write scanned the outbox")
        got = [n.payload for n in collect_notifies(lc, timeout=1.5)]
        self.assertEqual(len(got), 10)
        for payload in got:
            oid = json.loads(payload)["id"]
            self.assertEqual(self.q("SELECT payload FROM evictd.outbox WHERE id = %s", (oid,)), [(payload,)],
                             "the doorbell carries the row's payload, byte for byte")

    def test_idle_flag_light_rings_every_write(self):
        """A lease (light load, the flag > 1: an epoch ms ahead): every write rings with its
        change and leaves the flag set, except one whose ring would wait for another ringing
        transaction still in flight; past the lease, a write rings once and clears the flag."""
        lc = self.listen("evictd")
        self.q(self.LEASE % 60000)
        lease = self.q("SELECT last_value FROM evictd.idle")
        self.app_exec("UPDATE products SET stock = 1 WHERE false")  # touches 0 rows: no ring
        for name in ("light1", "light2", "light3"):
            self.app_exec("INSERT INTO products (name) VALUES ('%s')" % name)
        got = collect_notifies(lc, timeout=1.5)
        rows = self.outbox()
        self.assertEqual(len(rows), 3)
        self.assertEqual([json.loads(n.payload) for n in got], [p for _, p in rows], "one ring per write")
        self.assertEqual(self.q("SELECT last_value FROM evictd.idle"), lease)
        # Two writers in flight: the first to reach its trigger rings, the second does not.
        other = self.pg.connect(user="app")
        try:
            with self.app.cursor() as c1, other.cursor() as c2:
                c1.execute("INSERT INTO products (name) VALUES ('first')")
                c2.execute("INSERT INTO products (name) VALUES ('second')")
                other.commit()
                self.assertEqual(collect_notifies(lc, timeout=0.7), [], "the second must not ring")
            self.app.commit()
            got = collect_notifies(lc, timeout=1.5)
            self.assertEqual([json.loads(n.payload)["rows"][0]["new"]["name"] for n in got], ["first"])
            self.assertEqual(len(self.outbox()), 5, "both rows are in the outbox")
            # the lock went with the first's commit: the next write rings again
            with other.cursor() as c2:
                c2.execute("INSERT INTO products (name) VALUES ('third')")
            other.commit()
            got = collect_notifies(lc, timeout=1.5)
            self.assertEqual([json.loads(n.payload)["rows"][0]["new"]["name"] for n in got], ["third"])
        finally:
            other.close()
        # a statement of several rows rings empty, and leaves the flag at 2 too
        self.app_exec("INSERT INTO products (name) VALUES ('light4'), ('light5')")
        self.assertEqual([(n.channel, n.payload) for n in collect_notifies(lc, timeout=1.5)], [("evictd", "")])
        self.assertEqual(self.q("SELECT last_value FROM evictd.idle"), lease)
        # past the lease (evictd stopped renewing it): the next write rings once and clears it
        self.q(self.LEASE % -1)
        self.app_exec("INSERT INTO products (name) VALUES ('late1')")
        self.app_exec("INSERT INTO products (name) VALUES ('late2')")
        got = collect_notifies(lc, timeout=1.5)
        self.assertEqual([json.loads(n.payload)["rows"][0]["new"]["name"] for n in got], ["late1"])
        self.assertEqual(self.q("SELECT last_value FROM evictd.idle"), [(0,)])
        # flag 0 again: nothing rings
        self.q("SELECT setval('evictd.idle', 0)")
        self.app_exec("INSERT INTO products (name) VALUES ('quiet')")
        self.assertEqual(collect_notifies(lc, timeout=0.7), [])

    # -- watch()/unwatch() -------------------------------------------------
    def test_watch_validation(self):
        cases = [
            ("SELECT evictd.watch('products', ARRAY['id', 'nope'])", psycopg2.errors.UndefinedColumn, "nope"),
            ("SELECT evictd.watch('no_such_table', ARRAY['id'])", psycopg2.errors.UndefinedTable, "no_such_table"),
            ("SELECT evictd.watch('products', ARRAY['id'], repeat('c', 64))", psycopg2.errors.InvalidParameterValue,
             "channel"),
            ("SELECT evictd.watch('products', ARRAY['id', NULL])", psycopg2.errors.NullValueNotAllowed, "columns"),
            ("SELECT evictd.watch('evictd.outbox', ARRAY['id'])", psycopg2.errors.WrongObjectType, "own tables"),
        ]
        for sql, exc, word in cases:
            with self.subTest(sql=sql):
                with self.assertRaises(exc) as cm:
                    self.q(sql)
                self.assertIn(word, str(cm.exception))
        # the failed calls changed nothing
        self.assertEqual(self.q("SELECT columns FROM evictd.watches WHERE tbl = 'products'::regclass"),
                         [(["id", "name", "stock", "price", "weight", "active"],)])

    def test_unwatch(self):
        self.q("CREATE TABLE temp_watch (id int PRIMARY KEY); GRANT ALL ON temp_watch TO app")
        try:
            self.q("SELECT evictd.watch('temp_watch', ARRAY['id'])")
            self.assertEqual(len(self.triggers("temp_watch")), 4)
            self.assertEqual(len(self.captures(self.q("SELECT 'temp_watch'::regclass::oid")[0][0])), 4)
            self.q("SELECT evictd.unwatch('temp_watch')")
            self.q("SELECT evictd.unwatch('temp_watch')")  # idempotent
            self.assertEqual(self.triggers("temp_watch"), [])
            self.assertEqual(self.q("SELECT count(*) FROM evictd.watches WHERE tbl = 'temp_watch'::regclass"), [(0,)])
            self.assertEqual(self.captures(self.q("SELECT 'temp_watch'::regclass::oid")[0][0]), [])
            self.app_exec("INSERT INTO temp_watch VALUES (1)")
            self.assertEqual(self.outbox(), [])
        finally:
            self.q("DROP TABLE temp_watch")

    def test_alter_table_keeps_writes_working(self):
        # app owns gadgets, as a Django migration role would; event triggers follow its DDL.
        self.app_exec("ALTER TABLE gadgets DROP COLUMN size")
        self.app_exec("ALTER TABLE gadgets RENAME COLUMN code TO sku")
        self.app_exec("ALTER TABLE gadgets ALTER COLUMN price TYPE int USING price::int")
        self.app_exec("INSERT INTO gadgets (sku, price) VALUES ('g1', 7)")
        (_, p), = self.outbox()
        self.assertEqual(list(p["rows"][0]["new"].keys()), ["id", "price"])
        self.assertTrue(strict_int(p["rows"][0]["new"]["price"]), "type change followed: int is a JSON number")
        self.assertEqual(self.q("SELECT columns FROM evictd.watches WHERE tbl = 'gadgets'::regclass"), [(["id", "price"],)])
        oid = self.q("SELECT 'gadgets'::regclass::oid")[0][0]
        self.app_exec("DROP TABLE gadgets")
        self.assertEqual(self.q("SELECT count(*) FROM evictd.watches WHERE tbl::oid = %s", (oid,)), [(0,)])
        self.assertEqual(self.captures(oid), [])

    # -- security -----------------------------------------------------------
    def test_security_definer_and_no_app_grants(self):
        rows = self.q("SELECT p.proname, p.prosecdef, p.proconfig, pg_get_userbyid(p.proowner) FROM pg_proc p "
                      "WHERE p.pronamespace = 'evictd'::regnamespace AND p.proname LIKE 'capture\\_%%'")
        self.assertGreaterEqual(len(rows), 7)
        for name, secdef, config, owner in rows:
            self.assertTrue(secdef, name)
            self.assertEqual(config[0], "search_path=pg_catalog, pg_temp", name)
            self.assertIn(config[1:], ([], ["extra_float_digits=1"]), name)
            self.assertEqual(owner, "postgres", name)
        # the float text form is pinned where a float is captured, and nowhere else (a SET costs every call)
        config = dict((t, self.q("SELECT DISTINCT proconfig FROM pg_proc WHERE proname LIKE %s",
                                 ("capture\\_%s\\_%%" % self.q("SELECT %s::regclass::oid", (t,))[0][0],)))
                      for t in ("products", "pings", "scratch"))
        self.assertEqual(config["products"], [(["search_path=pg_catalog, pg_temp", "extra_float_digits=1"],)])
        self.assertEqual(config["pings"], [(["search_path=pg_catalog, pg_temp", "extra_float_digits=1"],)])
        self.assertEqual(config["scratch"], [(["search_path=pg_catalog, pg_temp"],)])
        priv = self.q("SELECT has_schema_privilege('app', 'evictd', 'USAGE'), "
                      "has_function_privilege('app', 'evictd.watch(regclass, text[], text, bool)', 'EXECUTE'), "
                      "has_function_privilege('app', 'evictd.unwatch(regclass)', 'EXECUTE'), "
                      "has_table_privilege('app', 'evictd.outbox', 'SELECT')")
        self.assertEqual(priv, [(False, False, False, False)])
        with self.assertRaises(psycopg2.errors.InsufficientPrivilege):
            self.app_exec("SELECT evictd.watch('products', ARRAY['id'])")
        self.app.rollback()
        # search_path games by the writer do not reach the trigger
        self.app_exec("SET search_path = pg_temp, public", "INSERT INTO products (name) VALUES ('sp')")
        self.assertEqual(len(self.outbox()), 1)

    def test_type_owner_cast_to_json_never_runs(self):
        # app owns a schema, a table and its enum type, and makes a cast to json that would run with
        # the installer's rights inside the SECURITY DEFINER capture (to_json() looks such casts up).
        self.q("CREATE SCHEMA appx AUTHORIZATION app")
        self.app_exec("CREATE TYPE appx.mood AS ENUM ('calm', 'glad')",
                      "CREATE FUNCTION appx.mood_json(appx.mood) RETURNS json LANGUAGE plpgsql AS "
                      "$f$BEGIN RAISE EXCEPTION 'cast to json ran as %', current_user; END$f$",
                      "CREATE CAST (appx.mood AS json) WITH FUNCTION appx.mood_json(appx.mood)",
                      "CREATE TABLE appx.moods (id int PRIMARY KEY, m appx.mood, ms appx.mood[], r int4range)",
                      "CREATE TABLE appx.moods_n (id int PRIMARY KEY, m appx.mood, ms appx.mood[])")
        try:
            with self.assertRaisesRegex(psycopg2.Error, "cast to json ran as app"):
                self.app_exec("SELECT to_json('calm'::appx.mood)")  # the cast is live
            self.app.rollback()
            self.q("SELECT evictd.watch('appx.moods', ARRAY['id', 'm', 'ms', 'r'])")
            self.q("SELECT evictd.watch('appx.moods_n', ARRAY['id', 'm', 'ms'], %s, false)", (FAST_CHANNEL,))
            lc = self.listen(FAST_CHANNEL)
            self.app_exec("INSERT INTO appx.moods VALUES (1, 'calm', '{calm,glad}', '[1,3)'), (2, NULL, NULL, NULL)",
                          "UPDATE appx.moods SET m = 'glad' WHERE id = 1",
                          "INSERT INTO appx.moods_n VALUES (1, 'glad', '{glad}')")
            images = [(r.get("old"), r.get("new")) for _, p in self.outbox(compact=True) for r in p["rows"]]
            self.assertEqual(images, [
                (None, {"id": 1, "m": "calm", "ms": "{calm,glad}", "r": "[1,3)"}),
                (None, {"id": 2, "m": None, "ms": None, "r": None}),
                ({"id": 1, "m": "calm", "ms": "{calm,glad}", "r": "[1,3)"},
                 {"id": 1, "m": "glad", "ms": "{calm,glad}", "r": "[1,3)"})])
            n, = collect_notifies(lc, timeout=5, want=1)
            self.assertEqual(json.loads(n.payload)["new"], {"id": 1, "m": "glad", "ms": "{glad}"})
            self.assertFalse(self.q("SELECT rolsuper FROM pg_roles WHERE rolname = 'app'")[0][0])
        finally:
            self.app.rollback()
            self.q("SELECT evictd.unwatch(t) FROM pg_tables, LATERAL (SELECT format('%I.%I', schemaname, tablename)) "
                   "AS f(t) WHERE schemaname = 'appx'; DROP SCHEMA appx CASCADE")

    def test_extension_key_type_pairs_by_text(self):
        # ltree's '=' is not in pg_catalog (the capture's search_path): keys compare as text.
        self.q("CREATE EXTENSION IF NOT EXISTS ltree")
        self.q("CREATE TABLE paths (p ltree PRIMARY KEY, n int); GRANT ALL ON paths TO app")
        try:
            self.q("SELECT evictd.watch('paths', ARRAY['p', 'n'])")
            self.app_exec("INSERT INTO paths VALUES ('a.b', 1), ('a.c', 2)")
            self.app_exec("UPDATE paths SET n = n + 10")
            self.app_exec("UPDATE paths SET n = 0 WHERE p = 'a.b'")
            rows = [(p["op"], p["rows"]) for _, p in self.outbox(compact=True)]
            self.assertEqual(rows, [
                ("INSERT", [{"new": {"p": "a.b", "n": 1}}, {"new": {"p": "a.c", "n": 2}}]),
                ("UPDATE", [{"old": {"p": "a.b", "n": 1}, "new": {"p": "a.b", "n": 11}},
                            {"old": {"p": "a.c", "n": 2}, "new": {"p": "a.c", "n": 12}}]),
                ("UPDATE", [{"old": {"p": "a.b", "n": 11}, "new": {"p": "a.b", "n": 0}}])])
        finally:
            self.q("SELECT evictd.unwatch('paths'); DROP TABLE paths; DROP EXTENSION ltree")

    def test_durable_watch_stays_out_of_inheritance_trees(self):
        self.q("CREATE TABLE pt (id int, k int, v text, PRIMARY KEY (id, k)) PARTITION BY LIST (k);"
               "CREATE TABLE pt1 PARTITION OF pt FOR VALUES IN (1);"
               "CREATE TABLE ip (id int PRIMARY KEY, v text); CREATE TABLE ic (id int PRIMARY KEY, v text);"
               "CREATE TABLE solo_a (id int PRIMARY KEY, w text); CREATE TABLE solo_b (id int PRIMARY KEY);"
               "CREATE TABLE solo_c (id int, k int, v text, PRIMARY KEY (id, k));"
               "GRANT ALL ON pt, pt1, ip, ic TO app")
        try:
            for t in ("pt1", "ip"):
                if t == "ip":
                    self.q("ALTER TABLE ic INHERIT ip")
                with self.subTest(table=t), self.assertRaisesRegex(psycopg2.errors.WrongObjectType,
                                                                   "partition or in an inheritance tree"):
                    self.q("SELECT evictd.watch(%s, ARRAY['id', 'v'])", (t,))
            self.assertEqual(self.q("SELECT count(*) FROM evictd.watches WHERE tbl::text IN ('pt1', 'ip')"), [(0,)])
            # notify-only: row triggers fire however the write is addressed
            self.q("SELECT evictd.watch('pt1', ARRAY['id', 'v'], %s, false)", (FAST_CHANNEL,))
            self.q("SELECT evictd.watch('ic', ARRAY['id', 'v'], %s, false)", (FAST_CHANNEL,))
            lc = self.listen(FAST_CHANNEL)
            self.app_exec("INSERT INTO pt VALUES (1, 1, 'a')", "INSERT INTO ic VALUES (2, 'b')")
            self.app_exec("UPDATE ip SET v = 'c'")
            # a column renamed on the parent is renamed on the child: its capture follows
            self.q("ALTER TABLE ip RENAME COLUMN v TO w")
            self.app_exec("UPDATE ip SET w = 'd'")
            got = [(p["table"], p["op"], p.get("new"))
                   for p in (json.loads(n.payload) for n in collect_notifies(lc, timeout=5, want=4))]
            self.assertEqual(got, [("pt1", "INSERT", {"id": 1, "v": "a"}), ("ic", "INSERT", {"id": 2, "v": "b"}),
                                   ("ic", "UPDATE", {"id": 2, "v": "c"}), ("ic", "UPDATE", {"id": 2})])
            # a durable watch of a partition made by an older version (its watch() allowed it):
            # install.sql warns; DDL elsewhere goes on, DDL on its tree is refused
            self.q("INSERT INTO evictd.watches VALUES ('pt1', '{id,v}', 'evictd', true)"
                   " ON CONFLICT (tbl) DO UPDATE SET durable = true, channel = 'evictd';"
                   "SELECT evictd._generate('pt1', true)")
            p = subprocess.run([os.path.join(self.pg.bindir, "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                                "-h", "127.0.0.1", "-p", str(self.pg.port), "-U", "postgres", "-f", INSTALL],
                               capture_output=True, text=True, timeout=120)
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertIn("pt1 is watched durably but is in a partitioned table", p.stderr)
            self.q("CREATE TEMP TABLE unrelated (x int); DROP TABLE unrelated")
            with self.assertRaisesRegex(psycopg2.errors.WrongObjectType, "pt1 would be part of"):
                self.q("ALTER TABLE pt1 SET (fillfactor = 90)")
            self.q("SELECT evictd.watch('pt1', ARRAY['id', 'v'], %s, false)", (FAST_CHANNEL,))
            # a durably watched table cannot join a tree afterwards (its writes would be missed)
            for t, ddl in (("solo_a", "ALTER TABLE solo_a INHERIT ip"),
                           ("solo_b", "CREATE TABLE solo_b_child () INHERITS (solo_b)"),
                           ("solo_c", "ALTER TABLE pt ATTACH PARTITION solo_c FOR VALUES IN (2)")):
                self.q("SELECT evictd.watch(%s, ARRAY['id'])", (t,))
                with self.subTest(ddl=ddl), self.assertRaisesRegex(psycopg2.errors.WrongObjectType,
                                                                   "%s would be part of" % t):
                    self.q(ddl)
                self.assertEqual(self.q("SELECT count(*) FROM pg_inherits WHERE %s::regclass IN (inhrelid, inhparent)",
                                        (t,)), [(0,)])
        finally:
            self.q("SELECT evictd.unwatch('pt1'); SELECT evictd.unwatch('ic');"
                   "SELECT evictd.unwatch(t) FROM unnest(ARRAY['solo_a', 'solo_b', 'solo_c']) AS t;"
                   "DROP TABLE pt, ip, ic, solo_a, solo_b, solo_c CASCADE")

    def test_columns_changed_without_alter_table(self):
        # DROP DOMAIN ... CASCADE drops a column, ALTER TYPE ... CASCADE renames one of a typed
        # table: no ALTER TABLE names the watched table, yet its capture must follow.
        cases = [("CREATE DOMAIN qty AS int; CREATE TABLE stocked (id int PRIMARY KEY, q qty, note text)",
                  "stocked", ["id", "q", "note"], "DROP DOMAIN qty CASCADE",
                  "INSERT INTO stocked VALUES (1, 'n')", {"id": 1, "note": "n"}, "DROP TABLE stocked"),
                 ("CREATE TYPE cc AS (id int, b text); CREATE TABLE typed OF cc (PRIMARY KEY (id))",
                  "typed", ["id", "b"], "ALTER TYPE cc RENAME ATTRIBUTE b TO c CASCADE",
                  "INSERT INTO typed VALUES (1, 'x')", {"id": 1}, "DROP TABLE typed; DROP TYPE cc")]
        for make, table, cols, ddl, write, image, drop in cases:
            with self.subTest(ddl=ddl):
                self.q("DELETE FROM evictd.outbox")
                self.q("%s; GRANT ALL ON %s TO app; SELECT evictd.watch(%%s, %%s)" % (make, table), (table, cols))
                try:
                    self.q(ddl)
                    self.app_exec(write)
                    (_, p), = self.outbox()
                    self.assertEqual(p["rows"], [{"new": image}])
                    self.assertEqual(self.q("SELECT columns FROM evictd.watches WHERE tbl = %s::regclass", (table,)),
                                     [(list(image),)])
                finally:
                    self.q("SELECT evictd.unwatch(%s); " + drop, (table,))

    def test_float_text_form_ignores_the_writers_setting(self):
        self.q("CREATE TABLE floats (id int PRIMARY KEY, d double precision, r real); GRANT ALL ON floats TO app;"
               "SELECT evictd.watch('floats', ARRAY['id', 'd', 'r'])")
        self.q("CREATE TABLE float_arrays (id int PRIMARY KEY, a float8[]); GRANT ALL ON float_arrays TO app;"
               "SELECT evictd.watch('float_arrays', ARRAY['id', 'a'])")
        try:
            lc = self.listen(FAST_CHANNEL)
            self.app_exec("SET extra_float_digits = 0", "INSERT INTO floats VALUES (1, 0.1::float8 + 0.2, 0.1)",
                          "INSERT INTO float_arrays VALUES (1, ARRAY[0.1::float8 + 0.2])",
                          "INSERT INTO pings (ratio) VALUES (0.1::float8 + 0.2)", "RESET extra_float_digits")
            (_, p), (_, pa) = self.outbox()
            self.assertEqual(p["rows"], [{"new": {"id": 1, "d": "0.30000000000000004", "r": "0.1"}}])
            self.assertEqual(pa["rows"], [{"new": {"id": 1, "a": [0.30000000000000004]}}])
            n, = collect_notifies(lc, timeout=5, want=1)
            self.assertEqual(json.loads(n.payload)["new"]["ratio"], "0.30000000000000004")
        finally:
            self.q("SELECT evictd.unwatch('floats'); DROP TABLE floats;"
                   "SELECT evictd.unwatch('float_arrays'); DROP TABLE float_arrays")

    def test_install_again_does_not_wait_for_writers(self):
        # a writer's open transaction holds locks on the outbox's sequences until it ends;
        # install.sql must not queue behind it (and every later writer behind install.sql)
        self.app_exec("INSERT INTO products (name) VALUES ('before')")
        with self.app.cursor() as cur:
            cur.execute("INSERT INTO products (name) VALUES ('open')")
        try:
            self.pg.psql("SET lock_timeout = '3s';\n\\i %s" % INSTALL)
        finally:
            self.app.commit()
        self.assertEqual(len(self.outbox()), 2)

    def test_install_again_with_watches(self):
        self.app_exec("INSERT INTO products (name) VALUES ('kept')")
        watches = self.q("SELECT tbl::text, columns, channel, durable FROM evictd.watches ORDER BY 1")
        self.pg.psql(file=INSTALL)
        self.assertEqual(len(self.outbox()), 1, "re-install keeps the outbox")
        self.app_exec("INSERT INTO products (name) VALUES ('after')")
        self.assertEqual(len(self.outbox()), 2)
        self.assertEqual(self.q("SELECT tbl::text, columns, channel, durable FROM evictd.watches ORDER BY 1"), watches)

    # -- role.sql -----------------------------------------------------------
    def test_role_least_privilege(self):
        self.pg.psql(file=ROLE)
        self.pg.psql(file=ROLE, variables={"evictd_password": "s3cr'et", "lookup_tables": "public.drivers"})
        self.app_exec("INSERT INTO products (name) VALUES ('r1'), ('r2')", "INSERT INTO shipments (product_id) VALUES (1)")
        ev = self.pg.connect(user="evictd")
        try:
            with ev.cursor() as cur:
                cur.execute("SELECT id, payload FROM evictd.outbox ORDER BY id FOR UPDATE SKIP LOCKED")
                ids = [r[0] for r in cur.fetchall()]
                self.assertEqual(len(ids), 2)
                cur.execute("DELETE FROM evictd.outbox WHERE id = ANY(%s)", (ids,))
                self.assertEqual(cur.rowcount, 2)
                cur.execute(self.LEASE % 1000)
                cur.execute("SELECT setval('evictd.idle', 1)")
                cur.execute("SELECT last_value FROM evictd.idle")
                self.assertEqual(cur.fetchone()[0], 1)
                cur.execute("SELECT tbl::text, columns FROM evictd.watches ORDER BY 1")
                self.assertTrue(cur.fetchall())
                cur.execute("SELECT user_id FROM drivers LIMIT 1")  # lookup table granted
                cur.execute("LISTEN evictd")
            ev.commit()
            self.assertEqual(self.outbox(), [])
            for sql in ("UPDATE products SET stock = 1", "SELECT * FROM products",
                        "INSERT INTO evictd.outbox VALUES (-1, 'x')",
                        "SELECT evictd.watch('products', ARRAY['id'])"):
                with self.subTest(sql=sql):
                    with self.assertRaises(psycopg2.errors.InsufficientPrivilege) as cm:
                        with ev.cursor() as cur:
                            cur.execute(sql)
                    self.assertIn("permission denied", str(cm.exception))
                    ev.rollback()
        finally:
            ev.close()
            self.q("SELECT setval('evictd.idle', 0)")

    # -- uninstall (runs last: zz) -------------------------------------------
    def test_evictd_sql_output_applies_twice(self):
        """`evictd sql` watches exactly the tables and columns the rules use; applying it twice is harmless."""
        cfg = {
            "postgres": {"url": "postgresql://unused@127.0.0.1/none", "channels": ["evictd_gen"]},
            "redis": {"default": {"url": "redis://127.0.0.1:1/0"}},
            "rules": [
                {"table": "public.scratch", "keys": ["s:{id}"]},
                {"table": "events", "keys": ["e:{kind}"], "durable": False},
                {"table": "drivers", "lookups": [{"as": "u", "sql": "SELECT $1::int", "args": ["user_id"]}],
                 "keys": ["d:{new.id}:{u}"]},
            ],
        }
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(cfg, f)
        try:
            out = subprocess.run([evictd_bin(), "sql", "--config", f.name], capture_output=True, text=True,
                                 timeout=30)
        finally:
            os.unlink(f.name)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.pg.psql(out.stdout)
        self.pg.psql(out.stdout)
        rows = {r[0]: (r[1], r[2], r[3]) for r in self.q(
            "SELECT tbl::text, columns, channel, durable FROM evictd.watches "
            "WHERE tbl::text IN ('scratch', 'events', 'drivers')")}
        self.assertEqual(rows["scratch"], (["id"], "evictd_gen", True))
        self.assertEqual(rows["events"], (["kind"], "evictd_gen", False))
        self.assertEqual(sorted(rows["drivers"][0]), ["id", "user_id"])
        # put the class-wide watches of these three tables back for the other tests
        self.pg.psql("\n".join(line for line in WATCH_SQL.splitlines()
                               if "'scratch'" in line or "'events'" in line or "'drivers'" in line))

    def run_to_dev_full(self, command):
        """`evictd COMMAND --config X > /dev/full`: the output did not reach its reader, so an error
        on stderr and exit 1 (psql down a pipe would otherwise apply half of `sql`, or nothing; a
        script would take `check` for passed)."""
        if not os.path.exists("/dev/full"):
            self.skipTest("no /dev/full")
        cfg = {
            "postgres": {"url": "postgresql://unused@127.0.0.1/none"},
            "redis": {"default": {"url": "redis://127.0.0.1:1/0"}},
            "rules": [{"table": "scratch", "keys": ["s:{id}"]}],
        }
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(cfg, f)
        try:
            with open("/dev/full", "w") as full:
                p = subprocess.run([evictd_bin(), command, "--config", f.name], stdout=full, stderr=subprocess.PIPE,
                                   text=True, timeout=30)
        finally:
            os.unlink(f.name)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn("No space left on device", p.stderr)

    def test_evictd_sql_reports_a_failed_write(self):
        self.run_to_dev_full("sql")

    def test_evictd_check_reports_a_failed_write(self):
        self.run_to_dev_full("check")

    def test_zz_uninstall(self):
        self.pg.psql(file=UNINSTALL)
        self.pg.psql(file=UNINSTALL)  # idempotent
        self.assertEqual(self.q("SELECT to_regnamespace('evictd')"), [(None,)])
        self.assertEqual(self.q("SELECT tgrelid::regclass::text, tgname FROM pg_trigger WHERE tgname LIKE 'evictd%%'"), [])
        self.assertEqual(self.q("SELECT evtname FROM pg_event_trigger"), [])
        self.app_exec("INSERT INTO products (name) VALUES ('free')", "TRUNCATE events")
        # and it comes back
        self.pg.psql(file=INSTALL)
        self.q("SELECT evictd.watch('products', ARRAY['id'])")
        self.app_exec("INSERT INTO products (name) VALUES ('again')")
        (_, p), = self.outbox()
        self.assertEqual(list(p["rows"][0]["new"].keys()), ["id"])


def main():
    prog = unittest.main(exit=False, verbosity=2 if "-v" in sys.argv else 1)
    r = prog.result
    failed = len(r.failures) + len(r.errors) + len(r.unexpectedSuccesses)
    passed = max(0, r.testsRun - failed - len(r.skipped))
    print("%d passed, %d failed" % (passed, failed))
    sys.exit(0 if failed == 0 and r.wasSuccessful() else 1)


if __name__ == "__main__":
    main()
