#!/usr/bin/env bash
# run.sh - builds the libFuzzer harnesses with clang and runs each for a while.
#
# usage: tests/fuzz/run.sh [-t SECONDS] [-j N] [-b BUILD_DIR] [--no-minimize] [HARNESS...]
#   HARNESS      payload, template or config (default: all three, one after another)
#   -t SECONDS   run time per harness (default 60, or $FUZZ_TIME)
#   -j N         harnesses run at once (default 1; the machine is shared, keep it <= 2)
#   -b DIR       build and work directory (default build-fuzz/ at the top, git-ignored)
#   -s DIR       take the src/*.c files from DIR instead of src/ (e.g. a patched copy, to fuzz
#                on past a known bug without touching src/)
#   --no-minimize  copy crashes as found, without -minimize_crash=1
#
# Each harness fuzzes from a working corpus (DIR/corpus/<harness>, where libFuzzer adds the
# inputs it finds) seeded from tests/fuzz/corpus/<harness> (read only). Any crash, leak, timeout
# or out-of-memory input is minimised and copied to tests/fuzz/regressions/<harness>/, which the
# test suite replays with a gcc-built driver (replay_main.c). Logs: DIR/logs/<harness>.log.
# Exit status: 0 when no harness found anything, 1 when one did, 2 on usage or build errors.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
FUZZ="$ROOT/tests/fuzz"
TIME=${FUZZ_TIME:-60}
JOBS=1
BUILD="$ROOT/build-fuzz"
MINIMIZE=1
SRC="$ROOT/src"
HARNESSES=()

while [ $# -gt 0 ]; do
    case "$1" in
    -t) TIME=$2; shift 2 ;;
    -j) JOBS=$2; shift 2 ;;
    -b) BUILD=$2; shift 2 ;;
    -s) SRC=$(cd "$2" && pwd); shift 2 ;;
    --no-minimize) MINIMIZE=0; shift ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    payload|template|config) HARNESSES+=("$1"); shift ;;
    *) echo "run.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done
[ ${#HARNESSES[@]} -gt 0 ] || HARNESSES=(payload template config)
case "$TIME" in ''|*[!0-9]*) echo "run.sh: -t wants seconds" >&2; exit 2 ;; esac
case "$JOBS" in ''|*[!0-9]*|0) echo "run.sh: -j wants a positive number" >&2; exit 2 ;; esac

# ---- clang with libFuzzer -----------------------------------------------------------------
if ! command -v clang >/dev/null 2>&1; then
    echo "run.sh: clang missing; installing it (apt-get install -y clang)" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get install -y clang || { $SUDO apt-get update && $SUDO apt-get install -y clang; }
fi
CC=${CC_FUZZ:-clang}
JANSSON=$(pkg-config --cflags --libs jansson) || {
    echo "run.sh: jansson not found by pkg-config (apt-get install libjansson-dev)" >&2; exit 2; }

CFLAGS=(-std=c11 -D_POSIX_C_SOURCE=200809L -g -O1 -fno-omit-frame-pointer
        -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
        -Wall -Wextra -Wno-unused-parameter -I"$SRC" -I"$ROOT/src" -I"$ROOT/tests/unit")

# The src/ files each harness needs (paths from the top); payload also needs the jansson
# reference parser and the cross-check (tests/unit/payload_ref.c, payload_cross.c).
sources_for() {
    case "$1" in
    payload) echo "src/payload.c src/rules.c src/util.c tests/unit/payload_ref.c tests/unit/payload_cross.c" ;;
    template) echo "src/payload.c src/rules.c src/util.c" ;;
    config) echo "src/config.c src/rules.c src/payload.c src/util.c src/sqlgen.c" ;;
    esac
}
max_len_for() {
    case "$1" in
    config) echo 16384 ;;
    *) echo 4096 ;;
    esac
}

mkdir -p "$BUILD/logs"
if [ "$SRC" = "$ROOT/src" ]; then
    echo "run.sh: sources src/ at $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet -- src 2>/dev/null || echo ' + uncommitted changes')"
else
    echo "run.sh: sources from $SRC (not src/)"
fi
for h in "${HARNESSES[@]}"; do
    srcs=()
    for s in $(sources_for "$h"); do
        case "$s" in src/*) srcs+=("$SRC/${s#src/}") ;; *) srcs+=("$ROOT/$s") ;; esac
    done
    echo "run.sh: building fuzz_$h with $CC"
    # shellcheck disable=SC2086 # $JANSSON is a list of flags
    if ! "$CC" "${CFLAGS[@]}" "$FUZZ/fuzz_$h.c" "${srcs[@]}" $JANSSON -o "$BUILD/fuzz_$h"; then
        echo "run.sh: build of fuzz_$h failed (libFuzzer comes with clang-14's libclang-rt-14-dev)" >&2
        exit 2
    fi
done

# ---- running ------------------------------------------------------------------------------
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0:symbolize=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

run_one() {
    local h=$1 work="$BUILD/corpus/$h" art="$BUILD/artifacts/$h/" log="$BUILD/logs/$h.log"
    mkdir -p "$work" "$art" "$FUZZ/regressions/$h"
    local rc=0
    "$BUILD/fuzz_$h" -max_total_time="$TIME" -max_len="$(max_len_for "$h")" -timeout=10 \
        -rss_limit_mb=2048 -dict="$FUZZ/$h.dict" -artifact_prefix="$art" -print_final_stats=1 \
        "$work" "$FUZZ/corpus/$h" >"$log" 2>&1 || rc=$?
    echo "$rc" >"$BUILD/logs/$h.rc"
}

running=0
for h in "${HARNESSES[@]}"; do
    echo "run.sh: fuzzing $h for ${TIME}s (log: $BUILD/logs/$h.log)"
    run_one "$h" &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then
        wait -n || true
        running=$((running - 1))
    fi
done
wait || true

# ---- crashes to regressions, and a summary --------------------------------------------------
found=0
printf '\n%-9s %7s %9s %8s %8s %9s %s\n' harness time_s execs exec/s cov ft findings
for h in "${HARNESSES[@]}"; do
    log="$BUILD/logs/$h.log" art="$BUILD/artifacts/$h"
    findings=()
    for f in "$art"/crash-* "$art"/leak-* "$art"/timeout-* "$art"/oom-*; do
        [ -f "$f" ] || continue
        name=$(basename "$f")
        dest="$FUZZ/regressions/$h/$name"
        [ -e "$dest" ] && continue
        cp "$f" "$dest"
        if [ "$MINIMIZE" -eq 1 ] && [[ "$name" != oom-* ]]; then
            min="$art/minimized-$name"
            "$BUILD/fuzz_$h" -minimize_crash=1 -max_total_time=120 -timeout=10 \
                -exact_artifact_path="$min" "$f" >"$BUILD/logs/$h.minimize-$name.log" 2>&1 || true
            [ -s "$min" ] && cp "$min" "$dest"
        fi
        findings+=("$dest")
        found=1
    done
    # (a crashed run has no final stats: "?")
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1 || true)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1 || true)
    last=$(grep -E '^#[0-9]+' "$log" | grep ' cov: ' | tail -1 || true)
    [ -n "$execs" ] || execs=$(sed -n 's/^#\([0-9]*\).*/\1/p' <<<"$last")
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    secs=$( (grep -o 'Done [0-9]* runs in [0-9]* second' "$log" || true) | awk '{print $5}' | tail -1)
    printf '%-9s %7s %9s %8s %8s %9s %s\n' "$h" "${secs:-?}" "${execs:-?}" "${rate:-?}" "${cov:-?}" \
        "${ft:-?}" "${#findings[@]}"
    for f in "${findings[@]}"; do echo "    new regression input: ${f#"$ROOT"/}"; done
    if [ "$(cat "$BUILD/logs/$h.rc" 2>/dev/null || echo 1)" != 0 ] && [ ${#findings[@]} -eq 0 ]; then
        echo "    fuzz_$h exited $(cat "$BUILD/logs/$h.rc" 2>/dev/null); see $log"
        found=1
    fi
done
exit "$found"
