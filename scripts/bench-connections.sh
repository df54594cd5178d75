#!/usr/bin/env bash
# Connections at scale, spool against the real beanstalkd 1.12 in the same
# run: a burst of connections opened at once, and memory per idle
# connection.
#
# burst:  `spool bench --mode accept`: CONNECTIONS connections opened with
#         CONCURRENCY connects in flight, one command each, all held; the
#         time until the last reply, and the connection attempts the kernel
#         dropped from the listen queue (TcpExt ListenOverflows/ListenDrops,
#         counters of the whole network namespace: keep loopback quiet).
# idle:   `spool bench --mode idle`: CONNECTIONS idle connections, the
#         server's RSS growth per connection; then one command on each
#         (`use`) and the growth again.
# livez:  spool only, the idle probe again with `/livez` timed every 10 ms
#         while the connections open (p50/p99/max; target < 10 ms at
#         CONNECTIONS=100000). A run of its own: the probes' HTTP
#         connections grow the server's heap too, by 40-80 bytes per
#         connection at 8,000, which must not count as the connections'.
# Each measurement runs against a fresh server; RUNS runs each, servers
# alternating, and the table shows the best (fastest, smallest) of them.
#
# Environment knobs (defaults in brackets):
#   CONNECTIONS [8000], CONCURRENCY [256], RUNS [3], TIME_LIMIT [60] (s, per run)
#   BEANSTALKD_PORT [11620], SPOOL_PORT [11621], SPOOL_HTTP_PORT [11622]
#   OUT [target/bench-connections]  raw JSON of every run
#   BIN [target/release/spool]  (built first unless BIN is given)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

CONNECTIONS=${CONNECTIONS:-8000}
CONCURRENCY=${CONCURRENCY:-256}
RUNS=${RUNS:-3}
TIME_LIMIT=${TIME_LIMIT:-60}
BEANSTALKD_PORT=${BEANSTALKD_PORT:-11620}
SPOOL_PORT=${SPOOL_PORT:-11621}
SPOOL_HTTP_PORT=${SPOOL_HTTP_PORT:-11622}
OUT=${OUT:-target/bench-connections}
SERVERS=(beanstalkd spool)
STRACE_JOBS=0

log() { printf '%s\n' "$*" >&2; }

STARTED_PIDS=()
cleanup() {
    local pid
    for pid in "${STARTED_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${STARTED_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"

if [[ -z ${BIN:-} ]]; then
    prerequisites
    BIN=target/release/spool
elif ! command -v beanstalkd >/dev/null; then
    log "installing beanstalkd"
    apt-get update >&2 && apt-get install -y beanstalkd >&2
fi

# The client and the server each hold a descriptor per connection: raise
# the limit (both, the servers inherit it) past the hard one where we may
# (root with CAP_SYS_RESOURCE), else to the hard one.
FDS_NEEDED=$((CONNECTIONS + 1000))
ulimit -n "$FDS_NEEDED" 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if (($(ulimit -n) < FDS_NEEDED)); then
    log "open-file limit $(ulimit -n) is below CONNECTIONS + 1000 and cannot be raised" \
        "(raising the hard limit $(ulimit -Hn) needs root with CAP_SYS_RESOURCE); lower CONNECTIONS"
    exit 1
fi
mkdir -p "$OUT"
rm -f "$OUT"/*.json

declare -A PID PORT
PORT[beanstalkd]=$BEANSTALKD_PORT
PORT[spool]=$SPOOL_PORT

start_server() {
    local name=$1 port=${PORT[$1]} pid tries
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        log "port $port is already in use; pick another with ${name^^}_PORT"
        exit 1
    fi
    case $name in
    beanstalkd) beanstalkd -l 127.0.0.1 -p "$port" >"$OUT/$name.log" 2>&1 &
        pid=$! ;;
    spool) SPOOL_LOG_LEVEL=info "$BIN" serve --in-memory -l 127.0.0.1 -p "$port" \
        --http-listen "127.0.0.1:$SPOOL_HTTP_PORT" >"$OUT/$name.log" 2>&1 &
        pid=$! ;;
    esac
    STARTED_PIDS+=("$pid")
    PID[$name]=$pid
    for ((tries = 0; tries < 100; tries++)); do
        kill -0 "$pid" 2>/dev/null || { log "$name exited at startup"; cat "$OUT/$name.log" >&2; exit 1; }
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.1
    done
    log "$name is not accepting on 127.0.0.1:$port after 10 s"
    exit 1
}

stop_server() {
    kill "${PID[$1]}" 2>/dev/null || true
    wait "${PID[$1]}" 2>/dev/null || true
}

# run_probe SERVER MODE RUN ARGS...: one probe against a fresh server.
run_probe() {
    local name=$1 mode=$2 run=$3 file extra=()
    shift 3
    file="$OUT/$name-$mode-r$run.json"
    start_server "$name"
    [[ $mode == idle ]] && extra=(--server-pid "${PID[$name]}")
    [[ $mode == livez ]] && extra=(--probe-livez --http "127.0.0.1:$SPOOL_HTTP_PORT")
    if ! timeout $((TIME_LIMIT + 30)) "$BIN" bench --json --mode "${mode/livez/idle}" \
        --addr "127.0.0.1:${PORT[$name]}" --connections "$CONNECTIONS" \
        --time-limit-secs "$TIME_LIMIT" "${extra[@]}" "$@" >"$file" 2>"$OUT/$name-$mode-r$run.err"; then
        log "  $name $mode run $run failed: $(tail -n1 "$OUT/$name-$mode-r$run.err")"
        rm -f "$file"
    fi
    stop_server "$name"
    # The last run's client sockets linger in TIME_WAIT; a pause keeps
    # runs from meeting each other's.
    sleep 1
}

# best SERVER MODE FIELD: the smallest FIELD over the runs ("-" if none ran).
best() {
    local f v out=-
    for f in "$OUT/$1-$2"-r*.json; do
        [[ -s $f ]] || continue
        v=$(json "$f" "$3")
        [[ $v == - ]] && continue
        out=$(awk -v a="$out" -v b="$v" 'BEGIN { if (a == "-" || b + 0 < a + 0) print b; else print a }')
    done
    echo "$out"
}

# worst SERVER MODE FIELD: the largest FIELD over the runs.
worst() {
    local f v out=-
    for f in "$OUT/$1-$2"-r*.json; do
        [[ -s $f ]] || continue
        v=$(json "$f" "$3")
        [[ $v == - ]] && continue
        out=$(awk -v a="$out" -v b="$v" 'BEGIN { if (a == "-" || b + 0 > a + 0) print b; else print a }')
    done
    echo "$out"
}

log "$CONNECTIONS connections, $CONCURRENCY connects in flight, $RUNS run(s) each, fresh server per run"
# Runs alternate between the servers so drift in the machine's load hits
# both alike.
for ((run = 1; run <= RUNS; run++)); do
    for name in "${SERVERS[@]}"; do
        run_probe "$name" accept "$run" --connect-concurrency "$CONCURRENCY"
        f="$OUT/$name-accept-r$run.json"
        [[ -s $f ]] && log "  $name burst run $run: $(json "$f" accept_secs) s," \
            "$(json "$f" listen_overflows) listen-queue overflows"
    done
done
for ((run = 1; run <= RUNS; run++)); do
    for name in "${SERVERS[@]}"; do
        run_probe "$name" idle "$run"
        f="$OUT/$name-idle-r$run.json"
        [[ -s $f ]] && log "  $name idle run $run: $(json "$f" rss_per_connection_bytes) B idle," \
            "$(json "$f" rss_per_connection_after_command_bytes) B after one command"
    done
done
for ((run = 1; run <= RUNS; run++)); do
    run_probe spool livez "$run"
    f="$OUT/spool-livez-r$run.json"
    [[ -s $f ]] && log "  spool /livez run $run: p50 $(json "$f" livez_p50_ms) ms," \
        "p99 $(json "$f" livez_p99_ms) ms, max $(json "$f" livez_max_ms) ms while connecting"
done

b=beanstalkd s=spool
echo
echo "spool vs beanstalkd $(beanstalkd -v 2>&1 | awk '{print $2}'): $CONNECTIONS connections, $RUNS run(s) each, best shown"
echo "(overflows: the most of any run); ratio = spool / beanstalkd, lower is better"
echo "spool's backlog: $(grep -o 'listen backlog[^"]*' "$OUT/spool.log" | head -n1 || true)"
printf '%-44s %12s %12s %7s\n' "" beanstalkd spool ratio
row() {
    printf '%-44s %12s %12s %7s\n' "$1" "$2" "$3" "$(ratio "$3" "$2")"
}
row "burst: seconds until all served ($CONCURRENCY at once)" \
    "$(best $b accept accept_secs)" "$(best $s accept accept_secs)"
printf '%-44s %12s %12s\n' "burst: listen-queue overflows (worst run)" \
    "$(worst $b accept listen_overflows)" "$(worst $s accept listen_overflows)"
printf '%-44s %12s %12s\n' "burst: connects slower than 500 ms (worst)" \
    "$(worst $b accept slow_connects)" "$(worst $s accept slow_connects)"
row "idle: RSS bytes per connection" \
    "$(best $b idle rss_per_connection_bytes)" "$(best $s idle rss_per_connection_bytes)"
row "idle: the same after one command each" \
    "$(best $b idle rss_per_connection_after_command_bytes)" \
    "$(best $s idle rss_per_connection_after_command_bytes)"
printf '%-44s %12s %12s\n' "connecting: /livez p50 ms (best run)" - "$(best $s livez livez_p50_ms)"
printf '%-44s %12s %12s\n' "connecting: /livez p99 ms (worst run)" - "$(worst $s livez livez_p99_ms)"
printf '%-44s %12s %12s\n' "connecting: /livez max ms (worst run)" - "$(worst $s livez livez_max_ms)"
echo
echo "raw results: $OUT/"
