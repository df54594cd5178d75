#!/usr/bin/env bash
# Compares spool with the real beanstalkd 1.12 under identical loads.
#
# Both servers run in memory on loopback, side by side; each load is run
# against one server at a time with the same client (`spool bench`), and the
# script prints ratios: throughput, latency, server CPU time per job, syscalls
# per job (if strace works here) and resident memory per idle connection.
#
# Environment knobs (defaults in brackets):
#   JOBS [200000]          jobs per load
#   RUNS [1]               runs of each load per server; the table shows the
#                          run with the most ops/s (this machine may be shared)
#   STRACE_JOBS [5000]     jobs per load while strace counts syscalls (strace
#                          slows a server ~20x); 0 skips the syscall count
#   IDLE_CONNECTIONS ["10000 50000"]  idle-connection counts to probe
#   TIME_LIMIT [120]       hard cap in seconds for each bench run
#   THREADS [1]            client threads (the client shares the CPUs with
#                          the server under test)
#   SCHED_BATCH [0]        1: the client runs under SCHED_BATCH (`spool bench
#                          --sched-batch`), so it does not preempt the server
#                          when a reply wakes it; the same for both servers
#   BEANSTALKD_PORT [11610], SPOOL_PORT [11611]
#   OUT [target/bench-vs-beanstalkd]  raw JSON results of every run
#   BIN [target/release/spool]  (built first unless BIN is given: e.g. a
#                          copy of an earlier build, for before/after)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

JOBS=${JOBS:-200000}
RUNS=${RUNS:-1}
STRACE_JOBS=${STRACE_JOBS:-5000}
IDLE_CONNECTIONS=${IDLE_CONNECTIONS:-"10000 50000"}
TIME_LIMIT=${TIME_LIMIT:-120}
THREADS=${THREADS:-1}
SCHED_BATCH=${SCHED_BATCH:-0}
CLIENT_FLAGS=()
((SCHED_BATCH)) && CLIENT_FLAGS+=(--sched-batch)
BEANSTALKD_PORT=${BEANSTALKD_PORT:-11610}
SPOOL_PORT=${SPOOL_PORT:-11611}
OUT=${OUT:-target/bench-vs-beanstalkd}
BIN_GIVEN=${BIN:-}
BIN=${BIN:-target/release/spool}
SERVERS=(beanstalkd spool)

log() { printf '%s\n' "$*" >&2; }

# --- everything we start is killed on exit --------------------------------
STARTED_PIDS=()
cleanup() {
    local pid
    for pid in "${STARTED_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${STARTED_PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT

# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"

# --- prerequisites ---------------------------------------------------------
prerequisites
for tool in timeout getconf; do
    command -v "$tool" >/dev/null || { log "missing $tool (coreutils)"; exit 1; }
done
CLK_TCK=$(getconf CLK_TCK)

# Idle connections need one descriptor each in the client and the server.
# Raise the limit as far as we may; each probe checks it is high enough.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
ulimit -n 120000 2>/dev/null || true
FD_LIMIT=$(ulimit -n)

mkdir -p "$OUT"

# --- servers ---------------------------------------------------------------
declare -A PID PORT
PORT[beanstalkd]=$BEANSTALKD_PORT
PORT[spool]=$SPOOL_PORT

# start_server NAME: starts a fresh instance, sets PID[NAME], waits until it
# accepts connections.
start_server() {
    local name=$1 port=${PORT[$1]} pid
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        log "port $port is already in use; pick another with ${name^^}_PORT"
        exit 1
    fi
    case $name in
    beanstalkd) beanstalkd -l 127.0.0.1 -p "$port" >"$OUT/$name.log" 2>&1 &
        pid=$! ;;
    spool) SPOOL_LOG_LEVEL=warn "$BIN" serve --in-memory -l 127.0.0.1 -p "$port" --http-listen 127.0.0.1:0 >"$OUT/$name.log" 2>&1 &
        pid=$! ;;
    esac
    STARTED_PIDS+=("$pid")
    PID[$name]=$pid
    local tries
    for ((tries = 0; tries < 100; tries++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "$name exited at startup:"
            cat "$OUT/$name.log" >&2
            exit 1
        fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    log "$name is not accepting on 127.0.0.1:$port after 10 s"
    exit 1
}

stop_server() {
    local name=$1
    kill "${PID[$name]}" 2>/dev/null || true
    wait "${PID[$name]}" 2>/dev/null || true
}

# bench SERVER LABEL RUN ARGS...: one bench run against SERVER. Its JSON
# and the server's CPU µs per job go to $OUT/SERVER-LABEL-rRUN.{json,cpu};
# the run with the most ops/s so far is copied to $OUT/SERVER-LABEL.{json,cpu}.
bench() {
    local name=$1 label=$2 run=$3
    shift 3
    local file="$OUT/$name-$label-r$run.json" cpu="$OUT/$name-$label-r$run.cpu"
    local before after rc=0 jobs_done
    before=$(cpu_ticks "${PID[$name]}")
    timeout $((TIME_LIMIT + 30)) "$BIN" bench --json --addr "127.0.0.1:${PORT[$name]}" \
        --time-limit-secs "$TIME_LIMIT" --threads "$THREADS" "${CLIENT_FLAGS[@]}" "$@" >"$file" || rc=$?
    after=$(cpu_ticks "${PID[$name]}")
    jobs_done=$(json "$file" jobs_done)
    if ((rc != 0)) || ! grep -q '"complete":true' "$file"; then
        log "  $name $label run $run: failed or incomplete (exit $rc), see $file"
    fi
    awk -v t=$((after - before)) -v hz="$CLK_TCK" -v n="$jobs_done" 'BEGIN {
        if (n == "-" || n + 0 == 0) print "-"; else printf "%.2f", t * 1e6 / hz / n }' >"$cpu"
    log "  $name $label run $run: $(json "$file" ops_per_sec) jobs/s"
    local best="$OUT/$name-$label.json"
    if [[ ! -s $best ]] || awk -v a="$(json "$file" ops_per_sec)" -v b="$(json "$best" ops_per_sec)" \
        'BEGIN { exit !(a != "-" && (b == "-" || a + 0 > b + 0)) }'; then
        cp "$file" "$best"
        cp "$cpu" "$OUT/$name-$label.cpu"
    fi
}

# --- throughput, latency and CPU per job -----------------------------------
LOADS=(mixed-p1 mixed-p32 put-4p drain-4c)
declare -A DESC=(
    [mixed-p1]="mixed 4P+4C pipeline 1"
    [mixed-p32]="mixed 4P+4C pipeline 32"
    [put-4p]="put-only 4P"
    [drain-4c]="drain 4C (after put-only)"
)
TAG=$$

for name in "${SERVERS[@]}"; do start_server "$name"; done
log "servers up: beanstalkd pid ${PID[beanstalkd]} on ${PORT[beanstalkd]}, spool pid ${PID[spool]} on ${PORT[spool]}"
log "loads of $JOBS jobs, 100-byte bodies, one server under load at a time"

rm -f "$OUT"/*.json "$OUT"/*.cpu
# Loads alternate between the servers, so drift in the machine's load
# (other processes, thermal state) hits both alike.
for ((run = 1; run <= RUNS; run++)); do
    for name in "${SERVERS[@]}"; do
        bench "$name" mixed-p1 "$run" --mode mixed --producers 4 --consumers 4 --pipeline 1 \
            --body-size 100 --jobs "$JOBS" --tube "m1-$TAG-$run"
    done
    for name in "${SERVERS[@]}"; do
        bench "$name" mixed-p32 "$run" --mode mixed --producers 4 --consumers 4 --pipeline 32 \
            --body-size 100 --jobs "$JOBS" --tube "m32-$TAG-$run"
    done
    for name in "${SERVERS[@]}"; do
        bench "$name" put-4p "$run" --mode put --producers 4 --pipeline 1 \
            --body-size 100 --jobs "$JOBS" --tube "pd-$TAG-$run"
    done
    # Takes the jobs the put-only load left in the same tube.
    for name in "${SERVERS[@]}"; do
        bench "$name" drain-4c "$run" --mode drain --consumers 4 --pipeline 1 \
            --body-size 100 --jobs "$JOBS" --tube "pd-$TAG-$run"
    done
done

# --- syscalls per job --------------------------------------------------------
declare -A SYSCALLS
strace_ok=0
if ((STRACE_JOBS > 0)) && command -v strace >/dev/null; then
    strace_ok=1
    for name in "${SERVERS[@]}"; do
        trace="$OUT/$name-strace.txt"
        rm -f "$trace"
        # -f attaches every thread of the running server.
        strace -c -f -p "${PID[$name]}" -o "$trace" 2>"$OUT/$name-strace.log" &
        spid=$!
        STARTED_PIDS+=("$spid")
        sleep 1
        if ! kill -0 "$spid" 2>/dev/null; then
            log "  strace cannot attach here ($(head -n1 "$OUT/$name-strace.log")): syscalls per job skipped"
            strace_ok=0
            break
        fi
        "$BIN" bench --json --addr "127.0.0.1:${PORT[$name]}" --time-limit-secs "$TIME_LIMIT" \
            --mode mixed --producers 4 --consumers 4 --pipeline 1 --body-size 100 \
            --jobs "$STRACE_JOBS" --tube "st-$TAG" >"$OUT/$name-strace-run.json" || true
        # strace prints its table when interrupted; give it 10 s.
        kill -INT "$spid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            kill -0 "$spid" 2>/dev/null || break
            sleep 0.1
        done
        kill "$spid" 2>/dev/null || true
        wait "$spid" 2>/dev/null || true
        total=$(awk '$NF == "total" { print $4 }' "$trace" 2>/dev/null || true)
        traced_jobs=$(json "$OUT/$name-strace-run.json" jobs_done)
        SYSCALLS[$name]=$(awk -v t="${total:--}" -v n="$traced_jobs" 'BEGIN {
            if (t == "-" || n == "-" || n + 0 == 0) print "-"; else printf "%.2f", t / n }')
        log "  $name: ${total:-?} syscalls for $traced_jobs mixed jobs"
    done
fi

for name in "${SERVERS[@]}"; do stop_server "$name"; done

# --- resident memory per idle connection ------------------------------------
declare -A RSS
idle_sizes=()
for n in $IDLE_CONNECTIONS; do
    # The client and the server each hold n descriptors, plus a few.
    if ((FD_LIMIT < n + 100)); then
        log "  idle $n: skipped, open-file limit is $FD_LIMIT (ulimit -n cannot go above $(ulimit -Hn) here)"
        continue
    fi
    idle_sizes+=("$n")
    for name in "${SERVERS[@]}"; do
        # A fresh server each time: freed memory would be reused otherwise.
        start_server "$name"
        file="$OUT/$name-idle-$n.json"
        if timeout $((TIME_LIMIT + 30)) "$BIN" bench --json --mode idle --connections "$n" \
            --server-pid "${PID[$name]}" --addr "127.0.0.1:${PORT[$name]}" \
            --time-limit-secs "$TIME_LIMIT" >"$file" 2>"$OUT/$name-idle-$n.err"; then
            RSS[$name-$n]=$(json "$file" rss_per_connection_bytes)
        else
            log "  idle $n against $name failed: $(tail -n1 "$OUT/$name-idle-$n.err")"
            RSS[$name-$n]=-
        fi
        stop_server "$name"
    done
done

# --- report -------------------------------------------------------------------
echo
echo "spool vs beanstalkd $(beanstalkd -v 2>&1 | awk '{print $2}'), $JOBS jobs per load, 100-byte bodies, best of $RUNS run(s),"
echo "client: spool bench, $THREADS thread(s)$( ((SCHED_BATCH)) && echo ", SCHED_BATCH"); $(nproc) CPUs shared by client and server"
echo "ratio = spool / beanstalkd (ops/s: higher is better; latency, CPU, syscalls, memory: lower is better)"
echo
echo "latency: p99 in microseconds of put and of reserve requests (send to reply)"
printf '%-28s %11s %11s %6s | %10s %10s | %10s %10s\n' \
    "load" "bs ops/s" "spool ops/s" "ratio" "bs put" "spool put" "bs rsv" "spool rsv"
for load in "${LOADS[@]}"; do
    b="$OUT/beanstalkd-$load.json" s="$OUT/spool-$load.json"
    bo=$(json "$b" ops_per_sec) so=$(json "$s" ops_per_sec)
    flag=""
    grep -q '"complete":true' "$b" && grep -q '"complete":true' "$s" || flag=" (incomplete)"
    printf '%-28s %11s %11s %6s | %10s %10s | %10s %10s%s\n' "${DESC[$load]}" \
        "$(whole "$bo")" "$(whole "$so")" "$(ratio "$so" "$bo")" \
        "$(json "$b" put_latency_us.p99)" "$(json "$s" put_latency_us.p99)" \
        "$(json "$b" reserve_latency_us.p99)" "$(json "$s" reserve_latency_us.p99)" "$flag"
done
echo
printf '%-28s %14s %14s %6s\n' "server CPU per job" "bs us/job" "spool us/job" "ratio"
for load in "${LOADS[@]}"; do
    bc=$(<"$OUT/beanstalkd-$load.cpu") sc=$(<"$OUT/spool-$load.cpu")
    printf '%-28s %14s %14s %6s\n' "${DESC[$load]}" "$bc" "$sc" "$(ratio "$sc" "$bc")"
done
echo
if ((strace_ok)); then
    printf '%-28s %14s %14s %6s\n' "syscalls per job (strace)" "beanstalkd" "spool" "ratio"
    printf '%-28s %14s %14s %6s\n' "mixed 4P+4C p1, $STRACE_JOBS jobs" \
        "${SYSCALLS[beanstalkd]:--}" "${SYSCALLS[spool]:--}" \
        "$(ratio "${SYSCALLS[spool]:--}" "${SYSCALLS[beanstalkd]:--}")"
else
    echo "syscalls per job: skipped ($( ((STRACE_JOBS > 0)) && echo "no usable strace" || echo "STRACE_JOBS=0"))"
fi
echo
if ((${#idle_sizes[@]})); then
    printf '%-28s %14s %14s %6s\n' "RSS per idle connection" "bs bytes" "spool bytes" "ratio"
    for n in "${idle_sizes[@]}"; do
        printf '%-28s %14s %14s %6s\n' "$n connections" \
            "$(whole "${RSS[beanstalkd-$n]}")" "$(whole "${RSS[spool-$n]}")" \
            "$(ratio "${RSS[spool-$n]}" "${RSS[beanstalkd-$n]}")"
    done
else
    echo "RSS per idle connection: skipped (open-file limit $FD_LIMIT)"
fi
echo
echo "raw results: $OUT/"
