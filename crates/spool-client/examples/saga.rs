//! The order saga of API.md, end to end: reserve stock → redeem the coupon
//! → create the shipment. Every `--fail-every`th order's shipment fails for
//! good, and spool undoes the coupon, then the stock, in that order, once
//! each. The three services are ordinary [`Worker`]s on their queues; the
//! saga itself is one `POST /v1/workflows` per order.
//!
//! ```text
//! spool serve --in-memory &
//! cargo run -p spool-client --example saga -- --http 127.0.0.1:11301
//! spool workflow <an id it prints>     # the tree of a compensated order
//! ```
//!
//! Prints what each service did (compensations marked `undo`) and checks
//! what the server reports: succeeded orders have every step completed;
//! compensated ones had coupon undone before stock and no shipment.
//! Exits non-zero if anything disagrees. Bounded: `--orders` (default 12),
//! and at most `--timeout-ms` (default 30,000) waiting for them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use spool_client::{
    Client, Enqueue, HandlerError, Job, JobContext, NewWorkflow, Step, Worker, WorkflowState,
};

struct Settings {
    http: String,
    orders: u64,
    fail_every: u64,
    timeout: Duration,
}

fn settings() -> Result<Settings, String> {
    let mut s = Settings {
        http: "127.0.0.1:11301".into(),
        orders: 12,
        fail_every: 3,
        timeout: Duration::from_millis(30_000),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let number = || value.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--http" => s.http = value.clone(),
            "--orders" => s.orders = number()?.max(1),
            "--fail-every" => s.fail_every = number()?,
            "--timeout-ms" => s.timeout = Duration::from_millis(number()?),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(s)
}

/// What the services did, in the order they did it: (order, action).
type Journal = Arc<Mutex<Vec<(u64, String)>>>;

fn note(journal: &Journal, order: u64, action: String) {
    println!("order {order:>3}: {action}");
    if let Ok(mut j) = journal.lock() {
        j.push((order, action));
    }
}

/// One service: does its step, or undoes it when the job says `undo`.
fn service(client: &Client, queue: &'static str, journal: Journal, fail_every: u64) -> Worker {
    Worker::builder(client.clone())
        .queue(queue)
        .concurrency(4)
        .poll_timeout(Duration::from_millis(500))
        .build(move |job: Job, _ctx: JobContext| {
            let journal = journal.clone();
            async move {
                let body: Value = job.payload_json()?;
                let order = body["order"].as_u64().unwrap_or(0);
                if let Some(step) = body["undo"].as_str() {
                    // A compensation gets the step's result as its parent.
                    let done = job
                        .parents
                        .get(step)
                        .and_then(|r| r.as_ref())
                        .map(|r| String::from_utf8_lossy(r).into_owned())
                        .unwrap_or_default();
                    note(
                        &journal,
                        order,
                        format!("undo {step} (its result was {done})"),
                    );
                    return Ok::<Value, HandlerError>(json!({"undone": step}));
                }
                if queue == "logistics" && fail_every > 0 && order.is_multiple_of(fail_every) {
                    note(&journal, order, "shipping refused: address invalid".into());
                    return Err(HandlerError::new("address invalid").permanent());
                }
                let step = match queue {
                    "inventory" => "stock",
                    "coupons" => "coupon",
                    _ => "shipping",
                };
                note(&journal, order, format!("{step} done"));
                Ok(json!({ "step": step, "order": order }))
            }
        })
}

fn order_saga(order: u64) -> Result<NewWorkflow, spool_client::Error> {
    let undo = |step: &str| Enqueue::json(&json!({ "order": order, "undo": step }));
    Ok(NewWorkflow::new()
        .name(format!("order-{order}"))
        .idempotency_key(format!("saga-example-order-{order}"))
        .step(
            Step::new(
                "stock",
                "inventory",
                Enqueue::json(&json!({"order": order, "sku": 7, "qty": 1}))?,
            )
            .compensate("inventory", undo("stock")?),
        )
        .step(
            Step::new(
                "coupon",
                "coupons",
                Enqueue::json(&json!({"order": order, "code": "X"}))?,
            )
            .depends_on("stock")
            .compensate("coupons", undo("coupon")?),
        )
        .step(
            Step::new(
                "shipping",
                "logistics",
                Enqueue::json(&json!({ "order": order }))?.max_attempts(1),
            )
            .depends_on("coupon"),
        ))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let s = settings()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = Client::new(s.http.clone())?;
        let journal: Journal = Arc::default();
        let mut stops = Vec::new();
        let mut runs = Vec::new();
        for queue in ["inventory", "coupons", "logistics"] {
            let worker = service(&client, queue, journal.clone(), s.fail_every);
            stops.push(worker.shutdown_handle());
            runs.push(tokio::spawn(worker.run()));
        }

        let mut ids = Vec::new();
        for order in 1..=s.orders {
            let workflow = client.start_workflow(&order_saga(order)?).await?;
            ids.push((order, workflow.id));
        }

        let started = Instant::now();
        let mut finals = Vec::new();
        for &(order, id) in &ids {
            loop {
                let w = client.workflow(id).await?;
                let settled = matches!(
                    w.state,
                    WorkflowState::Succeeded
                        | WorkflowState::Compensated
                        | WorkflowState::CompensationFailed
                );
                if settled {
                    finals.push((order, w));
                    break;
                }
                if started.elapsed() > s.timeout {
                    return Err(format!("order {order} (workflow {id}) still {:?}", w.state).into());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        for stop in &stops {
            stop.shutdown();
        }
        for run in runs {
            run.await??;
        }

        let journal = journal.lock().map_err(|_| "journal poisoned")?.clone();
        let mut problems = Vec::new();
        let mut example = None;
        for (order, w) in &finals {
            let fails = s.fail_every > 0 && order.is_multiple_of(s.fail_every);
            let actions: Vec<&str> = journal
                .iter()
                .filter(|(o, _)| o == order)
                .map(|(_, a)| a.as_str())
                .collect();
            let undos: Vec<&str> = actions
                .iter()
                .copied()
                .filter(|a| a.starts_with("undo"))
                .collect();
            let expected_state = if fails {
                WorkflowState::Compensated
            } else {
                WorkflowState::Succeeded
            };
            if w.state != expected_state {
                problems.push(format!(
                    "order {order}: {:?}, expected {expected_state:?}",
                    w.state
                ));
            }
            let undo_order_ok = if fails {
                undos.len() == 2
                    && undos[0].starts_with("undo coupon")
                    && undos[1].starts_with("undo stock")
            } else {
                undos.is_empty()
            };
            if !undo_order_ok {
                problems.push(format!("order {order}: compensations {undos:?}"));
            }
            if fails && example.is_none() {
                example = Some(w.id);
            }
        }
        let succeeded = finals
            .iter()
            .filter(|(_, w)| w.state == WorkflowState::Succeeded)
            .count();
        println!(
            "\n{} orders: {succeeded} shipped, {} compensated (coupon undone, then stock)",
            finals.len(),
            finals.len() - succeeded
        );
        if let Some(id) = example {
            let w = client.workflow(id).await?;
            println!("workflow {id} ({}):", w.name.as_deref().unwrap_or(""));
            for step in &w.steps {
                println!(
                    "  {:<9} {:<12} attempts {} {}",
                    step.name,
                    step.state,
                    step.attempts,
                    step.last_error.as_deref().unwrap_or("")
                );
            }
            println!("see it with: spool workflow {id}");
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n").into())
        }
    })
}
