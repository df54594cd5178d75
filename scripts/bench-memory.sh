#!/usr/bin/env bash
# Memory per queued job and recovery time, for this build of spool and
# (optionally) another build of it, in the same run: the figures that must
# not regress when the job model grows.
#
# For each binary and each storage (--in-memory, and the log with
# --fsync never): start a fresh server, read its RSS, put JOBS jobs of
# BODY bytes with `spool bench --mode put` (4 producers, pipeline 32), read
# the RSS again; (after - before) / JOBS is the memory a queued job costs.
# With the log, the server is then stopped (SIGTERM) and started again on
# the same directory; the time until its "recovered the log" line and the
# RSS after recovery are reported.
#
# Usage: scripts/bench-memory.sh [OTHER_SPOOL_BINARY]
# Environment: JOBS [1000000], BODY [100], PORT [11640], TIME_LIMIT [300]
# (seconds, for each put run), OUT [target/bench-memory], SKIP_BUILD (set: measure
# target/release/spool as it is, without building it first).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
JOBS=${JOBS:-1000000}
BODY=${BODY:-100}
PORT=${PORT:-11640}
TIME_LIMIT=${TIME_LIMIT:-300}
OUT=${OUT:-target/bench-memory}
OTHER=${1:-}
# Bounds on waits for a server to start, stop and recover.
START_TIMEOUT_S=20
STOP_TIMEOUT_S=60
RECOVERY_TIMEOUT_S=300

[ -n "${SKIP_BUILD:-}" ] || cargo build --release -p spool >&2
THIS=target/release/spool
mkdir -p "$OUT"
TMP=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$TMP"' EXIT

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

wait_port() {
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || { echo "server did not start" >&2; return 1; }
        sleep 0.05
    done
}

stop() {
    kill -TERM "$1"
    local deadline=$((SECONDS + STOP_TIMEOUT_S))
    while kill -0 "$1" 2>/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || { kill -KILL "$1"; break; }
        sleep 0.05
    done
    wait "$1" 2>/dev/null || true
}

# measure NAME BINARY STORAGE_ARGS...: prints one row.
measure() {
    local name=$1 bin=$2 storage=$3 dir="$TMP/$1-$3" log="$OUT/$1-$3.log"
    local args=(serve -l 127.0.0.1 -p "$PORT" --http-listen 127.0.0.1:0 --log-format json)
    if [ "$storage" = memory ]; then args+=(--in-memory); else args+=(-b "$dir" --fsync never); fi
    "$bin" "${args[@]}" >"$log" 2>&1 &
    local pid=$!
    wait_port
    sleep 0.5
    local before after
    before=$(rss_kib "$pid")
    timeout "$TIME_LIMIT" "$THIS" bench --addr "127.0.0.1:$PORT" --mode put --producers 4 \
        --pipeline 32 --jobs "$JOBS" --body-size "$BODY" --tube bench >"$OUT/$name-$storage-put.txt" 2>&1
    sleep 0.5
    after=$(rss_kib "$pid")
    local per_job
    per_job=$(awk -v a="$after" -v b="$before" -v n="$JOBS" 'BEGIN {printf "%.1f", (a - b) * 1024 / n}')
    local recovered="-" rss_recovered="-"
    if [ "$storage" = log ]; then
        stop "$pid"
        local t0=$SECONDS
        "$bin" "${args[@]}" >"$log.restart" 2>&1 &
        pid=$!
        local deadline=$((SECONDS + RECOVERY_TIMEOUT_S))
        until grep -q "recovered the log" "$log.restart"; do
            [ "$SECONDS" -lt "$deadline" ] || { echo "no recovery" >&2; break; }
            sleep 0.05
        done
        recovered=$(grep -o '"elapsed_ms":[0-9]*' "$log.restart" | head -1 | cut -d: -f2)
        sleep 0.5
        rss_recovered=$(($(rss_kib "$pid") / 1024))
        : "$t0"
    fi
    stop "$pid"
    printf '%-8s %-7s %9s KiB %9s KiB %10s B/job %12s ms %10s MiB\n' \
        "$name" "$storage" "$before" "$after" "$per_job" "$recovered" "$rss_recovered"
}

printf '%-8s %-7s %13s %13s %16s %15s %14s\n' build storage "RSS before" "RSS after" "per queued job" "recovery" "RSS recovered"
for storage in memory log; do
    measure this "$THIS" "$storage"
    if [ -n "$OTHER" ]; then measure other "$OTHER" "$storage"; fi
done
echo "JOBS=$JOBS BODY=$BODY; rows: this build, and the other binary given ($OTHER)"
