#!/usr/bin/env python3
"""drain_cost.py: the CPU a drain costs per change at a fixed write rate.

At saturation (bench.py's write path) pgbench TPS moves 10-20 % between runs on a shared 2-core
machine. At a fixed rate (pgbench -R) the writers' throughput is the same in every mode and what
differs is the machine's busy time (/proc/stat: user, nice, system, irq, softirq): its
CPU per transaction, and the difference between a drained mode and its undrained twin is what
the drain costs per change, whoever spends it (evictd, its claim and LISTEN backends, Redis,
the writers' NOTIFYs, autovacuum).

    python3 tests/bench/drain_cost.py [--rate 2000] [--secs 10] [--reps 3] [--fsync off]

Modes: durable_trigger (evictd's capture, evictd not running, the flag at 0), durable (evictd
running: at light load under a lease every write rings), bare (bare_capture.sql's trigger) and
bare_drained (the same, emptied by bench.py's BareDrain loop every 12 ms). Prints the CPU per
transaction of each (median of the repetitions) and the two drains' cost per change, and, with
--counts, evictd's own counts at exit (doorbells, claims, rows claimed). Uses bench.py's
servers: throwaway PostgreSQL and Redis on free 127.0.0.1 ports, stopped by PID; every run is
bounded by a timeout.
"""

import argparse
import os
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench  # noqa: E402  (re-executes under /usr/bin/python3 when psycopg2 is missing)
from bench import Bench  # noqa: E402

MODES = ("durable_trigger", "durable", "bare", "bare_drained")


def busy_ticks():
    """CPU ticks the machine spent: user, nice, system, irq, softirq (not idle, iowait, or steal,
    time the hypervisor gave to others; guest time is in user already)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[0] + v[1] + v[2] + v[5] + v[6]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--rate", type=int, default=2000, help="pgbench -R, transactions/s (2000)")
    ap.add_argument("--secs", type=int, default=10, help="seconds per run (10; the middle secs-2 are measured)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fsync", default="off", choices=("on", "off"))
    ap.add_argument("--counts", action="store_true", help="evictd at log level info: its counts at exit")
    ap.add_argument("--evictd", default=os.environ.get("EVICTD_BIN") or os.path.join(bench.ROOT, "build", "evictd"))
    a = ap.parse_args()
    modes = a.modes.split(",")
    if any(m not in MODES for m in modes) or a.secs < 4 or a.reps < 1 or a.rate < 1:
        ap.error("modes from %s, --secs >= 4, --reps >= 1, --rate >= 1" % ",".join(MODES))
    if not os.access(a.evictd, os.X_OK):
        ap.error("no evictd binary at %s (build it, or --evictd)" % a.evictd)
    args = argparse.Namespace(fsync=a.fsync, synchronous_commit="on", evictd=a.evictd,
                              evictd_log_level="info" if a.counts else "warn", sizes=dict(bench.FULL),
                              reps=1, write_reps=1, keep=False, perf=None, json=None)
    hz = os.sysconf("SC_CLK_TCK")
    b = Bench(args)
    per_tx = {m: [] for m in modes}
    try:
        b.reset_products(100000)
        for rep in range(a.reps):
            for mode in modes:
                proc, drain = b.write_mode(mode, a.secs)
                got = {}

                def sample():
                    time.sleep(1.0)
                    c0, t0 = busy_ticks(), time.monotonic()
                    time.sleep(a.secs - 2.0)
                    got["cores"] = (busy_ticks() - c0) / hz / (time.monotonic() - t0)

                th = threading.Thread(target=sample)
                th.start()
                try:
                    tps = b.pgbench(a.secs, rate=a.rate)
                finally:
                    th.join(a.secs + 5)
                    if drain:
                        drain.finish()
                    if proc:
                        b.stop_worker(proc)
                if "cores" not in got:
                    raise bench.HarnessError("the CPU sampler did not finish")
                us = got["cores"] / tps * 1e6
                per_tx[mode].append(us)
                extra = ""
                if proc and a.counts:
                    with open(proc.logpath) as f:
                        stopped = [line.strip() for line in f if "msg=stopped" in line]
                    extra = "  " + (stopped[-1].split("msg=stopped", 1)[1] if stopped else "")
                bench.log("rep %d %-15s %6.0f TPS, %.2f cores busy: %.1f us CPU per transaction%s"
                          % (rep + 1, mode, tps, got["cores"], us, extra))
    finally:
        b.cleanup()
    print("pgbench -c 8 -j 2 -R %d -T %d, single-row UPDATE, fsync=%s; machine CPU per transaction, "
          "median of %d (min-max):" % (a.rate, a.secs, a.fsync, a.reps))
    for mode in modes:
        v = per_tx[mode]
        print("  %-15s %7.1f us (%.1f-%.1f)" % (mode, statistics.median(v), min(v), max(v)))
    for drained, alone, what in (("durable", "durable_trigger", "evictd"), ("bare_drained", "bare", "bare SQL loop")):
        if per_tx.get(drained) and per_tx.get(alone):
            print("  drain cost, %-14s %7.1f us per change" % (what + ":", statistics.median(per_tx[drained])
                                                               - statistics.median(per_tx[alone])))


if __name__ == "__main__":
    main()
