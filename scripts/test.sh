#!/usr/bin/env bash
# The project's test command: formatting, lints, and every test.
# Extra arguments are passed to `cargo test`, e.g.
#   bash scripts/test.sh -- --nocapture
#   SPOOL_DIFF_FILTER=ttr bash scripts/test.sh --test differential
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

stage() {
    printf '\n==> %s\n' "$*"
}

# The binary's allocator (jemalloc, on glibc Linux) is C built with gcc and
# make; the toolchain links with gcc already, make may be missing.
if ! command -v make >/dev/null 2>&1 || ! command -v gcc >/dev/null 2>&1; then
    stage "installing make and gcc (jemalloc's build)"
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        sudo="sudo"
    fi
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y make gcc
fi

# The differential test plays every scenario against the real beanstalkd
# 1.12, so make sure it is installed.
if ! command -v beanstalkd >/dev/null 2>&1; then
    stage "installing beanstalkd (the differential test's oracle)"
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        sudo="sudo"
    fi
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y beanstalkd
fi

# The PostgreSQL broker's tests start a private cluster from the server
# binaries (initdb, postgres) of Debian's package; they never use a server
# that is already running.
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    stage "installing postgresql (the PostgreSQL broker's tests)"
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        sudo="sudo"
    fi
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql
fi

stage "cargo fmt --all -- --check"
cargo fmt --all -- --check

stage "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

stage "cargo test --workspace $*"
cargo test --workspace "$@"

# The static build, Dockerfile, Kubernetes manifests, systemd unit, alert
# rules and dashboard (installs promtool and a venv in target/ if missing).
stage "deployment files (scripts/check-deploy.sh)"
bash scripts/check-deploy.sh

stage "schemathesis against /openapi.json (scripts/schemathesis.sh)"
bash scripts/schemathesis.sh

stage "all checks passed"
