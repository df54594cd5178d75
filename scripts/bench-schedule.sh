#!/usr/bin/env bash
# Timers that do not drift (issue 11), measured on a release build:
#
# 1. JOBS delayed jobs (HTTP batches, `spool bench --run-at-spread-ms`),
#    due over SPREAD_MS starting LEAD_MS after the put began: the server's
#    memory per delayed job, and its CPU while they all wait (IDLE_S).
# 2. While they fall due, 4 beanstalkd producers put at full speed (with 4
#    consumers taking, so memory stays bounded); afterwards the due → ready
#    lateness of the delayed queue from the server's own histogram
#    (`spool_schedule_skew_seconds`, buckets from 50 µs; p99, p999, max in
#    /admin/stats).
# 3. A fresh server: JOBS ready jobs, memory per ready job.
# 4. A fresh server: SCHEDULES schedules `@every 1s` (misfire all) for
#    SCHEDULE_S seconds: every instant fired exactly once (fires equals the
#    instants between the first and the last firing, no misfires), and the
#    due → fired skew p99 over all of them (`spool_schedule_fire_skew_seconds`).
# 5. A fresh, idle server: IDLE_WAKE_JOBS delayed jobs due over
#    IDLE_WAKE_SPREAD_MS with nothing else to do: how late the engine wakes
#    for a timer (skew p50, p99, max), which is the timer's own precision.
#
# Usage: scripts/bench-schedule.sh
# Environment: JOBS [1000000], SPREAD_MS [100000], LEAD_MS [30000],
# IDLE_S [5], SCHEDULES [10000], SCHEDULE_S [30], IDLE_WAKE_JOBS [2000],
# IDLE_WAKE_SPREAD_MS [10000], PORT [11660] (and the
# next one for HTTP), OUT [target/bench-schedule], SPOOL_BIN [unset: builds
# and runs target/release/spool; set: that server binary, not built, so an
# older build can be measured beside a newer one], BENCH_CLIENT [the
# release spool: the binary whose `spool bench` puts the jobs],
# SERVER_CPUS and CLIENT_CPUS [unset: `taskset -c` lists pinning the server
# and the load generators], SERVER_NICE [unset: the server's `nice -n`
# adjustment, e.g. -10]: to tell the kernel's scheduling delays from the
# server's own.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
log() { printf 'bench-schedule.sh: %s\n' "$*" >&2; }
JOBS=${JOBS:-1000000}
SPREAD_MS=${SPREAD_MS:-100000}
LEAD_MS=${LEAD_MS:-30000}
IDLE_S=${IDLE_S:-5}
SCHEDULES=${SCHEDULES:-10000}
SCHEDULE_S=${SCHEDULE_S:-30}
IDLE_WAKE_JOBS=${IDLE_WAKE_JOBS:-2000}
IDLE_WAKE_SPREAD_MS=${IDLE_WAKE_SPREAD_MS:-10000}
PORT=${PORT:-11660}
HTTP_PORT=$((PORT + 1))
OUT=${OUT:-target/bench-schedule}
# Bounds on waits for a server to start and on each load.
START_TIMEOUT_S=30
LOAD_TIMEOUT_S=$((LEAD_MS / 1000 + SPREAD_MS / 1000 + 120))

if [ -n "${SPOOL_BIN:-}" ]; then
    BIN=$SPOOL_BIN
    [ -x "$BIN" ] || { log "SPOOL_BIN=$BIN is not an executable"; exit 2; }
else
    cargo build --release -p spool >&2
    BIN=target/release/spool
fi
CLIENT=${BENCH_CLIENT:-target/release/spool}
[ -x "$CLIENT" ] || CLIENT=$BIN
SERVER_PIN=()
CLIENT_PIN=()
if [ -n "${SERVER_CPUS:-}" ]; then SERVER_PIN=(taskset -c "$SERVER_CPUS"); fi
if [ -n "${SERVER_NICE:-}" ]; then SERVER_PIN+=(nice -n "$SERVER_NICE"); fi
if [ -n "${CLIENT_CPUS:-}" ]; then CLIENT_PIN=(taskset -c "$CLIENT_CPUS"); fi
mkdir -p "$OUT"
SERVER_PID=""
trap 'if [ -n "$SERVER_PID" ]; then kill -KILL "$SERVER_PID" 2>/dev/null || true; fi' EXIT

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
# utime + stime of a process, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
http_get() {
    python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=30).read().decode())' \
        "http://127.0.0.1:$HTTP_PORT$1"
}

start_server() {
    "${SERVER_PIN[@]}" "$BIN" serve -l 127.0.0.1 -p "$PORT" --http-listen "127.0.0.1:$HTTP_PORT" --in-memory \
        --log-format json >"$OUT/$1.log" 2>&1 &
    SERVER_PID=$!
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until http_get /readyz >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || { log "server did not start"; exit 1; }
        sleep 0.1
    done
}

stop_server() {
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}

# ---- 1 and 2: delayed jobs ------------------------------------------------
start_server delayed
rss_before=$(rss_kib "$SERVER_PID")
started_ms=$(date +%s%3N)
timeout "$LOAD_TIMEOUT_S" "${CLIENT_PIN[@]}" "$CLIENT" bench --mode http-batch --http "127.0.0.1:$HTTP_PORT" \
    --producers 4 --enqueue-batch 1000 --jobs "$JOBS" --tube delayed \
    --run-at-spread-ms "$SPREAD_MS" --run-at-lead-ms "$LEAD_MS" --keep-jobs --json >"$OUT/put-delayed.json"
put_done_ms=$(date +%s%3N)
sleep 1
rss_delayed=$(rss_kib "$SERVER_PID")
first_due_ms=$((started_ms + LEAD_MS))
if [ $((put_done_ms + 1000 + IDLE_S * 1000)) -ge "$first_due_ms" ]; then
    log "the put took $((put_done_ms - started_ms)) ms: no idle window before the first job is due (raise LEAD_MS)"
    idle_cpu="-"
else
    ticks_before=$(cpu_ticks "$SERVER_PID")
    sleep "$IDLE_S"
    ticks_after=$(cpu_ticks "$SERVER_PID")
    idle_cpu=$(awk -v a="$ticks_after" -v b="$ticks_before" -v hz="$(getconf CLK_TCK)" -v s="$IDLE_S" \
        'BEGIN {printf "%.2f%%", (a - b) / hz / s * 100}')
fi
# The load runs from before the first job is due until after the last.
now_ms=$(date +%s%3N)
load_s=$(((first_due_ms + SPREAD_MS - now_ms) / 1000 + 3))
log "load for ${load_s}s while the delayed jobs fall due"
"${CLIENT_PIN[@]}" "$BIN" bench --mode mixed --addr "127.0.0.1:$PORT" --producers 4 --consumers 4 --pipeline 32 \
    --jobs 1000000000 --tube load --time-limit-secs "$load_s" --json >"$OUT/load.json" || true
stats=$(http_get /admin/stats)
echo "$stats" >"$OUT/stats-delayed.json"
http_get /metrics >"$OUT/metrics-delayed.txt"
stop_server

# ---- 3: ready jobs ---------------------------------------------------------
start_server ready
rss_before_ready=$(rss_kib "$SERVER_PID")
timeout "$LOAD_TIMEOUT_S" "${CLIENT_PIN[@]}" "$CLIENT" bench --mode http-batch --http "127.0.0.1:$HTTP_PORT" \
    --producers 4 --enqueue-batch 1000 --jobs "$JOBS" --tube ready --keep-jobs --json >"$OUT/put-ready.json"
sleep 1
rss_ready=$(rss_kib "$SERVER_PID")
stop_server

# ---- 4: schedules ----------------------------------------------------------
start_server schedules
python3 - "$HTTP_PORT" "$SCHEDULES" <<'EOF'
import http.client, json, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
body = json.dumps({"cron": "@every 1s", "queue": "ticks", "misfire": "all",
                   "job": {"payload": {"tick": True}}})
for i in range(count):
    conn.request("PUT", f"/v1/schedules/s{i}", body, {"Content-Type": "application/json"})
    reply = conn.getresponse()
    reply.read()
    assert reply.status == 201, reply.status
EOF
log "$SCHEDULES schedules created; firing for ${SCHEDULE_S}s"
sleep "$SCHEDULE_S"
# The skew histograms first: listing 10k schedules holds the engine for a
# while, and an instant that falls due meanwhile is the reading's lateness,
# not the timers'.
http_get /metrics >"$OUT/metrics-schedules.txt"
http_get /v1/schedules >"$OUT/schedules.json"
http_get /admin/stats >"$OUT/stats-schedules.json"
stop_server

# ---- 5: idle wake-ups ------------------------------------------------------
start_server idle
idle_lead_ms=3000
timeout "$LOAD_TIMEOUT_S" "${CLIENT_PIN[@]}" "$CLIENT" bench --mode http-batch --http "127.0.0.1:$HTTP_PORT" \
    --producers 1 --enqueue-batch 1000 --jobs "$IDLE_WAKE_JOBS" --tube idle \
    --run-at-spread-ms "$IDLE_WAKE_SPREAD_MS" --run-at-lead-ms "$idle_lead_ms" --keep-jobs --json >"$OUT/put-idle.json"
sleep $(((idle_lead_ms + IDLE_WAKE_SPREAD_MS) / 1000 + 2))
http_get /admin/stats >"$OUT/stats-idle.json"
http_get /metrics >"$OUT/metrics-idle.txt"
stop_server

# ---- report ----------------------------------------------------------------
python3 - "$OUT" "$JOBS" "$rss_before" "$rss_delayed" "$rss_before_ready" "$rss_ready" "$idle_cpu" <<'EOF'
import json, re, sys
out, jobs = sys.argv[1], int(sys.argv[2])
rss_before, rss_delayed, rss_before_ready, rss_ready = map(int, sys.argv[3:7])
idle_cpu = sys.argv[7]

def quantiles(path, family, label_filter):
    """p99, p999 from the summed buckets of a histogram family."""
    buckets = {}
    for line in open(path):
        if not line.startswith(family + "_bucket{") or label_filter not in line:
            continue
        le = re.search(r'[{,]le="([^"]+)"', line).group(1)
        buckets[le] = buckets.get(le, 0) + float(line.rsplit(" ", 1)[1])
    finite = sorted((float(le), n) for le, n in buckets.items() if le != "+Inf")
    total = buckets.get("+Inf", 0)
    def q(p):
        rank, below, lower = p * total, 0, 0.0
        for bound, cumulative in finite:
            if cumulative >= rank and cumulative > below:
                return lower + (bound - lower) * (rank - below) / (cumulative - below)
            below, lower = cumulative, bound
        return float("inf")
    quantiles.p50 = q(0.5)
    return total, q(0.99), q(0.999)

stats = json.load(open(f"{out}/stats-delayed.json"))
delayed = next(q for q in stats["queues"] if q["name"] == "delayed")
count, p99, p999 = quantiles(f"{out}/metrics-delayed.txt", "spool_schedule_skew_seconds", 'queue="delayed"')
load = json.load(open(f"{out}/load.json"))
print(f"delayed jobs: {jobs}, became ready: {int(count)} (left delayed: {delayed['delayed']})")
max_skew = delayed["skew_max_seconds"]
# Interpolation inside the last bucket can pass the largest observation.
p99, p999 = min(p99, max_skew), min(p999, max_skew)
print(f"  skew due->ready: p99 {p99*1e3:.3f} ms, p999 {p999*1e3:.3f} ms, max {max_skew*1e3:.3f} ms")
puts_per_s = load["puts_acked"] / max(load["elapsed_secs"], 1e-9)
print(f"  meanwhile beanstalkd puts: {puts_per_s:.0f}/s, deletes {load['ops_per_sec']:.0f}/s (4 producers, 4 consumers)")
print(f"  server CPU with {jobs} idle delayed jobs: {idle_cpu}")
print(f"memory per delayed job: {(rss_delayed - rss_before) * 1024 / jobs:.0f} B; "
      f"per ready job: {(rss_ready - rss_before_ready) * 1024 / jobs:.0f} B")

from datetime import datetime
def ms(text):
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)

stats = json.load(open(f"{out}/stats-schedules.json"))
schedules = stats["schedules"]
# Every instant from the first due one (the whole second after creation)
# to the last fired, exactly once.
bad = 0
for s in json.load(open(f"{out}/schedules.json"))["schedules"]:
    first_due = ms(s["created_at"]) // 1000 * 1000 + 1000
    expected = 0 if s["last_fire_at"] is None else (ms(s["last_fire_at"]) - first_due) // 1000 + 1
    if s["misfires_skipped"] or s["fires"] != expected or expected == 0:
        bad += 1
fires = sum(s["fires"] for s in schedules)
count, p99, p999 = quantiles(f"{out}/metrics-schedules.txt", "spool_schedule_fire_skew_seconds", "")
max_skew = max((s["fire_skew_max_seconds"] or 0) for s in schedules)
p99, p999 = min(p99, max_skew), min(p999, max_skew)
print(f"schedules @every 1s: {len(schedules)}, fires {fires}; not every instant exactly once: {bad}")
print(f"  skew due->fired: p99 {p99*1e3:.3f} ms, p999 {p999*1e3:.3f} ms, max {max_skew*1e3:.3f} ms")

stats = json.load(open(f"{out}/stats-idle.json"))
idle = next(q for q in stats["queues"] if q["name"] == "idle")
count, p99, p999 = quantiles(f"{out}/metrics-idle.txt", "spool_schedule_skew_seconds", 'queue="idle"')
p50 = quantiles.p50
max_skew = idle["skew_max_seconds"]
p50, p99 = min(p50, max_skew), min(p99, max_skew)
print(f"idle server, {int(count)} delayed jobs due one by one: wake-up lateness p50 {p50*1e3:.3f} ms, "
      f"p99 {p99*1e3:.3f} ms, max {max_skew*1e3:.3f} ms")
EOF
