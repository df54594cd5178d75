#!/usr/bin/env bash
# Compares the static (musl) binary the image ships with the glibc build:
# musl's allocator and libc could cost throughput, and this says whether
# they do. Both servers run the same loads, one at a time, alternating, on
# loopback, driven by the same client (the glibc build's `spool bench`);
# the script prints each run and the ratios static/glibc of throughput and
# server CPU seconds (lower CPU is better).
#
# Environment knobs (defaults in brackets):
#   JOBS [200000]        jobs per run (mixed put/reserve/delete)
#   RUNS [3]             runs per build and storage mode
#   MODES ["memory durable"]  in memory, and a log under fsync always
#   TIME_LIMIT [120]     hard cap in seconds for each bench run
#   PORT [11620]         beanstalkd port (HTTP on PORT+1)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

JOBS=${JOBS:-200000}
RUNS=${RUNS:-3}
MODES=${MODES:-"memory durable"}
TIME_LIMIT=${TIME_LIMIT:-120}
PORT=${PORT:-11620}
HTTP_PORT=$((PORT + 1))
GLIBC=target/release/spool

log() { printf '%s\n' "$*" >&2; }

# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"

SERVER_PID=""
SCRATCH=$(mktemp -d)
cleanup() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$SCRATCH"
}
trap cleanup EXIT

log "building spool (release, glibc)"
cargo build --locked --release -p spool >&2
log "building spool (release, static)"
STATIC=$(bash scripts/build-static.sh)
CLK_TCK=$(getconf CLK_TCK)

# run BINARY MODE OUT: one bench run against a fresh server; writes the
# bench JSON to OUT and prints the server's CPU seconds.
run() {
    local binary=$1 mode=$2 out=$3 storage=(--in-memory)
    if [ "$mode" = durable ]; then
        rm -rf "$SCRATCH/data"
        storage=(-b "$SCRATCH/data" --fsync always)
    fi
    "$binary" serve "${storage[@]}" -l 127.0.0.1 -p "$PORT" \
        --http-listen "127.0.0.1:$HTTP_PORT" --log-level warn >/dev/null 2>&1 &
    SERVER_PID=$!
    local tries=0
    until curl -sf "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null 2>&1; do
        tries=$((tries + 1))
        ((tries < 100)) || { log "server did not become ready"; exit 1; }
        sleep 0.1
    done
    timeout "$((TIME_LIMIT + 10))" "$GLIBC" bench --addr "127.0.0.1:$PORT" --jobs "$JOBS" \
        --time-limit-secs "$TIME_LIMIT" --json >"$out"
    local ticks
    ticks=$(cpu_ticks "$SERVER_PID")
    kill "$SERVER_PID"
    wait "$SERVER_PID" || true
    SERVER_PID=""
    awk -v t="$ticks" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz }'
}

printf '%-8s %-7s %-4s %12s %12s\n' mode build run ops/s server_cpu_s
for mode in $MODES; do
    declare -A ops_sum=([glibc]=0 [static]=0) cpu_sum=([glibc]=0 [static]=0)
    for run_number in $(seq "$RUNS"); do
        for build in glibc static; do
            binary=$GLIBC
            [ "$build" = static ] && binary=$STATIC
            cpu=$(run "$binary" "$mode" "$SCRATCH/out.json")
            ops=$(json "$SCRATCH/out.json" ops_per_sec)
            printf '%-8s %-7s %-4s %12s %12s\n' "$mode" "$build" "$run_number" "$(whole "$ops")" "$cpu"
            ops_sum[$build]=$(awk -v a="${ops_sum[$build]}" -v b="$ops" 'BEGIN { print a + b }')
            cpu_sum[$build]=$(awk -v a="${cpu_sum[$build]}" -v b="$cpu" 'BEGIN { print a + b }')
        done
    done
    printf '%-8s static/glibc: ops/s %s, server CPU %s (means of %s runs)\n' "$mode" \
        "$(ratio "${ops_sum[static]}" "${ops_sum[glibc]}")" \
        "$(ratio "${cpu_sum[static]}" "${cpu_sum[glibc]}")" "$RUNS"
    unset ops_sum cpu_sum
done
