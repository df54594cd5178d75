#!/usr/bin/env bash
# spool on PostgreSQL against graphile-worker, its peer, on the same private
# cluster in the same run:
#  1. jobs through (enqueue, reserve, complete; no-op handlers): graphile-
#     worker in each configuration of GRAPHILE_CONFIGS (its best kept), then
#     NODES spool nodes, each worked over HTTP (batch enqueue, reserve with
#     `batch`, one complete a job) and over beanstalkd (put, reserve,
#     delete), the faster kept; jobs/s of each and the ratio.
#  2. single enqueue: spool's HTTP enqueue (one job a request) against
#     graphile-worker's `addJob`, ENQUEUE_CONNS connections each: rate, p99.
# The cluster's settings are initdb's defaults (synchronous_commit on,
# fsync on) plus PG_OPTIONS; the script prints what they were.
#
#   bash scripts/bench-pg-graphile.sh              # JOBS=30000 NODES=3
#   JOBS=100000 bash scripts/bench-pg-graphile.sh
#   GRAPHILE_CONFIGS="4:16:64:10" bash scripts/bench-pg-graphile.sh
#
# FLOOR=1: then what two cores give the database alone (pgbench; see the
# section below), the floor under any queue on it.
#
# PROFILE=1: where each jobs-through run's time goes, per job: write
# transactions (xids drawn), WAL bytes, CPU seconds of PostgreSQL (every
# backend), the spool nodes and the load clients, and the statements
# that took the database's time (pg_stat_statements, loaded for it).
#
# GRAPHILE_CONFIGS: space-separated PROCS:CONCURRENCY:LOCAL_QUEUE:COMPLETE_DELAY_MS
# (LOCAL_QUEUE -1 and COMPLETE_DELAY_MS -1 turn the batching off); "none"
# runs spool only (no ratio), for comparing two spool builds quickly.
# BEANSTALK_JOBS=0 skips the beanstalkd run, ENQUEUE_JOBS=0 the single
# enqueue. COMPLETE_EACH=1: the HTTP workers complete each job with its
# own request (as before POST /v1/jobs/complete) instead of one request a
# reserved batch. RETENTION_MAX_JOBS [0]: the final jobs spool's queues
# keep (their policy's `retention_max_jobs`; "default": the queue default,
# 10,000). graphile-worker keeps none: with 0 a spool completion deletes
# its row as graphile-worker's does, instead of moving it to the final
# jobs for the retention to delete later.
# SPOOL: the binary (nodes and load clients).
# Needs a release build (cargo build --release -p spool), Debian's
# postgresql package, node and npm (graphile-worker is installed from npm,
# pinned, into target/graphile-bench/, outside the repository's files).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

JOBS=${JOBS:-30000}
NODES=${NODES:-3}
ENQUEUE_JOBS=${ENQUEUE_JOBS:-5000}
ENQUEUE_CONNS=${ENQUEUE_CONNS:-8}
ENQUEUE_BATCH=${ENQUEUE_BATCH:-500}
# The beanstalkd run's jobs (it is the slow one).
BEANSTALK_JOBS=${BEANSTALK_JOBS:-$JOBS}
# spool, per node: HTTP producers and workers, jobs a reserve asks for;
# beanstalkd connections.
HTTP_PRODUCERS=${HTTP_PRODUCERS:-2}
HTTP_WORKERS=${HTTP_WORKERS:-64}
RESERVE_BATCH=${RESERVE_BATCH:-32}
BEANSTALK_CONNS=${BEANSTALK_CONNS:-8}
TIME_LIMIT_S=${TIME_LIMIT_S:-300}
GRAPHILE_CONFIGS=${GRAPHILE_CONFIGS:-"2:16:-1:-1 2:32:64:10 4:16:64:10 4:32:128:50"}
GRAPHILE_VERSION=0.17.3
PG_CLIENT_VERSION=8.16.3
SPOOL=${SPOOL:-target/release/spool}
command -v node >/dev/null || { echo "install node (20 or later) and npm" >&2; exit 1; }

MODULES=$PWD/target/graphile-bench/node_modules
needs_graphile=1
if [ "$GRAPHILE_CONFIGS" = none ] && [ "$ENQUEUE_JOBS" -le 0 ]; then needs_graphile=0; fi
if [ "$needs_graphile" = 1 ] && { ! [ -f "$MODULES/graphile-worker/package.json" ] ||
    ! grep -q "\"version\": \"$GRAPHILE_VERSION\"" "$MODULES/graphile-worker/package.json"; }; then
    echo "installing graphile-worker $GRAPHILE_VERSION into target/graphile-bench" >&2
    mkdir -p target/graphile-bench
    echo '{"name":"graphile-bench","private":true}' >target/graphile-bench/package.json
    (cd target/graphile-bench && npm install --no-audit --no-fund --save-exact \
        "graphile-worker@$GRAPHILE_VERSION" "pg@$PG_CLIENT_VERSION" >&2)
fi

PROFILE=${PROFILE:-0}
if [ "$PROFILE" = 1 ]; then
    PG_OPTIONS="${PG_OPTIONS:-} -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all -c pg_stat_statements.track_planning=on"
fi

# shellcheck source=scripts/pg-cluster-lib.sh
source scripts/pg-cluster-lib.sh
pg_cluster_start bench-pgg 300
if [ "$PROFILE" = 1 ]; then psql_ "CREATE EXTENSION pg_stat_statements" >/dev/null; fi

# profile_mark: the counters a run's profile is the difference of, in
# $DIR/mark: next xid, WAL insert position, CPU ticks of PostgreSQL (the
# postmaster with its reaped backends, and the live ones), of the spool
# nodes, and of this script's reaped children (the load clients, a few
# psql and python3 besides).
# Before each run: a checkpoint, so that no run pays for an earlier one's
# WAL (a checkpoint that max_wal_size starts mid-run makes every page's
# next change write a full image): after 300,000 graphile-worker jobs the
# spool run that followed was 18% slower than spool alone, with this 4%.
settle() { psql_ "CHECKPOINT" >/dev/null; }

profile_mark() {
    [ "$PROFILE" = 1 ] || return 0
    local pm nodes=()
    pm=$(head -1 "$DIR/data/postmaster.pid")
    for f in "$DIR"/pg*.pid; do [ -e "$f" ] && nodes+=("$(cat "$f")"); done
    {
        psql_ "SELECT pg_snapshot_xmax(pg_current_snapshot()), \
            pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0'), pg_stat_statements_reset()" |
            cut -d'|' -f1,2 | tr '|' ' '
        python3 - "$pm" "$$" "${nodes[@]}" <<'EOF'
import subprocess, sys
def ticks(pid, own=True, reaped=True):
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return (int(f[11]) + int(f[12])) * own + (int(f[13]) + int(f[14])) * reaped
pm, me, nodes = sys.argv[1], sys.argv[2], sys.argv[3:]
backends = subprocess.run(["pgrep", "-P", pm], capture_output=True, text=True).stdout.split()
print(ticks(pm) + sum(ticks(b) for b in backends), sum(ticks(n) for n in nodes),
      ticks(me, own=False))
EOF
    } | tr '\n' ' ' >"$DIR/mark"
}

# profile_report WHAT JOBS: the counters since profile_mark, per job.
profile_report() {
    [ "$PROFILE" = 1 ] || return 0
    local before after
    before=$(cat "$DIR/mark")
    # The statements first: the mark resets their counts.
    # Time is execution plus planning (a statement planned at each call
    # costs that too); "plan" is the planning's mean over the calls.
    psql_ "SELECT round(100 * (total_exec_time + total_plan_time) \
        / sum(total_exec_time + total_plan_time) OVER ())::text || '%', \
        round(calls::numeric / $2, 4), round(mean_exec_time::numeric, 3) || ' ms', \
        round((total_plan_time / greatest(calls, 1))::numeric, 3) || ' ms', \
        round(rows::numeric / greatest(calls, 1), 1), left(regexp_replace(query, '\s+', ' ', 'g'), 110) \
        FROM pg_stat_statements ORDER BY total_exec_time + total_plan_time DESC LIMIT 12" >"$DIR/statements"
    profile_mark
    after=$(cat "$DIR/mark")
    # shellcheck disable=SC2086 # the marks are words
    python3 - "$1" "$2" "$(getconf CLK_TCK)" $before $after <<'EOF'
import sys
what, jobs, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
a = [float(x) for x in sys.argv[4:9]]
b = [float(x) for x in sys.argv[9:14]]
d = [y - x for x, y in zip(a, b)]
cpu = [x / hz * 1e6 / jobs for x in d[2:]]
print(f"PROFILE {what}: per job: {d[0] / jobs:.3f} write transactions, {d[1] / jobs:.0f} WAL bytes, "
      f"CPU us: postgres {cpu[0]:.0f}, spool nodes {cpu[1]:.0f}, clients {cpu[2]:.0f}")
EOF
    awk -F'|' '{ printf "  %5s of time  %7s a job  %10s  plan %9s  %6s rows  %s\n", $1, $2, $3, $4, $5, $6 }' "$DIR/statements"
}
export DATABASE_URL="postgres://spool@${DIR//\//%2F}/postgres"
export GRAPHILE_MODULES=$MODULES

port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

start_node() { # name ; prints "beanstalkd-port http-port"
    local name=$1 p hp
    p=$(port)
    hp=$(port)
    SPOOL_HTTP_LISTEN=127.0.0.1:$hp "$SPOOL" serve -l 127.0.0.1 -p "$p" \
        --database-url "$URL" --node-id "$name" --log-level warn >"$DIR/$name.log" 2>&1 &
    echo $! >"$DIR/$name.pid"
    for _ in $(seq 200); do
        if curl -fs "http://127.0.0.1:$hp/readyz" >/dev/null 2>&1; then echo "$p $hp"; return; fi
        sleep 0.1
    done
    echo "node $name did not start: $(cat "$DIR/$name.log")" >&2
    exit 1
}

# field FILE KEY: a number from a one-line JSON report.
field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }

# together OUT... : jobs/s of runs that ran at once (all their jobs over the
# longest run's time); fails if any run is incomplete.
together() {
    python3 - "$@" <<'EOF'
import json, sys
runs = [json.load(open(f)) for f in sys.argv[1:]]
for r in runs:
    if r.get("time_limit_hit") or r.get("lost") or not r.get("complete", True):
        sys.exit("incomplete run: %s" % r)
done = sum(r.get("jobs_done", r.get("jobs")) for r in runs)
print(round(done / max(r["elapsed_secs"] for r in runs)))
print("  each run: " + ", ".join(f'{r.get("jobs_done", r.get("jobs"))} jobs in {r["elapsed_secs"]:.3f} s' for r in runs), file=sys.stderr)
EOF
}

echo "== $(date -u +%FT%TZ)  load: $(uptime | sed 's/.*load average: //')"
echo "PostgreSQL $(psql_ 'SHOW server_version'): synchronous_commit=$(psql_ 'SHOW synchronous_commit') fsync=$(psql_ 'SHOW fsync') shared_buffers=$(psql_ 'SHOW shared_buffers')"
echo "jobs=$JOBS nodes=$NODES enqueue_batch=$ENQUEUE_BATCH"

# ---- 1. jobs through -------------------------------------------------------
best_g=0
best_g_config=""
[ "$GRAPHILE_CONFIGS" = none ] && GRAPHILE_CONFIGS=""
COMPLETE_EACH=${COMPLETE_EACH:-0}
complete_flag=()
if [ "$COMPLETE_EACH" = 1 ]; then complete_flag=(--complete-each); fi
for config in $GRAPHILE_CONFIGS; do
    IFS=: read -r procs conc lq delay <<<"$config"
    settle
    profile_mark
    node scripts/graphile-bench.js work "$JOBS" "$procs" "$conc" "$lq" "$delay" \
        "$ENQUEUE_BATCH" "$TIME_LIMIT_S" >"$DIR/g.json"
    r=$(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["jobs_per_sec"]))' "$DIR/g.json")
    echo "graphile-worker $GRAPHILE_VERSION procs=$procs concurrency=$conc localQueue=$lq completeJobBatchDelay=$delay: $r jobs/s"
    profile_report "graphile-worker $config" "$JOBS"
    if [ "$r" -gt "$best_g" ]; then best_g=$r; best_g_config=$config; fi
done

declare -a bports hports
for n in $(seq 1 "$NODES"); do
    read -r b h <<<"$(start_node "pg$n")"
    bports+=("$b")
    hports+=("$h")
done
share=$((JOBS / NODES))
RETENTION_MAX_JOBS=${RETENTION_MAX_JOBS:-0}
if [ "$RETENTION_MAX_JOBS" != default ]; then
    # The HTTP runs' queues (beanstalkd's delete leaves no final job).
    for i in "${!hports[@]}"; do
        curl -fsS -X PUT -H 'content-type: application/json' \
            -d "{\"retention_max_jobs\": $RETENTION_MAX_JOBS}" \
            "http://127.0.0.1:${hports[$i]}/v1/queues/http$i/policy" >/dev/null
    done
fi
echo "spool's queues keep $RETENTION_MAX_JOBS final jobs (RETENTION_MAX_JOBS)"

outs=()
pids=()
settle
profile_mark
for i in "${!hports[@]}"; do
    # A queue per node's run: each checks it gets its own jobs back once;
    # every node still works through the one database.
    "$SPOOL" bench --mode http-work --http "127.0.0.1:${hports[$i]}" --jobs "$share" \
        --tube "http$i" --producers "$HTTP_PRODUCERS" --consumers "$HTTP_WORKERS" \
        --enqueue-batch "$ENQUEUE_BATCH" --reserve-batch "$RESERVE_BATCH" "${complete_flag[@]}" \
        --time-limit-secs "$TIME_LIMIT_S" --json >"$DIR/http.$i.json" &
    pids+=($!)
    outs+=("$DIR/http.$i.json")
done
for pid in "${pids[@]}"; do wait "$pid"; done
spool_http=$(together "${outs[@]}")
completes="one request a reserved batch"
if [ "$COMPLETE_EACH" = 1 ]; then completes="one request a job"; fi
echo "spool, $NODES nodes, HTTP (batch enqueue $ENQUEUE_BATCH, reserve batch $RESERVE_BATCH, completes $completes, ${HTTP_PRODUCERS}+${HTTP_WORKERS} connections a node): $spool_http jobs/s"
profile_report "spool HTTP" "$((share * NODES))"

spool_bean=0
if [ "$BEANSTALK_JOBS" -gt 0 ]; then

outs=()
pids=()
settle
profile_mark
for i in "${!bports[@]}"; do
    "$SPOOL" bench --addr "127.0.0.1:${bports[$i]}" --jobs "$((BEANSTALK_JOBS / NODES))" --tube "bean$i" \
        --producers "$BEANSTALK_CONNS" --consumers "$BEANSTALK_CONNS" \
        --time-limit-secs "$TIME_LIMIT_S" --json >"$DIR/bean.$i.json" &
    pids+=($!)
    outs+=("$DIR/bean.$i.json")
done
for pid in "${pids[@]}"; do wait "$pid"; done
spool_bean=$(together "${outs[@]}")
echo "spool, $NODES nodes, beanstalkd (put, reserve, delete; ${BEANSTALK_CONNS}+${BEANSTALK_CONNS} connections a node): $spool_bean jobs/s"
profile_report "spool beanstalkd" "$((BEANSTALK_JOBS / NODES * NODES))"
fi

best_s=$spool_http
best_s_how=HTTP
if [ "$spool_bean" -gt "$best_s" ]; then best_s=$spool_bean; best_s_how=beanstalkd; fi
if [ "$best_g" -gt 0 ]; then
    echo "JOBS/S: spool ($NODES nodes, $best_s_how) $best_s, graphile-worker best ($best_g_config) $best_g, ratio $(python3 -c "print(f'{$best_s / $best_g:.2f}')")x (target >= 2x)"
else
    echo "JOBS/S: spool ($NODES nodes, $best_s_how) $best_s (graphile-worker not run)"
fi

# ---- PostgreSQL's floor (FLOOR=1) ------------------------------------------
# The least any queue on this database pays a job, with no application at
# all: pgbench runs the SQL a durable queue cannot do without (a batch
# insert of ENQUEUE_BATCH rows; then a reservation of FLOOR_BATCH rows by
# `FOR UPDATE SKIP LOCKED` and an update, and their delete, each its own
# committed transaction, from FLOOR_CLIENTS connections), first on a
# minimal table (id, queue, state, priority, payload, lease, deadline;
# the ready and lease indexes), then on spool's live partition with its
# indexes. Inserts and reservations run one after the other, so the rate
# is jobs / (insert time + reserve-and-delete time), the vacuum between
# them not counted: what two cores give the database alone, no churn's
# vacuum paid. 2,000,000 / rate is the microseconds of the whole
# machine a job costs at that floor.
FLOOR=${FLOOR:-0}
FLOOR_JOBS=${FLOOR_JOBS:-100000}
FLOOR_BATCH=${FLOOR_BATCH:-400}
FLOOR_CLIENTS=${FLOOR_CLIENTS:-4}
if [ "$FLOOR" = 1 ]; then
    pgbench_() { $AS "$BIN/pgbench" -h "$DIR" -U spool -n -M simple "$@" postgres >/dev/null; }
    psql_ "CREATE SEQUENCE floor_ids; CREATE SEQUENCE floor_leases; \
        CREATE TABLE floor_jobs (id bigint PRIMARY KEY DEFAULT nextval('floor_ids'), \
        queue text NOT NULL, state text NOT NULL DEFAULT 'ready', priority int NOT NULL \
        DEFAULT 0, payload bytea NOT NULL, lease bigint, deadline bigint) WITH (fillfactor = 80); \
        CREATE INDEX floor_ready ON floor_jobs (queue, priority, id) WHERE state = 'ready'; \
        CREATE INDEX floor_lease_deadlines ON floor_jobs (deadline) WHERE state = 'reserved'" >/dev/null
    # floor TABLE INSERT_SQL LEASE_SET: one run on TABLE (INSERT_SQL adds
    # ENQUEUE_BATCH jobs of queue 'floor'; LEASE_SET is the reservation's
    # SET besides the state); prints its rates.
    floor() {
        local table=$1 insert=$2 t0 t1 t2 t3 left
        echo "$insert" >"$DIR/floor-insert.sql"
        # \gset takes one row: the reserved ids travel as one array literal.
        echo "WITH c AS MATERIALIZED (SELECT id FROM $table WHERE queue = 'floor' \
AND state = 'ready' ORDER BY priority, id LIMIT $FLOOR_BATCH FOR UPDATE SKIP LOCKED), \
u AS (UPDATE $table j SET state = 'reserved', $3 FROM c WHERE j.id = c.id \
RETURNING j.id, j.payload) SELECT quote_literal(coalesce(array_agg(id), '{}')::text) \
AS ids FROM u \gset
DELETE FROM $table WHERE id = ANY(:ids::bigint[]);" >"$DIR/floor-work.sql"
        chmod a+r "$DIR"/floor-*.sql
        settle
        t0=$(date +%s.%N)
        pgbench_ -c 2 -j 2 -t $((FLOOR_JOBS / ENQUEUE_BATCH / 2)) -f "$DIR/floor-insert.sql"
        t1=$(date +%s.%N)
        # Not timed: the statistics and hint bits of a table just filled.
        psql_ "VACUUM ANALYZE $table" >/dev/null
        t2=$(date +%s.%N)
        pgbench_ -c "$FLOOR_CLIENTS" -j 2 -t $((FLOOR_JOBS / FLOOR_BATCH / FLOOR_CLIENTS)) \
            -f "$DIR/floor-work.sql"
        t3=$(date +%s.%N)
        left=$(psql_ "SELECT count(*) FROM $table WHERE queue = 'floor'")
        python3 -c "
jobs = $FLOOR_JOBS // $ENQUEUE_BATCH // 2 * 2 * $ENQUEUE_BATCH
done = jobs - $left
took = ($t1 - $t0) + ($t3 - $t2)
print(f'  {\"$table\":16} insert {jobs / ($t1 - $t0):8.0f} jobs/s, reserve and delete {done / ($t3 - $t2):7.0f} jobs/s: floor {done / took:6.0f} jobs/s, {2e6 * took / done:5.1f} us of two cores a job')"
    }
    echo "FLOOR (PostgreSQL alone: inserts of $ENQUEUE_BATCH, reservations of $FLOOR_BATCH by $FLOOR_CLIENTS clients, pgbench):"
    floor floor_jobs "INSERT INTO floor_jobs (queue, payload) SELECT 'floor', \
'\\x7061796c6f6164'::bytea FROM generate_series(1, $ENQUEUE_BATCH);" \
        "lease = (SELECT nextval('floor_leases')), deadline = 9000000000000000000"
    floor spool_jobs_live "INSERT INTO spool_jobs_live (id, queue, state, priority, payload, \
max_attempts, ttr_ms, created_ns, updated_ns, version) SELECT nextval('spool_job_ids'), \
'floor', 'ready', 1024, '\\x7061796c6f6164'::bytea, 0, 120000, 1, 1, 1 \
FROM generate_series(1, $ENQUEUE_BATCH);" \
        "lease_token = (SELECT nextval('spool_lease_tokens')), deadline_ns = 9000000000000000000"
fi

if [ "$ENQUEUE_JOBS" -le 0 ]; then
    echo "== load after: $(uptime | sed 's/.*load average: //')"
    exit 0
fi

# ---- 2. single enqueue ------------------------------------------------------
settle
"$SPOOL" bench --mode http-enqueue --http "127.0.0.1:${hports[0]}" --jobs "$ENQUEUE_JOBS" \
    --tube single --producers "$ENQUEUE_CONNS" --time-limit-secs "$TIME_LIMIT_S" \
    --json >"$DIR/enq.json"
settle
node scripts/graphile-bench.js enqueue "$ENQUEUE_JOBS" "$ENQUEUE_CONNS" "$TIME_LIMIT_S" >"$DIR/genq.json"
python3 - "$DIR/enq.json" "$DIR/genq.json" "$ENQUEUE_CONNS" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
g = json.load(open(sys.argv[2]))
if s.get("time_limit_hit") or not g["complete"]:
    sys.exit("incomplete enqueue run")
s_rate, s_p99 = s["ops_per_sec"], s["request_latency_us"]["p99"] / 1000
g_rate, g_p99 = g["jobs_per_sec"], g["p99_us"] / 1000
print(f"ENQUEUE ({sys.argv[3]} connections, one job a request, 1 node):")
print(f"  spool HTTP       {s_rate:8.0f} jobs/s  p99 {s_p99:7.2f} ms")
print(f"  graphile addJob  {g_rate:8.0f} jobs/s  p99 {g_p99:7.2f} ms")
print(f"  ratio: rate {s_rate / g_rate:.2f}x, p99 {s_p99 / g_p99:.2f}x of graphile's")
EOF
echo "== load after: $(uptime | sed 's/.*load average: //')"
