#!/usr/bin/env python3
"""peer_worker.py: the benchmark's peer, the invalidation worker a Django team would write.

It LISTENs on a PostgreSQL channel (psycopg2, autocommit), and for every poll batch of
notifications parses each payload with json, builds the same keys evictd's routex rules build
(`routex:1:products_list` and `routex:1:product_{id}` for the old and the new row image), and
deletes the batch's distinct keys with one redis-py pipeline of UNLINK commands (512 keys per
command, evictd's default batch size). It is meant to be the strongest *simple* worker: no
durability (what is sent while it is away is lost), no retry beyond reconnecting, no
dead-letter log.

    python3 tests/bench/peer_worker.py --dsn postgresql://postgres@127.0.0.1:PORT/postgres \
        --redis redis://127.0.0.1:PORT/0 [--channel evictd] [--max-seconds 3600]

Stops on SIGTERM/SIGINT or after --max-seconds. Payloads are the SPEC's change payloads
(notify-only: `old`/`new` images; a durable statement chunk's `rows` is handled too).
"""

import argparse
import json
import os
import select
import signal
import sys
import time

import psycopg2
import psycopg2.extensions
import redis

LIST_KEY = "routex:1:products_list"
KEYS_PER_COMMAND = 512

_running = True


def _stop(signum, frame):
    global _running
    _running = False


def images(change):
    """Row images of one parsed change (old and new; each element of `rows` for a chunk)."""
    for img in (change.get("old"), change.get("new")):
        if img:
            yield img
    for row in change.get("rows") or ():
        for img in (row.get("old"), row.get("new")):
            if img:
                yield img


def keys_for_batch(payloads, bad):
    keys = set()
    for payload in payloads:
        try:
            change = json.loads(payload)
        except ValueError:
            bad.append(payload)
            continue
        if change.get("table") != "products":
            continue
        keys.add(LIST_KEY)
        for img in images(change):
            pk = img.get("id")
            if pk is not None:
                keys.add(f"routex:1:product_{pk}")
    return keys


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--redis", required=True, help="redis://host:port/db")
    ap.add_argument("--channel", default="evictd")
    ap.add_argument("--max-seconds", type=float, default=3600.0, help="exit after this long (a bound)")
    args = ap.parse_args()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    deadline = time.monotonic() + args.max_seconds

    r = redis.Redis.from_url(args.redis, socket_timeout=5, socket_connect_timeout=5)
    conn = psycopg2.connect(args.dsn, connect_timeout=10, application_name="peer_worker")
    conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
    with conn.cursor() as cur:
        cur.execute("LISTEN " + psycopg2.extensions.quote_ident(args.channel, conn))

    bad = []
    changes = 0
    while _running and time.monotonic() < deadline:
        if not conn.notifies:
            try:
                select.select([conn], [], [], 0.5)
            except InterruptedError:
                continue
        conn.poll()
        if not conn.notifies:
            continue
        batch = conn.notifies
        conn.notifies = []
        changes += len(batch)
        keys = list(keys_for_batch((n.payload for n in batch), bad))
        if bad:
            sys.stderr.write("peer_worker: %d bad payload(s), first %r\n" % (len(bad), bad[0][:200]))
            bad.clear()
        for attempt in range(3):
            try:
                pipe = r.pipeline(transaction=False)
                for i in range(0, len(keys), KEYS_PER_COMMAND):
                    pipe.unlink(*keys[i:i + KEYS_PER_COMMAND])
                pipe.execute()
                break
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                sys.stderr.write("peer_worker: redis error (attempt %d): %s\n" % (attempt + 1, exc))
                time.sleep(0.05 * (attempt + 1))
    conn.close()
    sys.stderr.write("peer_worker: exiting after %d changes (pid %d)\n" % (changes, os.getpid()))


if __name__ == "__main__":
    main()
