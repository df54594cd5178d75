//! Workflows from the outside: the client SDK's workflow methods and the
//! `spool workflows` / `spool workflow ID` verbs against a real server.

mod support;

use std::time::Duration;

use serde_json::json;
use spool_client::{Client, Enqueue, NewWorkflow, Step, WorkflowState};
use support::{run_spool, Server};

fn client(server: &Server) -> Client {
    Client::new(server.http_addr().to_string()).expect("a client")
}

/// Reserves the one ready job of `queue` (no wait) and completes it.
async fn work(client: &Client, queue: &str, result: serde_json::Value) -> spool_client::Job {
    let mut jobs = client
        .reserve(&[queue], 1, Duration::ZERO)
        .await
        .expect("reserve");
    assert_eq!(jobs.len(), 1, "one job ready in {queue}");
    let job = jobs.remove(0);
    let lease = job.lease.clone().expect("a lease");
    client
        .complete(
            job.id,
            &lease,
            &spool_client::Body::json(&result).expect("json"),
        )
        .await
        .expect("complete");
    job
}

fn saga() -> NewWorkflow {
    NewWorkflow::new()
        .name("order-42")
        .idempotency_key("order-42")
        .step(
            Step::new(
                "stock",
                "wf-inventory",
                Enqueue::json(&json!({"sku": 7})).expect("json"),
            )
            .compensate(
                "wf-undo",
                Enqueue::json(&json!({"undo": "stock"})).expect("json"),
            ),
        )
        .step(
            Step::new(
                "ship",
                "wf-logistics",
                Enqueue::json(&json!({})).expect("json"),
            )
            .depends_on("stock"),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_and_the_cli_cover_workflows() {
    let server = Server::start();
    let http = server.http_addr().to_string();
    let c = client(&server);

    let started = c.start_workflow(&saga()).await.expect("start");
    assert_eq!(started.state, WorkflowState::Running);
    assert!(!started.duplicate);
    let again = c.start_workflow(&saga()).await.expect("start again");
    assert!(again.duplicate);
    assert_eq!(again.id, started.id);

    let stock = work(&c, "wf-inventory", json!({"held": 1})).await;
    assert_eq!(stock.headers["spool-step"], "stock");
    let ship = work(&c, "wf-logistics", json!("shipped")).await;
    assert_eq!(
        ship.parents["stock"].as_deref(),
        Some(&br#"{"held":1}"#[..])
    );
    let done = c.workflow(started.id).await.expect("workflow");
    assert_eq!(done.state, WorkflowState::Succeeded);
    assert_eq!(&done.results["ship"][..], br#""shipped""#);
    assert_eq!(done.steps[1].depends_on, ["stock"]);

    // A second, cancelled while its first step runs: compensated (nothing
    // had completed), its step job cancelled.
    let second = c
        .start_workflow(&NewWorkflow::new().step(Step::new(
            "only",
            "wf-inventory",
            Enqueue::json(&1).expect("json"),
        )))
        .await
        .expect("start");
    let cancelled = c.cancel_workflow(second.id).await.expect("cancel");
    assert_eq!(cancelled.state, WorkflowState::Compensated);
    assert!(cancelled.cancel_requested);
    let page = c
        .workflows(Some(WorkflowState::Succeeded), Some(10), None)
        .await
        .expect("list");
    assert_eq!(page.workflows.len(), 1);
    assert_eq!(page.workflows[0].id, started.id);

    // The CLI: the list, and a workflow as a tree.
    let out = run_spool(&["workflows", "--http", &http], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("order-42") && text.contains("succeeded"),
        "{text}"
    );
    assert!(text.contains("compensated"), "{text}");
    let id = started.id.to_string();
    let out = run_spool(&["workflow", &id, "--http", &http], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.starts_with(&format!("workflow {id} \"order-42\": succeeded\n")),
        "{text}"
    );
    assert!(text.contains("└─ stock  completed  job "), "{text}");
    assert!(text.contains("   └─ ship  completed  job "), "{text}");
    let out = run_spool(&["workflow", "999", "--http", &http], &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not_found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_spool(
        &[
            "workflow",
            &second.id.to_string(),
            "--cancel",
            "--http",
            &http,
        ],
        &[],
    );
    assert!(
        !out.status.success(),
        "a compensated workflow cannot be cancelled"
    );
}
