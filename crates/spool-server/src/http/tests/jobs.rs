//! The job API (`/v1`) over real HTTP against a local broker on a manual
//! clock: every endpoint, every error code, versions, long polls, and jobs
//! shared with beanstalkd sessions. Time moves only when a test advances
//! the clock; waits are bounded loops, never timed assertions.

use serde_json::{json, Value};

use super::*;
use crate::limits::JOB_WAITS_MAX;
use crate::manual_engine_clock;
use spool_engine::SnapshotScope;

/// Engine time the tests start at: 2026-12-04T00:00:00Z.
const START_NS: u64 = 218_505_600_000_000_000;
const START_AT: &str = "2026-12-04T00:00:00Z";
const NS_PER_MS: u64 = 1_000_000;

/// A server with a broker on a manual clock.
async fn started(max_job_size: u32, limits: HttpLimits) -> (TestServer, LocalBroker) {
    let server = TestServer::start_with(None, limits, max_job_size).await;
    let engine = Engine::new(EngineConfig { max_job_size });
    let broker = LocalBroker::start(
        engine,
        manual_engine_clock(START_NS),
        None,
        ProcessInfo::new("test"),
    );
    server.state.set_broker(broker.clone());
    (server, broker)
}

async fn server() -> (TestServer, LocalBroker) {
    started(1 << 16, HttpLimits::default()).await
}

impl TestServer {
    async fn send(&self, method: &str, path: &str, body: &Value) -> Reply {
        self.request(method, path, &[], &body.to_string()).await
    }

    async fn post(&self, path: &str, body: Value) -> Reply {
        self.send("POST", path, &body).await
    }

    async fn enqueue(&self, queue: &str, body: Value) -> Value {
        let reply = self.post(&format!("/v1/queues/{queue}/jobs"), body).await;
        assert_eq!(reply.status, 201, "{}", reply.body);
        reply.json()
    }

    /// Reserves one job of `queue` without waiting: (job, lease).
    async fn reserve_one(&self, queue: &str) -> (Value, String) {
        let reply = self
            .post("/v1/reserve", json!({"queues": [queue], "timeout_ms": 0}))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let job = reply.json()["jobs"][0].clone();
        let lease = job["lease"].as_str().expect("a lease").to_string();
        (job, lease)
    }
}

/// Asserts an error answer: status, code, and the field it names.
#[track_caller]
fn assert_error(reply: &Reply, status: u16, code: &str, field: Option<&str>) {
    assert_eq!(reply.status, status, "{}", reply.body);
    assert!(
        reply
            .head
            .to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{}",
        reply.head
    );
    let error = &reply.json()["error"];
    assert_eq!(error["code"], code, "{}", reply.body);
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(error["field"].as_str(), field, "{}", reply.body);
}

fn etag(reply: &Reply) -> String {
    reply.header("etag").expect("an ETag").to_string()
}

/// Runs beanstalkd requests on a session and collects one reply each.
async fn beanstalkd(session: &mut crate::LocalSession, requests: Vec<Request>) -> Vec<Response> {
    let expected = requests.len();
    session.submit(requests).unwrap();
    let mut replies = Vec::new();
    tokio::time::timeout(EXCHANGE_TIMEOUT, async {
        while replies.len() < expected {
            std::future::poll_fn(|cx| session.poll_recv(cx, &mut replies)).await;
        }
    })
    .await
    .expect("replies from the broker");
    replies
}

fn tube(name: &str) -> TubeName {
    TubeName::new(name.as_bytes()).unwrap()
}

fn put(body: &'static [u8]) -> Request {
    Request::Put(Put {
        pri: 5,
        delay_secs: 0,
        ttr_secs: 60,
        body: PutBody::Complete(bytes::Bytes::from_static(body)),
    })
}

/// Waits (bounded) until an HTTP request for `command` is being handled.
async fn wait_in_flight(server: &TestServer, command: &str) {
    tokio::time::timeout(EXCHANGE_TIMEOUT, async {
        while !server
            .connections
            .list()
            .iter()
            .any(|c| c.command == Some(command))
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{command} in flight"));
}

#[tokio::test]
async fn enqueue_and_get_show_the_job_as_api_md_does() {
    let (server, _broker) = server().await;
    let reply = server
        .post(
            "/v1/queues/orders/jobs",
            json!({
                "payload": {"order": 42},
                "headers": {"trace": "abc"},
                "idempotency_key": "order-42-cancel",
            }),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let job = reply.json();
    assert_eq!(reply.header("location"), Some("/v1/jobs/1"));
    assert_eq!(etag(&reply), format!("\"{}\"", job["version"]));
    let expected = json!({
        "id": 1, "queue": "orders", "state": "ready", "priority": 1024,
        "payload": {"order": 42}, "headers": {"trace": "abc"},
        "attempts": 0, "max_attempts": 25,
        "backoff": {"initial_ms": 1000, "max_ms": 3600000, "multiplier": 2.0, "jitter": 0.2},
        "ttr_ms": 60000, "run_at": null, "deadline_at": null,
        "created_at": START_AT, "updated_at": START_AT, "finished_at": null,
        "last_error": null, "result": null, "idempotency_key": "order-42-cancel",
        "cancel_requested": false, "version": job["version"], "duplicate": false,
    });
    assert_eq!(job, expected);

    let got = server.get("/v1/jobs/1").await;
    assert_eq!(got.status, 200);
    assert_eq!(etag(&got), etag(&reply));
    let mut without_duplicate = expected.clone();
    without_duplicate
        .as_object_mut()
        .unwrap()
        .remove("duplicate");
    assert_eq!(got.json(), without_duplicate);

    // A JSON payload is kept as the text sent: key order, spacing, numbers.
    let text = r#"{"payload": {"b":1, "a":[1.50, 2]}}"#;
    let reply = server
        .request("POST", "/v1/queues/orders/jobs", &[], text)
        .await;
    assert_eq!(reply.status, 201);
    assert!(
        reply.body.contains(r#""payload":{"b":1, "a":[1.50, 2]}"#),
        "{}",
        reply.body
    );
    // null is a payload too.
    let job = server.enqueue("orders", json!({"payload": null})).await;
    assert_eq!(job["payload"], Value::Null);
    assert!(job.as_object().unwrap().contains_key("payload"));

    // Bytes that are not JSON come back as base64.
    let job = server
        .enqueue("orders", json!({"payload_base64": "aGVsbG8="}))
        .await;
    assert_eq!(job["payload_base64"], "aGVsbG8=");
    assert!(job.get("payload").is_none());
    // Bytes that are JSON text come back as JSON.
    let job = server
        .enqueue("orders", json!({"payload_base64": "WzEsMl0"}))
        .await;
    assert_eq!(job["payload"], json!([1, 2]));

    // Options, and a delay given as delay_ms or as an RFC 3339 run_at.
    let job = server
        .enqueue(
            "later",
            json!({
                "payload": 1, "priority": 7, "ttr_ms": 5000, "max_attempts": 3,
                "backoff": {"initial_ms": 10}, "delay_ms": 1500,
            }),
        )
        .await;
    assert_eq!(
        (
            job["state"].clone(),
            job["priority"].clone(),
            job["ttr_ms"].clone(),
            job["max_attempts"].clone(),
            job["backoff"]["initial_ms"].clone(),
            job["backoff"]["multiplier"].clone(),
            job["run_at"].clone(),
        ),
        (
            json!("delayed"),
            json!(7),
            json!(5000),
            json!(3),
            json!(10),
            json!(2.0),
            json!("2026-12-04T00:00:01.500Z"),
        )
    );
    let job = server
        .enqueue(
            "later",
            json!({"payload": 2, "run_at": "2026-12-04T01:00:00+01:00"}),
        )
        .await;
    assert_eq!(job["state"], "ready", "an instant in the past means now");
    let job = server
        .enqueue(
            "later",
            json!({"payload": 3, "run_at": "2026-12-04T00:00:02Z"}),
        )
        .await;
    assert_eq!(
        (job["state"].clone(), job["run_at"].clone()),
        (json!("delayed"), json!("2026-12-04T00:00:02Z"))
    );
    server.stop().await;
}

#[tokio::test]
async fn delayed_jobs_become_ready_with_the_clock() {
    let (server, broker) = server().await;
    let job = server
        .enqueue("d", json!({"payload": 1, "delay_ms": 1000}))
        .await;
    let path = format!("/v1/jobs/{}", job["id"]);
    broker.advance_clock(1000 * NS_PER_MS);
    let now = server.get(&path).await;
    assert_eq!(now.json()["state"], "ready");
    assert_ne!(
        etag(&now),
        format!("\"{}\"", job["version"]),
        "a timed change"
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_input_gets_400_naming_the_field() {
    let (server, _broker) = server().await;
    let job = server.enqueue("q", json!({"payload": 1})).await;
    let other = server.enqueue("q", json!({"payload": 2})).await;
    let (_, lease) = server.reserve_one("q").await;
    assert!(lease.starts_with(&format!("{}-", job["id"])));
    let id = job["id"].as_u64().unwrap();
    let heartbeat = format!("/v1/jobs/{}/heartbeat", other["id"]);
    let cases: Vec<(&str, String, String, &str)> = vec![
        (
            "POST",
            "/v1/queues/q/jobs".into(),
            r#"{"payload":1,"priority":-1}"#.into(),
            "priority",
        ),
        (
            "POST",
            "/v1/queues/q/jobs".into(),
            r#"{"payload":1,"priority":"high"}"#.into(),
            "priority",
        ),
        (
            "POST",
            "/v1/queues/q/jobs".into(),
            r#"{"payload":1,"delay":5}"#.into(),
            "delay",
        ),
        ("POST", "/v1/queues/q/jobs".into(), "{}".into(), "payload"),
        ("POST", "/v1/queues/q/jobs".into(), "".into(), "payload"),
        (
            "POST",
            "/v1/queues/q/jobs".into(),
            r#"{"payload":1,"payload_base64":"AA=="}"#.into(),
            "payload_base64",
        ),
        (
            "POST",
            "/v1/queues/q/jobs".into(),
            r#"{"payload_base64":"!!"}"#.into(),
            "payload_base64",
        ),
        (
            "POST",
            "/v1/queues/q/jobs".into(),
            r#"{"payload":1,"run_at":"tomorrow"}"#.into(),
            "run_at",
        ),
        (
            "POST",
            "/v1/queues/q/jobs".into(),
            r#"{"payload":1,"run_at":"2026-12-04T00:00:00Z","delay_ms":1}"#.into(),
            "run_at",
        ),
        (
            "POST",
            "/v1/queues/q/jobs".into(),
            r#"{"payload":1,"headers":{"a":1}}"#.into(),
            "headers.a",
        ),
        (
            "POST",
            "/v1/queues/q/jobs".into(),
            r#"{"payload":1,"backoff":{"multiplier":0.5}}"#.into(),
            "backoff.multiplier",
        ),
        (
            "POST",
            "/v1/queues/q/jobs".into(),
            r#"{"payload":1,"backoff":{"factor":2}}"#.into(),
            "backoff.factor",
        ),
        (
            "POST",
            "/v1/queues/q/jobs".into(),
            r#"{"payload":1,"idempotency_key":""}"#.into(),
            "idempotency_key",
        ),
        (
            "POST",
            "/v1/queues/q/jobs".into(),
            r#"{"payload":1,"delay_ms":99999999999999}"#.into(),
            "delay_ms",
        ),
        (
            "POST",
            "/v1/queues/q/jobs".into(),
            r#"{"payload": }"#.into(),
            "payload",
        ),
        (
            "POST",
            "/v1/queues/q/jobs?wait_ms=30001".into(),
            r#"{"payload":1}"#.into(),
            "wait_ms",
        ),
        (
            "POST",
            "/v1/queues/-bad/jobs".into(),
            r#"{"payload":1}"#.into(),
            "queue",
        ),
        (
            "POST",
            "/v1/queues/a%20b/jobs".into(),
            r#"{"payload":1}"#.into(),
            "queue",
        ),
        (
            "POST",
            "/v1/queues/q/jobs/batch".into(),
            r#"{"jobs":[{"payload":1},{"payload":1,"priority":"x"}]}"#.into(),
            "jobs[1].priority",
        ),
        (
            "POST",
            "/v1/queues/q/jobs/batch".into(),
            r#"{"jobs":[{"payload":1},{}]}"#.into(),
            "jobs[1].payload",
        ),
        (
            "POST",
            "/v1/queues/q/jobs/batch".into(),
            r#"{"jobs":[{"payload":1,"run_at":"x"}]}"#.into(),
            "jobs[0].run_at",
        ),
        (
            "POST",
            "/v1/queues/q/jobs/batch".into(),
            "{}".into(),
            "jobs",
        ),
        ("GET", "/v1/jobs/abc".into(), "".into(), "id"),
        ("GET", "/v1/jobs/-1".into(), "".into(), "id"),
        (
            "GET",
            format!("/v1/jobs/{id}?wait_ms=x"),
            "".into(),
            "wait_ms",
        ),
        (
            "PATCH",
            format!("/v1/jobs/{}", other["id"]),
            r#"{"state":"ready"}"#.into(),
            "state",
        ),
        (
            "PATCH",
            format!("/v1/jobs/{}", other["id"]),
            r#"{"max_attempts":1.5}"#.into(),
            "max_attempts",
        ),
        (
            "POST",
            "/v1/reserve".into(),
            r#"{"queues":["q"],"timeout_ms":30001}"#.into(),
            "timeout_ms",
        ),
        ("POST", "/v1/reserve".into(), "{}".into(), "queues"),
        (
            "POST",
            "/v1/reserve".into(),
            r#"{"queues":[]}"#.into(),
            "queues",
        ),
        (
            "POST",
            "/v1/reserve".into(),
            r#"{"queues":["ok","-no"]}"#.into(),
            "queues[1]",
        ),
        (
            "POST",
            "/v1/reserve".into(),
            r#"{"queues":["q"],"batch":0}"#.into(),
            "batch",
        ),
        (
            "POST",
            "/v1/reserve".into(),
            r#"{"queues":"q"}"#.into(),
            "queues",
        ),
        (
            "POST",
            heartbeat.clone(),
            r#"{"lease":"nope"}"#.into(),
            "lease",
        ),
        (
            "POST",
            heartbeat.clone(),
            json!({"lease": lease}).to_string(),
            "lease",
        ),
        ("POST", heartbeat.clone(), "{}".into(), "lease"),
        (
            "POST",
            format!("/v1/jobs/{id}/fail"),
            json!({"lease": lease}).to_string(),
            "error",
        ),
        (
            "POST",
            format!("/v1/jobs/{id}/complete"),
            json!({"lease": lease, "result": 1, "result_base64": ""}).to_string(),
            "result_base64",
        ),
        (
            "POST",
            format!("/v1/jobs/{id}/kick"),
            r#"{"force":true}"#.into(),
            "force",
        ),
        (
            "GET",
            "/v1/queues/q/jobs?state=nope".into(),
            "".into(),
            "state",
        ),
        (
            "GET",
            "/v1/queues/q/jobs?limit=x".into(),
            "".into(),
            "limit",
        ),
        (
            "GET",
            "/v1/queues/q/jobs?limit=0".into(),
            "".into(),
            "limit",
        ),
        (
            "GET",
            "/v1/queues/q/jobs?after=-3".into(),
            "".into(),
            "after",
        ),
        (
            "GET",
            "/v1/queues/q/jobs?bogus=1".into(),
            "".into(),
            "bogus",
        ),
        (
            "GET",
            "/v1/queues/q/jobs?limit=1&limit=2".into(),
            "".into(),
            "limit",
        ),
        ("DELETE", "/v1/queues/q/jobs".into(), "".into(), "state"),
        (
            "DELETE",
            "/v1/queues/q/jobs?state=reserved".into(),
            "".into(),
            "state",
        ),
        (
            "PUT",
            "/v1/queues/q/policy".into(),
            r#"{"concurrency":0}"#.into(),
            "concurrency",
        ),
        (
            "PUT",
            "/v1/queues/q/policy".into(),
            r#"{"rate_per_s":0}"#.into(),
            "rate_per_s",
        ),
        (
            "PUT",
            "/v1/queues/q/policy".into(),
            r#"{"rate_per_s":1e9}"#.into(),
            "rate_per_s",
        ),
        (
            "PUT",
            "/v1/queues/q/policy".into(),
            r#"{"concurrency":-1}"#.into(),
            "concurrency",
        ),
        (
            "PUT",
            "/v1/queues/q/policy".into(),
            r#"{"max_jobs":"many"}"#.into(),
            "max_jobs",
        ),
        (
            "PUT",
            "/v1/queues/q/policy".into(),
            r#"{"backoff":{"jitter":2}}"#.into(),
            "backoff.jitter",
        ),
        (
            "POST",
            "/v1/queues/q/pause".into(),
            r#"{"duration_ms":-1}"#.into(),
            "duration_ms",
        ),
    ];
    for (method, path, body, field) in cases {
        let reply = server.request(method, &path, &[], &body).await;
        assert_eq!(reply.status, 400, "{method} {path} {body}: {}", reply.body);
        let error = &reply.json()["error"];
        assert_eq!(
            (error["code"].as_str(), error["field"].as_str()),
            (Some("invalid"), Some(field)),
            "{method} {path} {body}: {}",
            reply.body
        );
    }
    let reply = server
        .request("POST", "/v1/queues/q/policy", &[], r#"{"concurrency":2}"#)
        .await;
    assert_eq!(reply.status, 405, "{}", reply.body);
    // The dispatch limits are taken and shown.
    let reply = server
        .send(
            "PUT",
            "/v1/queues/q/policy",
            &json!({"rate_per_s": 2.5, "concurrency": 3}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = server.request("GET", "/v1/queues/q", &[], "").await;
    let policy = &reply.json()["policy"];
    assert_eq!(
        (
            policy["concurrency"].as_u64(),
            policy["rate_per_s"].as_f64()
        ),
        (Some(3), Some(2.5)),
        "{}",
        reply.body
    );
    // Not JSON at all: 400, no field to name.
    for body in ["[1]", "nope", r#"{"payload":1} trailing"#] {
        let reply = server.request("POST", "/v1/queues/q/jobs", &[], body).await;
        assert_eq!(
            (reply.status, reply.error_code()),
            (400, "invalid".to_string()),
            "{body}"
        );
    }
    // If-Match that is no version.
    let reply = server
        .request(
            "DELETE",
            &format!("/v1/jobs/{}", other["id"]),
            &[("If-Match", "abc")],
            "",
        )
        .await;
    assert_error(&reply, 400, "invalid", Some("If-Match"));
    server.stop().await;
}

#[tokio::test]
async fn workers_reserve_heartbeat_complete_fail_release_bury_and_kick() {
    let (server, broker) = server().await;
    for (payload, priority) in [("low", 10), ("high", 1), ("mid", 5)] {
        server
            .enqueue(
                "w",
                json!({"payload": payload, "priority": priority, "max_attempts": 2,
                       "backoff": {"initial_ms": 1000, "jitter": 0}}),
            )
            .await;
    }
    let reply = server
        .post("/v1/reserve", json!({"queues": ["w", "other"], "batch": 2}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let jobs = reply.json()["jobs"].as_array().unwrap().clone();
    let payloads: Vec<&Value> = jobs.iter().map(|j| &j["payload"]).collect();
    assert_eq!(payloads, [&json!("high"), &json!("mid")]);
    let (high, mid) = (&jobs[0], &jobs[1]);
    assert_eq!(high["state"], "reserved");
    assert_eq!(high["deadline_at"], "2026-12-04T00:01:00Z");
    let lease = |job: &Value| job["lease"].as_str().unwrap().to_string();
    let job_path = |job: &Value, action: &str| format!("/v1/jobs/{}/{action}", job["id"]);

    broker.advance_clock(10_000 * NS_PER_MS);
    let reply = server
        .post(&job_path(high, "heartbeat"), json!({"lease": lease(high)}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json(), json!({"deadline_at": "2026-12-04T00:01:10Z"}));

    // Complete with a JSON result, and one of raw bytes.
    let reply = server
        .post(
            &job_path(high, "complete"),
            json!({"lease": lease(high), "result": {"ok": true}}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let done = reply.json();
    assert_eq!(etag(&reply), format!("\"{}\"", done["version"]));
    assert_eq!(
        (
            done["state"].clone(),
            done["result"].clone(),
            done["finished_at"].clone()
        ),
        (
            json!("completed"),
            json!({"ok": true}),
            json!("2026-12-04T00:00:10Z")
        )
    );

    // A failed attempt: delayed by the backoff, then buried when used up.
    let reply = server
        .post(
            &job_path(mid, "fail"),
            json!({"lease": lease(mid), "error": "boom"}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let failed = reply.json();
    assert_eq!(
        (
            failed["state"].clone(),
            failed["attempts"].clone(),
            failed["last_error"].clone(),
            failed["run_at"].clone()
        ),
        (
            json!("delayed"),
            json!(1),
            json!("boom"),
            json!("2026-12-04T00:00:11Z")
        )
    );
    broker.advance_clock(1000 * NS_PER_MS);
    let (again, lease2) = server.reserve_one("w").await;
    assert_eq!(again["id"], mid["id"]);
    let reply = server
        .post(
            &job_path(mid, "fail"),
            json!({"lease": lease2, "error": "boom again"}),
        )
        .await;
    assert_eq!(reply.json()["state"], "buried");
    assert_eq!(reply.json()["attempts"], 2);
    let reply = server.post(&job_path(mid, "kick"), json!({})).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["state"], "ready");

    // The kicked job (now the most urgent) again. Release: back to ready
    // (or delayed), not an attempt.
    let (job, lease3) = server.reserve_one("w").await;
    let reply = server
        .post(
            &job_path(&job, "release"),
            json!({"lease": lease3, "delay_ms": 500, "priority": 0}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let released = reply.json();
    assert_eq!(
        (
            released["state"].clone(),
            released["priority"].clone(),
            released["attempts"].clone()
        ),
        (json!("delayed"), json!(0), job["attempts"].clone())
    );
    // Kick a delayed job; bury by hand, with and without a lease.
    let reply = server
        .request("POST", &job_path(&job, "kick"), &[], "")
        .await;
    assert_eq!(reply.json()["state"], "ready");
    let reply = server
        .post(&job_path(&job, "bury"), json!({"reason": "by hand"}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["state"], "buried");
    server.post(&job_path(&job, "kick"), json!({})).await;
    let (job, lease4) = server.reserve_one("w").await;
    let reply = server
        .post(&job_path(&job, "bury"), json!({"lease": lease4}))
        .await;
    assert_eq!(reply.json()["state"], "buried");
    // A permanent failure buries at once; a result of bytes shows as base64.
    server.post(&job_path(&job, "kick"), json!({})).await;
    let (job, lease5) = server.reserve_one("w").await;
    let reply = server
        .post(
            &job_path(&job, "fail"),
            json!({"lease": lease5, "error": "bad input", "permanent": true}),
        )
        .await;
    assert_eq!(reply.json()["state"], "buried");
    server.post(&job_path(&job, "kick"), json!({})).await;
    let (job, lease6) = server.reserve_one("w").await;
    let reply = server
        .post(
            &job_path(&job, "complete"),
            json!({"lease": lease6, "result_base64": "/w=="}),
        )
        .await;
    let done = reply.json();
    assert_eq!(done["result_base64"], "/w==");
    assert!(done.get("result").is_none());
    server.stop().await;
}

#[tokio::test]
async fn conflicts_answer_409_with_their_code() {
    let (server, broker) = server().await;
    // wrong_state: a reserved job is not deleted (cancel it) nor changed.
    let job = server.enqueue("c", json!({"payload": 1})).await;
    let path = format!("/v1/jobs/{}", job["id"]);
    let (_, lease) = server.reserve_one("c").await;
    let reply = server.request("DELETE", &path, &[], "").await;
    assert_error(&reply, 409, "wrong_state", None);
    let reply = server.send("PATCH", &path, &json!({"priority": 1})).await;
    assert_error(&reply, 409, "wrong_state", None);
    let reply = server.post(&format!("{path}/kick"), json!({})).await;
    assert_error(&reply, 409, "wrong_state", None);

    // cancelled: the worker learns it at its next heartbeat or complete.
    let reply = server.post(&format!("{path}/cancel"), json!({})).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let cancelled = reply.json();
    assert_eq!(
        (
            cancelled["state"].clone(),
            cancelled["cancel_requested"].clone()
        ),
        (json!("cancelled"), json!(true))
    );
    for action in ["heartbeat", "complete", "release"] {
        let reply = server
            .post(&format!("{path}/{action}"), json!({"lease": lease}))
            .await;
        assert_error(&reply, 409, "cancelled", None);
    }
    let reply = server
        .post(
            &format!("{path}/fail"),
            json!({"lease": lease, "error": "x"}),
        )
        .await;
    assert_error(&reply, 409, "cancelled", None);
    let reply = server.post(&format!("{path}/cancel"), json!({})).await;
    assert_error(&reply, 409, "wrong_state", None);

    // lease_expired: released, then the old lease is used.
    let job = server.enqueue("c", json!({"payload": 2})).await;
    let path = format!("/v1/jobs/{}", job["id"]);
    let (_, lease) = server.reserve_one("c").await;
    server
        .post(&format!("{path}/release"), json!({"lease": lease}))
        .await;
    let reply = server
        .post(&format!("{path}/heartbeat"), json!({"lease": lease}))
        .await;
    assert_error(&reply, 409, "lease_expired", None);
    // ... and by its TTR running out (a failed attempt).
    let (_, lease) = server.reserve_one("c").await;
    broker.advance_clock(61_000 * NS_PER_MS);
    let reply = server
        .post(&format!("{path}/complete"), json!({"lease": lease}))
        .await;
    assert_error(&reply, 409, "lease_expired", None);
    assert_eq!(server.get(&path).await.json()["attempts"], 1);

    // not_found.
    for (method, path) in [
        ("GET", "/v1/jobs/999"),
        ("DELETE", "/v1/jobs/999"),
        ("PATCH", "/v1/jobs/999"),
        ("POST", "/v1/jobs/999/cancel"),
        ("POST", "/v1/jobs/999/kick"),
    ] {
        let reply = server.request(method, path, &[], "{}").await;
        assert_error(&reply, 404, "not_found", None);
    }
    let reply = server
        .post("/v1/jobs/999/heartbeat", json!({"lease": "999-1"}))
        .await;
    assert_error(&reply, 404, "not_found", None);
    server.stop().await;
}

#[tokio::test]
async fn a_batch_completion_answers_each_job_on_its_own() {
    let (server, _broker) = server().await;
    for n in 0..3 {
        server.enqueue("cb", json!({"payload": n})).await;
    }
    let reply = server
        .post(
            "/v1/reserve",
            json!({"queues": ["cb"], "timeout_ms": 0, "batch": 3}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let leased = reply.json()["jobs"].clone();
    let lease = |i: usize| leased[i]["lease"].as_str().expect("a lease").to_string();
    let id = |i: usize| leased[i]["id"].clone();
    // The second job is cancelled while held: its worker learns it here.
    let reply = server
        .post(&format!("/v1/jobs/{}/cancel", id(1)), json!({}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);

    let reply = server
        .post(
            "/v1/jobs/complete",
            json!({"jobs": [
                {"lease": lease(0), "result": {"rows": 3}},
                {"lease": lease(1)},
                {"lease": "x"},
                {"lease": lease(2), "result": 1, "result_base64": "AQ=="},
                {"lease": lease(2), "result_base64": "AQ=="},
            ]}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let answers = reply.json()["jobs"].clone();
    assert_eq!(
        answers[0],
        json!({"id": id(0), "status": 200, "version": 2})
    );
    assert_eq!(
        (answers[1]["id"].clone(), answers[1]["status"].clone()),
        (id(1), json!(409))
    );
    assert_eq!(answers[1]["error"]["code"], "cancelled", "{answers}");
    assert_eq!(answers[2]["status"], 400, "{answers}");
    assert!(answers[2].get("id").is_none(), "{answers}");
    assert_eq!(answers[2]["error"]["field"], "jobs[2].lease", "{answers}");
    assert_eq!(answers[3]["status"], 400, "{answers}");
    assert_eq!(answers[3]["error"]["field"], "jobs[3].result_base64");
    assert_eq!(answers[4]["status"], 200, "{answers}");

    let job = server.get(&format!("/v1/jobs/{}", id(0))).await.json();
    assert_eq!(
        (job["state"].clone(), job["result"].clone()),
        (json!("completed"), json!({"rows": 3}))
    );
    let job = server.get(&format!("/v1/jobs/{}", id(2))).await.json();
    assert_eq!(
        (job["state"].clone(), job["result_base64"].clone()),
        (json!("completed"), json!("AQ=="))
    );

    // The request as a whole: more completions than one reserve hands out,
    // or a body that is not one, is refused before any is made.
    let many: Vec<Value> = (0..=V1_COMPLETE_BATCH_MAX)
        .map(|_| json!({"lease": "1-1"}))
        .collect();
    let reply = server
        .post("/v1/jobs/complete", json!({ "jobs": many }))
        .await;
    assert_error(&reply, 400, "invalid", Some("jobs"));
    let reply = server
        .post("/v1/jobs/complete", json!({"jobs": [{"leese": "1-1"}]}))
        .await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert_eq!(
        command_name(&Method::POST, "/v1/jobs/complete"),
        "POST /v1/jobs/complete"
    );
    server.stop().await;
}

#[tokio::test]
async fn etags_and_if_match_guard_every_change() {
    let (server, _broker) = server().await;
    let made = server
        .post("/v1/queues/v/jobs", json!({"payload": "v1"}))
        .await;
    let version = made.json()["version"].as_u64().unwrap();
    let path = format!("/v1/jobs/{}", made.json()["id"]);
    let stale = format!("\"{}\"", version + 7);

    let reply = server
        .request("PATCH", &path, &[("If-Match", &stale)], r#"{"priority":1}"#)
        .await;
    assert_error(&reply, 412, "version_mismatch", None);
    // Quotes optional.
    let reply = server
        .request(
            "PATCH",
            &path,
            &[("If-Match", &version.to_string())],
            r#"{"priority":1,"payload":{"v":2},"headers":{"h":"1"},"max_attempts":9,"delay_ms":5000}"#,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let changed = reply.json();
    assert_eq!(
        (
            changed["priority"].clone(),
            changed["payload"].clone(),
            changed["headers"].clone(),
            changed["max_attempts"].clone(),
            changed["state"].clone()
        ),
        (
            json!(1),
            json!({"v": 2}),
            json!({"h": "1"}),
            json!(9),
            json!("delayed")
        )
    );
    let new_version = changed["version"].as_u64().unwrap();
    assert!(new_version > version);
    assert_eq!(etag(&reply), format!("\"{new_version}\""));
    // The old version no longer matches anything that changes the job.
    let old = format!("\"{version}\"");
    for (method, action) in [
        ("POST", "/kick"),
        ("POST", "/cancel"),
        ("POST", "/bury"),
        ("DELETE", ""),
        ("PATCH", ""),
    ] {
        let reply = server
            .request(
                method,
                &format!("{path}{action}"),
                &[("If-Match", &old)],
                "{}",
            )
            .await;
        assert_error(&reply, 412, "version_mismatch", None);
    }
    let current = format!("\"{new_version}\"");
    let reply = server
        .request(
            "POST",
            &format!("{path}/kick"),
            &[("If-Match", &current)],
            "",
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let current = etag(&reply);
    let reply = server
        .request(
            "POST",
            &format!("{path}/cancel"),
            &[("If-Match", &current)],
            "",
        )
        .await;
    assert_eq!(reply.json()["state"], "cancelled");
    let current = etag(&reply);
    // A final job stays readable; deleting it forgets it: 204, no body.
    let reply = server
        .request("DELETE", &path, &[("If-Match", &current)], "")
        .await;
    assert_eq!((reply.status, reply.body.as_str()), (204, ""));
    assert_error(&server.get(&path).await, 404, "not_found", None);
    // `*` matches any version.
    let job = server.enqueue("v", json!({"payload": 1})).await;
    let reply = server
        .request(
            "DELETE",
            &format!("/v1/jobs/{}", job["id"]),
            &[("If-Match", "*")],
            "",
        )
        .await;
    assert_eq!(reply.status, 204);
    server.stop().await;
}

#[tokio::test]
async fn reserve_long_polls_in_the_broker_and_answers_empty_at_its_timeout() {
    // A handler timeout far below the wait: the reserve must not be cut.
    let limits = HttpLimits {
        handler_timeout: Duration::from_millis(100),
        ..HttpLimits::default()
    };
    let (server, broker) = started(1 << 16, limits).await;
    let server = Arc::new(server);
    let waiting = {
        let server = server.clone();
        tokio::spawn(async move {
            server
                .post("/v1/reserve", json!({"queues": ["lp"], "timeout_ms": 5000}))
                .await
        })
    };
    wait_in_flight(&server, "POST /v1/reserve").await;
    // Longer than the handler timeout, in real time (the manual clock
    // stands still, so the reserve is still waiting).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let made = server.enqueue("lp", json!({"payload": "wake"})).await;
    let reply = waiting.await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let jobs = reply.json()["jobs"].clone();
    assert_eq!(jobs[0]["id"], made["id"]);
    assert!(jobs[0]["lease"].is_string());

    // Nothing comes: an empty list once the (manual) clock passes the
    // timeout. Advanced step by step, as the reserve may not be parked yet.
    let waiting = {
        let server = server.clone();
        tokio::spawn(async move {
            server
                .post("/v1/reserve", json!({"queues": ["lp"], "timeout_ms": 1000}))
                .await
        })
    };
    for _ in 0..1000 {
        if waiting.is_finished() {
            break;
        }
        broker.advance_clock(1000 * NS_PER_MS);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let reply = waiting.await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json(), json!({"jobs": []}));
    Arc::into_inner(server).unwrap().stop().await;
}

#[tokio::test]
async fn a_parked_reserve_answers_empty_when_shutdown_begins() {
    let (server, broker) = server().await;
    let server = Arc::new(server);
    let waiting = {
        let server = server.clone();
        tokio::spawn(async move {
            server
                .post(
                    "/v1/reserve",
                    json!({"queues": ["drain"], "timeout_ms": 30_000}),
                )
                .await
        })
    };
    wait_in_flight(&server, "POST /v1/reserve").await;
    broker.begin_shutdown();
    let reply = waiting.await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json(), json!({"jobs": []}));
    // New jobs are refused while shutting down.
    let reply = server
        .post("/v1/queues/drain/jobs", json!({"payload": 1}))
        .await;
    assert_error(&reply, 503, "draining", None);
    Arc::into_inner(server).unwrap().stop().await;
}

/// Waits (bounded) until the broker holds `count` job waits.
async fn job_waits(broker: &LocalBroker, count: u64) {
    tokio::time::timeout(EXCHANGE_TIMEOUT, async {
        loop {
            let snapshot = broker.snapshot(SnapshotScope::Queues).await.unwrap();
            if snapshot.waits.job == count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{count} job waits held"));
}

/// Sends a request in the background: it may wait in the broker.
fn spawn_request(
    server: &Arc<TestServer>,
    method: &'static str,
    path: String,
    body: Value,
) -> tokio::task::JoinHandle<Reply> {
    let server = server.clone();
    tokio::spawn(async move { server.send(method, &path, &body).await })
}

#[tokio::test]
async fn enqueue_with_wait_answers_when_a_worker_completes_the_job() {
    // A handler timeout far below the wait: the wait must not be cut.
    let limits = HttpLimits {
        handler_timeout: Duration::from_millis(100),
        ..HttpLimits::default()
    };
    let (server, broker) = started(1 << 16, limits).await;
    let server = Arc::new(server);
    let waiting = spawn_request(
        &server,
        "POST",
        "/v1/queues/w/jobs?wait_ms=30000".into(),
        json!({"payload": "in", "idempotency_key": "once"}),
    );
    job_waits(&broker, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (job, lease) = server.reserve_one("w").await;
    let id = &job["id"];
    let reply = server
        .post(
            &format!("/v1/jobs/{id}/complete"),
            json!({"lease": lease, "result": {"ok": true}}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = waiting.await.unwrap();
    assert_eq!(reply.status, 201, "{}", reply.body);
    let body = reply.json();
    assert_eq!(body["state"], "completed");
    assert_eq!(body["result"], json!({"ok": true}));
    assert_eq!(body["duplicate"], false);
    // The same key again: the settled job at once, 200 as a duplicate.
    let reply = server
        .post(
            "/v1/queues/w/jobs?wait_ms=30000",
            json!({"payload": "in", "idempotency_key": "once"}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["duplicate"], true);
    job_waits(&broker, 0).await;
    Arc::into_inner(server).unwrap().stop().await;
}

#[tokio::test]
async fn enqueue_with_wait_answers_202_with_the_job_as_it_is_at_its_time() {
    let (server, broker) = server().await;
    let server = Arc::new(server);
    let waiting = spawn_request(
        &server,
        "POST",
        "/v1/queues/w/jobs?wait_ms=1000".into(),
        json!({"payload": 1}),
    );
    job_waits(&broker, 1).await;
    broker.advance_clock(1000 * NS_PER_MS);
    let reply = waiting.await.unwrap();
    assert_eq!(reply.status, 202, "{}", reply.body);
    assert_eq!(reply.json()["state"], "ready");
    assert!(reply.header("location").is_some());
    job_waits(&broker, 0).await;
    // A failure that uses up the attempts buries the job: that ends a wait.
    let made = server
        .enqueue("w2", json!({"payload": 2, "max_attempts": 1}))
        .await;
    let id = &made["id"];
    let waiting = spawn_request(
        &server,
        "GET",
        format!("/v1/jobs/{id}?wait_ms=5000"),
        json!(null),
    );
    job_waits(&broker, 1).await;
    let (_, lease) = server.reserve_one("w2").await;
    let reply = server
        .post(
            &format!("/v1/jobs/{id}/fail"),
            json!({"lease": lease, "error": "no"}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = waiting.await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["state"], "buried");
    Arc::into_inner(server).unwrap().stop().await;
}

#[tokio::test]
async fn get_with_wait_answers_when_the_job_is_cancelled_or_the_time_is_up() {
    let (server, broker) = server().await;
    let server = Arc::new(server);
    let made = server.enqueue("g", json!({"payload": 1})).await;
    let id = made["id"].clone();
    let waiting = spawn_request(
        &server,
        "GET",
        format!("/v1/jobs/{id}?wait_ms=30000"),
        json!(null),
    );
    job_waits(&broker, 1).await;
    let reply = server
        .post(&format!("/v1/jobs/{id}/cancel"), json!({}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = waiting.await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["state"], "cancelled");
    // A settled job answers at once.
    let reply = server
        .send("GET", &format!("/v1/jobs/{id}?wait_ms=30000"), &json!(null))
        .await;
    assert_eq!(reply.json()["state"], "cancelled");
    // The time is up: 200 with the job as it is.
    let other = server.enqueue("g", json!({"payload": 2})).await;
    let other = &other["id"];
    let waiting = spawn_request(
        &server,
        "GET",
        format!("/v1/jobs/{other}?wait_ms=10"),
        json!(null),
    );
    job_waits(&broker, 1).await;
    broker.advance_clock(10 * NS_PER_MS);
    let reply = waiting.await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["state"], "ready");
    // A job that does not exist: 404 at once.
    let reply = server
        .send("GET", "/v1/jobs/999?wait_ms=100", &json!(null))
        .await;
    assert_error(&reply, 404, "not_found", None);
    Arc::into_inner(server).unwrap().stop().await;
}

#[tokio::test]
async fn shutdown_ends_job_waits_with_the_job_as_it_is() {
    let (server, broker) = server().await;
    let server = Arc::new(server);
    let made = server.enqueue("s", json!({"payload": 1})).await;
    let id = &made["id"];
    let read = spawn_request(
        &server,
        "GET",
        format!("/v1/jobs/{id}?wait_ms=30000"),
        json!(null),
    );
    let enqueue = spawn_request(
        &server,
        "POST",
        "/v1/queues/s/jobs?wait_ms=30000".into(),
        json!({"payload": 2}),
    );
    job_waits(&broker, 2).await;
    let metrics = server.send("GET", "/metrics", &json!(null)).await.body;
    assert!(
        metrics.lines().any(|l| l == "spool_waits{kind=\"job\"} 2"),
        "{metrics}"
    );
    assert!(metrics
        .lines()
        .any(|l| l == "spool_waits{kind=\"reserve\"} 0"));
    broker.begin_shutdown();
    let reply = read.await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["state"], "ready");
    let reply = enqueue.await.unwrap();
    assert_eq!(reply.status, 202, "{}", reply.body);
    assert_eq!(reply.json()["state"], "ready");
    job_waits(&broker, 0).await;
    Arc::into_inner(server).unwrap().stop().await;
}

#[tokio::test]
async fn job_waits_past_their_maximum_are_refused() {
    let (server, broker) = server().await;
    let server = Arc::new(server);
    let made = server.enqueue("m", json!({"payload": 1})).await;
    let id = &made["id"];
    let waits: Vec<_> = (0..JOB_WAITS_MAX)
        .map(|_| {
            spawn_request(
                &server,
                "GET",
                format!("/v1/jobs/{id}?wait_ms=30000"),
                json!(null),
            )
        })
        .collect();
    job_waits(&broker, JOB_WAITS_MAX as u64).await;
    let reply = server
        .send("GET", &format!("/v1/jobs/{id}?wait_ms=30000"), &json!(null))
        .await;
    assert_error(&reply, 503, "too_many_waits", None);
    // An enqueue still makes its job; its refused wait answers 202.
    let reply = server
        .post("/v1/queues/m/jobs?wait_ms=30000", json!({"payload": 2}))
        .await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    assert_eq!(reply.json()["state"], "ready");
    server
        .post(&format!("/v1/jobs/{id}/cancel"), json!({}))
        .await;
    for wait in waits {
        assert_eq!(wait.await.unwrap().json()["state"], "cancelled");
    }
    Arc::into_inner(server).unwrap().stop().await;
}

#[tokio::test]
async fn limits_answer_413_429_and_503() {
    let max_job_size = 1024;
    let (server, broker) = started(max_job_size, HttpLimits::default()).await;
    let bound = job_body_max_bytes(max_job_size);
    // A payload over the max job size but a body within the bound: the
    // broker refuses it.
    let big = crate::http::encoding::base64_encode(&vec![7u8; max_job_size as usize + 1]);
    let reply = server
        .post("/v1/queues/l/jobs", json!({"payload_base64": big}))
        .await;
    assert_error(&reply, 413, "too_large", None);
    // The largest job fits, as base64.
    let most = crate::http::encoding::base64_encode(&vec![7u8; max_job_size as usize]);
    let reply = server
        .post("/v1/queues/l/jobs", json!({"payload_base64": most}))
        .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    // A body over the bound: refused while it is read.
    let huge = format!(r#"{{"payload":"{}"}}"#, "x".repeat(bound));
    let reply = server
        .request("POST", "/v1/queues/l/jobs", &[], &huge)
        .await;
    assert_error(&reply, 413, "too_large", None);
    let reply = exchange(
        server.addr,
        b"POST /v1/queues/l/jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 100000000\r\n\r\n",
    )
    .await;
    assert_error(&reply, 413, "too_large", None);
    // Admin keeps its own, smaller bound and code.
    let reply = server
        .request(
            "PUT",
            "/admin/log-level",
            &[],
            &"x".repeat(REQUEST_BODY_MAX_BYTES + 1),
        )
        .await;
    assert_eq!(reply.error_code(), "body_too_large");
    // A batch may be larger than one job, but not over its count.
    let jobs: Vec<Value> = (0..=V1_BATCH_JOBS_MAX)
        .map(|i| json!({"payload": i}))
        .collect();
    let reply = server
        .post("/v1/queues/l/jobs/batch", json!({ "jobs": jobs }))
        .await;
    assert_error(&reply, 400, "invalid", Some("jobs"));
    let jobs: Vec<Value> = (0..V1_BATCH_JOBS_MAX)
        .map(|i| json!({"payload": format!("{i:0>200}")}))
        .collect();
    let body = json!({ "jobs": jobs }).to_string();
    assert!(
        body.len() > bound,
        "the batch is larger than one job's bound"
    );
    let reply = server
        .request("POST", "/v1/queues/many/jobs/batch", &[], &body)
        .await;
    assert_eq!(reply.status, 201, "{:?}", reply.json().get("error"));
    assert_eq!(
        reply.json()["jobs"].as_array().unwrap().len(),
        V1_BATCH_JOBS_MAX
    );

    // 429: the queue's max_jobs.
    let reply = server
        .send("PUT", "/v1/queues/small/policy", &json!({"max_jobs": 1}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    server.enqueue("small", json!({"payload": 1})).await;
    let reply = server
        .post("/v1/queues/small/jobs", json!({"payload": 2}))
        .await;
    assert_error(&reply, 429, "queue_full", None);
    let reply = server
        .post(
            "/v1/queues/small/jobs/batch",
            json!({"jobs": [{"payload": 3}]}),
        )
        .await;
    assert_error(&reply, 429, "queue_full", None);

    // 503 while draining: no new jobs; reads and workers go on.
    let job = server.enqueue("l2", json!({"payload": 1})).await;
    broker.set_draining(true);
    let reply = server
        .post("/v1/queues/l2/jobs", json!({"payload": 1}))
        .await;
    assert_error(&reply, 503, "draining", None);
    let reply = server
        .post(
            "/v1/queues/l2/jobs/batch",
            json!({"jobs": [{"payload": 1}]}),
        )
        .await;
    assert_error(&reply, 503, "draining", None);
    let (_, lease) = server.reserve_one("l2").await;
    let reply = server
        .post(
            &format!("/v1/jobs/{}/complete", job["id"]),
            json!({"lease": lease}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    broker.set_draining(false);
    server.enqueue("l2", json!({"payload": 1})).await;
    server.stop().await;
}

#[tokio::test]
async fn v1_answers_503_while_recovering_and_needs_the_token() {
    let server = TestServer::start(Some("t0k"), HttpLimits::default()).await;
    let auth = [("Authorization", "Bearer t0k")];
    let reply = server
        .request("POST", "/v1/queues/a/jobs", &[], r#"{"payload":1}"#)
        .await;
    assert_error(&reply, 401, "unauthorized", None);
    let reply = server.request("GET", "/v1/queues", &auth, "").await;
    assert_error(&reply, 503, "recovering", None);
    server.attach_broker();
    let reply = server
        .request("POST", "/v1/queues/a/jobs", &auth, r#"{"payload":1}"#)
        .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    server.stop().await;
}

#[tokio::test]
async fn concurrent_duplicate_enqueues_make_exactly_one_job() {
    let (server, _broker) = server().await;
    let server = Arc::new(server);
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let server = server.clone();
            tokio::spawn(async move {
                server
                    .post(
                        "/v1/queues/idem/jobs",
                        json!({"payload": {"attempt": i}, "idempotency_key": "order-7"}),
                    )
                    .await
            })
        })
        .collect();
    let mut created = 0;
    let mut ids = std::collections::BTreeSet::new();
    let mut payloads = std::collections::BTreeSet::new();
    for task in tasks {
        let reply = task.await.unwrap();
        let job = reply.json();
        match reply.status {
            201 => {
                created += 1;
                assert_eq!(job["duplicate"], false);
            }
            200 => assert_eq!(job["duplicate"], true),
            other => panic!("{other}: {}", reply.body),
        }
        ids.insert(job["id"].as_u64().unwrap());
        payloads.insert(job["payload"].to_string());
    }
    assert_eq!(created, 1);
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(payloads.len(), 1, "the key wins: {payloads:?}");
    let queue = server.get("/v1/queues/idem").await.json();
    assert_eq!(queue["counts"]["ready"], 1);
    Arc::into_inner(server).unwrap().stop().await;
}

#[tokio::test]
async fn beanstalkd_and_http_work_the_same_jobs() {
    let (server, broker) = server().await;
    let mut session = broker.open_session(crate::Peer::default()).unwrap();
    // Put over beanstalkd, reserved and completed over HTTP.
    let replies = beanstalkd(
        &mut session,
        vec![Request::Use(tube("mixed")), put(b"hello")],
    )
    .await;
    let Response::Inserted(id) = replies[1] else {
        panic!("{replies:?}");
    };
    let (job, lease) = server.reserve_one("mixed").await;
    assert_eq!(job["id"], id);
    assert_eq!(job["payload_base64"], "aGVsbG8=");
    assert_eq!(job["priority"], 5);
    let reply = server
        .post(
            &format!("/v1/jobs/{id}/complete"),
            json!({"lease": lease, "result": "done"}),
        )
        .await;
    assert_eq!(reply.json()["state"], "completed");
    let replies = beanstalkd(&mut session, vec![Request::Peek(id)]).await;
    assert_eq!(replies, [Response::NotFound]);

    // Enqueued over HTTP, reserved and deleted over beanstalkd, which gets
    // the stored bytes (the JSON text) as the body.
    let made = server.enqueue("mixed", json!({"payload": {"n": 1}})).await;
    let replies = beanstalkd(
        &mut session,
        vec![
            Request::Watch(tube("mixed")),
            Request::ReserveWithTimeout {
                timeout_secs: Some(0),
            },
        ],
    )
    .await;
    let Response::Reserved { id, body } = &replies[1] else {
        panic!("{replies:?}");
    };
    assert_eq!(*id, made["id"].as_u64().unwrap());
    assert_eq!(&body[..], br#"{"n":1}"#);
    let shown = server.get(&format!("/v1/jobs/{id}")).await.json();
    assert_eq!(shown["state"], "reserved");
    let replies = beanstalkd(&mut session, vec![Request::Delete(*id)]).await;
    assert_eq!(replies, [Response::Deleted]);

    // Cancelled over HTTP while a beanstalkd worker holds it: its next
    // touch says NOT_FOUND.
    let made = server.enqueue("mixed", json!({"payload": 2})).await;
    let replies = beanstalkd(
        &mut session,
        vec![Request::ReserveWithTimeout {
            timeout_secs: Some(0),
        }],
    )
    .await;
    let Response::Reserved { id, .. } = &replies[0] else {
        panic!("{replies:?}");
    };
    assert_eq!(*id, made["id"].as_u64().unwrap());
    let reply = server
        .post(&format!("/v1/jobs/{id}/cancel"), json!({}))
        .await;
    assert_eq!(reply.json()["state"], "cancelled");
    let replies = beanstalkd(
        &mut session,
        vec![Request::Touch(*id), Request::Delete(*id)],
    )
    .await;
    assert_eq!(replies, [Response::NotFound, Response::NotFound]);
    server.stop().await;
}

#[tokio::test]
async fn queues_list_page_purge_policy_pause_and_resume() {
    let (server, broker) = server().await;
    let reply = server
        .post(
            "/v1/queues/jobs-q/jobs/batch",
            json!({"jobs": [{"payload": 1}, {"payload": 2}, {"payload": 3}, {"payload": 4, "delay_ms": 100}]}),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let ids: Vec<u64> = reply.json()["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 4);

    // Pages of ready jobs.
    let page = server.get("/v1/queues/jobs-q/jobs?limit=2").await.json();
    let got: Vec<&Value> = page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| &j["id"])
        .collect();
    assert_eq!(got, [&json!(ids[0]), &json!(ids[1])]);
    assert_eq!(page["next"], ids[1]);
    let page = server
        .get(&format!(
            "/v1/queues/jobs-q/jobs?state=ready&limit=2&after={}",
            ids[1]
        ))
        .await
        .json();
    assert_eq!(page["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(page["next"], Value::Null);
    let page = server
        .get("/v1/queues/jobs-q/jobs?state=delayed")
        .await
        .json();
    assert_eq!(page["jobs"][0]["id"], ids[3]);

    // Counts, then a purge of what was buried.
    let (job, lease) = server.reserve_one("jobs-q").await;
    server
        .post(
            &format!("/v1/jobs/{}/bury", job["id"]),
            json!({"lease": lease}),
        )
        .await;
    let queue = server.get("/v1/queues/jobs-q").await.json();
    assert_eq!(
        queue["counts"],
        json!({"ready": 2, "reserved": 0, "delayed": 1, "buried": 1, "completed": 0, "cancelled": 0})
    );
    assert_eq!(queue["paused"], false);
    let reply = server
        .request("DELETE", "/v1/queues/jobs-q/jobs?state=buried", &[], "")
        .await;
    assert_eq!(reply.json(), json!({"deleted": 1}));

    // The policy: what is set shows, what is left out is the default (null).
    let reply = server
        .send(
            "PUT",
            "/v1/queues/jobs-q/policy",
            &json!({"max_attempts": 4, "ttr_ms": 1000, "retention_ms": 5000,
                    "retention_max_jobs": 10, "max_jobs": 100,
                    "backoff": {"initial_ms": 5}, "concurrency": 3, "rate_per_s": 2.5}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.json()["policy"],
        json!({"max_jobs": 100, "max_attempts": 4, "ttr_ms": 1000, "retention_ms": 5000,
               "retention_max_jobs": 10, "concurrency": 3, "rate_per_s": 2.5,
               "backoff": {"initial_ms": 5, "max_ms": 3600000, "multiplier": 2.0, "jitter": 0.2}})
    );
    let job = server.enqueue("jobs-q", json!({"payload": 5})).await;
    assert_eq!(
        (job["max_attempts"].clone(), job["ttr_ms"].clone()),
        (json!(4), json!(1000))
    );
    let reply = server
        .send("PUT", "/v1/queues/jobs-q/policy", &json!({}))
        .await;
    assert_eq!(reply.json()["policy"]["max_attempts"], Value::Null);

    // Paused: nothing is handed out until resumed (or the pause ends).
    let reply = server.post("/v1/queues/jobs-q/pause", json!({})).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        (
            reply.json()["paused"].clone(),
            reply.json()["paused_until"].clone()
        ),
        (json!(true), Value::Null)
    );
    let reply = server
        .post("/v1/reserve", json!({"queues": ["jobs-q"]}))
        .await;
    assert_eq!(reply.json(), json!({"jobs": []}));
    let reply = server
        .request("POST", "/v1/queues/jobs-q/resume", &[], "")
        .await;
    assert_eq!(reply.json()["paused"], false);
    server.reserve_one("jobs-q").await;
    let reply = server
        .post("/v1/queues/jobs-q/pause", json!({"duration_ms": 2000}))
        .await;
    assert_eq!(reply.json()["paused_until"], "2026-12-04T00:00:02Z");
    broker.advance_clock(2000 * NS_PER_MS);
    server.reserve_one("jobs-q").await;

    // A queue name may hold `/` (beanstalkd allows it), percent-encoded.
    let job = server.enqueue("a%2Fb", json!({"payload": 1})).await;
    assert_eq!(job["queue"], "a/b");
    assert_eq!(
        server.get("/v1/queues/a%2Fb").await.json()["counts"]["ready"],
        1
    );

    let queues = server.get("/v1/queues").await.json();
    let names: Vec<&Value> = queues["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| &q["name"])
        .collect();
    assert!(names.contains(&&json!("jobs-q")), "{queues}");
    server.stop().await;
}

#[test]
fn v1_command_names_are_route_templates() {
    assert_eq!(
        command_name(&Method::POST, "/v1/jobs/17/complete"),
        "POST /v1/jobs/{id}/complete"
    );
    assert_eq!(
        command_name(&Method::POST, "/v1/queues/a/jobs/batch"),
        "POST /v1/queues/{queue}/jobs/batch"
    );
    assert_eq!(
        command_name(&Method::POST, "/v1/reserve"),
        "POST /v1/reserve"
    );
    assert_eq!(command_name(&Method::GET, "/v1/nope/x"), "other");
    assert!(limits::job_body_max_bytes(1 << 30) > (1 << 30) / 3 * 4);
    assert_eq!(
        limits::job_body_max_bytes(1),
        REQUEST_BODY_MAX_BYTES.max(4 + limits::JOB_JSON_ALLOWANCE_BYTES)
    );
}

use crate::limits::{self, V1_BATCH_JOBS_MAX, V1_COMPLETE_BATCH_MAX};
use spool_proto::Response;
