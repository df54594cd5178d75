#!/usr/bin/env bash
# The HTTP/JSON job API under load, against spool's own beanstalkd
# protocol in the same run (issue 9's targets).
#
# One `spool serve --in-memory` (release build) on loopback; `spool bench`
# runs one load at a time against it: beanstalkd-protocol put and mixed
# loads first, then the HTTP loads, and prints each HTTP figure with the
# ratio or bound its target names. Memory per idle HTTP connection is read
# on a fresh server.
#
# Environment knobs (defaults in brackets):
#   JOBS [100000]           jobs per put, enqueue, mixed and work load
#   BATCH_JOBS [500000]     jobs of the batch-enqueue load (1,000 a request)
#   WAIT_RATE [1000]        enqueue-and-wait requests per second
#   CONCURRENCY [8]         the concurrency policy of the concurrency check
#   RATE [1000]             the rate_per_s policy of the rate check
#   DURATION [10]           seconds the wait and rate loads measure
#   IDLE_CONNECTIONS [10000]
#   TIME_LIMIT [120]        hard cap in seconds for each bench run
#   THREADS [2]             client threads
#   SPOOL_PORT [11631], HTTP_PORT [11632]
#   OUT [target/bench-http] raw JSON results of every run
#   SPOOL_BIN               a spool binary to use instead of building
#                           target/release/spool (for a machine without cargo)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

JOBS=${JOBS:-100000}
BATCH_JOBS=${BATCH_JOBS:-500000}
WAIT_RATE=${WAIT_RATE:-1000}
CONCURRENCY=${CONCURRENCY:-8}
RATE=${RATE:-1000}
DURATION=${DURATION:-10}
IDLE_CONNECTIONS=${IDLE_CONNECTIONS:-10000}
TIME_LIMIT=${TIME_LIMIT:-120}
THREADS=${THREADS:-2}
SPOOL_PORT=${SPOOL_PORT:-11631}
HTTP_PORT=${HTTP_PORT:-11632}
OUT=${OUT:-target/bench-http}
BIN=${SPOOL_BIN:-target/release/spool}

log() { printf '%s\n' "$*" >&2; }

# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"

SERVER_PID=""
stop_server() {
    if [[ -n $SERVER_PID ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
}
trap stop_server EXIT

start_server() {
    local port
    for port in "$SPOOL_PORT" "$HTTP_PORT"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            log "port $port is already in use; pick others with SPOOL_PORT / HTTP_PORT"
            exit 1
        fi
    done
    SPOOL_LOG_LEVEL=warn "$BIN" serve --in-memory -l 127.0.0.1 -p "$SPOOL_PORT" \
        --http-listen "127.0.0.1:$HTTP_PORT" >"$OUT/spool.log" 2>&1 &
    SERVER_PID=$!
    local tries
    for ((tries = 0; tries < 100; tries++)); do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            log "spool exited at startup:"
            cat "$OUT/spool.log" >&2
            exit 1
        fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$HTTP_PORT") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    log "spool is not accepting on 127.0.0.1:$HTTP_PORT after 10 s"
    exit 1
}

# bench LABEL ARGS...: one bench run; its JSON goes to $OUT/LABEL.json.
bench() {
    local label=$1 rc=0
    shift
    local file="$OUT/$label.json"
    timeout $((TIME_LIMIT + 30)) "$BIN" bench --json --addr "127.0.0.1:$SPOOL_PORT" \
        --http "127.0.0.1:$HTTP_PORT" --time-limit-secs "$TIME_LIMIT" --threads "$THREADS" \
        "$@" >"$file" 2>"$OUT/$label.err" || rc=$?
    if ((rc != 0)); then
        log "  $label: failed (exit $rc): $(tail -n1 "$OUT/$label.err")"
    else
        log "  $label: $(json "$file" ops_per_sec) jobs/s"
    fi
}

if [[ -z ${SPOOL_BIN:-} ]]; then
    log "building spool (release)"
    cargo build --release -p spool >&2
fi
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.err
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
ulimit -n 120000 2>/dev/null || true

start_server
log "spool pid $SERVER_PID: beanstalkd 127.0.0.1:$SPOOL_PORT, HTTP 127.0.0.1:$HTTP_PORT"
TAG=$$
bench bs-put-16p --mode put --producers 16 --pipeline 1 --body-size 100 --jobs "$JOBS" --tube "bp-$TAG"
bench bs-mixed-p1 --mode mixed --producers 4 --consumers 4 --pipeline 1 --body-size 100 \
    --jobs "$JOBS" --tube "bm-$TAG"
bench http-enqueue --mode http-enqueue --producers 16 --body-size 100 --jobs "$JOBS" --tube "he-$TAG"
bench http-batch --mode http-batch --producers 2 --enqueue-batch 1000 --body-size 100 \
    --jobs "$BATCH_JOBS" --tube "hb-$TAG"
bench http-work --mode http-work --producers 2 --enqueue-batch 100 --consumers 4 \
    --reserve-batch 32 --complete-each --body-size 100 --jobs "$JOBS" --tube "hw-$TAG"
bench http-wait --mode http-wait --producers 16 --consumers 4 --reserve-batch 32 \
    --rate "$WAIT_RATE" --duration-secs "$DURATION" --body-size 100 --jobs 1000000 --tube "hq-$TAG"
bench http-concurrency --mode http-concurrency --consumers 64 --concurrency "$CONCURRENCY" \
    --reserve-batch 1 --body-size 100 --jobs 20000 --tube "hc-$TAG"
bench http-rate --mode http-rate --consumers 4 --reserve-batch 32 --rate "$RATE" \
    --duration-secs "$DURATION" --body-size 100 --tube "hr-$TAG"
stop_server

# A fresh server: memory freed by the loads would be reused otherwise.
if (($(ulimit -n) < IDLE_CONNECTIONS + 100)); then
    log "  http-idle: skipped, open-file limit is $(ulimit -n)"
else
    start_server
    bench http-idle --mode http-idle --connections "$IDLE_CONNECTIONS" --server-pid "$SERVER_PID"
    stop_server
fi

# --- report -------------------------------------------------------------------
f() { echo "$OUT/$1.json"; }
ms() { awk -v a="$1" 'BEGIN { if (a == "-") print "-"; else printf "%.2f", a / 1000 }'; }
echo
echo "spool HTTP job API vs spool's beanstalkd protocol, same server, same run"
echo "$(nproc) CPUs shared by client ($THREADS threads) and server; 100-byte jobs"
echo
printf '%-44s %12s %10s  %s\n' "load" "jobs/s" "p99 ms" "target"
put=$(json "$(f bs-put-16p)" ops_per_sec)
mixed=$(json "$(f bs-mixed-p1)" ops_per_sec)
printf '%-44s %12s %10s\n' "beanstalkd put, 16 producers" "$(whole "$put")" \
    "$(ms "$(json "$(f bs-put-16p)" put_latency_us.p99)")"
printf '%-44s %12s %10s\n' "beanstalkd mixed 4P+4C, pipeline 1" "$(whole "$mixed")" \
    "$(ms "$(json "$(f bs-mixed-p1)" put_latency_us.p99)")"
he=$(json "$(f http-enqueue)" ops_per_sec)
printf '%-44s %12s %10s  %s\n' "HTTP enqueue, 16 keep-alive clients" "$(whole "$he")" \
    "$(ms "$(json "$(f http-enqueue)" request_latency_us.p99)")" \
    "$(ratio "$he" "$put") x beanstalkd put (>= 0.5)"
hb=$(json "$(f http-batch)" ops_per_sec)
printf '%-44s %12s %10s  %s\n' "HTTP batch enqueue, 1,000 a request" "$(whole "$hb")" \
    "$(ms "$(json "$(f http-batch)" request_latency_us.p99)")" ">= 200000 jobs/s"
hw=$(json "$(f http-work)" ops_per_sec)
printf '%-44s %12s %10s  %s\n' "HTTP workers (reserve 32, complete each)" "$(whole "$hw")" \
    "$(ms "$(json "$(f http-work)" complete_latency_us.p99)")" \
    "$(ratio "$hw" "$mixed") x beanstalkd mixed (>= 0.5)"
printf '%-44s %12s %10s  %s\n' "enqueue-and-wait at $WAIT_RATE requests/s" \
    "$(whole "$(json "$(f http-wait)" ops_per_sec)")" \
    "$(ms "$(json "$(f http-wait)" request_latency_us.p99)")" "p99 <= 2 ms"
echo
echo "concurrency $CONCURRENCY, 64 workers: at most $(json "$(f http-concurrency)" max_leases_held) leases held at once (never above $CONCURRENCY)"
echo "rate_per_s $RATE over ${DURATION}s: measured $(json "$(f http-rate)" measured_rate_per_s)/s," \
    "error $(json "$(f http-rate)" rate_error_pct) % (within 5 %)"
echo "$IDLE_CONNECTIONS idle keep-alive HTTP connections: $(whole "$(json "$(f http-idle)" rss_per_connection_bytes)") bytes of server RSS each"
echo
echo "raw results: $OUT/"
