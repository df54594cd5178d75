//! A server that runs its timers late sees what one that woke on time saw.
//!
//! The delay timer moves the delayed jobs that fall due together in runs
//! (`move_due_run`), bounded by the next tube's earliest job, the earliest
//! timer of another kind and the per-tick bound. proptest makes delayed jobs
//! in three tubes (many due at the same instant, their ids interleaved
//! across tubes), pauses or a blocked reserver; then one engine ticks at
//! every instant it asks for and another only once everything is due, as
//! often as it says it has work left. Both must end with the same replies,
//! the same job states, the same counts per tube and the same order of
//! ready jobs, with `check_invariants` after every tick.

use bytes::Bytes;
use proptest::prelude::*;
use spool_engine::{Engine, EngineConfig, JobState, TIMERS_PER_TICK_MAX};
use spool_proto::{Put, PutBody, Request, Response, TubeName};

const NS: u64 = 1_000_000_000;
const TUBES: [&str; 3] = ["a", "b", "c"];
const PRODUCER: u64 = 1;
const WAITER: u64 = 2;
const DRAINER: u64 = 3;
/// Past every delay, pause and reserve timeout the cases use.
const LATE_NS: u64 = 20 * NS;

#[derive(Debug, Clone)]
enum Step {
    /// `count` jobs into a tube, each delayed `delay_secs` (0: ready).
    Put {
        tube: usize,
        delay_secs: u32,
        pri: u32,
        count: usize,
    },
    Pause {
        tube: usize,
        delay_secs: u32,
    },
}

fn tube(index: usize) -> TubeName {
    TubeName::new(TUBES[index].as_bytes()).expect("a valid tube name")
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..TUBES.len(), 0u32..5, prop_oneof![Just(0u32), Just(7), Just(2_000)], 1usize..700)
            .prop_map(|(tube, delay_secs, pri, count)| Step::Put { tube, delay_secs, pri, count }),
        1 => (0..TUBES.len(), 1u32..4).prop_map(|(tube, delay_secs)| Step::Pause { tube, delay_secs }),
    ]
}

/// The engine after `steps` at time 0, with a reserver blocked on tube
/// "b" for `wait_secs` (if any).
fn engine_after(steps: &[Step], wait_secs: Option<u32>) -> Engine {
    let mut engine = Engine::new(EngineConfig { max_job_size: 64 });
    for conn in [PRODUCER, WAITER, DRAINER] {
        engine.connect(conn);
    }
    for step in steps {
        match *step {
            Step::Put {
                tube: index,
                delay_secs,
                pri,
                count,
            } => {
                engine.execute(PRODUCER, Request::Use(tube(index)), 0);
                for _ in 0..count {
                    let put = Put {
                        pri,
                        delay_secs,
                        ttr_secs: 1_000,
                        body: PutBody::Complete(Bytes::from_static(b"j")),
                    };
                    engine.execute(PRODUCER, Request::Put(put), 0);
                }
            }
            Step::Pause {
                tube: index,
                delay_secs,
            } => engine.execute(
                PRODUCER,
                Request::PauseTube {
                    tube: tube(index),
                    delay_secs,
                },
                0,
            ),
        }
    }
    if let Some(timeout_secs) = wait_secs {
        engine.execute(WAITER, Request::Watch(tube(1)), 0);
        engine.execute(WAITER, Request::Ignore(tube(0)), 0);
        engine.execute(
            WAITER,
            Request::ReserveWithTimeout {
                timeout_secs: Some(timeout_secs),
            },
            0,
        );
    }
    engine.tick(0);
    engine.check_invariants();
    engine
}

/// What both engines must agree on: the replies, every job's state and
/// each tube's counts.
fn observe(engine: &mut Engine, jobs: u64) -> (Vec<(u64, Response)>, Vec<Option<JobState>>) {
    let mut replies = engine.take_replies();
    // Job stats and tube stats carry times (ages, time left) that differ
    // between a late and a punctual server; the counts are compared.
    replies.retain(|(conn, _)| *conn != PRODUCER);
    let states = (1..=jobs)
        .map(|id| engine.job(id).map(|job| job.state))
        .collect();
    (replies, states)
}

fn tube_counts(engine: &mut Engine, now: u64) -> Vec<Response> {
    let mut counts = Vec::new();
    for index in 0..TUBES.len() {
        engine.execute(PRODUCER, Request::StatsTube(tube(index)), now);
        for (_, reply) in engine.take_replies() {
            if let Response::StatsTube(mut stats) = reply {
                // Pause time left depends on when it is read, not on order.
                stats.pause_time_left_secs = 0;
                counts.push(Response::StatsTube(stats));
            } else {
                counts.push(reply);
            }
        }
    }
    counts
}

/// The ready jobs in the order workers would get them.
fn drain_ready(engine: &mut Engine, now: u64) -> Vec<(u64, Response)> {
    for index in 0..TUBES.len() {
        engine.execute(DRAINER, Request::Watch(tube(index)), now);
    }
    engine.take_replies();
    let mut taken = Vec::new();
    loop {
        engine.execute(
            DRAINER,
            Request::ReserveWithTimeout {
                timeout_secs: Some(0),
            },
            now,
        );
        // A reserve that finds nothing times out at the next tick.
        engine.tick(now);
        let replies = engine.take_replies();
        let done = replies
            .iter()
            .any(|(_, r)| matches!(r, Response::TimedOut | Response::DeadlineSoon));
        taken.extend(replies);
        if done {
            return taken;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn a_late_tick_ends_where_punctual_ticks_do(
        steps in prop::collection::vec(step(), 1..8),
        wait_secs in prop::option::of(1u32..6),
    ) {
        let mut punctual = engine_after(&steps, wait_secs);
        let mut late = engine_after(&steps, wait_secs);
        let jobs: u64 = steps
            .iter()
            .map(|s| match s { Step::Put { count, .. } => *count as u64, Step::Pause { .. } => 0 })
            .sum();

        // Halfway (jobs due later must still wait), then past everything.
        for checkpoint in [2 * NS + NS / 2, LATE_NS] {
            while let Some(at) = punctual.next_wake().filter(|&at| at <= checkpoint) {
                punctual.tick(at);
                punctual.check_invariants();
            }
            punctual.tick(checkpoint);
            punctual.check_invariants();

            // At most the per-tick bound of timers per call; a call that
            // stops with timers due says so.
            let mut calls = 0;
            while late.tick(checkpoint).is_some_and(|at| at <= checkpoint) {
                late.check_invariants();
                calls += 1;
                prop_assert!(
                    calls <= jobs as usize / TIMERS_PER_TICK_MAX + TUBES.len() * 4 + 4,
                    "{} calls", calls
                );
            }
            late.check_invariants();
            prop_assert_eq!(observe(&mut punctual, jobs), observe(&mut late, jobs));
        }
        prop_assert_eq!(tube_counts(&mut punctual, LATE_NS), tube_counts(&mut late, LATE_NS));
        prop_assert_eq!(drain_ready(&mut punctual, LATE_NS), drain_ready(&mut late, LATE_NS));
        punctual.check_invariants();
        late.check_invariants();
    }
}

/// More jobs due on one instant than one tick moves: each call moves the
/// per-tick bound's worth, in (due, id) order across tubes, and says the
/// rest are due.
#[test]
fn a_run_stops_at_the_per_tick_bound_and_at_the_next_tube() {
    let per_tube = TIMERS_PER_TICK_MAX;
    let steps: Vec<Step> = (0..TUBES.len())
        .flat_map(|index| {
            [Step::Put {
                tube: index,
                delay_secs: 1,
                pri: 0,
                count: per_tube / 2,
            }]
        })
        .cycle()
        .take(TUBES.len() * 2)
        .collect();
    let mut engine = engine_after(&steps, None);
    let total = (TUBES.len() * per_tube) as u64;
    let due = NS;
    let mut ready_before = 0;
    let mut calls = 0;
    loop {
        let wake = engine.tick(due + 5);
        engine.check_invariants();
        calls += 1;
        let ready = (1..=total)
            .filter(|&id| engine.job(id).map(|j| j.state) == Some(JobState::Ready))
            .count();
        assert!(
            ready - ready_before <= TIMERS_PER_TICK_MAX,
            "one call moved {}",
            ready - ready_before
        );
        // The jobs move in id order: every job up to the count is ready.
        assert!(
            (1..=ready as u64).all(|id| engine.job(id).map(|j| j.state) == Some(JobState::Ready)),
            "ready jobs are a prefix of the ids after {calls} calls"
        );
        ready_before = ready;
        match wake {
            Some(at) if at <= due + 5 => assert!(ready < total as usize),
            _ => break,
        }
    }
    assert_eq!(ready_before, total as usize);
    assert_eq!(calls, TUBES.len());
}

/// A job made ready in a paused tube, a reserver on that tube timing out
/// before the pause ends: a late tick must time the reserver out as an
/// on-time one does, not hand it the job because the pause is over by the
/// tick's `now` (it did).
#[test]
fn a_late_tick_finds_a_pause_as_it_was_at_each_timers_instant() {
    // The put makes the tube (a pause of a tube no one used is NOT_FOUND).
    let steps = [
        Step::Put {
            tube: 1,
            delay_secs: 1,
            pri: 0,
            count: 1,
        },
        Step::Pause {
            tube: 1,
            delay_secs: 3,
        },
    ];
    let mut punctual = engine_after(&steps, Some(2));
    let mut late = engine_after(&steps, Some(2));
    while let Some(at) = punctual.next_wake().filter(|&at| at <= LATE_NS) {
        punctual.tick(at);
        punctual.check_invariants();
    }
    while late.next_wake().is_some_and(|at| at <= LATE_NS) {
        late.tick(LATE_NS);
        late.check_invariants();
    }
    let on_time = observe(&mut punctual, 1);
    assert_eq!(on_time.0.last(), Some(&(WAITER, Response::TimedOut)));
    assert_eq!(on_time.1, vec![Some(JobState::Ready)]);
    assert_eq!(observe(&mut late, 1), on_time);
}
