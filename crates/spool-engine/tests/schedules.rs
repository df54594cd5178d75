//! Schedules in the engine, driven directly: the orders of operations and
//! timers a broker round can produce, which the conformance suite (one
//! operation at a time) cannot arrange.

use spool_broker::{JobState, Misfire, NewJob, Op, Outcome, QueueName, ScheduleSpec, ScheduleView};
use spool_engine::{Engine, EngineConfig, LogRecord, SCHEDULE_TIMERS_PER_TICK_MAX};

const NS_PER_MS: u64 = 1_000_000;
/// 2026-12-04T00:00:00Z in wall-clock ms.
const START_MS: u64 = 1_796_342_400_000;

fn name(text: &str) -> QueueName {
    QueueName::new(text.as_bytes()).expect("a valid name")
}

fn engine() -> Engine {
    let mut engine = Engine::new(EngineConfig {
        max_job_size: 1 << 16,
    });
    engine.set_epoch_ns(START_MS * NS_PER_MS);
    engine.enable_logging();
    engine
}

fn spec(cron: &str) -> ScheduleSpec {
    ScheduleSpec {
        cron: cron.into(),
        timezone: "UTC".into(),
        queue: name("q"),
        job: NewJob::default(),
        misfire: Misfire::All,
        catch_up_max: 100,
        jitter_ms: 0,
        max_backlog: None,
        paused: false,
    }
}

fn at(ms: u64) -> u64 {
    (ms - START_MS) * NS_PER_MS
}

fn view(engine: &mut Engine, op: Op, now_ms: u64) -> ScheduleView {
    match engine.apply(op, at(now_ms)).expect("op") {
        Outcome::Schedule { schedule, .. } => *schedule,
        other => panic!("a schedule, not {other:?}"),
    }
}

fn ready(engine: &mut Engine, now_ms: u64) -> usize {
    match engine
        .apply(
            Op::List {
                queue: name("q"),
                state: JobState::Ready,
                after: None,
                limit: 1_000,
            },
            at(now_ms),
        )
        .expect("list")
    {
        Outcome::Page(page) => page.jobs.len(),
        other => panic!("a page, not {other:?}"),
    }
}

#[test]
fn replaced_while_due_and_not_yet_fired_fires_that_instant_once() {
    let mut e = engine();
    let put = |spec| Op::PutSchedule {
        name: name("s"),
        spec: Box::new(spec),
    };
    let made = view(&mut e, put(spec("@every 10s")), START_MS);
    let due = made.next_fire_at_ms.expect("armed");
    // The round at the due instant runs the replace before its timers.
    let replaced = view(&mut e, put(spec("@every 10s")), due);
    assert_eq!(replaced.next_fire_at_ms, Some(due), "still due");
    e.tick(at(due));
    assert_eq!(ready(&mut e, due), 1);
    // And again, replaced in the round that already fired it: not again.
    let again = view(&mut e, put(spec("@every 10s")), due);
    assert_eq!(again.next_fire_at_ms, Some(due + 10_000));
    e.tick(at(due));
    assert_eq!(ready(&mut e, due), 1);
    let view = view(&mut e, Op::GetSchedule { name: name("s") }, due);
    assert_eq!((view.fires, view.last_fire_at_ms), (1, Some(due)));
}

#[test]
fn a_firing_is_one_log_batch_with_the_schedules_state() {
    let mut e = engine();
    let made = view(
        &mut e,
        Op::PutSchedule {
            name: name("s"),
            spec: Box::new(spec("@every 1s")),
        },
        START_MS,
    );
    let mut log = Vec::new();
    e.drain_log_into(&mut log);
    let due = made.next_fire_at_ms.expect("armed");
    // Late by 2.5 s: three instants, all fired (misfire all), in one batch.
    e.tick(at(due + 2_500));
    log.clear();
    e.drain_log_into(&mut log);
    assert_eq!(log.len(), 1, "{log:?}");
    let LogRecord::Batch(records) = &log[0] else {
        panic!("a batch, not {:?}", log[0]);
    };
    let jobs = records
        .iter()
        .filter(|r| matches!(r, LogRecord::Job(_)))
        .count();
    assert_eq!(jobs, 3);
    match records.last() {
        Some(LogRecord::Schedule(view)) => {
            assert_eq!(view.fires, 3);
            assert_eq!(view.last_fire_at_ms, Some(due + 2_000));
            assert_eq!(view.next_fire_at_ms, Some(due + 3_000));
        }
        other => panic!("the schedule's state last, not {other:?}"),
    }
    // The timer set says when to come back.
    assert_eq!(e.next_wake(), Some(at(due + 3_000)));
}

#[test]
fn replay_restores_schedules_and_their_timer() {
    let mut e = engine();
    view(
        &mut e,
        Op::PutSchedule {
            name: name("s"),
            spec: Box::new(spec("@every 1s")),
        },
        START_MS,
    );
    e.tick(at(START_MS + 1_000));
    let mut log = Vec::new();
    e.drain_log_into(&mut log);
    // A new process, started 5 s later, replays the log.
    let mut replayed = Engine::new(EngineConfig {
        max_job_size: 1 << 16,
    });
    replayed.set_epoch_ns((START_MS + 5_000) * NS_PER_MS);
    for record in log {
        replayed.replay(record).expect("replay");
    }
    // Due instants 2 s ..= 5 s were missed while down: due at once.
    assert_eq!(replayed.next_wake(), Some(0));
    replayed.tick(0);
    match replayed
        .apply(Op::GetSchedule { name: name("s") }, 0)
        .expect("get")
    {
        Outcome::Schedule { schedule, .. } => {
            assert_eq!(schedule.fires, 1 + 4, "misfire all catches up 2 s ..= 5 s");
            assert_eq!(schedule.last_fire_at_ms, Some(START_MS + 5_000));
        }
        other => panic!("{other:?}"),
    }
}

/// Many schedules due on one instant fire in batches: a tick stops after
/// `SCHEDULE_TIMERS_PER_TICK_MAX` firings and says the rest are due, and
/// the next call fires the next batch at its own `now`, which is the skew
/// that batch shows (due → ready, not due → the first call).
#[test]
fn schedules_due_together_fire_in_batches_each_measured_when_it_fires() {
    let mut e = engine();
    let batch = SCHEDULE_TIMERS_PER_TICK_MAX;
    let count = 2 * batch + 10;
    let schedule = |i: usize| name(&format!("s{i:04}"));
    for i in 0..count {
        let put = Op::PutSchedule {
            name: schedule(i),
            spec: Box::new(spec("@every 1s")),
        };
        view(&mut e, put, START_MS);
    }
    let due = START_MS + 1_000;
    assert_eq!(e.tick(at(due)), Some(at(due)), "more are due");
    assert_eq!(ready(&mut e, due), batch);
    assert_eq!(e.tick(at(due + 2)), Some(at(due)));
    assert_eq!(ready(&mut e, due + 2), 2 * batch);
    assert_eq!(e.tick(at(due + 4)), Some(at(due + 1_000)), "all fired");
    assert_eq!(ready(&mut e, due + 4), count);
    let skew_ms = |e: &mut Engine, i: usize| {
        view(e, Op::GetSchedule { name: schedule(i) }, due + 4).last_skew_ms
    };
    assert_eq!(skew_ms(&mut e, 0), Some(0));
    assert_eq!(skew_ms(&mut e, batch), Some(2));
    assert_eq!(skew_ms(&mut e, count - 1), Some(4));
}
