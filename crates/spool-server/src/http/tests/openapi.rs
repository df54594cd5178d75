//! `/openapi.json`: it parses, it is served without the token, and it
//! describes exactly the `/v1` operations the router serves, so a new
//! route without a spec (or a spec without a route) fails here.

use std::collections::BTreeSet;

use super::*;

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// A concrete path for a route template: `{queue}` and `{id}` filled in.
fn concrete(template: &str) -> String {
    template
        .replace("{queue}", "q")
        .replace("{id}", "1")
        .replace("{name}", "s")
}

#[tokio::test]
async fn the_document_lists_every_v1_operation_the_router_serves() {
    // With a token: the document itself needs none.
    let server = TestServer::start(Some("secret"), HttpLimits::default()).await;
    let reply = server.get("/openapi.json").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let doc = reply.json();
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{doc}"
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );

    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .expect("a path item")
                .keys()
                .map(|method| (method.to_ascii_uppercase(), path.clone()))
                .collect::<Vec<_>>()
        })
        .collect();

    // Bounds written into the document as numbers follow the limits.
    assert_eq!(
        doc["components"]["schemas"]["ReserveBody"]["properties"]["batch"]["maximum"],
        serde_json::json!(spool_engine::limits::RESERVE_BATCH_MAX)
    );
    server.stop().await;

    // Which methods the router serves on each /v1 path: anything but
    // 405 (its answer to a method it has no handler for) is served. No
    // token (the auth check answers before routing) and no broker: a
    // handler answers 400 or 503 `recovering` before it calls one.
    let server = TestServer::start(None, HttpLimits::default()).await;
    let mut served = BTreeSet::new();
    let templates = crate::http::jobs::route_table::<LocalBroker>()
        .into_iter()
        .map(|(template, _)| template);
    for template in templates {
        for method in METHODS {
            let reply = server.request(method, &concrete(template), &[], "").await;
            match reply.status {
                405 => {}
                400 | 503 => {
                    served.insert((method.to_string(), template.to_string()));
                }
                other => panic!("{method} {template}: {other} {}", reply.body),
            }
        }
    }
    assert!(served.len() >= 20, "{served:?}");
    let documented_v1: BTreeSet<_> = documented
        .iter()
        .filter(|(_, path)| path.starts_with("/v1/"))
        .cloned()
        .collect();
    assert_eq!(
        served.difference(&documented_v1).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "served but not in /openapi.json"
    );
    assert_eq!(
        documented_v1.difference(&served).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "in /openapi.json but not served"
    );
    for probe in ["/livez", "/readyz", "/metrics"] {
        assert!(
            documented.contains(&("GET".to_string(), probe.to_string())),
            "{probe} is not documented"
        );
    }

    // Every /v1 operation declares the bearer scheme and the error body.
    for (method, path) in &documented_v1 {
        let operation = &doc["paths"][path][method.to_ascii_lowercase()];
        assert_eq!(
            operation["security"][0]["bearer"],
            serde_json::json!([]),
            "{method} {path}"
        );
        assert_eq!(
            operation["responses"]["400"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/ErrorBody",
            "{method} {path}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn job_answers_match_the_documented_job_schema() {
    // The fields a job answer carries are the documented ones (the schema
    // is derived from the type that writes them; this checks the link).
    let server = TestServer::start(None, HttpLimits::default()).await;
    server.attach_broker();
    let doc = server.get("/openapi.json").await.json();
    let schema = &doc["components"]["schemas"]["Job"];
    let properties = schema["properties"].as_object().expect("properties");
    let reply = server
        .request(
            "POST",
            "/v1/queues/q/jobs",
            &[],
            r#"{"payload": {"a": 1}, "idempotency_key": "k"}"#,
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let job = reply.json();
    for (name, _) in job.as_object().expect("a job") {
        assert!(properties.contains_key(name), "{name} is not documented");
    }
    for required in schema["required"].as_array().expect("required") {
        let name = required.as_str().expect("a name");
        assert!(job.get(name).is_some(), "{name} is required but missing");
    }
    server.stop().await;
}
