#!/usr/bin/env bash
# Property-based tests of the HTTP API against its own /openapi.json:
# schemathesis (pinned, in a virtual environment of its own under target/)
# drives a live `spool serve --in-memory` on free loopback ports and fails
# on any 5xx and any answer the document does not allow (schema, status
# code, content type). Run by scripts/test.sh; on its own:
#   bash scripts/schemathesis.sh
# Environment: SPOOL_SCHEMATHESIS_SEED (default fixed, so runs repeat),
# SPOOL_SCHEMATHESIS_EXAMPLES (cases per operation and phase, default 60).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Pinned: checks and options are named as in this version.
SCHEMATHESIS_VERSION=4.32.5
VENV=target/venv-schemathesis
SEED=${SPOOL_SCHEMATHESIS_SEED:-20261204}
EXAMPLES=${SPOOL_SCHEMATHESIS_EXAMPLES:-60}
# Hard bound on the whole run, whatever schemathesis does.
RUN_TIMEOUT_S=300
# Bound on the server becoming ready.
READY_TIMEOUT_S=30

log() { printf 'schemathesis.sh: %s\n' "$*" >&2; }

if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
    log "installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
    rm -rf "$VENV"
    if ! python3 -m venv "$VENV"; then
        # Debian and Ubuntu ship venv's pip bootstrap separately.
        log "python3 -m venv failed; installing python3-venv"
        sudo=""
        if [ "$(id -u)" -ne 0 ]; then
            sudo="sudo"
        fi
        $sudo apt-get update
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv
        rm -rf "$VENV"
        python3 -m venv "$VENV"
    fi
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

cargo build -p spool --bin spool
SPOOL=target/debug/spool

# Ports chosen by the kernel when the server binds (no race with other
# processes); the HTTP one is read back from the server's log.
SERVER_LOG=$(mktemp)
"$SPOOL" serve --in-memory --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
    --log-format text --log-level info >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!
stop_server() {
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID"
        wait "$SERVER_PID" || true
    fi
    rm -f "$SERVER_LOG"
}
trap stop_server EXIT

server_failed() {
    log "$1; its log:"
    cat "$SERVER_LOG" >&2
    exit 1
}

deadline=$((SECONDS + READY_TIMEOUT_S))
HTTP_ADDR=""
until [[ -n $HTTP_ADDR ]]; do
    kill -0 "$SERVER_PID" 2>/dev/null || server_failed "the server exited at startup"
    ((SECONDS <= deadline)) || server_failed "the server did not say its HTTP address"
    HTTP_ADDR=$(grep -o 'over HTTP http=127\.0\.0\.1:[0-9]*' "$SERVER_LOG" | head -n1 | cut -d= -f2 || true)
    [[ -n $HTTP_ADDR ]] || sleep 0.1
done
BASE="http://$HTTP_ADDR"
ready() {
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
        "$BASE/readyz" >/dev/null 2>&1
}
until ready; do
    kill -0 "$SERVER_PID" 2>/dev/null || server_failed "the server exited at startup"
    ((SECONDS <= deadline)) || server_failed "the server did not become ready"
    sleep 0.1
done

log "running against $BASE (seed $SEED, $EXAMPLES examples an operation)"
# Run from a directory under target/: schemathesis keeps a cache in
# `.schemathesis/` of its working directory.
WORK_DIR=target/schemathesis-work
mkdir -p "$WORK_DIR"
ROOT=$PWD
status=0
(cd "$WORK_DIR" && SCHEMATHESIS_HOOKS="$ROOT/scripts/schemathesis_hooks.py" timeout "$RUN_TIMEOUT_S" \
    "$ROOT/$VENV/bin/schemathesis" run "$BASE/openapi.json" \
    --checks not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance \
    --max-examples "$EXAMPLES" \
    --seed "$SEED" \
    --workers 1 \
    --request-timeout 10 \
    --no-color) || status=$?

if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    log "the server died during the run; its log:"
    cat "$SERVER_LOG" >&2
    exit 1
fi
if ((status != 0)); then
    if ((status == 124)); then
        log "the run took longer than $RUN_TIMEOUT_S s"
    fi
    log "failed (exit $status); the server's log:"
    cat "$SERVER_LOG" >&2
    exit "$status"
fi
log "passed"
