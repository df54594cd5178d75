#!/usr/bin/env bash
# Server CPU per job at pipeline 1, spool against beanstalkd, with the counts
# a shared machine moves less than it moves CPU time.
#
# Each run starts one server in memory and `spool bench` (mixed 4 producers
# + 4 consumers, pipeline 1, 100-byte bodies) in a network namespace of
# their own (`unshare -n`, root), so the kernel's TCP counters (`nstat`)
# count this run's segments only. Servers alternate run by run. Per job it
# prints: the server's CPU time (all threads), its voluntary and
# involuntary context switches, TCP segments sent (both directions: the
# protocol needs 4) and pure ACKs among them, the client's CPU time and
# context switches (it shares the cores: server + client CPU per job bounds
# the throughput) and the server's system calls (perf's counters, "-"
# without perf); then the median of the runs and spool's ratio to
# beanstalkd. With CALLGRIND=1 it also counts spool's
# user-space instructions per job under callgrind (valgrind), which do not
# depend on the machine's load at all. With FLOOR=1 a third server runs the
# same load: `crates/spool/examples/floor_server.rs`, canned replies from one
# epoll loop with no job state, the kernel's and the event loop's share of
# a job that any server speaking the protocol pays; its column is the floor
# under both servers' figures (and under the ratio spool can reach).
#
# Environment knobs (defaults in brackets):
#   JOBS [50000]      jobs per run (after 5,000 of warm-up)
#   RUNS [3]          runs per server
#   TIME_LIMIT [60]   hard cap in seconds for each bench run
#   CALLGRIND [0]     1: also the user-space instruction count (10,000 jobs)
#   SCHED_BATCH [0]   1: the client runs under SCHED_BATCH (`spool bench
#                     --sched-batch`: a reply that wakes it does not make it
#                     preempt the server); the same for both servers
#   FLOOR [0]         1: also the floor server (built first unless
#                     FLOOR_BIN is given)
#   BIN [target/release/spool]  (built first unless BIN is given)
set -euo pipefail

SELF=$(realpath "${BASH_SOURCE[0]}")
cd "$(dirname "$SELF")/.."

JOBS=${JOBS:-50000}
RUNS=${RUNS:-3}
TIME_LIMIT=${TIME_LIMIT:-60}
CALLGRIND=${CALLGRIND:-0}
SCHED_BATCH=${SCHED_BATCH:-0}
FLOOR=${FLOOR:-0}
FLOOR_BIN=${FLOOR_BIN:-}
BIN_GIVEN=${BIN:-}
BIN=${BIN:-target/release/spool}
PORT=11620

log() { printf '%s\n' "$*" >&2; }

# Inside the namespace: one run against one server, one line of figures.
if [[ ${1:-} == --one-run ]]; then
    name=$2
    ip link set lo up
    case $name in
    beanstalkd) beanstalkd -l 127.0.0.1 -p "$PORT" >/dev/null 2>&1 & ;;
    spool) SPOOL_LOG_LEVEL=warn "$BIN" serve --in-memory -l 127.0.0.1 -p "$PORT" \
        --http-listen 127.0.0.1:0 >/dev/null 2>&1 & ;;
    floor) "$FLOOR_BIN" "127.0.0.1:$PORT" >/dev/null 2>&1 & ;;
    esac
    server=$!
    trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
    for ((tries = 0; tries < 100; tries++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
        sleep 0.1
    done
    client_flags=()
    ((SCHED_BATCH)) && client_flags+=(--sched-batch)
    load() {
        timeout $((TIME_LIMIT + 30)) "$BIN" bench --json --addr "127.0.0.1:$PORT" \
            --time-limit-secs "$TIME_LIMIT" --mode mixed --producers 4 --consumers 4 \
            --pipeline 1 --body-size 100 --jobs "$1" --tube "$2" "${client_flags[@]}"
    }
    load 5000 warm >/dev/null
    # CPU time in ns (schedstat's first field, summed over threads) and
    # context switches, read from /proc before and after.
    counters() {
        local t ns=0 vol=0 invol=0 a b
        for t in /proc/"$server"/task/*; do
            read -r a _ <"$t/schedstat"
            ns=$((ns + a))
            a=$(awk '/^voluntary_ctxt_switches/ {print $2}' "$t/status")
            b=$(awk '/^nonvoluntary_ctxt_switches/ {print $2}' "$t/status")
            vol=$((vol + a)) invol=$((invol + b))
        done
        echo "$ns $vol $invol"
    }
    # perf's software counters (not strace, which slows a server ~20x):
    # the server's system calls, and the client's CPU time and context
    # switches (the client shares the two cores with the server).
    counts=$(mktemp -d)
    trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$counts"' EXIT
    perf stat -x, -o "$counts/server" -e raw_syscalls:sys_enter -p "$server" 2>/dev/null &
    perf_server=$!
    sleep 0.5
    nstat -n
    before=$(counters)
    result=$(perf stat -x, -o "$counts/client" -e task-clock,context-switches -- \
        timeout $((TIME_LIMIT + 30)) "$BIN" bench --json --addr "127.0.0.1:$PORT" \
        --time-limit-secs "$TIME_LIMIT" --mode mixed --producers 4 --consumers 4 \
        --pipeline 1 --body-size 100 --jobs "$JOBS" --tube measured "${client_flags[@]}")
    after=$(counters)
    kill -INT "$perf_server" 2>/dev/null || true
    wait "$perf_server" 2>/dev/null || true
    grep -q '"complete":true' <<<"$result" || { log "$name: the bench run did not complete"; exit 1; }
    read -r segs acks < <(nstat -z TcpOutSegs TcpExtTCPPureAcks | awk '
        $1 == "TcpOutSegs" { s = $2 } $1 == "TcpExtTCPPureAcks" { a = $2 } END { print s + 0, a + 0 }')
    # task-clock is in ms; "-" where perf counted nothing.
    perf_count() { awk -F, -v e="$2" '$3 == e && $1 ~ /^[0-9.]+$/ { v = $1 } END { print (v == "" ? "-" : v) }' "$counts/$1" 2>/dev/null || echo -; }
    client_ms=$(perf_count client task-clock)
    client_cs=$(perf_count client context-switches)
    syscalls=$(perf_count server raw_syscalls:sys_enter)
    jobs_done=$(grep -o '"jobs_done":[0-9]*' <<<"$result" | cut -d: -f2)
    rate=$(grep -o '"ops_per_sec":[0-9.]*' <<<"$result" | cut -d: -f2)
    echo "$before $after $segs $acks $jobs_done $client_ms $client_cs $syscalls $rate" | awk '
        function per(v, scale, fmt) { return v == "-" ? "-" : sprintf(fmt, v * scale / $9) }
        {
        n = $9; printf "%.2f %.3f %.3f %.2f %.3f %s %s %s %.0f\n",
            ($4 - $1) / 1000 / n, ($5 - $2) / n, ($6 - $3) / n, $7 / n, $8 / n,
            per($10, 1000, "%.2f"), per($11, 1, "%.3f"), per($12, 1, "%.2f"), $13 }'
    exit 0
fi

[[ $(id -u) == 0 ]] || { log "needs root (unshare -n for a private loopback)"; exit 1; }
for tool in unshare nstat ip beanstalkd perf; do
    command -v "$tool" >/dev/null || { log "missing $tool"; exit 1; }
done
if [[ -z $BIN_GIVEN ]]; then
    log "building spool (release)"
    cargo build --release -p spool >&2
fi
BIN=$(realpath "$BIN")
SERVERS=(beanstalkd spool)
if ((FLOOR)); then
    if [[ -z $FLOOR_BIN ]]; then
        log "building the floor server (release example)"
        cargo build --release -p spool --example floor_server >&2
        FLOOR_BIN=target/release/examples/floor_server
    fi
    FLOOR_BIN=$(realpath "$FLOOR_BIN")
    SERVERS+=(floor)
fi
export BIN JOBS TIME_LIMIT SCHED_BATCH FLOOR_BIN

declare -A ROWS
for ((run = 1; run <= RUNS; run++)); do
    for name in "${SERVERS[@]}"; do
        row=$(unshare -n bash "$SELF" --one-run "$name")
        log "  $name run $run: $row"
        ROWS[$name]+="$row"$'\n'
    done
done

# median COLUMN NAME
median() {
    printf '%s' "${ROWS[$2]}" | awk -v c="$1" 'NF { print $c }' | sort -g |
        awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

echo
echo "mixed 4P+4C pipeline 1, $JOBS jobs, 100-byte bodies; median of $RUNS run(s) per server$( ((SCHED_BATCH)) && echo ", client SCHED_BATCH"); load: $(cut -d' ' -f1-3 /proc/loadavg)"
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0 || a == "-") print "-"; else printf "%.2f", a / b }'; }
if ((FLOOR)); then
    printf '%-36s %12s %12s %7s %12s %7s\n' "per job" "beanstalkd" "spool" "ratio" "floor" "ratio"
else
    printf '%-36s %12s %12s %7s\n' "per job" "beanstalkd" "spool" "ratio"
fi
col=1
for what in "server CPU (us)" "voluntary context switches" "involuntary context switches" \
    "TCP segments (both ways)" "pure ACK segments" "client CPU (us)" \
    "client context switches" "server syscalls" "throughput (jobs/s)"; do
    b=$(median "$col" beanstalkd) s=$(median "$col" spool)
    if ((FLOOR)); then
        f=$(median "$col" floor)
        printf '%-36s %12s %12s %7s %12s %7s\n' "$what" "$b" "$s" "$(ratio "$s" "$b")" "$f" "$(ratio "$f" "$b")"
    else
        printf '%-36s %12s %12s %7s\n' "$what" "$b" "$s" "$(ratio "$s" "$b")"
    fi
    col=$((col + 1))
done

if ((CALLGRIND)); then
    command -v valgrind >/dev/null || { log "CALLGRIND=1 needs valgrind"; exit 1; }
    out=$(mktemp -d)
    trap 'rm -rf "$out"' EXIT
    port=11621
    SPOOL_LOG_LEVEL=warn valgrind --tool=callgrind --callgrind-out-file="$out/cg" \
        "$BIN" serve --in-memory -l 127.0.0.1 -p "$port" --http-listen 127.0.0.1:0 \
        >"$out/log" 2>&1 &
    server=$!
    for ((tries = 0; tries < 300; tries++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    cg_load() {
        timeout $((TIME_LIMIT + 30)) "$BIN" bench --json --addr "127.0.0.1:$port" \
            --time-limit-secs "$TIME_LIMIT" --mode mixed --producers 4 --consumers 4 \
            --pipeline 1 --body-size 100 --jobs "$1" --tube "$2" >/dev/null
    }
    cg_load 2000 warm
    callgrind_control -z "$server" >/dev/null 2>&1
    cg_load 10000 measured
    callgrind_control -d "$server" >/dev/null 2>&1
    kill "$server"
    wait "$server" 2>/dev/null || true
    # cg.1 is the dump taken after the zeroing: the measured jobs alone.
    total=$(awk '/^summary:/ { print $2 }' "$out/cg.1")
    echo "spool user-space instructions per job (callgrind, 10,000 jobs after 2,000): $((total / 10000))"
fi
