//! Measures what one instant of many `@every 1s` schedules costs the
//! engine: the firings made ahead, then the moves of their jobs to ready at
//! the instant, batch by batch as the server calls `tick`.
//!
//! Usage: cargo run --release -p spool-engine --example instant_cost [SCHEDULES [SECONDS]]

use std::time::Instant;

use spool_broker::{JobState, Misfire, NewJob, Op, Outcome, QueueName, ScheduleSpec};
use spool_engine::{Engine, EngineConfig};

const NS_PER_MS: u64 = 1_000_000;
/// 2026-12-04T00:00:00Z in wall-clock ms.
const START_MS: u64 = 1_796_342_400_000;

fn at(ms: u64) -> u64 {
    (ms - START_MS) * NS_PER_MS
}

/// The server's allocator: the moves allocate and free B-tree nodes.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Nanoseconds this thread has run on a CPU, so that the figure leaves out
/// the time other processes took the CPU from it, as the wall clock does
/// not on a shared machine. `None` where there is no such clock.
#[cfg(target_os = "linux")]
fn on_cpu_ns() -> Option<u64> {
    use nix::time::{clock_gettime, ClockId};
    let t = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).ok()?;
    Some(t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

#[cfg(not(target_os = "linux"))]
fn on_cpu_ns() -> Option<u64> {
    None
}

fn main() {
    let count: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let seconds: u64 = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let mut engine = Engine::new(EngineConfig {
        max_job_size: 1 << 16,
    });
    engine.set_epoch_ns(START_MS * NS_PER_MS);
    let queue = QueueName::new(b"ticks").expect("a valid name");
    for i in 0..count {
        let spec = ScheduleSpec {
            cron: "@every 1s".into(),
            timezone: "UTC".into(),
            queue: queue.clone(),
            job: NewJob::default(),
            misfire: Misfire::All,
            catch_up_max: 100,
            jitter_ms: 0,
            max_backlog: None,
            paused: false,
        };
        let name = QueueName::new(format!("s{i}").as_bytes()).expect("a valid name");
        engine
            .apply(
                Op::PutSchedule {
                    name,
                    spec: Box::new(spec),
                },
                at(START_MS),
            )
            .expect("put schedule");
    }
    for second in 1..=seconds {
        let instant_ms = START_MS + second * 1_000;
        // The firings made ahead (and the last instant's settled), half a
        // second before the instant.
        let ahead_ms = instant_ms - 500;
        let started = Instant::now();
        let mut calls_ahead = 0;
        while engine.next_wake().is_some_and(|w| w <= at(ahead_ms)) {
            engine.tick(at(ahead_ms));
            calls_ahead += 1;
        }
        let ahead = started.elapsed();
        // The instant: every job made ahead becomes ready. The engine's
        // clock runs with the real one from the instant on, so its skew
        // histogram holds what each job's move waited for the ones before.
        let started = Instant::now();
        let cpu_started = on_cpu_ns();
        let mut calls = 0;
        let mut all_ready_ms = None;
        let mut all_ready_cpu_ms = None;
        loop {
            let now = at(instant_ms) + started.elapsed().as_nanos() as u64;
            if engine.next_wake().is_none_or(|w| w > now) {
                break;
            }
            engine.tick(now);
            calls += 1;
            let delayed = match engine.apply(
                Op::List {
                    queue: queue.clone(),
                    state: JobState::Delayed,
                    after: None,
                    limit: 1,
                },
                now,
            ) {
                Ok(Outcome::Page(page)) => page.jobs.len(),
                other => panic!("a page, not {other:?}"),
            };
            if delayed == 0 && all_ready_ms.is_none() {
                all_ready_ms = Some(started.elapsed().as_secs_f64() * 1e3);
                all_ready_cpu_ms = on_cpu_ns()
                    .zip(cpu_started)
                    .map(|(now, then)| (now - then) as f64 / 1e6);
            }
        }
        let instant = started.elapsed();
        println!(
            "second {second}: ahead {:.2} ms in {calls_ahead} calls; instant: all {count} ready after {:.3} ms \
             ({:.3} ms on the CPU), done after {:.3} ms in {calls} calls",
            ahead.as_secs_f64() * 1e3,
            all_ready_ms.unwrap_or(f64::NAN),
            all_ready_cpu_ms.unwrap_or(f64::NAN),
            instant.as_secs_f64() * 1e3,
        );
    }
}
