//! Jobs through one PostgreSQL broker, the beanstalkd way (enqueue, reserve,
//! delete under the lease): producers and consumers at once on a private
//! test cluster, the rate printed. Measures the broker's statements and
//! round trips, not a front door.
//!
//!   cargo run -p spool-pg --example pg_churn [--release] -- [JOBS] [WORKERS]
//!
//! Bounded: JOBS jobs (default 20,000), and at most `TIME_LIMIT`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use spool_broker::{Broker, NewJob, QueueName, SessionBroker};
use spool_pg::testing::TestCluster;
use spool_pg::{Clock, PgBroker, PgConfig};

const TIME_LIMIT: Duration = Duration::from_secs(300);

fn arg(index: usize, default: u64) -> u64 {
    std::env::args()
        .nth(index)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let jobs = arg(1, 20_000);
    let workers = arg(2, 4);
    let url = TestCluster::shared().create_database();
    let mut config = PgConfig::new(&url, "churn");
    config.pool_size = (2 * workers) as usize;
    let broker = PgBroker::connect(config, Clock::wall())
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let queue = QueueName::new(b"churn").unwrap_or_else(|_| panic!("a queue name"));
    let round_trips_before = broker.pool_stats().round_trips;
    let started = Instant::now();
    let deadline = started + TIME_LIMIT;
    let put = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (producer, queue_p, put) = (broker.clone(), queue.clone(), put.clone());
        tasks.push(tokio::spawn(async move {
            let (broker, queue) = (producer, queue_p);
            while put.fetch_add(1, Ordering::Relaxed) < jobs && Instant::now() < deadline {
                let job = NewJob {
                    payload: Bytes::from_static(b"x"),
                    max_attempts: Some(0),
                    ..NewJob::default()
                };
                broker.enqueue(queue.clone(), job).await.expect("enqueue");
            }
        }));
        let (consumer, queue_c, done) = (broker.clone(), queue.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let (broker, queue) = (consumer, queue_c);
            while done.load(Ordering::Relaxed) < jobs && Instant::now() < deadline {
                let leased = broker
                    .reserve(vec![queue.clone()], 1, 100)
                    .await
                    .expect("reserve");
                for leased in leased {
                    broker.delete_leased(leased.lease).await.expect("delete");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("a worker");
    }
    let secs = started.elapsed().as_secs_f64();
    let finished = done.load(Ordering::Relaxed);
    let round_trips = broker.pool_stats().round_trips - round_trips_before;
    println!(
        "{finished} of {jobs} jobs through, {workers} producers + {workers} consumers: \
         {:.0} jobs/s ({secs:.1} s), {:.2} database round trips a job",
        finished as f64 / secs,
        round_trips as f64 / finished.max(1) as f64
    );
    assert_eq!(
        finished, jobs,
        "every job went through within the time limit"
    );
}
