#!/usr/bin/env python3
"""Checks what the Kubernetes schemas cannot: that the manifests of one
variant directory (deploy/kubernetes/<variant>/) fit together and keep
spool's timing rules.

kubernetes-validate checks every built-in kind against its schema; it has
no schema for the Prometheus Operator's ServiceMonitor (a CRD), so this
script checks that one field by field. Run by scripts/check-deploy.sh with
the virtual environment's Python (it needs PyYAML):

    python3 scripts/check_kubernetes.py deploy/kubernetes/embedded ...

Exits 1 with one line per problem.
"""

import re
import sys
from pathlib import Path

import yaml

problems = []


def problem(where, message):
    problems.append(f"{where}: {message}")


def duration_seconds(text):
    """spool's duration syntax: 500ms, 30s, 2m or bare seconds."""
    match = re.fullmatch(r"(\d+)(ms|s|m)?", text)
    if not match:
        return None
    value, unit = int(match.group(1)), match.group(2) or "s"
    return value / 1000 if unit == "ms" else value * 60 if unit == "m" else value


def matches(selector, labels):
    return all(labels.get(key) == value for key, value in selector.items())


# The ServiceMonitor fields these manifests may use, as the CRD
# (monitoring.coreos.com/v1) defines them; anything else is a typo the
# operator would reject or ignore.
SERVICE_MONITOR_SPEC_KEYS = {"selector", "endpoints", "jobLabel", "namespaceSelector"}
SERVICE_MONITOR_ENDPOINT_KEYS = {"port", "path", "interval", "scrapeTimeout", "scheme"}
DURATION = re.compile(r"^(\d+(ms|s|m|h))+$")


def check_service_monitor(where, doc, services):
    if doc.get("apiVersion") != "monitoring.coreos.com/v1":
        problem(where, f"apiVersion {doc.get('apiVersion')!r}, expected monitoring.coreos.com/v1")
    spec = doc.get("spec") or {}
    for key in set(spec) - SERVICE_MONITOR_SPEC_KEYS:
        problem(where, f"spec.{key}: not a ServiceMonitor field these manifests use")
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    if not selector:
        problem(where, "spec.selector.matchLabels is empty: it would select every Service")
    selected = [s for s in services if matches(selector, s["metadata"].get("labels") or {})]
    if len(selected) != 1:
        names = [s["metadata"]["name"] for s in selected]
        problem(where, f"selects {len(selected)} Services {names}, expected exactly one")
        return
    port_names = {p.get("name") for p in selected[0]["spec"].get("ports", [])}
    endpoints = spec.get("endpoints") or []
    if not endpoints:
        problem(where, "spec.endpoints is empty")
    for i, endpoint in enumerate(endpoints):
        for key in set(endpoint) - SERVICE_MONITOR_ENDPOINT_KEYS:
            problem(where, f"spec.endpoints[{i}].{key}: not a field these manifests use")
        if endpoint.get("port") not in port_names:
            problem(where, f"spec.endpoints[{i}].port {endpoint.get('port')!r} is not a port of Service {selected[0]['metadata']['name']}")
        if endpoint.get("path") != "/metrics":
            problem(where, f"spec.endpoints[{i}].path must be /metrics")
        for key in ("interval", "scrapeTimeout"):
            if key in endpoint and not DURATION.match(str(endpoint[key])):
                problem(where, f"spec.endpoints[{i}].{key} {endpoint[key]!r} is not a Prometheus duration")


def check_workload(where, doc, services, secrets, budgets):
    spec = doc["spec"]
    pod = spec["template"]
    labels = pod["metadata"].get("labels") or {}
    if not matches(spec["selector"].get("matchLabels") or {}, labels):
        problem(where, "spec.selector does not match the pod template's labels")
    pod_spec = pod["spec"]
    security = pod_spec.get("securityContext") or {}
    if not security.get("runAsNonRoot"):
        problem(where, "the pod must set securityContext.runAsNonRoot")
    containers = pod_spec["containers"]
    spool = next((c for c in containers if c["name"] == "spool"), None)
    if spool is None:
        problem(where, "no container named spool")
        return
    ports = {p["name"]: p["containerPort"] for p in spool.get("ports", [])}
    if ports != {"beanstalkd": 11300, "http": 11301}:
        problem(where, f"container ports {ports}, expected beanstalkd 11300 and http 11301")
    env = {e["name"]: e for e in spool.get("env", [])}

    # Probes: the paths DESIGN.md §4 fixes, on the http port.
    expected_paths = {"livenessProbe": "/livez", "readinessProbe": "/readyz", "startupProbe": "/readyz"}
    for probe, path in expected_paths.items():
        get = (spool.get(probe) or {}).get("httpGet")
        if not get:
            problem(where, f"{probe} missing (an httpGet on {path})")
            continue
        if get.get("path") != path or get.get("port") not in ("http", 11301):
            problem(where, f"{probe} must GET {path} on the http port")
    startup = spool.get("startupProbe") or {}
    startup_budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    minimum = 600 if doc["kind"] == "StatefulSet" else 60
    if startup_budget < minimum:
        problem(where, f"startupProbe allows {startup_budget} s, less than {minimum} s (log replay)")

    # Shutdown: the kubelet must not SIGKILL a server still draining.
    grace_text = (env.get("SPOOL_SHUTDOWN_GRACE") or {}).get("value", "25s")
    grace = duration_seconds(grace_text)
    if grace is None:
        problem(where, f"SPOOL_SHUTDOWN_GRACE {grace_text!r} is not a spool duration")
        grace = 25
    pre_stop = ((spool.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)
    termination = pod_spec.get("terminationGracePeriodSeconds", 30)
    if termination <= grace + pre_stop:
        problem(where, f"terminationGracePeriodSeconds {termination} must exceed preStop {pre_stop} s + SPOOL_SHUTDOWN_GRACE {grace} s")

    resources = spool.get("resources") or {}
    for kind in ("requests", "limits"):
        if not {"cpu", "memory"} <= set(resources.get(kind) or {}):
            problem(where, f"resources.{kind} must set cpu and memory")

    # Every secret reference names a Secret of this directory and its key.
    for name, entry in env.items():
        ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
        if ref and ref.get("key") not in secrets.get(ref.get("name"), set()):
            problem(where, f"env {name} refers to {ref.get('name')}/{ref.get('key')}, which no Secret here has")
    if "SPOOL_AUTH_TOKEN" not in env:
        problem(where, "SPOOL_AUTH_TOKEN is not set: /v1 and /admin would be open")
    if doc["kind"] == "StatefulSet":
        if spec.get("replicas") != 1:
            problem(where, "the embedded log serves one replica (its directory lock refuses a second)")
        mounts = {m["mountPath"]: m["name"] for m in spool.get("volumeMounts", [])}
        claims = {c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])}
        data_dir = (env.get("SPOOL_DATA_DIR") or {}).get("value")
        if data_dir not in mounts or mounts[data_dir] not in claims:
            problem(where, f"SPOOL_DATA_DIR {data_dir!r} must be a volume claim's mount")
        if spec.get("serviceName") not in {s["metadata"]["name"] for s in services}:
            problem(where, f"serviceName {spec.get('serviceName')!r} is not a Service here")
    else:
        if "SPOOL_DATABASE_URL" not in env:
            problem(where, "the PostgreSQL variant needs SPOOL_DATABASE_URL")

    for service in services:
        name = service["metadata"]["name"]
        if not matches(service["spec"].get("selector") or {}, labels):
            problem(where, f"Service {name} does not select this workload's pods")
        for port in service["spec"].get("ports", []):
            if port.get("targetPort") not in ports:
                problem(where, f"Service {name} port {port.get('name')} targets {port.get('targetPort')!r}, not a container port")
    if not any(matches((b["spec"].get("selector") or {}).get("matchLabels") or {}, labels) for b in budgets):
        problem(where, "no PodDisruptionBudget selects its pods")


def check_variant(directory):
    docs = []
    for path in sorted(Path(directory).glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((f"{path}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}", doc))
    kinds = {doc["kind"] for _, doc in docs}
    for required in ("Service", "Secret", "PodDisruptionBudget", "ServiceMonitor"):
        if required not in kinds:
            problem(directory, f"no {required}")
    services = [doc for _, doc in docs if doc["kind"] == "Service"]
    budgets = [doc for _, doc in docs if doc["kind"] == "PodDisruptionBudget"]
    secrets = {
        doc["metadata"]["name"]: set(doc.get("stringData") or {}) | set(doc.get("data") or {})
        for _, doc in docs
        if doc["kind"] == "Secret"
    }
    workloads = [(where, doc) for where, doc in docs if doc["kind"] in ("StatefulSet", "Deployment")]
    if len(workloads) != 1:
        problem(directory, f"{len(workloads)} workloads, expected one StatefulSet or Deployment")
    for where, doc in workloads:
        # Only the Services of this workload's instance.
        check_workload(where, doc, services, secrets, budgets)
    for where, doc in docs:
        if doc["kind"] == "ServiceMonitor":
            check_service_monitor(where, doc, services)


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: check_kubernetes.py DIRECTORY...")
    for directory in sys.argv[1:]:
        check_variant(directory)
    for line in problems:
        print(f"check_kubernetes: {line}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"check_kubernetes: {', '.join(sys.argv[1:])}: manifests fit together")


if __name__ == "__main__":
    main()
