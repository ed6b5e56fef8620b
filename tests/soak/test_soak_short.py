#!/usr/bin/env python3
"""test_soak_short.py: the short consistency soak, for the test suite (about 75 s in all).

  test_checker_sees_stale_without_evictd   the checker is not vacuous: with no evictd running, it
                                           must report unexplained stale keys and an undrained outbox
  test_checker_brief                       10 s of RouteX traffic with evictd (redelete_after_ms 50):
                                           lost 0, no unexplained stale key (timed or after quiesce),
                                           no crash, no dead letter
  test_chaos_short                         chaos.py --short (25 s of traffic while Redis is killed and
                                           frozen, PostgreSQL restarted, evictd SIGKILLed): lost 0, no
                                           unexplained stale key after quiescing, no crash, no dead
                                           letter, every fault kind injected

Each runs tests/soak/checker.py or chaos.py as a child process with --json and reads the figures.
The binary is $EVICTD_BIN or build/evictd. Prints "N passed, N failed" last; exits non-zero on any
failure. Needs what the integration tests need (PostgreSQL server binaries, redis-server, psycopg2,
redis-py).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))

import harness  # noqa: E402,F401  (may re-exec under /usr/bin/python3)
from harness import evictd_bin  # noqa: E402


def run_script(name, args, timeout):
    """Runs tests/soak/<name> with --json; returns (exit status, results, output tail, seconds)."""
    tmp = tempfile.mkdtemp(prefix="evictd-soak-test-")
    out = os.path.join(tmp, "res.json")
    t0 = time.monotonic()
    try:
        p = subprocess.run([sys.executable, os.path.join(HERE, name)] + list(args) + ["--json", out],
                           capture_output=True, text=True, timeout=timeout,
                           env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
        took = time.monotonic() - t0
        text = (p.stdout + "\n" + p.stderr)[-6000:]
        res = None
        if os.path.exists(out):
            with open(out) as f:
                res = json.load(f)
        return p.returncode, res, text, took
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class SoakShort(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not os.path.exists(evictd_bin()):
            raise RuntimeError("no evictd binary at %s (build it, or set EVICTD_BIN)" % evictd_bin())

    def assert_consistent(self, res, text):
        self.assertIsNotNone(res, "no results:\n" + text)
        self.assertGreater(res["changes"]["committed"], 100, text)
        self.assertGreater(res["timed"]["checks"], 500, text)
        self.assertEqual(res["outbox_left"], 0, text)
        self.assertEqual(res["lost"], 0, "lost changes: %s\n%s" % (res["deletes"]["missing_samples"], text))
        self.assertEqual(res["final"]["stale_unexplained"], 0,
                         "stale after quiesce: %s\n%s" % (res["final"]["samples"], text))
        self.assertEqual(res["crashes"], 0, "evictd crashed: %s\n%s" % (res["evictd"], text))
        self.assertEqual(res["dead_letters"]["count"], 0, "dead letters: %s\n%s" % (res["dead_letters"], text))
        self.assertEqual(res["evictd"]["final_exit"], 0, text)
        self.assertEqual(res["evictd"]["log"]["sanitizer_lines"], [], text)
        self.assertEqual(res["final"]["unexpected_keys"], [], text)
        self.assertEqual(res["apply"]["not_acked"], 0, text)

    def test_checker_sees_stale_without_evictd(self):
        rc, res, text, took = run_script("checker.py", ["--duration", "4", "--no-evictd"], 120)
        sys.stderr.write("\n  checker --no-evictd: %.1f s\n" % took)
        self.assertEqual(rc, 0, text)
        self.assertGreater(res["timed"]["stale_checks"]["unexplained"], 100, text)
        self.assertGreater(res["final"]["stale_unexplained"], 10, text)
        self.assertGreater(res["outbox_left"], 100, text)
        self.assertGreater(res["lost"], 0, text)

    def test_checker_brief(self):
        rc, res, text, took = run_script("checker.py", ["--duration", "10", "--redelete-ms", "50"], 180)
        sys.stderr.write("\n  checker 10 s: %.1f s\n" % took)
        self.assert_consistent(res, text)
        self.assertEqual(res["timed"]["stale_checks"]["unexplained"], 0,
                         "unexplained stale at timed checks: %s\n%s" % (res["timed"]["samples"]["unexplained"], text))
        self.assertEqual(res["race"]["escaped_redelete_outside_faults"], 0,
                         "stale values the re-delete should have removed: %s\n%s" % (res["race"]["escaped_samples"], text))
        self.assertEqual(rc, 0, text)

    def test_chaos_short(self):
        rc, res, text, took = run_script("chaos.py", ["--short"], 240)
        sys.stderr.write("\n  chaos --short: %.1f s\n" % took)
        self.assert_consistent(res, text)
        kinds = res["chaos"]["by_kind"]
        for k in ("redis_kill", "pg_restart", "evictd_kill", "redis_stop"):
            self.assertGreaterEqual(kinds.get(k, {}).get("count", 0), 1, "fault %s never injected\n%s" % (k, text))
        self.assertEqual(res["chaos"]["errors"], [], text)
        self.assertTrue(res["verdict"]["ok"], text)
        self.assertEqual(rc, 0, text)


def main():
    verbosity = 2 if "-v" in sys.argv else 1
    prog = unittest.main(exit=False, verbosity=verbosity)
    r = prog.result
    failed = len({t.id() for t, _ in r.failures + r.errors} | {t.id() for t in r.unexpectedSuccesses})
    passed = max(0, r.testsRun - failed - len(r.skipped))
    print("%d passed, %d failed" % (passed, failed))
    sys.exit(0 if failed == 0 and r.wasSuccessful() else 1)


if __name__ == "__main__":
    main()
