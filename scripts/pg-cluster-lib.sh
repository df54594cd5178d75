# shellcheck shell=bash
# Sourced by the PostgreSQL benchmark scripts (bench-pg.sh,
# bench-pg-graphile.sh, bench-pg-bloat.sh): a private cluster in a temporary
# directory, unix socket only, stopped at exit together with every process
# whose pid the script wrote to "$DIR"/*.pid.
#
#   pg_cluster_start TAG MAX_CONNECTIONS
#
# Needs SPOOL (the spool binary) and Debian's postgresql package; sets BIN
# (PostgreSQL's bin directory), DIR, AS (runs a command as postgres when we
# are root) and URL (spool's --database-url). Commits are durable (fsync
# on, synchronous_commit on) unless PG_OPTIONS says otherwise (e.g.
# PG_OPTIONS="-c synchronous_commit=off" to see what the disk's flushes
# cost).

pg_cluster_start() {
    local tag=$1 max_connections=$2
    BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
    [ -x "$BIN/initdb" ] || { echo "install postgresql (apt-get install postgresql)" >&2; exit 1; }
    [ -x "$SPOOL" ] || { echo "build $SPOOL first: cargo build --release -p spool" >&2; exit 1; }
    DIR=$(mktemp -d "/tmp/spool-$tag.XXXXXX")
    AS=""
    if [ "$(id -u)" -eq 0 ]; then
        chown postgres "$DIR"
        AS="runuser -u postgres --"
    fi
    trap pg_cluster_cleanup EXIT
    $AS "$BIN/initdb" -D "$DIR/data" -U spool --auth=trust -E UTF8 --no-sync >/dev/null
    $AS "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w start \
        -o "-k $DIR -c listen_addresses= -c max_connections=$max_connections -c shared_buffers=256MB ${PG_OPTIONS:-}" >/dev/null
    # shellcheck disable=SC2034 # used by the scripts that source this
    URL="host=$DIR port=5432 user=spool dbname=postgres"
}

pg_cluster_cleanup() {
    # Nodes are started in command substitutions: their pids are in files.
    for f in "$DIR"/*.pid; do
        [ -e "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    $AS "$BIN/pg_ctl" -D "$DIR/data" stop -m fast >/dev/null 2>&1 || true
    rm -rf "$DIR"
}

psql_() { $AS "$BIN/psql" -h "$DIR" -U spool -d postgres -Atc "$1"; }
