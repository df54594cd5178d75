#!/usr/bin/env bash
# CONNECTIONS idle beanstalkd connections on one machine, spread over NODES
# spool nodes sharing one PostgreSQL (each node a full front door on the
# same jobs), for machines where one process may not hold them all (a hard
# open-file limit below CONNECTIONS, no CAP_SYS_RESOURCE to raise it).
#
#   CONNECTIONS=100000 NODES=6 bash scripts/bench-connections-pg.sh
#
# One client process per node (`spool bench --mode idle`: its connections,
# from two loopback source addresses of its own, 127.0.0.(10+2i) and
# (11+2i), so each has ephemeral ports enough; then one command on each) measures that
# node's RSS growth per connection, idle and after the command. A watcher
# (`spool bench --mode probe`) opened its own connections before them and
# times, on every node, `/livez`, `/readyz`, `/metrics` and a job put on
# one node and reserved and deleted on the next, throughout the connecting
# and for HOLD seconds once every node counts its share; then one
# `/admin/connections` per node. While they are held the script reads the
# database's sessions (an idle beanstalkd session holds no database
# connection: the nodes' pools stay within their bound), the kernel's slab
# memory (the sockets' cost, both ends) and the listen-queue counters.
# The peer: beanstalkd 1.12 holding one node's share, its RSS per
# connection in the same run.
#
# Every wait is bounded (TIME_LIMIT for the whole connecting and holding);
# loopback only; a private cluster in a temporary directory, stopped at
# the end with every process the script started.
#
# Environment knobs (defaults in brackets):
#   CONNECTIONS [100000], NODES [6], HOLD [20] (s), TIME_LIMIT [300] (s)
#   SPOOL [target/release/spool] (build it first: cargo build --release -p spool)
#   BASE_PORT [11700]: node i listens on BASE_PORT+2i (beanstalkd) and +2i+1 (HTTP)
#   OUT [target/bench-connections-pg]: every report, raw
#   PEER [1]: 0 skips beanstalkd
#   IDLE_AFTER [15] (s): the nodes' RSS is sampled again this long after
#     the one command each (a PostgreSQL session's task parks after 1 s
#     idle; the allocator hands freed pages back over ~10 s); 0 skips it
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

CONNECTIONS=${CONNECTIONS:-100000}
NODES=${NODES:-6}
HOLD=${HOLD:-20}
TIME_LIMIT=${TIME_LIMIT:-300}
SPOOL=${SPOOL:-target/release/spool}
BASE_PORT=${BASE_PORT:-11700}
OUT=${OUT:-target/bench-connections-pg}
PEER=${PEER:-1}
IDLE_AFTER=${IDLE_AFTER:-15}
export IDLE_AFTER

log() { printf '%s\n' "$*" >&2; }

# Each process (node, client) holds one share plus its own files.
SHARE=$(((CONNECTIONS + NODES - 1) / NODES))
FDS_NEEDED=$((SHARE + 1000))
ulimit -n "$(ulimit -Hn)"
if (($(ulimit -n) < FDS_NEEDED)); then
    log "open-file limit $(ulimit -n) is below one node's share ($SHARE) + 1000: raise NODES"
    exit 1
fi
if ((NODES > 120)); then
    log "NODES=$NODES: at most 120 (source addresses 127.0.0.(10+2i) and (11+2i) each)"
    exit 1
fi
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.err "$OUT"/*.log

# shellcheck source=scripts/pg-cluster-lib.sh
source scripts/pg-cluster-lib.sh
# Each node's pool (16) and its LISTEN connection, and room for psql.
pg_cluster_start bench-conns $((NODES * 20 + 20))
# The clients and the peer are not in "$DIR"/*.pid until they start;
# pg_cluster_cleanup ends whatever is there.

wait_port() { # port pid name
    local tries
    for ((tries = 0; tries < 200; tries++)); do
        kill -0 "$2" 2>/dev/null || { log "$3 exited at startup"; cat "$OUT/$3.log" >&2; exit 1; }
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    log "$3 is not accepting on 127.0.0.1:$1 after 20 s"
    exit 1
}

slab_kib() { awk '/^Slab:/ { print $2 }' /proc/meminfo; }

declare -a NODE_PID NODE_ARGS
for ((i = 0; i < NODES; i++)); do
    port=$((BASE_PORT + 2 * i))
    "$SPOOL" serve -l 127.0.0.1 -p "$port" --http-listen "127.0.0.1:$((port + 1))" \
        --database-url "$URL" --node-id "node$i" --log-level warn >"$OUT/node$i.log" 2>&1 &
    NODE_PID[i]=$!
    echo "${NODE_PID[i]}" >"$DIR/node$i.pid"
    NODE_ARGS+=(--node "127.0.0.1:$port,127.0.0.1:$((port + 1))")
    # One at a time, as bench-pg.sh does: the first creates the schema.
    wait_port "$port" "${NODE_PID[i]}" "node$i"
done
log "$NODES nodes up on one PostgreSQL; $CONNECTIONS connections, $SHARE per node, hold $HOLD s"

"$SPOOL" bench --mode probe "${NODE_ARGS[@]}" --connections "$CONNECTIONS" \
    --hold-secs "$HOLD" --time-limit-secs "$TIME_LIMIT" --json \
    >"$OUT/probe.json" 2>"$OUT/probe.err" &
PROBE_PID=$!
echo "$PROBE_PID" >"$DIR/probe.pid"
for ((tries = 0; tries < 300; tries++)); do
    grep -qs '^probe ready' "$OUT/probe.err" && break
    kill -0 "$PROBE_PID" 2>/dev/null || { log "the probe exited: $(cat "$OUT/probe.err")"; exit 1; }
    sleep 0.1
done
grep -q '^probe ready' "$OUT/probe.err" || { log "the probe is not ready after 30 s"; exit 1; }

slab_before=$(slab_kib)
started=$(date +%s.%N)
declare -a CLIENT_PID
left=$CONNECTIONS
for ((i = 0; i < NODES; i++)); do
    n=$((left < SHARE ? left : SHARE))
    left=$((left - n))
    # Held well past the probe's end; ended by the script once the probe
    # has reported (the client reports before it holds).
    # Two source addresses per client: bind() with port 0 takes odd ports
    # first (even ones are left to connect()), about 14,100 of the default
    # range, and past them each bind scans the whole range: one client's
    # 16,667 from one address stalled at about 15,300 for minutes.
    "$SPOOL" bench --mode idle --addr "127.0.0.1:$((BASE_PORT + 2 * i))" --connections "$n" \
        --server-pid "${NODE_PID[i]}" \
        --source-addresses "127.0.0.$((10 + 2 * i)),127.0.0.$((11 + 2 * i))" \
        --hold-secs "$TIME_LIMIT" --time-limit-secs "$TIME_LIMIT" --json \
        --idle-after-command-secs "$IDLE_AFTER" \
        >"$OUT/client$i.json" 2>"$OUT/client$i.err" &
    CLIENT_PID[i]=$!
    echo "${CLIENT_PID[i]}" >"$DIR/client$i.pid"
done

# Every client's report (written once its connections are counted and
# have each answered one command), bounded by the time limit.
deadline=$((SECONDS + TIME_LIMIT + 30))
for ((i = 0; i < NODES; i++)); do
    while [[ ! -s $OUT/client$i.json ]]; do
        if ! kill -0 "${CLIENT_PID[i]}" 2>/dev/null; then
            log "client $i exited without a report: $(tail -n3 "$OUT/client$i.err")"
            exit 1
        fi
        ((SECONDS < deadline)) || { log "client $i: no report within the time limit"; exit 1; }
        sleep 0.2
    done
done
all_reported=$(date +%s.%N)
slab_held=$(slab_kib)
{
    echo "database sessions while held (state, count):"
    psql_ "SELECT coalesce(state, '-') || ' ' || count(*) FROM pg_stat_activity
           WHERE application_name = 'spool' GROUP BY state ORDER BY state"
} >"$OUT/db-sessions.txt"
for ((i = 0; i < NODES; i++)); do
    curl -s --max-time 10 "http://127.0.0.1:$((BASE_PORT + 2 * i + 1))/metrics" \
        >"$OUT/node$i.metrics" || true
done
nodes_rss_kib=0
for ((i = 0; i < NODES; i++)); do
    nodes_rss_kib=$((nodes_rss_kib + $(awk '/^VmRSS:/ { print $2 }' "/proc/${NODE_PID[i]}/status")))
done

probe_ok=1
wait "$PROBE_PID" || probe_ok=0
for ((i = 0; i < NODES; i++)); do kill "${CLIENT_PID[i]}" 2>/dev/null || true; done
for ((i = 0; i < NODES; i++)); do wait "${CLIENT_PID[i]}" 2>/dev/null || true; done

peer_file=
if ((PEER)); then
    if ! command -v beanstalkd >/dev/null; then
        log "installing beanstalkd (the peer)"
        apt-get update >&2 && apt-get install -y beanstalkd >&2
    fi
    port=$((BASE_PORT + 2 * NODES))
    beanstalkd -l 127.0.0.1 -p "$port" >"$OUT/beanstalkd.log" 2>&1 &
    peer=$!
    echo "$peer" >"$DIR/beanstalkd.pid"
    wait_port "$port" "$peer" beanstalkd
    peer_file="$OUT/beanstalkd.json"
    "$SPOOL" bench --mode idle --addr "127.0.0.1:$port" --connections "$SHARE" \
        --server-pid "$peer" --source-addresses 127.0.0.9 \
        --time-limit-secs "$TIME_LIMIT" --json >"$peer_file" 2>"$OUT/beanstalkd.err" ||
        { log "the beanstalkd run failed: $(tail -n1 "$OUT/beanstalkd.err")"; peer_file=; }
    kill "$peer" 2>/dev/null || true
fi

python3 - "$OUT" "$NODES" "$CONNECTIONS" "$started" "$all_reported" \
    "$slab_before" "$slab_held" "$nodes_rss_kib" "${peer_file:--}" <<'EOF'
import json, os, sys
out, nodes, connections = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
started, reported = float(sys.argv[4]), float(sys.argv[5])
slab_before, slab_held, nodes_rss_kib = int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
peer_file = sys.argv[9]
clients = [json.load(open(f"{out}/client{i}.json")) for i in range(nodes)]
probe = json.load(open(f"{out}/probe.json"))
def per(key):
    return [c[key] for c in clients]
idle, after = per("rss_per_connection_bytes"), per("rss_per_connection_after_command_bytes")
grown = sum(c["rss_after_bytes"] - c["rss_before_bytes"] for c in clients)
grown_cmd = sum(c["rss_after_command_bytes"] - c["rss_before_bytes"] for c in clients)
held = sum(c["connections"] for c in clients)
print(f"{held} connections on {nodes} spool nodes sharing PostgreSQL")
print(f"connect: every client connected, counted, answered one command and sampled "
      f"(IDLE_AFTER {os.environ['IDLE_AFTER']} s included) in {reported - started:.1f} s "
      f"(clients' own connect loops {min(per('connect_secs')):.1f}-{max(per('connect_secs')):.1f} s); "
      f"the probe saw all counted after {probe['all_connected_secs']} s")
print(f"listen-queue overflows {probe['listen_overflows']}, drops {probe['listen_drops']} (whole namespace, over the run)")
print(f"RSS per idle connection, per node: {min(idle):.0f}-{max(idle):.0f} B; "
      f"after one command each {min(after):.0f}-{max(after):.0f} B")
later = per("rss_per_connection_idle_after_command_bytes")
if all(v is not None for v in later):
    print(f"  and {os.environ['IDLE_AFTER']} s later, idle since: "
          f"{min(later):.0f}-{max(later):.0f} B")
print(f"RSS in all: the nodes grew {grown / 2**20:.1f} MiB for the connections "
      f"({grown / held:.0f} B each), {grown_cmd / 2**20:.1f} MiB after one command "
      f"({grown_cmd / held:.0f} B each); the {nodes} nodes' RSS while held {nodes_rss_kib / 1024:.1f} MiB")
print(f"kernel slab while held: +{(slab_held - slab_before) / 1024:.1f} MiB "
      f"({(slab_held - slab_before) * 1024 / held:.0f} B per connection, both ends' sockets)")
if peer_file != "-":
    peer = json.load(open(peer_file))
    p = peer["rss_per_connection_bytes"]
    pa = peer["rss_per_connection_after_command_bytes"]
    print(f"peer beanstalkd, {peer['connections']} connections: {p:.0f} B idle, {pa:.0f} B after one command; "
          f"spool per node / beanstalkd: {max(idle) / p:.2f} idle, {max(after) / pa:.2f} after (worst node)")
print(f"held {probe['held_secs']} s, fewest connections counted while held {probe['held_min_connections']}; "
      f"{probe['round_trip_jobs']} jobs put on one node and reserved on the next")
print(f"{'phase':<11}{'probe':<20}{'count':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
for phase in ("connecting", "held"):
    for kind, l in probe[phase].items():
        print(f"{phase:<11}{kind:<20}{l['count']:>7}{l['p50_ms']:>9.2f}{l['p99_ms']:>9.2f}{l['max_ms']:>9.2f}")
print("/livez max per node: " + ", ".join(f"{m:.2f}" for m in probe["livez_max_ms_per_node"]) + " ms (target < 10)")
print("/admin/connections: " + ", ".join(f"{a['bytes'] // 1024} KiB in {a['ms']:.0f} ms" for a in probe["admin_connections"]))
print(f"probe failures: {probe['failures']}" + (f" (first: {probe['first_failure']})" if probe["first_failure"] else ""))
EOF
cat "$OUT/db-sessions.txt"
grep -h '^spool_db_pool_connections' "$OUT"/node*.metrics | sort | uniq -c | sed 's/^/  nodes x /' || true
echo "load: $(uptime)"
echo "raw results: $OUT/"
((probe_ok)) || { log "the probe failed (see $OUT/probe.err)"; exit 1; }
