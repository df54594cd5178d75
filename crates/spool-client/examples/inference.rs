//! Model inference behind a queue: callers enqueue a request and wait for
//! its result (one `?wait_ms` long poll) within a deadline; a worker runs
//! the "model" on batches of up to `--batch` requests, or whatever arrived
//! within `--window-ms` of the first, because a model call costs about the
//! same for one input as for a batch. Prints latency p50/p99, deadlines
//! missed, and the batch sizes.
//!
//! ```text
//! spool serve --in-memory &
//! cargo run --release -p spool-client --example inference -- --http 127.0.0.1:11301
//! ```
//!
//! The worker is the SDK's [`Worker`] with `concurrency = batch`: each
//! handler hands its job to a batcher task and awaits its answer, so
//! heartbeats, cancellation and draining come with it. A request past its
//! deadline when its batch forms is failed, not computed. Bounded:
//! `--requests` in all (default 2000) from `--clients` callers (default 32),
//! each waiting at most its deadline.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use spool_client::{Client, Enqueue, Error, HandlerError, Job, JobContext, JobState, Worker};
use tokio::sync::{mpsc, oneshot};

const QUEUE: &str = "inference";

/// The header that carries a request's deadline, in Unix milliseconds.
const DEADLINE_HEADER: &str = "deadline-unix-ms";

struct Settings {
    http: String,
    requests: usize,
    clients: usize,
    batch: usize,
    window: Duration,
    deadline: Duration,
}

fn settings() -> Result<Settings, String> {
    let mut s = Settings {
        http: "127.0.0.1:11301".into(),
        requests: 2_000,
        clients: 32,
        batch: 16,
        window: Duration::from_millis(5),
        deadline: Duration::from_millis(1_000),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let number = || value.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--http" => s.http = value.clone(),
            "--requests" => s.requests = number()?,
            "--clients" => s.clients = number()?.max(1),
            "--batch" => s.batch = number()?.max(1),
            "--window-ms" => s.window = Duration::from_millis(number()? as u64),
            "--deadline-ms" => s.deadline = Duration::from_millis(number()? as u64),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(s)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One request waiting for its batch.
struct Pending {
    input: i64,
    deadline_unix_ms: u64,
    answer: oneshot::Sender<Result<serde_json::Value, HandlerError>>,
}

/// The "model": a fixed cost per call plus a little per input.
async fn model(inputs: &[i64]) -> Vec<i64> {
    tokio::time::sleep(Duration::from_millis(4) + Duration::from_micros(200) * inputs.len() as u32)
        .await;
    inputs.iter().map(|x| x * x).collect()
}

/// Collects up to `batch` requests or what came within `window` of the
/// first, runs the model once, answers each; returns the batch sizes.
async fn batcher(mut inbox: mpsc::Receiver<Pending>, batch: usize, window: Duration) -> Vec<usize> {
    let mut sizes = Vec::new();
    while let Some(first) = inbox.recv().await {
        let mut pending = vec![first];
        let closes = tokio::time::Instant::now() + window;
        while pending.len() < batch {
            match tokio::time::timeout_at(closes, inbox.recv()).await {
                Ok(Some(next)) => pending.push(next),
                Ok(None) | Err(_) => break,
            }
        }
        let now = unix_ms();
        let (live, late): (Vec<Pending>, Vec<Pending>) =
            pending.into_iter().partition(|p| p.deadline_unix_ms > now);
        for p in late {
            let _ = p
                .answer
                .send(Err(HandlerError::new("past its deadline").permanent()));
        }
        if live.is_empty() {
            continue;
        }
        sizes.push(live.len());
        let inputs: Vec<i64> = live.iter().map(|p| p.input).collect();
        let outputs = model(&inputs).await;
        for (p, output) in live.into_iter().zip(outputs) {
            let _ = p.answer.send(Ok(json!({ "output": output })));
        }
    }
    sizes
}

/// One caller: `count` requests in turn, each enqueued and waited for
/// within the deadline; answers the latencies of those answered in time
/// and how many missed it.
async fn caller(
    client: Client,
    first: usize,
    count: usize,
    deadline: Duration,
) -> Result<(Vec<Duration>, usize), Error> {
    let mut latencies = Vec::new();
    let mut missed = 0;
    for i in first..first + count {
        let sent = Instant::now();
        let request = Enqueue::json(&json!({ "input": i }))?
            .header(
                DEADLINE_HEADER,
                (unix_ms() + deadline.as_millis() as u64).to_string(),
            )
            .max_attempts(1);
        let job = client.enqueue_and_wait(QUEUE, &request, deadline).await?;
        if job.state == JobState::Completed {
            let output = job
                .result_json::<serde_json::Value>()
                .and_then(Result::ok)
                .and_then(|r| r["output"].as_i64());
            if output != Some((i * i) as i64) {
                return Err(Error::Protocol(format!(
                    "request {i}: wrong output {output:?}"
                )));
            }
            latencies.push(sent.elapsed());
        } else {
            missed += 1;
            // Nobody waits for it any more: it must not run later.
            if !job.state.is_settled() {
                let _ = client.cancel(job.id).await;
            }
        }
    }
    Ok((latencies, missed))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let s = settings()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = Client::new(s.http.clone())?;
        let (inbox_tx, inbox) = mpsc::channel::<Pending>(s.batch * 2);
        let batcher = tokio::spawn(batcher(inbox, s.batch, s.window));
        let worker = Worker::builder(client.clone())
            .queue(QUEUE)
            .concurrency(s.batch)
            .batch_max(s.batch as u32)
            .poll_timeout(Duration::from_millis(500))
            .build(move |job: Job, _ctx: JobContext| {
                let inbox = inbox_tx.clone();
                async move {
                    let input = job.payload_json::<serde_json::Value>()?["input"]
                        .as_i64()
                        .ok_or_else(|| HandlerError::new("no input").permanent())?;
                    let deadline_unix_ms = job
                        .headers
                        .get(DEADLINE_HEADER)
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(u64::MAX);
                    let (answer, reply) = oneshot::channel();
                    inbox
                        .send(Pending { input, deadline_unix_ms, answer })
                        .await
                        .map_err(|_| HandlerError::new("the batcher stopped"))?;
                    reply
                        .await
                        .map_err(|_| HandlerError::new("the batcher dropped the request"))?
                }
            });
        let stop = worker.shutdown_handle();
        let run = tokio::spawn(worker.run());

        let started = Instant::now();
        let per_caller = s.requests.div_ceil(s.clients);
        let mut callers = Vec::new();
        for c in 0..s.clients {
            let first = c * per_caller;
            let count = per_caller.min(s.requests.saturating_sub(first));
            callers.push(tokio::spawn(caller(client.clone(), first, count, s.deadline)));
        }
        let mut latencies = Vec::new();
        let mut missed = 0;
        for c in callers {
            let (l, m) = c.await??;
            latencies.extend(l);
            missed += m;
        }
        let elapsed = started.elapsed();
        stop.shutdown();
        let totals = run.await??;
        // The worker's handlers hold the last senders; with it gone the
        // batcher's inbox closes and it ends.
        let mut sizes = batcher.await?;

        latencies.sort();
        sizes.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let at = |q: f64| latencies.get(((latencies.len() as f64 - 1.0) * q) as usize).copied().unwrap_or_default();
        println!(
            "{} requests from {} callers in {:.2} s ({:.0}/s); deadline {} ms: {} completed within it, {} not",
            s.requests,
            s.clients,
            elapsed.as_secs_f64(),
            s.requests as f64 / elapsed.as_secs_f64(),
            s.deadline.as_millis(),
            latencies.len(),
            missed
        );
        println!(
            "latency: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            ms(at(0.5)),
            ms(at(0.99)),
            ms(at(1.0))
        );
        let mean = sizes.iter().sum::<usize>() as f64 / sizes.len().max(1) as f64;
        let full = sizes.iter().filter(|&&n| n == s.batch).count();
        println!(
            "batches: {} (up to {} or {} ms): mean size {:.1}, p50 {}, max {}, full {}",
            sizes.len(),
            s.batch,
            s.window.as_millis(),
            mean,
            sizes.get(sizes.len() / 2).copied().unwrap_or(0),
            sizes.last().copied().unwrap_or(0),
            full
        );
        println!(
            "worker: {} completed, {} failed, {} cancelled",
            totals.processed, totals.failed, totals.cancelled
        );
        Ok(())
    })
}
