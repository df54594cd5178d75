//! `spool bench --mode http-workflow`: what a workflow step costs next to a
//! plain job, both worked by the same `--consumers` HTTP workers in one run.
//!
//! `--jobs N` is the number of three-step workflows; the plain phase has
//! `3 N` jobs, so both phases work the same number of jobs. Each phase
//! first puts its work in (plain: `--producers` connections enqueue one
//! job a request; workflows: the same connections start one workflow a
//! request, which enqueues its first step), then the workers reserve
//! (`--reserve-batch` at a time) and complete every job; a step's
//! completion enqueues the next step in the server, in the same commit.
//! Reported: each phase's times, workflows/s, and the cost of a step over
//! a plain job's (work phases, and end to end). Every loop is bounded by
//! its count and by `--time-limit-secs`; both queues start and end empty.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde::Serialize;

use super::http::{HttpConn, Leased};
use super::BenchArgs;

/// Steps of each workflow.
const STEPS: u64 = 3;

/// How long a worker's reserve waits before it checks whether the phase
/// is over.
const RESERVE_TIMEOUT_MS: u64 = 200;

#[derive(Debug, Default, Serialize)]
struct Report {
    mode: &'static str,
    workflows: u64,
    plain_jobs: u64,
    producers: u32,
    consumers: u32,
    reserve_batch: u32,
    plain_enqueue_secs: f64,
    plain_work_secs: f64,
    workflow_start_secs: f64,
    workflow_work_secs: f64,
    /// Workflows completed per second, start to last step.
    workflows_per_sec: f64,
    /// Jobs (steps) completed per second by the workers.
    plain_jobs_per_sec: f64,
    steps_per_sec: f64,
    /// Worker time per step over worker time per plain job.
    step_cost_ratio_work: f64,
    /// (start + work) per step over (enqueue + work) per plain job.
    step_cost_ratio_end_to_end: f64,
    time_limit_hit: bool,
}

struct Phase {
    addr: std::net::SocketAddr,
    token: Option<String>,
    queue: String,
    deadline: Instant,
    abort: AtomicBool,
    next: AtomicU64,
    done: AtomicU64,
}

impl Phase {
    fn over(&self) -> bool {
        self.abort.load(Relaxed) || Instant::now() >= self.deadline
    }

    async fn connect(&self) -> Result<HttpConn> {
        HttpConn::connect(self.addr, self.token.as_deref()).await
    }
}

fn workflow_json(queue: &str, n: u64, body_size: usize) -> String {
    let payload = ".".repeat(body_size);
    let steps: Vec<String> = (0..STEPS)
        .map(|i| {
            let deps = if i == 0 {
                String::new()
            } else {
                format!(r#","depends_on":["s{}"]"#, i - 1)
            };
            format!(r#"{{"name":"s{i}","queue":"{queue}","payload":"{payload}"{deps}}}"#)
        })
        .collect();
    format!(r#"{{"name":"bench-{n}","steps":[{}]}}"#, steps.join(","))
}

/// `producers` connections send `count` requests made by `body(n)`.
async fn put_in(
    phase: &Arc<Phase>,
    producers: u32,
    count: u64,
    path: &'static str,
    body: Arc<dyn Fn(u64) -> String + Send + Sync>,
    expected: StatusCode,
) -> Result<f64> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..producers.max(1) {
        let phase = phase.clone();
        let body = body.clone();
        let path = path.replace("{queue}", &phase.queue);
        tasks.push(tokio::spawn(async move {
            let mut conn = phase.connect().await?;
            loop {
                if phase.over() {
                    return Ok::<(), anyhow::Error>(());
                }
                let n = phase.next.fetch_add(1, Relaxed);
                if n >= count {
                    return Ok(());
                }
                let result = conn
                    .expect(Method::POST, &path, Bytes::from(body(n)), expected)
                    .await;
                if let Err(e) = result {
                    phase.abort.store(true, Relaxed);
                    return Err(e);
                }
            }
        }));
    }
    for task in tasks {
        task.await.context("a producer panicked")??;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// `consumers` workers reserve and complete until `count` jobs are done.
async fn work(phase: &Arc<Phase>, consumers: u32, batch: u32, count: u64) -> Result<f64> {
    let started = Instant::now();
    let reserve = Bytes::from(
        serde_json::json!({"queues": [phase.queue], "timeout_ms": RESERVE_TIMEOUT_MS, "batch": batch})
            .to_string(),
    );
    let mut tasks = Vec::new();
    for _ in 0..consumers.max(1) {
        let phase = phase.clone();
        let reserve = reserve.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = phase.connect().await?;
            while !phase.over() && phase.done.load(Relaxed) < count {
                let answer = conn
                    .expect(Method::POST, "/v1/reserve", reserve.clone(), StatusCode::OK)
                    .await?;
                let leased: Leased =
                    serde_json::from_slice(&answer).context("a reserve's answer")?;
                for job in &leased.jobs {
                    let path = format!("/v1/jobs/{}/complete", job.id);
                    let body = Bytes::from(format!(r#"{{"lease":"{}","result":1}}"#, job.lease));
                    conn.expect(Method::POST, &path, body, StatusCode::OK)
                        .await?;
                    phase.done.fetch_add(1, Relaxed);
                }
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await.context("a worker panicked")??;
    }
    Ok(started.elapsed().as_secs_f64())
}

async fn purge(conn: &mut HttpConn, queue: &str) -> Result<()> {
    for state in ["ready", "delayed", "buried"] {
        let path = format!("/v1/queues/{queue}/jobs?state={state}");
        // Bounded: each purge deletes what is there; the queue is idle.
        for _ in 0..1_000 {
            let answer = conn
                .expect(Method::DELETE, &path, Bytes::new(), StatusCode::OK)
                .await?;
            let purged: serde_json::Value = serde_json::from_slice(&answer)?;
            if purged["deleted"].as_u64() == Some(0) {
                break;
            }
        }
    }
    Ok(())
}

pub(super) fn run(args: &BenchArgs, deadline: Instant) -> Result<()> {
    let addr = super::resolve(&args.http)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads as usize)
        .enable_all()
        .build()
        .context("starting the client runtime")?;
    let report = runtime.block_on(drive(args, addr, deadline))?;
    if args.json {
        super::emit(&format!("{}\n", serde_json::to_string(&report)?))?;
    } else {
        super::emit(&format!(
            "spool bench http-workflow: {} three-step workflows, {} plain jobs, {} workers\n\
             \x20 plain:     enqueue {:.3} s, work {:.3} s = {:.0} jobs/s\n\
             \x20 workflows: start {:.3} s, work {:.3} s = {:.0} steps/s, {:.0} workflows/s\n\
             \x20 a step costs {:.2}x a plain job (work), {:.2}x end to end\n",
            report.workflows,
            report.plain_jobs,
            report.consumers,
            report.plain_enqueue_secs,
            report.plain_work_secs,
            report.plain_jobs_per_sec,
            report.workflow_start_secs,
            report.workflow_work_secs,
            report.steps_per_sec,
            report.workflows_per_sec,
            report.step_cost_ratio_work,
            report.step_cost_ratio_end_to_end,
        ))?;
    }
    if report.time_limit_hit {
        bail!("the time limit was hit before the run was done");
    }
    Ok(())
}

async fn drive(args: &BenchArgs, addr: std::net::SocketAddr, deadline: Instant) -> Result<Report> {
    let workflows = args.jobs;
    let jobs = workflows * STEPS;
    let body_size = args.body_size as usize;
    let phase = |suffix: &str| {
        Arc::new(Phase {
            addr,
            token: args.token.clone(),
            queue: crate::client::escape(&format!("{}-{suffix}", args.tube.as_str())),
            deadline,
            abort: AtomicBool::new(false),
            next: AtomicU64::new(0),
            done: AtomicU64::new(0),
        })
    };
    let plain = phase("plain");
    let flows = phase("wf");
    let mut control = plain.connect().await?;
    purge(&mut control, &plain.queue).await?;
    purge(&mut control, &flows.queue).await?;

    let job = format!(r#"{{"payload":"{}"}}"#, ".".repeat(body_size));
    let plain_enqueue_secs = put_in(
        &plain,
        args.producers,
        jobs,
        "/v1/queues/{queue}/jobs",
        Arc::new(move |_| job.clone()),
        StatusCode::CREATED,
    )
    .await?;
    let plain_work_secs = work(&plain, args.consumers, args.reserve_batch, jobs).await?;

    let queue = flows.queue.clone();
    let workflow_start_secs = put_in(
        &flows,
        args.producers,
        workflows,
        "/v1/workflows",
        Arc::new(move |n| workflow_json(&queue, n, body_size)),
        StatusCode::CREATED,
    )
    .await?;
    let workflow_work_secs = work(&flows, args.consumers, args.reserve_batch, jobs).await?;

    let mut control = plain.connect().await?;
    purge(&mut control, &plain.queue).await?;
    purge(&mut control, &flows.queue).await?;
    let time_limit_hit = plain.done.load(Relaxed) < jobs || flows.done.load(Relaxed) < jobs;
    let per = |secs: f64| if jobs == 0 { 0.0 } else { secs / jobs as f64 };
    let rate = |n: u64, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    Ok(Report {
        mode: "http-workflow",
        workflows,
        plain_jobs: jobs,
        producers: args.producers,
        consumers: args.consumers,
        reserve_batch: args.reserve_batch,
        plain_enqueue_secs,
        plain_work_secs,
        workflow_start_secs,
        workflow_work_secs,
        workflows_per_sec: rate(workflows, workflow_start_secs + workflow_work_secs),
        plain_jobs_per_sec: rate(jobs, plain_work_secs),
        steps_per_sec: rate(jobs, workflow_work_secs),
        step_cost_ratio_work: per(workflow_work_secs) / per(plain_work_secs).max(f64::MIN_POSITIVE),
        step_cost_ratio_end_to_end: per(workflow_start_secs + workflow_work_secs)
            / per(plain_enqueue_secs + plain_work_secs).max(f64::MIN_POSITIVE),
        time_limit_hit,
    })
}
