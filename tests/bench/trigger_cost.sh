#!/usr/bin/env bash
# trigger_cost.sh: what evictd's durable capture trigger costs a writer, next to a bare trigger.
#
# Starts a throwaway PostgreSQL (temp dir, free 127.0.0.1 port; run through `runuser -u
# postgres` when root, as tests/integration/harness.py does), creates
# products(id int PRIMARY KEY, stock int) with 100,000 rows and runs
#   pgbench -n -c 8 -j 2 -T 8 -M prepared   \set id random(1, N)
#                                           UPDATE products SET stock = stock + 1 WHERE id = :id;
# once per capture mode and repetition, modes interleaved (their order rotates each
# repetition), first with fsync=off and then with fsync=on (synchronous_commit=on both times).
# Capture modes:
#   none      no trigger
#   bare      a bare plpgsql AFTER ROW trigger inserting one jsonb row (table, op, old and new
#             id, ts) into a plain table, nothing drains it (the reference of issue 4)
#   durable   evictd's durable capture: sql/install.sql, then
#             evictd.watch('public.products', ARRAY['id']) (what `evictd sql` generates)
#   NAME      (-i NAME=FILE) the same with another install.sql, e.g. an older revision:
#             git show HEAD:sql/install.sql > /tmp/old.sql; trigger_cost.sh -i before=/tmp/old.sql
#             (each switch drops schema evictd and installs the mode's file afresh)
# Prints per fsync setting: median TPS (min-max) of each mode, the ratio of medians to no
# trigger and to the bare trigger, and the range of per-repetition ratios (modes of one
# repetition run seconds apart, so those compare like with like on a loaded machine). Checks
# that each run wrote one outbox row per transaction and, at the end, what one 100,000-row
# UPDATE costs and how many outbox rows (chunks of <= 500 images) it writes per mode.
#
# Options: -r REPS (3)  -T SECONDS per run (8)  -n ROWS (100000)  -f FSYNCS (off,on)
#          -m MODES (none,bare,durable)  -i NAME=INSTALL_FILE (repeatable, appended to modes)
#          -k keep the temp dir   -h help
# Needs the PostgreSQL server binaries (PG_BINDIR or /usr/lib/postgresql/*/bin), psql, pgbench.
# Never touches 5432; every wait is bounded; the server is stopped with pg_ctl stop -m fast
# (by the PID in postmaster.pid if that fails) and the temp dir removed, also on ^C.
set -euo pipefail

REPS=3 SECS=8 ROWS=100000 FSYNCS="off,on" MODES="none,bare,durable" KEEP=0
declare -A INSTALL_OF=()
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
INSTALL_OF[durable]="$REPO/sql/install.sql"

die() { echo "trigger_cost: $*" >&2; exit 2; }
log() { echo "[$(date +%T)] $*" >&2; }

while getopts "r:T:n:f:m:i:kh" opt; do
    case $opt in
        r) REPS=$OPTARG ;;
        T) SECS=$OPTARG ;;
        n) ROWS=$OPTARG ;;
        f) FSYNCS=$OPTARG ;;
        m) MODES=$OPTARG ;;
        i) name=${OPTARG%%=*} file=${OPTARG#*=}
           [[ $name =~ ^[A-Za-z0-9_.-]+$ && $name != "$OPTARG" ]] || die "-i wants NAME=FILE"
           [[ -r $file ]] || die "cannot read $file"
           INSTALL_OF[$name]=$(cd "$(dirname "$file")" && pwd)/$(basename "$file")
           MODES="$MODES,$name" ;;
        k) KEEP=1 ;;
        h) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "bad option (-h for help)" ;;
    esac
done
[[ $REPS =~ ^[1-9][0-9]*$ && $SECS =~ ^[1-9][0-9]*$ && $ROWS =~ ^[1-9][0-9]*$ ]] || die "-r, -T, -n take positive integers"
IFS=, read -r -a MODE_LIST <<< "$MODES"
IFS=, read -r -a FSYNC_LIST <<< "$FSYNCS"
for m in "${MODE_LIST[@]}"; do
    [[ $m == none || $m == bare || -n ${INSTALL_OF[$m]:-} ]] || die "unknown mode $m"
done
for f in "${FSYNC_LIST[@]}"; do [[ $f == on || $f == off ]] || die "fsync is on or off, not $f"; done

# -- server binaries ------------------------------------------------------------------------------
if [[ -n ${PG_BINDIR:-} ]]; then
    BIN=$PG_BINDIR
else
    BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -n | tail -n1)
    [[ -n $BIN && -x $BIN/initdb ]] || BIN=$(dirname "$(command -v initdb || echo /nonexistent/initdb)")
fi
[[ -x $BIN/initdb && -x $BIN/pg_ctl ]] || die "no PostgreSQL server binaries (set PG_BINDIR)"
PSQL_BIN=$BIN/psql; [[ -x $PSQL_BIN ]] || PSQL_BIN=$(command -v psql)
PGBENCH_BIN=$BIN/pgbench; [[ -x $PGBENCH_BIN ]] || PGBENCH_BIN=$(command -v pgbench)

# -- throwaway server -----------------------------------------------------------------------------
WORK=$(mktemp -d /tmp/evictd-trigcost-XXXXXX)
DATA=$WORK/data
RUNNING=0
CHILD=""
as_pg() { if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[[ $(id -u) -eq 0 ]] && chown postgres: "$WORK"
chmod 700 "$WORK"

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $CHILD ]]; then
        kill "$CHILD" 2>/dev/null || true
        wait "$CHILD" 2>/dev/null || true
    fi
    if [[ $RUNNING -eq 1 ]]; then
        if ! as_pg timeout 60 "$BIN/pg_ctl" stop -D "$DATA" -m fast -w -t 30 >/dev/null 2>&1; then
            local pid
            pid=$(head -n1 "$DATA/postmaster.pid" 2>/dev/null || true)
            if [[ $pid =~ ^[0-9]+$ ]]; then
                kill -QUIT "$pid" 2>/dev/null || true
            fi
        fi
    fi
    if [[ $KEEP -eq 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
[[ $PORT != 5432 && $PORT != 6379 ]] || die "refusing port $PORT"
log "initdb in $WORK, port $PORT"
as_pg timeout 120 "$BIN/initdb" -D "$DATA" -A trust --nosync -U postgres -E UTF8 --locale=C >"$WORK/initdb.log" 2>&1 \
    || { cat "$WORK/initdb.log" >&2; die "initdb failed"; }
OPTS="-p $PORT -k $WORK -c listen_addresses=127.0.0.1 -c max_connections=60 -c shared_buffers=256MB -c max_wal_size=4GB"
as_pg timeout 60 "$BIN/pg_ctl" start -D "$DATA" -l "$WORK/log" -w -t 30 -o "$OPTS" >/dev/null \
    || { tail -n 30 "$WORK/log" >&2; die "pg_ctl start failed"; }
RUNNING=1

export PGCONNECT_TIMEOUT=10
unset PGPASSWORD PGSERVICE
export PGOPTIONS="-c client_min_messages=warning"
q() {  # q SQL...: run through psql, unaligned tuples only, bounded
    timeout 600 "$PSQL_BIN" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -c "$*"
}
qf() {  # qf FILE
    timeout 600 "$PSQL_BIN" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -f "$1" >/dev/null
}

set_fsync() {
    q "ALTER SYSTEM SET fsync = $1" >/dev/null
    q "ALTER SYSTEM SET synchronous_commit = on" >/dev/null
    q "SELECT pg_reload_conf()" >/dev/null
    local i
    for i in $(seq 100); do
        [[ $(q "SELECT current_setting('fsync')") == "$1" ]] && { q "CHECKPOINT"; return; }
        sleep 0.1
    done
    die "fsync did not change to $1"
}

log "products: $ROWS rows; bare trigger function"
q "CREATE TABLE products (id int PRIMARY KEY, stock int NOT NULL DEFAULT 0);
   INSERT INTO products (id, stock) SELECT g, 0 FROM generate_series(1, $ROWS) AS g;
   CREATE TABLE bench_outbox (id bigserial PRIMARY KEY, payload jsonb NOT NULL);" >/dev/null
qf "$HERE/bare_capture.sql"
q "VACUUM ANALYZE products" >/dev/null

CURRENT=""
set_mode() {  # set_mode MODE: the capture on products (drops whatever was there)
    [[ $1 == "$CURRENT" ]] && return
    q "DROP TRIGGER IF EXISTS bench_bare ON products; DROP SCHEMA IF EXISTS evictd CASCADE" >/dev/null
    case $1 in
        none) ;;
        bare) q "CREATE TRIGGER bench_bare AFTER INSERT OR UPDATE OR DELETE ON products
                 FOR EACH ROW EXECUTE FUNCTION bench_bare_capture()" >/dev/null ;;
        *) qf "${INSTALL_OF[$1]}"
           q "SELECT evictd.watch('\"public\".\"products\"', ARRAY['id']::text[], 'evictd', true)" >/dev/null ;;
    esac
    CURRENT=$1
}

outbox_rows() {  # outbox_rows MODE: rows its capture wrote
    case $1 in
        none) echo 0 ;;
        bare) q "SELECT count(*) FROM bench_outbox" ;;
        *) q "SELECT count(*) FROM evictd.outbox" ;;
    esac
}

clear_outboxes() {
    q "TRUNCATE bench_outbox" >/dev/null
    q "DO \$\$ BEGIN IF to_regclass('evictd.outbox') IS NOT NULL THEN TRUNCATE evictd.outbox; END IF; END \$\$" >/dev/null
}

SCRIPT=$WORK/update.sql
printf '\\set id random(1, %d)\nUPDATE products SET stock = stock + 1 WHERE id = :id;\n' "$ROWS" > "$SCRIPT"
chmod 644 "$SCRIPT"

LAST_TPS=""
run_pgbench() {  # run_pgbench MODE: sets LAST_TPS
    set_mode "$1"
    clear_outboxes
    q "VACUUM products" >/dev/null
    q "VACUUM bench_outbox" >/dev/null
    q "CHECKPOINT" >/dev/null
    local out tps xacts rows rc=0
    # In the background and waited for, so that ^C / TERM interrupt at once (cleanup stops it).
    timeout $((SECS + 120)) "$PGBENCH_BIN" -n -h 127.0.0.1 -p "$PORT" -U postgres -c 8 -j 2 -T "$SECS" \
        -M prepared -f "$SCRIPT" postgres >"$WORK/pgbench.out" 2>&1 &
    CHILD=$!
    wait "$CHILD" || rc=$?
    CHILD=""
    out=$(cat "$WORK/pgbench.out")
    [[ $rc -eq 0 ]] || { echo "$out" >&2; die "pgbench failed ($1)"; }
    tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p' <<< "$out")
    xacts=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<< "$out")
    [[ -n $tps && -n $xacts ]] || { echo "$out" >&2; die "no tps in pgbench output"; }
    rows=$(outbox_rows "$1")
    if [[ $1 != none && $rows != "$xacts" ]]; then
        log "WARNING: $1 wrote $rows outbox rows for $xacts transactions"
    fi
    LAST_TPS=$tps
}

median() { tr ' ' '\n' | grep . | sort -g | awk '{v[NR] = $1} END {if (NR == 0) print ""; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
minmax() { tr ' ' '\n' | grep . | sort -g | awk 'NR == 1 {lo = $1} {hi = $1} END {printf "%.0f-%.0f", lo, hi}'; }

declare -A TPS=()   # TPS[fsync,mode] = "t1 t2 t3" (by repetition)
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
log "modes: ${MODE_LIST[*]}; fsync: ${FSYNC_LIST[*]}; $REPS repetitions of ${SECS}s; load average $LOAD0"
for fs in "${FSYNC_LIST[@]}"; do
    set_fsync "$fs"
    for ((rep = 0; rep < REPS; rep++)); do
        n=${#MODE_LIST[@]}
        for ((k = 0; k < n; k++)); do
            m=${MODE_LIST[$(((k + rep) % n))]}
            run_pgbench "$m"
            TPS[$fs,$m]="${TPS[$fs,$m]:-} $LAST_TPS"
            log "fsync=$fs rep $((rep + 1))/$REPS $m: $LAST_TPS TPS"
        done
    done
done

# -- one big UPDATE per mode: statement time and outbox rows (chunks) --------------------------------
declare -A BULK=()
set_fsync off
for m in "${MODE_LIST[@]}"; do
    [[ $m == none ]] && continue
    set_mode "$m"
    clear_outboxes
    q "VACUUM products" >/dev/null
    ms=$(q "DO \$\$ DECLARE t timestamptz := clock_timestamp(); BEGIN
              UPDATE products SET stock = stock + 1;
              RAISE WARNING 'ms=%', round(EXTRACT(epoch FROM clock_timestamp() - t) * 1000);
            END \$\$" 2>&1 | sed -n 's/.*ms=\([0-9]*\).*/\1/p')
    BULK[$m]="$ms ms, $(outbox_rows "$m") outbox rows"
    log "bulk $m: ${BULK[$m]}"
done
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)

# -- report ---------------------------------------------------------------------------------------
echo
echo "trigger_cost.sh: pgbench -n -c 8 -j 2 -T $SECS -M prepared, single-row UPDATE on $ROWS rows, $REPS repetitions"
echo "PostgreSQL $(q 'SHOW server_version'), $(nproc) cores, load average $LOAD0 -> $LOAD1," \
     "source $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo '?')"
for fs in "${FSYNC_LIST[@]}"; do
    echo
    echo "fsync=$fs, synchronous_commit=on: median TPS (min-max); ratios of medians (per-repetition range)"
    printf '  %-10s %-22s %-22s %-22s\n' mode TPS "vs none" "vs bare"
    for m in "${MODE_LIST[@]}"; do
        read -r -a mine <<< "${TPS[$fs,$m]}"
        med=$(median <<< "${mine[*]}")
        cells=()
        for ref in none bare; do
            if [[ -z ${TPS[$fs,$ref]:-} ]]; then cells+=("-"); continue; fi
            read -r -a theirs <<< "${TPS[$fs,$ref]}"
            rmed=$(median <<< "${theirs[*]}")
            per=""
            for ((i = 0; i < ${#mine[@]}; i++)); do per+=" $(awk -v a="${mine[$i]}" -v b="${theirs[$i]}" 'BEGIN {printf "%.3f", a / b}')"; done
            cells+=("$(awk -v a="$med" -v b="$rmed" 'BEGIN {printf "%.2f", a / b}') ($(tr ' ' '\n' <<< "$per" | grep . | sort -g | awk 'NR == 1 {lo = $1} {hi = $1} END {printf "%.2f-%.2f", lo, hi}'))")
        done
        printf '  %-10s %-22s %-22s %-22s\n' "$m" "$(printf '%.0f' "$med") ($(minmax <<< "${mine[*]}"))" "${cells[0]}" "${cells[1]}"
    done
done
if [[ ${#BULK[@]} -gt 0 ]]; then
    echo
    echo "one UPDATE of all $ROWS rows (fsync=off): statement time, outbox rows written"
    for m in "${MODE_LIST[@]}"; do [[ -n ${BULK[$m]:-} ]] && printf '  %-10s %s\n' "$m" "${BULK[$m]}"; done
fi
exit 0
