//! The HTTP job API (`/v1`, API.md) of a real `spool serve`: jobs shared
//! with beanstalkd clients, a long poll answered at SIGTERM, and a job's
//! attempts, version and result across a restart on the same log.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{HttpReply, Server, TempDir};

/// Bound on waiting for the server to settle into a state.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest wait a test's reserve asks for: below the test client's read
/// timeout, so a reserve that is never answered fails as a read error.
const RESERVE_WAIT_MS: u64 = 4_000;

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

fn post(server: &Server, path: &str, body: Value) -> HttpReply {
    server.http("POST", path, &body.to_string())
}

#[track_caller]
fn ok(reply: HttpReply, status: u16) -> Value {
    assert_eq!(reply.status, status, "{}", reply.body);
    reply.json()
}

/// Reserves one job of `queue`, waiting for it: (job, lease).
fn reserve(server: &Server, queue: &str) -> (Value, String) {
    let reply = post(
        server,
        "/v1/reserve",
        json!({"queues": [queue], "timeout_ms": RESERVE_WAIT_MS}),
    );
    let job = ok(reply, 200)["jobs"][0].clone();
    let lease = job["lease"]
        .as_str()
        .unwrap_or_else(|| panic!("a job within the wait: {job}"))
        .to_string();
    (job, lease)
}

#[test]
fn beanstalkd_and_http_clients_work_the_same_jobs() {
    let server = Server::start();
    wait_ready(&server);
    let mut c = server.client();
    // Put over beanstalkd, worked over HTTP.
    c.expect("use mixed\r\n", "USING mixed\r\n");
    c.expect("put 3 0 60 5\r\nhello\r\n", "INSERTED 1\r\n");
    let (job, lease) = reserve(&server, "mixed");
    assert_eq!(
        (
            job["id"].clone(),
            job["payload_base64"].clone(),
            job["priority"].clone()
        ),
        (json!(1), json!("aGVsbG8="), json!(3))
    );
    let done = ok(
        post(
            &server,
            "/v1/jobs/1/complete",
            json!({"lease": lease, "result": {"ok": true}}),
        ),
        200,
    );
    assert_eq!(done["state"], "completed");
    c.expect("peek 1\r\n", "NOT_FOUND\r\n");

    // Enqueued over HTTP, worked over beanstalkd: the body is the JSON text.
    let made = ok(
        post(
            &server,
            "/v1/queues/mixed/jobs",
            json!({"payload": {"a": 1}}),
        ),
        201,
    );
    assert_eq!(made["id"], 2);
    c.expect("watch mixed\r\n", "WATCHING 2\r\n");
    c.expect(
        "reserve-with-timeout 0\r\n",
        "RESERVED 2 7\r\n{\"a\":1}\r\n",
    );
    assert_eq!(
        ok(server.http("GET", "/v1/jobs/2", ""), 200)["state"],
        "reserved"
    );
    c.expect("delete 2\r\n", "DELETED\r\n");
    let gone = server.http("GET", "/v1/jobs/2", "");
    assert_eq!(gone.status, 404, "{}", gone.body);

    // Cancelled over HTTP while a beanstalkd worker holds it.
    ok(
        post(&server, "/v1/queues/mixed/jobs", json!({"payload": 3})),
        201,
    );
    c.expect("reserve-with-timeout 0\r\n", "RESERVED 3 1\r\n3\r\n");
    let cancelled = ok(post(&server, "/v1/jobs/3/cancel", json!({})), 200);
    assert_eq!(cancelled["state"], "cancelled");
    c.expect("touch 3\r\n", "NOT_FOUND\r\n");
    c.expect("delete 3\r\n", "NOT_FOUND\r\n");
}

#[test]
fn sigterm_answers_a_long_poll_with_an_empty_list() {
    let mut server = Server::start();
    wait_ready(&server);
    let addr = server.http_addr();
    let waiting = std::thread::spawn(move || {
        support::http_request(
            addr,
            "POST",
            "/v1/reserve",
            &[],
            &json!({"queues": ["nothing"], "timeout_ms": 30_000}).to_string(),
        )
    });
    wait_until("the reserve to be in flight", || {
        let conns = server.http("GET", "/admin/connections", "").json();
        conns["connections"]
            .as_array()
            .is_some_and(|list| list.iter().any(|c| c["command"] == "POST /v1/reserve"))
    });
    server.signal("TERM");
    // Answered at the drain, long before its 30 s (the client gives up
    // after a few seconds, which would fail the test).
    let reply = waiting.join().expect("the reserve's answer");
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json(), json!({"jobs": []}));
    let status = server.wait_exit(SETTLE_TIMEOUT).expect("the server exits");
    assert!(status.success(), "{status}");
}

#[test]
fn http_jobs_keep_attempts_version_and_result_across_a_restart() {
    let dir = TempDir::new("jobs-api-restart");
    let mut server = Server::start_durable(dir.path(), &[]);
    wait_ready(&server);
    let made = ok(
        post(
            &server,
            "/v1/queues/keep/jobs",
            json!({"payload": {"n": 1}, "headers": {"trace": "t1"}, "max_attempts": 5,
                   "idempotency_key": "once"}),
        ),
        201,
    );
    let id = made["id"].as_u64().unwrap();
    // One failed attempt, retried at once, then completed with a result.
    let (_, lease) = reserve(&server, "keep");
    let failed = ok(
        post(
            &server,
            &format!("/v1/jobs/{id}/fail"),
            json!({"lease": lease, "error": "first try", "retry_in_ms": 0}),
        ),
        200,
    );
    assert_eq!(failed["attempts"], 1);
    let (again, lease) = reserve(&server, "keep");
    assert_eq!(again["id"], id);
    let done = ok(
        post(
            &server,
            &format!("/v1/jobs/{id}/complete"),
            json!({"lease": lease, "result": {"total": 42}}),
        ),
        200,
    );
    // A second job left delayed after a failed attempt.
    let other = ok(
        post(
            &server,
            "/v1/queues/keep/jobs",
            json!({"payload_base64": "AAE="}),
        ),
        201,
    );
    let other_id = other["id"].as_u64().unwrap();
    let (_, lease) = reserve(&server, "keep");
    let delayed = ok(
        post(
            &server,
            &format!("/v1/jobs/{other_id}/fail"),
            json!({"lease": lease, "error": "later", "retry_in_ms": 3_600_000}),
        ),
        200,
    );
    assert_eq!(delayed["state"], "delayed");

    server.signal("TERM");
    let status = server.wait_exit(SETTLE_TIMEOUT).expect("the server exits");
    assert!(status.success(), "{status}");
    let server = Server::start_durable(dir.path(), &[]);
    wait_ready(&server);

    let reply = server.http("GET", &format!("/v1/jobs/{id}"), "");
    assert_eq!(
        reply.header("etag"),
        Some(format!("\"{}\"", done["version"]).as_str())
    );
    let after = ok(reply, 200);
    assert_eq!(after, done, "the completed job, field for field");
    assert_eq!(
        (
            after["attempts"].clone(),
            after["result"].clone(),
            after["version"].clone()
        ),
        (json!(1), json!({"total": 42}), done["version"].clone())
    );
    let after = ok(server.http("GET", &format!("/v1/jobs/{other_id}"), ""), 200);
    assert_eq!(after, delayed, "the delayed job, field for field");
    // The idempotency key survives too.
    let dup = ok(
        post(
            &server,
            "/v1/queues/keep/jobs",
            json!({"payload": 2, "idempotency_key": "once"}),
        ),
        200,
    );
    assert_eq!(
        (dup["id"].clone(), dup["duplicate"].clone()),
        (json!(id), json!(true))
    );
}

/// A queue's `concurrency` bounds the leases held at once, whoever competes
/// for them: 64 workers, each counting a lease from its reserve's answer
/// until just before its complete is sent, so the count the test sees is
/// never above what the server handed out at that moment. Counted, not
/// timed: any interleaving that breaks the bound fails.
#[test]
fn concurrency_is_never_exceeded_by_64_competing_workers() {
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

    const CONCURRENCY: u64 = 3;
    const WORKERS: usize = 64;
    const JOBS: u64 = 400;
    // A hang guard only: the test fails if the jobs are not all done by
    // then, it asserts nothing about speed.
    const RUN_TIMEOUT: Duration = Duration::from_secs(120);

    let server = Server::start();
    wait_ready(&server);
    ok(
        server.http(
            "PUT",
            "/v1/queues/limited/policy",
            &json!({"concurrency": CONCURRENCY}).to_string(),
        ),
        200,
    );
    let jobs: Vec<Value> = (0..JOBS).map(|i| json!({"payload": i})).collect();
    ok(
        post(
            &server,
            "/v1/queues/limited/jobs/batch",
            json!({"jobs": jobs}),
        ),
        201,
    );

    let held = AtomicU64::new(0);
    let max_held = AtomicU64::new(0);
    let completed = AtomicU64::new(0);
    let deadline = Instant::now() + RUN_TIMEOUT;
    std::thread::scope(|scope| {
        for _ in 0..WORKERS {
            scope.spawn(|| {
                while completed.load(SeqCst) < JOBS {
                    assert!(Instant::now() < deadline, "the jobs were not all done");
                    let reply = post(
                        &server,
                        "/v1/reserve",
                        json!({"queues": ["limited"], "timeout_ms": 200, "batch": 2}),
                    );
                    let leased = ok(reply, 200)["jobs"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    let n = leased.len() as u64;
                    let now = held.fetch_add(n, SeqCst) + n;
                    max_held.fetch_max(now, SeqCst);
                    for job in leased {
                        std::thread::yield_now();
                        held.fetch_sub(1, SeqCst);
                        let id = &job["id"];
                        ok(
                            post(
                                &server,
                                &format!("/v1/jobs/{id}/complete"),
                                json!({"lease": job["lease"]}),
                            ),
                            200,
                        );
                        completed.fetch_add(1, SeqCst);
                    }
                }
            });
        }
    });
    assert_eq!(completed.load(SeqCst), JOBS);
    let max = max_held.load(SeqCst);
    assert!(
        (1..=CONCURRENCY).contains(&max),
        "{max} leases held at once under concurrency {CONCURRENCY}"
    );
    let queue = ok(server.http("GET", "/v1/queues/limited", ""), 200);
    assert_eq!(queue["counts"]["completed"], json!(JOBS), "{queue}");
}
