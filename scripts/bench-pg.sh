#!/usr/bin/env bash
# Jobs through spool on PostgreSQL, against spool in memory as the peer run
# in the same script: `spool bench` (beanstalkd put, reserve, delete) on one
# node, then on NODES nodes sharing the database (one bench per node, run
# at once; their rates add up). A private cluster in a temporary directory,
# unix socket only, stopped at the end.
#
#   bash scripts/bench-pg.sh            # JOBS=20000 NODES=3
#   JOBS=50000 NODES=3 bash scripts/bench-pg.sh
#
# Needs a release build (cargo build --release -p spool) and Debian's
# postgresql package.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

JOBS=${JOBS:-20000}
NODES=${NODES:-3}
CONNS=${CONNS:-4}
SPOOL=${SPOOL:-target/release/spool}
# shellcheck source=scripts/pg-cluster-lib.sh
source scripts/pg-cluster-lib.sh
pg_cluster_start bench-pg 200

port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

start_node() { # name storage-args... ; prints the beanstalkd port
    local name=$1; shift
    local p; p=$(port)
    SPOOL_HTTP_LISTEN=127.0.0.1:0 "$SPOOL" serve -l 127.0.0.1 -p "$p" "$@" \
        --log-level warn >"$DIR/$name.log" 2>&1 &
    echo $! >"$DIR/$name.pid"
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
        sleep 0.1
    done
    echo "node $name did not start: $(cat "$DIR/$name.log")" >&2
    exit 1
}

rate() { # port jobs tube ; prints jobs/s of a mixed run
    "$SPOOL" bench --addr "127.0.0.1:$1" --jobs "$2" --tube "$3" \
        --producers "$CONNS" --consumers "$CONNS" --json --time-limit-secs 300 |
        python3 -c 'import json,sys
r = json.load(sys.stdin)
if not r.get("complete", True) or r.get("lost"):
    sys.exit("incomplete run: %s" % r)
print(r["ops_per_sec"])'
}

echo "jobs=$JOBS connections=${CONNS}+${CONNS} per node"
mem=$(start_node memory --in-memory)
echo "in-memory, 1 node:        $(rate "$mem" "$JOBS" bench) jobs/s"
one=$(start_node pg1 --database-url "$URL" --node-id pg1)
echo "postgres, 1 node:         $(rate "$one" "$JOBS" single) jobs/s"
ports=("$one")
for n in $(seq 2 "$NODES"); do
    ports+=("$(start_node "pg$n" --database-url "$URL" --node-id "pg$n")")
done
share=$((JOBS / NODES))
outs=()
for i in "${!ports[@]}"; do
    # A tube per bench process: each checks that it gets its own jobs back
    # exactly once; every node still works through the one database.
    rate "${ports[$i]}" "$share" "multi$i" >"$DIR/rate.$i" &
    outs+=($!)
done
for pid in "${outs[@]}"; do wait "$pid"; done
total=$(cat "$DIR"/rate.* | python3 -c 'import sys; print(round(sum(float(l) for l in sys.stdin)))')
echo "postgres, $NODES nodes (sum): $total jobs/s"
$AS "$BIN/psql" -h "$DIR" -U spool -d postgres -Atc \
    "SELECT 'spool_jobs size after the runs: ' || pg_size_pretty(sum(pg_total_relation_size(relid)))
     FROM pg_partition_tree('spool_jobs')"
