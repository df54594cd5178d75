//! Workflows against a simple model: random DAGs whose steps complete, are
//! retried, fail for good or are cancelled, in random order, sometimes with
//! the workflow cancelled or a compensation buried and kicked. Whatever
//! happens, the compensations that run are exactly those of the completed
//! steps that have one, in reverse order of completion, one at a time, once
//! each. And a crash after any operation (the log up to there, replayed)
//! rebuilds the workflows as they were, also from a compaction.

use std::collections::BTreeMap;

use bytes::Bytes;
use proptest::prelude::*;
use spool_broker::workflow::HEADER_STEP;
use spool_broker::{
    Backoff, JobState, Lease, Leased, NewJob, NewStep, NewWorkflow, Op, Outcome, QueueName,
    WorkflowState, WorkflowView,
};
use spool_engine::{Engine, EngineConfig, LogRecord};

const MS: u64 = 1_000_000;
const EPOCH_NS: u64 = 1_577_836_800_000_000_000;
/// Rounds of reserving and working before the run must have ended.
const ROUNDS_MAX: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Plan {
    Complete,
    /// Fails once with an attempt left, then completes.
    RetryThenComplete,
    /// Fails for good: buried.
    Bury,
    /// Cancelled by hand while reserved.
    Cancel,
}

#[derive(Debug, Clone)]
struct Case {
    /// Step i depends on the steps < i whose bits are set.
    deps: Vec<u32>,
    compensates: Vec<bool>,
    plans: Vec<Plan>,
    /// The order jobs are worked in, a seed per round.
    order_seeds: Vec<u64>,
    /// Cancel the workflow at this round, if any.
    cancel_at: Option<usize>,
    /// Bury the first attempt of the n-th compensation, then kick it.
    bury_compensation: Option<usize>,
    cut_at: prop::sample::Index,
}

fn case() -> impl Strategy<Value = Case> {
    (1..7usize).prop_flat_map(|n| {
        (
            prop::collection::vec(any::<u32>(), n),
            prop::collection::vec(any::<bool>(), n),
            prop::collection::vec(
                prop_oneof![
                    6 => Just(Plan::Complete),
                    2 => Just(Plan::RetryThenComplete),
                    1 => Just(Plan::Bury),
                    1 => Just(Plan::Cancel),
                ],
                n,
            ),
            prop::collection::vec(any::<u64>(), ROUNDS_MAX),
            proptest::option::weighted(0.2, 0..12usize),
            proptest::option::weighted(0.3, 0..4usize),
            any::<prop::sample::Index>(),
        )
            .prop_map(
                |(deps, compensates, plans, order_seeds, cancel_at, bury_compensation, cut_at)| {
                    Case {
                        deps: deps
                            .iter()
                            .enumerate()
                            .map(|(i, d)| if i == 0 { 0 } else { d & ((1 << i) - 1) })
                            .collect(),
                        compensates,
                        plans,
                        order_seeds,
                        cancel_at,
                        bury_compensation,
                        cut_at,
                    }
                },
            )
    })
}

fn queue(name: &str) -> QueueName {
    QueueName::new(name.as_bytes()).expect("valid queue name")
}

fn name(i: usize) -> String {
    format!("s{i}")
}

fn definition(case: &Case) -> NewWorkflow {
    let steps = (0..case.deps.len())
        .map(|i| NewStep {
            name: name(i),
            queue: queue("steps"),
            job: NewJob {
                payload: Bytes::from(name(i)),
                max_attempts: Some(2),
                backoff: Some(Backoff {
                    initial_ms: 5,
                    max_ms: 5,
                    multiplier: 1.0,
                    jitter: 0.0,
                }),
                ..NewJob::default()
            },
            depends_on: (0..i)
                .filter(|d| case.deps[i] & (1 << d) != 0)
                .map(name)
                .collect(),
            compensate: case.compensates[i].then(|| {
                (
                    queue("undo"),
                    NewJob {
                        payload: Bytes::from(format!("undo-{i}")),
                        ..NewJob::default()
                    },
                )
            }),
        })
        .collect();
    NewWorkflow {
        steps,
        ..NewWorkflow::default()
    }
}

fn workflow(engine: &mut Engine, now: u64) -> WorkflowView {
    match engine.apply(Op::GetWorkflow { id: 1 }, now) {
        Ok(Outcome::Workflow { workflow, .. }) => *workflow,
        other => panic!("workflow 1: {other:?}"),
    }
}

fn replayed(records: &[LogRecord], now: u64) -> Engine {
    let mut engine = Engine::new(EngineConfig { max_job_size: 1000 });
    engine.set_epoch_ns(EPOCH_NS);
    engine.set_replay_now(now);
    for record in records {
        let mut bytes = Vec::new();
        record.encode(EPOCH_NS, &mut bytes);
        let decoded = LogRecord::decode(&bytes, EPOCH_NS).expect("a logged record decodes");
        engine.replay(decoded).expect("a logged record applies");
    }
    engine.check_invariants();
    engine
}

/// What a restart keeps of a view: everything (a reserved job shows as
/// ready again, which the step view reflects in `job_state`).
fn restarted(mut view: WorkflowView) -> WorkflowView {
    for step in &mut view.steps {
        if step.job_state == Some(JobState::Reserved) {
            step.job_state = Some(JobState::Ready);
        }
    }
    view
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn compensations_are_exactly_the_completed_steps_in_reverse(case in case()) {
        let mut engine = Engine::new(EngineConfig { max_job_size: 1000 });
        engine.set_epoch_ns(EPOCH_NS);
        engine.enable_logging();
        let mut now = 1_000 * MS;
        let mut log: Vec<LogRecord> = Vec::new();
        // (log length, the workflow as it was then) after every operation.
        let mut checkpoints: Vec<(usize, WorkflowView)> = Vec::new();
        let started = engine.apply(Op::StartWorkflow { workflow: definition(&case) }, now);
        prop_assert!(matches!(started, Ok(Outcome::Workflow { .. })), "{:?}", started);
        engine.drain_log_into(&mut log);
        checkpoints.push((log.len(), workflow(&mut engine, now)));
        let cut = case.cut_at.index(ROUNDS_MAX);
        let mut compacted: Option<(usize, Vec<LogRecord>)> = None;

        let mut completed: Vec<usize> = Vec::new(); // steps, in completion order
        let mut compensations: Vec<usize> = Vec::new(); // in the order they ran
        let mut compensations_started = 0usize;
        let mut failed_once: Vec<bool> = vec![false; case.deps.len()];
        let mut buried_compensation: Option<u64> = None;
        let mut compensating_from: Option<Vec<usize>> = None;
        let mut rounds = 0;
        loop {
            prop_assert!(rounds < ROUNDS_MAX, "the workflow ends within {} rounds", ROUNDS_MAX);
            if rounds == cut && compacted.is_none() {
                let mut after_cut = engine.compaction_start_records();
                for id in engine.compaction_ids() {
                    after_cut.extend(engine.snapshot_record(id));
                }
                compacted = Some((log.len(), after_cut));
            }
            if case.cancel_at == Some(rounds) {
                let cancelled = engine.apply(Op::CancelWorkflow { id: 1 }, now);
                prop_assert!(cancelled.is_ok() || workflow(&mut engine, now).state.is_final());
            }
            let leased: Vec<Leased> = match engine.apply(
                Op::Reserve { queues: vec![queue("steps"), queue("undo")], batch: 100, timeout_ms: 0 },
                now,
            ) {
                Ok(Outcome::Leased(jobs)) => jobs,
                other => panic!("reserve: {other:?}"),
            };
            let undo = leased.iter().filter(|l| l.job.queue == "undo").count();
            prop_assert!(undo <= 1, "one compensation at a time");
            let state = workflow(&mut engine, now).state;
            if leased.is_empty() {
                if state.is_final() {
                    break;
                }
                // A retried step waits for its backoff.
                now += 5 * MS;
                engine.tick(now);
                rounds += 1;
                continue;
            }
            let mut order: Vec<usize> = (0..leased.len()).collect();
            let mut seed = case.order_seeds[rounds];
            for i in (1..order.len()).rev() {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                order.swap(i, (seed >> 33) as usize % (i + 1));
            }
            for i in order {
                let Leased { job, lease } = &leased[i];
                let step: usize = job.headers[HEADER_STEP][1..].parse().expect("step index");
                let lease: Lease = *lease;
                if job.queue == "undo" {
                    if compensating_from.is_none() {
                        compensating_from = Some(completed.clone());
                    }
                    if case.bury_compensation == Some(compensations_started) && buried_compensation.is_none() {
                        engine.apply(Op::Fail { lease, error: "down".into(), retry_in_ms: None, permanent: true }, now).expect("fail");
                        prop_assert_eq!(workflow(&mut engine, now).state, WorkflowState::CompensationFailed);
                        buried_compensation = Some(job.id);
                        engine.apply(Op::Kick { id: job.id }, now).expect("kick");
                        prop_assert_eq!(workflow(&mut engine, now).state, WorkflowState::Compensating);
                        continue;
                    }
                    compensations_started += 1;
                    compensations.push(step);
                    engine.apply(Op::Complete { lease, result: None }, now).expect("complete compensation");
                    continue;
                }
                let outcome = match case.plans[step] {
                    Plan::Complete => engine.apply(Op::Complete { lease, result: Some(Bytes::from(name(step))) }, now),
                    Plan::RetryThenComplete if !failed_once[step] => {
                        failed_once[step] = true;
                        engine.apply(Op::Fail { lease, error: "again".into(), retry_in_ms: None, permanent: false }, now)
                    }
                    Plan::RetryThenComplete => engine.apply(Op::Complete { lease, result: Some(Bytes::from(name(step))) }, now),
                    Plan::Bury => engine.apply(Op::Fail { lease, error: "for good".into(), retry_in_ms: None, permanent: true }, now),
                    Plan::Cancel => engine.apply(Op::Cancel { id: job.id, expected_version: None }, now),
                };
                let completes = matches!(case.plans[step], Plan::Complete)
                    || (case.plans[step] == Plan::RetryThenComplete && !outcome.as_ref().is_ok_and(|o| matches!(o, Outcome::Job(j) if j.state == JobState::Delayed)));
                match outcome {
                    Ok(_) if completes => completed.push(step),
                    Ok(_) => {}
                    // Its job was cancelled by the workflow meanwhile.
                    Err(spool_broker::BrokerError::Conflict(_)) => {}
                    Err(e) => panic!("step {step}: {e:?}"),
                }
            }
            engine.tick(now);
            engine.check_invariants();
            engine.drain_log_into(&mut log);
            checkpoints.push((log.len(), workflow(&mut engine, now)));
            rounds += 1;
        }

        engine.drain_log_into(&mut log);
        let end = workflow(&mut engine, now);
        checkpoints.push((log.len(), end.clone()));
        let failed = case.plans.iter().any(|p| matches!(p, Plan::Bury | Plan::Cancel))
            || case.cancel_at.is_some_and(|c| c <= rounds);
        if !failed || end.state == WorkflowState::Succeeded {
            prop_assert_eq!(end.state, WorkflowState::Succeeded);
            prop_assert_eq!(completed.len(), case.deps.len());
            prop_assert!(compensations.is_empty());
            prop_assert_eq!(end.results.len(), case.deps.len());
        } else {
            prop_assert_eq!(end.state, WorkflowState::Compensated);
            // Exactly the completed steps with a compensation, latest first.
            let expected: Vec<usize> = completed
                .iter()
                .rev()
                .copied()
                .filter(|&s| case.compensates[s])
                .collect();
            prop_assert_eq!(&compensations, &expected);
            if let Some(from) = &compensating_from {
                prop_assert_eq!(from, &completed, "no step completed once compensation began");
            }
        }

        // A crash after any operation: the log up to there rebuilds it.
        for (len, view) in &checkpoints {
            let mut back = replayed(&log[..*len], now);
            prop_assert_eq!(restarted(workflow(&mut back, now)), restarted(view.clone()));
        }
        if let Some((cut_len, mut after_cut)) = compacted {
            after_cut.extend(log[cut_len..].iter().cloned());
            let mut back = replayed(&after_cut, now);
            prop_assert_eq!(workflow(&mut back, now), end.clone(), "compacted log");
            prop_assert_eq!(back.next_workflow_id(), 2);
        }
        let mut whole = replayed(&log, now);
        prop_assert_eq!(workflow(&mut whole, now), end);
        // Nothing is left to do.
        let left: BTreeMap<_, _> = engine.jobs().map(|j| (j.id, j.state)).collect();
        prop_assert!(left.values().all(|s| *s == JobState::Buried), "{:?}", left);
    }
}

fn single(key: Option<&str>, queue_name: &str) -> NewWorkflow {
    NewWorkflow {
        idempotency_key: key.map(str::to_string),
        steps: vec![NewStep {
            name: "only".into(),
            queue: queue(queue_name),
            job: NewJob {
                payload: Bytes::from_static(b"1"),
                ..NewJob::default()
            },
            depends_on: Vec::new(),
            compensate: None,
        }],
        ..NewWorkflow::default()
    }
}

/// Starts a one-step workflow and completes its step.
fn run_one(engine: &mut Engine, key: Option<&str>, now: u64) -> u64 {
    let id = match engine.apply(
        Op::StartWorkflow {
            workflow: single(key, "one"),
        },
        now,
    ) {
        Ok(Outcome::Workflow { workflow, .. }) => workflow.id,
        other => panic!("start: {other:?}"),
    };
    let leased = match engine.apply(
        Op::Reserve {
            queues: vec![queue("one")],
            batch: 1,
            timeout_ms: 0,
        },
        now,
    ) {
        Ok(Outcome::Leased(mut jobs)) => jobs.remove(0),
        other => panic!("reserve: {other:?}"),
    };
    engine
        .apply(
            Op::Complete {
                lease: leased.lease,
                result: None,
            },
            now,
        )
        .expect("complete");
    id
}

fn deletes(log: &[LogRecord]) -> Vec<u64> {
    let mut out = Vec::new();
    for record in log {
        match record {
            LogRecord::WorkflowDelete { id } => out.push(*id),
            LogRecord::Batch(inner) => out.extend(deletes(inner)),
            _ => {}
        }
    }
    out
}

#[test]
fn finished_workflows_are_dropped_after_their_retention_by_age_and_count() {
    use spool_engine::limits::{WORKFLOW_RETENTION_MAX, WORKFLOW_RETENTION_MS};
    let mut engine = Engine::new(EngineConfig { max_job_size: 1000 });
    engine.set_epoch_ns(EPOCH_NS);
    engine.enable_logging();
    let mut now = 1_000 * MS;
    let first = run_one(&mut engine, Some("kept-key"), now);
    // A running workflow is never dropped, whatever its age.
    let running = match engine.apply(
        Op::StartWorkflow {
            workflow: single(None, "never-worked"),
        },
        now,
    ) {
        Ok(Outcome::Workflow { workflow, .. }) => workflow.id,
        other => panic!("start: {other:?}"),
    };
    now += (WORKFLOW_RETENTION_MS - 1) * MS;
    engine.tick(now);
    assert!(
        engine.workflow_view(first).is_some(),
        "kept until its retention ends"
    );
    now += MS;
    engine.tick(now);
    assert!(
        engine.workflow_view(first).is_none(),
        "dropped at its retention's end"
    );
    assert!(engine.workflow_view(running).is_some());
    // Its key went with it: the same key starts a new workflow.
    let again = run_one(&mut engine, Some("kept-key"), now);
    assert!(again > first);

    // By count: the oldest finished go first.
    let mut ids = Vec::new();
    for _ in 0..WORKFLOW_RETENTION_MAX {
        ids.push(run_one(&mut engine, None, now));
    }
    assert!(engine.workflow_view(again).is_none(), "the oldest went");
    assert!(ids.iter().all(|&id| engine.workflow_view(id).is_some()));
    assert!(engine.workflow_view(running).is_some());
    engine.check_invariants();

    // Every drop is logged; the log rebuilds the same set.
    let mut log = Vec::new();
    engine.drain_log_into(&mut log);
    assert_eq!(deletes(&log), [first, again]);
    let back = replayed(&log, now);
    assert!(back.workflow_view(first).is_none());
    assert!(back.workflow_view(again).is_none());
    assert!(back.workflow_view(running).is_some());
    assert_eq!(back.next_workflow_id(), engine.next_workflow_id());
    assert_eq!(
        ids.iter()
            .filter(|&&id| back.workflow_view(id).is_some())
            .count(),
        WORKFLOW_RETENTION_MAX
    );
}

/// A finished workflow's retention is a timer of its own: an idle engine
/// wakes for it even when no job is left to wake it.
#[test]
fn next_wake_includes_a_finished_workflows_retention() {
    use spool_engine::limits::{RETENTION_MS_DEFAULT, WORKFLOW_RETENTION_MS};
    let mut engine = Engine::new(EngineConfig { max_job_size: 1000 });
    engine.set_epoch_ns(EPOCH_NS);
    let now = 1_000 * MS;
    let id = run_one(&mut engine, None, now);
    // Its step job's retention (shorter) passes first.
    engine.tick(now + RETENTION_MS_DEFAULT * MS + MS);
    assert_eq!(engine.next_wake(), Some(now + WORKFLOW_RETENTION_MS * MS));
    assert!(engine.workflow_view(id).is_some());
    engine.tick(now + WORKFLOW_RETENTION_MS * MS);
    assert!(engine.workflow_view(id).is_none());
    assert_eq!(engine.next_wake(), None);
}
