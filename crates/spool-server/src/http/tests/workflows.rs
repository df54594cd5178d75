//! `/v1/workflows` over real HTTP against a local broker on a manual clock:
//! start, read, list, cancel, the errors, and a step's job showing its
//! parents.

use serde_json::{json, Value};

use super::*;

/// Engine time the tests start at: 2026-12-04T00:00:00Z.
const START_NS: u64 = 218_505_600_000_000_000;

async fn server() -> TestServer {
    let server = TestServer::start_with(None, HttpLimits::default(), 1 << 16).await;
    let engine = Engine::new(EngineConfig {
        max_job_size: 1 << 16,
    });
    let broker = LocalBroker::start(
        engine,
        Clock::manual(START_NS),
        None,
        ProcessInfo::new("test"),
    );
    server.state.set_broker(broker);
    server
}

impl TestServer {
    async fn post_json(&self, path: &str, body: &Value) -> Reply {
        self.request("POST", path, &[], &body.to_string()).await
    }

    /// Reserves one job of `queue` and completes it with `result`; returns
    /// the job as reserved.
    async fn work(&self, queue: &str, result: Value) -> Value {
        let reply = self
            .post_json("/v1/reserve", &json!({"queues": [queue], "timeout_ms": 0}))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let job = reply.json()["jobs"][0].clone();
        let id = job["id"].as_u64().expect("a job");
        let reply = self
            .post_json(
                &format!("/v1/jobs/{id}/complete"),
                &json!({"lease": job["lease"], "result": result}),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        job
    }
}

#[track_caller]
fn assert_error(reply: &Reply, status: u16, code: &str, field: Option<&str>) {
    assert_eq!(reply.status, status, "{}", reply.body);
    let error = &reply.json()["error"];
    assert_eq!(error["code"], code, "{}", reply.body);
    assert_eq!(error["field"].as_str(), field, "{}", reply.body);
}

fn saga() -> Value {
    json!({"name": "order-42", "idempotency_key": "order-42",
    "steps": [
     {"name": "stock", "queue": "inventory", "payload": {"sku": 7, "qty": 1},
      "compensate": {"queue": "inventory-undo", "payload": {"undo": "stock"}}},
     {"name": "coupon", "queue": "coupons", "payload": {"code": "X"}, "depends_on": ["stock"],
      "compensate": {"queue": "coupons-undo", "payload": {"undo": "coupon"}}},
     {"name": "shipping", "queue": "logistics", "payload": {}, "depends_on": ["coupon"],
      "max_attempts": 1}
    ]})
}

#[tokio::test]
async fn a_saga_runs_and_compensates_over_http() {
    let s = server().await;
    let reply = s.post_json("/v1/workflows", &saga()).await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let started = reply.json();
    let id = started["id"].as_u64().unwrap();
    assert_eq!(
        reply.header("location"),
        Some(format!("/v1/workflows/{id}").as_str())
    );
    assert_eq!(reply.header("etag"), Some("\"1\""));
    assert_eq!(started["state"], "running");
    assert_eq!(started["duplicate"], false);
    assert_eq!(started["steps"][0]["state"], "running");
    assert_eq!(started["steps"][1]["state"], "pending");
    assert_eq!(started["steps"][1]["depends_on"], json!(["stock"]));
    assert_eq!(started["steps"][0]["has_compensation"], true);

    // The same key: the same workflow, 200.
    let again = s.post_json("/v1/workflows", &saga()).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.json()["id"], id);
    assert_eq!(again.json()["duplicate"], true);

    let stock = s.work("inventory", json!({"held": 1})).await;
    assert_eq!(stock["headers"]["spool-workflow"], id.to_string());
    assert_eq!(stock["headers"]["spool-step"], "stock");
    assert!(stock.get("parents").is_none(), "no parents: {stock}");
    let coupon = s.work("coupons", json!("redeemed")).await;
    assert_eq!(coupon["parents"], json!({"stock": {"held": 1}}));
    // Shipping fails for good (one attempt): compensation begins.
    let reply = s
        .post_json(
            "/v1/reserve",
            &json!({"queues": ["logistics"], "timeout_ms": 0}),
        )
        .await;
    let shipping = reply.json()["jobs"][0].clone();
    let reply = s
        .post_json(
            &format!("/v1/jobs/{}/fail", shipping["id"]),
            &json!({"lease": shipping["lease"], "error": "no courier"}),
        )
        .await;
    assert_eq!(reply.json()["state"], "buried", "{}", reply.body);

    let view = s.get(&format!("/v1/workflows/{id}")).await;
    assert_eq!(view.status, 200, "{}", view.body);
    let view = view.json();
    assert_eq!(view["state"], "compensating");
    assert_eq!(view["steps"][2]["state"], "failed");
    assert_eq!(view["steps"][2]["last_error"], "no courier");
    assert_eq!(view["steps"][2]["attempts"], 1);
    assert_eq!(view["steps"][2]["job_state"], "buried");
    assert_eq!(view["steps"][1]["state"], "compensating");

    let undo = s.work("coupons-undo", json!(null)).await;
    assert_eq!(undo["parents"], json!({"coupon": "redeemed"}));
    s.work("inventory-undo", json!(null)).await;
    let done = s.get(&format!("/v1/workflows/{id}")).await.json();
    assert_eq!(done["state"], "compensated");
    assert!(done["finished_at"].as_str().is_some());

    let listed = s.get("/v1/workflows?state=compensated&limit=10").await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert_eq!(listed.json()["workflows"][0]["id"], id);
    assert_eq!(listed.json()["next"], Value::Null);
    let none = s.get("/v1/workflows?state=running").await.json();
    assert_eq!(none["workflows"], json!([]));
    assert_error(
        &s.post_json(&format!("/v1/workflows/{id}/cancel"), &json!({}))
            .await,
        409,
        "wrong_state",
        None,
    );

    let metrics = s.get("/metrics").await.body;
    for line in [
        "spool_workflows_started_total 1",
        "spool_workflows_finished_total{state=\"compensated\"} 1",
        "spool_workflows_finished_total{state=\"succeeded\"} 0",
        "spool_workflow_steps_total{outcome=\"completed\"} 2",
        "spool_workflow_steps_total{outcome=\"failed\"} 1",
        "spool_workflow_steps_total{outcome=\"cancelled\"} 0",
        "spool_workflow_steps_total{outcome=\"compensated\"} 2",
        "spool_workflow_duration_seconds_count 1",
        "spool_workflows{state=\"compensated\"} 1",
        "spool_workflows{state=\"running\"} 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} in:\n{}",
            metrics
                .lines()
                .filter(|l| l.contains("workflow"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn a_running_workflow_is_cancelled_and_results_show_when_it_succeeds() {
    let s = server().await;
    let one = json!({"steps": [{"name": "a", "queue": "q-a", "payload_base64": "AP8="}]});
    let id = s.post_json("/v1/workflows", &one).await.json()["id"]
        .as_u64()
        .unwrap();
    let reply = s
        .request("POST", &format!("/v1/workflows/{id}/cancel"), &[], "")
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["state"], "compensated");
    assert_eq!(reply.json()["cancel_requested"], true);
    assert_eq!(reply.json()["steps"][0]["job_state"], "cancelled");

    let id = s.post_json("/v1/workflows", &one).await.json()["id"]
        .as_u64()
        .unwrap();
    s.work("q-a", json!({"ok": true})).await;
    let done = s.get(&format!("/v1/workflows/{id}")).await.json();
    assert_eq!(done["state"], "succeeded");
    assert_eq!(done["results"], json!({"a": {"ok": true}}));
    assert_eq!(done["steps"][0]["result"], json!({"ok": true}));
    s.stop().await;
}

#[tokio::test]
async fn bad_workflows_get_400_naming_the_field() {
    let s = server().await;
    let cases = [
        (
            json!({"steps": [{"name": "a", "queue": "q", "payload": 1, "depends_on": ["a"]}]}),
            "steps.depends_on",
        ),
        (
            json!({"steps": [{"name": "a", "queue": "q", "payload": 1, "depends_on": ["zz"]}]}),
            "steps.depends_on",
        ),
        (
            json!({"steps": [{"name": "a", "queue": "q", "payload": 1}, {"name": "a", "queue": "q", "payload": 1}]}),
            "steps.name",
        ),
        (json!({"steps": []}), "steps"),
        (
            json!({"steps": [{"name": "a", "queue": "q"}]}),
            "steps[0].payload",
        ),
        (
            json!({"steps": [{"name": "a", "queue": "-bad", "payload": 1}]}),
            "steps[0].queue",
        ),
        (
            json!({"steps": [{"name": "a", "queue": "q", "payload": 1, "compensate": {"queue": "q"}}]}),
            "steps[0].compensate.payload",
        ),
        (
            json!({"steps": [{"name": "a", "queue": "q", "payload": 1, "priorty": 3}]}),
            "steps[0].priorty",
        ),
        (
            json!({"steps": [{"name": "a", "queue": "q", "payload": 1, "idempotency_key": "k"}]}),
            "steps[0].idempotency_key",
        ),
        (json!({"stepz": []}), "stepz"),
    ];
    for (body, field) in cases {
        let reply = s.post_json("/v1/workflows", &body).await;
        assert_error(&reply, 400, "invalid", Some(field));
    }
    let cycle = s
        .post_json(
            "/v1/workflows",
            &json!({"steps": [
                {"name": "x", "queue": "q", "payload": 1, "depends_on": ["y"]},
                {"name": "y", "queue": "q", "payload": 1, "depends_on": ["x"]}]}),
        )
        .await;
    assert_error(&cycle, 400, "invalid", Some("steps.depends_on"));
    let message = cycle.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("cycle") && (message.contains("\"x\"") || message.contains("\"y\"")),
        "{message}"
    );
    assert_error(
        &s.get("/v1/workflows/abc").await,
        400,
        "invalid",
        Some("id"),
    );
    assert_error(&s.get("/v1/workflows/77").await, 404, "not_found", None);
    assert_error(
        &s.get("/v1/workflows?state=done").await,
        400,
        "invalid",
        Some("state"),
    );
    assert_error(
        &s.get("/v1/workflows?limit=0").await,
        400,
        "invalid",
        Some("limit"),
    );
    assert_error(
        &s.get("/v1/workflows?limit=99999999999").await,
        400,
        "invalid",
        Some("limit"),
    );
    assert_error(
        &s.get("/v1/workflows?sort=id").await,
        400,
        "invalid",
        Some("sort"),
    );
    assert_error(
        &s.post_json("/v1/workflows/77/cancel", &json!({})).await,
        404,
        "not_found",
        None,
    );
    assert_error(
        &s.post_json("/v1/workflows/77/cancel", &json!({"x": 1}))
            .await,
        400,
        "invalid",
        Some("x"),
    );
    s.stop().await;
}
