#!/usr/bin/env bash
# Memory per ready job put through the HTTP job API (issue 9), for this
# build and, optionally, another binary in the same run: phase 3 of
# bench-schedule.sh on its own, so an allocation change can be measured in
# a minute.
#
# For each binary: a fresh `spool serve --in-memory`, its RSS, JOBS jobs of
# BODY bytes put by `spool bench --mode http-batch` (4 producers, 1,000 jobs
# a request, kept), the RSS one second later; (after - before) / JOBS is
# what a ready HTTP job costs. The binaries alternate ROUNDS times.
#
# Usage: scripts/bench-http-memory.sh [OTHER_SPOOL_BINARY]
# Environment: JOBS [300000], BODY [100], ROUNDS [1], PORT [11650] (and
# the next one for HTTP), SPOOL_BIN [unset: builds and measures
# target/release/spool; set: that binary, not built], OUT
# [target/bench-http-memory].
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
JOBS=${JOBS:-300000}
BODY=${BODY:-100}
ROUNDS=${ROUNDS:-1}
PORT=${PORT:-11650}
HTTP_PORT=$((PORT + 1))
OUT=${OUT:-target/bench-http-memory}
OTHER=${1:-}
# Bounds on the wait for a server to start and on each put.
START_TIMEOUT_S=30
PUT_TIMEOUT_S=300

if [ -n "${SPOOL_BIN:-}" ]; then
    THIS=$SPOOL_BIN
else
    cargo build --release -p spool >&2
    THIS=target/release/spool
fi
[ -x "$THIS" ] || { echo "$THIS is not an executable" >&2; exit 2; }
[ -z "$OTHER" ] || [ -x "$OTHER" ] || { echo "$OTHER is not an executable" >&2; exit 2; }
mkdir -p "$OUT"
SERVER_PID=""
trap 'if [ -n "$SERVER_PID" ]; then kill -KILL "$SERVER_PID" 2>/dev/null || true; fi' EXIT

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
ready() {
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5).read()' \
        "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null 2>&1
}

# measure NAME BINARY: prints one row.
measure() {
    local name=$1 bin=$2
    "$bin" serve -l 127.0.0.1 -p "$PORT" --http-listen "127.0.0.1:$HTTP_PORT" --in-memory \
        --log-format json >"$OUT/$name.log" 2>&1 &
    SERVER_PID=$!
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until ready; do
        [ "$SECONDS" -lt "$deadline" ] || { echo "server did not start" >&2; exit 1; }
        sleep 0.1
    done
    local before after
    before=$(rss_kib "$SERVER_PID")
    timeout "$PUT_TIMEOUT_S" "$THIS" bench --mode http-batch --http "127.0.0.1:$HTTP_PORT" \
        --producers 4 --enqueue-batch 1000 --jobs "$JOBS" --body-size "$BODY" --tube ready \
        --keep-jobs --json >"$OUT/$name-put.json"
    sleep 1
    after=$(rss_kib "$SERVER_PID")
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
    printf '%-6s %10s KiB %10s KiB %8s B/job\n' "$name" "$before" "$after" \
        "$(awk -v a="$after" -v b="$before" -v n="$JOBS" 'BEGIN {printf "%.1f", (a - b) * 1024 / n}')"
}

printf '%-6s %14s %14s %14s   (load %s)\n' build "RSS before" "RSS after" "per ready job" "$(cut -d' ' -f1-3 /proc/loadavg)"
for _ in $(seq 1 "$ROUNDS"); do
    measure this "$THIS"
    if [ -n "$OTHER" ]; then measure other "$OTHER"; fi
done
echo "JOBS=$JOBS BODY=$BODY; this: $THIS; other: ${OTHER:--}"
