#!/usr/bin/env python3
"""chaos.py: the consistency checker's traffic while servers and evictd are killed, restarted and frozen.

    python3 tests/soak/chaos.py [--duration S | --short] [--redelete-ms MS] [--json FILE] [checker options]

Runs tests/soak/checker.py's RouteX traffic (writers, get_or_set readers, MONITOR, timed checks) for
--duration seconds (default 300; --short: 25 s of traffic, under a minute in all) while a chaos
loop, after CALM seconds of normal operation each time, injects one fault at a time, cycling
through the kinds in a shuffled order:

  redis_kill    SIGKILL redis-server, keep it down 0.2-1.5 s, start it again on the same port
                (--save '' --appendonly no: every cached key is gone, which is consistent)
  pg_restart    pg_ctl stop -m fast + start (every connection is cut; in-flight COMMITs are
                resolved by the writers with txid_status())
  evictd_kill   SIGKILL evictd, keep it down 0.2-1.5 s, start it again (it must drain the outbox)
  redis_stop    SIGSTOP redis-server for 1.5-4 x evictd's redis timeout_ms, then SIGCONT

evictd runs with config/routex.json plus: durable capture (the default), redis timeout_ms 500,
retry max_attempts 100000, initial_backoff_ms 10, max_backoff_ms 500 (no dead letter is expected),
JSON logs. Its RSS (VmRSS, RssAnon) is sampled every 250 ms, per run (a restart starts a new run).

At the end it quiesces (writers stop, readers stop, the outbox must drain within
--quiesce-timeout), checks every key against the DB, and asserts:
  lost == 0                 outbox empty, and every (change, key) had a delete after its commit
  unexplained stale == 0    after quiescing, every key is absent or equal to the DB, or its stale
                            value is the read-before-write race (reported separately)
  crashes == 0              no evictd exit other than our SIGKILLs and a clean SIGTERM exit 0,
                            no sanitizer report in its log
  dead letters == 0         (each one would be listed with its reason)
Exit status 0 when all hold, 1 otherwise. Everything is stopped by PID; every wait is bounded.
"""

import argparse
import json
import os
import random
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import checker  # noqa: E402  (imports the harness, which may re-exec under /usr/bin/python3)
from checker import log  # noqa: E402

KINDS = ("redis_kill", "pg_restart", "evictd_kill", "redis_stop")


class Chaos:
    def __init__(self, run, opts):
        self.run = run
        self.opts = opts
        self.rnd = random.Random(opts.seed * 7919)
        self.stop_ev = threading.Event()
        self.done = []  # {"kind","start","end","detail"}
        self.errors = []
        self.thread = threading.Thread(target=self._loop, name="chaos", daemon=True)
        self.kinds = [k for k in opts.faults.split(",") if k]
        for k in self.kinds:
            if k not in KINDS:
                raise SystemExit("unknown fault kind %r (choose from %s)" % (k, ", ".join(KINDS)))
        if opts.no_evictd and "evictd_kill" in self.kinds:
            self.kinds.remove("evictd_kill")

    def start(self):
        self.thread.start()

    def _sleep(self, s):
        return self.stop_ev.wait(s)

    def _loop(self):
        order = []
        while not self.stop_ev.is_set():
            if self._sleep(self.rnd.uniform(self.opts.calm_min, self.opts.calm_max)):
                break
            if not order:
                order = list(self.kinds)
                self.rnd.shuffle(order)
            kind = order.pop(0)
            t0 = time.time()
            try:
                detail = getattr(self, "_" + kind)()
            except Exception as exc:  # record, restore, carry on
                detail = "error: %s" % exc
                self.errors.append("%s: %s" % (kind, exc))
                log("chaos %s failed: %s" % (kind, exc))
                self._restore()
            t1 = time.time()
            self.done.append({"kind": kind, "start": t0, "end": t1, "detail": detail})
            self.run.faults.append((t0, t1, kind))
            self.run.record_event(kind, detail)
            log("chaos: %s (%.2f s) %s" % (kind, t1 - t0, detail))

    # -- faults -------------------------------------------------------------------------------
    def _redis_kill(self):
        rd = self.run.rd
        down = self.rnd.uniform(0.2, 1.5)
        t = time.time()
        os.kill(rd.proc.pid, signal.SIGKILL)
        rd.proc.wait(timeout=10)
        self.run.wipes.append(t)
        self._sleep(down)
        rd.start()
        return "down %.2f s" % down

    def _pg_restart(self):
        t = time.time()
        self.run.pg.restart()
        return "restart took %.2f s" % (time.time() - t)

    def _evictd_kill(self):
        d = self.run.daemon
        down = self.rnd.uniform(0.2, 1.5)
        pid = d.proc.pid if d.proc else None
        d.kill()
        self._sleep(down)
        d.start()
        return "pid %s down %.2f s" % (pid, down)

    def _redis_stop(self):
        rd = self.run.rd
        frozen = self.rnd.uniform(1.5, 4.0) * self.opts.redis_timeout_ms / 1000.0
        rd.sigstop()
        try:
            time.sleep(frozen)  # not interruptible: SIGCONT must follow
        finally:
            rd.sigcont()
        return "frozen %.2f s (timeout_ms %d)" % (frozen, self.opts.redis_timeout_ms)

    def _restore(self):
        """Servers up and running again after a failed action (bounded)."""
        run = self.run
        try:
            if run.rd._stopped_by_signal:
                run.rd.sigcont()
            run.rd.start()
        except Exception as exc:
            self.errors.append("restore redis: %s" % exc)
        try:
            if not run.pg._running:
                run.pg.start()
        except Exception as exc:
            self.errors.append("restore postgres: %s" % exc)
        try:
            if run.daemon is not None and not run.daemon.running():
                run.daemon.start()
        except Exception as exc:
            self.errors.append("restore evictd: %s" % exc)

    def stop(self):
        self.stop_ev.set()
        self.thread.join(timeout=90)
        if self.thread.is_alive():
            self.errors.append("chaos thread did not stop within 90 s")
        self._restore()

    def report(self):
        by = {}
        for f in self.done:
            b = by.setdefault(f["kind"], {"count": 0, "total_s": 0.0, "max_s": 0.0})
            b["count"] += 1
            b["total_s"] = round(b["total_s"] + f["end"] - f["start"], 2)
            b["max_s"] = round(max(b["max_s"], f["end"] - f["start"]), 2)
        return {"faults": len(self.done), "by_kind": by, "errors": self.errors,
                "log": [{"kind": f["kind"], "at_s": round(f["start"] - self.run.traffic_started, 2),
                         "took_s": round(f["end"] - f["start"], 2), "detail": f["detail"]} for f in self.done]}


def verdict(res, max_lag_s=None):
    """(ok, [failed assertions])."""
    fails = []
    # Liveness: faults last at most ~2 s each, with calm between them, so a change that waits far
    # longer to be acknowledged was left behind by evictd (a stall until some later fault woke
    # it: once 20 s, until the next PostgreSQL restart).
    lag = res.get("apply", {}).get("lag_ms_max")
    if max_lag_s and max_lag_s > 0 and lag is not None and lag > max_lag_s * 1000:
        fails.append("apply lag max %.0f ms > %.0f s (slowest: %s)" % (
            lag, max_lag_s, res["apply"].get("slowest", [])[:3]))
    if res["lost"] != 0:
        fails.append("lost %d != 0 (outbox left %s, missing deletes %d)" % (
            res["lost"], res["outbox_left"], res["deletes"]["missing"]))
    if res["final"]["stale_unexplained"] != 0:
        fails.append("stale after quiesce, not the race: %d != 0: %s" % (
            res["final"]["stale_unexplained"], res["final"]["samples"][:3]))
    if res["crashes"] != 0:
        fails.append("crashes %d != 0: %s" % (res["crashes"], res.get("evictd", {}).get("unexpected_exits")))
    dl = res.get("dead_letters", {"count": 0})
    if dl["count"] != 0:
        fails.append("dead letters %d != 0: %s" % (dl["count"], dl["reasons"]))
    if res["chaos"] and res["chaos"]["errors"]:
        fails.append("chaos errors: %s" % res["chaos"]["errors"])
    return not fails, fails


def summary(res):
    t = res["timed"]
    sc = t["stale_checks"]
    ch = res["chaos"] or {"faults": 0, "by_kind": {}}
    runs = [x for x in res.get("evictd", {}).get("runs", []) if x.get("samples")]
    lines = ["", "== chaos soak: %s s of traffic, redelete_after_ms=%s" % (
        res["settings"]["duration_s"], res["settings"]["redelete_ms"])]
    lines.append("faults injected            %d  (%s)" % (ch["faults"], ", ".join(
        "%s %d (max %.1f s)" % (k, v["count"], v["max_s"]) for k, v in sorted(ch["by_kind"].items()))))
    lines.append("changes committed          %d  (COMMIT outcome resolved after a cut connection: %d)" % (
        res["changes"]["committed"], res["changes"]["commit_outcome_recovered"]))
    lines.append("lost                       %d  (outbox left %s; (change,key) pairs without a later delete %d of %d; "
                 "unverifiable %d)" % (res["lost"], res["outbox_left"], res["deletes"]["missing"],
                                       res["deletes"]["change_key_pairs"], res["deletes"]["unverifiable_monitor_gap"]))
    lines.append("stale after quiesce        unexplained %d, race %d  (of %d keys, %d cached)" % (
        res["final"]["stale_unexplained"], res["final"]["stale_race"], res["final"]["keys"], res["final"]["present"]))
    lines.append("race-stale                 %d timed checks (%d distinct values); %d stale fills of %d (%s), "
                 "staleness p50 %s / p99 %s / max %s ms" % (
                     sc["race"], t["stale_values"]["race"], res["race"]["stale_fills"], res["race"]["fills"],
                     checker._pct(res["race"]["stale_fill_ratio"], 3), res["race"]["staleness_ms_p50"],
                     res["race"]["staleness_ms_p99"], res["race"]["staleness_ms_max"]))
    lines.append("timed checks               %d; late (evictd behind a fault) %d, unexplained %d, indeterminate %d; "
                 "consistency %s" % (t["checks"], sc["late"], sc["unexplained"], sc["indeterminate"],
                                     checker._pct(t["consistency"])))
    lines.append("invalidation lag           p50 %s ms, p99 %s ms, max %s ms (commit -> next UNLINK of the key)" % (
        res["deletes"]["lag_ms_p50"], res["deletes"]["lag_ms_p99"], res["deletes"]["lag_ms_max"]))
    ap = res["apply"]
    lines.append("apply lag                  p50 %s ms, p99 %s ms, max %s ms (commit -> outbox row acked); "
                 "not acked %d" % (ap["lag_ms_p50"], ap["lag_ms_p99"], ap["lag_ms_max"], ap["not_acked"]))
    lines.append("crashes                    %d  (evictd runs %d; final SIGTERM exit %s; sanitizer lines %d)" % (
        res["crashes"], len(res.get("evictd", {}).get("runs", [])), res.get("evictd", {}).get("final_exit"),
        len(res.get("evictd", {}).get("log", {}).get("sanitizer_lines", []))))
    if runs:
        longest = max(runs, key=lambda x: x["uptime_s"])
        lines.append("evictd RSS (longest run)   start %d kB, peak %d kB, end %d kB over %.0f s (RssAnon %s/%s/%s kB); "
                     "at 25/50/75%% of the run %s/%s/%s kB" % (
                         longest["start_kb"], longest["peak_kb"], longest["end_kb"], longest["uptime_s"],
                         longest["anon_start_kb"], longest["anon_peak_kb"], longest["anon_end_kb"],
                         longest["q25_kb"], longest["mid_kb"], longest["q75_kb"]))
        lines.append("evictd RSS (all runs)      start %d-%d kB, peak max %d kB, end %d-%d kB" % (
            min(x["start_kb"] for x in runs), max(x["start_kb"] for x in runs), max(x["peak_kb"] for x in runs),
            min(x["end_kb"] for x in runs), max(x["end_kb"] for x in runs)))
    dl = res.get("dead_letters", {"count": 0, "reasons": {}})
    lines.append("dead letters               %d %s" % (dl["count"], dl["reasons"] or "(none expected)"))
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    checker.add_args(ap, 300.0)
    ap.add_argument("--short", action="store_true", help="25 s of traffic, faults every 1-2.5 s (under a minute)")
    ap.add_argument("--calm-min", type=float, default=None, help="least calm time between faults (default 2, short 1)")
    ap.add_argument("--calm-max", type=float, default=None, help="most calm time between faults (default 6, short 2.5)")
    ap.add_argument("--faults", default=",".join(KINDS), help="comma-separated fault kinds (default all)")
    ap.add_argument("--per-run", action="store_true", help="print RSS for every evictd run")
    ap.add_argument("--max-lag-s", type=float, default=15.0,
                    help="fail when a change waits longer than this from commit to its outbox row's ack (15; 0: no bound)")
    opts = ap.parse_args(argv)
    if opts.short and "--duration" not in " ".join(argv if argv is not None else sys.argv):
        opts.duration = 25.0
    if opts.calm_min is None:
        opts.calm_min = 1.0 if opts.short else 2.0
    if opts.calm_max is None:
        opts.calm_max = 2.5 if opts.short else 6.0
    if opts.short:
        opts.quiesce_timeout = min(opts.quiesce_timeout, 30.0)
    if not opts.no_evictd and not os.path.exists(checker.evictd_bin()):
        sys.exit("no evictd binary at %s (build it, or set EVICTD_BIN)" % checker.evictd_bin())
    res = checker.run(opts, chaos_factory=lambda run: Chaos(run, opts))
    ok, fails = verdict(res, None if opts.no_evictd else opts.max_lag_s)
    res["verdict"] = {"ok": ok, "failed": fails}
    print("\n".join(checker.summary_lines(res)))
    print("\n".join(summary(res)))
    if opts.per_run:
        for x in res.get("evictd", {}).get("runs", []):
            print("  evictd run %s" % json.dumps(x))
    print("chaos verdict: %s" % ("PASS" if ok else "FAIL: " + "; ".join(fails)))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
