use super::*;

fn q(name: &str) -> QueueName {
    QueueName::new(name.as_bytes()).expect("valid queue name")
}

fn job(payload: &str) -> NewJob {
    NewJob {
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        ..NewJob::default()
    }
}

fn step(name: &str, deps: &[&str], compensate: bool) -> NewStep {
    NewStep {
        name: name.into(),
        queue: q("work"),
        job: job(name),
        depends_on: deps.iter().map(|d| d.to_string()).collect(),
        compensate: compensate.then(|| (q("undo"), job(&format!("undo-{name}")))),
    }
}

fn definition(steps: Vec<NewStep>) -> NewWorkflow {
    NewWorkflow {
        name: Some("order-42".into()),
        steps,
        ..NewWorkflow::default()
    }
}

fn saga() -> NewWorkflow {
    definition(vec![
        step("stock", &[], true),
        step("coupon", &["stock"], true),
        step("shipping", &["coupon"], false),
    ])
}

/// Starts `def` and attaches job ids 100, 101, ... to what it enqueues.
struct Run {
    wf: Workflow,
    next_job: JobId,
    /// Every enqueue, in order, with the job id it got.
    enqueued: Vec<(JobId, Enqueue)>,
}

impl Run {
    fn start(def: NewWorkflow) -> Run {
        let (wf, fx) = Workflow::start(7, def, 1_000).expect("valid workflow");
        let mut run = Run {
            wf,
            next_job: 100,
            enqueued: Vec::new(),
        };
        run.carry_out(fx);
        run
    }

    fn carry_out(&mut self, fx: Effects) -> Effects {
        for e in &fx.enqueue {
            let id = self.next_job;
            self.next_job += 1;
            self.wf.attach_job(e.step, e.role, id);
            self.enqueued.push((id, e.clone()));
        }
        fx
    }

    fn step_index(&self, name: &str) -> u32 {
        self.wf
            .steps
            .iter()
            .position(|s| s.name == name)
            .expect("step exists") as u32
    }

    fn event(&mut self, name: &str, role: JobRole, event: JobEvent) -> Effects {
        let step = self.step_index(name);
        let fx = self.wf.on_job(step, role, event, 2_000).expect("legal");
        self.carry_out(fx)
    }

    fn complete(&mut self, name: &str, result: &str) -> Effects {
        self.event(
            name,
            JobRole::Step,
            JobEvent::Completed {
                result: Some(Bytes::copy_from_slice(result.as_bytes())),
            },
        )
    }

    fn enqueued_names(&self) -> Vec<(String, JobRole)> {
        self.enqueued
            .iter()
            .map(|(_, e)| (self.wf.steps[e.step as usize].name.clone(), e.role))
            .collect()
    }

    fn state(&self, name: &str) -> StepState {
        self.wf.progress[self.step_index(name) as usize].state
    }
}

fn invalid_message(def: NewWorkflow) -> (&'static str, String) {
    match validate(&def) {
        Err(BrokerError::Invalid { field, message }) => (field, message),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn validation_names_the_step() {
    let (field, message) = invalid_message(definition(vec![
        step("a", &["c"], false),
        step("b", &["a"], false),
        step("c", &["b"], false),
    ]));
    assert_eq!(field, "steps.depends_on");
    assert!(message.contains("cycle"), "{message}");
    assert!(["\"a\"", "\"b\"", "\"c\""]
        .iter()
        .any(|n| message.contains(n)));

    let (_, message) = invalid_message(definition(vec![step("a", &["a"], false)]));
    assert!(
        message.contains("\"a\"") && message.contains("cycle"),
        "{message}"
    );

    let (field, message) = invalid_message(definition(vec![step("a", &["ghost"], false)]));
    assert_eq!(field, "steps.depends_on");
    assert!(
        message.contains("\"a\"") && message.contains("\"ghost\""),
        "{message}"
    );

    let (field, message) = invalid_message(definition(vec![
        step("a", &[], false),
        step("a", &[], false),
    ]));
    assert_eq!(field, "steps.name");
    assert!(
        message.contains("\"a\"") && message.contains("duplicate"),
        "{message}"
    );

    let (field, _) = invalid_message(definition(vec![step("", &[], false)]));
    assert_eq!(field, "steps.name");
    let (field, _) = invalid_message(definition(vec![]));
    assert_eq!(field, "steps");

    let mut keyed = step("a", &[], false);
    keyed.job.idempotency_key = Some("k".into());
    let (field, message) = invalid_message(definition(vec![keyed]));
    assert_eq!(field, "steps.job");
    assert!(message.contains("\"a\""), "{message}");

    // A cycle downstream of a valid root, with a step hanging off it.
    let (_, message) = invalid_message(definition(vec![
        step("root", &[], false),
        step("x", &["root", "y"], false),
        step("y", &["x"], false),
        step("tail", &["y"], false),
    ]));
    assert!(
        message.contains("\"x\"") || message.contains("\"y\""),
        "{message}"
    );
    assert!(validate(&saga()).is_ok());
}

#[test]
fn a_saga_succeeds_passing_results_as_parents() {
    let mut run = Run::start(saga());
    assert_eq!(run.enqueued_names(), [("stock".into(), JobRole::Step)]);
    let first = &run.enqueued[0].1;
    assert_eq!(first.job.headers[HEADER_WORKFLOW], "7");
    assert_eq!(first.job.headers[HEADER_STEP], "stock");
    assert!(first.job.parents.is_empty());

    run.complete("stock", "s");
    let coupon = &run.enqueued[1].1;
    assert_eq!(coupon.job.parents["stock"].as_deref(), Some(&b"s"[..]));
    run.complete("coupon", "c");
    let fx = run.complete("shipping", "x");
    assert_eq!(
        fx.transition,
        Some((WorkflowState::Running, WorkflowState::Succeeded))
    );
    let view = run.wf.view(|_| None);
    assert_eq!(view.state, WorkflowState::Succeeded);
    assert_eq!(view.finished_at_ms, Some(2_000));
    assert_eq!(view.results.len(), 3);
    assert_eq!(view.results["coupon"].as_ref(), b"c");
    assert_eq!(view.steps[1].depends_on, ["stock"]);
    // Start + three completions.
    assert_eq!(view.version, 4);
}

#[test]
fn a_failure_compensates_in_reverse_order_of_completion_once_each() {
    let mut run = Run::start(saga());
    run.complete("stock", "s");
    run.complete("coupon", "c");
    let fx = run.event(
        "shipping",
        JobRole::Step,
        JobEvent::Buried {
            error: Some("no courier".into()),
        },
    );
    assert_eq!(
        fx.transition,
        Some((WorkflowState::Running, WorkflowState::Compensating))
    );
    assert!(
        fx.cancel.is_empty(),
        "the failed step's job is not cancelled"
    );
    assert_eq!(run.state("shipping"), StepState::Failed);
    assert_eq!(
        run.wf.status.error.as_deref(),
        Some("step shipping buried: no courier")
    );
    let comp = &run.enqueued.last().expect("a compensation").1;
    assert_eq!(comp.role, JobRole::Compensation);
    assert_eq!(comp.job.parents["coupon"].as_deref(), Some(&b"c"[..]));
    assert_eq!(comp.queue.as_str(), "undo");

    let fx = run.event(
        "coupon",
        JobRole::Compensation,
        JobEvent::Completed { result: None },
    );
    assert_eq!(fx.transition, None);
    let fx = run.event(
        "stock",
        JobRole::Compensation,
        JobEvent::Completed { result: None },
    );
    assert_eq!(
        fx.transition,
        Some((WorkflowState::Compensating, WorkflowState::Compensated))
    );
    let comps: Vec<_> = run
        .enqueued_names()
        .into_iter()
        .filter(|(_, r)| *r == JobRole::Compensation)
        .map(|(n, _)| n)
        .collect();
    assert_eq!(comps, ["coupon", "stock"]);
    // Late events change nothing.
    let fx = run.event("shipping", JobRole::Step, JobEvent::Kicked);
    assert!(!fx.changed);
    let fx = run.event(
        "stock",
        JobRole::Compensation,
        JobEvent::Completed { result: None },
    );
    assert!(!fx.changed);
}

#[test]
fn a_dag_fans_out_and_joins() {
    let mut run = Run::start(definition(vec![
        step("root", &[], true),
        step("left", &["root"], true),
        step("right", &["root"], false),
        step("join", &["left", "right"], true),
    ]));
    run.complete("root", "r");
    assert_eq!(
        run.enqueued_names()[1..],
        [
            ("left".into(), JobRole::Step),
            ("right".into(), JobRole::Step)
        ]
    );
    run.complete("right", "R");
    assert_eq!(run.enqueued.len(), 3, "join waits for left");
    run.complete("left", "L");
    let join = &run.enqueued[3].1;
    assert_eq!(join.job.parents.len(), 2);
    assert_eq!(join.job.parents["left"].as_deref(), Some(&b"L"[..]));
    run.complete("join", "J");
    assert_eq!(run.wf.status.state, WorkflowState::Succeeded);
}

#[test]
fn a_failure_cancels_running_steps_and_pending_ones_never_start() {
    let mut run = Run::start(definition(vec![
        step("root", &[], true),
        step("left", &["root"], true),
        step("right", &["root"], true),
        step("join", &["left", "right"], true),
    ]));
    run.complete("root", "r");
    let right_job = run.enqueued[2].0;
    let fx = run.event("left", JobRole::Step, JobEvent::Cancelled);
    assert_eq!(fx.cancel, [right_job]);
    assert_eq!(run.state("right"), StepState::Cancelled);
    assert_eq!(run.state("join"), StepState::Cancelled);
    assert_eq!(run.wf.status.error.as_deref(), Some("step left cancelled"));
    // The cancelled step's own completion can no longer count.
    let fx = run.complete("right", "late");
    assert!(!fx.changed);
    run.event(
        "root",
        JobRole::Compensation,
        JobEvent::Completed { result: None },
    );
    assert_eq!(run.wf.status.state, WorkflowState::Compensated);
}

#[test]
fn nothing_to_compensate_is_compensated_at_once() {
    let mut run = Run::start(definition(vec![
        step("a", &[], false),
        step("b", &["a"], false),
    ]));
    run.complete("a", "x");
    let fx = run.event("b", JobRole::Step, JobEvent::Buried { error: None });
    assert_eq!(
        fx.transition,
        Some((WorkflowState::Running, WorkflowState::Compensated))
    );
    assert!(run.wf.status.finished_at_ms.is_some());
}

#[test]
fn cancel_while_running_and_while_compensating() {
    let mut run = Run::start(saga());
    run.complete("stock", "s");
    let coupon_job = run.enqueued[1].0;
    let fx = run.wf.cancel(3_000).expect("cancel");
    let fx = run.carry_out(fx);
    assert_eq!(fx.cancel, [coupon_job]);
    assert!(run.wf.status.cancel_requested);
    assert_eq!(run.wf.status.error.as_deref(), Some("workflow cancelled"));
    assert_eq!(fx.enqueue.len(), 1);
    assert_eq!(run.state("stock"), StepState::Compensating);

    // Again while compensating: only noted, nothing new.
    let again = run.wf.cancel(3_000).expect("cancel again");
    assert!(!again.changed && again.enqueue.is_empty());
    run.event(
        "stock",
        JobRole::Compensation,
        JobEvent::Completed { result: None },
    );
    assert_eq!(run.wf.status.state, WorkflowState::Compensated);
    assert!(matches!(
        run.wf.cancel(4_000),
        Err(BrokerError::Conflict(_))
    ));
}

#[test]
fn compensation_failed_resumes_when_its_job_is_kicked() {
    let mut run = Run::start(saga());
    run.complete("stock", "s");
    run.complete("coupon", "c");
    run.event("shipping", JobRole::Step, JobEvent::Cancelled);
    let fx = run.event(
        "coupon",
        JobRole::Compensation,
        JobEvent::Buried {
            error: Some("coupon service down".into()),
        },
    );
    assert_eq!(
        fx.transition,
        Some((
            WorkflowState::Compensating,
            WorkflowState::CompensationFailed
        ))
    );
    assert!(!WorkflowState::CompensationFailed.is_final());
    let view = run.wf.view(|_| None);
    assert_eq!(view.steps[1].state, StepState::CompensationFailed);
    assert_eq!(
        view.steps[1].last_error.as_deref(),
        Some("coupon service down")
    );

    let fx = run.event("coupon", JobRole::Compensation, JobEvent::Kicked);
    assert_eq!(
        fx.transition,
        Some((
            WorkflowState::CompensationFailed,
            WorkflowState::Compensating
        ))
    );
    assert!(fx.enqueue.is_empty(), "the kicked job itself runs again");
    run.event(
        "coupon",
        JobRole::Compensation,
        JobEvent::Completed { result: None },
    );
    run.event(
        "stock",
        JobRole::Compensation,
        JobEvent::Completed { result: None },
    );
    assert_eq!(run.wf.status.state, WorkflowState::Compensated);
    let comps = run
        .enqueued_names()
        .into_iter()
        .filter(|(_, r)| *r == JobRole::Compensation)
        .count();
    assert_eq!(comps, 2, "a kick resumes; it enqueues nothing twice");
}

#[test]
fn a_cancelled_compensation_fails_for_good() {
    let mut run = Run::start(saga());
    run.complete("stock", "s");
    run.event("coupon", JobRole::Step, JobEvent::Buried { error: None });
    run.event("stock", JobRole::Compensation, JobEvent::Cancelled);
    assert_eq!(run.wf.status.state, WorkflowState::CompensationFailed);
}

#[test]
fn the_transition_tables_allow_only_the_rules() {
    use WorkflowState::*;
    let legal: Vec<_> = WorkflowState::ALL
        .iter()
        .flat_map(|&a| WorkflowState::ALL.iter().map(move |&b| (a, b)))
        .filter(|&(a, b)| workflow_transition_is_legal(a, b))
        .collect();
    assert_eq!(
        legal,
        [
            (Running, Succeeded),
            (Running, Compensating),
            (Compensating, Compensated),
            (Compensating, CompensationFailed),
            (CompensationFailed, Compensating),
        ]
    );
    for s in WorkflowState::ALL {
        if s.is_final() {
            assert!(WorkflowState::ALL
                .iter()
                .all(|&t| !workflow_transition_is_legal(s, t)));
        }
    }
    assert!(!step_transition_is_legal(
        StepState::Completed,
        StepState::Running
    ));
    assert!(!step_transition_is_legal(
        StepState::Compensated,
        StepState::Compensating
    ));
}

#[test]
fn the_encodings_round_trip() {
    let mut def = saga();
    def.idempotency_key = Some("order-42".into());
    def.steps[0].job.priority = Some(3);
    def.steps[0].job.run_at = RunAt::DelayMs(5);
    def.steps[0].job.backoff = Some(spool_broker::Backoff::default());
    def.steps[0]
        .job
        .headers
        .insert("trace".into(), "abc".into());
    def.steps[1].job.ttr_ms = Some(9);
    def.steps[1].job.max_attempts = Some(2);
    let mut run = Run::start(def);
    run.complete("stock", "s");
    run.event(
        "coupon",
        JobRole::Step,
        JobEvent::Buried {
            error: Some("e".into()),
        },
    );

    let mut bytes = Vec::new();
    run.wf.encode(&mut bytes);
    assert_eq!(Workflow::decode(&bytes), Ok(run.wf.clone()));
    for cut in 0..bytes.len() {
        assert!(Workflow::decode(&bytes[..cut]).is_err());
    }
    let mut wrong_version = bytes.clone();
    wrong_version[0] = 9;
    assert_eq!(
        Workflow::decode(&wrong_version),
        Err(RecordError::UnknownVersion(9))
    );

    // Replaying progress records onto the workflow as started rebuilds it.
    let mut run2 = Run::start(saga());
    let mut replayed = run2.wf.clone();
    let fx = run2.complete("stock", "s");
    let record = run2.wf.progress_record(&fx.changed_steps);
    let mut bytes = Vec::new();
    record.encode(&mut bytes);
    let decoded = WorkflowProgress::decode(&bytes).expect("decodes");
    assert_eq!(decoded, record);
    replayed.apply_progress(&decoded).expect("applies");
    assert_eq!(replayed, run2.wf);
}

#[test]
fn the_idempotency_key_expires_after_its_ttl() {
    let mut def = saga();
    def.idempotency_key = Some("k".into());
    def.idempotency_ttl_ms = Some(500);
    let (wf, _) = Workflow::start(1, def, 1_000).expect("valid");
    assert_eq!(wf.idempotency_expires_at_ms, 1_500);
}

#[test]
fn cancel_in_every_state() {
    // Running: compensation starts (tested above). Compensation failed:
    // only the request is noted, nothing is enqueued or cancelled.
    let mut run = Run::start(saga());
    run.complete("stock", "s");
    run.event("coupon", JobRole::Step, JobEvent::Buried { error: None });
    run.event(
        "stock",
        JobRole::Compensation,
        JobEvent::Buried { error: None },
    );
    assert_eq!(run.wf.status.state, WorkflowState::CompensationFailed);
    let version = run.wf.status.version;
    let fx = run.wf.cancel(5_000).expect("cancel");
    assert!(fx.changed && fx.transition.is_none());
    assert!(fx.enqueue.is_empty() && fx.cancel.is_empty());
    assert!(run.wf.status.cancel_requested);
    assert_eq!(run.wf.status.version, version + 1);
    // A kick still resumes it.
    let fx = run.event("stock", JobRole::Compensation, JobEvent::Kicked);
    assert_eq!(
        fx.transition,
        Some((
            WorkflowState::CompensationFailed,
            WorkflowState::Compensating
        ))
    );
    // Succeeded: a conflict, nothing changes.
    let mut done = Run::start(definition(vec![step("a", &[], true)]));
    done.complete("a", "x");
    let before = done.wf.clone();
    assert!(matches!(
        done.wf.cancel(6_000),
        Err(BrokerError::Conflict(_))
    ));
    assert_eq!(done.wf, before);
}
