//! The engine: every queue's state and the rules that move jobs between
//! states. Sans-IO: each call takes `now` (nanoseconds on a monotonic clock
//! the caller owns) and appends replies to an outbox, addressed to
//! connections; it never touches a socket or a clock.
//!
//! Replies can be addressed to a connection other than the caller's: a `put`
//! may complete another connection's blocked `reserve`. Callers drain the
//! outbox with [`Engine::take_replies`] after each batch of calls and then
//! call [`Engine::tick`] to run timers; `tick` says when it next wants to run.

use std::collections::hash_map::{Entry, HashMap};
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasherDefault, Hasher};

use bytes::Bytes;
use spool_proto::limits::{DEADLINE_SAFETY_MARGIN_NS, MIN_TTR_NS, URGENT_PRIORITY_THRESHOLD};
use spool_proto::{JobStats, Put, PutBody, Request, Response, ServerStats, TubeName, TubeStats};

use crate::job::{Backoff, Job, JobExtra, JobId, JobState};
use spool_broker::metrics::Histogram;
use spool_broker::{
    EngineSnapshot, QueueCounters, QueueSnapshot, RetiredQueueSnapshot, SessionSnapshot,
    SnapshotScope, SNAPSHOT_RESERVED_IDS_MAX,
};

use crate::limits;
use crate::ms::Ms;
use crate::record::{
    job_snapshot_log_bytes, ChangeRecord, FullJobRecord, JobRecord, LogRecord, QueueRecord,
    RestState,
};
use crate::workflow::{JobEvent, StepState};

mod beanstalk;
mod conn;
mod dispatch;
mod jobview;
mod queues;
mod replay;
mod retention;
mod schedules;
mod tasks;
mod timers;
mod views;
mod workflows;

use conn::Conn;
use dispatch::{Closed, DispatchLimits};
use retention::Retention;
pub use timers::{SCHEDULE_TIMERS_PER_TICK_MAX, TIMERS_PER_TICK_MAX};
pub use workflows::WorkflowMetrics;
use workflows::Workflows;

const NS_PER_SEC: u64 = 1_000_000_000;

/// Freed tubes whose job counters are kept, by name, for when the tube comes
/// back: beanstalkd frees a tube as soon as nothing refers to it, and a
/// counter that vanished and restarted at zero with every idle moment would
/// make `rate()` useless. Only the 13 `spool_jobs_*_total` counters are kept
/// (their histograms are dropped and restart empty if the tube returns), so
/// a retired tube costs 13 series in every `/metrics` scrape (a live one
/// costs about 80: counters, gauges and three 20-bucket histograms) and a
/// few hundred bytes of memory (its name and 104 bytes of counters).
///
/// Bounded because clients may cycle through any number of tube names; past
/// it the longest-retired name is forgotten. 256 keeps the worst case at
/// 256 × 13 = 3,328 series (about 190 KiB of exposition text), what some 40
/// live tubes cost, while it still covers the tubes an ordinary deployment
/// lets go idle between two jobs.
pub const RETIRED_QUEUES_MAX: usize = 256;

/// Whole seconds left until `deadline`. beanstalkd reads its clock anew for
/// every reply, so some time has always passed since the event that set the
/// deadline: a fresh 3-second reservation shows 2. Counting `now` as one
/// nanosecond later reproduces that with the engine's fixed `now`.
fn time_left_secs(deadline_ns: u64, now: u64) -> u64 {
    deadline_ns.saturating_sub(now + 1) / NS_PER_SEC
}

/// A client session, as numbered by the engine.
pub type ConnId = u64;

/// Index of a live tube. Tubes are freed when nothing refers to them, so an
/// id may later name another tube.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TubeId(u32);

/// Hashes the engine's sequential u64 ids with one multiplication: SipHash's
/// DoS resistance buys nothing for ids the server itself hands out.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

#[derive(Debug)]
struct Tube {
    name: TubeName,
    /// Connections using or watching it, jobs in it, and the default tube's
    /// permanent reference. At zero the tube is freed.
    refs: u32,
    ready: BTreeSet<(u32, JobId)>,
    delayed: BTreeSet<(u64, JobId)>,
    /// FIFO by bury order.
    buried: BTreeSet<(u64, JobId)>,
    waiting: Ms<ConnId>,
    using: u64,
    watching: u64,
    urgent: u64,
    reserved: u64,
    total_jobs: u64,
    cmd_delete: u64,
    cmd_pause_tube: u64,
    /// Length of the current pause; 0 when not paused.
    pause_ns: u64,
    unpause_at_ns: u64,
    /// The queue policy's `max_attempts` (0: none), given to beanstalkd puts.
    max_attempts: u32,
    /// The policy's `concurrency` and `rate_per_s`, if it sets either: a
    /// tube without them costs one check where jobs are handed out.
    limits: Option<Box<DispatchLimits>>,
    metrics: QueueMetrics,
}

impl Tube {
    /// The job beanstalkd's peek shows in `state`: the ready job reserved
    /// next, the delayed one due soonest, the one buried longest ago; none
    /// for the other states.
    fn first_in(&self, state: JobState) -> Option<JobId> {
        match state {
            JobState::Ready => self.ready.first().map(|&(_, id)| id),
            JobState::Delayed => self.delayed.first().map(|&(_, id)| id),
            JobState::Buried => self.buried.first().map(|&(_, id)| id),
            _ => None,
        }
    }
}

/// A tube's cumulative counters and histograms; the counters outlive the
/// tube (see [`RETIRED_QUEUES_MAX`]).
#[derive(Debug, Clone)]
struct QueueMetrics {
    counters: QueueCounters,
    wait: Histogram,
    run: Histogram,
    skew: Histogram,
}

impl QueueMetrics {
    /// A returning tube's metrics: its retired counters, empty histograms.
    fn with_counters(counters: QueueCounters) -> Self {
        QueueMetrics {
            counters,
            wait: Histogram::queue_latency(),
            run: Histogram::queue_latency(),
            skew: Histogram::skew(),
        }
    }
}

impl Default for QueueMetrics {
    fn default() -> Self {
        QueueMetrics::with_counters(QueueCounters::default())
    }
}

/// The kinds of timer `tick` runs, in the order they win ties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// A schedule's due instant: first, so that its job is enqueued in the
    /// same tick as delayed jobs due at that instant.
    Schedule,
    Delay,
    /// A schedule's job made ready by the delay timer: its schedule's skew
    /// and map entry, after the jobs due with it are all ready.
    FiringReady,
    Pause,
    /// A rate-limited queue's next token: before a blocked reserve's
    /// timeout at the same instant, as a pause's end is.
    Rate,
    /// A blocked reserve's timeout or DEADLINE_SOON: before an expiry at the
    /// same instant, so the waiter hears of it before the job is taken.
    Wait,
    Ttr,
    Retention,
    /// A finished workflow's retention ends.
    WorkflowRetention,
}

#[derive(Debug)]
struct Wait {
    /// When the wait ends with `TIMED_OUT` or `DEADLINE_SOON`, if ever.
    timer_at_ns: Option<u64>,
    /// When the reserve began, for introspection.
    since_ns: u64,
}

#[derive(Debug, Default)]
struct Counters {
    cmd_put: u64,
    cmd_peek: u64,
    cmd_peek_ready: u64,
    cmd_peek_delayed: u64,
    cmd_peek_buried: u64,
    cmd_reserve: u64,
    cmd_reserve_with_timeout: u64,
    cmd_delete: u64,
    cmd_release: u64,
    cmd_use: u64,
    cmd_watch: u64,
    cmd_ignore: u64,
    cmd_bury: u64,
    cmd_kick: u64,
    cmd_touch: u64,
    cmd_stats: u64,
    cmd_stats_job: u64,
    cmd_stats_tube: u64,
    cmd_list_tubes: u64,
    cmd_list_tube_used: u64,
    cmd_list_tubes_watched: u64,
    cmd_pause_tube: u64,
    job_timeouts: u64,
    total_jobs: u64,
    ready: u64,
    urgent: u64,
    reserved: u64,
    buried: u64,
    current_connections: u64,
    total_connections: u64,
    producers: u64,
    workers: u64,
    waiting: u64,
}

/// Settings the engine needs; everything else about the process lives in
/// the adapters.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_job_size: u32,
}

/// The job state machine. See the module documentation.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    jobs: IdMap<Job>,
    next_job_id: JobId,
    next_seq: u64,
    tubes: Vec<Option<Tube>>,
    free_tube_slots: Vec<u32>,
    tube_ids: HashMap<TubeName, TubeId>,
    /// All tubes in beanstalkd's `list-tubes` order.
    tube_order: Ms<TubeId>,
    default_tube: TubeId,
    conns: IdMap<Conn>,
    /// The earliest delayed job of each tube that has one, as (due, job,
    /// tube): the first entry is the earliest delayed job of all. A delayed
    /// job sits in its tube's set only (one index entry, as a ready job),
    /// and the timer pays O(log tubes) per job on top of its tube's set.
    delayed_tubes: BTreeSet<(u64, JobId, TubeId)>,
    /// Delayed jobs in all tubes.
    delayed_count: u64,
    /// Every reservation by deadline: (deadline, seq, job).
    reservations: BTreeSet<(u64, u64, JobId)>,
    wait_timers: BTreeSet<(u64, ConnId)>,
    paused: BTreeSet<(u64, TubeId)>,
    /// Tubes with at least one blocked reserver.
    waited_tubes: BTreeSet<TubeId>,
    /// Rate-limited tubes with a ready job and an empty bucket, by when
    /// their next token arrives.
    rate_timers: BTreeSet<(u64, TubeId)>,
    /// Token buckets of freed tubes (see `DispatchLimits::tat_ns`): a queue
    /// that empties and comes back must not start with a full bucket.
    rate_tats: HashMap<TubeName, u64>,
    /// A reservation of a queue at its concurrency ended: blocked
    /// reservers are served once the current call is done.
    slot_freed: bool,
    counters: Counters,
    draining: bool,
    outbox: Vec<(ConnId, Response)>,
    /// Whether durable changes are recorded in `log` (off in memory).
    logging: bool,
    /// Jobs that became completed, cancelled or buried since the broker
    /// last drained them; `None` while no job wait needs them.
    settled: Option<Vec<JobId>>,
    log: Vec<LogRecord>,
    /// The log could not be written: durable changes are refused.
    storage_failed: bool,
    /// See [`Engine::live_log_bytes`].
    live_log_bytes: u64,
    /// The disk is full: puts are refused, other changes go on.
    disk_full: bool,
    /// A graceful shutdown: puts are refused and reserves never block.
    shutting_down: bool,
    /// Counters of freed tubes by name, with the order they were freed in
    /// (see [`RETIRED_QUEUES_MAX`]).
    retired: HashMap<TubeName, (u64, QueueCounters)>,
    retired_order: BTreeMap<u64, TubeName>,
    next_retired_seq: u64,
    /// Wall-clock nanoseconds at engine time 0, for the job API's instants.
    epoch_ns: u64,
    /// Completed and cancelled jobs, kept for their queue's retention.
    retention: Retention,
    /// Idempotency keys by (queue, key); the job holds the key's expiry.
    keys: HashMap<(TubeName, String), JobId>,
    /// Policies and pauses set through the job API, by queue name: they
    /// outlive the tube, which is freed when nothing refers to it.
    settings: HashMap<TubeName, QueueSettings>,
    /// Counts jobs becoming ready and pauses ending, so a broker knows when
    /// a parked job-API reserve is worth trying again.
    ready_events: u64,
    /// See [`Engine::set_replay_now`].
    replay_now: u64,
    /// Workflows and the index of their jobs (`workflows.rs`).
    workflows: Workflows,
    /// Schedules by name (see `schedules.rs`).
    schedules: BTreeMap<TubeName, schedules::Schedule>,
    /// Each armed schedule by its next due instant (wall-clock ms).
    schedule_timers: BTreeSet<(u64, TubeName)>,
    /// The live jobs of schedules with a `max_backlog` were found after
    /// the restart.
    schedule_backlog_indexed: bool,
    /// The job of each firing made ahead of its instant, to its schedule,
    /// while the job is delayed and until its schedule's books are done
    /// after the delay timer made it ready (`ready_firings`): the delay
    /// timer looks here for a job late past the misfire grace, the books
    /// for the schedule. A job taken out of the delay timer by hand (kick,
    /// update, delete) leaves it.
    firing_jobs: IdMap<TubeName>,
    /// Jobs of `firing_jobs` the delay timer made ready, oldest first, for
    /// their schedule's books (`firing_job_ready`) once no job due before
    /// is waiting: thousands of firings due on one instant then become
    /// ready at the cost of delayed jobs, not of their schedules' lookups.
    ready_firings: std::collections::VecDeque<schedules::ReadyFiring>,
    /// The instant of the timer `tick` is running, while it runs one: a
    /// late tick must find a pause as it was at that instant, not as it is
    /// at the tick's `now` (a job made ready in a tube whose pause ended
    /// only later must not go to a reserver that timed out before).
    timer_instant_ns: Option<u64>,
}

/// A queue's settings from the job API.
#[derive(Debug, Clone, Default, PartialEq)]
struct QueueSettings {
    policy: spool_broker::QueuePolicy,
    /// (start, end) in engine time; `u64::MAX` ends never.
    pause: Option<(u64, u64)>,
}

/// A record that does not fit the jobs replayed before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayError {
    DuplicateJob(JobId),
}

impl std::fmt::Display for ReplayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplayError::DuplicateJob(id) => write!(f, "job {id} is put twice"),
        }
    }
}

impl std::error::Error for ReplayError {}

impl Engine {
    pub fn new(config: EngineConfig) -> Engine {
        let mut engine = Engine {
            config,
            jobs: IdMap::default(),
            next_job_id: 1,
            next_seq: 1,
            tubes: Vec::new(),
            free_tube_slots: Vec::new(),
            tube_ids: HashMap::new(),
            tube_order: Ms::default(),
            default_tube: TubeId(0),
            conns: IdMap::default(),
            delayed_tubes: BTreeSet::new(),
            delayed_count: 0,
            reservations: BTreeSet::new(),
            wait_timers: BTreeSet::new(),
            paused: BTreeSet::new(),
            waited_tubes: BTreeSet::new(),
            rate_timers: BTreeSet::new(),
            rate_tats: HashMap::new(),
            slot_freed: false,
            counters: Counters::default(),
            draining: false,
            outbox: Vec::new(),
            logging: false,
            settled: None,
            log: Vec::new(),
            storage_failed: false,
            live_log_bytes: 0,
            disk_full: false,
            shutting_down: false,
            retired: HashMap::new(),
            retired_order: BTreeMap::new(),
            next_retired_seq: 0,
            epoch_ns: 0,
            retention: Retention::default(),
            keys: HashMap::new(),
            settings: HashMap::new(),
            ready_events: 0,
            replay_now: 0,
            workflows: Workflows::default(),
            schedules: BTreeMap::new(),
            schedule_timers: BTreeSet::new(),
            schedule_backlog_indexed: false,
            firing_jobs: IdMap::default(),
            ready_firings: std::collections::VecDeque::new(),
            timer_instant_ns: None,
        };
        let default_tube = engine.find_or_make_tube(&TubeName::default_tube());
        engine.incref(default_tube); // held for the life of the engine
        engine.default_tube = default_tube;
        engine
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Refuse new jobs (`DRAINING`) while set.
    pub fn set_draining(&mut self, draining: bool) {
        self.draining = draining;
    }

    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Starts a graceful shutdown, for good: puts are refused with
    /// `DRAINING` (as while draining), every blocked reserve is answered
    /// `TIMED_OUT` now, and reserves from now on answer `TIMED_OUT` at once
    /// instead of blocking. Reserved jobs stay with their sessions so that
    /// workers can finish them; their TTRs still run.
    pub fn begin_shutdown(&mut self) {
        self.shutting_down = true;
        let mut blocked: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.wait().is_some())
            .map(|(&id, _)| id)
            .collect();
        // In id order, so that the replies do not depend on hash order.
        blocked.sort_unstable();
        for id in blocked {
            self.time_out_wait(id);
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// Record durable changes as [`LogRecord`]s from now on.
    pub fn enable_logging(&mut self) {
        self.logging = true;
    }

    /// The log cannot be written any more: refuse every durable change
    /// (`OUT_OF_MEMORY` for puts, `INTERNAL_ERROR` otherwise) until restart.
    pub fn set_storage_failed(&mut self) {
        self.storage_failed = true;
    }

    /// Refuse puts with `OUT_OF_MEMORY` while the disk is full; deletes
    /// and other changes go on (the log reserves room for them).
    pub fn set_disk_full(&mut self, full: bool) {
        self.disk_full = full;
    }

    /// Durable changes made since the last call, in order.
    pub fn drain_log_into(&mut self, out: &mut Vec<LogRecord>) {
        out.append(&mut self.log);
    }

    fn record(&mut self, record: impl FnOnce() -> LogRecord) {
        if self.logging {
            self.log.push(record());
        }
    }

    /// The id the next job will get.
    pub fn next_job_id(&self) -> JobId {
        self.next_job_id
    }

    /// Log bytes that the live jobs' records take: what a fully compacted
    /// log would hold.
    pub fn live_log_bytes(&self) -> u64 {
        self.live_log_bytes
    }

    pub fn job(&self, id: JobId) -> Option<&Job> {
        self.jobs.get(&id)
    }

    pub fn job_count(&self) -> usize {
        self.jobs.len()
    }

    /// Every job, in no particular order.
    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values()
    }

    /// The name of the tube a job is in.
    pub fn job_tube(&self, id: JobId) -> Option<&TubeName> {
        self.jobs.get(&id).map(|j| &self.tube(j.tube).name)
    }

    #[allow(clippy::too_many_arguments)]
    fn insert_job(
        &mut self,
        id: JobId,
        tube: TubeId,
        pri: u32,
        delay_ns: u64,
        ttr_ns: u64,
        body: Bytes,
        now: u64,
    ) {
        self.incref(tube);
        let t = self.tube(tube);
        // A queue policy's attempt limit applies to beanstalkd puts too.
        let max_attempts = t.max_attempts;
        self.live_log_bytes += job_snapshot_log_bytes(t.name.as_str().len(), body.len());
        self.jobs.insert(
            id,
            Job {
                id,
                tube,
                pri,
                delay_ns,
                ttr_ns: ttr_ns.max(MIN_TTR_NS),
                body,
                created_at_ns: now,
                deadline_at_ns: 0,
                state: JobState::Ready,
                attempts: 0,
                max_attempts,
                version: 0,
                reserves: 0,
                timeouts: 0,
                releases: 0,
                buries: 0,
                kicks: 0,
                seq: 0,
                reserver: None,
                extra: None,
            },
        );
    }

    /// Forgets a job that is in no queue.
    fn drop_job(&mut self, id: JobId) {
        self.workflow_job_dropped(id);
        let job = self.jobs.remove(&id).expect("job exists");
        if job.extra.is_some() {
            let queue = self.tube(job.tube).name.clone();
            self.forget_key(&job, &queue);
        }
        self.live_log_bytes -=
            job_snapshot_log_bytes(self.tube(job.tube).name.as_str().len(), job.body.len());
        self.decref(job.tube);
    }

    // ---- state transitions ---------------------------------------------

    /// Puts a job that is in no queue into ready (`delay_ns == 0`) or
    /// delayed, then hands ready jobs to blocked reservers.
    fn enqueue(&mut self, id: JobId, delay_ns: u64, now: u64) {
        let job = self.jobs.get_mut(&id).expect("job exists");
        job.reserver = None;
        job.version += 1;
        if let Some(extra) = job.extra.as_deref_mut() {
            extra.updated_at_ns = now;
        }
        let (tube, pri) = (job.tube, job.pri);
        if delay_ns > 0 {
            job.deadline_at_ns = now + delay_ns;
            job.state = JobState::Delayed;
            let due = job.deadline_at_ns;
            self.add_delayed(tube, due, id);
        } else {
            job.state = JobState::Ready;
            // A ready job has no deadline: the field holds when it became
            // ready, for the wait histogram, at no cost per job.
            job.deadline_at_ns = now;
            let urgent = pri < URGENT_PRIORITY_THRESHOLD;
            let t = self.tube_mut(tube);
            t.ready.insert((pri, id));
            t.urgent += u64::from(urgent);
            self.counters.ready += 1;
            self.counters.urgent += u64::from(urgent);
            self.ready_events += 1;
        }
        self.process_queue(now);
    }

    fn bury(&mut self, id: JobId, now: u64) {
        let seq = self.next_seq();
        let job = self.jobs.get_mut(&id).expect("job exists");
        if let Some(extra) = job.extra.as_deref_mut() {
            extra.updated_at_ns = now;
        }
        job.state = JobState::Buried;
        job.reserver = None;
        job.seq = seq;
        job.buries += 1;
        job.version += 1;
        let tube = job.tube;
        self.tube_mut(tube).buried.insert((seq, id));
        self.counters.buried += 1;
        self.settled(id);
        self.workflow_event(id, |engine| JobEvent::Buried {
            error: engine.jobs[&id]
                .extra
                .as_ref()
                .and_then(|e| e.last_error.as_deref().map(String::from)),
        });
    }

    /// Notes a job that reached a state a job wait ends at (final or
    /// buried), only while the broker asked for it: otherwise no cost.
    fn settled(&mut self, id: JobId) {
        if let Some(settled) = &mut self.settled {
            settled.push(id);
        }
    }

    /// Starts (or stops) noting the jobs that become completed, cancelled
    /// or buried, for a broker that holds job waits (`Op::Wait`); stopping
    /// forgets what was noted.
    pub fn track_settled(&mut self, on: bool) {
        match (on, self.settled.is_some()) {
            (true, false) => self.settled = Some(Vec::new()),
            (false, true) => self.settled = None,
            _ => {}
        }
    }

    /// The jobs that settled since the last call, while tracking.
    pub fn drain_settled_into(&mut self, out: &mut Vec<JobId>) {
        if let Some(settled) = &mut self.settled {
            out.append(settled);
        }
    }

    fn kick(&mut self, id: JobId, now: u64) {
        let job = &self.jobs[&id];
        let (state, tube, seq, deadline) = (job.state, job.tube, job.seq, job.deadline_at_ns);
        match state {
            JobState::Buried => self.remove_buried(tube, seq, id),
            JobState::Delayed => self.remove_delayed(tube, deadline, id),
            _ => return,
        }
        let job = self.jobs.get_mut(&id).expect("job exists");
        job.kicks += 1;
        self.tube_mut(tube).metrics.counters.kicked += 1;
        self.enqueue(id, 0, now);
        self.record_change(id);
        if state == JobState::Buried {
            self.workflow_event(id, |_| JobEvent::Kicked);
        }
    }

    fn remove_ready(&mut self, tube: TubeId, pri: u32, id: JobId) {
        let urgent = pri < URGENT_PRIORITY_THRESHOLD;
        let t = self.tube_mut(tube);
        let removed = t.ready.remove(&(pri, id));
        debug_assert!(removed, "job {id} was in its tube's ready set");
        t.urgent -= u64::from(urgent);
        self.counters.ready -= 1;
        self.counters.urgent -= u64::from(urgent);
    }

    fn remove_buried(&mut self, tube: TubeId, seq: u64, id: JobId) {
        let removed = self.tube_mut(tube).buried.remove(&(seq, id));
        debug_assert!(removed, "job {id} was in its tube's buried list");
        self.counters.buried -= 1;
    }

    /// Files a job as delayed until `due` in its tube, and the tube under
    /// its new earliest if this job is it.
    fn add_delayed(&mut self, tube: TubeId, due: u64, id: JobId) {
        let t = self.tube_mut(tube);
        let earliest = t.delayed.first().copied();
        t.delayed.insert((due, id));
        self.delayed_count += 1;
        if earliest.is_none_or(|first| (due, id) < first) {
            if let Some((first_due, first_id)) = earliest {
                self.delayed_tubes.remove(&(first_due, first_id, tube));
            }
            self.delayed_tubes.insert((due, id, tube));
        }
    }

    /// Takes a delayed job out of the delay timer by hand (kick, update,
    /// delete, replay): a schedule's firing made ahead is its schedule's
    /// no longer (see `firing_jobs`).
    fn remove_delayed(&mut self, tube: TubeId, deadline: u64, id: JobId) {
        if !self.firing_jobs.is_empty() {
            self.firing_jobs.remove(&id);
        }
        self.unfile_delayed(tube, deadline, id);
    }

    /// Takes a delayed job out of its tube's delayed set (and the tube out
    /// of `delayed_tubes` if it was the earliest).
    fn unfile_delayed(&mut self, tube: TubeId, deadline: u64, id: JobId) {
        let t = self.tube_mut(tube);
        let was_earliest = t.delayed.first() == Some(&(deadline, id));
        let removed = t.delayed.remove(&(deadline, id));
        debug_assert!(removed, "job {id} was in its tube's delay set");
        let next = t.delayed.first().copied();
        self.delayed_count -= u64::from(removed);
        if was_earliest {
            self.delayed_tubes.remove(&(deadline, id, tube));
            if let Some((next_due, next_id)) = next {
                self.delayed_tubes.insert((next_due, next_id, tube));
            }
        }
    }

    /// The earliest delayed job of all tubes: (due, job, tube).
    fn earliest_delayed(&self) -> Option<(u64, JobId, TubeId)> {
        self.delayed_tubes.first().copied()
    }

    /// Detaches a reserved job from its reserver; the job is then in no
    /// queue until the caller puts it somewhere.
    fn release_reservation_of(&mut self, id: JobId) {
        let job = self.jobs.get_mut(&id).expect("job exists");
        debug_assert_eq!(job.state, JobState::Reserved);
        let (deadline, seq, tube) = (job.deadline_at_ns, job.seq, job.tube);
        let reserver = job.reserver.take();
        self.reservations.remove(&(deadline, seq, id));
        if let Some(conn) = reserver.and_then(|c| self.conns.get_mut(&c)) {
            conn.remove_lease(seq, deadline);
        }
        let t = self.tube_mut(tube);
        t.reserved -= 1;
        if let Some(limits) = t.limits.as_deref() {
            if t.reserved + 1 == u64::from(limits.concurrency) {
                // The queue opens again: parked job-API reserves retry now,
                // blocked reservers when the current call is done.
                self.ready_events += 1;
                self.slot_freed = true;
            }
        }
        self.counters.reserved -= 1;
    }

    /// Hands a job that is in no queue (but still says the state it was
    /// taken from) to `conn`.
    fn reserve_job(&mut self, conn_id: ConnId, id: JobId, now: u64) {
        let (seq, deadline, body) = self.lease_job(id, Some(conn_id), now);
        let conn = self.conns.get_mut(&conn_id).expect("connected");
        conn.add_lease(seq, id, deadline);
        self.outbox.push((conn_id, Response::Reserved { id, body }));
    }

    /// Reserves a job that is in no queue (but still says the state it was
    /// taken from) for `holder`, or for a lease alone: returns the lease's
    /// token, its deadline and the body.
    fn lease_job(&mut self, id: JobId, holder: Option<ConnId>, now: u64) -> (u64, u64, Bytes) {
        let seq = self.next_seq();
        let job = self.jobs.get_mut(&id).expect("job exists");
        let waited_ns =
            (job.state == JobState::Ready).then(|| now.saturating_sub(job.deadline_at_ns));
        let tube = job.tube;
        job.deadline_at_ns = now + job.ttr_ns;
        job.state = JobState::Reserved;
        job.reserver = holder;
        job.reserves += 1;
        job.seq = seq;
        // A lease starting or ending by itself (a disconnect, a restart) is
        // not a change of the job: neither moves its version, so the
        // version survives a restart exactly (leases are not logged). An
        // expiry, a release or a completion is, and is logged.
        let (deadline, body) = (job.deadline_at_ns, job.body.clone());
        let t = self.tube_mut(tube);
        t.reserved += 1;
        t.metrics.counters.reserved += 1;
        if let Some(limits) = t.limits.as_deref_mut() {
            limits.take_token(now);
        }
        if let Some(waited_ns) = waited_ns {
            t.metrics.wait.observe_ns(waited_ns);
        }
        self.counters.reserved += 1;
        self.reservations.insert((deadline, seq, id));
        (seq, deadline, body)
    }

    /// Hands ready jobs to blocked reservers, best job first, until no
    /// unpaused tube has both.
    fn process_queue(&mut self, now: u64) {
        let pause_now = self.timer_instant_ns.map_or(now, |at| at.min(now));
        loop {
            let mut best: Option<(u32, JobId, TubeId)> = None;
            let mut unpaused = Vec::new();
            let mut throttled = Vec::new();
            for &tube in &self.waited_tubes {
                let t = self.tubes[tube.0 as usize].as_ref().expect("live tube");
                if t.pause_ns > 0 {
                    if t.unpause_at_ns > pause_now {
                        continue;
                    }
                    unpaused.push(tube);
                }
                if let Some(limits) = t.limits.as_deref() {
                    match limits.check(t.reserved, now) {
                        Ok(()) => {}
                        Err(Closed::Full) => continue,
                        Err(Closed::Until(at)) => {
                            if !t.ready.is_empty() {
                                throttled.push((tube, at));
                            }
                            continue;
                        }
                    }
                }
                if let Some(&(pri, id)) = t.ready.first() {
                    if best.is_none_or(|(bp, bid, _)| (pri, id) < (bp, bid)) {
                        best = Some((pri, id, tube));
                    }
                }
            }
            for tube in unpaused {
                self.unpause(tube);
            }
            for (tube, at) in throttled {
                self.arm_rate_timer(tube, at);
            }
            let Some((pri, id, tube)) = best else { return };
            self.remove_ready(tube, pri, id);
            let conn = self
                .tube_mut(tube)
                .waiting
                .take()
                .expect("tube has a waiter");
            self.remove_waiting_conn(conn);
            self.reserve_job(conn, id, now);
        }
    }

    fn unpause(&mut self, tube: TubeId) {
        self.ready_events += 1;
        let t = self.tube_mut(tube);
        let at = t.unpause_at_ns;
        t.pause_ns = 0;
        self.paused.remove(&(at, tube));
    }

    /// Makes the sequence numbers (lease tokens among them) go on from at
    /// least `floor`. Tokens are not logged, so each start of the server
    /// passes its clock's `now`: a token handed out before a restart then
    /// never names a reservation made after it (which counting from 1 in
    /// each life did), as long as fewer tokens were drawn than nanoseconds
    /// passed and the clock did not step back across the restart.
    pub fn set_seq_floor(&mut self, floor: u64) {
        self.next_seq = self.next_seq.max(floor);
    }

    fn next_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    // ---- tubes ----------------------------------------------------------

    fn conn(&self, id: ConnId) -> &Conn {
        &self.conns[&id]
    }

    fn tube(&self, id: TubeId) -> &Tube {
        self.tubes[id.0 as usize].as_ref().expect("live tube")
    }

    fn tube_mut(&mut self, id: TubeId) -> &mut Tube {
        self.tubes[id.0 as usize].as_mut().expect("live tube")
    }

    /// Finds a tube or creates it with no references; the caller takes one.
    fn find_or_make_tube(&mut self, name: &TubeName) -> TubeId {
        let slot = match self.tube_ids.entry(name.clone()) {
            Entry::Occupied(e) => return *e.get(),
            Entry::Vacant(e) => {
                let slot = match self.free_tube_slots.pop() {
                    Some(slot) => slot,
                    None => {
                        self.tubes.push(None);
                        (self.tubes.len() - 1) as u32
                    }
                };
                e.insert(TubeId(slot));
                slot
            }
        };
        let metrics = match self.retired.remove(name) {
            Some((seq, counters)) => {
                self.retired_order.remove(&seq);
                QueueMetrics::with_counters(counters)
            }
            None => QueueMetrics::default(),
        };
        self.tubes[slot as usize] = Some(Tube {
            name: name.clone(),
            refs: 0,
            ready: BTreeSet::new(),
            delayed: BTreeSet::new(),
            buried: BTreeSet::new(),
            waiting: Ms::default(),
            using: 0,
            watching: 0,
            urgent: 0,
            reserved: 0,
            total_jobs: 0,
            cmd_delete: 0,
            cmd_pause_tube: 0,
            pause_ns: 0,
            unpause_at_ns: 0,
            max_attempts: 0,
            limits: None,
            metrics,
        });
        self.tube_order.push(TubeId(slot));
        if let Some(settings) = self.settings.get(name).cloned() {
            self.apply_settings(TubeId(slot), &settings);
        }
        if let Some(tat) = self.rate_tats.remove(name) {
            if let Some(limits) = self.tube_mut(TubeId(slot)).limits.as_deref_mut() {
                limits.tat_ns = tat;
            }
        }
        TubeId(slot)
    }

    fn incref(&mut self, tube: TubeId) {
        self.tube_mut(tube).refs += 1;
    }

    fn decref(&mut self, tube: TubeId) {
        let t = self.tube_mut(tube);
        t.refs -= 1;
        if t.refs > 0 {
            return;
        }
        let t = self.tubes[tube.0 as usize].take().expect("live tube");
        if t.pause_ns > 0 {
            self.paused.remove(&(t.unpause_at_ns, tube));
        }
        if let Some(limits) = t.limits.as_deref() {
            if limits.timer_ns != 0 {
                self.rate_timers.remove(&(limits.timer_ns, tube));
            }
            if limits.interval_ns > 0 {
                self.rate_tats.insert(t.name.clone(), limits.tat_ns);
            }
        }
        self.tube_ids.remove(&t.name);
        self.tube_order.remove(tube);
        self.waited_tubes.remove(&tube);
        self.free_tube_slots.push(tube.0);
        self.retire(t.name, t.metrics.counters);
    }

    /// Keeps a freed tube's counters for when its name comes back; its
    /// histograms go. A tube whose counters are all zero (one only watched
    /// or used, or one that saw only replayed jobs) leaves nothing to keep.
    fn retire(&mut self, name: TubeName, counters: QueueCounters) {
        if counters == QueueCounters::default() {
            return;
        }
        let seq = self.next_retired_seq;
        self.next_retired_seq += 1;
        self.retired_order.insert(seq, name.clone());
        self.retired.insert(name, (seq, counters));
        while self.retired.len() > RETIRED_QUEUES_MAX {
            let Some((_, oldest)) = self.retired_order.pop_first() else {
                break;
            };
            self.retired.remove(&oldest);
        }
    }

    /// Checks the cross-structure invariants; for tests.
    #[doc(hidden)]
    pub fn check_invariants(&self) {
        self.check_workflow_invariants();
        self.check_schedule_invariants();
        let mut ready = 0;
        let mut buried = 0;
        let mut delayed = 0;
        let mut reserved = 0;
        for job in self.jobs.values() {
            let t = self.tube(job.tube);
            match job.state {
                JobState::Ready => {
                    ready += 1;
                    assert!(t.ready.contains(&(job.pri, job.id)));
                }
                JobState::Buried => {
                    buried += 1;
                    assert!(t.buried.contains(&(job.seq, job.id)));
                }
                JobState::Delayed => {
                    delayed += 1;
                    assert!(t.delayed.contains(&(job.deadline_at_ns, job.id)));
                }
                JobState::Reserved => {
                    reserved += 1;
                    // A lease held by no session (the job API's) is in the
                    // reservations alone.
                    if let Some(holder) = job.reserver {
                        assert_eq!(self.conns[&holder].reserved_under(job.seq), Some(job.id));
                    }
                    assert!(self
                        .reservations
                        .contains(&(job.deadline_at_ns, job.seq, job.id)));
                }
                JobState::Completed | JobState::Cancelled => {
                    panic!("final job {} is among the live jobs", job.id)
                }
            }
        }
        assert_eq!(self.counters.ready, ready);
        assert_eq!(self.counters.buried, buried);
        assert_eq!(self.delayed_count, delayed);
        // One entry per tube with delayed jobs: its earliest.
        let mut tubes_with_delayed = 0;
        for &tube in self.tube_order.iter().collect::<Vec<_>>().iter() {
            if let Some(&(due, id)) = self.tube(tube).delayed.first() {
                tubes_with_delayed += 1;
                assert!(self.delayed_tubes.contains(&(due, id, tube)));
            }
        }
        assert_eq!(self.delayed_tubes.len(), tubes_with_delayed);
        assert_eq!(self.counters.reserved, reserved);
        assert_eq!(self.reservations.len() as u64, reserved);
        let waiting = self.conns.values().filter(|c| c.wait().is_some()).count() as u64;
        assert_eq!(self.counters.waiting, waiting);
        for &tube in self.tube_order.iter().collect::<Vec<_>>().iter() {
            let t = self.tube(tube);
            assert!(t.refs > 0, "live tube {} has references", t.name);
            if !t.waiting.is_empty() {
                assert!(self.waited_tubes.contains(&tube));
            }
        }
        self.retention.check_invariants(&self.jobs);
        // No blocked reserver may be left next to a job it could take,
        // unless the queue's limits hold it back: at its concurrency, or
        // out of tokens with the next one's timer armed.
        for &tube in &self.waited_tubes {
            let t = self.tube(tube);
            let held = t.limits.as_deref().is_some_and(|l| {
                (l.concurrency > 0 && t.reserved >= u64::from(l.concurrency)) || l.timer_ns != 0
            });
            assert!(
                t.ready.is_empty() || t.pause_ns > 0 || held,
                "tube {} has waiters and ready jobs",
                t.name
            );
        }
        for &(at, tube) in &self.rate_timers {
            let limits = self.tube(tube).limits.as_deref();
            assert_eq!(limits.map(|l| l.timer_ns), Some(at), "armed timer");
        }
    }
}
