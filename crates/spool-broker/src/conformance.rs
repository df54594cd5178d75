//! The conformance suite: the job model's semantics as tests generic over a
//! [`Harness`], so every broker (in memory, the local log, PostgreSQL) is
//! held to the same rules by the same code.
//!
//! A backend runs the suite by implementing [`Harness`] and invoking
//! [`conformance_tests!`](crate::conformance_tests) in a test file with an
//! expression that makes a fresh harness:
//!
//! ```ignore
//! spool_broker::conformance_tests!(make_in_memory_harness());
//! ```
//!
//! Time is the harness's: [`Harness::advance`] moves the broker's clock, so
//! no case sleeps to wait for a delay, a lease or a retention.

// Test code shipped as a library: a failed unwrap is a failed case.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::task::Poll;

use bytes::Bytes;
use spool_proto::{Put, PutBody, Request, Response};

use crate::model::{
    Backoff, JobChange, JobState, JobView, Lease, NewJob, Op, Outcome, QueueName, QueuePolicy,
    RunAt,
};
use crate::schedule::{firing_key, HEADER_SCHEDULE, HEADER_SCHEDULED_AT};
use crate::{Broker, BrokerError, Conflict, Misfire, Peer, ScheduleSpec, ScheduleView, Session};

mod workflows;
pub use workflows::*;

/// What the suite needs of a backend under test.
pub trait Harness: Sized + Send {
    type Broker: Broker;

    fn broker(&self) -> &Self::Broker;

    /// Moves the broker's clock `ms` forward; timers due by then have run
    /// before any operation sent after this returns is answered.
    fn advance(&self, ms: u64) -> impl Future<Output = ()> + Send;

    /// Stops the broker and starts it again on the same storage; `None` for
    /// a broker that keeps nothing (the durability cases then pass
    /// vacuously, which is right for them).
    fn restart(self) -> impl Future<Output = Option<Self>> + Send;
}

/// Expands to one `#[tokio::test]` per case, each with a harness made by
/// `$make` (an expression evaluating to a future of the harness).
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@cases $make;
            enqueue_defaults_and_get,
            delayed_job_becomes_ready,
            reserve_batch_in_priority_order,
            complete_keeps_result,
            fail_retries_with_backoff_then_buries,
            lease_expiry_is_a_failed_attempt,
            heartbeat_extends_the_lease,
            cancel_revokes_the_lease,
            idempotency_key_dedupes_within_ttl,
            update_checks_version,
            delete_refuses_reserved_jobs,
            batch_is_all_or_none,
            a_batch_answers_each_job_as_get_shows_it,
            release_is_not_an_attempt,
            bury_and_kick,
            peek_shows_each_state_in_beanstalkds_order,
            list_pages_and_purge,
            retention_by_count_and_age,
            a_queue_keeping_no_final_jobs_forgets_each_as_it_completes,
            queue_policy_defaults_and_max_jobs,
            pause_and_resume,
            blocked_reserve_wakes_and_times_out,
            job_wait_ends_when_the_job_settles_or_its_time_is_up,
            beanstalkd_and_typed_ops_share_jobs,
            beanstalkd_put_keeps_beanstalkd_semantics,
            everything_survives_restart,
            concurrency_caps_reservations_over_both_front_doors,
            rate_limits_dispatch_and_wakes_waiters,
            // Workflows (conformance/workflows.rs).
            workflow_saga_succeeds_passing_parents,
            workflow_failure_compensates_in_reverse_order_once_each,
            workflow_retries_a_step_before_failing_it,
            workflow_dag_fans_out_and_joins,
            workflow_validation_names_the_step,
            workflow_idempotency_key_starts_once,
            workflow_cancel_while_running_and_while_compensating,
            workflow_compensation_failed_then_kick_resumes,
            workflow_list_filters_by_state_and_pages,
            workflow_steps_work_over_beanstalkd,
            workflow_survives_restart_mid_flight,
            // Schedules (issue 11).
            schedule_create_get_list_replace_delete,
            schedule_fires_at_due_instants_with_key_and_headers,
            schedule_fires_each_instant_once_across_restart,
            schedule_misfire_policies_when_late_and_after_restart,
            schedule_pause_resume_trigger,
            schedule_max_backlog_skips_while_jobs_wait,
            schedule_replaced_after_firing_keeps_its_history,
            schedule_holds_its_instants_while_draining,
            schedule_firing_is_not_done_before_its_instant_and_survives_restart,
            schedule_changed_just_before_its_instant_fires_nothing_stale,
            schedule_skip_fires_nothing_missed_while_down,
        );
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                $crate::conformance::$case($make.await).await;
            }
        )*
    };
}

fn queue(name: &str) -> QueueName {
    QueueName::new(name.as_bytes()).expect("valid queue name")
}

fn job(payload: &str) -> NewJob {
    NewJob {
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        ..NewJob::default()
    }
}

fn no_jitter(initial_ms: u64) -> Backoff {
    Backoff {
        initial_ms,
        max_ms: initial_ms * 100,
        multiplier: 2.0,
        jitter: 0.0,
    }
}

async fn enqueue<B: Broker>(broker: &B, q: &str, new: NewJob) -> JobView {
    broker.enqueue(queue(q), new).await.expect("enqueue").0
}

async fn reserve_one<B: Broker>(broker: &B, q: &str) -> crate::Leased {
    let mut jobs = broker.reserve(vec![queue(q)], 1, 0).await.expect("reserve");
    assert_eq!(jobs.len(), 1, "one job is ready in {q}");
    jobs.remove(0)
}

async fn call<B: Broker>(broker: &B, op: Op) -> Result<Outcome, BrokerError> {
    broker.call(op).await
}

async fn job_of<B: Broker>(broker: &B, op: Op) -> JobView {
    call(broker, op).await.expect("op").into_job().expect("job")
}

/// Polls both futures until both are done, `a` first each time: the suite
/// needs no runtime of its own.
async fn both<A: Future, B: Future>(a: A, b: B) -> (A::Output, B::Output) {
    let mut a = pin!(a);
    let mut b = pin!(b);
    let mut out_a = None;
    let mut out_b = None;
    poll_fn(|cx| {
        if out_a.is_none() {
            if let Poll::Ready(v) = a.as_mut().poll(cx) {
                out_a = Some(v);
            }
        }
        if out_b.is_none() {
            if let Poll::Ready(v) = b.as_mut().poll(cx) {
                out_b = Some(v);
            }
        }
        if out_a.is_some() && out_b.is_some() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    (out_a.expect("done"), out_b.expect("done"))
}

pub async fn enqueue_defaults_and_get<H: Harness>(h: H) {
    let b = h.broker();
    let made = enqueue(b, "orders", job("{\"order\":42}")).await;
    assert_eq!(made.queue, "orders");
    assert_eq!(made.state, JobState::Ready);
    assert_eq!(made.priority, 1024);
    assert_eq!(made.ttr_ms, 60_000);
    assert_eq!(made.max_attempts, 25);
    assert_eq!(made.backoff, Backoff::default());
    assert_eq!(made.attempts, 0);
    assert!(made.version >= 1);
    assert!(made.id >= 1);
    let got = b.get(made.id).await.expect("get");
    assert_eq!(got, made, "get shows the job as enqueue answered it");
    assert_eq!(b.get(made.id + 1000).await, Err(BrokerError::NotFound));
    let second = enqueue(b, "orders", job("x")).await;
    assert!(second.id > made.id, "ids grow");
}

pub async fn delayed_job_becomes_ready<H: Harness>(h: H) {
    let b = h.broker();
    let made = enqueue(
        b,
        "later",
        NewJob {
            run_at: RunAt::DelayMs(5_000),
            ..job("d")
        },
    )
    .await;
    assert_eq!(made.state, JobState::Delayed);
    let due = made.run_at_ms.expect("a delayed job has a run_at");
    assert!(due >= made.created_at_ms + 5_000);
    assert!(b
        .reserve(vec![queue("later")], 1, 0)
        .await
        .unwrap()
        .is_empty());
    h.advance(4_999).await;
    assert!(b
        .reserve(vec![queue("later")], 1, 0)
        .await
        .unwrap()
        .is_empty());
    h.advance(1).await;
    let ready = b.get(made.id).await.unwrap();
    assert_eq!(ready.state, JobState::Ready);
    assert!(ready.version > made.version, "becoming ready is a change");
    assert_eq!(reserve_one(b, "later").await.job.id, made.id);
}

pub async fn reserve_batch_in_priority_order<H: Harness>(h: H) {
    let b = h.broker();
    let low = enqueue(
        b,
        "a",
        NewJob {
            priority: Some(10),
            ..job("low")
        },
    )
    .await;
    let high = enqueue(
        b,
        "b",
        NewJob {
            priority: Some(1),
            ..job("high")
        },
    )
    .await;
    let _other = enqueue(
        b,
        "c",
        NewJob {
            priority: Some(0),
            ..job("c")
        },
    )
    .await;
    let mid = enqueue(
        b,
        "a",
        NewJob {
            priority: Some(5),
            ..job("mid")
        },
    )
    .await;
    let got = b
        .reserve(vec![queue("a"), queue("b")], 10, 0)
        .await
        .unwrap();
    let ids: Vec<u64> = got.iter().map(|l| l.job.id).collect();
    assert_eq!(ids, vec![high.id, mid.id, low.id]);
    for leased in &got {
        assert_eq!(leased.job.state, JobState::Reserved);
        assert_eq!(leased.lease.job, leased.job.id);
        assert!(leased.job.deadline_at_ms.is_some());
    }
    let two = b.reserve(vec![queue("c")], 0, 0).await;
    assert!(
        matches!(two, Err(BrokerError::Invalid { field: "batch", .. })),
        "{two:?}"
    );
}

pub async fn complete_keeps_result<H: Harness>(h: H) {
    let b = h.broker();
    let made = enqueue(b, "q", job("p")).await;
    let leased = reserve_one(b, "q").await;
    let done = b
        .complete(leased.lease, Some(Bytes::from_static(b"{\"ok\":true}")))
        .await
        .unwrap();
    assert_eq!(done.id, made.id);
    assert_eq!(done.state, JobState::Completed);
    assert_eq!(done.result.as_deref(), Some(&b"{\"ok\":true}"[..]));
    assert!(done.finished_at_ms.is_some());
    assert_eq!(b.get(made.id).await.unwrap(), done);
    let again = b.complete(leased.lease, None).await;
    assert_eq!(again, Err(BrokerError::Conflict(Conflict::LeaseExpired)));
    assert!(b.reserve(vec![queue("q")], 1, 0).await.unwrap().is_empty());
}

pub async fn fail_retries_with_backoff_then_buries<H: Harness>(h: H) {
    let b = h.broker();
    let made = enqueue(
        b,
        "retry",
        NewJob {
            max_attempts: Some(2),
            backoff: Some(no_jitter(1_000)),
            ..job("r")
        },
    )
    .await;
    let first = reserve_one(b, "retry").await;
    let failed = job_of(
        b,
        Op::Fail {
            lease: first.lease,
            error: "boom".into(),
            retry_in_ms: None,
            permanent: false,
        },
    )
    .await;
    assert_eq!(failed.state, JobState::Delayed);
    assert_eq!(failed.attempts, 1);
    assert_eq!(failed.last_error.as_deref(), Some("boom"));
    let due = failed.run_at_ms.expect("retry has a run_at");
    assert!(due >= failed.updated_at_ms + 1_000 && due <= failed.updated_at_ms + 1_001);
    h.advance(999).await;
    assert!(b
        .reserve(vec![queue("retry")], 1, 0)
        .await
        .unwrap()
        .is_empty());
    h.advance(1).await;
    let second = reserve_one(b, "retry").await;
    assert_ne!(second.lease, first.lease, "a new reservation, a new lease");
    let dead = job_of(
        b,
        Op::Fail {
            lease: second.lease,
            error: "boom again".into(),
            retry_in_ms: None,
            permanent: false,
        },
    )
    .await;
    assert_eq!(dead.state, JobState::Buried, "attempts used up");
    assert_eq!(dead.attempts, 2);
    assert_eq!(dead.last_error.as_deref(), Some("boom again"));
    let kicked = job_of(b, Op::Kick { id: made.id }).await;
    assert_eq!(kicked.state, JobState::Ready);
    // A permanent failure buries at once; retry_in_ms overrides the backoff.
    let third = reserve_one(b, "retry").await;
    let dead = job_of(
        b,
        Op::Fail {
            lease: third.lease,
            error: "bad input".into(),
            retry_in_ms: None,
            permanent: true,
        },
    )
    .await;
    assert_eq!(dead.state, JobState::Buried);
    let other = enqueue(b, "retry", job("o")).await;
    let leased = reserve_one(b, "retry").await;
    assert_eq!(leased.job.id, other.id);
    let later = job_of(
        b,
        Op::Fail {
            lease: leased.lease,
            error: "busy".into(),
            retry_in_ms: Some(30_000),
            permanent: false,
        },
    )
    .await;
    assert_eq!(later.run_at_ms, Some(later.updated_at_ms + 30_000));
}

pub async fn lease_expiry_is_a_failed_attempt<H: Harness>(h: H) {
    let b = h.broker();
    let made = enqueue(
        b,
        "ttr",
        NewJob {
            ttr_ms: Some(2_000),
            max_attempts: Some(3),
            backoff: Some(no_jitter(500)),
            ..job("t")
        },
    )
    .await;
    let leased = reserve_one(b, "ttr").await;
    h.advance(2_001).await;
    let expired = b.get(made.id).await.unwrap();
    assert_eq!(
        expired.state,
        JobState::Delayed,
        "retried after its backoff"
    );
    assert_eq!(expired.attempts, 1);
    assert!(expired.version > leased.job.version);
    let late = call(
        b,
        Op::Heartbeat {
            lease: leased.lease,
        },
    )
    .await;
    assert_eq!(late, Err(BrokerError::Conflict(Conflict::LeaseExpired)));
    h.advance(500).await;
    assert_eq!(reserve_one(b, "ttr").await.job.id, made.id);
}

pub async fn heartbeat_extends_the_lease<H: Harness>(h: H) {
    let b = h.broker();
    let made = enqueue(
        b,
        "hb",
        NewJob {
            ttr_ms: Some(1_000),
            ..job("h")
        },
    )
    .await;
    let leased = reserve_one(b, "hb").await;
    let first_deadline = leased.job.deadline_at_ms.unwrap();
    h.advance(800).await;
    let Outcome::Deadline(deadline) = call(
        b,
        Op::Heartbeat {
            lease: leased.lease,
        },
    )
    .await
    .unwrap() else {
        panic!("heartbeat answers a deadline");
    };
    assert_eq!(deadline, first_deadline + 800);
    h.advance(800).await;
    assert_eq!(b.get(made.id).await.unwrap().state, JobState::Reserved);
    let done = b.complete(leased.lease, None).await.unwrap();
    assert_eq!(done.attempts, 0);
}

pub async fn cancel_revokes_the_lease<H: Harness>(h: H) {
    let b = h.broker();
    let made = enqueue(b, "c", job("c")).await;
    let leased = reserve_one(b, "c").await;
    let cancelled = job_of(
        b,
        Op::Cancel {
            id: made.id,
            expected_version: None,
        },
    )
    .await;
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert!(cancelled.cancel_requested);
    assert!(cancelled.finished_at_ms.is_some());
    let cancelled_err = BrokerError::Conflict(Conflict::Cancelled);
    assert_eq!(
        call(
            b,
            Op::Heartbeat {
                lease: leased.lease
            }
        )
        .await,
        Err(cancelled_err.clone())
    );
    assert_eq!(
        b.complete(leased.lease, None).await,
        Err(cancelled_err.clone())
    );
    let fail = call(
        b,
        Op::Fail {
            lease: leased.lease,
            error: "x".into(),
            retry_in_ms: None,
            permanent: false,
        },
    )
    .await;
    assert_eq!(fail, Err(cancelled_err));
    assert_eq!(b.get(made.id).await.unwrap().state, JobState::Cancelled);
    let twice = call(
        b,
        Op::Cancel {
            id: made.id,
            expected_version: None,
        },
    )
    .await;
    assert_eq!(
        twice,
        Err(BrokerError::Conflict(Conflict::WrongState(
            JobState::Cancelled
        )))
    );
    // A delayed job cancelled never becomes ready.
    let delayed = enqueue(
        b,
        "c",
        NewJob {
            run_at: RunAt::DelayMs(1_000),
            ..job("d")
        },
    )
    .await;
    job_of(
        b,
        Op::Cancel {
            id: delayed.id,
            expected_version: Some(delayed.version),
        },
    )
    .await;
    h.advance(2_000).await;
    assert!(b.reserve(vec![queue("c")], 1, 0).await.unwrap().is_empty());
}

pub async fn idempotency_key_dedupes_within_ttl<H: Harness>(h: H) {
    let b = h.broker();
    let keyed = |payload: &str| NewJob {
        idempotency_key: Some("order-42-cancel".into()),
        idempotency_ttl_ms: Some(10_000),
        ..job(payload)
    };
    let (first, dup) = b.enqueue(queue("k"), keyed("one")).await.unwrap();
    assert!(!dup);
    assert_eq!(first.idempotency_key.as_deref(), Some("order-42-cancel"));
    let (second, dup) = b.enqueue(queue("k"), keyed("two")).await.unwrap();
    assert!(dup, "the key wins");
    assert_eq!(second.id, first.id);
    assert_eq!(&second.payload[..], b"one");
    // The key also holds after the job is done, within its ttl.
    let leased = reserve_one(b, "k").await;
    b.complete(leased.lease, None).await.unwrap();
    let (third, dup) = b.enqueue(queue("k"), keyed("three")).await.unwrap();
    assert!(dup);
    assert_eq!(third.id, first.id);
    h.advance(10_000).await;
    let (fresh, dup) = b.enqueue(queue("k"), keyed("four")).await.unwrap();
    assert!(!dup, "the key expired");
    assert_ne!(fresh.id, first.id);
    // Keys are per queue.
    let (elsewhere, dup) = b.enqueue(queue("k2"), keyed("five")).await.unwrap();
    assert!(!dup);
    assert_ne!(elsewhere.id, fresh.id);
}

pub async fn update_checks_version<H: Harness>(h: H) {
    let b = h.broker();
    let made = enqueue(b, "u", job("u")).await;
    let stale = call(
        b,
        Op::Update {
            id: made.id,
            expected_version: Some(made.version + 1),
            change: JobChange {
                priority: Some(7),
                ..JobChange::default()
            },
        },
    )
    .await;
    assert_eq!(
        stale,
        Err(BrokerError::VersionMismatch {
            current: made.version
        })
    );
    let mut headers = BTreeMap::new();
    headers.insert("trace".to_string(), "abc".to_string());
    let changed = job_of(
        b,
        Op::Update {
            id: made.id,
            expected_version: Some(made.version),
            change: JobChange {
                priority: Some(7),
                payload: Some(Bytes::from_static(b"v2")),
                headers: Some(headers.clone()),
                run_at: Some(RunAt::DelayMs(1_000)),
                max_attempts: Some(3),
            },
        },
    )
    .await;
    assert_eq!(changed.priority, 7);
    assert_eq!(&changed.payload[..], b"v2");
    assert_eq!(changed.headers, headers);
    assert_eq!(changed.state, JobState::Delayed);
    assert_eq!(changed.max_attempts, 3);
    assert!(changed.version > made.version);
    h.advance(1_000).await;
    let leased = reserve_one(b, "u").await;
    let refused = call(
        b,
        Op::Update {
            id: made.id,
            expected_version: None,
            change: JobChange::default(),
        },
    )
    .await;
    assert_eq!(
        refused,
        Err(BrokerError::Conflict(Conflict::WrongState(
            JobState::Reserved
        )))
    );
    b.complete(leased.lease, None).await.unwrap();
}

pub async fn delete_refuses_reserved_jobs<H: Harness>(h: H) {
    let b = h.broker();
    let made = enqueue(b, "del", job("x")).await;
    let leased = reserve_one(b, "del").await;
    let refused = call(
        b,
        Op::Delete {
            id: made.id,
            expected_version: None,
        },
    )
    .await;
    assert_eq!(
        refused,
        Err(BrokerError::Conflict(Conflict::WrongState(
            JobState::Reserved
        )))
    );
    let released = job_of(
        b,
        Op::Release {
            lease: leased.lease,
            delay_ms: 0,
            priority: None,
        },
    )
    .await;
    let wrong = call(
        b,
        Op::Delete {
            id: made.id,
            expected_version: Some(released.version + 5),
        },
    )
    .await;
    assert!(matches!(wrong, Err(BrokerError::VersionMismatch { .. })));
    assert_eq!(
        call(
            b,
            Op::Delete {
                id: made.id,
                expected_version: Some(released.version),
            },
        )
        .await,
        Ok(Outcome::Done)
    );
    assert_eq!(b.get(made.id).await, Err(BrokerError::NotFound));
}

pub async fn batch_is_all_or_none<H: Harness>(h: H) {
    let b = h.broker();
    let bad = NewJob {
        backoff: Some(Backoff {
            multiplier: 0.5,
            ..Backoff::default()
        }),
        ..job("bad")
    };
    let refused = call(
        b,
        Op::EnqueueBatch {
            jobs: vec![(queue("batch"), job("one")), (queue("batch"), bad)],
        },
    )
    .await;
    assert!(
        matches!(refused, Err(BrokerError::Invalid { .. })),
        "{refused:?}"
    );
    assert!(b
        .reserve(vec![queue("batch")], 10, 0)
        .await
        .unwrap()
        .is_empty());
    let Outcome::Batch(jobs) = call(
        b,
        Op::EnqueueBatch {
            jobs: vec![(queue("batch"), job("one")), (queue("other"), job("two"))],
        },
    )
    .await
    .unwrap() else {
        panic!("a batch answers its jobs");
    };
    assert_eq!(jobs.len(), 2);
    assert_eq!(jobs[1].queue, "other");
    // A queue that is full refuses the whole batch.
    call(
        b,
        Op::SetPolicy {
            queue: queue("small"),
            policy: QueuePolicy {
                max_jobs: Some(1),
                ..QueuePolicy::default()
            },
        },
    )
    .await
    .unwrap();
    let full = call(
        b,
        Op::EnqueueBatch {
            jobs: vec![(queue("small"), job("1")), (queue("small"), job("2"))],
        },
    )
    .await;
    assert_eq!(full, Err(BrokerError::QueueFull { max_jobs: 1 }));
    assert!(b
        .reserve(vec![queue("small")], 10, 0)
        .await
        .unwrap()
        .is_empty());
}

/// A batch enqueue's answer is each job as it was stored: the PostgreSQL
/// broker builds these views from what it sent, not from the rows.
pub async fn a_batch_answers_each_job_as_get_shows_it<H: Harness>(h: H) {
    let b = h.broker();
    call(
        b,
        Op::SetPolicy {
            queue: queue("shaped"),
            policy: QueuePolicy {
                max_attempts: Some(7),
                backoff: Some(no_jitter(300)),
                ttr_ms: Some(45_000),
                ..QueuePolicy::default()
            },
        },
    )
    .await
    .unwrap();
    let own = NewJob {
        priority: Some(5),
        ttr_ms: Some(9_000),
        max_attempts: Some(2),
        backoff: Some(no_jitter(50)),
        ..job("own")
    };
    let later = NewJob {
        run_at: RunAt::DelayMs(60_000),
        priority: Some(4_000_000_000),
        ..job("later")
    };
    let jobs = vec![
        (queue("shaped"), job("defaults")),
        (queue("shaped"), own.clone()),
        (queue("plain"), job("plain")),
        (queue("shaped"), later),
        (queue("plain"), own),
    ];
    let Outcome::Batch(made) = call(b, Op::EnqueueBatch { jobs }).await.unwrap() else {
        panic!("a batch answers its jobs");
    };
    let payloads: Vec<&[u8]> = made.iter().map(|j| &j.payload[..]).collect();
    assert_eq!(
        payloads,
        [&b"defaults"[..], b"own", b"plain", b"later", b"own"],
        "in the batch's order"
    );
    assert!(made.windows(2).all(|w| w[0].id < w[1].id), "ids in order");
    assert_eq!(
        (made[0].max_attempts, made[0].ttr_ms, made[0].backoff),
        (7, 45_000, no_jitter(300)),
        "the queue's policy"
    );
    assert_eq!(made[3].state, JobState::Delayed);
    for view in &made {
        assert_eq!(&b.get(view.id).await.unwrap(), view);
    }
}

pub async fn release_is_not_an_attempt<H: Harness>(h: H) {
    let b = h.broker();
    let made = enqueue(b, "rel", job("x")).await;
    let leased = reserve_one(b, "rel").await;
    let released = job_of(
        b,
        Op::Release {
            lease: leased.lease,
            delay_ms: 2_000,
            priority: Some(3),
        },
    )
    .await;
    assert_eq!(released.state, JobState::Delayed);
    assert_eq!(released.attempts, 0);
    assert_eq!(released.priority, 3);
    h.advance(2_000).await;
    assert_eq!(reserve_one(b, "rel").await.job.id, made.id);
}

/// `Op::Peek` (beanstalkd's peek-ready, -delayed, -buried on a broker
/// whose sessions speak `Op`s): the next ready job by priority then id,
/// the delayed job due soonest, the job buried longest ago; none of them
/// is the lowest id here.
pub async fn peek_shows_each_state_in_beanstalkds_order<H: Harness>(h: H) {
    let b = h.broker();
    let peek = |state| {
        call(
            b,
            Op::Peek {
                queue: queue("pk"),
                state,
            },
        )
    };
    assert_eq!(peek(JobState::Ready).await, Err(BrokerError::NotFound));
    let with = |payload: &str, priority: u32, delay_ms: u64| NewJob {
        priority: Some(priority),
        run_at: if delay_ms > 0 {
            RunAt::DelayMs(delay_ms)
        } else {
            RunAt::Now
        },
        ..job(payload)
    };
    let low = enqueue(b, "pk", with("low", 10, 0)).await;
    let urgent = enqueue(b, "pk", with("urgent", 5, 0)).await;
    enqueue(b, "pk", with("urgent too", 5, 0)).await;
    enqueue(b, "pk", with("later", 0, 60_000)).await;
    let sooner = enqueue(b, "pk", with("sooner", 0, 30_000)).await;
    let peeked = |outcome: Result<Outcome, BrokerError>| outcome.unwrap().into_job().unwrap().id;
    assert_eq!(peeked(peek(JobState::Ready).await), urgent.id);
    assert_eq!(peeked(peek(JobState::Delayed).await), sooner.id);
    assert_eq!(peek(JobState::Buried).await, Err(BrokerError::NotFound));
    for (made, after_ms) in [(&urgent, 1), (&low, 0)] {
        let bury = Op::Bury {
            id: made.id,
            lease: None,
            reason: None,
        };
        assert_eq!(job_of(b, bury).await.state, JobState::Buried);
        h.advance(after_ms).await;
    }
    assert_eq!(peeked(peek(JobState::Buried).await), urgent.id);
    assert!(matches!(
        peek(JobState::Reserved).await,
        Err(BrokerError::Invalid { .. })
    ));
}

pub async fn bury_and_kick<H: Harness>(h: H) {
    let b = h.broker();
    let made = enqueue(b, "bk", job("x")).await;
    let buried = job_of(
        b,
        Op::Bury {
            id: made.id,
            lease: None,
            reason: Some("looked wrong".into()),
        },
    )
    .await;
    assert_eq!(buried.state, JobState::Buried);
    assert_eq!(buried.last_error.as_deref(), Some("looked wrong"));
    assert!(b.reserve(vec![queue("bk")], 1, 0).await.unwrap().is_empty());
    let kicked = job_of(b, Op::Kick { id: made.id }).await;
    assert_eq!(kicked.state, JobState::Ready);
    let leased = reserve_one(b, "bk").await;
    let wrong_lease = Lease {
        job: made.id,
        token: leased.lease.token + 1,
    };
    let refused = call(
        b,
        Op::Bury {
            id: made.id,
            lease: Some(wrong_lease),
            reason: None,
        },
    )
    .await;
    assert_eq!(refused, Err(BrokerError::Conflict(Conflict::LeaseExpired)));
    let buried = job_of(
        b,
        Op::Bury {
            id: made.id,
            lease: Some(leased.lease),
            reason: None,
        },
    )
    .await;
    assert_eq!(buried.state, JobState::Buried);
    let again = call(b, Op::Kick { id: made.id }).await.unwrap();
    assert_eq!(again.into_job().unwrap().state, JobState::Ready);
    assert_eq!(
        call(b, Op::Kick { id: made.id }).await,
        Err(BrokerError::Conflict(Conflict::WrongState(JobState::Ready)))
    );
}

pub async fn list_pages_and_purge<H: Harness>(h: H) {
    let b = h.broker();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(enqueue(b, "list", job(&format!("{i}"))).await.id);
    }
    enqueue(
        b,
        "list",
        NewJob {
            run_at: RunAt::DelayMs(9_000),
            ..job("d")
        },
    )
    .await;
    let Outcome::Page(page) = call(
        b,
        Op::List {
            queue: queue("list"),
            state: JobState::Ready,
            after: None,
            limit: 3,
        },
    )
    .await
    .unwrap() else {
        panic!("a page");
    };
    assert_eq!(page.jobs.iter().map(|j| j.id).collect::<Vec<_>>(), ids[..3]);
    assert_eq!(page.next, Some(ids[2]));
    let Outcome::Page(rest) = call(
        b,
        Op::List {
            queue: queue("list"),
            state: JobState::Ready,
            after: page.next,
            limit: 3,
        },
    )
    .await
    .unwrap() else {
        panic!("a page");
    };
    assert_eq!(rest.jobs.iter().map(|j| j.id).collect::<Vec<_>>(), ids[3..]);
    assert_eq!(rest.next, None);
    let purged = call(
        b,
        Op::Purge {
            queue: queue("list"),
            state: JobState::Ready,
        },
    )
    .await
    .unwrap();
    assert_eq!(purged, Outcome::Purged(5));
    let Outcome::Queue(info) = call(
        b,
        Op::GetQueue {
            queue: queue("list"),
        },
    )
    .await
    .unwrap() else {
        panic!("a queue");
    };
    assert_eq!((info.ready, info.delayed), (0, 1));
    let Outcome::Queues(all) = call(b, Op::ListQueues).await.unwrap() else {
        panic!("queues");
    };
    assert!(all.iter().any(|q| q.name == "list" && q.delayed == 1));
}

pub async fn retention_by_count_and_age<H: Harness>(h: H) {
    let b = h.broker();
    call(
        b,
        Op::SetPolicy {
            queue: queue("ret"),
            policy: QueuePolicy {
                retention_max_jobs: Some(2),
                retention_ms: Some(60_000),
                ..QueuePolicy::default()
            },
        },
    )
    .await
    .unwrap();
    let mut done = Vec::new();
    for i in 0..3 {
        enqueue(b, "ret", job(&format!("{i}"))).await;
        let leased = reserve_one(b, "ret").await;
        done.push(b.complete(leased.lease, None).await.unwrap().id);
        h.advance(1_000).await;
    }
    assert_eq!(
        b.get(done[0]).await,
        Err(BrokerError::NotFound),
        "over count"
    );
    assert_eq!(b.get(done[1]).await.unwrap().state, JobState::Completed);
    h.advance(58_000).await;
    assert_eq!(b.get(done[1]).await, Err(BrokerError::NotFound), "over age");
    assert_eq!(b.get(done[2]).await.unwrap().state, JobState::Completed);
    h.advance(1_000).await;
    assert_eq!(b.get(done[2]).await, Err(BrokerError::NotFound));
}

/// `retention_max_jobs: 0`: a completed job is answered as completed (with
/// its result and new version) and is gone at once, its idempotency key
/// with it; on PostgreSQL the completion deletes the row instead of moving
/// it to the final jobs, which is what makes such a queue cheaper there.
pub async fn a_queue_keeping_no_final_jobs_forgets_each_as_it_completes<H: Harness>(h: H) {
    let b = h.broker();
    call(
        b,
        Op::SetPolicy {
            queue: queue("none"),
            policy: QueuePolicy {
                retention_max_jobs: Some(0),
                ..QueuePolicy::default()
            },
        },
    )
    .await
    .unwrap();
    let keyed = || NewJob {
        idempotency_key: Some("order-7".into()),
        ..job("keyed")
    };
    let made = enqueue(b, "none", keyed()).await;
    let leased = reserve_one(b, "none").await;
    let done = b
        .complete(leased.lease, Some(Bytes::from_static(b"ok")))
        .await
        .unwrap();
    assert_eq!((done.id, done.state), (made.id, JobState::Completed));
    assert_eq!(done.result, Some(Bytes::from_static(b"ok")));
    assert_eq!(done.version, leased.job.version + 1);
    assert_eq!(b.get(made.id).await, Err(BrokerError::NotFound));
    let (again, duplicate) = b.enqueue(queue("none"), keyed()).await.unwrap();
    assert!(!duplicate, "the key went with its job");
    assert_ne!(again.id, made.id);
    // Another queue's completed jobs are kept as before.
    enqueue(b, "kept", job("k")).await;
    let other = reserve_one(b, "kept").await;
    b.complete(other.lease, None).await.unwrap();
    assert_eq!(
        b.get(other.job.id).await.unwrap().state,
        JobState::Completed
    );
}

pub async fn queue_policy_defaults_and_max_jobs<H: Harness>(h: H) {
    let b = h.broker();
    let policy = QueuePolicy {
        max_jobs: Some(2),
        max_attempts: Some(1),
        backoff: Some(no_jitter(50)),
        ttr_ms: Some(5_000),
        ..QueuePolicy::default()
    };
    call(
        b,
        Op::SetPolicy {
            queue: queue("pol"),
            policy: policy.clone(),
        },
    )
    .await
    .unwrap();
    let made = enqueue(b, "pol", job("a")).await;
    assert_eq!((made.max_attempts, made.ttr_ms), (1, 5_000));
    assert_eq!(made.backoff, no_jitter(50));
    let own = enqueue(
        b,
        "pol",
        NewJob {
            max_attempts: Some(9),
            ..job("b")
        },
    )
    .await;
    assert_eq!(own.max_attempts, 9, "the job's own setting wins");
    let full = b.enqueue(queue("pol"), job("c")).await;
    assert_eq!(full, Err(BrokerError::QueueFull { max_jobs: 2 }));
    let Outcome::Queue(info) = call(
        b,
        Op::GetQueue {
            queue: queue("pol"),
        },
    )
    .await
    .unwrap() else {
        panic!("a queue");
    };
    assert_eq!(info.policy, policy);
    assert_eq!(info.ready, 2);
    let leased = reserve_one(b, "pol").await;
    let dead = job_of(
        b,
        Op::Fail {
            lease: leased.lease,
            error: "once is enough".into(),
            retry_in_ms: None,
            permanent: false,
        },
    )
    .await;
    assert_eq!(dead.state, JobState::Buried);
    let bad = call(
        b,
        Op::SetPolicy {
            queue: queue("pol"),
            policy: QueuePolicy {
                backoff: Some(Backoff {
                    jitter: 2.0,
                    ..Backoff::default()
                }),
                ..QueuePolicy::default()
            },
        },
    )
    .await;
    assert!(matches!(
        bad,
        Err(BrokerError::Invalid {
            field: "backoff.jitter",
            ..
        })
    ));
}

pub async fn pause_and_resume<H: Harness>(h: H) {
    let b = h.broker();
    let made = enqueue(b, "p", job("x")).await;
    call(
        b,
        Op::Pause {
            queue: queue("p"),
            duration_ms: None,
        },
    )
    .await
    .unwrap();
    assert!(b.reserve(vec![queue("p")], 1, 0).await.unwrap().is_empty());
    h.advance(3_600_000).await;
    assert!(b.reserve(vec![queue("p")], 1, 0).await.unwrap().is_empty());
    call(b, Op::Resume { queue: queue("p") }).await.unwrap();
    assert_eq!(reserve_one(b, "p").await.job.id, made.id);
    // A timed pause ends by itself.
    enqueue(b, "p", job("y")).await;
    call(
        b,
        Op::Pause {
            queue: queue("p"),
            duration_ms: Some(1_000),
        },
    )
    .await
    .unwrap();
    assert!(b.reserve(vec![queue("p")], 1, 0).await.unwrap().is_empty());
    h.advance(1_000).await;
    assert_eq!(
        reserve_one(b, "p").await.job.payload,
        Bytes::from_static(b"y")
    );
}

pub async fn blocked_reserve_wakes_and_times_out<H: Harness>(h: H) {
    let b = h.broker();
    let (got, made) = both(
        b.reserve(vec![queue("w")], 5, 60_000),
        enqueue(b, "w", job("wake")),
    )
    .await;
    let got = got.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].job.id, made.id);
    let (empty, ()) = both(b.reserve(vec![queue("w")], 1, 1_000), h.advance(1_000)).await;
    assert!(empty.unwrap().is_empty());
}

pub async fn job_wait_ends_when_the_job_settles_or_its_time_is_up<H: Harness>(h: H) {
    let b = h.broker();
    let made = enqueue(b, "jw", job("wait")).await;
    let id = made.id;
    // Sent first, so it is held when the worker completes the job.
    let (waited, ()) = both(
        job_of(
            b,
            Op::Wait {
                id,
                wait_ms: 60_000,
            },
        ),
        async {
            let leased = reserve_one(b, "jw").await;
            let result = Some(Bytes::from_static(b"\"done\""));
            let lease = leased.lease;
            job_of(b, Op::Complete { lease, result }).await;
        },
    )
    .await;
    assert_eq!(waited.state, JobState::Completed);
    assert_eq!(waited.result.as_deref(), Some(&b"\"done\""[..]));
    // A settled job answers at once.
    let again = job_of(
        b,
        Op::Wait {
            id,
            wait_ms: 60_000,
        },
    )
    .await;
    assert_eq!(again.state, JobState::Completed);
    // Nothing happens: the job as it is once the time is up.
    let other = enqueue(b, "jw", job("idle")).await;
    let wait = Op::Wait {
        id: other.id,
        wait_ms: 1_000,
    };
    let (waited, ()) = both(job_of(b, wait), h.advance(1_000)).await;
    assert_eq!(waited.state, JobState::Ready);
    assert_eq!(waited.version, other.version);
    // A buried job ends a wait too: it runs again only if kicked.
    let wait = Op::Wait {
        id: other.id,
        wait_ms: 60_000,
    };
    let bury = Op::Bury {
        id: other.id,
        lease: None,
        reason: None,
    };
    let (waited, ()) = both(job_of(b, wait), async {
        job_of(b, bury).await;
    })
    .await;
    assert_eq!(waited.state, JobState::Buried);
    let missing = Op::Wait {
        id: 1 << 40,
        wait_ms: 1_000,
    };
    assert_eq!(call(b, missing).await, Err(BrokerError::NotFound));
}

/// Runs beanstalkd requests on a session and collects one reply each.
async fn beanstalkd<S: Session>(session: &mut S, requests: Vec<Request>) -> Vec<Response> {
    let want = requests.len();
    session.submit(requests).expect("submit");
    let mut replies = Vec::new();
    poll_fn(|cx| {
        while replies.len() < want {
            match session.poll_recv(cx, &mut replies) {
                Poll::Ready(true) => {}
                Poll::Ready(false) => panic!("session closed"),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(())
    })
    .await;
    replies
}

fn put(body: &'static [u8]) -> Request {
    Request::Put(Put {
        pri: 5,
        delay_secs: 0,
        ttr_secs: 30,
        body: PutBody::Complete(Bytes::from_static(body)),
    })
}

pub async fn beanstalkd_and_typed_ops_share_jobs<H: Harness>(h: H) {
    let b = h.broker();
    let mut session = b.open_session(Peer::default()).expect("session");
    let tube = queue("shared");
    let replies = beanstalkd(&mut session, vec![Request::Use(tube.clone()), put(b"hi")]).await;
    let Response::Inserted(id) = replies[1] else {
        panic!("inserted: {replies:?}");
    };
    let seen = b.get(id).await.unwrap();
    assert_eq!(
        (seen.state, seen.priority, seen.ttr_ms),
        (JobState::Ready, 5, 30_000)
    );
    assert_eq!(&seen.payload[..], b"hi");
    assert_eq!(
        seen.max_attempts, 0,
        "beanstalkd puts have no attempt limit"
    );
    let typed = enqueue(b, "shared", job("typed")).await;
    let replies = beanstalkd(
        &mut session,
        vec![
            Request::Watch(tube),
            Request::Ignore(queue("default")),
            Request::Reserve,
            Request::Reserve,
        ],
    )
    .await;
    assert!(
        matches!(&replies[2], Response::Reserved { id: got, .. } if *got == id),
        "{replies:?}"
    );
    assert!(
        matches!(&replies[3], Response::Reserved { id: got, body } if *got == typed.id && &body[..] == b"typed"),
        "{replies:?}"
    );
    assert_eq!(b.get(typed.id).await.unwrap().state, JobState::Reserved);
    // Cancelling a job a beanstalkd worker holds: its next touch or delete
    // finds nothing.
    job_of(
        b,
        Op::Cancel {
            id: typed.id,
            expected_version: None,
        },
    )
    .await;
    let replies = beanstalkd(
        &mut session,
        vec![
            Request::Touch(typed.id),
            Request::Delete(typed.id),
            Request::Delete(id),
        ],
    )
    .await;
    assert_eq!(
        replies,
        vec![Response::NotFound, Response::NotFound, Response::Deleted]
    );
    assert_eq!(
        b.get(id).await,
        Err(BrokerError::NotFound),
        "deleted is gone"
    );
    assert_eq!(b.get(typed.id).await.unwrap().state, JobState::Cancelled);
    // A disconnect hands the session's leases back.
    let another = enqueue(b, "shared", job("held")).await;
    let replies = beanstalkd(&mut session, vec![Request::Reserve]).await;
    assert!(matches!(&replies[0], Response::Reserved { id, .. } if *id == another.id));
    drop(session);
    let back = b.reserve(vec![queue("shared")], 1, 1_000).await.unwrap();
    assert_eq!(back[0].job.id, another.id);
    assert_eq!(
        back[0].job.attempts, 0,
        "a disconnect is not a failed attempt"
    );
}

pub async fn beanstalkd_put_keeps_beanstalkd_semantics<H: Harness>(h: H) {
    let b = h.broker();
    let mut session = b.open_session(Peer::default()).expect("session");
    let replies = beanstalkd(
        &mut session,
        vec![
            Request::Put(Put {
                pri: 1,
                delay_secs: 0,
                ttr_secs: 1,
                body: PutBody::Complete(Bytes::from_static(b"x")),
            }),
            Request::Reserve,
        ],
    )
    .await;
    let Response::Inserted(id) = replies[0] else {
        panic!("{replies:?}");
    };
    h.advance(1_001).await;
    let job = b.get(id).await.unwrap();
    assert_eq!(
        job.state,
        JobState::Ready,
        "an expired reservation is ready at once"
    );
    let leased = reserve_one(b, "default").await;
    assert_eq!(leased.job.id, id);
    // Typed ops work on beanstalkd jobs, and fail has no attempt limit.
    let failed = job_of(
        b,
        Op::Fail {
            lease: leased.lease,
            error: "e".into(),
            retry_in_ms: Some(0),
            permanent: false,
        },
    )
    .await;
    assert_eq!(failed.state, JobState::Ready);
}

pub async fn everything_survives_restart<H: Harness>(h: H) {
    let b = h.broker();
    let mut headers = BTreeMap::new();
    headers.insert("trace".to_string(), "t-1".to_string());
    call(
        b,
        Op::SetPolicy {
            queue: queue("dur"),
            policy: QueuePolicy {
                retention_max_jobs: Some(100),
                max_jobs: Some(1_000),
                ..QueuePolicy::default()
            },
        },
    )
    .await
    .unwrap();
    let rich = enqueue(
        b,
        "dur",
        NewJob {
            priority: Some(3),
            ttr_ms: Some(9_000),
            max_attempts: Some(4),
            backoff: Some(no_jitter(100_000)),
            headers: headers.clone(),
            idempotency_key: Some("k-1".into()),
            ..job("{\"n\":1}")
        },
    )
    .await;
    let leased = reserve_one(b, "dur").await;
    let failed = job_of(
        b,
        Op::Fail {
            lease: leased.lease,
            error: "first try".into(),
            retry_in_ms: None,
            permanent: false,
        },
    )
    .await;
    let done = enqueue(
        b,
        "dur",
        NewJob {
            priority: Some(1),
            ..job("done")
        },
    )
    .await;
    let leased = reserve_one(b, "dur").await;
    assert_eq!(leased.job.id, done.id);
    let done = b
        .complete(leased.lease, Some(Bytes::from_static(b"42")))
        .await
        .unwrap();
    let gone = enqueue(b, "dur", job("cancel me")).await;
    let gone = job_of(
        b,
        Op::Cancel {
            id: gone.id,
            expected_version: None,
        },
    )
    .await;
    let held = enqueue(
        b,
        "dur",
        NewJob {
            priority: Some(0),
            ..job("held")
        },
    )
    .await;
    let held_lease = reserve_one(b, "dur").await;
    assert_eq!(held_lease.job.id, held.id);
    let Some(h) = h.restart().await else {
        return;
    };
    let b = h.broker();
    assert_eq!(b.get(failed.id).await.unwrap(), failed);
    assert_eq!(b.get(done.id).await.unwrap(), done);
    assert_eq!(b.get(gone.id).await.unwrap(), gone);
    let back = b.get(held.id).await.unwrap();
    assert_eq!(back.state, JobState::Ready, "leases end with the process");
    assert_eq!(
        back.version, held_lease.job.version,
        "a lease is not a change"
    );
    let (dup, duplicate) = b
        .enqueue(
            queue("dur"),
            NewJob {
                idempotency_key: Some("k-1".into()),
                ..job("again")
            },
        )
        .await
        .unwrap();
    assert!(duplicate, "the idempotency key survives");
    assert_eq!(dup.id, rich.id);
    let Outcome::Queue(info) = call(
        b,
        Op::GetQueue {
            queue: queue("dur"),
        },
    )
    .await
    .unwrap() else {
        panic!("a queue");
    };
    assert_eq!(info.policy.retention_max_jobs, Some(100));
    assert_eq!(info.policy.max_jobs, Some(1_000));
    let next = enqueue(b, "dur", job("after")).await;
    assert!(next.id > held.id, "ids are never reused");
}

async fn set_policy<B: Broker>(broker: &B, q: &str, policy: QueuePolicy) {
    call(
        broker,
        Op::SetPolicy {
            queue: queue(q),
            policy,
        },
    )
    .await
    .unwrap();
}

async fn reserved_in<B: Broker>(broker: &B, q: &str) -> u64 {
    match call(broker, Op::GetQueue { queue: queue(q) })
        .await
        .unwrap()
    {
        Outcome::Queue(info) => info.reserved,
        other => panic!("a queue: {other:?}"),
    }
}

/// Moves the clock once what was sent before has been handled (a broker
/// answers in order), so that a reserve sent first is surely waiting and
/// the time passing is what serves it.
async fn advance_after_queued<H: Harness>(h: &H, ms: u64) {
    call(h.broker(), Op::ListQueues).await.unwrap();
    h.advance(ms).await;
}

/// A session watching `q` alone.
async fn worker_on<B: Broker>(broker: &B, q: &str) -> B::Session {
    let mut session = broker.open_session(Peer::default()).expect("session");
    let replies = beanstalkd(
        &mut session,
        vec![Request::Watch(queue(q)), Request::Ignore(queue("default"))],
    )
    .await;
    assert_eq!(replies, vec![Response::Watching(2), Response::Watching(1)]);
    session
}

pub async fn concurrency_caps_reservations_over_both_front_doors<H: Harness>(h: H) {
    let b = h.broker();
    let policy = QueuePolicy {
        concurrency: Some(2),
        ..QueuePolicy::default()
    };
    set_policy(b, "c", policy.clone()).await;
    for n in 0..5 {
        enqueue(b, "c", job(&format!("{n}"))).await;
    }
    let mut session = worker_on(b, "c").await;
    let mut leases = b.reserve(vec![queue("c")], 5, 0).await.unwrap();
    assert_eq!(leases.len(), 2, "a batch stops at the concurrency");
    // Full: beanstalkd gets nothing either, and another reserve neither.
    let replies = beanstalkd(
        &mut session,
        vec![Request::ReserveWithTimeout {
            timeout_secs: Some(0),
        }],
    )
    .await;
    assert_eq!(replies, vec![Response::TimedOut]);
    assert!(b.reserve(vec![queue("c")], 5, 0).await.unwrap().is_empty());
    assert_eq!(reserved_in(b, "c").await, 2);
    // A completion frees a slot for the next reserve, one only.
    let done = leases.remove(0);
    b.complete(done.lease, None).await.unwrap();
    let next = b.reserve(vec![queue("c")], 5, 0).await.unwrap();
    assert_eq!(next.len(), 1);
    leases.extend(next);
    assert_eq!(reserved_in(b, "c").await, 2);
    // A blocked beanstalkd reserve is served when a slot frees.
    let done = leases.remove(0);
    // (The clock then passes its timeout: a failure answers, not hangs.)
    let (replies, ()) = both(
        beanstalkd(
            &mut session,
            vec![Request::ReserveWithTimeout {
                timeout_secs: Some(1),
            }],
        ),
        async {
            b.complete(done.lease, None).await.unwrap();
            advance_after_queued(&h, 1_000).await;
        },
    )
    .await;
    let Response::Reserved { id: held, .. } = replies[0] else {
        panic!("reserved: {replies:?}");
    };
    assert_eq!(reserved_in(b, "c").await, 2);
    // A parked job-API reserve wakes when the beanstalkd worker's job goes.
    let (woke, replies) = both(b.reserve(vec![queue("c")], 5, 1_000), async {
        let replies = beanstalkd(&mut session, vec![Request::Delete(held)]).await;
        advance_after_queued(&h, 1_000).await;
        replies
    })
    .await;
    assert_eq!(replies, vec![Response::Deleted]);
    assert_eq!(woke.unwrap().len(), 1, "the last ready job");
    assert_eq!(reserved_in(b, "c").await, 2);
    drop(session);
    // The policy is durable.
    let Some(h) = h.restart().await else { return };
    match call(h.broker(), Op::GetQueue { queue: queue("c") })
        .await
        .unwrap()
    {
        Outcome::Queue(info) => assert_eq!(info.policy, policy),
        other => panic!("a queue: {other:?}"),
    }
}

pub async fn rate_limits_dispatch_and_wakes_waiters<H: Harness>(h: H) {
    let b = h.broker();
    // Two a second: a bucket of two tokens, one more every 500 ms.
    set_policy(
        b,
        "r",
        QueuePolicy {
            rate_per_s: Some(2.0),
            ..QueuePolicy::default()
        },
    )
    .await;
    for n in 0..40 {
        enqueue(b, "r", job(&format!("{n}"))).await;
    }
    let first = b.reserve(vec![queue("r")], 10, 0).await.unwrap();
    assert_eq!(first.len(), 2, "a full bucket");
    let mut handed_out = first.len() as u64;
    // Over t ms at most 2 per second beyond the bucket, and the tokens do
    // come: 2 + 2t/1000 exactly when reserving every 100 ms.
    for step in 1..=30u64 {
        h.advance(100).await;
        handed_out += b.reserve(vec![queue("r")], 10, 0).await.unwrap().len() as u64;
        assert!(handed_out <= 2 + 2 * step * 100 / 1_000, "step {step}");
    }
    assert_eq!(handed_out, 2 + 6);
    // Out of tokens: a parked reserve gets its job when the next arrives
    // (at 3.5 s), before its own timeout (at 4 s) ends it empty.
    assert!(b.reserve(vec![queue("r")], 1, 0).await.unwrap().is_empty());
    let (woke, ()) = both(b.reserve(vec![queue("r")], 1, 1_000), async {
        advance_after_queued(&h, 500).await;
        advance_after_queued(&h, 500).await;
    })
    .await;
    assert_eq!(woke.unwrap().len(), 1, "served when the token came");
    // The token of 4 s, then none until 4.5 s; a blocked beanstalkd
    // reserve (timing out at 5 s) is served when it comes.
    let got = b.reserve(vec![queue("r")], 10, 0).await.unwrap();
    assert_eq!(got.len(), 1);
    let mut session = worker_on(b, "r").await;
    let (replies, ()) = both(
        beanstalkd(
            &mut session,
            vec![Request::ReserveWithTimeout {
                timeout_secs: Some(1),
            }],
        ),
        async {
            advance_after_queued(&h, 500).await;
            advance_after_queued(&h, 500).await;
        },
    )
    .await;
    assert!(
        matches!(replies[0], Response::Reserved { .. }),
        "{replies:?}"
    );
    // At 5 s one token, then nothing for either front door.
    let got = b.reserve(vec![queue("r")], 10, 0).await.unwrap();
    assert_eq!(got.len(), 1);
    assert!(b.reserve(vec![queue("r")], 1, 0).await.unwrap().is_empty());
    let replies = beanstalkd(
        &mut session,
        vec![Request::ReserveWithTimeout {
            timeout_secs: Some(0),
        }],
    )
    .await;
    assert_eq!(replies, vec![Response::TimedOut]);
}

// ---- schedules (issue 11) ----------------------------------------------
//
// Instants are read from the broker's answers (`created_at_ms` is the
// broker's now), so the cases hold for any clock a harness starts at.

fn schedule_spec(cron: &str, q: &str) -> ScheduleSpec {
    ScheduleSpec {
        cron: cron.into(),
        timezone: "UTC".into(),
        queue: queue(q),
        job: job("tick"),
        misfire: Misfire::Once,
        catch_up_max: 100,
        jitter_ms: 0,
        max_backlog: None,
        paused: false,
    }
}

async fn put_schedule<B: Broker>(b: &B, name: &str, spec: ScheduleSpec) -> (ScheduleView, bool) {
    let op = Op::PutSchedule {
        name: queue(name),
        spec: Box::new(spec),
    };
    match call(b, op).await.expect("put schedule") {
        Outcome::Schedule { schedule, created } => (*schedule, created),
        other => panic!("a schedule, not {other:?}"),
    }
}

async fn schedule_op<B: Broker>(b: &B, op: Op) -> ScheduleView {
    match call(b, op).await.expect("schedule op") {
        Outcome::Schedule { schedule, .. } => *schedule,
        other => panic!("a schedule, not {other:?}"),
    }
}

async fn get_schedule<B: Broker>(b: &B, name: &str) -> ScheduleView {
    schedule_op(b, Op::GetSchedule { name: queue(name) }).await
}

async fn jobs_in<B: Broker>(b: &B, q: &str, state: JobState) -> Vec<JobView> {
    match call(
        b,
        Op::List {
            queue: queue(q),
            state,
            after: None,
            limit: 1_000,
        },
    )
    .await
    .expect("list")
    {
        Outcome::Page(page) => page.jobs,
        other => panic!("a page, not {other:?}"),
    }
}

/// Moves the clock to `at_ms`, given that the broker's clock is `now_ms`.
/// Timers run once the broker next looks at the clock: two advances with
/// no operation between them are one jump.
async fn advance_to<H: Harness>(h: &H, now_ms: &mut u64, at_ms: u64) {
    assert!(at_ms >= *now_ms, "time moves forward");
    h.advance(at_ms - *now_ms).await;
    *now_ms = at_ms;
}

pub async fn schedule_create_get_list_replace_delete<H: Harness>(h: H) {
    let b = h.broker();
    let (made, created) = put_schedule(b, "s-crud", schedule_spec("@every 10s", "crud")).await;
    assert!(created);
    assert_eq!(made.name, "s-crud");
    let next = made.next_fire_at_ms.expect("an unpaused schedule is armed");
    assert!(next > made.created_at_ms && next <= made.created_at_ms + 10_000);
    assert_eq!(next % 10_000, 0, "@every instants are whole periods");
    assert_eq!((made.fires, made.last_fire_at_ms), (0, None));
    assert_eq!(get_schedule(b, "s-crud").await, made);
    put_schedule(b, "s-other", schedule_spec("0 0 * * *", "crud")).await;
    match call(b, Op::ListSchedules).await.unwrap() {
        Outcome::Schedules(list) => {
            let names: Vec<&str> = list.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(names, ["s-crud", "s-other"]);
        }
        other => panic!("schedules, not {other:?}"),
    }
    let mut spec = schedule_spec("30 */5 * * * *", "crud");
    spec.timezone = "Europe/Berlin".into();
    let (replaced, created) = put_schedule(b, "s-crud", spec.clone()).await;
    assert!(!created);
    assert!(replaced.version > made.version);
    assert_eq!(replaced.created_at_ms, made.created_at_ms);
    assert_eq!(replaced.spec, spec);
    assert_eq!(replaced.next_fire_at_ms.unwrap() % 300_000, 30_000);
    assert_eq!(
        call(
            b,
            Op::DeleteSchedule {
                name: queue("s-crud")
            }
        )
        .await,
        Ok(Outcome::Done)
    );
    assert_eq!(
        call(
            b,
            Op::GetSchedule {
                name: queue("s-crud")
            }
        )
        .await,
        Err(BrokerError::NotFound)
    );
    assert_eq!(
        call(
            b,
            Op::DeleteSchedule {
                name: queue("s-crud")
            }
        )
        .await,
        Err(BrokerError::NotFound)
    );
    for (cron, timezone, field) in [
        ("* * *", "UTC", "cron"),
        ("@every 0s", "UTC", "cron"),
        ("0 0 * * *", "Mars/Base", "timezone"),
    ] {
        let mut spec = schedule_spec(cron, "crud");
        spec.timezone = timezone.into();
        let refused = call(
            b,
            Op::PutSchedule {
                name: queue("s-bad"),
                spec: Box::new(spec),
            },
        )
        .await;
        match refused {
            Err(BrokerError::Invalid { field: f, .. }) => assert_eq!(f, field, "{cron}"),
            other => panic!("{cron} in {timezone}: {other:?}"),
        }
    }
    assert_eq!(
        call(
            b,
            Op::GetSchedule {
                name: queue("s-bad")
            }
        )
        .await,
        Err(BrokerError::NotFound),
        "a refused spec makes nothing"
    );
}

pub async fn schedule_fires_at_due_instants_with_key_and_headers<H: Harness>(h: H) {
    let b = h.broker();
    let (made, _) = put_schedule(b, "s-fire", schedule_spec("@every 10s", "fire")).await;
    let mut now = made.created_at_ms;
    let due = made.next_fire_at_ms.unwrap();
    advance_to(&h, &mut now, due - 1).await;
    assert!(jobs_in(b, "fire", JobState::Ready).await.is_empty());
    advance_to(&h, &mut now, due).await;
    let fired = jobs_in(b, "fire", JobState::Ready).await;
    assert_eq!(fired.len(), 1, "one job at the due instant");
    let fired_job = &fired[0];
    assert_eq!(fired_job.payload, Bytes::from_static(b"tick"));
    assert_eq!(fired_job.headers[HEADER_SCHEDULE], "s-fire");
    let at = &fired_job.headers[HEADER_SCHEDULED_AT];
    assert!(at.ends_with('Z') && at.contains('T'), "RFC 3339 UTC: {at}");
    assert_eq!(
        fired_job.idempotency_key.as_deref(),
        Some(firing_key("s-fire", due).as_str())
    );
    let view = get_schedule(b, "s-fire").await;
    assert_eq!(view.fires, 1);
    assert_eq!(view.last_fire_at_ms, Some(due));
    assert_eq!(view.last_job, Some(fired_job.id));
    assert_eq!(view.next_fire_at_ms, Some(due + 10_000));
    // The key is the queue's: the same instant cannot make a second job.
    let (again, duplicate) = b
        .enqueue(
            queue("fire"),
            NewJob {
                idempotency_key: Some(firing_key("s-fire", due)),
                ..job("other")
            },
        )
        .await
        .unwrap();
    assert!(duplicate);
    assert_eq!(again.id, fired_job.id);
    advance_to(&h, &mut now, due + 10_000).await;
    assert_eq!(jobs_in(b, "fire", JobState::Ready).await.len(), 2);
    assert_eq!(get_schedule(b, "s-fire").await.fires, 2);
}

pub async fn schedule_fires_each_instant_once_across_restart<H: Harness>(h: H) {
    let b = h.broker();
    let (made, _) = put_schedule(b, "s-once", schedule_spec("@every 10s", "once")).await;
    let mut now = made.created_at_ms;
    let due = made.next_fire_at_ms.unwrap();
    advance_to(&h, &mut now, due).await;
    let before = get_schedule(b, "s-once").await;
    assert_eq!(before.fires, 1);
    let Some(h) = h.restart().await else {
        return;
    };
    let b = h.broker();
    // The restart took a moment of the clock; read it back.
    let after = get_schedule(b, "s-once").await;
    assert_eq!(after, before, "the schedule's state is durable");
    assert_eq!(jobs_in(b, "once", JobState::Ready).await.len(), 1);
    let mut now = due;
    advance_to(&h, &mut now, due + 9_000).await;
    assert_eq!(
        jobs_in(b, "once", JobState::Ready).await.len(),
        1,
        "a fired instant does not fire again after a restart"
    );
    advance_to(&h, &mut now, due + 10_000).await;
    let jobs = jobs_in(b, "once", JobState::Ready).await;
    assert_eq!(jobs.len(), 2);
    let keys: Vec<_> = jobs.iter().map(|j| j.idempotency_key.clone()).collect();
    assert_eq!(
        keys,
        [
            Some(firing_key("s-once", due)),
            Some(firing_key("s-once", due + 10_000))
        ]
    );
}

/// (fires, misfires skipped, ready jobs) of the three misfire schedules.
async fn misfire_counts<B: Broker>(b: &B) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    for name in ["s-skip", "s-oncepol", "s-all"] {
        let view = get_schedule(b, name).await;
        let jobs = jobs_in(b, name, JobState::Ready).await.len() as u64;
        out.push((view.fires, view.misfires_skipped, jobs));
    }
    out
}

pub async fn schedule_misfire_policies_when_late_and_after_restart<H: Harness>(h: H) {
    let b = h.broker();
    let mut first_due = 0;
    let mut now = 0;
    for (name, misfire) in [
        ("s-skip", Misfire::Skip),
        ("s-oncepol", Misfire::Once),
        ("s-all", Misfire::All),
    ] {
        let mut spec = schedule_spec("@every 10s", name);
        spec.misfire = misfire;
        spec.catch_up_max = 3;
        let (made, _) = put_schedule(b, name, spec).await;
        first_due = made.next_fire_at_ms.unwrap();
        now = made.created_at_ms;
    }
    // Late by 55.5 s: instants first_due ..= first_due + 50 s (6) were
    // missed; the latest is 5.5 s old, past the grace.
    advance_to(&h, &mut now, first_due + 55_500).await;
    assert_eq!(misfire_counts(b).await, [(0, 6, 0), (1, 5, 1), (3, 3, 3)]);
    let all = jobs_in(b, "s-all", JobState::Ready).await;
    let keys: Vec<_> = all
        .iter()
        .map(|j| j.idempotency_key.clone().unwrap())
        .collect();
    assert_eq!(
        keys,
        [30_000, 40_000, 50_000].map(|d| firing_key("s-all", first_due + d)),
        "`all` fires the latest catch_up_max instants, oldest first"
    );
    let Some(h) = h.restart().await else {
        return;
    };
    let b = h.broker();
    assert_eq!(misfire_counts(b).await, [(0, 6, 0), (1, 5, 1), (3, 3, 3)]);
    // Down (or stalled) across 10 more instants (60 s ..= 150 s).
    advance_to(&h, &mut now, first_due + 155_500).await;
    assert_eq!(
        misfire_counts(b).await,
        [(0, 16, 0), (2, 14, 2), (6, 10, 6)]
    );
    // On time again: every policy fires.
    advance_to(&h, &mut now, first_due + 160_000).await;
    assert_eq!(
        misfire_counts(b).await,
        [(1, 16, 1), (3, 14, 3), (7, 10, 7)]
    );
}

pub async fn schedule_pause_resume_trigger<H: Harness>(h: H) {
    let b = h.broker();
    let (made, _) = put_schedule(b, "s-pause", schedule_spec("@every 10s", "pause")).await;
    let mut now = made.created_at_ms;
    let paused = schedule_op(
        b,
        Op::PauseSchedule {
            name: queue("s-pause"),
        },
    )
    .await;
    assert!(paused.spec.paused);
    assert_eq!(paused.next_fire_at_ms, None);
    advance_to(&h, &mut now, made.created_at_ms + 30_000).await;
    assert!(jobs_in(b, "pause", JobState::Ready).await.is_empty());
    let resumed = schedule_op(
        b,
        Op::ResumeSchedule {
            name: queue("s-pause"),
        },
    )
    .await;
    assert!(!resumed.spec.paused);
    let next = resumed.next_fire_at_ms.expect("armed again");
    assert!(next > now, "instants passed while paused are not fired");
    let triggered = schedule_op(
        b,
        Op::TriggerSchedule {
            name: queue("s-pause"),
        },
    )
    .await;
    assert_eq!(triggered.fires, 1);
    assert_eq!(
        triggered.next_fire_at_ms,
        Some(next),
        "a trigger keeps the rule"
    );
    let jobs = jobs_in(b, "pause", JobState::Ready).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        jobs[0].idempotency_key.as_deref(),
        Some(firing_key("s-pause", now).as_str())
    );
    assert_eq!(triggered.last_job, Some(jobs[0].id));
    // A paused schedule can still be triggered.
    schedule_op(
        b,
        Op::PauseSchedule {
            name: queue("s-pause"),
        },
    )
    .await;
    let later = now + 1;
    advance_to(&h, &mut now, later).await;
    schedule_op(
        b,
        Op::TriggerSchedule {
            name: queue("s-pause"),
        },
    )
    .await;
    assert_eq!(jobs_in(b, "pause", JobState::Ready).await.len(), 2);
    for op in [
        Op::PauseSchedule {
            name: queue("s-none"),
        },
        Op::ResumeSchedule {
            name: queue("s-none"),
        },
        Op::TriggerSchedule {
            name: queue("s-none"),
        },
    ] {
        assert_eq!(call(b, op).await, Err(BrokerError::NotFound));
    }
}

pub async fn schedule_max_backlog_skips_while_jobs_wait<H: Harness>(h: H) {
    let b = h.broker();
    let mut spec = schedule_spec("@every 10s", "backlog");
    spec.max_backlog = Some(2);
    let (made, _) = put_schedule(b, "s-backlog", spec).await;
    let mut now = made.created_at_ms;
    let due = made.next_fire_at_ms.unwrap();
    // Jobs of others in the queue do not count.
    enqueue(b, "backlog", job("someone else's")).await;
    enqueue(b, "backlog", job("someone else's")).await;
    for i in 0..3 {
        advance_to(&h, &mut now, due + i * 10_000).await;
        // Each instant on its own: the next advance waits for this answer.
        assert_eq!(get_schedule(b, "s-backlog").await.fires, (i + 1).min(2));
    }
    let view = get_schedule(b, "s-backlog").await;
    assert_eq!((view.fires, view.backlog_skips), (2, 1));
    assert_eq!(jobs_in(b, "backlog", JobState::Ready).await.len(), 4);
    // A worker takes one of the schedule's jobs: the next instant fires.
    let mine: Vec<_> = jobs_in(b, "backlog", JobState::Ready)
        .await
        .into_iter()
        .filter(|j| j.headers.contains_key(HEADER_SCHEDULE))
        .collect();
    call(
        b,
        Op::Delete {
            id: mine[0].id,
            expected_version: None,
        },
    )
    .await
    .unwrap();
    advance_to(&h, &mut now, due + 30_000).await;
    let view = get_schedule(b, "s-backlog").await;
    assert_eq!((view.fires, view.backlog_skips), (3, 1));
    advance_to(&h, &mut now, due + 40_000).await;
    let view = get_schedule(b, "s-backlog").await;
    assert_eq!((view.fires, view.backlog_skips), (3, 2));
}

pub async fn schedule_replaced_after_firing_keeps_its_history<H: Harness>(h: H) {
    let b = h.broker();
    let (made, _) = put_schedule(b, "s-replace", schedule_spec("@every 10s", "replace")).await;
    let mut now = made.created_at_ms;
    let due = made.next_fire_at_ms.unwrap();
    advance_to(&h, &mut now, due).await;
    // Replaced at the instant it fired, with the same rule: that instant
    // is not fired again, the next one is kept.
    let (replaced, created) =
        put_schedule(b, "s-replace", schedule_spec("@every 10s", "replace")).await;
    assert!(!created);
    assert_eq!(replaced.fires, 1);
    assert_eq!(replaced.last_fire_at_ms, Some(due));
    assert_eq!(replaced.next_fire_at_ms, Some(due + 10_000));
    advance_to(&h, &mut now, due + 10_000).await;
    assert_eq!(jobs_in(b, "replace", JobState::Ready).await.len(), 2);
    // A new rule starts after now and keeps the counters.
    let (replaced, _) = put_schedule(b, "s-replace", schedule_spec("@every 1m", "replace")).await;
    assert_eq!(replaced.fires, 2);
    assert_eq!(replaced.last_fire_at_ms, Some(due + 10_000));
    let next = replaced.next_fire_at_ms.unwrap();
    assert_eq!(next % 60_000, 0);
    assert!(next > now);
}

/// While draining nothing fires and a trigger is refused; the due instant
/// is neither consumed nor counted as a skip, and fires once the drain
/// ends (the local broker looks again a second later, PostgreSQL at its
/// next timer pass).
pub async fn schedule_holds_its_instants_while_draining<H: Harness>(h: H) {
    let b = h.broker();
    let mut spec = schedule_spec("@every 10s", "drain");
    spec.misfire = Misfire::All;
    let (made, _) = put_schedule(b, "s-drain", spec).await;
    let mut now = made.created_at_ms;
    let due = made.next_fire_at_ms.unwrap();
    b.set_draining(true);
    let trigger = Op::TriggerSchedule {
        name: queue("s-drain"),
    };
    assert_eq!(call(b, trigger).await, Err(BrokerError::Draining));
    advance_to(&h, &mut now, due).await;
    assert!(
        jobs_in(b, "drain", JobState::Ready).await.is_empty(),
        "nothing fires while draining"
    );
    let view = get_schedule(b, "s-drain").await;
    assert_eq!(
        (view.fires, view.misfires_skipped, view.backlog_skips),
        (0, 0, 0)
    );
    assert_eq!(view.next_fire_at_ms, Some(due), "the instant stays due");
    b.set_draining(false);
    advance_to(&h, &mut now, due + 1_000).await;
    let fired = jobs_in(b, "drain", JobState::Ready).await;
    assert_eq!(fired.len(), 1, "the held instant fires once");
    assert_eq!(
        fired[0].idempotency_key.as_deref(),
        Some(firing_key("s-drain", due).as_str())
    );
    let view = get_schedule(b, "s-drain").await;
    assert_eq!((view.fires, view.misfires_skipped), (1, 0));
    assert_eq!(view.last_fire_at_ms, Some(due));
    assert_eq!(view.next_fire_at_ms, Some(due + 10_000));
}

/// Every job of a queue that is waiting (ready or delayed).
async fn waiting_in<B: Broker>(b: &B, q: &str) -> Vec<JobView> {
    let mut jobs = jobs_in(b, q, JobState::Ready).await;
    jobs.extend(jobs_in(b, q, JobState::Delayed).await);
    jobs
}

/// Just before its instant a firing is not done, whether or not a broker
/// makes its job ahead of time (the local broker does), and a restart
/// then neither loses the instant nor fires it twice.
pub async fn schedule_firing_is_not_done_before_its_instant_and_survives_restart<H: Harness>(h: H) {
    let b = h.broker();
    let (made, _) = put_schedule(b, "s-ahead", schedule_spec("@every 10s", "ahead")).await;
    let mut now = made.created_at_ms;
    let due = made.next_fire_at_ms.unwrap();
    advance_to(&h, &mut now, due - 100).await;
    let before = get_schedule(b, "s-ahead").await;
    assert_eq!(
        (before.fires, before.last_fire_at_ms, before.last_job),
        (0, None, None)
    );
    assert_eq!(before.next_fire_at_ms, Some(due));
    assert!(jobs_in(b, "ahead", JobState::Ready).await.is_empty());
    let h = match h.restart().await {
        Some(h) => h,
        None => return,
    };
    let b = h.broker();
    let after = get_schedule(b, "s-ahead").await;
    assert_eq!((after.fires, after.next_fire_at_ms), (0, Some(due)));
    let mut now = due - 100;
    advance_to(&h, &mut now, due).await;
    let fired = jobs_in(b, "ahead", JobState::Ready).await;
    assert_eq!(fired.len(), 1, "the instant fires once");
    assert_eq!(
        fired[0].idempotency_key.as_deref(),
        Some(firing_key("s-ahead", due).as_str())
    );
    let view = get_schedule(b, "s-ahead").await;
    assert_eq!(
        (view.fires, view.last_fire_at_ms, view.last_job),
        (1, Some(due), Some(fired[0].id))
    );
    assert_eq!(view.next_fire_at_ms, Some(due + 10_000));
    advance_to(&h, &mut now, due + 10_000).await;
    assert_eq!(waiting_in(b, "ahead").await.len(), 2);
}

/// Paused, deleted or replaced just before an instant: nothing fires from
/// the old state (a job made ahead is taken back), the replacement fires
/// the instant with its new job.
pub async fn schedule_changed_just_before_its_instant_fires_nothing_stale<H: Harness>(h: H) {
    let b = h.broker();
    let mut due = 0;
    let mut now = 0;
    for name in ["s-stale-p", "s-stale-d", "s-stale-r"] {
        let (made, _) = put_schedule(b, name, schedule_spec("@every 10s", name)).await;
        due = made.next_fire_at_ms.unwrap();
        now = made.created_at_ms;
    }
    advance_to(&h, &mut now, due - 100).await;
    let paused = schedule_op(
        b,
        Op::PauseSchedule {
            name: queue("s-stale-p"),
        },
    )
    .await;
    assert_eq!((paused.fires, paused.next_fire_at_ms), (0, None));
    assert_eq!(
        call(
            b,
            Op::DeleteSchedule {
                name: queue("s-stale-d")
            }
        )
        .await,
        Ok(Outcome::Done)
    );
    let mut spec = schedule_spec("@every 10s", "s-stale-r");
    spec.job = job("tock");
    let (replaced, _) = put_schedule(b, "s-stale-r", spec).await;
    assert_eq!(replaced.next_fire_at_ms, Some(due));
    advance_to(&h, &mut now, due + 1).await;
    assert!(waiting_in(b, "s-stale-p").await.is_empty(), "paused");
    assert!(waiting_in(b, "s-stale-d").await.is_empty(), "deleted");
    let fired = waiting_in(b, "s-stale-r").await;
    let payloads: Vec<_> = fired.iter().map(|j| j.payload.clone()).collect();
    assert_eq!(payloads, [Bytes::from_static(b"tock")], "the new job, once");
    assert_eq!(get_schedule(b, "s-stale-r").await.fires, 1);
    assert_eq!(get_schedule(b, "s-stale-p").await.fires, 0);
}

/// `skip`: an instant the broker was down across is not fired, even when
/// it was about to fire as the broker stopped.
pub async fn schedule_skip_fires_nothing_missed_while_down<H: Harness>(h: H) {
    let b = h.broker();
    let mut spec = schedule_spec("@every 10s", "downskip");
    spec.misfire = Misfire::Skip;
    let (made, _) = put_schedule(b, "s-downskip", spec).await;
    let mut now = made.created_at_ms;
    let due = made.next_fire_at_ms.unwrap();
    advance_to(&h, &mut now, due - 100).await;
    get_schedule(b, "s-downskip").await;
    let h = match h.restart().await {
        Some(h) => h,
        None => return,
    };
    let b = h.broker();
    // Down until 5.5 s after the instant: past the grace.
    advance_to(&h, &mut now, due + 5_500).await;
    assert!(
        waiting_in(b, "downskip").await.is_empty(),
        "skip fires none"
    );
    let view = get_schedule(b, "s-downskip").await;
    assert_eq!((view.fires, view.misfires_skipped), (0, 1));
    assert_eq!(view.next_fire_at_ms, Some(due + 10_000));
    advance_to(&h, &mut now, due + 10_000).await;
    assert_eq!(waiting_in(b, "downskip").await.len(), 1);
    assert_eq!(get_schedule(b, "s-downskip").await.fires, 1);
}
