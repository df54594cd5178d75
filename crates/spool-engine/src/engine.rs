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

use crate::job::{Job, JobId, JobState};
use crate::metrics::Histogram;
use crate::ms::Ms;
use crate::record::{job_record_log_bytes, JobRecord, LogRecord, RestState};
use crate::snapshot::{
    EngineSnapshot, QueueCounters, QueueSnapshot, RetiredQueueSnapshot, SessionSnapshot,
    SnapshotScope, SNAPSHOT_RESERVED_IDS_MAX,
};

const NS_PER_SEC: u64 = 1_000_000_000;

/// Freed tubes whose job counters are kept, by name, for when the tube comes
/// back: beanstalkd frees a tube as soon as nothing refers to it, and a
/// counter that vanished and restarted at zero with every idle moment would
/// make `rate()` useless. Only the 7 `spool_jobs_*_total` counters are kept
/// (their histograms are dropped and restart empty if the tube returns), so
/// a retired tube costs 7 series in every `/metrics` scrape (a live one
/// costs about 80: counters, gauges and three 20-bucket histograms) and a
/// few hundred bytes of memory (its name and 56 bytes of counters).
///
/// Bounded because clients may cycle through any number of tube names; past
/// it the longest-retired name is forgotten. 256 keeps the worst case at
/// 256 × 7 = 1,792 series (about 100 KiB of exposition text), what some 22
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
    metrics: QueueMetrics,
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
            skew: Histogram::queue_latency(),
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
    Delay,
    Pause,
    /// A blocked reserve's timeout or DEADLINE_SOON: before an expiry at the
    /// same instant, so the waiter hears of it before the job is taken.
    Wait,
    Ttr,
}

#[derive(Debug)]
struct Wait {
    /// When the wait ends with `TIMED_OUT` or `DEADLINE_SOON`, if ever.
    timer_at_ns: Option<u64>,
    /// When the reserve began, for introspection.
    since_ns: u64,
}

#[derive(Debug)]
struct Conn {
    use_tube: TubeId,
    watch: Ms<TubeId>,
    /// Reserved jobs in reservation order.
    reserved: BTreeMap<u64, JobId>,
    /// (deadline, reservation seq): the first is the soonest to expire.
    deadlines: BTreeSet<(u64, u64)>,
    wait: Option<Wait>,
    producer: bool,
    worker: bool,
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
    /// Every delayed job by due time.
    delayed: BTreeSet<(u64, JobId)>,
    /// Every reservation by deadline: (deadline, seq, job).
    reservations: BTreeSet<(u64, u64, JobId)>,
    wait_timers: BTreeSet<(u64, ConnId)>,
    paused: BTreeSet<(u64, TubeId)>,
    /// Tubes with at least one blocked reserver.
    waited_tubes: BTreeSet<TubeId>,
    counters: Counters,
    draining: bool,
    outbox: Vec<(ConnId, Response)>,
    /// Whether durable changes are recorded in `log` (off in memory).
    logging: bool,
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
            delayed: BTreeSet::new(),
            reservations: BTreeSet::new(),
            wait_timers: BTreeSet::new(),
            paused: BTreeSet::new(),
            waited_tubes: BTreeSet::new(),
            counters: Counters::default(),
            draining: false,
            outbox: Vec::new(),
            logging: false,
            log: Vec::new(),
            storage_failed: false,
            live_log_bytes: 0,
            disk_full: false,
            shutting_down: false,
            retired: HashMap::new(),
            retired_order: BTreeMap::new(),
            next_retired_seq: 0,
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
            .filter(|(_, c)| c.wait.is_some())
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

    /// How many jobs `conn` has reserved (0 for an unknown session).
    pub fn reserved_count(&self, conn: ConnId) -> usize {
        self.conns.get(&conn).map_or(0, |c| c.reserved.len())
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

    fn rest_state(delay_ns: u64, now: u64) -> RestState {
        if delay_ns > 0 {
            RestState::Delayed {
                due_ns: now + delay_ns,
            }
        } else {
            RestState::Ready
        }
    }

    /// Applies one logged change while recovering, before any session is
    /// open. Records must come in the order they were logged.
    pub fn replay(&mut self, record: LogRecord) -> Result<(), ReplayError> {
        match record {
            LogRecord::Put(job) => {
                if self.jobs.contains_key(&job.id) {
                    return Err(ReplayError::DuplicateJob(job.id));
                }
                self.replay_job(job, true);
            }
            LogRecord::Snapshot(job) => {
                let replaces = self.jobs.contains_key(&job.id);
                if replaces {
                    self.remove_replayed(job.id);
                }
                self.replay_job(job, !replaces);
            }
            LogRecord::Update { id, pri, state } => {
                // After a compaction the job's Put may be gone; the snapshot
                // that follows holds its state.
                if !self.jobs.contains_key(&id) {
                    return Ok(());
                }
                self.unqueue_replayed(id);
                self.jobs.get_mut(&id).expect("job exists").pri = pri;
                self.place(id, state);
            }
            LogRecord::Delete { id } => {
                if self.jobs.contains_key(&id) {
                    self.remove_replayed(id);
                }
            }
            LogRecord::NextId { id } => self.next_job_id = self.next_job_id.max(id),
        }
        Ok(())
    }

    /// `new`: the job is not already counted in `total-jobs`.
    fn replay_job(&mut self, job: JobRecord, new: bool) {
        let tube = self.find_or_make_tube(&job.tube);
        self.insert_job(
            job.id,
            tube,
            job.pri,
            job.delay_ns,
            job.ttr_ns,
            job.body,
            job.created_at_ns,
        );
        if new {
            self.counters.total_jobs += 1;
            self.tube_mut(tube).total_jobs += 1;
        }
        self.next_job_id = self.next_job_id.max(job.id + 1);
        self.place(job.id, job.state);
    }

    /// Takes a replayed job out of its queue (nothing is reserved while
    /// replaying).
    fn unqueue_replayed(&mut self, id: JobId) {
        let job = &self.jobs[&id];
        let (state, tube, pri, seq, deadline) =
            (job.state, job.tube, job.pri, job.seq, job.deadline_at_ns);
        match state {
            JobState::Ready => self.remove_ready(tube, pri, id),
            JobState::Buried => self.remove_buried(tube, seq, id),
            JobState::Delayed => self.remove_delayed(tube, deadline, id),
            JobState::Reserved => unreachable!("nothing is reserved while replaying"),
        }
    }

    fn remove_replayed(&mut self, id: JobId) {
        self.unqueue_replayed(id);
        self.drop_job(id);
    }

    /// The whole current state of a live job, for compaction. A reserved
    /// job is logged as ready: reservations are not durable.
    pub fn snapshot_record(&self, id: JobId) -> Option<LogRecord> {
        let job = self.jobs.get(&id)?;
        let state = match job.state {
            JobState::Ready | JobState::Reserved => RestState::Ready,
            JobState::Delayed => RestState::Delayed {
                due_ns: job.deadline_at_ns,
            },
            JobState::Buried => RestState::Buried,
        };
        Some(LogRecord::Snapshot(JobRecord {
            id,
            tube: self.tube(job.tube).name.clone(),
            pri: job.pri,
            ttr_ns: job.ttr_ns,
            delay_ns: job.delay_ns,
            created_at_ns: job.created_at_ns,
            state,
            body: job.body.clone(),
        }))
    }

    /// The id the next job will get, as a record: compaction writes it first
    /// so that ids are never reused after the records that used them are
    /// gone.
    pub fn next_id_record(&self) -> LogRecord {
        LogRecord::NextId {
            id: self.next_job_id,
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

    /// Puts a replayed job, in no queue yet, where its record says.
    fn place(&mut self, id: JobId, state: RestState) {
        match state {
            RestState::Ready => self.enqueue(id, 0, 0),
            RestState::Delayed { due_ns } => {
                let job = self.jobs.get_mut(&id).expect("job exists");
                job.state = JobState::Delayed;
                job.deadline_at_ns = due_ns;
                let tube = job.tube;
                self.delayed.insert((due_ns, id));
                self.tube_mut(tube).delayed.insert((due_ns, id));
            }
            RestState::Buried => self.bury(id),
        }
    }

    /// Replies produced since the last call, in the order they were made.
    pub fn take_replies(&mut self) -> Vec<(ConnId, Response)> {
        std::mem::take(&mut self.outbox)
    }

    /// Like [`Engine::take_replies`], reusing the caller's vector.
    pub fn drain_replies_into(&mut self, out: &mut Vec<(ConnId, Response)>) {
        out.append(&mut self.outbox);
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

    /// True while `conn` is blocked in a `reserve`: its next request must
    /// wait until a reply for it appears in the outbox.
    pub fn is_waiting(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_some_and(|c| c.wait.is_some())
    }

    /// Opens a session using and watching the `default` tube. The caller
    /// numbers sessions; an id must not be reused while connected.
    pub fn connect(&mut self, id: ConnId) {
        assert!(
            !self.conns.contains_key(&id),
            "connection {id} is already open"
        );
        let tube = self.default_tube;
        let mut watch = Ms::default();
        watch.push(tube);
        self.incref(tube);
        self.incref(tube);
        let t = self.tube_mut(tube);
        t.using += 1;
        t.watching += 1;
        self.conns.insert(
            id,
            Conn {
                use_tube: tube,
                watch,
                reserved: BTreeMap::new(),
                deadlines: BTreeSet::new(),
                wait: None,
                producer: false,
                worker: false,
            },
        );
        self.counters.current_connections += 1;
        self.counters.total_connections += 1;
    }

    /// Closes a session: a blocked reserve is abandoned and reserved jobs
    /// go back to ready, as when a beanstalkd client hangs up.
    pub fn disconnect(&mut self, conn_id: ConnId, now: u64) {
        self.remove_waiting_conn(conn_id);
        let Some(mut conn) = self.conns.remove(&conn_id) else {
            return;
        };
        self.counters.current_connections -= 1;
        self.counters.producers -= u64::from(conn.producer);
        self.counters.workers -= u64::from(conn.worker);
        for (_, id) in std::mem::take(&mut conn.reserved) {
            self.release_reservation_of(id);
            self.enqueue(id, 0, now);
        }
        // Release watched tubes front first, as beanstalkd's `ms_clear` does:
        // the order decides where freed tubes leave holes in `list-tubes`.
        while let Some(tube) = conn.watch.delete_at(0) {
            self.tube_mut(tube).watching -= 1;
            self.decref(tube);
        }
        self.tube_mut(conn.use_tube).using -= 1;
        self.decref(conn.use_tube);
    }

    /// Ends a blocked reserve with `TIMED_OUT`, as beanstalkd does when the
    /// client closes its sending side while waiting. No-op if not waiting.
    pub fn time_out_wait(&mut self, conn_id: ConnId) {
        if self.is_waiting(conn_id) {
            self.remove_waiting_conn(conn_id);
            self.outbox.push((conn_id, Response::TimedOut));
        }
    }

    /// Runs one beanstalkd command for `conn` (which must be connected and
    /// not waiting). `quit` is the caller's business and is ignored here.
    pub fn execute(&mut self, conn: ConnId, request: Request, now: u64) {
        if !self.conns.contains_key(&conn) {
            return;
        }
        let reply = match request {
            Request::Put(put) => self.cmd_put(conn, put, now),
            Request::Use(name) => self.cmd_use(conn, &name),
            Request::Reserve => {
                self.counters.cmd_reserve += 1;
                self.cmd_reserve(conn, None, now)
            }
            Request::ReserveWithTimeout { timeout_secs } => {
                self.counters.cmd_reserve_with_timeout += 1;
                let timeout = timeout_secs.map(|s| u64::from(s) * NS_PER_SEC);
                self.cmd_reserve(conn, Some(timeout), now)
            }
            Request::ReserveJob(id) => self.cmd_reserve_job(conn, id, now),
            Request::Delete(id) => self.cmd_delete(conn, id, now),
            Request::Release {
                id,
                pri,
                delay_secs,
            } => self.cmd_release(conn, id, pri, u64::from(delay_secs) * NS_PER_SEC, now),
            Request::Bury { id, pri } => self.cmd_bury(conn, id, pri),
            Request::Touch(id) => self.cmd_touch(conn, id, now),
            Request::Watch(name) => self.cmd_watch(conn, &name),
            Request::Ignore(name) => self.cmd_ignore(conn, &name),
            Request::Peek(id) => {
                self.counters.cmd_peek += 1;
                self.found(self.jobs.contains_key(&id).then_some(id))
            }
            Request::PeekReady => {
                self.counters.cmd_peek_ready += 1;
                let t = self.tube(self.conn(conn).use_tube);
                self.found(t.ready.first().map(|&(_, id)| id))
            }
            Request::PeekDelayed => {
                self.counters.cmd_peek_delayed += 1;
                let t = self.tube(self.conn(conn).use_tube);
                self.found(t.delayed.first().map(|&(_, id)| id))
            }
            Request::PeekBuried => {
                self.counters.cmd_peek_buried += 1;
                let t = self.tube(self.conn(conn).use_tube);
                self.found(t.buried.first().map(|&(_, id)| id))
            }
            Request::Kick { bound } => self.cmd_kick(conn, bound, now),
            Request::KickJob(id) => self.cmd_kick_job(id, now),
            Request::StatsJob(id) => {
                self.counters.cmd_stats_job += 1;
                match self.job_stats(id, now) {
                    Some(stats) => Some(Response::StatsJob(Box::new(stats))),
                    None => Some(Response::NotFound),
                }
            }
            Request::StatsTube(name) => {
                self.counters.cmd_stats_tube += 1;
                match self.tube_stats(&name, now) {
                    Some(stats) => Some(Response::StatsTube(Box::new(stats))),
                    None => Some(Response::NotFound),
                }
            }
            Request::Stats => {
                self.counters.cmd_stats += 1;
                Some(Response::Stats(Box::new(self.stats())))
            }
            Request::ListTubes => {
                self.counters.cmd_list_tubes += 1;
                let names = self.tube_order.iter().map(|t| self.tube(t).name.clone());
                Some(Response::TubeList(names.collect()))
            }
            Request::ListTubeUsed => {
                self.counters.cmd_list_tube_used += 1;
                let t = self.tube(self.conn(conn).use_tube);
                Some(Response::Using(t.name.clone()))
            }
            Request::ListTubesWatched => {
                self.counters.cmd_list_tubes_watched += 1;
                let watch = self.conn(conn).watch.iter();
                let names = watch.map(|t| self.tube(t).name.clone()).collect();
                Some(Response::TubeList(names))
            }
            Request::PauseTube { tube, delay_secs } => {
                self.counters.cmd_pause_tube += 1;
                self.cmd_pause_tube(&tube, u64::from(delay_secs) * NS_PER_SEC, now)
            }
            Request::Quit => None,
        };
        if let Some(reply) = reply {
            self.outbox.push((conn, reply));
        }
    }

    /// Runs timers due at `now`: delayed jobs become ready, pauses end,
    /// blocked reserves time out, reservations expire. Returns when it next
    /// has work, if ever.
    pub fn tick(&mut self, now: u64) -> Option<u64> {
        // One timer at a time, earliest first, whatever its kind: a caller
        // that runs late (a busy server) must see the same outcome as one
        // that woke on time. Ties go to the kinds in the order listed.
        loop {
            let due = [
                self.delayed.first().map(|&(at, _)| (at, Timer::Delay)),
                self.paused.first().map(|&(at, _)| (at, Timer::Pause)),
                self.wait_timers.first().map(|&(at, _)| (at, Timer::Wait)),
                // A reservation expires once its deadline has passed
                // (beanstalkd keeps it while `deadline >= now`).
                self.reservations
                    .first()
                    .map(|&(at, _, _)| (at + 1, Timer::Ttr)),
            ]
            .into_iter()
            .flatten()
            .filter(|&(at, _)| at <= now)
            .min();
            let Some((_, timer)) = due else {
                break;
            };
            match timer {
                Timer::Delay => {
                    let (due, id) = self.delayed.pop_first().expect("a delayed job is due");
                    let tube = self.jobs[&id].tube;
                    let t = self.tube_mut(tube);
                    t.delayed.remove(&(due, id));
                    t.metrics.skew.observe_ns(now - due);
                    self.enqueue(id, 0, now);
                }
                Timer::Pause => {
                    let &(_, tube) = self.paused.first().expect("a pause is due");
                    self.unpause(tube);
                    self.process_queue(now);
                }
                Timer::Wait => {
                    let &(_, conn_id) = self.wait_timers.first().expect("a wait is due");
                    let soon = self.deadline_soon(conn_id, now);
                    self.remove_waiting_conn(conn_id);
                    let reply = if soon {
                        Response::DeadlineSoon
                    } else {
                        Response::TimedOut
                    };
                    self.outbox.push((conn_id, reply));
                }
                Timer::Ttr => {
                    let &(_, seq, id) = self.reservations.first().expect("a reservation is due");
                    let job = self.jobs.get_mut(&id).expect("reserved job exists");
                    debug_assert_eq!(job.seq, seq);
                    job.timeouts += 1;
                    job.attempts += 1;
                    let tube = job.tube;
                    self.counters.job_timeouts += 1;
                    self.tube_mut(tube).metrics.counters.timed_out += 1;
                    self.release_reservation_of(id);
                    self.enqueue(id, 0, now);
                }
            }
        }
        self.next_wake()
    }

    /// The earliest time at which [`Engine::tick`] has work.
    pub fn next_wake(&self) -> Option<u64> {
        [
            self.delayed.first().map(|&(at, _)| at),
            self.paused.first().map(|&(at, _)| at),
            self.wait_timers.first().map(|&(at, _)| at),
            self.reservations.first().map(|&(at, _, _)| at + 1),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The `stats` counters. Process fields are left for the caller.
    pub fn stats(&self) -> ServerStats {
        let c = &self.counters;
        ServerStats {
            current_jobs_urgent: c.urgent,
            current_jobs_ready: c.ready,
            current_jobs_reserved: c.reserved,
            current_jobs_delayed: self.delayed.len() as u64,
            current_jobs_buried: c.buried,
            cmd_put: c.cmd_put,
            cmd_peek: c.cmd_peek,
            cmd_peek_ready: c.cmd_peek_ready,
            cmd_peek_delayed: c.cmd_peek_delayed,
            cmd_peek_buried: c.cmd_peek_buried,
            cmd_reserve: c.cmd_reserve,
            cmd_reserve_with_timeout: c.cmd_reserve_with_timeout,
            cmd_delete: c.cmd_delete,
            cmd_release: c.cmd_release,
            cmd_use: c.cmd_use,
            cmd_watch: c.cmd_watch,
            cmd_ignore: c.cmd_ignore,
            cmd_bury: c.cmd_bury,
            cmd_kick: c.cmd_kick,
            cmd_touch: c.cmd_touch,
            cmd_stats: c.cmd_stats,
            cmd_stats_job: c.cmd_stats_job,
            cmd_stats_tube: c.cmd_stats_tube,
            cmd_list_tubes: c.cmd_list_tubes,
            cmd_list_tube_used: c.cmd_list_tube_used,
            cmd_list_tubes_watched: c.cmd_list_tubes_watched,
            cmd_pause_tube: c.cmd_pause_tube,
            job_timeouts: c.job_timeouts,
            total_jobs: c.total_jobs,
            max_job_size: u64::from(self.config.max_job_size),
            current_tubes: self.tube_order.len() as u64,
            current_connections: c.current_connections,
            current_producers: c.producers,
            current_workers: c.workers,
            current_waiting: c.waiting,
            total_connections: c.total_connections,
            draining: self.draining || self.shutting_down,
            process: Default::default(),
        }
    }

    /// What the operating surface shows, at `now`. Costs a pass over tubes,
    /// and over sessions for [`SnapshotScope::Full`] (never over jobs): meant
    /// for scrapes and admin requests, not for every round.
    pub fn snapshot(&self, now: u64, scope: SnapshotScope) -> EngineSnapshot {
        let queues = self
            .tube_order
            .iter()
            .map(|tube| Self::queue_snapshot(self.tube(tube), now))
            .collect();
        let retired_queues = self
            .retired_order
            .values()
            .filter_map(|name| {
                let (_, counters) = self.retired.get(name)?;
                Some(RetiredQueueSnapshot {
                    name: name.to_string(),
                    counters: *counters,
                })
            })
            .collect();
        let sessions = match scope {
            SnapshotScope::Queues => Vec::new(),
            SnapshotScope::Full => self.session_snapshots(now),
        };
        EngineSnapshot {
            now_ns: now,
            jobs_total: self.jobs.len() as u64,
            queues,
            retired_queues,
            sessions,
            draining: self.draining || self.shutting_down,
            shutting_down: self.shutting_down,
            storage_failed: self.storage_failed,
            disk_full: self.disk_full,
            next_job_id: self.next_job_id,
            server: self.stats(),
        }
    }

    /// Every session, by id.
    fn session_snapshots(&self, now: u64) -> Vec<SessionSnapshot> {
        let mut sessions: Vec<SessionSnapshot> = self
            .conns
            .iter()
            .map(|(&conn_id, conn)| SessionSnapshot {
                conn_id,
                tube_used: self.tube(conn.use_tube).name.to_string(),
                watched: conn
                    .watch
                    .iter()
                    .map(|t| self.tube(t).name.to_string())
                    .collect(),
                reserved_job_ids: conn
                    .reserved
                    .values()
                    .take(SNAPSHOT_RESERVED_IDS_MAX)
                    .copied()
                    .collect(),
                reserved_count: conn.reserved.len() as u64,
                blocked_in_reserve_ns: conn.wait.as_ref().map(|w| now.saturating_sub(w.since_ns)),
            })
            .collect();
        sessions.sort_unstable_by_key(|s| s.conn_id);
        sessions
    }

    /// A live tube's snapshot.
    fn queue_snapshot(t: &Tube, now: u64) -> QueueSnapshot {
        QueueSnapshot {
            name: t.name.to_string(),
            ready: t.ready.len() as u64,
            urgent: t.urgent,
            reserved: t.reserved,
            delayed: t.delayed.len() as u64,
            buried: t.buried.len() as u64,
            waiting_reservers: t.waiting.len() as u64,
            using: t.using,
            watching: t.watching,
            // A pause whose end has passed is over even if no tick ran yet.
            paused: t.pause_ns > 0 && t.unpause_at_ns > now,
            total_jobs: t.total_jobs,
            counters: t.metrics.counters,
            wait: t.metrics.wait.clone(),
            run: t.metrics.run.clone(),
            skew: t.metrics.skew.clone(),
        }
    }

    pub fn tube_stats(&self, name: &TubeName, now: u64) -> Option<TubeStats> {
        let t = self.tube(*self.tube_ids.get(name)?);
        Some(TubeStats {
            name: t.name.to_string(),
            current_jobs_urgent: t.urgent,
            current_jobs_ready: t.ready.len() as u64,
            current_jobs_reserved: t.reserved,
            current_jobs_delayed: t.delayed.len() as u64,
            current_jobs_buried: t.buried.len() as u64,
            total_jobs: t.total_jobs,
            current_using: t.using,
            current_watching: t.watching,
            current_waiting: t.waiting.len() as u64,
            cmd_delete: t.cmd_delete,
            cmd_pause_tube: t.cmd_pause_tube,
            pause_secs: t.pause_ns / NS_PER_SEC,
            pause_time_left_secs: if t.pause_ns > 0 {
                time_left_secs(t.unpause_at_ns, now)
            } else {
                0
            },
        })
    }

    pub fn job_stats(&self, id: JobId, now: u64) -> Option<JobStats> {
        let j = self.jobs.get(&id)?;
        let time_left_secs = match j.state {
            JobState::Reserved | JobState::Delayed => time_left_secs(j.deadline_at_ns, now),
            JobState::Ready | JobState::Buried => 0,
        };
        Some(JobStats {
            id,
            tube: self.tube(j.tube).name.to_string(),
            state: j.state.as_str(),
            pri: j.pri,
            age_secs: now.saturating_sub(j.created_at_ns) / NS_PER_SEC,
            delay_secs: j.delay_ns / NS_PER_SEC,
            ttr_secs: j.ttr_ns / NS_PER_SEC,
            time_left_secs,
            file: 0,
            reserves: u64::from(j.reserves),
            timeouts: u64::from(j.timeouts),
            releases: u64::from(j.releases),
            buries: u64::from(j.buries),
            kicks: u64::from(j.kicks),
        })
    }

    // ---- commands -------------------------------------------------------

    fn cmd_put(&mut self, conn_id: ConnId, put: Put, now: u64) -> Option<Response> {
        self.counters.cmd_put += 1;
        let body = match put.body {
            PutBody::TooBig => return Some(Response::JobTooBig),
            PutBody::TrailingBytes => return Some(Response::BadFormat),
            PutBody::MissingCrlf => {
                self.set_producer(conn_id);
                self.next_job_id += 1; // beanstalkd spends the id on the header
                return Some(Response::ExpectedCrlf);
            }
            PutBody::Complete(body) => body,
        };
        self.set_producer(conn_id);
        let id = self.next_job_id;
        self.next_job_id += 1;
        if self.draining || self.shutting_down {
            return Some(Response::Draining);
        }
        if self.storage_failed || self.disk_full {
            return Some(Response::OutOfMemory);
        }
        let tube = self.conn(conn_id).use_tube;
        let delay_ns = u64::from(put.delay_secs) * NS_PER_SEC;
        let ttr_ns = u64::from(put.ttr_secs) * NS_PER_SEC;
        self.insert_job(id, tube, put.pri, delay_ns, ttr_ns, body, now);
        self.counters.total_jobs += 1;
        let t = self.tube_mut(tube);
        t.total_jobs += 1;
        t.metrics.counters.put += 1;
        if self.logging {
            let job = &self.jobs[&id];
            self.log.push(LogRecord::Put(JobRecord {
                id,
                tube: self.tube(tube).name.clone(),
                pri: job.pri,
                ttr_ns: job.ttr_ns,
                delay_ns,
                created_at_ns: now,
                state: Self::rest_state(delay_ns, now),
                body: job.body.clone(),
            }));
        }
        self.enqueue(id, delay_ns, now);
        Some(Response::Inserted(id))
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
        self.live_log_bytes +=
            job_record_log_bytes(self.tube(tube).name.as_str().len(), body.len());
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
                max_attempts: 0,
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
        let job = self.jobs.remove(&id).expect("job exists");
        self.live_log_bytes -=
            job_record_log_bytes(self.tube(job.tube).name.as_str().len(), job.body.len());
        self.decref(job.tube);
    }

    fn cmd_use(&mut self, conn_id: ConnId, name: &TubeName) -> Option<Response> {
        self.counters.cmd_use += 1;
        let tube = self.find_or_make_tube(name);
        self.incref(tube);
        let conn = self.conns.get_mut(&conn_id).expect("connected");
        let old = std::mem::replace(&mut conn.use_tube, tube);
        self.tube_mut(old).using -= 1;
        self.tube_mut(tube).using += 1;
        self.decref(old);
        Some(Response::Using(name.clone()))
    }

    fn cmd_watch(&mut self, conn_id: ConnId, name: &TubeName) -> Option<Response> {
        self.counters.cmd_watch += 1;
        let tube = self.find_or_make_tube(name);
        let conn = self.conns.get_mut(&conn_id).expect("connected");
        if !conn.watch.contains(tube) {
            conn.watch.push(tube);
            self.incref(tube);
            self.tube_mut(tube).watching += 1;
        }
        let count = self.conn(conn_id).watch.len();
        Some(Response::Watching(count))
    }

    fn cmd_ignore(&mut self, conn_id: ConnId, name: &TubeName) -> Option<Response> {
        self.counters.cmd_ignore += 1;
        let found = self
            .conn(conn_id)
            .watch
            .iter()
            .find(|&t| self.tube(t).name == *name);
        if let Some(tube) = found {
            let conn = self.conns.get_mut(&conn_id).expect("connected");
            if conn.watch.len() < 2 {
                return Some(Response::NotIgnored);
            }
            conn.watch.remove(tube);
            self.tube_mut(tube).watching -= 1;
            self.decref(tube);
        }
        Some(Response::Watching(self.conn(conn_id).watch.len()))
    }

    /// `timeout`: `None` for plain `reserve`, `Some(None)` for a negative
    /// (infinite) timeout.
    fn cmd_reserve(
        &mut self,
        conn_id: ConnId,
        timeout: Option<Option<u64>>,
        now: u64,
    ) -> Option<Response> {
        self.set_worker(conn_id);
        if self.shutting_down {
            // No new work, and no reserve may hold a session open.
            return Some(Response::TimedOut);
        }
        if self.deadline_soon(conn_id, now) && !self.conn_ready(conn_id) {
            return Some(Response::DeadlineSoon);
        }
        self.wait_for_job(conn_id, timeout.flatten(), now);
        self.process_queue(now);
        None
    }

    fn cmd_reserve_job(&mut self, conn_id: ConnId, id: JobId, now: u64) -> Option<Response> {
        let Some(job) = self.jobs.get(&id) else {
            return Some(Response::NotFound);
        };
        let (state, tube, key_pri, key_deadline, seq) =
            (job.state, job.tube, job.pri, job.deadline_at_ns, job.seq);
        match state {
            JobState::Ready => self.remove_ready(tube, key_pri, id),
            JobState::Buried => self.remove_buried(tube, seq, id),
            JobState::Delayed => self.remove_delayed(tube, key_deadline, id),
            JobState::Reserved => return Some(Response::NotFound),
        }
        self.set_worker(conn_id);
        self.reserve_job(conn_id, id, now);
        None
    }

    fn cmd_delete(&mut self, conn_id: ConnId, id: JobId, now: u64) -> Option<Response> {
        self.counters.cmd_delete += 1;
        if self.storage_failed {
            return Some(Response::InternalError);
        }
        let Some(job) = self.jobs.get(&id) else {
            return Some(Response::NotFound);
        };
        let (state, tube, pri, deadline, seq, reserver, ttr) = (
            job.state,
            job.tube,
            job.pri,
            job.deadline_at_ns,
            job.seq,
            job.reserver,
            job.ttr_ns,
        );
        match state {
            JobState::Reserved if reserver == Some(conn_id) => {
                self.release_reservation_of(id);
                // The deadline is the reservation (or last touch) plus TTR.
                let reserved_at = deadline.saturating_sub(ttr);
                let run_ns = now.saturating_sub(reserved_at);
                self.tube_mut(tube).metrics.run.observe_ns(run_ns);
            }
            JobState::Reserved => return Some(Response::NotFound),
            JobState::Ready => self.remove_ready(tube, pri, id),
            JobState::Buried => self.remove_buried(tube, seq, id),
            JobState::Delayed => self.remove_delayed(tube, deadline, id),
        }
        let t = self.tube_mut(tube);
        t.cmd_delete += 1;
        t.metrics.counters.deleted += 1;
        self.drop_job(id);
        self.record(|| LogRecord::Delete { id });
        Some(Response::Deleted)
    }

    fn cmd_release(
        &mut self,
        conn_id: ConnId,
        id: JobId,
        pri: u32,
        delay_ns: u64,
        now: u64,
    ) -> Option<Response> {
        self.counters.cmd_release += 1;
        if let Err(refusal) = self.take_back(conn_id, id) {
            return Some(refusal);
        }
        let job = self.jobs.get_mut(&id).expect("job exists");
        job.pri = pri;
        job.delay_ns = delay_ns;
        job.releases += 1;
        let tube = job.tube;
        self.tube_mut(tube).metrics.counters.released += 1;
        self.record(|| LogRecord::Update {
            id,
            pri,
            state: Self::rest_state(delay_ns, now),
        });
        self.enqueue(id, delay_ns, now);
        Some(Response::Released)
    }

    fn cmd_bury(&mut self, conn_id: ConnId, id: JobId, pri: u32) -> Option<Response> {
        self.counters.cmd_bury += 1;
        if let Err(refusal) = self.take_back(conn_id, id) {
            return Some(refusal);
        }
        let job = self.jobs.get_mut(&id).expect("job exists");
        job.pri = pri;
        let tube = job.tube;
        self.tube_mut(tube).metrics.counters.buried += 1;
        self.bury(id);
        self.record(|| LogRecord::Update {
            id,
            pri,
            state: RestState::Buried,
        });
        Some(Response::Buried)
    }

    fn cmd_touch(&mut self, conn_id: ConnId, id: JobId, now: u64) -> Option<Response> {
        self.counters.cmd_touch += 1;
        if !self.is_reserved_by(id, conn_id) {
            return Some(Response::NotFound);
        }
        let job = self.jobs.get_mut(&id).expect("job exists");
        let (old, seq) = (job.deadline_at_ns, job.seq);
        job.deadline_at_ns = now + job.ttr_ns;
        job.version += 1;
        let new = job.deadline_at_ns;
        let conn = self.conns.get_mut(&conn_id).expect("connected");
        conn.deadlines.remove(&(old, seq));
        conn.deadlines.insert((new, seq));
        self.reservations.remove(&(old, seq, id));
        self.reservations.insert((new, seq, id));
        Some(Response::Touched)
    }

    fn cmd_kick(&mut self, conn_id: ConnId, bound: u32, now: u64) -> Option<Response> {
        self.counters.cmd_kick += 1;
        if self.storage_failed {
            return Some(Response::InternalError);
        }
        let tube = self.conn(conn_id).use_tube;
        let from_buried = !self.tube(tube).buried.is_empty();
        let mut kicked = 0;
        while kicked < bound {
            let t = self.tube(tube);
            let next = if from_buried {
                t.buried.first().map(|&(_, id)| id)
            } else {
                t.delayed.first().map(|&(_, id)| id)
            };
            let Some(id) = next else { break };
            self.kick(id, now);
            kicked += 1;
        }
        Some(Response::Kicked(kicked))
    }

    fn cmd_kick_job(&mut self, id: JobId, now: u64) -> Option<Response> {
        if self.storage_failed {
            return Some(Response::InternalError);
        }
        match self.jobs.get(&id).map(|j| j.state) {
            Some(JobState::Buried | JobState::Delayed) => {
                self.kick(id, now);
                Some(Response::KickedJob)
            }
            _ => Some(Response::NotFound),
        }
    }

    fn cmd_pause_tube(&mut self, name: &TubeName, delay_ns: u64, now: u64) -> Option<Response> {
        let Some(&tube) = self.tube_ids.get(name) else {
            return Some(Response::NotFound);
        };
        // A positive length keeps the end of the pause an event that wakes
        // blocked reservers. A pause of 0 ends at `now`: beanstalkd pauses
        // 1 ns and reads its clock per command, so the next command (in the
        // same round here, which shares `now`) finds the tube unpaused.
        let t = self.tube_mut(tube);
        let old = (t.pause_ns > 0).then_some(t.unpause_at_ns);
        t.pause_ns = delay_ns.max(1);
        t.unpause_at_ns = now + delay_ns;
        t.cmd_pause_tube += 1;
        if let Some(old) = old {
            self.paused.remove(&(old, tube));
        }
        self.paused.insert((now + delay_ns, tube));
        Some(Response::Paused)
    }

    fn found(&self, id: Option<JobId>) -> Option<Response> {
        Some(match id.and_then(|id| self.jobs.get(&id)) {
            Some(job) => Response::Found {
                id: job.id,
                body: job.body.clone(),
            },
            None => Response::NotFound,
        })
    }

    // ---- state transitions ---------------------------------------------

    /// Puts a job that is in no queue into ready (`delay_ns == 0`) or
    /// delayed, then hands ready jobs to blocked reservers.
    fn enqueue(&mut self, id: JobId, delay_ns: u64, now: u64) {
        let job = self.jobs.get_mut(&id).expect("job exists");
        job.reserver = None;
        job.version += 1;
        let (tube, pri) = (job.tube, job.pri);
        if delay_ns > 0 {
            job.deadline_at_ns = now + delay_ns;
            job.state = JobState::Delayed;
            let due = job.deadline_at_ns;
            self.delayed.insert((due, id));
            self.tube_mut(tube).delayed.insert((due, id));
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
        }
        self.process_queue(now);
    }

    fn bury(&mut self, id: JobId) {
        let seq = self.next_seq();
        let job = self.jobs.get_mut(&id).expect("job exists");
        job.state = JobState::Buried;
        job.reserver = None;
        job.seq = seq;
        job.buries += 1;
        job.version += 1;
        let tube = job.tube;
        self.tube_mut(tube).buried.insert((seq, id));
        self.counters.buried += 1;
    }

    fn kick(&mut self, id: JobId, now: u64) {
        let job = &self.jobs[&id];
        let (state, tube, seq, deadline) = (job.state, job.tube, job.seq, job.deadline_at_ns);
        match state {
            JobState::Buried => self.remove_buried(tube, seq, id),
            JobState::Delayed => self.remove_delayed(tube, deadline, id),
            JobState::Ready | JobState::Reserved => return,
        }
        let job = self.jobs.get_mut(&id).expect("job exists");
        job.kicks += 1;
        let pri = job.pri;
        self.tube_mut(tube).metrics.counters.kicked += 1;
        self.record(|| LogRecord::Update {
            id,
            pri,
            state: RestState::Ready,
        });
        self.enqueue(id, 0, now);
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

    fn remove_delayed(&mut self, tube: TubeId, deadline: u64, id: JobId) {
        let removed = self.tube_mut(tube).delayed.remove(&(deadline, id));
        debug_assert!(removed, "job {id} was in its tube's delay set");
        self.delayed.remove(&(deadline, id));
    }

    /// For release and bury: takes a job back from `conn`, which must hold
    /// it; the job is then in no queue until the caller puts it somewhere.
    fn take_back(&mut self, conn_id: ConnId, id: JobId) -> Result<(), Response> {
        if self.storage_failed {
            return Err(Response::InternalError);
        }
        if !self.is_reserved_by(id, conn_id) {
            return Err(Response::NotFound);
        }
        self.release_reservation_of(id);
        Ok(())
    }

    fn is_reserved_by(&self, id: JobId, conn: ConnId) -> bool {
        self.jobs
            .get(&id)
            .is_some_and(|j| j.state == JobState::Reserved && j.reserver == Some(conn))
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
            conn.reserved.remove(&seq);
            conn.deadlines.remove(&(deadline, seq));
        }
        self.tube_mut(tube).reserved -= 1;
        self.counters.reserved -= 1;
    }

    /// Hands a job that is in no queue (but still says the state it was
    /// taken from) to `conn`.
    fn reserve_job(&mut self, conn_id: ConnId, id: JobId, now: u64) {
        let seq = self.next_seq();
        let job = self.jobs.get_mut(&id).expect("job exists");
        let waited_ns =
            (job.state == JobState::Ready).then(|| now.saturating_sub(job.deadline_at_ns));
        let tube = job.tube;
        job.deadline_at_ns = now + job.ttr_ns;
        job.state = JobState::Reserved;
        job.reserver = Some(conn_id);
        job.reserves += 1;
        job.seq = seq;
        job.version += 1;
        let (deadline, body) = (job.deadline_at_ns, job.body.clone());
        let t = self.tube_mut(tube);
        t.reserved += 1;
        t.metrics.counters.reserved += 1;
        if let Some(waited_ns) = waited_ns {
            t.metrics.wait.observe_ns(waited_ns);
        }
        self.counters.reserved += 1;
        self.reservations.insert((deadline, seq, id));
        let conn = self.conns.get_mut(&conn_id).expect("connected");
        conn.reserved.insert(seq, id);
        conn.deadlines.insert((deadline, seq));
        self.outbox.push((conn_id, Response::Reserved { id, body }));
    }

    /// Hands ready jobs to blocked reservers, best job first, until no
    /// unpaused tube has both.
    fn process_queue(&mut self, now: u64) {
        loop {
            let mut best: Option<(u32, JobId, TubeId)> = None;
            let mut unpaused = Vec::new();
            for &tube in &self.waited_tubes {
                let t = self.tubes[tube.0 as usize].as_ref().expect("live tube");
                if t.pause_ns > 0 {
                    if t.unpause_at_ns > now {
                        continue;
                    }
                    unpaused.push(tube);
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
        let t = self.tube_mut(tube);
        let at = t.unpause_at_ns;
        t.pause_ns = 0;
        self.paused.remove(&(at, tube));
    }

    fn wait_for_job(&mut self, conn_id: ConnId, timeout_ns: Option<u64>, now: u64) {
        let conn = self.conns.get_mut(&conn_id).expect("connected");
        let soon_at = conn
            .deadlines
            .first()
            .map(|&(d, _)| d.saturating_sub(DEADLINE_SAFETY_MARGIN_NS));
        let timeout_at = timeout_ns.map(|t| now.saturating_add(t));
        let timer_at_ns = match (soon_at, timeout_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        conn.wait = Some(Wait {
            timer_at_ns,
            since_ns: now,
        });
        let watch: Vec<TubeId> = conn.watch.iter().collect();
        if let Some(at) = timer_at_ns {
            self.wait_timers.insert((at, conn_id));
        }
        self.counters.waiting += 1;
        for tube in watch {
            self.tube_mut(tube).waiting.push(conn_id);
            self.waited_tubes.insert(tube);
        }
    }

    fn remove_waiting_conn(&mut self, conn_id: ConnId) {
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return;
        };
        let Some(wait) = conn.wait.take() else {
            return;
        };
        if let Some(at) = wait.timer_at_ns {
            self.wait_timers.remove(&(at, conn_id));
        }
        self.counters.waiting -= 1;
        let watch: Vec<TubeId> = conn.watch.iter().collect();
        for tube in watch {
            let t = self.tube_mut(tube);
            t.waiting.remove(conn_id);
            if t.waiting.is_empty() {
                self.waited_tubes.remove(&tube);
            }
        }
    }

    fn deadline_soon(&self, conn_id: ConnId, now: u64) -> bool {
        self.conn(conn_id)
            .deadlines
            .first()
            .is_some_and(|&(d, _)| now >= d.saturating_sub(DEADLINE_SAFETY_MARGIN_NS))
    }

    fn conn_ready(&self, conn_id: ConnId) -> bool {
        self.conn(conn_id)
            .watch
            .iter()
            .any(|t| !self.tube(t).ready.is_empty())
    }

    fn set_producer(&mut self, conn_id: ConnId) {
        let conn = self.conns.get_mut(&conn_id).expect("connected");
        if !conn.producer {
            conn.producer = true;
            self.counters.producers += 1;
        }
    }

    fn set_worker(&mut self, conn_id: ConnId) {
        let conn = self.conns.get_mut(&conn_id).expect("connected");
        if !conn.worker {
            conn.worker = true;
            self.counters.workers += 1;
        }
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
            metrics,
        });
        self.tube_order.push(TubeId(slot));
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
                    assert!(self.delayed.contains(&(job.deadline_at_ns, job.id)));
                }
                JobState::Reserved => {
                    reserved += 1;
                    let conn = &self.conns[&job.reserver.expect("reserved job has a reserver")];
                    assert_eq!(conn.reserved.get(&job.seq), Some(&job.id));
                    assert!(self
                        .reservations
                        .contains(&(job.deadline_at_ns, job.seq, job.id)));
                }
            }
        }
        assert_eq!(self.counters.ready, ready);
        assert_eq!(self.counters.buried, buried);
        assert_eq!(self.delayed.len(), delayed);
        assert_eq!(self.counters.reserved, reserved);
        assert_eq!(self.reservations.len() as u64, reserved);
        let waiting = self.conns.values().filter(|c| c.wait.is_some()).count() as u64;
        assert_eq!(self.counters.waiting, waiting);
        for &tube in self.tube_order.iter().collect::<Vec<_>>().iter() {
            let t = self.tube(tube);
            assert!(t.refs > 0, "live tube {} has references", t.name);
            if !t.waiting.is_empty() {
                assert!(self.waited_tubes.contains(&tube));
            }
        }
        // No blocked reserver may be left next to a job it could take.
        for &tube in &self.waited_tubes {
            let t = self.tube(tube);
            assert!(
                t.ready.is_empty() || t.pause_ns > 0,
                "tube {} has waiters and ready jobs",
                t.name
            );
        }
    }
}
