//! Conformance cases for workflows (API.md, "Workflows"): the same rules
//! for every broker.

use super::*;
use crate::workflow::{
    NewStep, NewWorkflow, StepState, WorkflowId, WorkflowState, WorkflowView, HEADER_STEP,
    HEADER_WORKFLOW,
};

fn step(name: &str, q: &str, deps: &[&str], undo_queue: Option<&str>) -> NewStep {
    NewStep {
        name: name.into(),
        queue: queue(q),
        job: job(&format!("{{\"do\":\"{name}\"}}")),
        depends_on: deps.iter().map(|d| d.to_string()).collect(),
        compensate: undo_queue.map(|u| (queue(u), job(&format!("{{\"undo\":\"{name}\"}}")))),
    }
}

/// API.md's order chain: stock → coupon → shipping; the first two undoable.
fn order_saga() -> NewWorkflow {
    NewWorkflow {
        name: Some("order-42".into()),
        steps: vec![
            step("stock", "wf-inventory", &[], Some("wf-undo")),
            step("coupon", "wf-coupons", &["stock"], Some("wf-undo")),
            step("shipping", "wf-logistics", &["coupon"], None),
        ],
        ..NewWorkflow::default()
    }
}

async fn start<B: Broker>(b: &B, workflow: NewWorkflow) -> (WorkflowView, bool) {
    match call(b, Op::StartWorkflow { workflow })
        .await
        .expect("start")
    {
        Outcome::Workflow {
            workflow,
            duplicate,
        } => (*workflow, duplicate),
        other => panic!("expected a workflow, got {other:?}"),
    }
}

async fn workflow<B: Broker>(b: &B, id: WorkflowId) -> WorkflowView {
    match call(b, Op::GetWorkflow { id }).await.expect("get workflow") {
        Outcome::Workflow { workflow, .. } => *workflow,
        other => panic!("expected a workflow, got {other:?}"),
    }
}

/// Reserves the one job of `q` and completes it with `result`.
async fn work<B: Broker>(b: &B, q: &str, result: &str) -> JobView {
    let leased = reserve_one(b, q).await;
    b.complete(
        leased.lease,
        Some(Bytes::copy_from_slice(result.as_bytes())),
    )
    .await
    .expect("complete");
    leased.job
}

/// Reserves the one job of `q` and fails it for good.
async fn fail_for_good<B: Broker>(b: &B, q: &str, error: &str) -> JobView {
    let leased = reserve_one(b, q).await;
    call(
        b,
        Op::Fail {
            lease: leased.lease,
            error: error.into(),
            retry_in_ms: None,
            permanent: true,
        },
    )
    .await
    .expect("fail");
    leased.job
}

async fn nothing_ready<B: Broker>(b: &B, q: &str) {
    let jobs = b.reserve(vec![queue(q)], 10, 0).await.expect("reserve");
    assert!(jobs.is_empty(), "nothing ready in {q}: {jobs:?}");
}

fn text(bytes: &Option<Bytes>) -> Option<&str> {
    bytes
        .as_deref()
        .map(|b| std::str::from_utf8(b).expect("utf-8"))
}

pub async fn workflow_saga_succeeds_passing_parents<H: Harness>(h: H) {
    let b = h.broker();
    let (started, duplicate) = start(b, order_saga()).await;
    assert!(!duplicate);
    assert!(started.id >= 1);
    assert_eq!(started.state, WorkflowState::Running);
    assert_eq!(started.steps[0].state, StepState::Running);
    assert_eq!(started.steps[1].state, StepState::Pending);
    nothing_ready(b, "wf-coupons").await;

    let stock = work(b, "wf-inventory", "\"reserved\"").await;
    assert_eq!(stock.headers[HEADER_WORKFLOW], started.id.to_string());
    assert_eq!(stock.headers[HEADER_STEP], "stock");
    assert!(stock.parents.is_empty());
    assert_eq!(Some(stock.id), started.steps[0].job);

    let coupon = work(b, "wf-coupons", "\"redeemed\"").await;
    assert_eq!(coupon.headers[HEADER_STEP], "coupon");
    assert_eq!(coupon.parents.len(), 1);
    assert_eq!(text(&coupon.parents["stock"]), Some("\"reserved\""));
    // The job API shows the parents on a get as well.
    assert_eq!(b.get(coupon.id).await.unwrap().parents, coupon.parents);

    let shipping = work(b, "wf-logistics", "\"shipped\"").await;
    assert_eq!(text(&shipping.parents["coupon"]), Some("\"redeemed\""));
    let done = workflow(b, started.id).await;
    assert_eq!(done.state, WorkflowState::Succeeded);
    assert!(done.finished_at_ms.is_some());
    assert_eq!(done.results.len(), 3);
    assert_eq!(&done.results["shipping"][..], b"\"shipped\"");
    assert!(done.steps.iter().all(|s| s.state == StepState::Completed));
    assert!(done.version > started.version);
    nothing_ready(b, "wf-undo").await;
}

pub async fn workflow_failure_compensates_in_reverse_order_once_each<H: Harness>(h: H) {
    let b = h.broker();
    let (started, _) = start(b, order_saga()).await;
    work(b, "wf-inventory", "\"s\"").await;
    work(b, "wf-coupons", "\"c\"").await;
    fail_for_good(b, "wf-logistics", "no courier").await;

    let failing = workflow(b, started.id).await;
    assert_eq!(failing.state, WorkflowState::Compensating);
    assert_eq!(failing.steps[2].state, StepState::Failed);
    assert_eq!(failing.steps[2].last_error.as_deref(), Some("no courier"));
    assert!(failing.error.as_deref().unwrap().contains("shipping"));

    // One compensation at a time, the last completed step's first.
    let undo_coupon = reserve_one(b, "wf-undo").await;
    nothing_ready(b, "wf-undo").await;
    assert_eq!(&undo_coupon.job.payload[..], b"{\"undo\":\"coupon\"}");
    assert_eq!(undo_coupon.job.headers[HEADER_STEP], "coupon");
    assert_eq!(text(&undo_coupon.job.parents["coupon"]), Some("\"c\""));
    b.complete(undo_coupon.lease, None).await.unwrap();

    let undo_stock = reserve_one(b, "wf-undo").await;
    assert_eq!(&undo_stock.job.payload[..], b"{\"undo\":\"stock\"}");
    assert_eq!(text(&undo_stock.job.parents["stock"]), Some("\"s\""));
    b.complete(undo_stock.lease, None).await.unwrap();
    nothing_ready(b, "wf-undo").await;

    let done = workflow(b, started.id).await;
    assert_eq!(done.state, WorkflowState::Compensated);
    assert_eq!(done.steps[0].state, StepState::Compensated);
    assert_eq!(done.steps[1].state, StepState::Compensated);
    assert!(done.results.is_empty());
    assert!(done.finished_at_ms.is_some());
}

pub async fn workflow_retries_a_step_before_failing_it<H: Harness>(h: H) {
    let b = h.broker();
    let mut saga = order_saga();
    saga.steps[0].job.max_attempts = Some(2);
    saga.steps[0].job.backoff = Some(no_jitter(1_000));
    let (started, _) = start(b, saga).await;
    let leased = reserve_one(b, "wf-inventory").await;
    let failed = call(
        b,
        Op::Fail {
            lease: leased.lease,
            error: "busy".into(),
            retry_in_ms: None,
            permanent: false,
        },
    )
    .await
    .unwrap()
    .into_job()
    .unwrap();
    assert_eq!(failed.state, JobState::Delayed);
    assert_eq!(workflow(b, started.id).await.state, WorkflowState::Running);
    h.advance(1_000).await;
    work(b, "wf-inventory", "\"s\"").await;
    let view = workflow(b, started.id).await;
    assert_eq!(view.steps[0].state, StepState::Completed);
    assert_eq!(view.steps[0].attempts, 1);
}

pub async fn workflow_dag_fans_out_and_joins<H: Harness>(h: H) {
    let b = h.broker();
    let dag = NewWorkflow {
        steps: vec![
            step("fetch", "wf-dag", &[], None),
            step("left", "wf-left", &["fetch"], None),
            step("right", "wf-right", &["fetch"], None),
            step("join", "wf-join", &["left", "right"], None),
        ],
        ..NewWorkflow::default()
    };
    let (started, _) = start(b, dag).await;
    work(b, "wf-dag", "1").await;
    nothing_ready(b, "wf-join").await;
    let right = work(b, "wf-right", "3").await;
    assert_eq!(text(&right.parents["fetch"]), Some("1"));
    nothing_ready(b, "wf-join").await;
    work(b, "wf-left", "2").await;
    let join = work(b, "wf-join", "5").await;
    assert_eq!(join.parents.len(), 2);
    assert_eq!(text(&join.parents["left"]), Some("2"));
    assert_eq!(text(&join.parents["right"]), Some("3"));
    let done = workflow(b, started.id).await;
    assert_eq!(done.state, WorkflowState::Succeeded);
    assert_eq!(done.steps[3].depends_on, ["left", "right"]);
}

pub async fn workflow_validation_names_the_step<H: Harness>(h: H) {
    let b = h.broker();
    let cases = [
        (
            vec![
                step("a", "wf-v", &["b"], None),
                step("b", "wf-v", &["a"], None),
            ],
            "cycle",
        ),
        (vec![step("a", "wf-v", &["ghost"], None)], "ghost"),
        (
            vec![
                step("twice", "wf-v", &[], None),
                step("twice", "wf-v", &[], None),
            ],
            "duplicate",
        ),
    ];
    for (steps, says) in cases {
        let named: Vec<String> = steps.iter().map(|s| format!("{:?}", s.name)).collect();
        let refused = call(
            b,
            Op::StartWorkflow {
                workflow: NewWorkflow {
                    steps,
                    ..NewWorkflow::default()
                },
            },
        )
        .await;
        match refused {
            Err(BrokerError::Invalid { field, message }) => {
                assert!(field.starts_with("steps"), "{field}");
                assert!(message.contains(says), "{message}");
                assert!(
                    named.iter().any(|n| message.contains(n.as_str())),
                    "{message} names a step"
                );
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }
    let empty = call(
        b,
        Op::StartWorkflow {
            workflow: NewWorkflow::default(),
        },
    )
    .await;
    assert!(matches!(
        empty,
        Err(BrokerError::Invalid { field: "steps", .. })
    ));
    // Nothing was started or enqueued by the refusals.
    nothing_ready(b, "wf-v").await;
    match call(
        b,
        Op::ListWorkflows {
            state: None,
            after: None,
            limit: 10,
        },
    )
    .await
    .unwrap()
    {
        Outcome::Workflows(page) => assert!(page.workflows.is_empty()),
        other => panic!("expected workflows, got {other:?}"),
    }
    assert_eq!(
        call(b, Op::GetWorkflow { id: 999_999 }).await,
        Err(BrokerError::NotFound)
    );
}

pub async fn workflow_idempotency_key_starts_once<H: Harness>(h: H) {
    let b = h.broker();
    let keyed = || NewWorkflow {
        idempotency_key: Some("order-42".into()),
        idempotency_ttl_ms: Some(60_000),
        ..order_saga()
    };
    let (first, duplicate) = start(b, keyed()).await;
    assert!(!duplicate);
    let (again, duplicate) = start(b, keyed()).await;
    assert!(duplicate);
    assert_eq!(again.id, first.id);
    let _ = reserve_one(b, "wf-inventory").await;
    nothing_ready(b, "wf-inventory").await;
    // The key is the workflows' own: a job with the same key is unrelated.
    let (_, job_duplicate) = b
        .enqueue(
            queue("wf-inventory"),
            NewJob {
                idempotency_key: Some("order-42".into()),
                ..job("x")
            },
        )
        .await
        .unwrap();
    assert!(!job_duplicate);
    h.advance(60_001).await;
    let (later, duplicate) = start(b, keyed()).await;
    assert!(!duplicate, "the key expired");
    assert!(later.id > first.id);
}

pub async fn workflow_cancel_while_running_and_while_compensating<H: Harness>(h: H) {
    let b = h.broker();
    // Running: the running step is cancelled (its lease revoked), the
    // completed one compensated.
    let (running, _) = start(b, order_saga()).await;
    work(b, "wf-inventory", "\"s\"").await;
    let coupon = reserve_one(b, "wf-coupons").await;
    let cancelled = match call(b, Op::CancelWorkflow { id: running.id })
        .await
        .unwrap()
    {
        Outcome::Workflow { workflow, .. } => *workflow,
        other => panic!("expected a workflow, got {other:?}"),
    };
    assert_eq!(cancelled.state, WorkflowState::Compensating);
    assert!(cancelled.cancel_requested);
    assert_eq!(cancelled.steps[1].state, StepState::Cancelled);
    assert_eq!(cancelled.steps[2].state, StepState::Cancelled);
    assert_eq!(
        b.complete(coupon.lease, None).await,
        Err(BrokerError::Conflict(Conflict::Cancelled))
    );
    assert_eq!(
        b.get(coupon.job.id).await.unwrap().state,
        JobState::Cancelled
    );
    nothing_ready(b, "wf-logistics").await;
    let undo = reserve_one(b, "wf-undo").await;
    assert_eq!(undo.job.headers[HEADER_STEP], "stock");

    // Cancelling again while compensating changes nothing but the request.
    match call(b, Op::CancelWorkflow { id: running.id })
        .await
        .unwrap()
    {
        Outcome::Workflow { workflow, .. } => {
            assert_eq!(workflow.state, WorkflowState::Compensating)
        }
        other => panic!("expected a workflow, got {other:?}"),
    }
    nothing_ready(b, "wf-undo").await;
    b.complete(undo.lease, None).await.unwrap();
    assert_eq!(
        workflow(b, running.id).await.state,
        WorkflowState::Compensated
    );
    // A finished workflow cannot be cancelled.
    assert!(matches!(
        call(b, Op::CancelWorkflow { id: running.id }).await,
        Err(BrokerError::Conflict(_))
    ));
    assert_eq!(
        call(b, Op::CancelWorkflow { id: 999_999 }).await,
        Err(BrokerError::NotFound)
    );

    // Cancelling a job of a step by hand compensates too.
    let (second, _) = start(b, order_saga()).await;
    let stock = reserve_one(b, "wf-inventory").await;
    call(
        b,
        Op::Cancel {
            id: stock.job.id,
            expected_version: None,
        },
    )
    .await
    .unwrap();
    let view = workflow(b, second.id).await;
    assert_eq!(view.state, WorkflowState::Compensated, "nothing to undo");
    assert_eq!(view.steps[0].state, StepState::Failed);
    assert!(view.error.as_deref().unwrap().contains("stock"));
}

pub async fn workflow_compensation_failed_then_kick_resumes<H: Harness>(h: H) {
    let b = h.broker();
    let (started, _) = start(b, order_saga()).await;
    work(b, "wf-inventory", "\"s\"").await;
    work(b, "wf-coupons", "\"c\"").await;
    fail_for_good(b, "wf-logistics", "no courier").await;
    let undo_coupon = fail_for_good(b, "wf-undo", "coupon service down").await;
    let stuck = workflow(b, started.id).await;
    assert_eq!(stuck.state, WorkflowState::CompensationFailed);
    assert_eq!(stuck.steps[1].state, StepState::CompensationFailed);
    assert_eq!(stuck.steps[1].compensation_job, Some(undo_coupon.id));
    nothing_ready(b, "wf-undo").await;

    call(b, Op::Kick { id: undo_coupon.id }).await.unwrap();
    assert_eq!(
        workflow(b, started.id).await.state,
        WorkflowState::Compensating
    );
    let again = work(b, "wf-undo", "").await;
    assert_eq!(again.id, undo_coupon.id, "the kicked job itself runs again");
    let undo_stock = work(b, "wf-undo", "").await;
    assert_eq!(undo_stock.headers[HEADER_STEP], "stock");
    nothing_ready(b, "wf-undo").await;
    assert_eq!(
        workflow(b, started.id).await.state,
        WorkflowState::Compensated
    );
}

pub async fn workflow_list_filters_by_state_and_pages<H: Harness>(h: H) {
    let b = h.broker();
    let single = || NewWorkflow {
        steps: vec![step("only", "wf-list", &[], None)],
        ..NewWorkflow::default()
    };
    let (a, _) = start(b, single()).await;
    let (c, _) = start(b, single()).await;
    let (d, _) = start(b, single()).await;
    work(b, "wf-list", "1").await; // a succeeds
    let list = |state, after, limit| Op::ListWorkflows {
        state,
        after,
        limit,
    };
    let page = |o: Outcome| match o {
        Outcome::Workflows(page) => page,
        other => panic!("expected workflows, got {other:?}"),
    };
    let running = page(
        call(b, list(Some(WorkflowState::Running), None, 1))
            .await
            .unwrap(),
    );
    assert_eq!(running.workflows.len(), 1);
    assert_eq!(running.workflows[0].id, c.id);
    assert_eq!(running.next, Some(c.id));
    let rest = page(
        call(b, list(Some(WorkflowState::Running), running.next, 10))
            .await
            .unwrap(),
    );
    assert_eq!(
        rest.workflows.iter().map(|w| w.id).collect::<Vec<_>>(),
        [d.id]
    );
    assert_eq!(rest.next, None);
    let succeeded = page(
        call(b, list(Some(WorkflowState::Succeeded), None, 10))
            .await
            .unwrap(),
    );
    assert_eq!(
        succeeded.workflows.iter().map(|w| w.id).collect::<Vec<_>>(),
        [a.id]
    );
    assert!(matches!(
        call(b, list(None, None, 0)).await,
        Err(BrokerError::Invalid { field: "limit", .. })
    ));
}

pub async fn workflow_steps_work_over_beanstalkd<H: Harness>(h: H) {
    let b = h.broker();
    let (started, _) = start(b, order_saga()).await;
    let mut session = b.open_session(Peer::default()).expect("session");
    let replies = beanstalkd(
        &mut session,
        vec![Request::Watch(queue("wf-inventory")), Request::Reserve],
    )
    .await;
    let Response::Reserved { id, body } = &replies[1] else {
        panic!("reserved, got {replies:?}");
    };
    assert_eq!(&body[..], b"{\"do\":\"stock\"}");
    // A beanstalkd worker completes a step by deleting its job.
    let replies = beanstalkd(&mut session, vec![Request::Delete(*id)]).await;
    assert_eq!(replies, [Response::Deleted]);
    let coupon = reserve_one(b, "wf-coupons").await;
    assert_eq!(coupon.job.parents.get("stock"), Some(&None));
    // Burying one over beanstalkd fails the step.
    b.complete(coupon.lease, None).await.unwrap();
    let replies = beanstalkd(
        &mut session,
        vec![Request::Watch(queue("wf-logistics")), Request::Reserve],
    )
    .await;
    let Response::Reserved { id, .. } = &replies[1] else {
        panic!("reserved, got {replies:?}");
    };
    let replies = beanstalkd(&mut session, vec![Request::Bury { id: *id, pri: 1 }]).await;
    assert_eq!(replies, [Response::Buried]);
    let view = workflow(b, started.id).await;
    assert_eq!(view.state, WorkflowState::Compensating);
    assert_eq!(view.steps[1].state, StepState::Compensating);
}

pub async fn workflow_survives_restart_mid_flight<H: Harness>(h: H) {
    let (running, compensating, done) = {
        let b = h.broker();
        let (running, _) = start(
            b,
            NewWorkflow {
                idempotency_key: Some("survivor".into()),
                ..order_saga()
            },
        )
        .await;
        work(b, "wf-inventory", "\"s1\"").await;
        // Leave the coupon job reserved: a restart makes it ready again.
        let _ = reserve_one(b, "wf-coupons").await;

        let (compensating, _) = start(b, order_saga()).await;
        work(b, "wf-inventory", "\"s2\"").await;
        work(b, "wf-coupons", "\"c2\"").await;
        fail_for_good(b, "wf-logistics", "x").await;

        let single = NewWorkflow {
            steps: vec![step("only", "wf-restart", &[], None)],
            ..NewWorkflow::default()
        };
        let (done, _) = start(b, single).await;
        work(b, "wf-restart", "\"r\"").await;
        (
            workflow(b, running.id).await,
            workflow(b, compensating.id).await,
            workflow(b, done.id).await,
        )
    };
    let Some(h) = h.restart().await else {
        return; // keeps nothing: nothing to check
    };
    let b = h.broker();
    for before in [&running, &compensating, &done] {
        let after = workflow(b, before.id).await;
        assert_eq!(after.state, before.state);
        assert_eq!(after.version, before.version);
        assert_eq!(after.results, before.results);
        assert_eq!(
            after.steps.iter().map(|s| s.state).collect::<Vec<_>>(),
            before.steps.iter().map(|s| s.state).collect::<Vec<_>>()
        );
    }
    // The key survives.
    let (again, duplicate) = start(
        b,
        NewWorkflow {
            idempotency_key: Some("survivor".into()),
            ..order_saga()
        },
    )
    .await;
    assert!(duplicate);
    assert_eq!(again.id, running.id);

    // Both go on where they stopped: the coupon job is ready again, with
    // its parents; the compensation of the coupon is waiting.
    let coupon = work(b, "wf-coupons", "\"c1\"").await;
    assert_eq!(text(&coupon.parents["stock"]), Some("\"s1\""));
    let undo = reserve_one(b, "wf-undo").await;
    assert_eq!(undo.job.headers[HEADER_STEP], "coupon");
    assert_eq!(
        undo.job.headers[HEADER_WORKFLOW],
        compensating.id.to_string()
    );
    b.complete(undo.lease, None).await.unwrap();
    work(b, "wf-undo", "").await; // stock's, of the second workflow
    work(b, "wf-logistics", "\"ship\"").await;
    assert_eq!(
        workflow(b, running.id).await.state,
        WorkflowState::Succeeded
    );
    assert_eq!(
        workflow(b, compensating.id).await.state,
        WorkflowState::Compensated
    );
    // Ids go on from where they were.
    let (next, _) = start(b, order_saga()).await;
    assert!(next.id > done.id);
}
