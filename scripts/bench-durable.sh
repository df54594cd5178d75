#!/usr/bin/env bash
# Benchmarks spool's durable storage (the write-ahead log) against beanstalkd
# 1.12, in memory and with its binlog (-b), and measures recovery time.
#
# Every measurement starts a fresh server on a fresh data directory (under a
# temporary directory on the same file system as /tmp) and puts load on it
# with `spool bench`; one server runs at a time. The rows, with
# ratio = spool / peer:
#
#   1  spool --fsync always       vs beanstalkd in memory     mixed 64P+8C p1
#   2  spool --fsync always       vs beanstalkd -b            mixed 4P+4C p1
#   3  spool --fsync interval:50  vs beanstalkd -b            mixed 4P+4C p1
#   4  spool --fsync interval:50  vs beanstalkd -b -f 50      mixed 4P+4C p1
#   5  spool --fsync never        vs beanstalkd -b -F         mixed 4P+4C p1
#   6  spool --fsync never        vs beanstalkd -b            mixed 4P+4C p1
#   7  spool --fsync never        vs spool --in-memory        mixed 4P+4C p1
#      (what the log costs spool itself)
#   8  spool --fsync always       vs beanstalkd in memory     sync 64P+8C p1
#   9  spool --fsync always       vs beanstalkd -b            sync 4P+4C p1
#      (sync: consumers wait for DELETED before the next reserve, as
#      synchronous client libraries do)
#
# "beanstalkd -b" is beanstalkd's default with a binlog, which is NOT "no
# fsync": beanstalkd 1.12 syncs at most once every 50 ms by default (its -h
# and man page; strace shows it), so rows 3 and 4 run the same peer setting,
# measured separately. -F is its "never fsync". beanstalkd's -f syncs only
# when a later write arrives; spool's interval is a timer.
#
# Then recovery: RECOVERY_JOBS ready 100-byte jobs are put into spool
# --fsync never, spool is stopped with SIGTERM and restarted on the same
# directory, and the script measures the time until it accepts connections
# and until `stats` shows every job ready; it also reports spool's own
# "recovered the log" line, the data directory size and the RSS after
# recovery. The same for beanstalkd -b unless BEANSTALKD_RECOVERY=0.
# The log was just written, so recovery reads it from the page cache.
#
# Environment knobs (defaults in brackets):
#   JOBS [100000]            jobs per load
#   RUNS [2]                 runs of each load per server; the table shows the
#                            run with the most ops/s (this machine may be shared)
#   RECOVERY_JOBS [1000000]  jobs in the log for the recovery measurement;
#                            0 skips recovery
#   BEANSTALKD_RECOVERY [1]  0 skips beanstalkd's recovery measurement
#   STRACE_JOBS [10000]      jobs per traced run that counts the servers'
#                            syscalls and fsyncs per job (strace slows a
#                            server several-fold, so batches grow: read the
#                            counts as a shape, not a rate); 0 skips it
#   TIME_LIMIT [120]         hard cap in seconds for each load's bench run
#   RECOVERY_TIME_LIMIT [300] hard cap in seconds for the recovery put run
#   THREADS [1]              client threads (the client shares the CPUs with
#                            the server under test)
#   BEANSTALKD_PORT [11620], SPOOL_PORT [11621]
#   OUT [target/bench-durable]  raw JSON results of every run
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

JOBS=${JOBS:-100000}
RUNS=${RUNS:-2}
RECOVERY_JOBS=${RECOVERY_JOBS:-1000000}
BEANSTALKD_RECOVERY=${BEANSTALKD_RECOVERY:-1}
STRACE_JOBS=${STRACE_JOBS:-10000}
TIME_LIMIT=${TIME_LIMIT:-120}
RECOVERY_TIME_LIMIT=${RECOVERY_TIME_LIMIT:-300}
THREADS=${THREADS:-1}
BEANSTALKD_PORT=${BEANSTALKD_PORT:-11620}
SPOOL_PORT=${SPOOL_PORT:-11621}
OUT=${OUT:-target/bench-durable}
BIN=target/release/spool
# Bounds on waits for a server to start (at most) and to stop after SIGTERM.
START_TIMEOUT_S=10
STOP_TIMEOUT_S=30
# Recovery: poll every 20 ms, for at most 60 s.
POLL_S=0.02
RECOVERY_TIMEOUT_S=60

log() { printf '%s\n' "$*" >&2; }

# --- everything we start is killed, every temp dir removed, on exit -------
declare -A LIVE=()  # pids of servers we started and have not yet reaped
TMP=""
cleanup() {
    local pid
    for pid in "${!LIVE[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${!LIVE[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n $TMP && -d $TMP ]]; then
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
# Interrupted: exit, so that the EXIT trap runs.
trap 'exit 130' INT
trap 'exit 143' TERM

# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"

# --- prerequisites ---------------------------------------------------------
prerequisites
for tool in timeout getconf du stat mktemp; do
    command -v "$tool" >/dev/null || { log "missing $tool (coreutils)"; exit 1; }
done
if [[ -z ${EPOCHREALTIME:-} ]]; then
    log "needs bash 5 (EPOCHREALTIME)"
    exit 1
fi
CLK_TCK=$(getconf CLK_TCK)

mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.cpu "$OUT"/*.log "$OUT"/*.txt
# Data directories live on the same file system as /tmp.
TMP=$(mktemp -d "${TMPDIR:-/tmp}/spool-bench-durable.XXXXXX")
FSTYPE=$(stat -f -c %T "$TMP")
if [[ $FSTYPE == tmpfs || $FSTYPE == ramfs ]]; then
    log "warning: $TMP is on $FSTYPE: fsync costs nothing there, durable numbers mean little"
fi

# --- servers ---------------------------------------------------------------
# Variants: how each server is started. DIR is a fresh data directory.
declare -A VARIANT_DESC=(
    [spool-always]="spool --fsync always"
    [spool-i50]="spool --fsync interval:50"
    [spool-never]="spool --fsync never"
    [spool-mem]="spool --in-memory"
    [bs-mem]="beanstalkd (in memory)"
    [bs-b]="beanstalkd -b (default: -f 50)"
    [bs-f50]="beanstalkd -b -f 50 (explicit)"
    [bs-F]="beanstalkd -b -F (no fsync)"
)

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

now() { echo "$EPOCHREALTIME"; }

# elapsed_ms START END: milliseconds between two EPOCHREALTIME readings.
elapsed_ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f", (b - a) * 1000 }'; }

# launch VARIANT DIR PORT LOGFILE [LEVEL]: starts the server in the
# background and sets SERVER_PID; does not wait for it.
SERVER_PID=""
launch() {
    local variant=$1 dir=$2 port=$3 logfile=$4 level=${5:-warn}
    if port_open "$port"; then
        log "port $port is already in use; pick another with SPOOL_PORT / BEANSTALKD_PORT"
        exit 1
    fi
    local spool=(env SPOOL_LOG_LEVEL="$level" SPOOL_LOG_FORMAT=text "$BIN" serve -l 127.0.0.1 -p "$port" --http-listen 127.0.0.1:0)
    # beanstalkd wants its binlog directory to exist.
    [[ $variant == *-mem ]] || mkdir -p "$dir"
    case $variant in
    spool-always) "${spool[@]}" -b "$dir" --fsync always >"$logfile" 2>&1 & ;;
    spool-i50) "${spool[@]}" -b "$dir" --fsync interval:50 >"$logfile" 2>&1 & ;;
    spool-never) "${spool[@]}" -b "$dir" --fsync never >"$logfile" 2>&1 & ;;
    spool-mem) "${spool[@]}" --in-memory >"$logfile" 2>&1 & ;;
    bs-mem) beanstalkd -l 127.0.0.1 -p "$port" >"$logfile" 2>&1 & ;;
    bs-b) beanstalkd -b "$dir" -l 127.0.0.1 -p "$port" >"$logfile" 2>&1 & ;;
    bs-f50) beanstalkd -b "$dir" -f 50 -l 127.0.0.1 -p "$port" >"$logfile" 2>&1 & ;;
    bs-F) beanstalkd -b "$dir" -F -l 127.0.0.1 -p "$port" >"$logfile" 2>&1 & ;;
    *) log "unknown variant $variant"; exit 1 ;;
    esac
    SERVER_PID=$!
    LIVE[$SERVER_PID]=1
}

# start_server VARIANT DIR PORT LOGFILE: launches it and waits (bounded)
# until it accepts connections.
start_server() {
    local variant=$1 port=$3 logfile=$4 tries
    launch "$@"
    for ((tries = 0; tries < START_TIMEOUT_S * 10; tries++)); do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            log "$variant exited at startup:"
            cat "$logfile" >&2
            exit 1
        fi
        if port_open "$port"; then
            return 0
        fi
        sleep 0.1
    done
    log "$variant is not accepting on 127.0.0.1:$port after $START_TIMEOUT_S s"
    exit 1
}

# stop_server PID: SIGTERM, then waits up to STOP_TIMEOUT_S for it to exit
# (SIGKILL after that). Sets STOP_MS (time to exit) and STOP_STATUS (its exit
# status, or "killed" when SIGTERM was not enough).
STOP_MS="" STOP_STATUS=""
stop_server() {
    local pid=$1 t0 tries
    t0=$(now)
    STOP_STATUS=""
    kill -TERM "$pid" 2>/dev/null || true
    for ((tries = 0; tries < STOP_TIMEOUT_S * 50; tries++)); do
        kill -0 "$pid" 2>/dev/null || break
        # A zombie has exited; only wait reaps it.
        [[ $(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null) == Z ]] && break
        sleep 0.02
    done
    if kill -0 "$pid" 2>/dev/null && [[ $(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null) != Z ]]; then
        log "  pid $pid still running $STOP_TIMEOUT_S s after SIGTERM: killing it"
        kill -KILL "$pid" 2>/dev/null || true
        STOP_STATUS=killed
    fi
    local rc=0
    wait "$pid" 2>/dev/null || rc=$?
    STOP_MS=$(elapsed_ms "$t0" "$(now)")
    [[ -n $STOP_STATUS ]] || STOP_STATUS=$rc
    unset "LIVE[$pid]"
}

# stats_value PORT KEY: KEY's value from one `stats` request; fails if the
# server does not accept or does not answer with KEY within 1 s.
stats_value() {
    local port=$1 key=$2
    (
        exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
        printf 'stats\r\n' >&3
        IFS= read -r -t 1 -u 3 line || exit 1
        [[ $line == OK* ]] || exit 1
        while IFS= read -r -t 1 -u 3 line; do
            line=${line%$'\r'}
            if [[ $line == "$key: "* ]]; then
                echo "${line#*: }"
                exit 0
            fi
        done
        exit 1
    ) 2>/dev/null
}

# --- loads -------------------------------------------------------------------
# load name -> bench arguments
declare -A LOAD_ARGS=(
    [m64]="--mode mixed --producers 64 --consumers 8 --pipeline 1 --body-size 100"
    [m4]="--mode mixed --producers 4 --consumers 4 --pipeline 1 --body-size 100"
    [m64s]="--mode mixed --producers 64 --consumers 8 --pipeline 1 --body-size 100 --wait-for-delete"
    [m4s]="--mode mixed --producers 4 --consumers 4 --pipeline 1 --body-size 100 --wait-for-delete"
)
declare -A LOAD_DESC=([m64]="mixed 64P+8C p1" [m4]="mixed 4P+4C p1"
    [m64s]="sync 64P+8C p1" [m4s]="sync 4P+4C p1")
# Rows: "spool-variant peer-variant load target" (target: minimum ratio, or -)
ROWS=(
    "spool-always bs-mem m64 1"
    "spool-always bs-b m4 -"
    "spool-i50 bs-b m4 2"
    "spool-i50 bs-f50 m4 -"
    "spool-never bs-F m4 -"
    "spool-never bs-b m4 -"
    "spool-never spool-mem m4 -"
    "spool-always bs-mem m64s -"
    "spool-always bs-b m4s -"
)
# Every (variant, load) measured once per run, spool and its peer alternating
# so that drift in the machine's load hits both alike.
MEASURE=(
    "spool-always m64" "bs-mem m64"
    "spool-always m4" "bs-b m4"
    "spool-i50 m4" "bs-f50 m4"
    "spool-never m4" "bs-F m4"
    "spool-mem m4"
    "spool-always m64s" "bs-mem m64s"
    "spool-always m4s" "bs-b m4s"
)
TAG=$$

# bench VARIANT LOAD RUN: fresh server, one bench run, server stopped. JSON
# and server CPU µs per job go to $OUT/VARIANT-LOAD-rRUN.{json,cpu}; the run
# with the most ops/s so far is copied to $OUT/VARIANT-LOAD.{json,cpu}.
bench() {
    local variant=$1 load=$2 run=$3 port
    local file="$OUT/$variant-$load-r$run.json" cpu="$OUT/$variant-$load-r$run.cpu"
    local dir="$TMP/$variant-$load-r$run" before after rc=0 jobs_done pid
    if [[ $variant == bs-* ]]; then port=$BEANSTALKD_PORT; else port=$SPOOL_PORT; fi
    start_server "$variant" "$dir" "$port" "$OUT/$variant-$load-r$run.log"
    pid=$SERVER_PID
    before=$(cpu_ticks "$pid")
    # shellcheck disable=SC2086 # LOAD_ARGS holds several words
    timeout $((TIME_LIMIT + 30)) "$BIN" bench --json --addr "127.0.0.1:$port" \
        --time-limit-secs "$TIME_LIMIT" --threads "$THREADS" ${LOAD_ARGS[$load]} \
        --jobs "$JOBS" --tube "$load-$TAG-$run" >"$file" || rc=$?
    after=$(cpu_ticks "$pid")
    stop_server "$pid"
    rm -rf "$dir"
    jobs_done=$(json "$file" jobs_done)
    if ((rc != 0)) || ! grep -q '"complete":true' "$file"; then
        log "  $variant $load run $run: failed or incomplete (exit $rc), see $file"
    fi
    awk -v t=$((after - before)) -v hz="$CLK_TCK" -v n="$jobs_done" 'BEGIN {
        if (n == "-" || n + 0 == 0) print "-"; else printf "%.2f", t * 1e6 / hz / n }' >"$cpu"
    log "  $variant $load run $run: $(whole "$(json "$file" ops_per_sec)") jobs/s, $(<"$cpu") server CPU us/job"
    local best="$OUT/$variant-$load.json"
    if [[ ! -s $best ]] || awk -v a="$(json "$file" ops_per_sec)" -v b="$(json "$best" ops_per_sec)" \
        'BEGIN { exit !(a != "-" && (b == "-" || a + 0 > b + 0)) }'; then
        cp "$file" "$best"
        cp "$cpu" "$OUT/$variant-$load.cpu"
    fi
}

# The disk's sync latency bounds every fsync-always figure: measure it once.
DSYNC_WRITES=2000
dsync_t0=$(now)
dd if=/dev/zero of="$TMP/dsync-probe" bs=128 count="$DSYNC_WRITES" oflag=dsync status=none
DSYNC_US=$(( $(elapsed_ms "$dsync_t0" "$(now)") * 1000 / DSYNC_WRITES ))
rm -f "$TMP/dsync-probe"
log "disk: $DSYNC_US us per O_DSYNC write"
log "loads of $JOBS jobs, 100-byte bodies, one server under load at a time, data under $TMP ($FSTYPE)"
for ((run = 1; run <= RUNS; run++)); do
    for m in "${MEASURE[@]}"; do
        read -r variant load <<<"$m"
        bench "$variant" "$load" "$run"
    done
done

# --- syscalls and fsyncs per job (strace) -------------------------------------
# trace VARIANT LOAD: a fresh server under strace -c -f for one bench run of
# STRACE_JOBS jobs; sets TRACE[VARIANT-LOAD-{calls,syncs}] per job.
declare -A TRACE=()
TRACED=("spool-always m64" "bs-mem m64" "spool-always m4" "spool-i50 m4" "spool-never m4"
    "bs-b m4" "bs-f50 m4" "bs-F m4")
strace_ok=0
trace() {
    local variant=$1 load=$2 port spid pid i
    local key="$variant-$load" file="$OUT/strace-$variant-$load.txt"
    if [[ $variant == bs-* ]]; then port=$BEANSTALKD_PORT; else port=$SPOOL_PORT; fi
    start_server "$variant" "$TMP/trace-$key" "$port" "$OUT/strace-$key-server.log"
    pid=$SERVER_PID
    # -f attaches every thread of the running server.
    strace -c -f -p "$pid" -o "$file" 2>"$OUT/strace-$key.log" &
    spid=$!
    LIVE[$spid]=1
    sleep 1
    if ! kill -0 "$spid" 2>/dev/null; then
        log "  strace cannot attach here ($(head -n1 "$OUT/strace-$key.log")): syscalls per job skipped"
        unset "LIVE[$spid]"
        wait "$spid" 2>/dev/null || true
        stop_server "$pid"
        return 1
    fi
    # shellcheck disable=SC2086 # LOAD_ARGS holds several words
    timeout $((TIME_LIMIT + 30)) "$BIN" bench --json --addr "127.0.0.1:$port" \
        --time-limit-secs "$TIME_LIMIT" --threads "$THREADS" ${LOAD_ARGS[$load]} \
        --jobs "$STRACE_JOBS" --tube "st-$TAG" >"$OUT/strace-$key.json" || true
    # strace prints its table when interrupted; give it 10 s.
    kill -INT "$spid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$spid" 2>/dev/null || break
        sleep 0.1
    done
    kill "$spid" 2>/dev/null || true
    wait "$spid" 2>/dev/null || true
    unset "LIVE[$spid]"
    stop_server "$pid"
    rm -rf "$TMP/trace-$key"
    local jobs total syncs
    jobs=$(json "$OUT/strace-$key.json" jobs_done)
    total=$(awk '$NF == "total" { print $4 }' "$file" 2>/dev/null || true)
    syncs=$(awk '$NF == "fsync" || $NF == "fdatasync" { n += $4 } END { print n + 0 }' "$file" 2>/dev/null || true)
    TRACE[$key-calls]=$(awk -v t="${total:--}" -v n="$jobs" 'BEGIN {
        if (t == "-" || n == "-" || n + 0 == 0) print "-"; else printf "%.2f", t / n }')
    TRACE[$key-syncs]=$(awk -v t="${syncs:--}" -v n="$jobs" 'BEGIN {
        if (t == "-" || n == "-" || n + 0 == 0) print "-"; else printf "%.3f", t / n }')
    log "  $variant $load: ${total:-?} syscalls, ${syncs:-?} fsyncs for $jobs jobs"
}
if ((STRACE_JOBS > 0)) && command -v strace >/dev/null; then
    log "counting syscalls with strace, $STRACE_JOBS jobs per load"
    strace_ok=1
    for m in "${TRACED[@]}"; do
        read -r variant load <<<"$m"
        trace "$variant" "$load" || { strace_ok=0; break; }
    done
fi

# --- recovery ----------------------------------------------------------------
# recovery VARIANT PORT: fills a fresh log with RECOVERY_JOBS ready jobs,
# stops the server with SIGTERM, restarts it on the same directory and times
# it. Results go to REC[VARIANT-*] and $OUT/recovery-VARIANT.json.
declare -A REC=()
recovery() {
    local variant=$1 port=$2 dir="$TMP/recovery-$1" rc=0 pid
    local putfile="$OUT/recovery-$variant-put.json"
    log "recovery, $variant: putting $RECOVERY_JOBS jobs (4 producers, pipeline 32)"
    start_server "$variant" "$dir" "$port" "$OUT/recovery-$variant-fill.log"
    pid=$SERVER_PID
    timeout $((RECOVERY_TIME_LIMIT + 30)) "$BIN" bench --json --addr "127.0.0.1:$port" \
        --time-limit-secs "$RECOVERY_TIME_LIMIT" --mode put --producers 4 --pipeline 32 \
        --body-size 100 --jobs "$RECOVERY_JOBS" --tube "rec-$TAG" >"$putfile" || rc=$?
    if ((rc != 0)) || ! grep -q '"complete":true' "$putfile"; then
        log "  put run failed or incomplete (exit $rc), see $putfile"
    fi
    REC[$variant-put]=$(json "$putfile" ops_per_sec)
    stop_server "$pid"
    REC[$variant-stop_ms]=$STOP_MS
    REC[$variant-stop_status]=$STOP_STATUS
    log "  stopped with SIGTERM in $STOP_MS ms (exit status $STOP_STATUS)"
    REC[$variant-du]=$(du -sb "$dir" | cut -f1)
    # spool keeps a reserve file against a full disk; du counts it.
    REC[$variant-reserve]=$(stat -c %s "$dir/space.reserve" 2>/dev/null || echo 0)
    ls -l "$dir" >"$OUT/recovery-$variant-dir.txt"

    # Restart on the same directory and poll until every job is ready.
    local logfile="$OUT/recovery-$variant.log" t0 t_accept="" t_ready="" ready="" deadline
    t0=$(now)
    launch "$variant" "$dir" "$port" "$logfile" info
    pid=$SERVER_PID
    deadline=$(awk -v a="$t0" -v s="$RECOVERY_TIMEOUT_S" 'BEGIN { printf "%.6f", a + s }')
    while :; do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "  $variant exited during recovery:"
            cat "$logfile" >&2
            exit 1
        fi
        if ready=$(stats_value "$port" current-jobs-ready); then
            [[ -n $t_accept ]] || t_accept=$(now)
            if [[ $ready == "$RECOVERY_JOBS" ]]; then
                t_ready=$(now)
                break
            fi
        fi
        if awk -v n="$(now)" -v d="$deadline" 'BEGIN { exit !(n > d) }'; then
            log "  $variant: not ready with $RECOVERY_JOBS jobs after $RECOVERY_TIMEOUT_S s (current-jobs-ready: ${ready:-none})"
            break
        fi
        sleep "$POLL_S"
    done
    REC[$variant-accept_ms]=$([[ -n $t_accept ]] && elapsed_ms "$t0" "$t_accept" || echo -)
    REC[$variant-ready_ms]=$([[ -n $t_ready ]] && elapsed_ms "$t0" "$t_ready" || echo -)
    REC[$variant-ready]=${ready:--}
    REC[$variant-rss_kb]=$(awk '$1 == "VmRSS:" { print $2 }' "/proc/$pid/status")
    REC[$variant-hwm_kb]=$(awk '$1 == "VmHWM:" { print $2 }' "/proc/$pid/status")
    # spool's own account: "recovered the log ... records=N ... elapsed_ms=N"
    local line=""
    if [[ $variant == spool-* ]]; then
        line=$(sed 's/\x1b\[[0-9;]*m//g' "$logfile" | grep -m1 'recovered the log' || true)
    fi
    REC[$variant-log_line]=$line
    REC[$variant-log_elapsed_ms]=$(grep -o 'elapsed_ms=[0-9]*' <<<"$line" | cut -d= -f2 || true)
    REC[$variant-log_records]=$(grep -o 'records=[0-9]*' <<<"$line" | cut -d= -f2 || true)
    stop_server "$pid"
    rm -rf "$dir"
    local k
    for k in log_elapsed_ms log_records; do
        [[ -n ${REC[$variant-$k]} ]] || REC[$variant-$k]=-
    done
    log "  restarted: accepting after ${REC[$variant-accept_ms]} ms, $RECOVERY_JOBS ready after ${REC[$variant-ready_ms]} ms"
    printf '{"server":"%s","jobs":%s,"put_ops_per_sec":%s,"stop_ms":%s,"stop_status":"%s","data_dir_bytes":%s,"reserve_file_bytes":%s,"accept_ms":%s,"ready_ms":%s,"current_jobs_ready":"%s","log_elapsed_ms":"%s","log_records":"%s","rss_kb":%s,"peak_rss_kb":%s}\n' \
        "$variant" "$RECOVERY_JOBS" "${REC[$variant-put]/-/null}" "${REC[$variant-stop_ms]}" \
        "${REC[$variant-stop_status]}" "${REC[$variant-du]}" "${REC[$variant-reserve]}" "${REC[$variant-accept_ms]/-/null}" \
        "${REC[$variant-ready_ms]/-/null}" "${REC[$variant-ready]}" "${REC[$variant-log_elapsed_ms]}" \
        "${REC[$variant-log_records]}" "${REC[$variant-rss_kb]:-null}" "${REC[$variant-hwm_kb]:-null}" \
        >"$OUT/recovery-$variant.json"
}

REC_VARIANTS=()
if ((RECOVERY_JOBS > 0)); then
    REC_VARIANTS+=(spool-never)
    recovery spool-never "$SPOOL_PORT"
    if ((BEANSTALKD_RECOVERY)); then
        REC_VARIANTS+=(bs-b)
        recovery bs-b "$BEANSTALKD_PORT"
    fi
fi

# --- report -------------------------------------------------------------------
mib() { awk -v a="$1" -v d="$2" 'BEGIN { if (a == "-" || a == "") print "-"; else printf "%.1f", a / d }'; }

echo
echo "spool durable vs beanstalkd $(beanstalkd -v 2>&1 | awk '{print $2}'), $JOBS jobs per load, 100-byte bodies, best of $RUNS run(s);"
echo "client: spool bench, $THREADS thread(s); $(nproc) CPUs shared by client and server; data on $FSTYPE ($TMP)"
echo "disk: $DSYNC_US us per 128-byte O_DSYNC write (dd, $DSYNC_WRITES writes): the floor of one fsync always commit"
echo "sync = consumers wait for DELETED before the next reserve (synchronous client libraries);"
echo "  the other loads send each delete together with the next reserve"
echo "ratio = spool / peer (ops/s: higher is better); p99 in microseconds (send to reply), spool/peer;"
echo "CPU = server CPU time (user + system, all threads) per job, spool/peer"
echo
printf '%-2s %-27s %-34s %-15s %9s %9s %6s %6s | %13s | %13s | %13s %5s\n' \
    "#" "spool" "peer" "load" "spool/s" "peer/s" "ratio" "target" \
    "put p99" "rsv p99" "CPU us/job" "ratio"
i=0
for row in "${ROWS[@]}"; do
    read -r sv pv load target <<<"$row"
    i=$((i + 1))
    s="$OUT/$sv-$load.json" p="$OUT/$pv-$load.json"
    so=$(json "$s" ops_per_sec) po=$(json "$p" ops_per_sec)
    r=$(ratio "$so" "$po")
    verdict=""
    if [[ $target != - ]]; then
        if [[ $r != - ]] && awk -v r="$r" -v t="$target" 'BEGIN { exit !(r + 0 >= t + 0) }'; then
            verdict=">=$target ok"
        else
            verdict=">=$target NO"
        fi
    fi
    flag=""
    grep -q '"complete":true' "$s" && grep -q '"complete":true' "$p" || flag=" (incomplete)"
    sc=$(<"$OUT/$sv-$load.cpu") pc=$(<"$OUT/$pv-$load.cpu")
    printf '%-2s %-27s %-34s %-15s %9s %9s %6s %6s | %13s | %13s | %13s %5s%s\n' \
        "$i" "${VARIANT_DESC[$sv]}" "${VARIANT_DESC[$pv]}" "${LOAD_DESC[$load]}" \
        "$(whole "$so")" "$(whole "$po")" "$r" "$verdict" \
        "$(whole "$(json "$s" put_latency_us.p99)")/$(whole "$(json "$p" put_latency_us.p99)")" \
        "$(whole "$(json "$s" reserve_latency_us.p99)")/$(whole "$(json "$p" reserve_latency_us.p99)")" \
        "$sc/$pc" "$(ratio "$sc" "$pc")" "$flag"
done
echo
if ((strace_ok)); then
    echo "per job under strace -c -f ($STRACE_JOBS jobs; strace slows the server, so commit batches are larger than above)"
    printf '%-34s %-15s %9s %9s\n' "server" "load" "syscalls" "fsyncs"
    for m in "${TRACED[@]}"; do
        read -r variant load <<<"$m"
        printf '%-34s %-15s %9s %9s\n' "${VARIANT_DESC[$variant]}" "${LOAD_DESC[$load]}" \
            "${TRACE[$variant-$load-calls]}" "${TRACE[$variant-$load-syncs]}"
    done
else
    echo "syscalls per job: skipped ($( ((STRACE_JOBS > 0)) && echo "no usable strace" || echo "STRACE_JOBS=0"))"
fi
echo
if ((${#REC_VARIANTS[@]})); then
    echo "recovery of $RECOVERY_JOBS ready 100-byte jobs after SIGTERM, log in the page cache (target for spool: <= 2000 ms);"
    echo "times from exec of the restarted server, polled every 20 ms"
    echo "data MiB: du -sb of the data directory (of which reserve: spool's space.reserve file)"
    printf '%-34s %9s %9s %9s %8s %9s %10s %9s %8s %8s\n' \
        "server" "put/s" "stop ms" "data MiB" "reserve" "accept ms" "ready ms" "log ms" "records" "RSS MiB"
    for v in "${REC_VARIANTS[@]}"; do
        printf '%-34s %9s %9s %9s %8s %9s %10s %9s %8s %8s\n' "${VARIANT_DESC[$v]}" \
            "$(whole "${REC[$v-put]}")" "${REC[$v-stop_ms]}" "$(mib "${REC[$v-du]}" 1048576)" \
            "$(mib "${REC[$v-reserve]}" 1048576)" \
            "${REC[$v-accept_ms]}" "${REC[$v-ready_ms]}" "${REC[$v-log_elapsed_ms]}" \
            "${REC[$v-log_records]}" "$(mib "${REC[$v-rss_kb]}" 1024)"
    done
    v=spool-never ready_ms=${REC[spool-never-ready_ms]}
    if [[ $ready_ms != - ]]; then
        if ((ready_ms <= 2000)); then echo "spool recovery target (<= 2000 ms): ok"; else echo "spool recovery target (<= 2000 ms): NO"; fi
    else
        echo "spool recovery target (<= 2000 ms): NO (never ready)"
    fi
    [[ -z ${REC[$v-log_line]} ]] || echo "spool: ${REC[$v-log_line]}"
fi
echo
echo "raw results: $OUT/"
