//! `GET /metrics`: every figure of the process in the Prometheus text
//! format, under the names of DESIGN.md §4 (dashboards and alerts rely on
//! them), plus the process, runtime and write-ahead-log figures an on-call
//! engineer needs.
//!
//! Engine figures come from one [`EngineSnapshot`] taken per scrape, so the
//! counts of one scrape are consistent with each other. Queues whose tube
//! was freed keep their counters (the snapshot's retired queues) so that
//! counters never go backwards; their gauges and latency histograms are
//! gone with them (a histogram is some 25 series per queue, and a retired
//! queue observes nothing more). Before recovery has produced a broker the
//! engine families are absent, not zero: a zero would be a made-up value.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use spool_engine::{EngineSnapshot, Histogram, QueueCounters, QueueSnapshot, SnapshotScope};

use super::exposition::{Exposition, HistogramSample, MetricKind, CONTENT_TYPE};
use super::{text_response, HttpState};
use crate::connections::{ConnectionMetrics, ProtocolMetrics};
use crate::durable::StorageStats;
use crate::net::ListenQueueDrops;
use spool_broker::{Broker, ScheduleSnapshot, WorkflowCounters, WorkflowState};

/// Process facts read from `/proc` and libc.
#[derive(Debug, Clone, Default)]
pub(super) struct ProcessFigures {
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub resident_memory_bytes: Option<u64>,
    pub threads: Option<u64>,
    pub cpu_seconds: f64,
}

impl ProcessFigures {
    /// [`ProcessFigures::read`] on a blocking thread: listing
    /// `/proc/self/fd` takes about 16 ms at 16k open fds (a second at a
    /// million), which on an HTTP worker would hold every request that
    /// worker has to serve behind the scrape.
    pub async fn read_off_the_runtime() -> ProcessFigures {
        tokio::task::spawn_blocking(ProcessFigures::read)
            .await
            .unwrap_or_else(|_| ProcessFigures::read())
    }

    pub fn read() -> ProcessFigures {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let (user_us, system_us) = crate::process::cpu_time_us();
        ProcessFigures {
            open_fds: crate::process::open_fd_count().ok(),
            max_fds: crate::process::fd_limit().ok(),
            resident_memory_bytes: status_field(&status, "VmRSS:").map(|kb| kb * 1024),
            threads: status_field(&status, "Threads:"),
            cpu_seconds: (user_us + system_us) as f64 / 1e6,
        }
    }
}

/// The number of a `Name:   123 kB` line of `/proc/self/status`.
pub(super) fn status_field(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The stable metrics of one tokio runtime.
#[derive(Debug, Clone, Copy)]
pub(super) struct RuntimeFigures {
    pub workers: usize,
    pub alive_tasks: usize,
    pub global_queue_depth: usize,
}

impl RuntimeFigures {
    fn of(handle: &tokio::runtime::Handle) -> RuntimeFigures {
        let metrics = handle.metrics();
        RuntimeFigures {
            workers: metrics.num_workers(),
            alive_tasks: metrics.num_alive_tasks(),
            global_queue_depth: metrics.global_queue_depth(),
        }
    }

    /// (`runtime` label, figures): the data-path runtime when the binary
    /// handed it over, and the one serving this request.
    pub fn read<B: Broker>(state: &HttpState<B>) -> Vec<(&'static str, RuntimeFigures)> {
        let mut all = Vec::with_capacity(2);
        if let Some(data) = state.data_runtime.get() {
            all.push(("data", RuntimeFigures::of(data)));
        }
        all.push((
            "http",
            RuntimeFigures::of(&tokio::runtime::Handle::current()),
        ));
        all
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    summary = "Prometheus metrics (text exposition format 0.0.4)",
    responses((status = 200, description = "The metrics", body = String, content_type = "text/plain")),
)]
pub(super) async fn metrics<B: Broker>(State(state): State<Arc<HttpState<B>>>) -> Response {
    // A failed snapshot (the broker shut down) leaves the engine families
    // out; everything else is still worth scraping. No metric shows a
    // session, so none is copied.
    let snapshot = match state.broker() {
        Some(broker) => broker.snapshot(SnapshotScope::Queues).await.ok(),
        None => None,
    };
    let mut out = Exposition::new();
    write_server(&mut out, &state);
    if let Some(snapshot) = &snapshot {
        write_engine(&mut out, snapshot);
    }
    write_connections(&mut out, &state.connections.metrics());
    if let Ok(drops) = crate::net::listen_queue_drops() {
        write_listen_queue(&mut out, drops);
    }
    if let Some(stats) = state.storage_stats() {
        write_storage(&mut out, &stats);
    }
    write_process(
        &mut out,
        &ProcessFigures::read_off_the_runtime().await,
        state.started_unix_seconds,
    );
    write_runtime(&mut out, &RuntimeFigures::read(&state));
    let mut text = out.finish();
    if let Some(write) = state.extra_metrics.get() {
        text.push_str(&write());
    }
    text_response(CONTENT_TYPE, text).into_response()
}

fn write_server<B: Broker>(out: &mut Exposition, state: &HttpState<B>) {
    out.family(
        "spool_build_info",
        MetricKind::Gauge,
        "Always 1; the version label says which spool runs.",
    );
    out.sample_u64("spool_build_info", &[("version", &state.version)], 1);
    out.single(
        "spool_uptime_seconds",
        MetricKind::Gauge,
        "Seconds since the server started.",
        state.uptime_seconds(),
    );
    out.single(
        "spool_ready",
        MetricKind::Gauge,
        "1 when /readyz answers 200 (recovered, storage healthy, not draining).",
        if state.unready_reason().is_none() {
            1.0
        } else {
            0.0
        },
    );
    out.single(
        "spool_disk_full",
        MetricKind::Gauge,
        "1 while puts are refused for want of disk space (deletes still work).",
        if state.disk_full() { 1.0 } else { 0.0 },
    );
}

/// (metric name, help, the counter's value in a queue's counters)
type CounterColumn = (&'static str, &'static str, fn(&QueueCounters) -> u64);

const JOB_COUNTERS: [CounterColumn; 12] = [
    ("spool_jobs_put_total", "Jobs put.", |c| c.put),
    (
        "spool_jobs_reserved_total",
        "Jobs handed to a worker.",
        |c| c.reserved,
    ),
    ("spool_jobs_deleted_total", "Jobs deleted.", |c| c.deleted),
    (
        "spool_jobs_released_total",
        "Jobs released by their worker.",
        |c| c.released,
    ),
    ("spool_jobs_buried_total", "Jobs buried.", |c| c.buried),
    (
        "spool_jobs_kicked_total",
        "Jobs kicked back to ready, one per job.",
        |c| c.kicked,
    ),
    (
        "spool_jobs_timed_out_total",
        "Reservations that ran past their TTR.",
        |c| c.timed_out,
    ),
    (
        "spool_jobs_failed_total",
        "Failed attempts: a worker's fail, or a lease expiry of a job with an attempt limit.",
        |c| c.failed,
    ),
    (
        "spool_jobs_dead_lettered_total",
        "Jobs buried by a failure (attempts used up or permanent), not by hand.",
        |c| c.dead_lettered,
    ),
    (
        "spool_jobs_cancelled_total",
        "Jobs cancelled through the job API.",
        |c| c.cancelled,
    ),
    (
        "spool_jobs_completed_total",
        "Jobs completed through the job API.",
        |c| c.completed,
    ),
    (
        "spool_jobs_duplicates_total",
        "Enqueues answered with the existing job of their idempotency key.",
        |c| c.duplicates,
    ),
];

/// (state label, the count in a queue)
type StateColumn = (&'static str, fn(&QueueSnapshot) -> u64);

const QUEUE_STATES: [StateColumn; 4] = [
    ("ready", |q| q.ready),
    ("reserved", |q| q.reserved),
    ("delayed", |q| q.delayed),
    ("buried", |q| q.buried),
];

/// (metric name, help, the histogram of a queue)
type HistogramColumn = (&'static str, &'static str, fn(&QueueSnapshot) -> &Histogram);

const QUEUE_HISTOGRAMS: [HistogramColumn; 3] = [
    (
        "spool_job_wait_seconds",
        "Time jobs spent ready before a worker reserved them.",
        |q| &q.wait,
    ),
    (
        "spool_job_run_seconds",
        "Time from reservation to delete, complete or fail.",
        |q| &q.run,
    ),
    (
        "spool_schedule_skew_seconds",
        "Delay between a job's due time and it becoming ready.",
        |q| &q.skew,
    ),
];

fn write_engine(out: &mut Exposition, snapshot: &EngineSnapshot) {
    // Counters of live and retired queues: a retired queue's are kept so
    // that they never go backwards while its tube comes and goes.
    let all_counters = || {
        let live = snapshot.queues.iter().map(|q| (&q.name, &q.counters));
        let retired = snapshot
            .retired_queues
            .iter()
            .map(|q| (&q.name, &q.counters));
        live.chain(retired)
    };
    for (name, help, value) in JOB_COUNTERS {
        out.family(name, MetricKind::Counter, help);
        for (queue, counters) in all_counters() {
            out.sample_u64(name, &[("queue", queue)], value(counters));
        }
    }
    // One reason for now; the label leaves room for others (rate limits)
    // without a new family.
    out.family(
        "spool_waits",
        MetricKind::Gauge,
        "Job-API requests held open now: parked reserves, ?wait_ms job waits.",
    );
    out.sample_u64(
        "spool_waits",
        &[("kind", "reserve")],
        snapshot.waits.reserve,
    );
    out.sample_u64("spool_waits", &[("kind", "job")], snapshot.waits.job);
    out.family(
        "spool_jobs_refused_total",
        MetricKind::Counter,
        "Enqueues refused, by reason (queue_full: the queue held max_jobs jobs).",
    );
    for (queue, counters) in all_counters() {
        out.sample_u64(
            "spool_jobs_refused_total",
            &[("queue", queue), ("reason", "queue_full")],
            counters.refused_full,
        );
    }
    out.family(
        "spool_queue_jobs",
        MetricKind::Gauge,
        "Jobs in a queue now, by state.",
    );
    for queue in &snapshot.queues {
        for (state, value) in QUEUE_STATES {
            out.sample_u64(
                "spool_queue_jobs",
                &[("queue", &queue.name), ("state", state)],
                value(queue),
            );
        }
    }
    out.family(
        "spool_queue_waiting_reservers",
        MetricKind::Gauge,
        "Workers blocked in a reserve that watch the queue.",
    );
    for queue in &snapshot.queues {
        out.sample_u64(
            "spool_queue_waiting_reservers",
            &[("queue", &queue.name)],
            queue.waiting_reservers,
        );
    }
    // Alerts on ready jobs that nobody takes (deploy/prometheus/alerts.yml)
    // leave paused queues out with this.
    out.family(
        "spool_queue_paused",
        MetricKind::Gauge,
        "1 while the queue is paused (pause-tube or the job API): its ready jobs are not handed out.",
    );
    for queue in &snapshot.queues {
        out.sample_u64(
            "spool_queue_paused",
            &[("queue", &queue.name)],
            u64::from(queue.paused),
        );
    }
    // Live queues only: a retired queue keeps no histograms (they would be
    // dozens of series per freed tube, for a queue that observes nothing
    // more).
    for (name, help, histogram) in QUEUE_HISTOGRAMS {
        out.family(name, MetricKind::Histogram, help);
        for queue in &snapshot.queues {
            out.histogram(name, &[("queue", &queue.name)], sample(histogram(queue)));
        }
    }
    out.single(
        "spool_jobs",
        MetricKind::Gauge,
        "Live jobs in every queue and state.",
        snapshot.jobs_total as f64,
    );
    write_workflows(out, &snapshot.workflows);
    write_schedules(out, snapshot);
}

/// (metric name, help, the counter of a schedule)
type ScheduleColumn = (&'static str, &'static str, fn(&ScheduleSnapshot) -> u64);

const SCHEDULE_COUNTERS: [ScheduleColumn; 3] = [
    (
        "spool_schedule_fires_total",
        "Jobs a schedule fired (triggers included).",
        |s| s.fires,
    ),
    (
        "spool_schedule_misfires_total",
        "Due instants a schedule's misfire policy dropped (missed while down or late).",
        |s| s.misfires_skipped,
    ),
    (
        "spool_schedule_backlog_skips_total",
        "Due instants skipped because max_backlog jobs of the schedule were waiting.",
        |s| s.backlog_skips,
    ),
];

/// Per schedule: the counters (durable: they survive restarts) and the
/// lateness of its firings since this process started.
fn write_schedules(out: &mut Exposition, snapshot: &EngineSnapshot) {
    for (name, help, value) in SCHEDULE_COUNTERS {
        out.family(name, MetricKind::Counter, help);
        for schedule in &snapshot.schedules {
            out.sample_u64(name, &[("schedule", &schedule.name)], value(schedule));
        }
    }
    let name = "spool_schedule_fire_skew_seconds";
    out.family(
        name,
        MetricKind::Histogram,
        "Delay between a schedule's due instant and its firing (the job's enqueue).",
    );
    for schedule in &snapshot.schedules {
        out.histogram(
            name,
            &[("schedule", &schedule.name)],
            sample(&schedule.skew),
        );
    }
}

/// `spool_workflow*`: every label value is always written (zero until
/// something happens), so rates and alerts see a series from the start.
fn write_workflows(out: &mut Exposition, w: &WorkflowCounters) {
    out.single(
        "spool_workflows_started_total",
        MetricKind::Counter,
        "Workflows started (an idempotent repeat starts none).",
        w.started as f64,
    );
    out.family(
        "spool_workflows_finished_total",
        MetricKind::Counter,
        "Workflows that reached succeeded, compensated or compensation_failed.",
    );
    for state in ["succeeded", "compensated", "compensation_failed"] {
        let count = w.finished.get(state).copied().unwrap_or(0);
        out.sample_u64("spool_workflows_finished_total", &[("state", state)], count);
    }
    out.family(
        "spool_workflow_steps_total",
        MetricKind::Counter,
        "Workflow steps by outcome: completed, failed (buried), cancelled, compensated, compensation_failed.",
    );
    for outcome in [
        "completed",
        "failed",
        "cancelled",
        "compensated",
        "compensation_failed",
    ] {
        let count = w.steps.get(outcome).copied().unwrap_or(0);
        out.sample_u64("spool_workflow_steps_total", &[("outcome", outcome)], count);
    }
    out.family(
        "spool_workflow_duration_seconds",
        MetricKind::Histogram,
        "Time from a workflow's start to succeeded, compensated or compensation_failed.",
    );
    out.histogram("spool_workflow_duration_seconds", &[], sample(&w.duration));
    out.family(
        "spool_workflows",
        MetricKind::Gauge,
        "Workflows held now (running, or finished within the retention), by state.",
    );
    for state in WorkflowState::ALL {
        let count = w.current.get(state.as_str()).copied().unwrap_or(0);
        out.sample_u64("spool_workflows", &[("state", state.as_str())], count);
    }
}

fn sample(histogram: &Histogram) -> HistogramSample<'_> {
    HistogramSample {
        upper_bounds: histogram.bounds(),
        bucket_counts: histogram.bucket_counts(),
        sum: histogram.sum(),
        count: histogram.count(),
    }
}

fn write_connections(out: &mut Exposition, metrics: &ConnectionMetrics) {
    type Column = (
        &'static str,
        &'static str,
        MetricKind,
        fn(&ProtocolMetrics) -> u64,
    );
    let columns: [Column; 4] = [
        (
            "spool_connections",
            "Client connections open now.",
            MetricKind::Gauge,
            |p| p.active,
        ),
        (
            "spool_connections_opened_total",
            "Client connections admitted.",
            MetricKind::Counter,
            |p| p.opened_total,
        ),
        (
            "spool_connection_received_bytes_total",
            "Bytes read from clients.",
            MetricKind::Counter,
            |p| p.bytes_in_total,
        ),
        (
            "spool_connection_sent_bytes_total",
            "Bytes written to clients.",
            MetricKind::Counter,
            |p| p.bytes_out_total,
        ),
    ];
    for (name, help, kind, value) in columns {
        out.family(name, kind, help);
        for protocol in &metrics.protocols {
            out.sample_u64(
                name,
                &[("protocol", protocol.protocol.as_str())],
                value(protocol),
            );
        }
    }
    out.family(
        "spool_connections_closed_total",
        MetricKind::Counter,
        "Client connections closed, by why.",
    );
    for protocol in &metrics.protocols {
        for (reason, count) in &protocol.closed_total {
            out.sample_u64(
                "spool_connections_closed_total",
                &[
                    ("protocol", protocol.protocol.as_str()),
                    ("reason", reason.as_str()),
                ],
                *count,
            );
        }
    }
    out.family(
        "spool_connections_rejected_total",
        MetricKind::Counter,
        "Connections refused at accept (connection or fd limit).",
    );
    for (reason, count) in &metrics.rejected_total {
        out.sample_u64(
            "spool_connections_rejected_total",
            &[("reason", reason.as_str())],
            *count,
        );
    }
    out.family(
        "spool_connection_duration_seconds",
        MetricKind::Histogram,
        "How long closed client connections were open.",
    );
    for protocol in &metrics.protocols {
        let duration = &protocol.duration;
        out.histogram(
            "spool_connection_duration_seconds",
            &[("protocol", protocol.protocol.as_str())],
            HistogramSample {
                upper_bounds: duration.bounds(),
                bucket_counts: duration.bucket_counts(),
                sum: duration.sum(),
                count: duration.count(),
            },
        );
    }
    if let Some(max) = metrics.max_connections {
        out.single(
            "spool_connections_max",
            MetricKind::Gauge,
            "Most beanstalkd client connections admitted at once (--max-connections).",
            max as f64,
        );
    }
}

/// The connection figures of `/admin/stats`.
pub(super) fn connections_json(metrics: &ConnectionMetrics) -> serde_json::Value {
    let per_protocol = |value: fn(&ProtocolMetrics) -> serde_json::Value| {
        metrics
            .protocols
            .iter()
            .map(|p| (p.protocol.as_str().to_string(), value(p)))
            .collect::<serde_json::Map<_, _>>()
    };
    serde_json::json!({
        "active": per_protocol(|p| p.active.into()),
        "opened": per_protocol(|p| p.opened_total.into()),
        "closed": per_protocol(|p| p
            .closed_total
            .iter()
            .map(|(reason, count)| (reason.as_str().to_string(), (*count).into()))
            .collect::<serde_json::Map<_, _>>()
            .into()),
        "bytes_in": per_protocol(|p| p.bytes_in_total.into()),
        "bytes_out": per_protocol(|p| p.bytes_out_total.into()),
        "rejected": metrics
            .rejected_total
            .iter()
            .map(|(reason, count)| (reason.as_str().to_string(), serde_json::Value::from(*count)))
            .collect::<serde_json::Map<_, _>>(),
        "max_connections": metrics.max_connections,
    })
}

/// The kernel's counts of connections dropped before `accept`: a client
/// whose handshake is dropped waits a second or more for its SYN retry,
/// so a rising count means the listen backlog (see `LISTEN_BACKLOG`) or
/// `net.core.somaxconn` is too small for the bursts this host sees.
fn write_listen_queue(out: &mut Exposition, drops: ListenQueueDrops) {
    out.single(
        "spool_listen_overflows_total",
        MetricKind::Counter,
        "Connections dropped because a listen queue was full (kernel TcpExt ListenOverflows, \
         whole network namespace).",
        drops.overflows as f64,
    );
    out.single(
        "spool_listen_drops_total",
        MetricKind::Counter,
        "Connection requests dropped by listeners for any reason, overflows included \
         (kernel TcpExt ListenDrops, whole network namespace).",
        drops.drops as f64,
    );
}

fn write_storage(out: &mut Exposition, stats: &StorageStats) {
    out.single(
        "spool_wal_bytes",
        MetricKind::Gauge,
        "Bytes in the write-ahead log's segment files.",
        stats.log_bytes as f64,
    );
    out.single(
        "spool_wal_segments",
        MetricKind::Gauge,
        "Segment files of the write-ahead log.",
        stats.segments as f64,
    );
    let counters: [(&str, &str, u64); 7] = [
        (
            "spool_wal_commits_total",
            "Commits (one write, and one fsync under fsync always, each).",
            stats.commits,
        ),
        (
            "spool_wal_records_written_total",
            "Records written to the log.",
            stats.records_written,
        ),
        (
            "spool_wal_written_bytes_total",
            "Bytes written to the log.",
            stats.bytes_written,
        ),
        ("spool_wal_fsyncs_total", "fsync calls.", stats.fsyncs),
        (
            "spool_wal_compactions_total",
            "Compactions finished.",
            stats.compactions,
        ),
        (
            "spool_wal_compactions_abandoned_total",
            "Compactions given up for want of disk space (the log stays healthy).",
            stats.compactions_abandoned,
        ),
        (
            "spool_wal_segments_trimmed_total",
            "Segments deleted without a compaction because no live job needed them.",
            stats.segments_trimmed,
        ),
    ];
    for (name, help, value) in counters {
        out.family(name, MetricKind::Counter, help);
        out.sample_u64(name, &[], value);
    }
    out.family(
        "spool_wal_fsync_seconds",
        MetricKind::Histogram,
        "Duration of the log's fsync calls.",
    );
    out.histogram("spool_wal_fsync_seconds", &[], sample(&stats.fsync_seconds));
    out.family(
        "spool_wal_commit_batch_size",
        MetricKind::Histogram,
        "Records per commit (group commit batch size).",
    );
    out.histogram(
        "spool_wal_commit_batch_size",
        &[],
        sample(&stats.commit_batch_records),
    );
    out.single(
        "spool_wal_failed",
        MetricKind::Gauge,
        "1 once the log failed; durable changes are refused until restart.",
        if stats.failed.is_some() { 1.0 } else { 0.0 },
    );
}

fn write_process(out: &mut Exposition, process: &ProcessFigures, start_time_seconds: f64) {
    if let Some(fds) = process.open_fds {
        out.single(
            "process_open_fds",
            MetricKind::Gauge,
            "Number of open file descriptors.",
            fds as f64,
        );
    }
    if let Some(fds) = process.max_fds {
        out.single(
            "process_max_fds",
            MetricKind::Gauge,
            "Maximum number of open file descriptors.",
            fds as f64,
        );
    }
    if let Some(bytes) = process.resident_memory_bytes {
        out.single(
            "process_resident_memory_bytes",
            MetricKind::Gauge,
            "Resident memory size in bytes.",
            bytes as f64,
        );
    }
    if let Some(threads) = process.threads {
        out.single(
            "process_threads",
            MetricKind::Gauge,
            "OS threads of the process.",
            threads as f64,
        );
    }
    out.single(
        "process_cpu_seconds_total",
        MetricKind::Counter,
        "Total user and system CPU time spent in seconds.",
        process.cpu_seconds,
    );
    out.single(
        "process_start_time_seconds",
        MetricKind::Gauge,
        "Start time of the process since unix epoch in seconds.",
        start_time_seconds,
    );
}

fn write_runtime(out: &mut Exposition, runtimes: &[(&str, RuntimeFigures)]) {
    type Column = (&'static str, &'static str, fn(&RuntimeFigures) -> usize);
    let columns: [Column; 3] = [
        (
            "spool_runtime_workers",
            "Worker threads of an async runtime (data: connections and the engine; http: this listener).",
            |r| r.workers,
        ),
        (
            "spool_runtime_alive_tasks",
            "Tasks alive in an async runtime.",
            |r| r.alive_tasks,
        ),
        (
            "spool_runtime_global_queue_depth",
            "Tasks waiting in an async runtime's global queue.",
            |r| r.global_queue_depth,
        ),
    ];
    for (name, help, value) in columns {
        out.family(name, MetricKind::Gauge, help);
        for (runtime, figures) in runtimes {
            out.sample_u64(name, &[("runtime", runtime)], value(figures) as u64);
        }
    }
}
