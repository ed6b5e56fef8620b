#!/usr/bin/env python3
"""race.py: the read-before-write race with evictd's batch.redelete_after_ms off and on.

    python3 tests/soak/race.py [--values 0,50] [--duration S] [--json FILE] [checker options]

Runs tests/soak/checker.py once per redelete_after_ms value (same seed, same traffic settings,
fresh servers each time) and prints a table:

  race-stale checks    timed checks (CHECK_DELAY after a commit) that found a value stale because
                       of the race: a reader read the DB before the change committed and SET its
                       value after evictd had deleted the key
  stale fills          every fill that landed already stale that way, seen by a check or not
  staleness            how long such a value stayed (from the later of its SET and the commit it
                       missed, to its key's next UNLINK): the re-delete cuts it to about the delay
  not coverable        stale fills whose reader took longer from DB read to SET than the delay:
                       a re-delete that fires before the stale SET cannot remove it
  UNLINKed keys/change the cost: keys UNLINKed per committed change (the re-delete sends each
                       key once more after the delay, deduplicated across the batches due together)
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import checker  # noqa: E402


def row(v, res):
    t, rc, d = res["timed"], res["race"], res["deletes"]
    ch = res["changes"]["committed"] or 1
    return {
        "redelete_after_ms": v,
        "changes": res["changes"]["committed"],
        "checks": t["checks"],
        "race_stale_checks": t["stale_checks"]["race"],
        "race_stale_ratio": (t["stale_checks"]["race"] / t["checks"]) if t["checks"] else None,
        "race_stale_values": t["stale_values"]["race"],
        "unexplained": t["stale_checks"]["unexplained"] + res["final"]["stale_unexplained"],
        "late": t["stale_checks"]["late"],
        "consistency": t["consistency"],
        "fills": rc["fills"],
        "stale_fills": rc["stale_fills"],
        "stale_fill_ratio": rc["stale_fill_ratio"],
        "not_coverable": rc["stale_fills_read_to_set_over_redelete"],
        "stale_p50_ms": rc["staleness_ms_p50"], "stale_p99_ms": rc["staleness_ms_p99"],
        "stale_max_ms": rc["staleness_ms_max"], "stale_ms_total": rc["stale_ms_total"],
        "final_race_stale": res["final"]["stale_race"],
        "unlink_cmds_per_change": round(d["unlink_commands"] / ch, 2),
        "unlinked_keys_per_change": round(d["unlinked_keys"] / ch, 2),
        "lag_p50_ms": d["lag_ms_p50"], "lag_p99_ms": d["lag_ms_p99"],
        "lost": res["lost"], "crashes": res["crashes"],
    }


def table(rows):
    cols = [("redelete_after_ms", "redelete ms"), ("changes", "changes"), ("checks", "keys checked"),
            ("race_stale_checks", "race-stale checks"), ("race_stale_ratio", "race-stale ratio"),
            ("consistency", "consistency"), ("stale_fills", "stale fills"), ("stale_fill_ratio", "of fills"),
            ("not_coverable", "not coverable"), ("stale_p50_ms", "staleness p50 ms"),
            ("stale_p99_ms", "p99 ms"), ("stale_max_ms", "max ms"), ("stale_ms_total", "stale ms total"),
            ("final_race_stale", "race-stale at end"), ("unexplained", "unexplained"),
            ("unlinked_keys_per_change", "UNLINKed keys/change"), ("unlink_cmds_per_change", "UNLINK cmds/change")]
    fmt = []
    for r in rows:
        cells = []
        for k, _ in cols:
            v = r[k]
            if k in ("race_stale_ratio", "stale_fill_ratio"):
                v = checker._pct(v, 4)
            elif k == "consistency":
                v = checker._pct(v, 4)
            cells.append(str(v))
        fmt.append(cells)
    out = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(c) + " |" for c in fmt]
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    checker.add_args(ap, 60.0)
    ap.add_argument("--values", default="0,50", help="redelete_after_ms values to compare (default %(default)s)")
    opts = ap.parse_args(argv)
    if not os.path.exists(checker.evictd_bin()):
        sys.exit("no evictd binary at %s (build it, or set EVICTD_BIN)" % checker.evictd_bin())
    rows, full = [], {}
    for v in [int(x) for x in opts.values.split(",") if x.strip()]:
        opts.redelete_ms = v
        checker.log("== redelete_after_ms=%d" % v)
        res = checker.run(opts)
        print("\n".join(["-- redelete_after_ms=%d" % v] + checker.summary_lines(res)))
        rows.append(row(v, res))
        full[str(v)] = res
    print()
    print(table(rows))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"rows": rows, "runs": full}, f, indent=1, default=str)
    bad = [r for r in rows if r["unexplained"] or r["lost"] or r["crashes"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
