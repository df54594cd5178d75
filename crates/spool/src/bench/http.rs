//! `spool bench --mode http-*`: loads on the HTTP/JSON job API (`/v1`),
//! over kept-alive connections with hyper's HTTP/1 client.
//!
//! - `http-enqueue`: `--producers` connections, one job a request;
//!   jobs/s and latency.
//! - `http-batch`: the same with `--enqueue-batch` jobs a request.
//! - `http-work`: producers enqueue (in batches of `--enqueue-batch`)
//!   while `--consumers` workers reserve `--reserve-batch` at a time and
//!   complete what they reserved with one `POST /v1/jobs/complete`
//!   (`--complete-each`: each job with its own request); jobs/s
//!   completed.
//! - `http-wait`: enqueue-and-wait (`?wait_ms`) at a fixed `--rate`
//!   requests/s for `--duration-secs`, the jobs worked by `--consumers`
//!   HTTP workers; a request sent late (its connection still busy) counts
//!   its latency from when it was due, so a stall is not hidden by
//!   sending later (no coordinated omission).
//! - `http-concurrency`: the queue's policy gets `concurrency:
//!   --concurrency`; `--consumers` workers compete for its jobs and count
//!   the leases they hold. A lease counts from its reserve's answer until
//!   just before its complete is sent, so the count never exceeds what
//!   the server has handed out: a maximum above the policy is a server
//!   bug, and the run fails.
//! - `http-rate`: the queue's policy gets `rate_per_s: --rate`; workers
//!   take jobs as fast as they are handed out; the rate measured over
//!   `--duration-secs` after a warm-up that spends the bucket's burst.
//! - `http-idle`: `--connections` kept-alive connections, each after one
//!   request, held idle; the server's resident memory per connection.
//!
//! Every loop is bounded by its job count and by `--time-limit-secs`. The
//! queue (`--tube`) is emptied before and after a run, so leftovers of
//! one run are not worked or waited behind by the next.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{header, Method, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use super::report::Latency;
use super::{BenchArgs, Mode};

/// Highest latency the histograms resolve, in nanoseconds (one minute).
const LATENCY_MAX_NS: u64 = 60_000_000_000;

/// How long a worker's reserve waits for a job before it checks whether
/// the run is over.
const RESERVE_TIMEOUT_MS: u64 = 200;

/// The longest an enqueue-and-wait may wait for its job: far above any
/// latency worth reporting, far below the time limit.
const WAIT_MS: u64 = 5_000;

/// Warm-up of a rate run: the bucket's burst (up to one second's worth of
/// tokens) is spent before the measured window opens.
const RATE_WARMUP: Duration = Duration::from_secs(2);

/// How long the server gets, after the last idle connection answered, to
/// finish whatever it allocates for them before its memory is sampled.
const IDLE_SETTLE: Duration = Duration::from_millis(500);

/// Jobs a preparation batch enqueues (the most a batch may hold).
const PREPARE_BATCH_JOBS: u64 = 1_000;

/// One kept-alive HTTP/1 connection to the server.
pub(super) struct HttpConn {
    sender: SendRequest<Full<Bytes>>,
    host: String,
    token: Option<String>,
}

impl HttpConn {
    pub(super) async fn connect(addr: SocketAddr, token: Option<&str>) -> Result<HttpConn> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to the HTTP listener at {addr}"))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake")?;
        // Drives the socket until the sender is dropped.
        tokio::spawn(connection);
        Ok(HttpConn {
            sender,
            host: addr.to_string(),
            token: token.map(str::to_string),
        })
    }

    /// One request; the status and the whole body.
    async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes)> {
        self.sender
            .ready()
            .await
            .context("the server closed the connection")?;
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.host)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = &self.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Full::new(body))
            .context("building a request")?;
        let response = self
            .sender
            .send_request(request)
            .await
            .with_context(|| format!("{path}: no answer"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .with_context(|| format!("{path}: reading the answer"))?
            .to_bytes();
        Ok((status, body))
    }

    /// A request that must answer `expected`.
    pub(super) async fn expect(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
        expected: StatusCode,
    ) -> Result<Bytes> {
        let (status, answer) = self.call(method.clone(), path, body).await?;
        if status != expected {
            bail!(
                "{method} {path} answered {status}: {}",
                String::from_utf8_lossy(&answer)
            );
        }
        Ok(answer)
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct LeasedJob {
    pub(super) id: u64,
    pub(super) lease: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct Leased {
    pub(super) jobs: Vec<LeasedJob>,
}

/// What an HTTP run reports. Fields a mode does not measure are `null`.
#[derive(Debug, Default, Serialize)]
struct HttpReport {
    mode: &'static str,
    http: String,
    queue: String,
    producers: usize,
    consumers: usize,
    threads: usize,
    jobs: u64,
    /// Jobs enqueued (enqueue modes) or completed (worker modes).
    jobs_done: u64,
    requests: u64,
    elapsed_secs: f64,
    /// Jobs per second: enqueued, or completed by workers.
    ops_per_sec: f64,
    /// Enqueue requests (one job, a batch, or enqueue-and-wait).
    request_latency_us: Option<Latency>,
    reserve_latency_us: Option<Latency>,
    /// A complete request's (one job's, or a reserved batch's).
    complete_latency_us: Option<Latency>,
    enqueue_batch: Option<u64>,
    reserve_batch: Option<u32>,
    /// http-work: whether a reserved batch was completed in one request.
    complete_batch: Option<bool>,
    /// http-wait: the requests/s aimed at.
    target_rate: Option<f64>,
    /// http-concurrency: the policy and the most leases seen held at once.
    concurrency: Option<u32>,
    max_leases_held: Option<u64>,
    /// http-rate: the policy's rate, the measured one and the difference.
    rate_per_s: Option<f64>,
    measured_rate_per_s: Option<f64>,
    rate_error_pct: Option<f64>,
    /// http-idle.
    connections: Option<usize>,
    rss_before_bytes: Option<u64>,
    rss_after_bytes: Option<u64>,
    rss_per_connection_bytes: Option<f64>,
    time_limit_hit: bool,
    client_cpu_secs: Option<f64>,
}

impl HttpReport {
    fn human(&self) -> String {
        let mut out = format!(
            "spool bench {}: {} jobs in {:.3} s = {:.0} jobs/s ({} requests)\n",
            self.mode, self.jobs_done, self.elapsed_secs, self.ops_per_sec, self.requests
        );
        let mut latency = |name: &str, l: &Option<Latency>| {
            if let Some(l) = l {
                out.push_str(&format!(
                    "  {name:<9} p50 {:.1} µs  p99 {:.1} µs  p99.9 {:.1} µs  max {:.1} µs  ({} requests)\n",
                    l.p50, l.p99, l.p999, l.max, l.count
                ));
            }
        };
        latency("request", &self.request_latency_us);
        latency("reserve", &self.reserve_latency_us);
        latency("complete", &self.complete_latency_us);
        if let (Some(n), Some(max)) = (self.concurrency, self.max_leases_held) {
            out.push_str(&format!(
                "  concurrency {n}: at most {max} leases held at once\n"
            ));
        }
        if let (Some(r), Some(m), Some(e)) = (
            self.rate_per_s,
            self.measured_rate_per_s,
            self.rate_error_pct,
        ) {
            out.push_str(&format!(
                "  rate_per_s {r}: measured {m:.2}/s ({e:+.2} %)\n"
            ));
        }
        if let (Some(n), Some(per)) = (self.connections, self.rss_per_connection_bytes) {
            out.push_str(&format!(
                "  {n} idle connections: {per:.0} bytes of server RSS each\n"
            ));
        }
        if self.time_limit_hit {
            out.push_str("  INCOMPLETE: the time limit was hit\n");
        }
        out
    }
}

/// What every task of a run shares.
struct Run {
    http: SocketAddr,
    token: Option<String>,
    /// The queue, escaped for paths.
    queue: String,
    queue_name: String,
    deadline: Instant,
    /// Set when a task fails, so the others stop.
    abort: AtomicBool,
    /// Producers still enqueueing.
    producers_left: AtomicU64,
    /// The run's jobs done are the producers' enqueues (no workers).
    count_enqueues: bool,
    next_seq: AtomicU64,
    done: AtomicU64,
    requests: AtomicU64,
    /// Leases held now and at most (http-concurrency).
    held: AtomicU64,
    max_held: AtomicU64,
    last_progress: Mutex<Option<Instant>>,
    /// Delayed jobs: (wall ms the first is due, spread ms, jobs).
    run_at: Option<(u64, u64, u64)>,
    /// http-work: jobs enqueued and not done that hold the producers back.
    max_backlog: Option<u64>,
}

impl Run {
    fn over(&self) -> bool {
        self.abort.load(Relaxed) || Instant::now() >= self.deadline
    }

    fn progressed(&self, at: Instant) {
        let mut last = self.last_progress.lock().unwrap_or_else(|e| e.into_inner());
        *last = (*last).max(Some(at));
    }

    async fn connect(&self) -> Result<HttpConn> {
        HttpConn::connect(self.http, self.token.as_deref()).await
    }
}

/// Latencies one task measured.
struct Timings {
    request: Histogram<u64>,
    reserve: Histogram<u64>,
    complete: Histogram<u64>,
}

impl Timings {
    fn new() -> Timings {
        let hist = || {
            Histogram::new_with_bounds(1, LATENCY_MAX_NS, 3)
                .expect("constant histogram bounds are valid")
        };
        Timings {
            request: hist(),
            reserve: hist(),
            complete: hist(),
        }
    }

    fn merge(&mut self, other: &Timings) -> Result<()> {
        self.request
            .add(&other.request)
            .context("merging histograms")?;
        self.reserve
            .add(&other.reserve)
            .context("merging histograms")?;
        self.complete
            .add(&other.complete)
            .context("merging histograms")?;
        Ok(())
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// One enqueue body: a JSON string payload of `body_size` bytes.
fn job_json(body_size: usize) -> String {
    format!(r#"{{"payload":"{}"}}"#, ".".repeat(body_size))
}

/// Job `seq` of a delayed run, with its `run_at`.
fn delayed_job_json(payload: &str, seq: u64, run_at: (u64, u64, u64)) -> String {
    let (start_ms, spread_ms, jobs) = run_at;
    let due = start_ms + spread_ms * seq / jobs.max(1);
    format!(
        r#"{{"payload":"{payload}","run_at":"{}"}}"#,
        spool_server::http::encoding::format_rfc3339(due)
    )
}

/// Jobs `first..first + n` of a delayed run as a batch body.
fn delayed_batch_json(body_size: usize, first: u64, n: u64, run_at: (u64, u64, u64)) -> String {
    let payload = ".".repeat(body_size);
    let all: Vec<String> = (first..first + n)
        .map(|seq| delayed_job_json(&payload, seq, run_at))
        .collect();
    format!(r#"{{"jobs":[{}]}}"#, all.join(","))
}

fn batch_json(body_size: usize, jobs: u64) -> String {
    let one = job_json(body_size);
    let all: Vec<&str> = (0..jobs).map(|_| one.as_str()).collect();
    format!(r#"{{"jobs":[{}]}}"#, all.join(","))
}

pub(super) fn run(args: &BenchArgs, deadline: Instant) -> Result<()> {
    let http = super::resolve(&args.http)?;
    let threads = args.threads as usize;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("starting the client runtime")?;
    let run = Arc::new(Run {
        http,
        token: args.token.clone(),
        queue: crate::client::escape(args.tube.as_str()),
        queue_name: args.tube.to_string(),
        deadline,
        abort: AtomicBool::new(false),
        producers_left: AtomicU64::new(0),
        count_enqueues: matches!(args.mode, Mode::HttpEnqueue | Mode::HttpBatch),
        next_seq: AtomicU64::new(0),
        done: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        held: AtomicU64::new(0),
        max_held: AtomicU64::new(0),
        last_progress: Mutex::new(None),
        run_at: args.run_at_spread_ms.map(|spread| {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            (now_ms + args.run_at_lead_ms, spread, args.jobs)
        }),
        max_backlog: args.max_backlog.filter(|_| args.mode == Mode::HttpWork),
    });
    let cpu_at_start = super::process_cpu_secs();
    let mut report = runtime.block_on(drive(args, &run))?;
    report.http = args.http.clone();
    report.queue = args.tube.to_string();
    report.threads = threads;
    report.client_cpu_secs = match (cpu_at_start, super::process_cpu_secs()) {
        (Some(a), Some(b)) => Some(((b - a) * 100.0).round() / 100.0),
        _ => None,
    };
    if args.json {
        let json = serde_json::to_string(&report).context("serializing the report")?;
        super::emit(&format!("{json}\n"))?;
    } else {
        super::emit(&report.human())?;
    }
    if report.time_limit_hit {
        bail!("the time limit was hit before the run was done");
    }
    if let (Some(n), Some(max)) = (report.concurrency, report.max_leases_held) {
        if max > u64::from(n) {
            bail!("concurrency {n} exceeded: {max} leases were held at once");
        }
    }
    Ok(())
}

async fn drive(args: &BenchArgs, run: &Arc<Run>) -> Result<HttpReport> {
    if args.mode == Mode::HttpIdle {
        return idle(args, run).await;
    }
    let mut control = run.connect().await?;
    let policy_path = format!("/v1/queues/{}/policy", run.queue);
    let policy = match args.mode {
        Mode::HttpConcurrency => Some(format!(r#"{{"concurrency":{}}}"#, args.concurrency)),
        Mode::HttpRate => Some(format!(r#"{{"rate_per_s":{}}}"#, args.rate)),
        _ => None,
    };
    if let Some(policy) = &policy {
        control
            .expect(
                Method::PUT,
                &policy_path,
                Bytes::from(policy.clone()),
                StatusCode::OK,
            )
            .await?;
    }
    // Jobs left by an earlier run would be worked (or waited behind).
    purge(&mut control, run).await?;
    let result = load(args, run, &mut control).await;
    // The server closes a connection idle past its keep-alive timeout,
    // which a long load may outlast: a fresh one for the clean-up.
    let mut control = run.connect().await?;
    if policy.is_some() {
        control
            .expect(
                Method::PUT,
                &policy_path,
                Bytes::from_static(b"{}"),
                StatusCode::OK,
            )
            .await?;
    }
    if !args.keep_jobs {
        purge(&mut control, run).await?;
    }
    result
}

#[derive(Debug, Deserialize)]
struct Purged {
    deleted: u64,
}

/// Empties the run's queue (ready, delayed and buried jobs): the bench's
/// queue starts and ends empty.
async fn purge(control: &mut HttpConn, run: &Run) -> Result<()> {
    for state in ["ready", "delayed", "buried"] {
        let path = format!("/v1/queues/{}/jobs?state={state}", run.queue);
        // A purge deletes a bounded number of jobs; repeat until none.
        loop {
            if Instant::now() >= run.deadline {
                bail!("the time limit was hit while emptying the queue");
            }
            let answer = control
                .expect(Method::DELETE, &path, Bytes::new(), StatusCode::OK)
                .await?;
            let purged: Purged =
                serde_json::from_slice(&answer).context("a purge's answer is not its JSON")?;
            if purged.deleted == 0 {
                break;
            }
        }
    }
    Ok(())
}

async fn load(args: &BenchArgs, run: &Arc<Run>, control: &mut HttpConn) -> Result<HttpReport> {
    let mut report = HttpReport {
        mode: args.mode.name(),
        jobs: args.jobs,
        ..HttpReport::default()
    };
    let enqueue_batch = u64::from(args.enqueue_batch);
    let (producers, consumers) = match args.mode {
        Mode::HttpEnqueue | Mode::HttpBatch => (args.producers, 0),
        Mode::HttpWork | Mode::HttpWait => (args.producers, args.consumers),
        _ => (0, args.consumers),
    };
    report.producers = producers as usize;
    report.consumers = consumers as usize;
    // Jobs the workers of a policy run take, enqueued before it starts.
    let mut jobs = args.jobs;
    if args.mode == Mode::HttpRate {
        // Enough for the warm-up's burst and the window, with room.
        let wanted = (args.rate * (RATE_WARMUP.as_secs_f64() + args.duration_secs as f64 + 2.0))
            .ceil() as u64;
        jobs = wanted.max(1);
        report.jobs = jobs;
    }
    if matches!(args.mode, Mode::HttpConcurrency | Mode::HttpRate) {
        prepare(control, run, args.body_size as usize, jobs).await?;
    }
    if args.mode == Mode::HttpWait {
        jobs = jobs.min((args.rate * args.duration_secs as f64).ceil() as u64);
        report.jobs = jobs;
    }
    run.producers_left.store(u64::from(producers), Relaxed);

    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..producers {
        let conn = run.connect().await?;
        let run = Arc::clone(run);
        let mode = args.mode;
        let body_size = args.body_size as usize;
        let rate = args.rate;
        tasks.spawn(async move {
            let mut timings = Timings::new();
            let result = match mode {
                Mode::HttpWait => {
                    waiter(
                        conn,
                        &run,
                        &mut timings,
                        p,
                        producers,
                        jobs,
                        rate,
                        body_size,
                    )
                    .await
                }
                Mode::HttpBatch | Mode::HttpWork => {
                    producer(conn, &run, &mut timings, jobs, enqueue_batch, body_size).await
                }
                _ => producer(conn, &run, &mut timings, jobs, 1, body_size).await,
            };
            run.producers_left.fetch_sub(1, Relaxed);
            (timings, result)
        });
    }
    let window = if args.mode == Mode::HttpRate {
        let opens = Instant::now() + RATE_WARMUP;
        Some((opens, opens + Duration::from_secs(args.duration_secs)))
    } else {
        None
    };
    let in_window = Arc::new(AtomicU64::new(0));
    for _ in 0..consumers {
        let conn = run.connect().await?;
        let run = Arc::clone(run);
        let in_window = Arc::clone(&in_window);
        let mode = args.mode;
        let batch = args.reserve_batch;
        let complete_batch = mode == Mode::HttpWork && !args.complete_each;
        tasks.spawn(async move {
            let mut timings = Timings::new();
            let result = worker(
                conn,
                &run,
                &mut timings,
                mode,
                batch,
                complete_batch,
                jobs,
                window,
                &in_window,
            )
            .await;
            (timings, result)
        });
    }
    let start = Instant::now();
    let mut timings = Timings::new();
    let mut errors = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (t, result) = joined.map_err(|e| anyhow!("a load task failed: {e}"))?;
        timings.merge(&t)?;
        if let Err(e) = result {
            run.abort.store(true, Relaxed);
            errors.push(format!("{e:#}"));
        }
    }
    if let Some(first) = errors.first() {
        bail!("{} task(s) failed: {first}", errors.len());
    }
    let end = (*run.last_progress.lock().unwrap_or_else(|e| e.into_inner())).unwrap_or(start);
    let elapsed = end.saturating_duration_since(start).as_secs_f64();
    let done = run.done.load(Relaxed);
    report.jobs_done = done;
    report.requests = run.requests.load(Relaxed);
    report.elapsed_secs = (elapsed * 1e6).round() / 1e6;
    report.ops_per_sec = if elapsed > 0.0 {
        (done as f64 / elapsed).round()
    } else {
        0.0
    };
    report.request_latency_us = Latency::from_ns(&timings.request);
    report.reserve_latency_us = Latency::from_ns(&timings.reserve);
    report.complete_latency_us = Latency::from_ns(&timings.complete);
    report.time_limit_hit = Instant::now() >= run.deadline;
    match args.mode {
        Mode::HttpBatch => report.enqueue_batch = Some(enqueue_batch),
        Mode::HttpWork => {
            report.enqueue_batch = Some(enqueue_batch);
            report.complete_batch = Some(!args.complete_each);
        }
        Mode::HttpWait => report.target_rate = Some(args.rate),
        _ => {}
    }
    if consumers > 0 {
        report.reserve_batch = Some(args.reserve_batch);
    }
    if args.mode == Mode::HttpConcurrency {
        report.concurrency = Some(args.concurrency);
        report.max_leases_held = Some(run.max_held.load(Relaxed));
    }
    if args.mode == Mode::HttpRate {
        let measured = in_window.load(Relaxed) as f64 / args.duration_secs as f64;
        report.rate_per_s = Some(args.rate);
        report.measured_rate_per_s = Some((measured * 100.0).round() / 100.0);
        report.rate_error_pct =
            Some(((measured - args.rate) / args.rate * 10_000.0).round() / 100.0);
        // The window, not the job count, bounds a rate run.
        report.time_limit_hit =
            window.is_some_and(|(_, closes)| Instant::now() < closes) && report.time_limit_hit;
    }
    Ok(report)
}

/// Enqueues `jobs` jobs in batches before a run, unmeasured.
async fn prepare(control: &mut HttpConn, run: &Run, body_size: usize, jobs: u64) -> Result<()> {
    let path = format!("/v1/queues/{}/jobs/batch", run.queue);
    let mut left = jobs;
    while left > 0 {
        if run.over() {
            bail!("the time limit was hit while enqueueing the jobs to work");
        }
        let n = left.min(PREPARE_BATCH_JOBS);
        let body = Bytes::from(batch_json(body_size, n));
        control
            .expect(Method::POST, &path, body, StatusCode::CREATED)
            .await?;
        left -= n;
    }
    Ok(())
}

/// Enqueues jobs `batch` at a time until `jobs` are taken.
/// How often a producer held back by `--max-backlog` looks again.
const BACKLOG_POLL: Duration = Duration::from_millis(1);
/// A producer held back this long opens a new connection: half the
/// server's idle keep-alive timeout (`HEADER_READ_TIMEOUT`, 10 s).
const BACKLOG_IDLE_RECONNECT: Duration = Duration::from_secs(5);

async fn producer(
    mut conn: HttpConn,
    run: &Run,
    timings: &mut Timings,
    jobs: u64,
    batch: u64,
    body_size: usize,
) -> Result<()> {
    let (path, body) = if batch > 1 {
        (
            format!("/v1/queues/{}/jobs/batch", run.queue),
            Bytes::from(batch_json(body_size, batch)),
        )
    } else {
        (
            format!("/v1/queues/{}/jobs", run.queue),
            Bytes::from(job_json(body_size)),
        )
    };
    let mut last_request = Instant::now();
    loop {
        if run.over() {
            return Ok(());
        }
        if let Some(max_backlog) = run.max_backlog {
            // Polled: the workers' count moves thousands of times a second.
            if run
                .next_seq
                .load(Relaxed)
                .saturating_sub(run.done.load(Relaxed))
                >= max_backlog
            {
                tokio::time::sleep(BACKLOG_POLL).await;
                continue;
            }
            // Held back long enough for the server to close the idle
            // connection (HEADER_READ_TIMEOUT): a fresh one.
            if last_request.elapsed() >= BACKLOG_IDLE_RECONNECT {
                conn = run.connect().await?;
            }
        }
        let first = run.next_seq.fetch_add(batch, Relaxed);
        if first >= jobs {
            return Ok(());
        }
        let n = batch.min(jobs - first);
        let body = if let Some(run_at) = run.run_at {
            Bytes::from(if batch > 1 {
                delayed_batch_json(body_size, first, n, run_at)
            } else {
                delayed_job_json(&".".repeat(body_size), first, run_at)
            })
        } else if n == batch {
            body.clone()
        } else {
            Bytes::from(if n == 1 && batch == 1 {
                job_json(body_size)
            } else {
                batch_json(body_size, n)
            })
        };
        let sent = Instant::now();
        conn.expect(Method::POST, &path, body, StatusCode::CREATED)
            .await?;
        let received = Instant::now();
        last_request = received;
        timings.request.saturating_record(nanos(received - sent));
        run.requests.fetch_add(1, Relaxed);
        // In a work run the workers count jobs done, not the producers.
        if run.count_enqueues {
            run.done.fetch_add(n, Relaxed);
            run.progressed(received);
        }
    }
}

/// Enqueue-and-wait at a fixed rate: producer `index` of `producers`
/// sends requests `index`, `index + producers`, ... each at its scheduled
/// time `start + i / rate` (at once when late, and then the latency counts
/// from that time).
#[allow(clippy::too_many_arguments)]
async fn waiter(
    mut conn: HttpConn,
    run: &Run,
    timings: &mut Timings,
    index: u32,
    producers: u32,
    jobs: u64,
    rate: f64,
    body_size: usize,
) -> Result<()> {
    let path = format!("/v1/queues/{}/jobs?wait_ms={WAIT_MS}", run.queue);
    let body = Bytes::from(job_json(body_size));
    let start = Instant::now();
    let mut i = u64::from(index);
    while i < jobs {
        if run.over() {
            return Ok(());
        }
        let scheduled = start + Duration::from_secs_f64(i as f64 / rate);
        // Late (the previous answer came after this request was due): the
        // wait for it counts. On time: the latency counts from the send,
        // not from the timer's wake-up, which tokio rounds up to the next
        // millisecond.
        let late = Instant::now() >= scheduled;
        tokio::time::sleep_until(scheduled.into()).await;
        let counted_from = if late { scheduled } else { Instant::now() };
        let (status, answer) = conn.call(Method::POST, &path, body.clone()).await?;
        // 201: the job completed within the wait; 202 would mean it did not.
        if status != StatusCode::CREATED {
            bail!(
                "an enqueue-and-wait answered {status}: {}",
                String::from_utf8_lossy(&answer)
            );
        }
        let received = Instant::now();
        timings
            .request
            .saturating_record(nanos(received.saturating_duration_since(counted_from)));
        run.requests.fetch_add(1, Relaxed);
        run.done.fetch_add(1, Relaxed);
        run.progressed(received);
        i += u64::from(producers);
    }
    Ok(())
}

/// Reserves up to `batch` jobs at a time and completes them (in one
/// request with `complete_batch`, else each with its own), until `jobs`
/// are done (or, for a rate run, the window closed).
#[allow(clippy::too_many_arguments)]
async fn worker(
    mut conn: HttpConn,
    run: &Run,
    timings: &mut Timings,
    mode: Mode,
    batch: u32,
    complete_batch: bool,
    jobs: u64,
    window: Option<(Instant, Instant)>,
    in_window: &AtomicU64,
) -> Result<()> {
    let reserve = Bytes::from(
        serde_json::json!({
            "queues": [run.queue_name],
            "timeout_ms": RESERVE_TIMEOUT_MS,
            "batch": batch,
        })
        .to_string(),
    );
    let counts_leases = mode == Mode::HttpConcurrency;
    loop {
        if run.over() || run.done.load(Relaxed) >= jobs {
            return Ok(());
        }
        if window.is_some_and(|(_, closes)| Instant::now() >= closes) {
            return Ok(());
        }
        let sent = Instant::now();
        let answer = conn
            .expect(Method::POST, "/v1/reserve", reserve.clone(), StatusCode::OK)
            .await?;
        let received = Instant::now();
        timings.reserve.saturating_record(nanos(received - sent));
        run.requests.fetch_add(1, Relaxed);
        let leased: Leased =
            serde_json::from_slice(&answer).context("a reserve's answer is not its JSON")?;
        if leased.jobs.is_empty() {
            // Nothing came within the timeout: over when nobody enqueues.
            if mode == Mode::HttpWait && run.producers_left.load(Relaxed) == 0 {
                return Ok(());
            }
            continue;
        }
        if counts_leases {
            let n = leased.jobs.len() as u64;
            let held = run.held.fetch_add(n, Relaxed) + n;
            run.max_held.fetch_max(held, Relaxed);
        }
        if let Some((opens, closes)) = window {
            if received >= opens && received < closes {
                in_window.fetch_add(leased.jobs.len() as u64, Relaxed);
            }
        }
        if complete_batch {
            complete_all(&mut conn, run, timings, &leased.jobs).await?;
            continue;
        }
        for job in &leased.jobs {
            if counts_leases {
                // Give the others a chance to find the queue at its limit.
                tokio::task::yield_now().await;
                // The lease stops counting before the complete is sent:
                // the server may hand the slot out the moment it has it.
                run.held.fetch_sub(1, Relaxed);
            }
            let path = format!("/v1/jobs/{}/complete", job.id);
            let body = Bytes::from(format!(r#"{{"lease":"{}"}}"#, job.lease));
            let sent = Instant::now();
            conn.expect(Method::POST, &path, body, StatusCode::OK)
                .await?;
            let received = Instant::now();
            timings.complete.saturating_record(nanos(received - sent));
            run.requests.fetch_add(1, Relaxed);
            if mode != Mode::HttpWait {
                run.done.fetch_add(1, Relaxed);
                run.progressed(received);
            }
        }
    }
}

/// One completion's answer in `POST /v1/jobs/complete`.
#[derive(Debug, Deserialize)]
struct CompletedJob {
    status: u16,
}

#[derive(Debug, Deserialize)]
struct CompletedList {
    jobs: Vec<CompletedJob>,
}

/// Completes `jobs` with one `POST /v1/jobs/complete`; every one must be
/// answered 200.
async fn complete_all(
    conn: &mut HttpConn,
    run: &Run,
    timings: &mut Timings,
    jobs: &[LeasedJob],
) -> Result<()> {
    let mut body = String::with_capacity(16 + jobs.len() * 32);
    body.push_str(r#"{"jobs":["#);
    for (i, job) in jobs.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&format!(r#"{{"lease":"{}"}}"#, job.lease));
    }
    body.push_str("]}");
    let sent = Instant::now();
    let answer = conn
        .expect(
            Method::POST,
            "/v1/jobs/complete",
            Bytes::from(body),
            StatusCode::OK,
        )
        .await?;
    let received = Instant::now();
    timings.complete.saturating_record(nanos(received - sent));
    run.requests.fetch_add(1, Relaxed);
    let answers: CompletedList =
        serde_json::from_slice(&answer).context("a batch completion's answer is not its JSON")?;
    if answers.jobs.len() != jobs.len() || answers.jobs.iter().any(|a| a.status != 200) {
        bail!(
            "POST /v1/jobs/complete of {} jobs answered: {}",
            jobs.len(),
            String::from_utf8_lossy(&answer)
        );
    }
    run.done.fetch_add(jobs.len() as u64, Relaxed);
    run.progressed(received);
    Ok(())
}

/// Holds `--connections` kept-alive connections, each after one answered
/// request, and samples the server's resident memory before and after.
async fn idle(args: &BenchArgs, run: &Arc<Run>) -> Result<HttpReport> {
    let n = args.connections;
    let pid = args
        .server_pid
        .context("--mode http-idle needs --server-pid to read the server's memory")?;
    let rss_before = super::idle::rss_bytes(pid)?;
    let started = Instant::now();
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        if run.over() {
            bail!("the time limit was hit after opening {i} of {n} connections");
        }
        let source = super::idle::source_address(run.http, i, &args.source_addresses)?;
        let stream = super::idle::open(run.http, source).await.with_context(|| {
            format!(
                "opening connection {} of {n} (is `ulimit -n` high enough?)",
                i + 1
            )
        })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                .await
                .context("HTTP handshake")?;
        tokio::spawn(connection);
        let request = hyper::Request::builder()
            .uri("/livez")
            .header(header::HOST, run.http.to_string())
            .body(Full::new(Bytes::new()))
            .context("building a request")?;
        let response = sender.send_request(request).await.with_context(|| {
            format!(
                "connection {} of {n}: no answer (the server's HTTP connection limit?)",
                i + 1
            )
        })?;
        if !response.status().is_success() {
            bail!(
                "connection {}: /livez answered {}",
                i + 1,
                response.status()
            );
        }
        response
            .into_body()
            .collect()
            .await
            .context("reading /livez")?;
        held.push(sender);
    }
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(IDLE_SETTLE).await;
    let rss_after = super::idle::rss_bytes(pid)?;
    // Every connection must still be open when memory was read: the
    // server closes idle ones after its idle timeout.
    let closed = held.iter().filter(|s| s.is_closed()).count();
    if closed > 0 {
        bail!("{closed} of {n} connections were closed before memory was read ({connect_secs:.1} s to open them)");
    }
    drop(held);
    Ok(HttpReport {
        mode: args.mode.name(),
        jobs: 0,
        requests: n as u64,
        elapsed_secs: (connect_secs * 1000.0).round() / 1000.0,
        connections: Some(n),
        rss_before_bytes: Some(rss_before),
        rss_after_bytes: Some(rss_after),
        rss_per_connection_bytes: Some(
            ((rss_after as f64 - rss_before as f64) / n.max(1) as f64).round(),
        ),
        ..HttpReport::default()
    })
}
