#!/usr/bin/env bash
# Does spool's PostgreSQL schema bloat under churn? Jobs go through NODES
# spool nodes (HTTP: batch enqueue, reserve with `batch`, complete; the
# retention deletes final jobs beyond each queue's 10,000 or past an hour)
# in rounds of ROUND jobs up to TOTAL; after each round it prints the
# on-disk size of spool's tables with their indexes and TOAST
# (pg_total_relation_size) against the size of the same rows packed: a
# fresh copy of spool_jobs with the same indexes. Target: at most 2x.
# BACKLOG (default 1000) bounds each node's jobs enqueued and not yet done
# (`spool bench --max-backlog`): a steady churn, as when the workers keep
# up. BACKLOG=0 lets the producers run ahead, so a round's jobs wait in
# the table at once; the table then keeps the size of that peak, which the
# final rows alone never fill again (not churn: PostgreSQL gives back only
# empty pages at the end of a table).
# A private cluster with initdb's defaults (autovacuum on), stopped at the
# end.
#
#   bash scripts/bench-pg-bloat.sh                       # TOTAL=1000000
#   TOTAL=10000000 ROUND=500000 bash scripts/bench-pg-bloat.sh
#   DETAIL=1 TOTAL=300000 bash scripts/bench-pg-bloat.sh  # + heap and index anatomy
#
# Needs a release build (cargo build --release -p spool) and Debian's
# postgresql package.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

TOTAL=${TOTAL:-1000000}
ROUND=${ROUND:-100000}
NODES=${NODES:-3}
BACKLOG=${BACKLOG:-1000}
backlog_flag=()
[ "$BACKLOG" = 0 ] || backlog_flag=(--max-backlog "$BACKLOG")
ROUND_LIMIT_S=${ROUND_LIMIT_S:-1200}
SPOOL=${SPOOL:-target/release/spool}
# shellcheck source=scripts/pg-cluster-lib.sh
source scripts/pg-cluster-lib.sh
pg_cluster_start bench-bloat 200

port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

hports=()
for n in $(seq 1 "$NODES"); do
    p=$(port)
    hp=$(port)
    SPOOL_HTTP_LISTEN=127.0.0.1:$hp "$SPOOL" serve -l 127.0.0.1 -p "$p" \
        --database-url "$URL" --node-id "n$n" --log-level warn >"$DIR/n$n.log" 2>&1 &
    echo $! >"$DIR/n$n.pid"
    for _ in $(seq 200); do
        curl -fs "http://127.0.0.1:$hp/readyz" >/dev/null 2>&1 && break
        sleep 0.1
    done
    curl -fs "http://127.0.0.1:$hp/readyz" >/dev/null || { echo "node n$n did not start: $(cat "$DIR/n$n.log")" >&2; exit 1; }
    hports+=("$hp")
done

TABLES="'spool_jobs','spool_queues','spool_idempotency','spool_workflows','spool_workflow_keys','spool_schedules'"
echo "== $(date -u +%FT%TZ)  load: $(uptime | sed 's/.*load average: //')"
echo "PostgreSQL $(psql_ 'SHOW server_version'): autovacuum=$(psql_ 'SHOW autovacuum') synchronous_commit=$(psql_ 'SHOW synchronous_commit'); $NODES nodes, backlog bound per node: $BACKLOG (0: none)"
[ -z "${DETAIL:-}" ] || psql_ "CREATE EXTENSION IF NOT EXISTS pgstattuple" >/dev/null
echo "jobs_through  on_disk  packed  ratio  rows(live/final)  jobs/s  load"
through=0
share=$((ROUND / NODES))
# Rounds of ROUND jobs (each node a whole share) until TOTAL is reached,
# give or take the rounding of the shares.
while [ $((through + share * NODES / 2)) -lt "$TOTAL" ]; do
    started=$(date +%s.%N)
    pids=()
    for i in "${!hports[@]}"; do
        "$SPOOL" bench --mode http-work --http "127.0.0.1:${hports[$i]}" --jobs "$share" \
            --tube "churn$i" --producers 2 --consumers 16 --enqueue-batch 500 \
            --reserve-batch 32 --complete-each "${backlog_flag[@]}" --time-limit-secs "$ROUND_LIMIT_S" --json >"$DIR/r.$i.json" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do
        wait "$pid" || {
            for log in "$DIR"/n*.log; do echo "== $log"; tail -20 "$log"; done >&2
            exit 1
        }
    done
    for i in "${!hports[@]}"; do
        grep -q '"time_limit_hit":false' "$DIR/r.$i.json" || { echo "round incomplete: $(cat "$DIR/r.$i.json")" >&2; exit 1; }
    done
    through=$((through + share * NODES))
    rate=$(python3 -c "import time; print(round($share * $NODES / (time.time() - $started)))")
    # spool_jobs is one table up to schema 3 and a parent of partitions
    # from 4: the tables holding rows are its partition tree's leaves.
    leaves_sql="SELECT relid FROM pg_partition_tree('spool_jobs') WHERE isleaf \
        UNION ALL SELECT oid::regclass FROM pg_class WHERE oid = 'spool_jobs'::regclass AND relkind = 'r'"
    LEAVES=$(psql_ "SELECT string_agg(quote_literal(relid::text), ',') FROM ($leaves_sql) l")
    on_disk=$(psql_ "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c WHERE c.relname IN ($TABLES) OR c.relname IN ($LEAVES)")
    # The same rows packed: a fresh copy of each leaf with its indexes.
    packed=0
    for leaf in $(psql_ "$leaves_sql"); do
        size=$(psql_ "SET client_min_messages = warning; DROP TABLE IF EXISTS bloat_packed; \
            CREATE TABLE bloat_packed (LIKE $leaf INCLUDING ALL); \
            INSERT INTO bloat_packed SELECT * FROM $leaf; \
            SELECT pg_total_relation_size('bloat_packed');" | tail -1)
        packed=$((packed + size))
        psql_ "DROP TABLE bloat_packed" >/dev/null
    done
    others=$(psql_ "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c \
        WHERE c.relname IN ($TABLES) AND c.relname <> 'spool_jobs'")
    packed=$((packed + others))
    rows=$(psql_ "SELECT count(*) FILTER (WHERE state NOT IN ('completed','cancelled')) || '/' || count(*) FILTER (WHERE state IN ('completed','cancelled')) FROM spool_jobs")
    python3 -c "print(f'{$through:>12}  {$on_disk/2**20:6.1f}M  {$packed/2**20:5.1f}M  {$on_disk/$packed:5.2f}  {\"$rows\":>16}  {$rate:6}  ' + open('/proc/loadavg').read().split()[0])"
    if [ -n "${DETAIL:-}" ]; then
        # What the size is made of: the heap and each index of spool_jobs
        # (pgstattuple: live, dead and free space), and the tuple versions
        # the churn made (HOT updates need no new index entries).
        for leaf in $(psql_ "$leaves_sql"); do
            psql_ "SELECT '$leaf tuples: ins=' || n_tup_ins || ' upd=' || n_tup_upd || ' hot_upd=' || n_tup_hot_upd \
                || ' del=' || n_tup_del || ' dead_now=' || n_dead_tup || ' vacuums=' || vacuum_count \
                || ' autovacuums=' || autovacuum_count FROM pg_stat_user_tables WHERE relid = '$leaf'::regclass"
            psql_ "SELECT format('  %-26s %7s  live %5s%%  dead %5s%%  free %5s%%', 'heap', \
                pg_size_pretty(table_len), tuple_percent, dead_tuple_percent, free_percent) \
                FROM pgstattuple('$leaf')"
            psql_ "SELECT format('  %-26s %7s  leaf density %5s%%  leaf pages %s, deleted %s, empty %s', \
                i.indexrelid::regclass, pg_size_pretty(pg_relation_size(i.indexrelid)), s.avg_leaf_density, \
                s.leaf_pages, s.deleted_pages, s.empty_pages) \
                FROM pg_index i, LATERAL pgstatindex(i.indexrelid) s \
                WHERE i.indrelid = '$leaf'::regclass ORDER BY 1"
        done
    fi
done
