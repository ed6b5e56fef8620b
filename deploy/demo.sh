#!/usr/bin/env bash
# demo.sh: builds evictd, starts a throwaway PostgreSQL and Redis on loopback, installs the
# capture for the RouteX sample tables, runs evictd with config/routex.json and shows it
# deleting exactly the cache keys each committed write makes stale. Everything is removed at exit.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

"$root/deploy/install-deps.sh"
cmake -S "$root" -B "$root/build" -DEVD_WERROR=ON >/dev/null
cmake --build "$root/build" -j"$(nproc)" --target evictd >/dev/null

PGBIN=/usr/lib/postgresql/15/bin
tmp=$(mktemp -d /tmp/evictd-demo.XXXXXX)
chmod 755 "$tmp"
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" -eq 0 ] && chown postgres "$tmp"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
pgport=$(free_port)
rport=$(free_port)
evictd_pid=""
redis_pid=""

cleanup() {
    [ -n "$evictd_pid" ] && kill "$evictd_pid" 2>/dev/null && wait "$evictd_pid" 2>/dev/null
    [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null && wait "$redis_pid" 2>/dev/null
    as_pg "$PGBIN/pg_ctl" -D "$tmp/data" stop -m fast >/dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "starting PostgreSQL on 127.0.0.1:$pgport and Redis on 127.0.0.1:$rport (in $tmp)"
as_pg "$PGBIN/initdb" -D "$tmp/data" -A trust --nosync -U postgres >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$tmp/data" -l "$tmp/pg.log" -w \
    -o "-p $pgport -k $tmp -c listen_addresses=127.0.0.1" start >/dev/null
redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --dir "$tmp" \
    --daemonize no >"$tmp/redis.log" 2>&1 &
redis_pid=$!
for _ in $(seq 1 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.05; done

sql() { psql -X -q -h 127.0.0.1 -p "$pgport" -U postgres -d postgres -v ON_ERROR_STOP=1 "$@"; }
rcli() { redis-cli -p "$rport" -n 1 "$@"; }

say "installing evictd's schema and the RouteX tables"
sql -f sql/install.sql >/dev/null
sql >/dev/null <<'SQL'
CREATE TABLE products (id serial PRIMARY KEY, name text NOT NULL, stock int NOT NULL DEFAULT 0);
CREATE TABLE drivers (id serial PRIMARY KEY, user_id int NOT NULL, is_active bool NOT NULL DEFAULT true);
CREATE TABLE shipments (id serial PRIMARY KEY, product_id int REFERENCES products,
                        driver_id int REFERENCES drivers, status text NOT NULL DEFAULT 'new');
INSERT INTO products (name, stock) VALUES ('pallet', 10), ('crate', 5), ('drum', 7), ('box', 3);
INSERT INTO drivers (user_id) VALUES (101), (102);
INSERT INTO shipments (product_id, driver_id) VALUES (3, 1);
SQL

export DATABASE_URL="postgresql://postgres@127.0.0.1:$pgport/postgres"
export REDIS_URL="redis://127.0.0.1:$rport/1"
export EVICTD_DEAD_LETTER="$tmp/dead-letter.jsonl"

say "evictd check --config config/routex.json"
build/evictd check --config config/routex.json
say "evictd sql --config config/routex.json | psql"
build/evictd sql --config config/routex.json | tee /dev/stderr | sql >/dev/null
say "evictd check --connect"
build/evictd check --connect --config config/routex.json | tail -n 6

say "evictd run --config config/routex.json"
build/evictd run --config config/routex.json --log-level debug 2>"$tmp/evictd.log" &
evictd_pid=$!
tail -n +1 -f --pid="$evictd_pid" "$tmp/evictd.log" | sed -u 's/^/  evictd | /' &
sleep 1

fill() {
    rcli SET routex:1:products_list '[...]' >/dev/null
    for k in 1 2 3 4; do rcli SET "routex:1:product_$k" "{\"id\":$k}" >/dev/null; done
    rcli SET routex:1:drivers_list '[...]' >/dev/null
    rcli SET routex:1:driver_status_101 active >/dev/null
    rcli SET routex:1:driver_status_102 active >/dev/null
    rcli SET 'routex:1:views.decorators.cache.cache_page..GET.5f3a.d41d.en-us.UTC' '<html>' >/dev/null
}
show() { printf '  redis keys: %s\n' "$(rcli --raw KEYS 'routex:*' | sort | tr '\n' ' ')"; }

step() {
    fill
    say "$1"
    show
    printf '  psql> %s\n' "$2"
    sql -c "$2" >/dev/null
    sleep 0.5
    show
}

step "a product's stock changes: products_list, product_2 and the cache_page entries go" \
     "UPDATE products SET stock = stock - 1 WHERE id = 2"
step "a shipment moves from product 3 to 4 and from driver 1 (user 101) to 2 (user 102)" \
     "UPDATE shipments SET product_id = 4, driver_id = 2 WHERE id = 1"
step "a driver goes inactive" \
     "UPDATE drivers SET is_active = false WHERE id = 1"
step "a rolled-back write deletes nothing" \
     "BEGIN; DELETE FROM shipments; ROLLBACK"
step "raw SQL that bypasses Django entirely (a bulk update) is seen too" \
     "UPDATE products SET stock = stock + 100"

say "done: stopping evictd with SIGTERM"
kill "$evictd_pid" 2>/dev/null || true
wait "$evictd_pid" 2>/dev/null || true
evictd_pid=""
sleep 0.3
