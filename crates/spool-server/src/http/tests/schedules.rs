//! `/v1/schedules` over real HTTP against a local broker on a manual
//! clock: create, replace, read, list, pause, resume, trigger, delete, the
//! firing itself, and the error shapes.

use serde_json::{json, Value};

use super::*;

/// Engine time the tests start at: 2026-12-04T00:00:00Z.
const START_NS: u64 = 218_505_600_000_000_000;
const NS_PER_MS: u64 = 1_000_000;

async fn server() -> (TestServer, LocalBroker) {
    let server = TestServer::start_with(None, HttpLimits::default(), 1 << 16).await;
    let engine = Engine::new(EngineConfig {
        max_job_size: 1 << 16,
    });
    let broker = LocalBroker::start(
        engine,
        crate::local::manual_engine_clock(START_NS),
        None,
        ProcessInfo::new("test"),
    );
    server.state.set_broker(broker.clone());
    (server, broker)
}

impl TestServer {
    async fn send_json(&self, method: &str, path: &str, body: &Value) -> Reply {
        self.request(method, path, &[], &body.to_string()).await
    }
}

#[tokio::test]
async fn schedules_over_http() {
    let (server, broker) = server().await;
    let spec = json!({
        "cron": "@every 10s",
        "queue": "ticks",
        "job": {"payload": {"report": "daily"}, "priority": 5, "headers": {"team": "ops"}},
    });
    let reply = server
        .send_json("PUT", "/v1/schedules/nightly", &spec)
        .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let made = reply.json();
    assert_eq!(made["name"], "nightly");
    assert_eq!(made["timezone"], "UTC");
    assert_eq!(made["misfire"], "once");
    assert_eq!(made["catch_up_max"], 100);
    assert_eq!(made["next_fire_at"], "2026-12-04T00:00:10Z");
    assert_eq!(made["last_fire_at"], Value::Null);
    assert_eq!(made["fires"], 0);
    assert_eq!(made["job"]["payload"], json!({"report": "daily"}));
    assert_eq!(made["job"]["priority"], 5);

    // Replacing answers 200.
    let reply = server
        .send_json("PUT", "/v1/schedules/nightly", &spec)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);

    // The firing: a job with the key and the two headers.
    broker.advance_clock(10_000 * NS_PER_MS);
    let reply = server.get("/v1/schedules/nightly").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let view = reply.json();
    assert_eq!(view["fires"], 1);
    assert_eq!(view["last_fire_at"], "2026-12-04T00:00:10Z");
    assert_eq!(view["next_fire_at"], "2026-12-04T00:00:20Z");
    let job = server
        .get(&format!("/v1/jobs/{}", view["last_job"]))
        .await
        .json();
    assert_eq!(job["queue"], "ticks");
    assert_eq!(job["priority"], 5);
    assert_eq!(job["headers"]["spool-schedule"], "nightly");
    assert_eq!(job["headers"]["spool-scheduled-at"], "2026-12-04T00:00:10Z");
    assert_eq!(job["headers"]["team"], "ops");
    assert_eq!(job["idempotency_key"], "schedule:nightly:1796342410000");

    // Per-schedule metrics, and the skew buckets below 1 ms.
    let metrics = server.get("/metrics").await.body;
    assert!(
        metrics.contains("spool_schedule_fires_total{schedule=\"nightly\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("spool_schedule_misfires_total{schedule=\"nightly\"} 0"));
    assert!(metrics.contains("spool_schedule_backlog_skips_total{schedule=\"nightly\"} 0"));
    assert!(metrics
        .contains("spool_schedule_fire_skew_seconds_bucket{schedule=\"nightly\",le=\"0.0001\"} 1"));
    assert!(metrics.contains("spool_schedule_skew_seconds_bucket{queue=\"ticks\",le=\"0.00005\"}"));
    let stats = server.get("/admin/stats").await.json();
    assert_eq!(stats["schedules"][0]["name"], "nightly");
    assert_eq!(stats["schedules"][0]["fires"], 1);

    let list = server.get("/v1/schedules").await;
    assert_eq!(list.status, 200);
    assert_eq!(list.json()["schedules"][0]["name"], "nightly");

    let paused = server
        .request("POST", "/v1/schedules/nightly/pause", &[], "")
        .await;
    assert_eq!(paused.status, 200, "{}", paused.body);
    assert_eq!(paused.json()["paused"], true);
    assert_eq!(paused.json()["next_fire_at"], Value::Null);
    let triggered = server
        .request("POST", "/v1/schedules/nightly/trigger", &[], "{}")
        .await;
    assert_eq!(triggered.status, 200, "{}", triggered.body);
    assert_eq!(triggered.json()["fires"], 2);
    let resumed = server
        .request("POST", "/v1/schedules/nightly/resume", &[], "")
        .await;
    assert_eq!(resumed.json()["next_fire_at"], "2026-12-04T00:00:20Z");

    let deleted = server
        .request("DELETE", "/v1/schedules/nightly", &[], "")
        .await;
    assert_eq!(deleted.status, 204);
    let gone = server.get("/v1/schedules/nightly").await;
    assert_eq!(gone.status, 404);
    assert_eq!(gone.json()["error"]["code"], "not_found");
}

#[tokio::test]
async fn bad_schedules_are_refused_naming_the_field() {
    let (server, _broker) = server().await;
    let cases = [
        (
            json!({"cron": "* * *", "queue": "q", "job": {"payload": 1}}),
            "cron",
        ),
        (
            json!({"cron": "@daily", "timezone": "Nowhere/Town", "queue": "q", "job": {"payload": 1}}),
            "timezone",
        ),
        (
            json!({"cron": "@daily", "queue": "-bad", "job": {"payload": 1}}),
            "queue",
        ),
        (json!({"cron": "@daily", "queue": "q"}), "job"),
        (
            json!({"cron": "@daily", "queue": "q", "job": {}}),
            "job.payload",
        ),
        (
            json!({"cron": "@daily", "queue": "q", "job": {"payload": 1, "run_at": "2026-12-04T00:00:00Z"}}),
            "job.run_at",
        ),
        (
            json!({"cron": "@daily", "queue": "q", "job": {"payload": 1}, "misfire": "never"}),
            "misfire",
        ),
        (
            json!({"cron": "@daily", "queue": "q", "job": {"payload": 1}, "catch_up_max": 0}),
            "catch_up_max",
        ),
        (
            json!({"cron": "@daily", "queue": "q", "job": {"payload": 1}, "max_backlog": 0}),
            "max_backlog",
        ),
        (
            json!({"cron": "@daily", "queue": "q", "job": {"payload": 1}, "cronn": 1}),
            "cronn",
        ),
    ];
    for (body, field) in cases {
        let reply = server.send_json("PUT", "/v1/schedules/s", &body).await;
        assert_eq!(reply.status, 400, "{body}: {}", reply.body);
        let error = &reply.json()["error"];
        assert_eq!(error["code"], "invalid", "{body}");
        assert_eq!(error["field"], field, "{body}: {error}");
    }
    let reply = server
        .send_json("PUT", "/v1/schedules/-bad", &json!({}))
        .await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["field"], "name");
    for path in [
        "/v1/schedules/none/pause",
        "/v1/schedules/none/resume",
        "/v1/schedules/none/trigger",
    ] {
        let reply = server.request("POST", path, &[], "").await;
        assert_eq!(reply.status, 404, "{path}");
    }
}
