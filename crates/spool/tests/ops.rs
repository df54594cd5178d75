//! The HTTP operating surface of a real `spool serve` over loopback TCP:
//! probes, the Prometheus text of `/metrics` parsed line by line, the admin
//! endpoints, bearer auth, JSON errors for bad requests, and the `spool
//! stats` / `spool conns` / `spool top` verbs and the job verbs (`spool
//! put`, `get`, ...) against a live server.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{http_request, run_spool, HttpReply, Server};

/// Bound on waiting for the server to settle into a state.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_ready(server: &Server) {
    wait_until("/readyz to answer 200", || {
        server.http("GET", "/readyz", "").status == 200
    });
}

/// One sample line of the exposition.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed exposition: families by name (TYPE) and every sample.
#[derive(Debug, Default)]
struct Exposition {
    types: HashMap<String, String>,
    helps: HashMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    fn series<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Parses `{k="v",...}` from the start of `rest`; returns the labels and
/// what follows the closing brace.
fn parse_labels(line: &str, rest: &str) -> (BTreeMap<String, String>, String) {
    let mut labels = BTreeMap::new();
    let mut chars = rest.chars().peekable();
    assert_eq!(chars.next(), Some('{'));
    loop {
        match chars.peek() {
            Some('}') => {
                chars.next();
                break;
            }
            Some(',') => {
                chars.next();
                continue;
            }
            _ => {}
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            assert!(is_name_char(c), "bad label name char {c:?} in {line:?}");
            key.push(c);
            chars.next();
        }
        assert!(!key.is_empty(), "empty label name in {line:?}");
        assert_eq!(chars.next(), Some('='), "no = in {line:?}");
        assert_eq!(
            chars.next(),
            Some('"'),
            "label value not quoted in {line:?}"
        );
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('"') => break,
                Some('\\') => match chars.next() {
                    Some('\\') => value.push('\\'),
                    Some('"') => value.push('"'),
                    Some('n') => value.push('\n'),
                    other => panic!("bad escape {other:?} in {line:?}"),
                },
                Some('\n') | None => panic!("unterminated label value in {line:?}"),
                Some(c) => value.push(c),
            }
        }
        assert!(
            labels.insert(key, value).is_none(),
            "duplicate label in {line:?}"
        );
    }
    (labels, chars.collect())
}

fn parse_value(text: &str, line: &str) -> f64 {
    match text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        _ => text
            .parse()
            .unwrap_or_else(|_| panic!("bad sample value {text:?} in {line:?}")),
    }
}

/// The family a sample belongs to: histogram samples carry a suffix.
fn family_of<'a>(name: &'a str, types: &HashMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if types.get(base).map(String::as_str) == Some("histogram") {
                return base;
            }
        }
    }
    name
}

/// Parses and checks every line: HELP and TYPE before a family's samples,
/// well-formed names, labels and values.
fn parse_exposition(text: &str) -> Exposition {
    let mut parsed = Exposition::default();
    assert!(text.ends_with('\n'), "the exposition ends with a newline");
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            parsed.helps.insert(name.to_string(), help.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "bad type in {line:?}"
            );
            assert!(
                parsed.helps.contains_key(name),
                "TYPE before HELP for {name}"
            );
            assert!(
                parsed
                    .types
                    .insert(name.to_string(), kind.to_string())
                    .is_none(),
                "family {name} declared twice"
            );
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line:?}");
        let name_end = line
            .find(|c: char| !is_name_char(c))
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let name = &line[..name_end];
        assert!(
            name.starts_with(is_name_start),
            "bad metric name in {line:?}"
        );
        let rest = &line[name_end..];
        let (labels, rest) = if rest.starts_with('{') {
            parse_labels(line, rest)
        } else {
            (BTreeMap::new(), rest.to_string())
        };
        let value_text = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("no space before the value in {line:?}"));
        assert!(
            !value_text.contains(' '),
            "timestamps are not sent: {line:?}"
        );
        let value = parse_value(value_text, line);
        let family = family_of(name, &parsed.types);
        assert!(
            parsed.types.contains_key(family) && parsed.helps.contains_key(family),
            "sample {name} without HELP/TYPE for {family}"
        );
        parsed.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    parsed
}

/// A series' labels other than `le`, sorted.
type LabelSet = Vec<(String, String)>;

/// Checks every histogram series: buckets ascending in `le`, counts
/// cumulative (never falling), the last `+Inf` and equal to `_count`.
fn check_histograms(parsed: &Exposition) {
    for (family, kind) in &parsed.types {
        if kind != "histogram" {
            continue;
        }
        // Group bucket samples by their labels without `le`.
        let mut series: BTreeMap<LabelSet, Vec<(f64, f64)>> = BTreeMap::new();
        for sample in parsed.series(&format!("{family}_bucket")) {
            let le = sample
                .labels
                .get("le")
                .unwrap_or_else(|| panic!("{family}_bucket without le"));
            let key: LabelSet = sample
                .labels
                .iter()
                .filter(|(k, _)| *k != "le")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            series
                .entry(key)
                .or_default()
                .push((parse_value(le, le), sample.value));
        }
        for (labels, buckets) in series {
            let bounds: Vec<f64> = buckets.iter().map(|b| b.0).collect();
            assert!(
                bounds.windows(2).all(|w| w[0] < w[1]),
                "{family}{labels:?}: le not ascending: {bounds:?}"
            );
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "{family}{labels:?}: buckets not cumulative: {buckets:?}"
            );
            let last = buckets.last().expect("at least one bucket");
            assert_eq!(
                last.0,
                f64::INFINITY,
                "{family}{labels:?}: last bucket not +Inf"
            );
            let label_refs: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let count = parsed
                .value(&format!("{family}_count"), &label_refs)
                .unwrap_or_else(|| panic!("{family}{labels:?} without _count"));
            assert_eq!(last.1, count, "{family}{labels:?}: +Inf bucket != _count");
            assert!(
                parsed
                    .value(&format!("{family}_sum"), &label_refs)
                    .is_some(),
                "{family}{labels:?} without _sum"
            );
        }
    }
}

fn metrics(server: &Server) -> (HttpReply, Exposition) {
    let reply = server.http("GET", "/metrics", "");
    assert_eq!(reply.status, 200, "{}", reply.body);
    let parsed = parse_exposition(&reply.body);
    check_histograms(&parsed);
    (reply, parsed)
}

#[test]
fn probes_answer_and_readiness_turns_true() {
    let server = Server::start();
    for path in ["/livez", "/healthz"] {
        let reply = server.http("GET", path, "");
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        assert_eq!(reply.json()["status"], "ok");
        assert!(reply
            .header("content-type")
            .is_some_and(|v| v.starts_with("application/json")));
    }
    wait_ready(&server);
    assert_eq!(server.http("GET", "/readyz", "").json()["status"], "ready");
}

#[test]
fn sigusr1_drain_shows_in_readiness() {
    let server = Server::start();
    wait_ready(&server);
    // Readiness reads the broker's health; SIGUSR1 drains the broker only.
    server.signal("USR1");
    wait_until("/readyz to say draining", || {
        let reply = server.http("GET", "/readyz", "");
        reply.status == 503 && reply.json()["reason"] == "draining"
    });
    let (_, parsed) = metrics(&server);
    assert_eq!(parsed.value("spool_ready", &[]), Some(0.0));
    let stats = server.http("GET", "/admin/stats", "").json();
    assert_eq!(
        (stats["ready"].clone(), stats["not_ready_reason"].clone()),
        (false.into(), "draining".into())
    );
    assert_eq!(server.http("GET", "/livez", "").status, 200);
}

#[test]
fn metrics_are_well_formed_and_count_job_traffic() {
    let server = Server::start();
    wait_ready(&server);
    let (reply, before) = metrics(&server);
    assert!(
        reply
            .header("content-type")
            .is_some_and(|v| v.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        reply.headers
    );
    for name in [
        "spool_build_info",
        "spool_uptime_seconds",
        "spool_jobs_put_total",
        "spool_jobs_reserved_total",
        "spool_jobs_deleted_total",
        "spool_jobs_released_total",
        "spool_jobs_buried_total",
        "spool_jobs_kicked_total",
        "spool_jobs_timed_out_total",
        "spool_jobs_failed_total",
        "spool_jobs_dead_lettered_total",
        "spool_jobs_cancelled_total",
        "spool_jobs_completed_total",
        "spool_jobs_duplicates_total",
        "spool_jobs_refused_total",
        "spool_waits",
        "spool_queue_jobs",
        "spool_job_wait_seconds",
        "spool_job_run_seconds",
        "spool_schedule_skew_seconds",
        "spool_connections",
        "spool_connections_opened_total",
        "spool_connections_closed_total",
        "spool_connections_rejected_total",
        "spool_connection_duration_seconds",
        "spool_listen_overflows_total",
        "spool_listen_drops_total",
        "process_open_fds",
        "process_max_fds",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_start_time_seconds",
        "spool_runtime_workers",
        "spool_runtime_alive_tasks",
        "spool_runtime_global_queue_depth",
    ] {
        assert!(
            before.types.contains_key(name),
            "{name} missing from /metrics"
        );
    }
    assert!(before.value("process_open_fds", &[]).unwrap() > 0.0);
    assert!(before.value("process_resident_memory_bytes", &[]).unwrap() > 0.0);

    // Traffic on the beanstalkd port, in a tube whose name needs no escaping
    // but has a dash and a dot.
    let mut client = server.client();
    client.expect("use ops-q.1\r\n", "USING ops-q.1\r\n");
    client.expect("watch ops-q.1\r\n", "WATCHING 2\r\n");
    for body in [&b"a"[..], b"b", b"c"] {
        client.put(0, 0, 60, body);
    }
    let (first, _) = client.reserve_now();
    let (_second, _) = client.reserve_now();
    client.expect(format!("delete {first}\r\n"), "DELETED\r\n");

    let (_, after) = metrics(&server);
    let q = [("queue", "ops-q.1")];
    assert_eq!(after.value("spool_jobs_put_total", &q), Some(3.0));
    assert_eq!(after.value("spool_jobs_reserved_total", &q), Some(2.0));
    assert_eq!(after.value("spool_jobs_deleted_total", &q), Some(1.0));
    assert_eq!(after.value("spool_jobs_released_total", &q), Some(0.0));
    let state = |s: &str| after.value("spool_queue_jobs", &[("queue", "ops-q.1"), ("state", s)]);
    assert_eq!(state("ready"), Some(1.0));
    assert_eq!(state("reserved"), Some(1.0));
    assert_eq!(state("delayed"), Some(0.0));
    assert_eq!(state("buried"), Some(0.0));
    assert_eq!(after.value("spool_job_wait_seconds_count", &q), Some(2.0));
    assert_eq!(after.value("spool_job_run_seconds_count", &q), Some(1.0));
    assert!(
        after
            .value("spool_connections", &[("protocol", "beanstalk")])
            .unwrap()
            >= 1.0
    );
    assert!(
        after
            .value("spool_connections_opened_total", &[("protocol", "http")])
            .unwrap()
            > before
                .value("spool_connections_opened_total", &[("protocol", "http")])
                .unwrap()
    );
}

#[test]
fn metrics_count_the_job_model() {
    let server = Server::start();
    wait_ready(&server);
    let ok = |method: &str, path: &str, body: &str, status: u16| {
        let reply = server.http(method, path, body);
        assert_eq!(reply.status, status, "{method} {path}: {}", reply.body);
        reply.json()
    };
    ok("PUT", "/v1/queues/jm/policy", r#"{"max_jobs": 3}"#, 200);
    let keyed = r#"{"payload": 1, "idempotency_key": "k"}"#;
    ok("POST", "/v1/queues/jm/jobs", keyed, 201);
    assert_eq!(
        ok("POST", "/v1/queues/jm/jobs", keyed, 200)["duplicate"],
        true
    );
    let doomed = ok(
        "POST",
        "/v1/queues/jm/jobs",
        r#"{"payload": 2, "max_attempts": 1}"#,
        201,
    );
    let leased = ok(
        "POST",
        "/v1/reserve",
        r#"{"queues": ["jm"], "timeout_ms": 0, "batch": 2}"#,
        200,
    );
    for job in leased["jobs"].as_array().unwrap() {
        let (id, lease) = (&job["id"], &job["lease"]);
        if *id == doomed["id"] {
            // One attempt allowed: this failure dead-letters the job.
            let body = format!(r#"{{"lease": {lease}, "error": "no"}}"#);
            let failed = ok("POST", &format!("/v1/jobs/{id}/fail"), &body, 200);
            assert_eq!(failed["state"], "buried");
        } else {
            let body = format!(r#"{{"lease": {lease}, "result": "done"}}"#);
            ok("POST", &format!("/v1/jobs/{id}/complete"), &body, 200);
        }
    }
    let cancelled = ok("POST", "/v1/queues/jm/jobs", r#"{"payload": 3}"#, 201);
    ok(
        "POST",
        &format!("/v1/jobs/{}/cancel", cancelled["id"]),
        "",
        200,
    );
    // The buried job and two more fill the queue; the next is refused.
    ok("POST", "/v1/queues/jm/jobs", r#"{"payload": 4}"#, 201);
    ok("POST", "/v1/queues/jm/jobs", r#"{"payload": 5}"#, 201);
    ok("POST", "/v1/queues/jm/jobs", r#"{"payload": 6}"#, 429);

    let (_, parsed) = metrics(&server);
    let q = [("queue", "jm")];
    assert_eq!(parsed.value("spool_jobs_duplicates_total", &q), Some(1.0));
    assert_eq!(parsed.value("spool_jobs_completed_total", &q), Some(1.0));
    assert_eq!(parsed.value("spool_jobs_failed_total", &q), Some(1.0));
    assert_eq!(
        parsed.value("spool_jobs_dead_lettered_total", &q),
        Some(1.0)
    );
    assert_eq!(parsed.value("spool_jobs_cancelled_total", &q), Some(1.0));
    assert_eq!(parsed.value("spool_jobs_buried_total", &q), Some(1.0));
    assert_eq!(
        parsed.value(
            "spool_jobs_refused_total",
            &[("queue", "jm"), ("reason", "queue_full")]
        ),
        Some(1.0)
    );
    // Completions and failures through the job API end a run too.
    assert_eq!(parsed.value("spool_job_run_seconds_count", &q), Some(2.0));
    assert_eq!(
        parsed.value("spool_waits", &[("kind", "reserve")]),
        Some(0.0)
    );
    assert_eq!(parsed.value("spool_waits", &[("kind", "job")]), Some(0.0));
    assert_eq!(parsed.types["spool_waits"], "gauge");
    assert_eq!(parsed.types["spool_jobs_refused_total"], "counter");
}

#[test]
fn admin_stats_and_connections_show_queues_and_sessions() {
    let server = Server::start();
    wait_ready(&server);
    let mut worker = server.client();
    worker.expect("use mail\r\n", "USING mail\r\n");
    worker.expect("watch mail\r\n", "WATCHING 2\r\n");
    let id = worker.put(0, 0, 60, b"hello");
    worker.put(0, 0, 60, b"second");
    let (reserved, _) = worker.reserve_now();
    assert_eq!(reserved, id);

    let stats = server.http("GET", "/admin/stats", "").json();
    assert_eq!(stats["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(stats["pid"], server.pid());
    assert!(stats["process"]["open_fds"].as_u64().unwrap() > 0);
    assert!(stats["process"]["max_fds"].as_u64().unwrap() > 0);
    assert!(stats["process"]["threads"].as_u64().unwrap() >= 1);
    assert!(stats["process"]["resident_memory_bytes"].as_u64().unwrap() > 0);
    assert!(stats["runtime"]["http"]["alive_tasks"].as_u64().is_some());
    assert!(
        stats["connections"]["active"]["beanstalk"]
            .as_u64()
            .unwrap()
            >= 1
    );
    let mail = stats["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "mail")
        .unwrap_or_else(|| panic!("no mail queue in {stats}"));
    assert_eq!(mail["ready"], 1);
    assert_eq!(mail["reserved"], 1);
    assert_eq!(mail["counters"]["put"], 2);
    assert_eq!(mail["counters"]["reserved"], 1);
    assert!(mail["wait_p99_seconds"].as_f64().is_some());

    let conns = server.http("GET", "/admin/connections", "").json();
    let list = conns["connections"].as_array().unwrap();
    let with_job = list
        .iter()
        .find(|c| c["session"]["reserved_job_ids"] == serde_json::json!([id]))
        .unwrap_or_else(|| panic!("no connection holding job {id}: {conns}"));
    assert_eq!(with_job["protocol"], "beanstalk");
    assert_eq!(with_job["session"]["tube_used"], "mail");
    let watched: Vec<&str> = with_job["session"]["watched"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert!(
        watched.contains(&"mail") && watched.contains(&"default"),
        "{watched:?}"
    );
    assert!(with_job["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(with_job["bytes_in"].as_u64().unwrap() > 0);
    assert!(with_job["bytes_out"].as_u64().unwrap() > 0);
    assert!(with_job["age_seconds"].as_f64().is_some());
    // The asking HTTP connection is listed too.
    assert!(list.iter().any(|c| c["protocol"] == "http"), "{conns}");

    // A worker blocked in reserve shows how long it has waited.
    let mut blocked = server.client();
    blocked.send("watch idle-tube\r\n");
    assert_eq!(blocked.line(), "WATCHING 2");
    blocked.expect("ignore default\r\n", "WATCHING 1\r\n");
    blocked.send("reserve\r\n");
    wait_until("a connection blocked in reserve", || {
        let conns = server.http("GET", "/admin/connections", "").json();
        conns["connections"].as_array().unwrap().iter().any(|c| {
            c["session"]["blocked_in_reserve_seconds"]
                .as_f64()
                .is_some()
                && c["session"]["watched"] == serde_json::json!(["idle-tube"])
        })
    });
}

#[test]
fn bad_requests_get_json_4xx() {
    let server = Server::start();
    let check = |reply: HttpReply, status: u16, code: &str| {
        assert_eq!(reply.status, status, "{}", reply.body);
        assert_eq!(reply.json()["error"]["code"], code, "{}", reply.body);
        assert!(reply.json()["error"]["message"].as_str().is_some());
    };
    check(server.http("GET", "/nope", ""), 404, "not_found");
    check(server.http("GET", "/admin/nope", ""), 404, "not_found");
    check(
        server.http("POST", "/metrics", ""),
        405,
        "method_not_allowed",
    );
    check(
        server.http("DELETE", "/admin/stats", ""),
        405,
        "method_not_allowed",
    );
    check(
        server.http("PUT", "/admin/log-level", &"x".repeat(100 << 10)),
        413,
        "body_too_large",
    );
    check(
        server.http("PUT", "/admin/log-level", ""),
        400,
        "bad_filter",
    );
    check(
        server.http("PUT", "/admin/log-level", "{\"filter\": 7}"),
        400,
        "bad_filter",
    );
    check(
        server.http("PUT", "/admin/log-level", "[[["),
        400,
        "bad_filter",
    );
    // The level is unchanged by the refused requests, and JSON bodies work.
    let reply = server.http(
        "PUT",
        "/admin/log-level",
        "{\"filter\": \"warn,spool=info\"}",
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        server.http("GET", "/admin/log-level", "").json()["filter"],
        "warn,spool=info"
    );
    // The server is still fine.
    assert_eq!(server.http("GET", "/livez", "").status, 200);
}

#[test]
fn admin_needs_the_bearer_token_when_one_is_set() {
    let server = Server::start_with(&["--auth-token", "t0ken"]);
    wait_ready(&server);
    let addr = server.http_addr();
    for path in ["/admin/stats", "/admin/connections", "/admin/log-level"] {
        let reply = server.http("GET", path, "");
        assert_eq!(reply.status, 401, "{path}");
        assert_eq!(reply.json()["error"]["code"], "unauthorized");
        let wrong = http_request(addr, "GET", path, &[("Authorization", "Bearer nope")], "");
        assert_eq!(wrong.status, 401, "{path}");
        let right = http_request(addr, "GET", path, &[("Authorization", "Bearer t0ken")], "");
        assert_eq!(right.status, 200, "{path}: {}", right.body);
    }
    for path in ["/livez", "/healthz", "/readyz", "/metrics"] {
        assert_eq!(server.http("GET", path, "").status, 200, "{path}");
    }
    let http = addr.to_string();
    let out = run_spool(&["stats", "--http", &http], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the server needs a token: set SPOOL_AUTH_TOKEN or --token"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let out = run_spool(
        &["stats", "--json", "--http", &http, "--token", "t0ken"],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_spool(
        &["conns", "--http", &http],
        &[("SPOOL_AUTH_TOKEN", "t0ken")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn cli_verbs_against_a_live_server() {
    let server = Server::start();
    wait_ready(&server);
    let mut worker = server.client();
    worker.expect("use cli-q\r\n", "USING cli-q\r\n");
    worker.expect("watch cli-q\r\n", "WATCHING 2\r\n");
    let id = worker.put(0, 0, 60, b"job");
    worker.put(0, 0, 60, b"job2");
    worker.reserve_now();
    let http = server.http_addr().to_string();
    let out = run_spool(
        &[
            "policy",
            "cli-q",
            "--set",
            "concurrency=4",
            "--set",
            "rate_per_s=50",
            "--set",
            "max_jobs=1000",
            "--http",
            &http,
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = run_spool(&["stats", "--json", "--http", &http], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stats --json is JSON");
    assert!(stats["queues"]
        .as_array()
        .unwrap()
        .iter()
        .any(|q| q["name"] == "cli-q" && q["reserved"] == 1));
    let policy = stats["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "cli-q")
        .map(|q| q["policy"].clone());
    assert_eq!(
        policy.as_ref().map(|p| (
            p["concurrency"].clone(),
            p["rate_per_s"].clone(),
            p["max_jobs"].clone(),
            p["ttr_ms"].clone()
        )),
        Some((
            serde_json::json!(4),
            serde_json::json!(50.0),
            serde_json::json!(1000),
            serde_json::Value::Null
        )),
        "{stats}"
    );

    let out = run_spool(&["stats", "--http", &http], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let header = format!("spool {}  pid", env!("CARGO_PKG_VERSION"));
    assert!(text.starts_with(&header), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("cli-q "))
        .unwrap_or_else(|| panic!("no cli-q row in:\n{text}"));
    // QUEUE READY RESERVED DELAYED BURIED WAITING PUTS ...
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        &cells[..7],
        ["cli-q", "1", "1", "0", "0", "0", "2"],
        "{row}"
    );
    // ... WAIT P99, SKEW P99 (no delayed job became ready: -), then the
    // policy: MAX JOBS CONCURRENCY RATE/S ATTEMPTS TTR RETENTION.
    assert_eq!(
        &cells[11..],
        ["-", "1000", "4", "50.0", "-", "-", "-"],
        "{row}"
    );
    assert!(
        text.contains("QUEUE") && text.contains("connections"),
        "{text}"
    );

    let out = run_spool(&["conns", "--http", &http], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("ID "), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("beanstalk") && l.contains("cli-q") && l.contains(&id.to_string())),
        "{text}"
    );
    let out = run_spool(&["conns", "--json", "--http", &http], &[]);
    let conns: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("conns --json is JSON");
    assert!(conns["connections"].as_array().unwrap().len() >= 2);

    let out = run_spool(&["top", "--iterations", "2", "--http", &http], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("PUT/S").count(), 2, "two refreshes:\n{text}");
    // Not a terminal: no screen clearing in the output.
    assert!(!text.contains('\x1b'), "{text:?}");
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("cli-q ")).collect();
    assert_eq!(rows.len(), 2, "{text}");
    // The second refresh has rates (numbers), the first has none yet.
    assert!(rows[0].split_whitespace().nth(1) == Some("-"), "{text}");
    assert!(
        rows[1]
            .split_whitespace()
            .nth(1)
            .is_some_and(|r| r.parse::<f64>().is_ok()),
        "{text}"
    );
}

#[test]
fn cli_says_so_when_the_server_is_unreachable() {
    let port = support::free_port();
    let http = format!("127.0.0.1:{port}");
    for verb in ["stats", "conns", "top", "queues"] {
        let out = run_spool(&[verb, "--http", &http], &[]);
        assert_eq!(out.status.code(), Some(1), "{verb}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{verb}: {stderr}");
        assert!(stderr.contains("cannot reach"), "{verb}: {stderr}");
        assert!(out.stdout.is_empty(), "{verb}");
    }
}

#[test]
fn wal_figures_are_published_with_durable_storage() {
    let dir = support::TempDir::new("ops-wal");
    let server = Server::start_durable(dir.path(), &[]);
    wait_ready(&server);
    let (_, before) = metrics(&server);
    for name in [
        "spool_wal_bytes",
        "spool_wal_segments",
        "spool_wal_commits_total",
        "spool_wal_fsyncs_total",
        "spool_wal_compactions_total",
        "spool_wal_fsync_seconds",
        "spool_wal_commit_batch_size",
    ] {
        assert!(
            before.types.contains_key(name),
            "{name} missing from /metrics"
        );
    }
    let mut client = server.client();
    for _ in 0..5 {
        client.put(0, 0, 60, b"durable");
    }
    let (_, after) = metrics(&server);
    let grew = |name: &str| after.value(name, &[]).unwrap() > before.value(name, &[]).unwrap();
    assert!(grew("spool_wal_commits_total"));
    assert!(
        grew("spool_wal_fsyncs_total"),
        "fsync always is the default"
    );
    assert!(grew("spool_wal_fsync_seconds_count"));
    assert!(grew("spool_wal_commit_batch_size_sum"));
    assert!(
        grew("spool_wal_bytes"),
        "the log's size follows its commits"
    );
    assert_eq!(after.value("spool_wal_failed", &[]), Some(0.0));
    let stats = server.http("GET", "/admin/stats", "").json();
    assert!(stats["wal"]["commits"].as_u64().unwrap() >= 5, "{stats}");
    assert!(stats["wal"]["segments"].as_u64().unwrap() >= 1, "{stats}");
    let out = run_spool(&["stats", "--http", &server.http_addr().to_string()], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("wal ") && l.contains("commits")),
        "{text}"
    );
}

// ---- the job verbs: spool put/get/cancel/kick/jobs/queues/purge/policy/pause/resume

/// Runs `spool ARGS --http ADDR` against `server`, with `input` on stdin.
fn spool_job_verb(server: &Server, args: &[&str], input: Option<&[u8]>) -> Output {
    let http = server.http_addr().to_string();
    let mut cmd = Command::new(support::spool_bin());
    support::clear_spool_env(&mut cmd);
    cmd.args(args)
        .args(["--http", &http])
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning spool");
    if let Some(input) = input {
        // Dropping stdin closes it: the verb reads to its end.
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input).expect("writing stdin");
    }
    support::wait_output(child, Duration::from_secs(10))
}

/// Runs a verb that must succeed; returns its stdout.
fn verb_ok(server: &Server, args: &[&str]) -> String {
    let out = spool_job_verb(server, args, None);
    assert!(
        out.status.success(),
        "spool {args:?}: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a verb with `--json` that must succeed; returns its JSON.
fn verb_json(server: &Server, args: &[&str]) -> serde_json::Value {
    let mut args = args.to_vec();
    args.push("--json");
    let text = verb_ok(server, &args);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("spool {args:?}: not JSON ({e}): {text}"))
}

/// Runs a verb that must fail with `code`; returns its stderr.
fn verb_fails(server: &Server, args: &[&str], code: i32) -> String {
    let out = spool_job_verb(server, args, None);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "spool {args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "spool {args:?} printed to stdout");
    stderr
}

fn job_id(job: &serde_json::Value) -> String {
    job["id"].as_u64().expect("a job id").to_string()
}

#[test]
fn put_and_get_json_and_bytes() {
    let server = Server::start();
    wait_ready(&server);

    // JSON goes as JSON, its text kept as given.
    let job = verb_json(
        &server,
        &[
            "put",
            r#"{"b": 1, "a": [1, 2]}"#,
            "--queue",
            "orders",
            "--priority",
            "7",
            "--ttr",
            "30s",
            "--max-attempts",
            "3",
            "--key",
            "order-1",
            "--header",
            "trace=abc",
            "--header",
            "tenant=t=1",
        ],
    );
    assert_eq!(job["queue"], "orders");
    assert_eq!(job["state"], "ready");
    assert_eq!(job["priority"], 7);
    assert_eq!(job["ttr_ms"], 30_000);
    assert_eq!(job["max_attempts"], 3);
    assert_eq!(job["idempotency_key"], "order-1");
    assert_eq!(
        job["headers"],
        serde_json::json!({"trace": "abc", "tenant": "t=1"})
    );
    assert_eq!(job["payload"], serde_json::json!({"b": 1, "a": [1, 2]}));
    let id = job_id(&job);
    assert_eq!(
        verb_ok(&server, &["get", &id]),
        "{\"b\": 1, \"a\": [1, 2]}\n"
    );
    let got = verb_json(&server, &["get", &id]);
    assert_eq!(got["id"], job["id"]);
    assert_eq!(got["state"], "ready");

    // The same key again: no new job.
    let line = verb_ok(&server, &["put", "{}", "-q", "orders", "--key", "order-1"]);
    assert!(
        line.starts_with(&format!("job {id} ready in orders")),
        "{line}"
    );
    assert!(line.contains("duplicate"), "{line}");

    // Anything not JSON goes as bytes, from stdin, and comes back the same.
    let bytes = b"not json \x00\xff\n".as_slice();
    let out = spool_job_verb(
        &server,
        &["put", "-q", "orders", "--delay", "1h"],
        Some(bytes),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(line.contains("delayed in orders"), "{line}");
    let id = line
        .split_whitespace()
        .nth(1)
        .expect("job <id> ...")
        .to_string();
    let out = spool_job_verb(&server, &["get", &id], None);
    assert!(out.status.success());
    assert_eq!(out.stdout, bytes);
    let got = verb_json(&server, &["get", &id]);
    assert_eq!(got["state"], "delayed");
    assert!(got["payload_base64"].is_string(), "{got}");
    // JSON on stdin is JSON.
    let out = spool_job_verb(&server, &["put", "--json"], Some(b"[1, 2]\n"));
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).expect("put --json");
    assert_eq!(job["payload"], serde_json::json!([1, 2]));
    assert_eq!(job["queue"], "default");
}

#[test]
fn get_wait_returns_a_settled_job_and_gives_up_on_a_running_one() {
    let server = Server::start();
    wait_ready(&server);
    let id = job_id(&verb_json(&server, &["put", "1", "-q", "w"]));
    // Still ready: --wait gives up at its timeout, exit 1 naming the state.
    let stderr = verb_fails(&server, &["get", &id, "--wait", "--timeout", "300ms"], 1);
    assert!(stderr.contains("still ready"), "{stderr}");

    let reserved = server
        .http("POST", "/v1/reserve", r#"{"queues":["w"],"timeout_ms":0}"#)
        .json();
    let lease = reserved["jobs"][0]["lease"].as_str().expect("a lease");
    let done = server.http(
        "POST",
        &format!("/v1/jobs/{id}/complete"),
        &format!(r#"{{"lease":"{lease}","result":{{"ok":true}}}}"#),
    );
    assert_eq!(done.status, 200, "{}", done.body);
    let job = verb_json(&server, &["get", &id, "--wait", "--timeout", "10s"]);
    assert_eq!(job["state"], "completed");
    assert_eq!(verb_ok(&server, &["get", &id, "--wait"]), "1\n");
}

#[test]
fn jobs_queues_cancel_kick_purge() {
    let server = Server::start();
    wait_ready(&server);
    let a = job_id(&verb_json(&server, &["put", r#"{"n":1}"#, "-q", "list"]));
    let b = job_id(&verb_json(&server, &["put", r#"{"n":2}"#, "-q", "list"]));
    let c = job_id(&verb_json(
        &server,
        &["put", "3", "-q", "list", "--delay", "1h"],
    ));

    let page = verb_json(&server, &["jobs", "list", "--state", "ready"]);
    let ids: Vec<String> = page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(job_id)
        .collect();
    assert_eq!(ids, [a.clone(), b.clone()]);
    let page = verb_json(&server, &["jobs", "list", "--limit", "1"]);
    assert_eq!(page["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(
        page["next"].as_u64().map(|n| n.to_string()),
        Some(a.clone())
    );
    let table = verb_ok(&server, &["jobs", "list"]);
    assert!(table.starts_with("ID "), "{table}");
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(
        rows[0].trim_start().starts_with(&format!("{a} ")),
        "{table}"
    );
    assert!(rows[0].contains(r#"{"n":1}"#), "{table}");
    let table = verb_ok(&server, &["jobs", "list", "--state", "delayed"]);
    assert!(
        table
            .lines()
            .any(|l| l.trim_start().starts_with(&format!("{c} "))),
        "{table}"
    );

    // Cancel; a second cancel is refused with the server's code and message.
    let line = verb_ok(&server, &["cancel", &a]);
    assert_eq!(line, format!("job {a} cancelled: cancelled\n"));
    let stderr = verb_fails(&server, &["cancel", &a], 1);
    assert!(stderr.contains("wrong_state"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let refused = server
        .http("POST", &format!("/v1/jobs/{a}/cancel"), "")
        .json();
    let message = refused["error"]["message"].as_str().expect("a message");
    assert!(stderr.contains(message), "{stderr} lacks {message:?}");

    // Kick a job buried through beanstalkd.
    let mut worker = server.client();
    worker.expect("watch list\r\n", "WATCHING 2\r\n");
    worker.expect("ignore default\r\n", "WATCHING 1\r\n");
    let (reserved, _) = worker.reserve_now();
    assert_eq!(reserved.to_string(), b);
    worker.expect(format!("bury {b} 0\r\n"), "BURIED\r\n");
    let page = verb_json(&server, &["jobs", "list", "--state", "buried"]);
    assert_eq!(
        page["jobs"][0]["id"].as_u64().map(|n| n.to_string()),
        Some(b.clone())
    );
    let job = verb_json(&server, &["kick", &b]);
    assert_eq!(job["state"], "ready");

    // Queues: counts by state.
    let queues = verb_json(&server, &["queues"]);
    let list = queues["queues"].as_array().unwrap();
    let q = list
        .iter()
        .find(|q| q["name"] == "list")
        .expect("queue list");
    assert_eq!(q["counts"]["ready"], 1);
    assert_eq!(q["counts"]["delayed"], 1);
    assert_eq!(q["counts"]["cancelled"], 1);
    let table = verb_ok(&server, &["queues"]);
    let row = table
        .lines()
        .find(|l| l.starts_with("list "))
        .unwrap_or_else(|| panic!("no row for list:\n{table}"));
    // QUEUE READY RESERVED DELAYED BURIED COMPLETED CANCELLED PAUSED
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cells,
        ["list", "1", "0", "1", "0", "0", "1", "no"],
        "{table}"
    );

    // Purge the delayed one.
    let line = verb_ok(&server, &["purge", "list", "--state", "delayed"]);
    assert_eq!(line, "deleted 1 delayed jobs from list\n");
    let purged = verb_json(&server, &["purge", "list", "--state", "delayed"]);
    assert_eq!(purged["deleted"], 0);
    let stderr = verb_fails(&server, &["get", &c], 1);
    assert!(stderr.contains("not_found"), "{stderr}");
}

#[test]
fn policy_and_pause() {
    let server = Server::start();
    wait_ready(&server);
    verb_json(&server, &["put", "1", "-q", "pq"]);
    let table = verb_ok(&server, &["policy", "pq"]);
    assert!(table.starts_with("KEY "), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().eq(["max_attempts", "default"])),
        "{table}"
    );

    let queue = verb_json(&server, &["policy", "pq", "--set", "max_attempts=3"]);
    assert_eq!(queue["policy"]["max_attempts"], 3);
    // A second --set keeps what the first set.
    verb_ok(
        &server,
        &[
            "policy",
            "pq",
            "--set",
            "ttr_ms=5000",
            "--set",
            "max_jobs=10",
        ],
    );
    let queue = verb_json(&server, &["policy", "pq"]);
    assert_eq!(queue["policy"]["max_attempts"], 3);
    assert_eq!(queue["policy"]["ttr_ms"], 5000);
    assert_eq!(queue["policy"]["max_jobs"], 10);
    let table = verb_ok(&server, &["policy", "pq"]);
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().eq(["ttr_ms", "5000"])),
        "{table}"
    );
    // null returns a key to its default.
    let queue = verb_json(&server, &["policy", "pq", "--set", "max_jobs=null"]);
    assert!(queue["policy"]["max_jobs"].is_null(), "{queue}");
    assert_eq!(queue["policy"]["max_attempts"], 3);
    // A key the server does not know: its refusal, exit 1.
    let stderr = verb_fails(&server, &["policy", "pq", "--set", "bogus=1"], 1);
    assert!(
        stderr.contains("invalid") && stderr.contains("bogus"),
        "{stderr}"
    );

    let queue = verb_json(&server, &["pause", "pq", "--duration", "1h"]);
    assert_eq!(queue["paused"], true);
    assert!(queue["paused_until"].is_string(), "{queue}");
    let line = verb_ok(&server, &["pause", "pq"]);
    assert_eq!(line, "queue pq paused: yes\n");
    let reserved = server
        .http("POST", "/v1/reserve", r#"{"queues":["pq"],"timeout_ms":0}"#)
        .json();
    assert_eq!(
        reserved["jobs"].as_array().map(Vec::len),
        Some(0),
        "{reserved}"
    );
    let row = verb_ok(&server, &["queues"]);
    assert!(
        row.lines()
            .any(|l| l.starts_with("pq ") && l.ends_with(" yes")),
        "{row}"
    );
    let line = verb_ok(&server, &["resume", "pq"]);
    assert_eq!(line, "queue pq paused: no\n");
    let queue = verb_json(&server, &["resume", "pq"]);
    assert_eq!(queue["paused"], false);
}

#[test]
fn job_verbs_bad_usage_exits_2_and_unknown_ids_exit_1() {
    let server = Server::start();
    wait_ready(&server);
    for args in [
        &["get", "abc"][..],
        &["get"],
        &["put", "1", "--priority", "high"],
        &["put", "1", "--delay", "soon"],
        &["put", "1", "--header", "novalue"],
        &["purge", "q"],
        &["get", "1", "--timeout", "1s"],
        &["policy", "q", "--set", "=1"],
        &["pause", "q", "--duration", "x"],
    ] {
        let stderr = verb_fails(&server, args, 2);
        assert!(!stderr.is_empty(), "{args:?}");
    }
    for verb in ["get", "cancel", "kick"] {
        let stderr = verb_fails(&server, &[verb, "999"], 1);
        assert!(
            stderr.contains("job 999") && stderr.contains("not_found"),
            "{verb}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{verb}: {stderr}");
    }
    // The server's refusal of a bad state, by its code.
    let stderr = verb_fails(&server, &["jobs", "q", "--state", "sleeping"], 1);
    assert!(
        stderr.contains("invalid") && stderr.contains("sleeping"),
        "{stderr}"
    );
}
