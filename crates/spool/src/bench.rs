//! `spool bench`: a load generator speaking the beanstalkd protocol, for
//! spool or any beanstalkd-compatible server.
//!
//! This module owns the command line and the shape of a run: it opens the
//! connections on `--threads` OS threads (each with its own single-threaded
//! tokio runtime, connections dealt round-robin), starts every load loop at
//! once, merges what they measured and reports it. The loops live in
//! [`load`], the socket handling in [`conn`], the output in [`report`] and
//! the idle-connection memory probe in [`idle`], the connection-burst
//! probe in [`accept`], and in [`probe`] the watcher of several nodes
//! while other processes connect to them.

mod accept;
mod conn;
mod http;
mod idle;
mod load;
mod probe;
mod report;
mod workflow;

use std::hash::{BuildHasher, Hasher};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use spool_proto::limits::{MAX_JOB_SIZE_LIMIT_BYTES, PIPELINED_REQUESTS_MAX};
use spool_proto::TubeName;

use load::{Role, Shared, WorkerStats, BODY_HEADER_BYTES};
use report::{Latency, Report};

/// What a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Producers put while consumers reserve and delete, end to end.
    Mixed,
    /// Producers only put.
    Put,
    /// Consumers reserve and delete jobs put earlier (by a `put` run).
    Drain,
    /// Hold idle connections and report the server's memory per connection.
    #[value(hide = true)]
    Idle,
    /// HTTP job API: enqueue one job a request (`--producers` connections).
    HttpEnqueue,
    /// HTTP job API: enqueue `--enqueue-batch` jobs a request.
    HttpBatch,
    /// HTTP job API: workers reserve `--reserve-batch` and complete them
    /// in one request (each alone with `--complete-each`), against
    /// producers enqueueing batches.
    HttpWork,
    /// HTTP job API: enqueue-and-wait at `--rate` requests/s, worked by
    /// `--consumers` HTTP workers.
    HttpWait,
    /// HTTP job API: `--consumers` workers on a queue with `concurrency:
    /// --concurrency`; fails if more leases are ever held at once.
    HttpConcurrency,
    /// HTTP job API: workers on a queue with `rate_per_s: --rate`; the rate
    /// measured over `--duration-secs`.
    HttpRate,
    /// HTTP: hold `--connections` idle kept-alive connections; the server's
    /// memory per connection (needs `--server-pid`).
    HttpIdle,
    /// HTTP: `--jobs` three-step workflows and three times as many plain
    /// jobs, worked by `--consumers` HTTP workers; a step's cost over a
    /// plain job's.
    HttpWorkflow,
    /// Open a burst of connections at once and time until all are served.
    #[value(hide = true)]
    Accept,
    /// Watch `--node`s answer (probes, metrics, job round trips) while
    /// other processes open `--connections` connections to them.
    #[value(hide = true)]
    Probe,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Mixed => "mixed",
            Mode::Put => "put",
            Mode::Drain => "drain",
            Mode::Idle => "idle",
            Mode::HttpEnqueue => "http-enqueue",
            Mode::HttpBatch => "http-batch",
            Mode::HttpWork => "http-work",
            Mode::HttpWait => "http-wait",
            Mode::HttpConcurrency => "http-concurrency",
            Mode::HttpRate => "http-rate",
            Mode::HttpIdle => "http-idle",
            Mode::HttpWorkflow => "http-workflow",
            Mode::Accept => "accept",
            Mode::Probe => "probe",
        }
    }

    fn is_http(self) -> bool {
        matches!(
            self,
            Mode::HttpEnqueue
                | Mode::HttpBatch
                | Mode::HttpWork
                | Mode::HttpWait
                | Mode::HttpConcurrency
                | Mode::HttpRate
                | Mode::HttpIdle
        )
    }
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Server address, host:port.
    #[arg(long, default_value = "127.0.0.1:11300")]
    addr: String,
    /// Connections that put jobs.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    producers: u32,
    /// Connections that reserve and delete jobs.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    consumers: u32,
    /// Requests in flight per connection (puts for producers, reserves for
    /// consumers).
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=PIPELINED_REQUESTS_MAX as i64))]
    pipeline: u32,
    /// Job body size in bytes; the first 20 carry the job's identity.
    #[arg(long, default_value_t = 100,
          value_parser = clap::value_parser!(u32)
              .range(BODY_HEADER_BYTES as i64..=i64::from(MAX_JOB_SIZE_LIMIT_BYTES)))]
    body_size: u32,
    /// Total jobs to put, or to take in drain mode.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
    jobs: u64,
    /// mixed: put and take concurrently; put: only put; drain: only take.
    #[arg(long, value_enum, default_value_t = Mode::Mixed)]
    mode: Mode,
    /// Tube to use and watch.
    #[arg(long, default_value = "bench", value_parser = parse_tube)]
    tube: TubeName,
    /// Hard cap on the whole run; when hit, the run stops and is reported
    /// as incomplete.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    time_limit_secs: u64,
    /// Consumers wait for each `DELETED` before they send the next
    /// reserve, as synchronous client libraries do; by default the delete
    /// goes out together with the next reserve.
    #[arg(long)]
    wait_for_delete: bool,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
    /// Client OS threads, each running its own event loop.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    threads: u32,
    /// beanstalkd loads: run the client threads under Linux's SCHED_BATCH,
    /// so that on a machine shared with the server a client woken by a
    /// reply does not preempt the server (see `set_sched_batch`).
    #[arg(long)]
    sched_batch: bool,
    /// HTTP modes: the server's HTTP listener, host:port.
    #[arg(long, default_value = spool_server::limits::DEFAULT_HTTP_LISTEN)]
    http: String,
    /// HTTP modes: bearer token, when the server has SPOOL_AUTH_TOKEN set.
    #[arg(long, env = "SPOOL_AUTH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// http-batch, http-work: jobs a batch enqueue carries.
    #[arg(long, default_value_t = 1_000,
          value_parser = clap::value_parser!(u32).range(1..=spool_engine::limits::ENQUEUE_BATCH_JOBS_MAX as i64))]
    enqueue_batch: u32,
    /// http-work: producers wait while this many jobs are enqueued and not
    /// yet done (a steady churn, as when workers keep up), instead of
    /// enqueueing every job as fast as they can; unset: no bound.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_backlog: Option<u64>,
    /// HTTP worker modes: jobs a reserve asks for.
    #[arg(long, default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(spool_engine::limits::RESERVE_BATCH_MAX)))]
    reserve_batch: u32,
    /// http-work: complete each job with its own request
    /// (`POST /v1/jobs/{id}/complete`, what a server without
    /// `POST /v1/jobs/complete` needs) instead of one request a reserved
    /// batch.
    #[arg(long)]
    complete_each: bool,
    /// http-wait: requests per second; http-rate: the queue's rate_per_s.
    #[arg(long, default_value_t = 1_000.0, value_parser = parse_rate)]
    rate: f64,
    /// http-enqueue, http-batch: the jobs are delayed, job n due at the
    /// run's start + --run-at-lead-ms + this × n / --jobs (a timer load).
    #[arg(long)]
    run_at_spread_ms: Option<u64>,
    /// HTTP enqueue modes: leave the jobs in the queue at the end (for
    /// measuring what they cost) instead of purging it.
    #[arg(long)]
    keep_jobs: bool,
    /// With --run-at-spread-ms: when the first job is due, after the start.
    #[arg(long, default_value_t = 10_000)]
    run_at_lead_ms: u64,
    /// http-concurrency: the queue's concurrency.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    concurrency: u32,
    /// http-wait, http-rate: how long the measured part runs.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    duration_secs: u64,
    /// Idle and accept modes: connections to open and hold.
    #[arg(long, default_value_t = 10_000, hide = true)]
    connections: usize,
    /// Accept mode: most `connect` calls in flight at once.
    #[arg(long, default_value_t = 256, hide = true,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    connect_concurrency: u32,
    /// Idle mode: seconds to keep the connections open after measuring.
    #[arg(long, default_value_t = 0, hide = true)]
    hold_secs: u64,
    /// Idle mode: also sample the server's memory this many seconds after
    /// the one command each (what it keeps for a connection that has
    /// worked and gone idle); 0: not.
    #[arg(long, default_value_t = 0, hide = true)]
    idle_after_command_secs: u64,
    /// Idle mode: server process whose resident memory to sample
    /// (`/proc/PID/status`) before and after opening the connections.
    #[arg(long, hide = true)]
    server_pid: Option<u32>,
    /// Idle mode: while the connections open, time `GET /livez` on
    /// `--http` every 10 ms from a thread of its own (latency percentiles
    /// in the report).
    #[arg(long, hide = true)]
    probe_livez: bool,
    /// Idle and accept modes: IPv4 source addresses to spread the
    /// connections over, round-robin (e.g. 127.0.0.10,127.0.0.11 for
    /// several client processes each with ephemeral ports of its own);
    /// unset: 127.0.0.1, then 127.0.0.2 and up every 20,000 connections.
    #[arg(long, hide = true, value_delimiter = ',')]
    source_addresses: Vec<std::net::Ipv4Addr>,
    /// Probe mode: a node to watch, as BEANSTALKD_ADDR,HTTP_ADDR
    /// (repeated for several nodes).
    #[arg(long = "node", hide = true)]
    nodes: Vec<String>,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(rate) if rate > 0.0 && rate <= spool_engine::limits::RATE_PER_S_MAX => Ok(rate),
        _ => Err(format!(
            "expected a rate above 0, at most {}",
            spool_engine::limits::RATE_PER_S_MAX
        )),
    }
}

fn parse_tube(s: &str) -> Result<TubeName, String> {
    TubeName::new(s.as_bytes()).map_err(|e| e.to_string())
}

pub fn run(args: BenchArgs) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(args.time_limit_secs);
    if args.mode == Mode::HttpWorkflow {
        return workflow::run(&args, deadline);
    }
    if args.mode.is_http() {
        return http::run(&args, deadline);
    }
    if args.mode == Mode::Probe {
        return probe::run(&args, deadline);
    }
    let addr = resolve(&args.addr)?;
    if args.mode == Mode::Idle {
        return idle::run(&args, addr, deadline);
    }
    if args.mode == Mode::Accept {
        return accept::run(&args, addr, deadline);
    }
    let (producers, consumers) = match args.mode {
        Mode::Mixed => (args.producers, args.consumers),
        Mode::Put => (args.producers, 0),
        _ => (0, args.consumers),
    };
    if (args.mode != Mode::Drain && producers == 0) || (args.mode != Mode::Put && consumers == 0) {
        return Err(crate::serve::ConfigError(format!(
            "--mode {} needs at least one {}",
            args.mode.name(),
            if producers == 0 {
                "producer"
            } else {
                "consumer"
            }
        ))
        .into());
    }
    // A job whose TTR ran out would be handed out twice; make that
    // impossible within the run so a duplicate always means a server bug.
    let ttr_secs = u32::try_from(args.time_limit_secs.saturating_add(60)).unwrap_or(u32::MAX);
    let shared = Arc::new(Shared::new(
        args.mode,
        args.jobs,
        args.pipeline as usize,
        args.body_size as usize,
        ttr_secs.max(120),
        args.tube.clone(),
        producers as usize,
        random_u32(),
        deadline,
        args.wait_for_delete,
    )?);

    // Interleave roles so every thread gets a share of both.
    let mut roles = Vec::new();
    for i in 0..producers.max(consumers) {
        if i < producers {
            roles.push(Role::Producer);
        }
        if i < consumers {
            roles.push(Role::Consumer);
        }
    }
    let threads = (args.threads as usize).min(roles.len());
    let mut per_thread: Vec<Vec<Role>> = vec![Vec::new(); threads];
    for (i, role) in roles.into_iter().enumerate() {
        per_thread[i % threads].push(role);
    }

    let barrier = Arc::new(Barrier::new(threads + 1));
    let mut handles = Vec::with_capacity(threads);
    for (t, roles) in per_thread.into_iter().enumerate() {
        let shared = Arc::clone(&shared);
        let barrier = Arc::clone(&barrier);
        let sched_batch = args.sched_batch;
        let handle = std::thread::Builder::new()
            .name(format!("bench-{t}"))
            .spawn(move || client_thread(roles, addr, shared, barrier, sched_batch))
            .context("spawning a client thread")?;
        handles.push(handle);
    }
    barrier.wait();
    let start = Instant::now();
    let cpu_at_start = process_cpu_secs();

    let mut total = WorkerStats::new();
    let mut errors = Vec::new();
    for handle in handles {
        let results = handle
            .join()
            .map_err(|_| anyhow!("a client thread panicked"))?;
        for (stats, result) in results {
            total.merge(&stats)?;
            if let Err(e) = result {
                errors.push(format!("{e:#}"));
            }
        }
    }
    let run = RunShape {
        producers: producers as usize,
        consumers: consumers as usize,
        threads,
        start,
        finished: Instant::now(),
        client_cpu_secs: match (cpu_at_start, process_cpu_secs()) {
            (Some(a), Some(b)) => Some(((b - a) * 100.0).round() / 100.0),
            _ => None,
        },
    };
    let report = build_report(&args, &shared, &run, &total, errors);
    if args.json {
        let json = serde_json::to_string(&report).context("serializing the report")?;
        emit(&format!("{json}\n"))?;
    } else {
        emit(&report.human())?;
    }
    if !report.errors.is_empty() {
        bail!(
            "{} connection(s) failed: {}",
            report.errors.len(),
            report.errors[0]
        );
    }
    if args.mode == Mode::Mixed {
        let lost = report.lost.unwrap_or(0);
        let duplicated = report.duplicated.unwrap_or(0);
        if duplicated > 0 || lost > 0 {
            bail!("exactly-once delivery violated: {lost} lost, {duplicated} duplicated");
        }
    }
    Ok(())
}

/// One OS thread: connects its share of the connections, waits for every
/// other thread to be connected, then drives its loops to the end.
fn client_thread(
    roles: Vec<Role>,
    addr: SocketAddr,
    shared: Arc<Shared>,
    barrier: Arc<Barrier>,
    sched_batch: bool,
) -> Vec<(WorkerStats, Result<()>)> {
    let policy = if sched_batch {
        set_sched_batch()
    } else {
        Ok(())
    };
    let runtime = policy.and_then(|()| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a client runtime")
    });
    let setup = runtime.and_then(|rt| {
        let conns = rt.block_on(async {
            let mut conns = Vec::with_capacity(roles.len());
            for &role in &roles {
                conns.push((role, load::connect(role, addr, &shared).await?));
            }
            anyhow::Ok(conns)
        })?;
        Ok((rt, conns))
    });
    if setup.is_err() {
        // Tell the other threads before they start, so they stop at once.
        shared.abort.store(true, Relaxed);
    }
    // Every thread reaches the barrier, failed or not, or the rest would
    // wait forever.
    barrier.wait();
    let (rt, conns) = match setup {
        Ok(ok) => ok,
        Err(e) => return vec![(WorkerStats::new(), Err(e))],
    };
    rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for (role, conn) in conns {
            let shared = Arc::clone(&shared);
            match role {
                Role::Producer => set.spawn(load::producer(conn, shared)),
                Role::Consumer => set.spawn(load::consumer(conn, shared)),
            };
        }
        let mut results = Vec::with_capacity(roles.len());
        while let Some(joined) = set.join_next().await {
            let outcome = joined
                .unwrap_or_else(|e| (WorkerStats::new(), Err(anyhow!("a load task failed: {e}"))));
            if outcome.1.is_err() {
                shared.abort.store(true, Relaxed);
            }
            results.push(outcome);
        }
        results
    })
}

/// Puts the calling thread under SCHED_BATCH (nice unchanged; no privilege
/// needed). The scheduler does not let a batch thread preempt the running
/// one when it wakes, and a client woken by a reply on the server's CPU
/// otherwise does just that: at pipeline 1 (mixed 4P+4C, load 5-7) most of
/// the server's involuntary context switches were such preemptions, paid
/// by both processes (server 13.1 -> 11.7 us a job, client 11.4 -> 9.8
/// us; beanstalkd 17.5 -> 15.5 us, the same share). The same for every
/// server, so ratios between servers keep their meaning.
fn set_sched_batch() -> Result<()> {
    sched::set_batch().context("setting SCHED_BATCH")
}

#[cfg(target_os = "linux")]
mod sched {
    #![allow(unsafe_code)]

    /// `sched_setscheduler(2)` has no std or nix equivalent.
    pub(super) fn set_batch() -> std::io::Result<()> {
        // Zeroed, not a literal: musl's sched_param has more fields than
        // glibc's (the static build), and all-zero is priority 0 in both.
        // SAFETY: sched_param is plain integers, for which zero is valid.
        let param: libc::sched_param = unsafe { std::mem::zeroed() };
        // SAFETY: `param` is a valid sched_param that outlives the call,
        // which only reads it; pid 0 is the calling thread.
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(not(target_os = "linux"))]
mod sched {
    pub(super) fn set_batch() -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "SCHED_BATCH is Linux's",
        ))
    }
}

/// How a run was laid out and when it ran.
#[derive(Debug)]
struct RunShape {
    producers: usize,
    consumers: usize,
    threads: usize,
    start: Instant,
    finished: Instant,
    client_cpu_secs: Option<f64>,
}

fn build_report(
    args: &BenchArgs,
    shared: &Shared,
    run: &RunShape,
    total: &WorkerStats,
    errors: Vec<String>,
) -> Report {
    // The run ends at the last job done, not when the loops noticed there
    // was nothing left (a consumer may wait out a reserve timeout).
    let end = total.last_progress.unwrap_or(run.finished);
    let elapsed = end.saturating_duration_since(run.start).as_secs_f64();
    let jobs_done = match args.mode {
        Mode::Put => total.puts_acked,
        _ => total.deleted,
    };
    let count = |flags: &[std::sync::atomic::AtomicBool], want: bool| {
        flags.iter().filter(|f| f.load(Relaxed) == want).count() as u64
    };
    let not_reserved = match args.mode {
        Mode::Mixed => Some(
            shared
                .acked
                .iter()
                .zip(&shared.seen)
                .filter(|(acked, seen)| acked.load(Relaxed) && !seen.load(Relaxed))
                .count() as u64,
        ),
        Mode::Drain => Some(count(&shared.seen, false)),
        _ => None,
    };
    // Cut short by the time limit or an error, unreserved jobs may just be
    // queued.
    let lost = not_reserved.filter(|_| !total.time_limit_hit && errors.is_empty());
    let complete = jobs_done == args.jobs && !total.time_limit_hit && errors.is_empty();
    Report {
        mode: args.mode.name(),
        addr: args.addr.clone(),
        tube: args.tube.to_string(),
        producers: run.producers,
        consumers: run.consumers,
        pipeline: args.pipeline as usize,
        body_size: args.body_size as usize,
        jobs: args.jobs,
        threads: run.threads,
        elapsed_secs: (elapsed * 1e6).round() / 1e6,
        ops_per_sec: if elapsed > 0.0 {
            (jobs_done as f64 / elapsed).round()
        } else {
            0.0
        },
        jobs_done,
        puts_acked: total.puts_acked,
        reserved: total.reserved,
        deleted: total.deleted,
        put_latency_us: Latency::from_ns(&total.put_ns),
        reserve_latency_us: Latency::from_ns(&total.reserve_ns),
        delete_latency_us: Latency::from_ns(&total.delete_ns),
        end_to_end_latency_us: Latency::from_ns(&total.end_to_end_ns),
        lost,
        not_reserved,
        duplicated: (args.mode != Mode::Put).then_some(total.duplicated),
        foreign: total.foreign,
        reserve_timeouts: total.reserve_timeouts,
        delete_not_found: total.delete_not_found,
        complete,
        time_limit_hit: total.time_limit_hit,
        errors,
        client_cpu_secs: run.client_cpu_secs,
    }
}

/// CPU time (user + system) this process has used so far, all threads,
/// from `/proc/self/stat`; `None` where there is no procfs. Reported so a
/// reader can tell whether the client, not the server, was the bottleneck.
fn process_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces; utime and stime are fields 14 and 15 of the whole line.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // procfs counts in USER_HZ, which Linux fixes at 100 for user space.
    Some((utime + stime) as f64 / 100.0)
}

/// Writes the report to stdout. A reader that went away (`| head`) is
/// not an error worth a panic or a failure exit.
fn emit(text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("writing the report to stdout")
        }
        _ => Ok(()),
    }
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("resolving --addr {addr}"))?
        .next()
        .with_context(|| format!("--addr {addr} resolves to no address"))
}

/// A random tag for this run's jobs, from the standard library's per-process
/// random hash keys (no RNG dependency needed for 32 bits).
fn random_u32() -> u32 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    hasher.finish() as u32
}
