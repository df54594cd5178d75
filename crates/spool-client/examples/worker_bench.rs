//! The SDK's overhead, measured against a running server: a [`Worker`] with
//! no-op handlers against a raw loop of the same client (reserve a batch of
//! 32, complete them all concurrently, repeat), in the same run, rounds
//! alternated; then how long a cancelled job's handler waits for its token.
//!
//! ```text
//! spool serve --in-memory &
//! cargo run --release -p spool-client --example worker_bench -- --http 127.0.0.1:11301
//! ```
//!
//! Flags: `--http ADDR`, `--jobs N` (per round, default 20000), `--rounds R`
//! (default 2), `--concurrency C` (default 32), `--cancels K` (default 20),
//! `--heartbeat-ms H` (default 200). Bounded: every round has a fixed job
//! count and a time limit.

use std::time::{Duration, Instant};

use spool_client::{Client, Enqueue, Error, HandlerError, Job, JobContext, Worker};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// Longest a round may take before the bench gives up on it.
const ROUND_LIMIT: Duration = Duration::from_secs(300);

/// Jobs a batch enqueue carries (the server's bound is 1,000).
const ENQUEUE_BATCH: usize = 1_000;

struct Settings {
    http: String,
    jobs: usize,
    rounds: usize,
    concurrency: usize,
    cancels: usize,
    heartbeat: Duration,
}

fn settings() -> Result<Settings, String> {
    let mut s = Settings {
        http: "127.0.0.1:11301".into(),
        jobs: 20_000,
        rounds: 2,
        concurrency: 32,
        cancels: 20,
        heartbeat: Duration::from_millis(200),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let number = || value.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--http" => s.http = value.clone(),
            "--jobs" => s.jobs = number()?,
            "--rounds" => s.rounds = number()?,
            "--concurrency" => s.concurrency = number()?.max(1),
            "--cancels" => s.cancels = number()?,
            "--heartbeat-ms" => s.heartbeat = Duration::from_millis(number()? as u64),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(s)
}

async fn fill(client: &Client, queue: &str, jobs: usize) -> Result<(), Error> {
    let mut left = jobs;
    while left > 0 {
        let n = left.min(ENQUEUE_BATCH);
        let batch: Vec<Enqueue> = (0..n).map(|_| Enqueue::bytes(&b"x"[..])).collect();
        client.enqueue_batch(queue, &batch).await?;
        left -= n;
    }
    Ok(())
}

/// The baseline: reserve up to `batch`, complete them all at once, repeat.
async fn raw_round(client: &Client, queue: &str, jobs: usize, batch: usize) -> Result<f64, Error> {
    fill(client, queue, jobs).await?;
    let started = Instant::now();
    let mut done = 0;
    while done < jobs {
        if started.elapsed() > ROUND_LIMIT {
            return Err(Error::Usage("the raw round ran past its limit".into()));
        }
        let leased = client
            .reserve(&[queue], batch as u32, Duration::from_secs(1))
            .await?;
        let mut completes = JoinSet::new();
        for job in leased {
            let client = client.clone();
            completes.spawn(async move {
                let lease = job.lease.unwrap_or_default();
                client
                    .complete(job.id, &lease, &spool_client::Body::None)
                    .await
            });
        }
        while let Some(result) = completes.join_next().await {
            result.map_err(|e| Error::Usage(e.to_string()))??;
            done += 1;
        }
    }
    Ok(jobs as f64 / started.elapsed().as_secs_f64())
}

async fn sdk_round(
    client: &Client,
    queue: &str,
    jobs: usize,
    concurrency: usize,
) -> Result<f64, Error> {
    fill(client, queue, jobs).await?;
    let worker = Worker::builder(client.clone())
        .queue(queue)
        .concurrency(concurrency)
        .poll_timeout(Duration::from_millis(500))
        .build(|_job: Job, _ctx: JobContext| async { Ok::<(), HandlerError>(()) });
    let counters = worker.counters();
    let stop = worker.shutdown_handle();
    let started = Instant::now();
    let run = tokio::spawn(worker.run());
    while (counters.snapshot().processed as usize) < jobs {
        if started.elapsed() > ROUND_LIMIT {
            stop.shutdown();
            return Err(Error::Usage("the SDK round ran past its limit".into()));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    stop.shutdown();
    let totals = run.await.map_err(|e| Error::Usage(e.to_string()))??;
    if totals.processed as usize != jobs || totals.failed + totals.lease_lost > 0 {
        return Err(Error::Usage(format!("unexpected totals: {totals:?}")));
    }
    Ok(jobs as f64 / elapsed.as_secs_f64())
}

/// From `cancel` being sent to the handler seeing its token, per job.
async fn cancel_latencies(
    client: &Client,
    count: usize,
    heartbeat: Duration,
) -> Result<Vec<Duration>, Error> {
    let queue = "bench-cancel";
    let (started_tx, mut started) = mpsc::unbounded_channel::<u64>();
    let (fired_tx, mut fired) = mpsc::unbounded_channel::<Instant>();
    let worker = Worker::builder(client.clone())
        .queue(queue)
        .heartbeat_interval(heartbeat)
        .build(move |job: Job, ctx: JobContext| {
            let started = started_tx.clone();
            let fired = fired_tx.clone();
            async move {
                let _ = started.send(job.id);
                ctx.cancelled().await;
                let _ = fired.send(Instant::now());
                Ok::<(), HandlerError>(())
            }
        });
    let stop = worker.shutdown_handle();
    let run = tokio::spawn(worker.run());
    let mut latencies = Vec::new();
    let limit = heartbeat * 4 + Duration::from_secs(5);
    for _ in 0..count {
        client
            .enqueue(
                queue,
                &Enqueue::bytes(&b"x"[..]).ttr(Duration::from_secs(600)),
            )
            .await?;
        let id = tokio::time::timeout(limit, started.recv())
            .await
            .ok()
            .flatten()
            .ok_or_else(|| Error::Usage("the handler never started".into()))?;
        // Cancel at a random point of the heartbeat cycle, not in step.
        let offset = (id as u64 * 7919) % heartbeat.as_millis().max(1) as u64;
        tokio::time::sleep(Duration::from_millis(offset)).await;
        let sent = Instant::now();
        client.cancel(id).await?;
        let at = tokio::time::timeout(limit, fired.recv())
            .await
            .ok()
            .flatten()
            .ok_or_else(|| Error::Usage("the token never fired".into()))?;
        latencies.push(at.saturating_duration_since(sent));
    }
    stop.shutdown();
    run.await.map_err(|e| Error::Usage(e.to_string()))??;
    latencies.sort();
    Ok(latencies)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let s = settings()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = Client::new(s.http.clone())?;
        let (mut raw, mut sdk) = (Vec::new(), Vec::new());
        for round in 0..s.rounds {
            // Alternate which goes first, so neither always meets a warmer
            // server.
            let raw_queue = format!("bench-raw-{round}");
            let sdk_queue = format!("bench-sdk-{round}");
            if round % 2 == 0 {
                raw.push(raw_round(&client, &raw_queue, s.jobs, s.concurrency).await?);
                sdk.push(sdk_round(&client, &sdk_queue, s.jobs, s.concurrency).await?);
            } else {
                sdk.push(sdk_round(&client, &sdk_queue, s.jobs, s.concurrency).await?);
                raw.push(raw_round(&client, &raw_queue, s.jobs, s.concurrency).await?);
            }
            println!(
                "round {round}: raw {:.0} jobs/s, sdk {:.0} jobs/s",
                raw[round], sdk[round]
            );
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let (raw_mean, sdk_mean) = (mean(&raw), mean(&sdk));
        println!(
            "raw reserve(batch {c})/complete: {raw_mean:.0} jobs/s; SDK worker (concurrency {c}, no-op): {sdk_mean:.0} jobs/s; ratio {:.2} (target >= 0.80)",
            sdk_mean / raw_mean,
            c = s.concurrency
        );
        if s.cancels > 0 {
            let l = cancel_latencies(&client, s.cancels, s.heartbeat).await?;
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            println!(
                "cancel -> token: p50 {:.1} ms, max {:.1} ms over {} jobs; heartbeat {} ms, target <= {} ms",
                ms(l[l.len() / 2]),
                ms(l[l.len() - 1]),
                l.len(),
                s.heartbeat.as_millis(),
                s.heartbeat.as_millis() + 50
            );
        }
        Ok(())
    })
}
