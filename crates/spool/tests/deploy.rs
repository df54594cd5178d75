//! The deployment files against the real server: every metric name the
//! Grafana dashboard, the alert rules and their unit tests use must be one
//! that `/metrics` exports, so a renamed metric cannot leave a silent panel
//! or an alert that never fires. In queries (and the unit tests' series) a
//! histogram counts only through its `_bucket`, `_sum` or `_count` series;
//! prose (descriptions, comments) may name the family itself. The files'
//! own syntax is checked by `scripts/check-deploy.sh` (promtool,
//! kubernetes-validate, hadolint).

mod support;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use support::{Server, TempDir};

/// How long the server may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The files that name metrics, relative to the repository root.
const FILES_NAMING_METRICS: [&str; 3] = [
    "deploy/grafana/spool.json",
    "deploy/prometheus/alerts.yml",
    "deploy/prometheus/alerts_test.yml",
];

/// Every metric spool exports starts with one of these; any word in the
/// files that does is taken for a metric name.
const METRIC_PREFIXES: [&str; 2] = ["spool_", "process_"];

/// What the dashboard must show (the issue's list): queue depth by state,
/// put/reserve/delete rates, wait and run percentiles, schedule skew,
/// connections, fds, log fsync latency and batch size, disk.
const DASHBOARD_MUST_SHOW: [&str; 15] = [
    "spool_queue_jobs",
    "spool_jobs_put_total",
    "spool_jobs_reserved_total",
    "spool_jobs_deleted_total",
    "spool_job_wait_seconds_bucket",
    "spool_job_run_seconds_bucket",
    "spool_schedule_skew_seconds_bucket",
    "spool_connections",
    "process_open_fds",
    "process_max_fds",
    "spool_wal_fsync_seconds_bucket",
    "spool_wal_commit_batch_size_bucket",
    "spool_wal_bytes",
    "spool_disk_full",
    "spool_wal_failed",
];

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read_repo_file(path: &str) -> String {
    let full = repo_root().join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("reading {}: {e}", full.display()))
}

/// Families by name with their type, from the `# TYPE` lines.
fn exported_families(exposition: &str) -> HashMap<String, String> {
    exposition
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| {
            let (name, kind) = rest.split_once(' ')?;
            Some((name.to_string(), kind.to_string()))
        })
        .collect()
}

/// Words of `text` that start with a metric prefix: `[A-Za-z0-9_]` runs,
/// so `rate(spool_jobs_put_total{queue="a"}[5m])` yields the counter. (A
/// colon, legal in recording rules' names, ends a word: spool exports no
/// such name, and prose puts colons after names.)
fn metric_names_in(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| METRIC_PREFIXES.iter().any(|p| word.starts_with(p)))
        .map(str::to_string)
        .collect()
}

/// Why `name`, in prose, is not a metric the server exports, if it is not:
/// a family or one of a histogram's series.
fn not_exported_family(name: &str, families: &HashMap<String, String>) -> Option<String> {
    if families.contains_key(name) {
        return None;
    }
    not_exported(name, families)
}

/// Why `name`, in a query, is not a series the server exports, if it is not.
fn not_exported(name: &str, families: &HashMap<String, String>) -> Option<String> {
    if let Some(kind) = families.get(name) {
        return (kind == "histogram").then(|| {
            format!("{name} is a histogram: use {name}_bucket, {name}_sum or {name}_count")
        });
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if let Some(kind) = families.get(base) {
                return (kind != "histogram")
                    .then(|| format!("{name}: {base} is a {kind}, not a histogram"));
            }
        }
    }
    Some(format!("{name} is not exported by /metrics"))
}

/// The dashboard's queries: every string under an `expr`, `query` or
/// `definition` key (panel targets and template variables).
fn dashboard_queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match value {
                    serde_json::Value::String(text)
                        if ["expr", "query", "definition"].contains(&key.as_str()) =>
                    {
                        out.push(text.clone())
                    }
                    _ => dashboard_queries(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

/// The values of `key:` in a YAML file of ours: on the key's line, or the
/// more indented lines of a block scalar (`key: |`) below it. Enough for
/// the rule files' `expr:` and the unit tests' `series:`.
fn yaml_values(text: &str, key: &str) -> Vec<String> {
    let mut values = Vec::new();
    let mut lines = text.lines().peekable();
    let prefix = format!("{key}:");
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start().trim_start_matches("- ");
        let Some(value) = trimmed.strip_prefix(&prefix) else {
            continue;
        };
        let value = value.trim();
        if !value.starts_with('|') && !value.starts_with('>') {
            values.push(value.to_string());
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let mut block = String::new();
        while let Some(next) = lines.peek() {
            let next_indent = next.len() - next.trim_start().len();
            if !next.trim().is_empty() && next_indent <= indent {
                break;
            }
            block.push_str(next.trim());
            block.push('\n');
            lines.next();
        }
        values.push(block);
    }
    values
}

/// (file, the queries in it, its whole text).
fn files_naming_metrics() -> Vec<(&'static str, Vec<String>, String)> {
    FILES_NAMING_METRICS
        .iter()
        .map(|&file| {
            let text = read_repo_file(file);
            let queries = if file.ends_with(".json") {
                let dashboard: serde_json::Value =
                    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
                let mut queries = Vec::new();
                dashboard_queries(&dashboard, &mut queries);
                queries
            } else {
                let mut queries = yaml_values(&text, "expr");
                queries.extend(yaml_values(&text, "series"));
                queries
            };
            assert!(!queries.is_empty(), "{file} has no query");
            (file, queries, text)
        })
        .collect()
}

/// A durable server with a connection cap, so that every family that
/// depends on the setup (the log's, `spool_connections_max`) is exported,
/// ready and scraped once.
fn scrape_a_full_server() -> String {
    let dir = TempDir::new("deploy-metrics");
    let server = Server::start_durable(&dir.path().join("data"), &["--max-connections", "100"]);
    let deadline = Instant::now() + READY_TIMEOUT;
    while server.http("GET", "/readyz", "").status != 200 {
        assert!(
            Instant::now() < deadline,
            "/readyz not 200 within {READY_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let reply = server.http("GET", "/metrics", "");
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.body
}

#[test]
fn dashboard_and_alerts_name_only_exported_metrics() {
    let families = exported_families(&scrape_a_full_server());
    assert!(
        families.len() > 40,
        "too few families scraped to judge: {families:?}"
    );
    let mut problems = Vec::new();
    for (file, queries, text) in files_naming_metrics() {
        for name in metric_names_in(&queries.join("\n")) {
            if let Some(why) = not_exported(&name, &families) {
                problems.push(format!("{file}: in a query: {why}"));
            }
        }
        for name in metric_names_in(&text) {
            if let Some(why) = not_exported_family(&name, &families) {
                problems.push(format!("{file}: {why}"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    let dashboard_text = read_repo_file("deploy/grafana/spool.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&dashboard_text).expect("deploy/grafana/spool.json is JSON");
    assert!(dashboard["panels"]
        .as_array()
        .is_some_and(|p| !p.is_empty()));
    let shown = metric_names_in(&dashboard_text);
    let missing: Vec<_> = DASHBOARD_MUST_SHOW
        .iter()
        .filter(|name| !shown.contains(**name))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard shows none of {missing:?}"
    );
}

/// The checker itself: it must refuse what the files could get wrong.
#[test]
fn the_metric_name_check_refuses_unknown_names_and_wrong_suffixes() {
    let families: HashMap<String, String> = [
        ("spool_queue_jobs", "gauge"),
        ("spool_job_wait_seconds", "histogram"),
        ("spool_jobs_put_total", "counter"),
    ]
    .into_iter()
    .map(|(n, k)| (n.to_string(), k.to_string()))
    .collect();
    let names = metric_names_in(
        r#"sum by (queue) (rate(spool_jobs_put_total{queue=~"$queue"}[5m])) /
           histogram_quantile(0.99, rate(spool_job_wait_seconds_bucket[5m])) up"#,
    );
    assert_eq!(
        names,
        BTreeSet::from([
            "spool_jobs_put_total".to_string(),
            "spool_job_wait_seconds_bucket".to_string()
        ])
    );
    for good in [
        "spool_queue_jobs",
        "spool_jobs_put_total",
        "spool_job_wait_seconds_bucket",
        "spool_job_wait_seconds_sum",
        "spool_job_wait_seconds_count",
    ] {
        assert_eq!(not_exported(good, &families), None, "{good}");
    }
    // Rule files: one-line values and block scalars, list items included.
    let rules = "      - alert: A\n        expr: spool_a == 1\n        for: 1m\n      - alert: B\n        expr: |\n          spool_b > 0\n          and spool_c\n        labels: {}\n      - series: 'spool_d{x=\"1\"}'\n";
    assert_eq!(
        yaml_values(rules, "expr"),
        ["spool_a == 1", "spool_b > 0\nand spool_c\n"]
    );
    assert_eq!(yaml_values(rules, "series"), ["'spool_d{x=\"1\"}'"]);
    for bad in [
        "spool_jobs_put",
        "spool_queue_jobs_bucket",
        "spool_job_wait_seconds",
        "spool_not_a_metric_total",
    ] {
        assert!(not_exported(bad, &families).is_some(), "{bad}");
    }
}

#[test]
fn paused_queues_are_exported_for_the_stalled_queue_alert() {
    let server = Server::start();
    let mut client = server.client();
    client.expect("use orders\r\n", "USING orders\r\n");
    client.put(0, 0, 60, b"job");
    client.expect("pause-tube orders 60\r\n", "PAUSED\r\n");
    let body = server.http("GET", "/metrics", "").body;
    for line in [
        "# TYPE spool_queue_paused gauge",
        "spool_queue_paused{queue=\"orders\"} 1",
        "spool_queue_paused{queue=\"default\"} 0",
    ] {
        assert!(body.lines().any(|l| l == line), "{line} in:\n{body}");
    }
}
