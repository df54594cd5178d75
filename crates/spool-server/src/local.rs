//! The local broker: one task owns the [`Engine`]; sessions talk to it over
//! a channel.
//!
//! There is no lock around the engine. Connection tasks send batches of
//! requests; the engine task wakes, takes every message waiting in the
//! channel, executes them all, runs timers, and hands each session its
//! replies through a mailbox. Under load one wake-up serves many connections.
//! A request that finds the engine idle (nothing for
//! [`INLINE_AFTER_IDLE_NS`]) is run at once instead: the connection polls
//! the engine task's future itself, on the engine's thread, so its reply
//! goes out before the next ready connection is read (see [`SharedEngine`]).
//!
//! With a write-ahead log the same round is the unit of group commit: the
//! durable changes of a round go to the log thread as one batch. A reply
//! waits only for what it depends on: one that acknowledges a change (or
//! says a job is not found) waits for the commit of every round sent so far;
//! one that hands out or shows a job (`RESERVED`, `FOUND`, `stats-job`) waits for the
//! commit of that job's last change; every reply waits behind the earlier
//! replies of its own session. Anything else (a reserve of a job whose put
//! is long on disk, `stats`, `use`) goes out at once, so a worker is not
//! made to wait for producers' fsyncs.
//!
//! For the operating surface the engine task also answers snapshot requests
//! (through a oneshot, in the round the request arrives), keeps the health
//! flags that probes read without asking it, and runs the broker's side of
//! a graceful shutdown: once it has begun, every round closes the sessions
//! that hold no reserved job and have nothing in progress.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};

use spool_broker::{Broker, BrokerError, BrokerHealth, Clock, Leased, Op, Outcome, Peer, Session};
use spool_engine::{ConnId, Engine, EngineSnapshot, IdHasher, LogRecord, SnapshotScope};
use spool_proto::{Request, Response, TubeName};
use tokio::sync::{mpsc, oneshot};

use crate::connections::lock;
use crate::durable::SharedStorageStats;
use crate::limits::JOB_WAITS_MAX;
use crate::process::ProcessInfo;

/// Messages the engine task handles in one wake-up before it runs timers and
/// delivers replies; bounds the latency one busy wake-up can add.
const MESSAGES_PER_ROUND_MAX: usize = 4096;

/// A round that has run this long since it last ran the engine's timers
/// runs them between its sessions and between its operations too, so that
/// a busy engine fires a due timer within about this much (plus one
/// session's pipelined requests or one operation) instead of at the end of
/// the round. Long enough that a round pays one clock read per session and
/// operation, nothing more, in the common case.
const TIMER_CHECK_AFTER_NS: u64 = 200_000;

/// Deliveries a round's buffer keeps room for between rounds: reused, it
/// spares every round an allocation and its growth; a burst larger than
/// this gives the rest back.
const ROUND_DELIVERIES_KEPT_MAX: usize = 4096;

/// Engine time 0 on the wall clock: 2020-01-01T00:00:00Z, in nanoseconds
/// since the Unix epoch. A fixed origin (not the process start) lets the
/// instants of earlier runs (a job's creation, its finish) come back from
/// the log exactly instead of being clamped to this run's start.
pub const ENGINE_EPOCH_WALL_NS: u64 = 1_577_836_800_000_000_000;

/// The engine's clock: nanoseconds since [`ENGINE_EPOCH_WALL_NS`] on the
/// wall clock, read once at start and advanced by a monotonic clock after
/// that (so a wall-clock step never moves a timer).
pub fn engine_clock() -> Clock {
    Clock::wall_since(ENGINE_EPOCH_WALL_NS)
}

/// A manual engine clock standing at `now_ns` since
/// [`ENGINE_EPOCH_WALL_NS`]: tests control time with it (no sleeps for
/// TTRs, backoffs or retention) through [`LocalBroker::advance_clock`].
pub fn manual_engine_clock(now_ns: u64) -> Clock {
    Clock::manual_since(ENGINE_EPOCH_WALL_NS, now_ns)
}

/// Snapshot records the engine task adds to one round while compacting:
/// enough to finish a million jobs in about a thousand rounds, little enough
/// that no round stalls the connections waiting behind it.
const COMPACTION_RECORDS_PER_ROUND: usize = 1024;

/// What the engine task sends the log thread, in order.
#[derive(Debug)]
pub enum LogMsg {
    /// Durable changes of one round, and how many jobs live after it.
    Batch {
        round: u64,
        records: Vec<LogRecord>,
        live_jobs: u64,
    },
    /// Start a new segment: the cut. Snapshot records of every live job
    /// follow (in later batches), then `EndCompaction`.
    BeginCompaction,
    /// The snapshot is complete: sync it and delete the segments before the
    /// cut.
    EndCompaction,
}

/// The log thread's answer: every batch up to `round` is as durable as the
/// fsync policy promises, or the log failed and accepts nothing more.
#[derive(Debug)]
pub enum CommitAck {
    Committed {
        round: u64,
        /// Bytes in the log's segment files now.
        log_bytes: u64,
    },
    Failed {
        error: String,
    },
    /// The disk is full (puts must be refused) or has room again.
    DiskFull(bool),
}

/// Where the engine task's log records go.
#[derive(Debug)]
pub enum LogSink {
    /// A log thread that group-commits (`fsync always`).
    Thread(LogLink),
    /// Written by the engine task itself (`fsync interval` and `never`).
    Inline(Box<crate::durable::InlineLog>),
}

impl LogSink {
    fn compaction_min_log_bytes(&self) -> u64 {
        match self {
            LogSink::Thread(link) => link.compaction_min_log_bytes,
            LogSink::Inline(log) => log.compaction_min_log_bytes(),
        }
    }

    fn stats(&self) -> &crate::durable::SharedStorageStats {
        match self {
            LogSink::Thread(link) => &link.stats,
            LogSink::Inline(log) => log.stats(),
        }
    }

    /// Hands a message on; acknowledgements that are already known (all of
    /// them, when inline) go to `acks`. False if the log thread is gone.
    fn send(&mut self, message: LogMsg, acks: &mut Vec<CommitAck>) -> bool {
        match self {
            LogSink::Thread(link) => link.messages.send(message).is_ok(),
            LogSink::Inline(log) => {
                log.submit(message, acks);
                true
            }
        }
    }
}

/// The two ends of the engine task's link to a log thread.
#[derive(Debug)]
pub struct LogLink {
    pub messages: std::sync::mpsc::Sender<LogMsg>,
    pub acks: mpsc::UnboundedReceiver<CommitAck>,
    /// Compaction starts when the log holds more than twice the live jobs'
    /// records and more than this (one segment: below it there is no old
    /// segment to delete).
    pub compaction_min_log_bytes: u64,
    /// The log thread's figures, reported in `stats` as beanstalkd's
    /// `binlog-*` fields.
    pub stats: crate::durable::SharedStorageStats,
}

/// Sent for every batch of requests: kept small (checked in a test).
enum Msg {
    Open {
        id: ConnId,
        mailbox: Arc<Mailbox>,
    },
    Submit {
        id: ConnId,
        requests: Vec<Request>,
    },
    Hangup {
        id: ConnId,
    },
    Close {
        id: ConnId,
    },
    SetDraining(bool),
    Snapshot(SnapshotScope, oneshot::Sender<EngineSnapshot>),
    BeginShutdown,
    /// One job-API operation, where its answer goes, and the engine time it
    /// was sent at (a reserve's timeout counts from then). Boxed: every
    /// message is as large as the largest, and the beanstalkd path sends
    /// many small ones.
    Op(Box<(Op, Answer, u64)>),
    /// A manual clock moved: run timers.
    Tick,
}

/// Where a job-API operation's answer goes.
type Answer = oneshot::Sender<Result<Outcome, BrokerError>>;

/// A job-API reserve waiting for jobs.
#[derive(Debug)]
struct ParkedReserve {
    queues: Vec<TubeName>,
    batch: u32,
    /// Engine time it answers empty at.
    until_ns: u64,
    answer: Answer,
}

/// Whether a job wait ends at this state: final, or buried (dead until
/// someone kicks it).
fn settled(state: spool_broker::JobState) -> bool {
    state.is_final() || state == spool_broker::JobState::Buried
}

/// A job wait (`Op::Wait`) held until its job settles (completed,
/// cancelled or buried) or its time is up.
#[derive(Debug)]
struct JobWait {
    id: u64,
    /// Engine time it answers with the job as it is.
    until_ns: u64,
    answer: Answer,
}

/// The health flags: written by the engine task (and by the broker handle
/// for the flags it sets itself, so that they read true at once), read by
/// [`Broker::health`] from any thread.
#[derive(Debug, Default)]
struct HealthFlags {
    /// Set once: a failed log stays failed until restart.
    storage_failed: OnceLock<String>,
    disk_full: AtomicBool,
    draining: AtomicBool,
    shutting_down: AtomicBool,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

/// Where the engine task leaves a session's replies.
#[derive(Debug, Default)]
struct Mailbox {
    inner: Mutex<Inbox>,
}

#[derive(Debug, Default)]
struct Inbox {
    replies: Vec<Response>,
    closed: bool,
    /// The connection task waiting for replies, if it is waiting.
    waker: Option<Waker>,
}

impl Mailbox {
    fn lock(&self) -> MutexGuard<'_, Inbox> {
        lock(&self.inner)
    }

    fn wake(&self) {
        let waker = self.lock().waker.take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// A reply or the end of a session, on its way to a mailbox; or a job-API
/// answer on its way to its caller.
#[derive(Debug)]
enum Delivery {
    Reply(Arc<Mailbox>, Response),
    Close(Arc<Mailbox>),
    /// Boxed: the beanstalkd path moves many deliveries, few answers.
    Answer(Box<(Answer, Result<Outcome, BrokerError>)>),
}

/// What a delivery must wait for before the client may see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Nothing durable: only the session's earlier replies.
    Nothing,
    /// Every round sent to the log so far: the reply acknowledges a change,
    /// or says a job is gone, which may be a change still in flight.
    Commit,
    /// The last uncommitted change of this job, if any: the reply hands out
    /// or shows it.
    Job(u64),
}

impl Need {
    fn of(response: &Response) -> Need {
        match response {
            Response::Inserted(_)
            | Response::BuriedId(_)
            | Response::Deleted
            | Response::Released
            | Response::Buried
            | Response::Kicked(_)
            | Response::KickedJob
            | Response::NotFound => Need::Commit,
            Response::Reserved { id, .. } | Response::Found { id, .. } => Need::Job(*id),
            Response::StatsJob(stats) => Need::Job(stats.id),
            _ => Need::Nothing,
        }
    }
}

/// A delivery of this round, with whose it is and what it waits for.
#[derive(Debug)]
struct Outgoing {
    conn: ConnId,
    need: Need,
    delivery: Delivery,
}

/// Deliveries waiting for the commit of one round, and the jobs that round
/// changed.
#[derive(Debug)]
struct HeldRound {
    round: u64,
    deliveries: Vec<Delivery>,
    jobs: Vec<u64>,
}

/// The job a log record changes; None for records that change no job's
/// state (compaction snapshots rewrite what is already there).
fn changed_jobs(record: &LogRecord, out: &mut Vec<u64>) {
    match record {
        LogRecord::Put(job) => out.push(job.id),
        LogRecord::Job(full) => out.push(full.job.id),
        LogRecord::Change(change) => out.push(change.id),
        LogRecord::Update { id, .. } | LogRecord::Delete { id } => out.push(*id),
        LogRecord::Batch(records) => {
            for record in records {
                changed_jobs(record, out);
            }
        }
        // An update through the job API is logged as a snapshot outside
        // compaction too: its job counts as changed. A compaction's
        // snapshots rewrite what is there; counting them only makes a
        // reply wait for the round it was in anyway.
        LogRecord::JobSnapshot(full) => out.push(full.job.id),
        LogRecord::Snapshot(_)
        | LogRecord::NextId { .. }
        | LogRecord::Queue(_)
        | LogRecord::Workflow(_)
        | LogRecord::WorkflowProgress(_)
        | LogRecord::WorkflowDelete { .. }
        | LogRecord::WorkflowNextId { .. }
        | LogRecord::Schedule(_)
        | LogRecord::ScheduleDeleted { .. } => {}
    }
}

/// How long the engine must have been idle (not polled) for a request to
/// run in a round of its own, inline, rather than wait for the engine
/// task's next round: a loopback client's round trip takes tens of
/// microseconds, so an engine idle this long is waiting on its clients, and
/// answering each request as it arrives lets a client work on one reply
/// while the next connection is read. Under load the engine's rounds come
/// back to back and keep batching every ready connection's requests.
/// Measured (in memory, one-thread client, `spool bench`): 4 producers
/// 44-48k -> 77k puts/s, 4 consumers 42-46k -> 78-83k jobs/s; at 8
/// connections and pipeline 32 the same as without (5 us also cost mixed
/// p1 a few percent, 30 us kept less of the gain).
const INLINE_AFTER_IDLE_NS: u64 = 15_000;

/// The engine task's future.
type EngineFuture = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// The engine task's future, shared so that a connection on the engine's
/// own thread can run a round right after it submits, when the engine was
/// idle ([`INLINE_AFTER_IDLE_NS`]): its replies then go out before the
/// next ready connection is read, instead of every ready connection being
/// read first and all answered together (the client, woken once for them
/// all, then sends the next requests together, and the two take turns
/// instead of overlapping). The task that owns it otherwise (its driver)
/// polls it when woken, as before; whoever polls, it is polled with the
/// driver's waker, so its timers and channels wake the driver.
struct SharedEngine {
    future: Mutex<Option<EngineFuture>>,
    /// The driver's waker, from its last poll.
    waker: Mutex<Option<Waker>>,
    /// The thread of the current-thread runtime the driver runs on; `None`
    /// on a multi-thread runtime (no inline rounds: any thread may hold it).
    thread: Option<std::thread::ThreadId>,
    /// When the engine was last polled, in ns from `epoch`.
    last_poll_ns: AtomicU64,
    epoch: std::time::Instant,
}

impl std::fmt::Debug for SharedEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedEngine")
    }
}

impl SharedEngine {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Polls the engine future with `cx` and notes when.
    fn poll_engine(&self, engine: &mut EngineFuture, cx: &mut Context<'_>) -> Poll<()> {
        let polled = engine.as_mut().poll(cx);
        self.last_poll_ns.store(self.now_ns(), Ordering::Relaxed);
        polled
    }

    /// Polls the engine here and now, with the driver's waker, if this is
    /// its thread, it was idle and nobody is polling it: it runs a round
    /// with what is waiting.
    fn run_inline(&self) {
        if self.thread != Some(std::thread::current().id()) {
            return;
        }
        let idle_ns = self
            .now_ns()
            .saturating_sub(self.last_poll_ns.load(Ordering::Relaxed));
        if idle_ns < INLINE_AFTER_IDLE_NS {
            return;
        }
        let Some(waker) = lock(&self.waker).clone() else {
            return;
        };
        let Ok(mut slot) = self.future.try_lock() else {
            return;
        };
        if let Some(engine) = slot.as_mut() {
            if self
                .poll_engine(engine, &mut Context::from_waker(&waker))
                .is_ready()
            {
                *slot = None;
                // The driver ends on its next poll.
                waker.wake();
            }
        }
    }
}

/// Polls the shared engine future as its own task.
struct EngineDriver(Arc<SharedEngine>);

impl Drop for EngineDriver {
    /// The engine ends with its task, as when the task owned it: a runtime
    /// dropped at shutdown drops the engine and with it the log's sender,
    /// so the log thread makes its last sync and ends (the broker's handles,
    /// which keep the shared slot alive, must not keep the engine alive).
    fn drop(&mut self) {
        let engine = lock(&self.0.future).take();
        drop(engine);
    }
}

impl Future for EngineDriver {
    type Output = ();

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let shared = &self.0;
        {
            let mut waker = lock(&shared.waker);
            match waker.as_mut() {
                Some(w) => w.clone_from(cx.waker()),
                None => *waker = Some(cx.waker().clone()),
            }
        }
        let mut slot = lock(&shared.future);
        let Some(engine) = slot.as_mut() else {
            return Poll::Ready(());
        };
        let polled = shared.poll_engine(engine, cx);
        if polled.is_ready() {
            *slot = None;
        }
        polled
    }
}

/// A [`Broker`] backed by an in-process engine. Cheap to clone.
#[derive(Clone, Debug)]
pub struct LocalBroker {
    tx: mpsc::UnboundedSender<Msg>,
    engine: Arc<SharedEngine>,
    next_id: Arc<AtomicU64>,
    health: Arc<HealthFlags>,
    storage: Option<SharedStorageStats>,
    clock: Clock,
}

impl LocalBroker {
    /// Starts the engine task on the current tokio runtime. With `log`, the
    /// engine must have logging enabled and replies wait for commits.
    pub fn start(
        mut engine: Engine,
        clock: Clock,
        log: Option<LogSink>,
        process: ProcessInfo,
    ) -> LocalBroker {
        let (tx, rx) = mpsc::unbounded_channel();
        let health = Arc::new(HealthFlags::default());
        let storage = log.as_ref().map(|sink| sink.stats().clone());
        engine.set_epoch_ns(clock.epoch_ns());
        // Leases of this life above every lease of the previous one.
        engine.set_seq_floor(clock.now_ns());
        let task = EngineTask::new(engine, clock.clone(), log, process, health.clone());
        let current_thread = tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::CurrentThread;
        let shared = Arc::new(SharedEngine {
            future: Mutex::new(Some(Box::pin(task.run(rx)))),
            waker: Mutex::new(None),
            thread: current_thread.then(|| std::thread::current().id()),
            last_poll_ns: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
        });
        tokio::spawn(EngineDriver(shared.clone()));
        LocalBroker {
            tx,
            engine: shared,
            next_id: Arc::new(AtomicU64::new(1)),
            health,
            storage,
            clock,
        }
    }

    /// Moves a manual clock (see [`manual_engine_clock`]) forward and runs the
    /// timers that came due; operations sent after this see them done.
    pub fn advance_clock(&self, ns: u64) {
        self.clock.advance(ns);
        let _ = self.tx.send(Msg::Tick);
    }

    /// The log's figures (commits, fsync latency, segments), or `None` when
    /// jobs are kept in memory only.
    pub fn storage_stats(&self) -> Option<SharedStorageStats> {
        self.storage.clone()
    }
}

impl Broker for LocalBroker {
    type Session = LocalSession;

    fn open_session(&self, _peer: Peer) -> Result<LocalSession, BrokerError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mailbox = Arc::new(Mailbox::default());
        self.tx
            .send(Msg::Open {
                id,
                mailbox: mailbox.clone(),
            })
            .map_err(|_| BrokerError::Closed)?;
        Ok(LocalSession {
            id,
            tx: self.tx.clone(),
            mailbox,
            engine: self.engine.clone(),
        })
    }

    fn set_draining(&self, draining: bool) {
        self.health.draining.store(draining, Ordering::Relaxed);
        let _ = self.tx.send(Msg::SetDraining(draining));
    }

    fn snapshot(
        &self,
        scope: SnapshotScope,
    ) -> impl Future<Output = Result<EngineSnapshot, BrokerError>> + Send {
        let (reply_tx, reply_rx) = oneshot::channel();
        let sent = self.tx.send(Msg::Snapshot(scope, reply_tx)).is_ok();
        async move {
            if !sent {
                return Err(BrokerError::Closed);
            }
            reply_rx.await.map_err(|_| BrokerError::Closed)
        }
    }

    fn health(&self) -> BrokerHealth {
        let flags = &self.health;
        let shutting_down = flags.shutting_down.load(Ordering::Relaxed);
        BrokerHealth {
            storage_failed: flags.storage_failed.get().cloned(),
            disk_full: flags.disk_full.load(Ordering::Relaxed),
            draining: shutting_down || flags.draining.load(Ordering::Relaxed),
            shutting_down,
        }
    }

    fn begin_shutdown(&self) {
        self.health.shutting_down.store(true, Ordering::Relaxed);
        let _ = self.tx.send(Msg::BeginShutdown);
    }

    fn call(&self, op: Op) -> impl Future<Output = Result<Outcome, BrokerError>> + Send {
        let (answer, answered) = oneshot::channel();
        let sent = self
            .tx
            .send(Msg::Op(Box::new((op, answer, self.clock.now_ns()))))
            .is_ok();
        async move {
            if !sent {
                return Err(BrokerError::Closed);
            }
            answered.await.map_err(|_| BrokerError::Closed)?
        }
    }
}

#[derive(Debug)]
pub struct LocalSession {
    id: ConnId,
    tx: mpsc::UnboundedSender<Msg>,
    mailbox: Arc<Mailbox>,
    engine: Arc<SharedEngine>,
}

impl Session for LocalSession {
    fn id(&self) -> u64 {
        self.id
    }

    fn submit(&mut self, requests: Vec<Request>) -> Result<(), BrokerError> {
        self.tx
            .send(Msg::Submit {
                id: self.id,
                requests,
            })
            .map_err(|_| BrokerError::Closed)?;
        self.engine.run_inline();
        Ok(())
    }

    fn hangup(&mut self) {
        let _ = self.tx.send(Msg::Hangup { id: self.id });
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>, out: &mut Vec<Response>) -> Poll<bool> {
        let mut inbox = self.mailbox.lock();
        if !inbox.replies.is_empty() {
            if out.is_empty() {
                // Hand over the buffer rather than copy out of it: the
                // mailbox keeps no capacity while the session is idle.
                std::mem::swap(out, &mut inbox.replies);
            } else {
                out.append(&mut inbox.replies);
            }
            return Poll::Ready(true);
        }
        if inbox.closed {
            return Poll::Ready(false);
        }
        match &mut inbox.waker {
            Some(waker) => waker.clone_from(cx.waker()),
            None => inbox.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for LocalSession {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Close { id: self.id });
    }
}

#[derive(Debug)]
struct SessionState {
    mailbox: Arc<Mailbox>,
    /// Requests submitted and not yet executed; `None` when there are
    /// none, so an idle session's entry in the map is 32 bytes, not 56.
    #[allow(clippy::box_collection)] // the box is the point: see above
    pending: Option<Box<VecDeque<Request>>>,
    hung_up: bool,
    queued: bool,
}

impl SessionState {
    fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    fn add_pending(&mut self, requests: Vec<Request>) {
        match &mut self.pending {
            Some(pending) => pending.extend(requests),
            // Takes the batch's buffer as it is, without copying.
            None => self.pending = Some(Box::new(VecDeque::from(requests))),
        }
    }

    /// The next pending request; the buffer is freed with the last one.
    fn next_pending(&mut self) -> Option<Request> {
        let pending = self.pending.as_mut()?;
        let next = pending.pop_front();
        if pending.is_empty() {
            self.pending = None;
        }
        next
    }
}

type SessionMap =
    std::collections::HashMap<ConnId, SessionState, std::hash::BuildHasherDefault<IdHasher>>;

struct LogState {
    sink: LogSink,
    records: Vec<LogRecord>,
    /// The last round sent to the log thread.
    last_round: u64,
    /// The last round the log acknowledged.
    committed_round: u64,
    /// One entry per round in flight (`committed_round + 1 ..=
    /// last_round`, in order): the deliveries waiting for its commit.
    held: VecDeque<HeldRound>,
    /// Jobs changed by a round in flight, and the last such round.
    uncommitted_jobs: std::collections::HashMap<u64, u64, std::hash::BuildHasherDefault<IdHasher>>,
    /// Sessions that had deliveries held: the round their last one waited
    /// for. Later deliveries of the session wait for at least that round
    /// (an entry at or below `committed_round` no longer holds anything).
    /// One entry per session at most, removed when the session closes.
    session_holds: std::collections::HashMap<ConnId, u64, std::hash::BuildHasherDefault<IdHasher>>,
    /// Size of the log as of the last commit.
    log_bytes: u64,
    /// While compacting: the jobs still to snapshot.
    compaction: Option<Vec<u64>>,
}

impl LogState {
    /// Every round up to `round` is committed: moves the deliveries that
    /// waited for them to `released`, in round order.
    fn committed(&mut self, round: u64, log_bytes: u64, released: &mut Vec<Delivery>) {
        self.log_bytes = log_bytes;
        self.committed_round = self.committed_round.max(round);
        while self.held.front().is_some_and(|h| h.round <= round) {
            if let Some(held) = self.held.pop_front() {
                for id in held.jobs {
                    if self.uncommitted_jobs.get(&id) == Some(&held.round) {
                        self.uncommitted_jobs.remove(&id);
                    }
                }
                released.extend(held.deliveries);
            }
        }
    }
}

struct EngineTask {
    engine: Engine,
    clock: Clock,
    sessions: SessionMap,
    /// Sessions with pending requests that are not blocked.
    runnable: VecDeque<ConnId>,
    replies: Vec<(ConnId, Response)>,
    /// Deliveries made this round.
    round: Vec<Outgoing>,
    /// The mailboxes a delivery wakes, empty between deliveries.
    to_wake: Vec<Arc<Mailbox>>,
    touched: Vec<ConnId>,
    process: ProcessInfo,
    log: Option<LogState>,
    health: Arc<HealthFlags>,
    /// Job-API operations received this round, in order.
    ops: Vec<(Op, Answer, u64)>,
    /// Job-API reserves waiting for a job or their timeout.
    parked: Vec<ParkedReserve>,
    /// The engine's `ready_events` when the parked reserves last tried.
    parked_events: u64,
    /// Job waits, at most [`JOB_WAITS_MAX`]; while there are any, the
    /// engine notes the jobs that settle.
    job_waits: Vec<JobWait>,
    /// The settled jobs drained from the engine, reused every round.
    settled: Vec<u64>,
    /// The engine's earliest timer when it was last asked (`u64::MAX`:
    /// none): a round compares the clock with it to run due timers early.
    timers_at_ns: u64,
    /// When this round started or last ran the timers, whichever is later.
    timers_run_ns: u64,
}

impl EngineTask {
    fn new(
        engine: Engine,
        clock: Clock,
        log: Option<LogSink>,
        process: ProcessInfo,
        health: Arc<HealthFlags>,
    ) -> EngineTask {
        EngineTask {
            health,
            engine,
            clock,
            sessions: Default::default(),
            runnable: VecDeque::new(),
            replies: Vec::new(),
            round: Vec::new(),
            to_wake: Vec::new(),
            touched: Vec::new(),
            process,
            ops: Vec::new(),
            parked: Vec::new(),
            parked_events: 0,
            job_waits: Vec::new(),
            settled: Vec::new(),
            timers_at_ns: 0,
            timers_run_ns: 0,
            log: log.map(|sink| LogState {
                sink,
                records: Vec::new(),
                last_round: 0,
                committed_round: 0,
                held: VecDeque::new(),
                uncommitted_jobs: Default::default(),
                session_holds: Default::default(),
                log_bytes: 0,
                compaction: None,
            }),
        }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut next_wake: Option<u64> = None;
        let mut sleeper = crate::wake::Sleeper::new();
        tracing::debug!(precise = sleeper.is_precise(), "engine timer");
        let mut work_left = false;
        loop {
            let inline_due = match self.log.as_ref().map(|l| &l.sink) {
                Some(LogSink::Inline(log)) => log.next_due(),
                _ => None,
            };
            let sleep_until = next_wake
                .and_then(|at| self.clock.instant_at(at))
                .into_iter()
                .chain(inline_due)
                .min();
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(msg) => {
                        self.handle(msg);
                        for _ in 1..MESSAGES_PER_ROUND_MAX {
                            match rx.try_recv() {
                                Ok(msg) => self.handle(msg),
                                Err(_) => break,
                            }
                        }
                    }
                    None => break,
                },
                ack = recv_ack(&mut self.log) => self.on_ack(ack),
                _ = sleeper.sleep_until(sleep_until) => {}
                // More work now: no sleep, which would wait for the timer
                // wheel's next millisecond.
                () = std::future::ready(()), if work_left => {}
            }
            self.tick_inline_log();
            let mut now = self.clock.now_ns();
            self.timers_run_ns = now;
            loop {
                self.run_sessions(&mut now);
                // The clock as it is after the requests ran: a timer that
                // fell due meanwhile fires now, not a round later, and its
                // skew is measured where the job becomes ready.
                now = now.max(self.clock.now_ns());
                self.run_timers(now);
                self.run_ops(&mut now);
                if !self.collect() {
                    break;
                }
            }
            if self.engine.is_shutting_down() {
                self.close_idle_sessions();
            }
            self.finish_round();
            let engine_wake = self.engine.next_wake();
            self.timers_at_ns = engine_wake.unwrap_or(u64::MAX);
            next_wake = engine_wake
                .into_iter()
                .chain(self.parked.iter().map(|p| p.until_ns))
                .chain(self.job_waits.iter().map(|w| w.until_ns))
                .min();
            let compacting = self.log.as_ref().is_some_and(|l| l.compaction.is_some());
            // A tick that stopped with schedules still due (a batch of
            // `SCHEDULE_TIMERS_PER_TICK_MAX`) is due again at once.
            let timers_left = self.timers_at_ns <= self.clock.now_ns();
            work_left = compacting || timers_left;
            if work_left {
                // More snapshot or timer work: come back after others had
                // a turn (at once, whatever the clock: a manual one
                // included).
                tokio::task::yield_now().await;
            }
        }
        // The broker is gone: hand out what is safe to hand out, then close.
        for (&conn, session) in &self.sessions {
            self.round.push(Outgoing {
                conn,
                need: Need::Nothing,
                delivery: Delivery::Close(session.mailbox.clone()),
            });
        }
        self.finish_round();
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Open { id, mailbox } => {
                self.engine.connect(id);
                self.sessions.insert(
                    id,
                    SessionState {
                        mailbox,
                        pending: None,
                        hung_up: false,
                        queued: false,
                    },
                );
            }
            Msg::Submit { id, requests } => {
                let Some(session) = self.sessions.get_mut(&id) else {
                    return;
                };
                if requests.is_empty() {
                    return;
                }
                session.add_pending(requests);
                if !session.queued && !self.engine.is_waiting(id) {
                    session.queued = true;
                    self.runnable.push_back(id);
                }
            }
            Msg::Hangup { id } => {
                let Some(session) = self.sessions.get_mut(&id) else {
                    return;
                };
                // Like beanstalkd: a blocked reserve times out, what was sent
                // before the hangup is answered, then the session closes.
                session.hung_up = true;
                self.engine.time_out_wait(id);
                if !session.queued {
                    session.queued = true;
                    self.runnable.push_back(id);
                }
            }
            Msg::Close { id } => self.close(id),
            Msg::SetDraining(draining) => self.engine.set_draining(draining),
            Msg::Snapshot(scope, reply) => {
                // The asker may have given up; that is its business.
                let mut snapshot = self.engine.snapshot(self.clock.now_ns(), scope);
                snapshot.waits.reserve = self.parked.len() as u64;
                snapshot.waits.job = self.job_waits.len() as u64;
                let _ = reply.send(snapshot);
            }
            Msg::BeginShutdown => {
                if !self.engine.is_shutting_down() {
                    tracing::info!(
                        sessions = self.sessions.len(),
                        "shutting down: refusing puts, ending reserves, closing idle sessions"
                    );
                }
                // The health flag was set by `begin_shutdown` itself.
                self.engine.begin_shutdown();
            }
            Msg::Op(op) => self.ops.push(*op),
            // The round that follows runs the timers.
            Msg::Tick => {}
        }
    }

    /// Runs the engine's timers at `now`.
    fn run_timers(&mut self, now: u64) {
        self.timers_at_ns = self.engine.tick(now).unwrap_or(u64::MAX);
        self.timers_run_ns = now;
    }

    /// Between a round's sessions and operations: runs the engine's timers
    /// if one is due by the clock and the round has gone
    /// [`TIMER_CHECK_AFTER_NS`] without running them, and moves the round's
    /// `now` to that reading (what follows never runs before a timer that
    /// already fired). Otherwise one clock read and two comparisons. A
    /// manual clock stands still within a round, so tests see timers run
    /// where they always did: after the round's requests.
    fn run_due_timers(&mut self, now: &mut u64) {
        let clock_ns = self.clock.now_ns();
        if clock_ns < self.timers_at_ns
            || clock_ns < self.timers_run_ns.saturating_add(TIMER_CHECK_AFTER_NS)
        {
            return;
        }
        *now = clock_ns.max(*now);
        self.run_timers(*now);
    }

    /// Runs this round's job-API operations, then tries the parked
    /// reserves again if jobs became ready since they last tried, and
    /// answers those whose time is up (all of them once shutting down).
    fn run_ops(&mut self, now_ref: &mut u64) {
        for (op, answer, sent_ns) in std::mem::take(&mut self.ops) {
            self.run_due_timers(now_ref);
            let now = *now_ref;
            let outcome = match op {
                Op::Reserve {
                    queues,
                    batch,
                    timeout_ms,
                } => match self.engine.try_reserve(&queues, batch, now) {
                    Ok(jobs)
                        if jobs.is_empty()
                            && now
                                < sent_ns.saturating_add(timeout_ms.saturating_mul(1_000_000))
                            && !self.engine.is_shutting_down() =>
                    {
                        self.parked.push(ParkedReserve {
                            queues,
                            batch,
                            until_ns: sent_ns.saturating_add(timeout_ms.saturating_mul(1_000_000)),
                            answer,
                        });
                        continue;
                    }
                    reserved => reserved.map(Outcome::Leased),
                },
                Op::Wait { id, wait_ms } => {
                    let until_ns = sent_ns.saturating_add(wait_ms.saturating_mul(1_000_000));
                    match self.engine.apply(Op::Get { id }, now) {
                        Ok(Outcome::Job(job))
                            if !settled(job.state)
                                && now < until_ns
                                && !self.engine.is_shutting_down() =>
                        {
                            if self.job_waits.len() >= JOB_WAITS_MAX {
                                Err(BrokerError::TooManyWaits { max: JOB_WAITS_MAX })
                            } else {
                                self.engine.track_settled(true);
                                self.job_waits.push(JobWait {
                                    id,
                                    until_ns,
                                    answer,
                                });
                                continue;
                            }
                        }
                        read => read,
                    }
                }
                op => self.engine.apply(op, now),
            };
            self.answer(answer, outcome);
        }
        let now = *now_ref;
        self.run_job_waits(now);
        let events = self.engine.ready_events();
        let retry = std::mem::replace(&mut self.parked_events, events) != events;
        if self.parked.is_empty() {
            return;
        }
        let shutting_down = self.engine.is_shutting_down();
        for parked in std::mem::take(&mut self.parked) {
            // A caller that gave up gets no job: it would sit leased until
            // its TTR.
            if parked.answer.is_closed() {
                continue;
            }
            let jobs: Vec<Leased> = if retry && !shutting_down {
                self.engine
                    .try_reserve(&parked.queues, parked.batch, now)
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            if !jobs.is_empty() || shutting_down || now >= parked.until_ns {
                self.answer(parked.answer, Ok(Outcome::Leased(jobs)));
            } else {
                self.parked.push(parked);
            }
        }
    }

    /// Answers the job waits whose job settled, whose time is up, or all of
    /// them once shutting down, each with the job as it is now.
    fn run_job_waits(&mut self, now: u64) {
        if self.job_waits.is_empty() {
            return;
        }
        self.settled.clear();
        self.engine.drain_settled_into(&mut self.settled);
        let shutting_down = self.engine.is_shutting_down();
        // Waits are few (JOB_WAITS_MAX) and settled jobs per round few: a
        // scan costs less than keeping an index by job id.
        for wait in std::mem::take(&mut self.job_waits) {
            let done = shutting_down
                || now >= wait.until_ns
                || wait.answer.is_closed()
                || self.settled.contains(&wait.id);
            if done {
                let job = self.engine.apply(Op::Get { id: wait.id }, now);
                self.answer(wait.answer, job);
            } else {
                self.job_waits.push(wait);
            }
        }
        if self.job_waits.is_empty() {
            self.engine.track_settled(false);
        }
    }

    /// Answers a job-API operation once what it did is durable.
    fn answer(&mut self, answer: Answer, outcome: Result<Outcome, BrokerError>) {
        self.round.push(Outgoing {
            conn: 0,
            need: Need::Commit,
            delivery: Delivery::Answer(Box::new((answer, outcome))),
        });
    }

    /// While shutting down: closes every session that holds no reserved
    /// job and has nothing pending, after the replies it already has.
    fn close_idle_sessions(&mut self) {
        let idle: Vec<ConnId> = self
            .sessions
            .iter()
            .filter(|&(&id, session)| {
                !session.queued
                    && !session.has_pending()
                    && !self.engine.is_waiting(id)
                    && self.engine.reserved_count(id) == 0
            })
            .map(|(&id, _)| id)
            .collect();
        for id in idle {
            self.close(id);
        }
    }

    fn close(&mut self, id: ConnId) {
        if !self.sessions.contains_key(&id) {
            return;
        }
        // Replies already made for this session go before its end.
        self.collect();
        let Some(session) = self.sessions.remove(&id) else {
            return;
        };
        self.engine.disconnect(id, self.clock.now_ns());
        self.round.push(Outgoing {
            conn: id,
            need: Need::Nothing,
            delivery: Delivery::Close(session.mailbox),
        });
    }

    /// Executes pending requests of every runnable session until each is
    /// empty or blocked.
    fn run_sessions(&mut self, now_ref: &mut u64) {
        while let Some(id) = self.runnable.pop_front() {
            self.run_due_timers(now_ref);
            let now = *now_ref;
            let Some(session) = self.sessions.get_mut(&id) else {
                continue;
            };
            session.queued = false;
            while let Some(request) = session.next_pending() {
                self.engine.execute(id, request, now);
                if self.engine.is_waiting(id) {
                    if !session.hung_up {
                        break;
                    }
                    // Nobody will read a job handed out now.
                    self.engine.time_out_wait(id);
                }
            }
            if session.hung_up && !session.has_pending() {
                self.close(id);
            }
        }
    }

    /// Turns the engine's replies into this round's deliveries. Returns
    /// true if a blocked session became runnable again and another pass is
    /// needed.
    fn collect(&mut self) -> bool {
        self.engine.drain_replies_into(&mut self.replies);
        for (id, mut response) in self.replies.drain(..) {
            let Some(session) = self.sessions.get(&id) else {
                continue;
            };
            if let Response::Stats(stats) = &mut response {
                stats.process = self.process.snapshot();
                if let Some(log) = &self.log {
                    let storage = log.sink.stats().lock().unwrap_or_else(|e| e.into_inner());
                    let p = &mut stats.process;
                    p.binlog_oldest_index = storage.oldest_segment;
                    p.binlog_current_index = storage.current_segment;
                    p.binlog_records_written = storage.records_written;
                    p.binlog_max_size = log.sink.compaction_min_log_bytes();
                }
            }
            self.round.push(Outgoing {
                conn: id,
                need: Need::of(&response),
                delivery: Delivery::Reply(session.mailbox.clone(), response),
            });
            if self.touched.last() != Some(&id) {
                self.touched.push(id);
            }
        }
        let mut again = false;
        for id in self.touched.drain(..) {
            let Some(session) = self.sessions.get_mut(&id) else {
                continue;
            };
            if !session.queued && session.has_pending() && !self.engine.is_waiting(id) {
                session.queued = true;
                self.runnable.push_back(id);
                again = true;
            }
        }
        again
    }

    /// Ends a round: its durable changes go to the log, and its deliveries
    /// are made now or held until the log has what they depend on.
    fn finish_round(&mut self) {
        let Some(log) = &mut self.log else {
            // `round` keeps its capacity for the next round.
            deliver(self.round.drain(..).map(|o| o.delivery), &mut self.to_wake);
            self.round.shrink_to(ROUND_DELIVERIES_KEPT_MAX);
            return;
        };
        let outgoing = std::mem::take(&mut self.round);
        self.engine.drain_log_into(&mut log.records);
        let mut compaction_done = false;
        if let Some(ids) = &mut log.compaction {
            for _ in 0..COMPACTION_RECORDS_PER_ROUND {
                let Some(id) = ids.pop() else { break };
                // A job deleted since the cut needs no snapshot.
                if let Some(record) = self.engine.snapshot_record(id) {
                    log.records.push(record);
                }
            }
            compaction_done = ids.is_empty();
        }
        let mut sent = true;
        let mut acks = Vec::new();
        if !log.records.is_empty() {
            log.last_round += 1;
            let round = log.last_round;
            let records = std::mem::take(&mut log.records);
            let mut jobs = Vec::new();
            for record in &records {
                changed_jobs(record, &mut jobs);
            }
            for &id in &jobs {
                log.uncommitted_jobs.insert(id, round);
            }
            log.held.push_back(HeldRound {
                round,
                deliveries: Vec::new(),
                jobs,
            });
            // Final jobs can be deleted too: room for their deletes.
            let live_jobs = self.engine.durable_job_count() as u64;
            sent = log.sink.send(
                LogMsg::Batch {
                    round,
                    records,
                    live_jobs,
                },
                &mut acks,
            );
        }
        // The inline log acknowledges as it writes: apply what it already
        // committed before sorting, so that this round's replies (and those
        // held for earlier rounds) go out together, without a detour
        // through the held buckets. A failure, and whatever follows it, is
        // applied after sorting: it must fail this round's acknowledgements,
        // which it finds among the held deliveries.
        let mut now = Vec::new();
        let mut later = Vec::new();
        for ack in acks {
            match ack {
                CommitAck::Committed { round, log_bytes } if later.is_empty() => {
                    log.committed(round, log_bytes, &mut now);
                }
                CommitAck::DiskFull(full) if later.is_empty() => {
                    self.health.disk_full.store(full, Ordering::Relaxed);
                    self.engine.set_disk_full(full);
                }
                failed_or_after => later.push(failed_or_after),
            }
        }
        let mut acks = later;
        for Outgoing {
            conn,
            need,
            delivery,
        } in outgoing
        {
            let needed = match need {
                Need::Nothing => 0,
                Need::Commit => log.last_round,
                Need::Job(id) => log.uncommitted_jobs.get(&id).copied().unwrap_or(0),
            };
            // Job-API answers belong to no session: they wait for their
            // own needs only.
            let answer = matches!(delivery, Delivery::Answer(..));
            let behind = if answer {
                0
            } else {
                log.session_holds.get(&conn).copied().unwrap_or(0)
            };
            let wait_for = needed.max(behind);
            let closing = matches!(delivery, Delivery::Close(_));
            if wait_for <= log.committed_round {
                now.push(delivery);
            } else {
                // Rounds in flight are `committed_round + 1 ..= last_round`,
                // one entry each, in order.
                let index = (wait_for - log.committed_round - 1) as usize;
                match log.held.get_mut(index) {
                    Some(held) => {
                        debug_assert_eq!(held.round, wait_for);
                        held.deliveries.push(delivery);
                        if wait_for > behind && !answer {
                            log.session_holds.insert(conn, wait_for);
                        }
                    }
                    // Unreachable while the invariant above holds; if it
                    // did not, the safe answer is to wait for everything.
                    None => match log.held.back_mut() {
                        Some(last) => last.deliveries.push(delivery),
                        None => now.push(delivery),
                    },
                }
            }
            if closing {
                log.session_holds.remove(&conn);
            }
        }
        deliver(now, &mut self.to_wake);
        if compaction_done {
            log.compaction = None;
            sent &= log.sink.send(LogMsg::EndCompaction, &mut acks);
        } else if log.compaction.is_none()
            && crate::durable::compaction_due(
                log.sink.stats(),
                log.log_bytes,
                self.engine.live_log_bytes(),
                log.sink.compaction_min_log_bytes(),
            )
        {
            tracing::info!(
                log_bytes = log.log_bytes,
                live_bytes = self.engine.live_log_bytes(),
                "compacting the log"
            );
            let mut ids = self.engine.compaction_ids();
            // Oldest first (taken from the end): the log thread deletes each
            // old segment as soon as its jobs are in the snapshot.
            ids.sort_unstable_by(|a, b| b.cmp(a));
            log.compaction = Some(ids);
            // First after the cut: ids in use stay taken when the records
            // that used them are compacted away, and queue settings.
            log.records.extend(self.engine.compaction_start_records());
            // Until the next commit reports the new size.
            log.log_bytes = 0;
            sent &= log.sink.send(LogMsg::BeginCompaction, &mut acks);
        }
        if !sent {
            acks.push(CommitAck::Failed {
                error: "the log thread has stopped".to_string(),
            });
        }
        for ack in acks {
            self.on_ack(Some(ack));
        }
    }

    /// Runs the inline log's timers (interval fsync, space checks).
    fn tick_inline_log(&mut self) {
        let mut acks = Vec::new();
        if let Some(LogState {
            sink: LogSink::Inline(log),
            ..
        }) = &mut self.log
        {
            log.tick(&mut acks);
        }
        for ack in acks {
            self.on_ack(Some(ack));
        }
    }

    fn on_ack(&mut self, ack: Option<CommitAck>) {
        let Some(log) = &mut self.log else {
            return;
        };
        match ack {
            Some(CommitAck::Committed { round, log_bytes }) => {
                let mut released = Vec::new();
                log.committed(round, log_bytes, &mut released);
                deliver(released, &mut self.to_wake);
            }
            Some(CommitAck::DiskFull(full)) => {
                self.health.disk_full.store(full, Ordering::Relaxed);
                self.engine.set_disk_full(full);
            }
            Some(CommitAck::Failed { error }) => {
                tracing::error!(%error, "write-ahead log failed; refusing changes until restart");
                // Only the first failure is kept: it is the cause.
                let _ = self.health.storage_failed.set(error);
                self.engine.set_storage_failed();
                // The held changes may not be on disk: their requests fail.
                while let Some(held) = log.held.pop_front() {
                    deliver(
                        held.deliveries.into_iter().map(fail_unsaved_change),
                        &mut self.to_wake,
                    );
                }
                self.log = None;
            }
            None => {
                self.on_ack(Some(CommitAck::Failed {
                    error: "the log thread has stopped".to_string(),
                }));
            }
        }
    }
}

/// Replies that acknowledge a durable change become errors when the change
/// could not be logged: beanstalkd answers `INTERNAL_ERROR` when its binlog
/// write fails.
fn fail_unsaved_change(delivery: Delivery) -> Delivery {
    match delivery {
        Delivery::Reply(mailbox, response) => {
            let response = match response {
                Response::Inserted(_)
                | Response::BuriedId(_)
                | Response::Deleted
                | Response::Released
                | Response::Buried
                | Response::Kicked(_)
                | Response::KickedJob => Response::InternalError,
                other => other,
            };
            Delivery::Reply(mailbox, response)
        }
        Delivery::Answer(answered) if answered.1.is_ok() => Delivery::Answer(Box::new((
            answered.0,
            Err(BrokerError::Storage(
                "the change could not be logged; changes are refused until restart".into(),
            )),
        ))),
        other => other,
    }
}

/// Hands deliveries to mailboxes and wakes each mailbox's task once.
/// `to_wake` is the engine task's buffer, empty before and after: kept
/// rather than allocated and grown every round.
fn deliver(deliveries: impl IntoIterator<Item = Delivery>, to_wake: &mut Vec<Arc<Mailbox>>) {
    debug_assert!(to_wake.is_empty());
    for delivery in deliveries {
        let mailbox = match delivery {
            Delivery::Reply(mailbox, response) => {
                let mut inbox = mailbox.lock();
                if inbox.replies.capacity() == 0 {
                    // One or two replies are the common case (a producer's
                    // `put`; a worker's `delete` and next `reserve`): room
                    // for two spares the second its reallocation, and costs
                    // nothing while idle (see `poll_recv`: the buffer leaves
                    // with the replies).
                    inbox.replies.reserve_exact(2);
                }
                inbox.replies.push(response);
                drop(inbox);
                mailbox
            }
            Delivery::Close(mailbox) => {
                mailbox.lock().closed = true;
                mailbox
            }
            Delivery::Answer(answered) => {
                let (answer, outcome) = *answered;
                // The caller may have given up; that is its business.
                let _ = answer.send(outcome);
                continue;
            }
        };
        if !to_wake.last().is_some_and(|m| Arc::ptr_eq(m, &mailbox)) {
            to_wake.push(mailbox);
        }
    }
    for mailbox in to_wake.drain(..) {
        mailbox.wake();
    }
    to_wake.shrink_to(ROUND_DELIVERIES_KEPT_MAX);
}

async fn recv_ack(log: &mut Option<LogState>) -> Option<CommitAck> {
    match log {
        Some(LogState {
            sink: LogSink::Thread(link),
            ..
        }) => link.acks.recv().await,
        _ => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use spool_engine::EngineConfig;
    use spool_proto::{Put, PutBody, TubeName};

    use super::*;

    /// Generous: only a broken broker waits this long.
    const REPLY_DEADLINE: Duration = Duration::from_secs(10);
    /// Snapshots taken while waiting for the engine to reach a state.
    const SNAPSHOT_POLLS_MAX: usize = 1000;

    /// The channel's slots and the round's deliveries are as large as
    /// their largest variant: the job API's must not make the beanstalkd
    /// path copy more per message.
    #[test]
    fn messages_and_deliveries_stay_small() {
        assert!(
            std::mem::size_of::<Msg>() <= 48,
            "{}",
            std::mem::size_of::<Msg>()
        );
        assert!(
            std::mem::size_of::<Delivery>() <= 64,
            "{}",
            std::mem::size_of::<Delivery>()
        );
    }

    fn broker() -> LocalBroker {
        let engine = Engine::new(EngineConfig {
            max_job_size: 1 << 16,
        });
        LocalBroker::start(engine, engine_clock(), None, ProcessInfo::new("test"))
    }

    fn put(body: &'static [u8]) -> Request {
        Request::Put(Put {
            pri: 0,
            delay_secs: 0,
            ttr_secs: 60,
            body: PutBody::Complete(Bytes::from_static(body)),
        })
    }

    /// The next replies, or `None` once the session is closed and drained.
    async fn next(session: &mut LocalSession) -> Option<Vec<Response>> {
        let mut out = Vec::new();
        let open = tokio::time::timeout(
            REPLY_DEADLINE,
            std::future::poll_fn(|cx| session.poll_recv(cx, &mut out)),
        )
        .await
        .expect("the broker answers");
        open.then_some(out)
    }

    /// Exactly `count` replies (they may come in several deliveries).
    async fn replies(session: &mut LocalSession, count: usize) -> Vec<Response> {
        let mut all = Vec::new();
        while all.len() < count {
            match next(session).await {
                Some(more) => all.extend(more),
                None => panic!("closed after {all:?}"),
            }
        }
        assert_eq!(all.len(), count, "{all:?}");
        all
    }

    async fn closed(session: &mut LocalSession) {
        assert_eq!(next(session).await, None);
    }

    /// Waits (bounded) until the engine shows `session` blocked in reserve.
    async fn until_blocked(broker: &LocalBroker, session: u64) {
        for _ in 0..SNAPSHOT_POLLS_MAX {
            let snapshot = broker.snapshot(SnapshotScope::Full).await.unwrap();
            let blocked = snapshot
                .sessions
                .iter()
                .any(|s| s.conn_id == session && s.blocked_in_reserve_ns.is_some());
            if blocked {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("session {session} never blocked in reserve");
    }

    #[tokio::test]
    async fn snapshot_round_trips_through_the_engine_task() {
        let broker = broker();
        assert!(broker.storage_stats().is_none());
        let mut session = broker.open_session(Peer::default()).unwrap();
        let tube = TubeName::new(b"emails").unwrap();
        session
            .submit(vec![Request::Use(tube.clone()), put(b"a"), put(b"b")])
            .unwrap();
        let got = replies(&mut session, 3).await;
        assert!(matches!(got[1], Response::Inserted(_)), "{got:?}");

        let snapshot = broker.snapshot(SnapshotScope::Full).await.unwrap();
        assert_eq!(snapshot.jobs_total, 2);
        let queue = snapshot.queues.iter().find(|q| q.name == "emails").unwrap();
        assert_eq!(queue.ready, 2);
        assert_eq!(queue.counters.put, 2);
        assert_eq!(snapshot.sessions.len(), 1);
        assert_eq!(snapshot.sessions[0].conn_id, session.id());
        assert_eq!(snapshot.sessions[0].tube_used, "emails");
        assert_eq!(broker.health(), BrokerHealth::default());
    }

    /// On the engine's own (current-thread) runtime, a request that finds
    /// the engine idle runs in a round of its own during `submit`: its
    /// reply is in the mailbox before any other task has run.
    #[tokio::test]
    async fn a_request_to_an_idle_engine_is_answered_inline() {
        let broker = broker();
        let mut session = broker.open_session(Peer::default()).unwrap();
        // The engine task takes the session's opening, then sits idle past
        // the threshold (a sleep never returns early).
        tokio::task::yield_now().await;
        std::thread::sleep(Duration::from_nanos(INLINE_AFTER_IDLE_NS) * 10);
        session.submit(vec![put(b"a")]).unwrap();
        let mut out = Vec::new();
        let waker = Waker::noop();
        let polled = session.poll_recv(&mut Context::from_waker(waker), &mut out);
        assert_eq!(polled, Poll::Ready(true));
        assert!(matches!(out[..], [Response::Inserted(_)]), "{out:?}");
    }

    /// The engine (and the log's sender it holds) goes with its task when
    /// the runtime is dropped, however many broker handles live on: the
    /// log thread's last sync waits for that sender to go.
    #[test]
    fn the_engine_ends_with_its_runtime_while_broker_handles_live() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let broker = runtime.block_on(async { broker() });
        assert!(broker.open_session(Peer::default()).is_ok());
        drop(runtime);
        assert_eq!(
            broker.open_session(Peer::default()).err(),
            Some(BrokerError::Closed),
            "the engine's receiver is gone"
        );
    }

    #[tokio::test]
    async fn shutdown_ends_blocked_reserves_and_closes_idle_sessions() {
        let broker = broker();
        let mut waiter = broker.open_session(Peer::default()).unwrap();
        let mut timed = broker.open_session(Peer::default()).unwrap();
        let mut idle = broker.open_session(Peer::default()).unwrap();
        waiter.submit(vec![Request::Reserve]).unwrap();
        timed
            .submit(vec![Request::ReserveWithTimeout {
                timeout_secs: Some(3600),
            }])
            .unwrap();
        until_blocked(&broker, waiter.id()).await;
        until_blocked(&broker, timed.id()).await;

        broker.begin_shutdown();
        let health = broker.health();
        assert!(health.shutting_down && health.draining);
        assert_eq!(replies(&mut waiter, 1).await, vec![Response::TimedOut]);
        closed(&mut waiter).await;
        assert_eq!(replies(&mut timed, 1).await, vec![Response::TimedOut]);
        closed(&mut timed).await;
        closed(&mut idle).await;

        // A session opened during the shutdown is closed at once too.
        let mut late = broker.open_session(Peer::default()).unwrap();
        closed(&mut late).await;
        let snapshot = broker.snapshot(SnapshotScope::Full).await.unwrap();
        assert!(snapshot.sessions.is_empty(), "{snapshot:?}");
        assert!(snapshot.shutting_down);
    }

    #[tokio::test]
    async fn shutdown_keeps_a_session_with_reservations_until_it_holds_none() {
        let broker = broker();
        let mut worker = broker.open_session(Peer::default()).unwrap();
        worker
            .submit(vec![
                put(b"one"),
                put(b"two"),
                Request::Reserve,
                Request::Reserve,
            ])
            .unwrap();
        let got = replies(&mut worker, 4).await;
        let [Response::Inserted(_), Response::Inserted(_), Response::Reserved { id: first, .. }, Response::Reserved { id: second, .. }] =
            got.as_slice()
        else {
            panic!("{got:?}");
        };
        let (first, second) = (*first, *second);

        broker.begin_shutdown();
        // Still open: puts are refused, reserves do not block, its jobs are
        // its own to finish.
        worker
            .submit(vec![
                put(b"three"),
                Request::Reserve,
                Request::ReserveWithTimeout { timeout_secs: None },
                Request::Delete(first),
            ])
            .unwrap();
        assert_eq!(
            replies(&mut worker, 4).await,
            vec![
                Response::Draining,
                Response::TimedOut,
                Response::TimedOut,
                Response::Deleted
            ]
        );
        let snapshot = broker.snapshot(SnapshotScope::Full).await.unwrap();
        assert_eq!(snapshot.sessions.len(), 1);
        assert_eq!(snapshot.sessions[0].reserved_job_ids, vec![second]);

        // Releasing the last one ends the session after the reply.
        worker
            .submit(vec![Request::Release {
                id: second,
                pri: 0,
                delay_secs: 0,
            }])
            .unwrap();
        assert_eq!(replies(&mut worker, 1).await, vec![Response::Released]);
        closed(&mut worker).await;
        let snapshot = broker.snapshot(SnapshotScope::Full).await.unwrap();
        assert!(snapshot.sessions.is_empty());
        assert_eq!(snapshot.jobs_total, 1);
        assert_eq!(snapshot.queues[0].ready, 1);
    }

    #[tokio::test]
    async fn storage_stats_count_fsyncs_and_commit_batches() {
        // A fresh directory of our own; removed at the end.
        let dir = std::env::temp_dir().join(format!(
            "spool-local-test-{}-{}",
            std::process::id(),
            engine_clock().epoch_ns()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let clock = engine_clock();
        let mut engine = Engine::new(EngineConfig {
            max_job_size: 1 << 16,
        });
        let (wal, _) =
            crate::durable::recover(&dir, Default::default(), &mut engine, &clock).unwrap();
        let (link, thread) = crate::durable::spawn_log_thread(
            wal,
            &dir,
            crate::durable::FsyncPolicy::Always,
            clock.epoch_ns(),
            1 << 20,
            Default::default(),
        )
        .unwrap();
        let broker = LocalBroker::start(
            engine,
            clock,
            Some(LogSink::Thread(link)),
            ProcessInfo::new("test"),
        );
        let mut session = broker.open_session(Peer::default()).unwrap();
        session.submit(vec![put(b"a"), put(b"b")]).unwrap();
        let got = replies(&mut session, 2).await;
        assert!(
            got.iter().all(|r| matches!(r, Response::Inserted(_))),
            "{got:?}"
        );

        // Acknowledged under `fsync always`: the commit and its fsync are
        // counted before the acknowledgement left the log thread.
        let stats = broker
            .storage_stats()
            .expect("a durable broker has storage stats");
        let stats = stats.lock().unwrap().clone();
        assert!(stats.fsync_seconds.count() >= 1, "{stats:?}");
        assert_eq!(stats.fsync_seconds.count(), stats.fsyncs);
        assert_eq!(stats.fsync_seconds.sum_observed(), stats.fsync_ns_total);
        assert_eq!(stats.commit_batch_records.count(), stats.commits);
        assert_eq!(
            stats.commit_batch_records.sum_observed(),
            stats.records_written
        );
        assert!(stats.records_written >= 2);
        assert_eq!(broker.health().storage_failed, None);

        drop(session);
        drop(broker);
        // The engine task drops the link when it sees the broker gone; the
        // log thread then ends. Not waited for beyond the runtime's life.
        drop(thread);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn draining_shows_in_health_and_refuses_puts_only() {
        let broker = broker();
        let mut session = broker.open_session(Peer::default()).unwrap();
        broker.set_draining(true);
        assert!(broker.health().draining);
        assert!(!broker.health().shutting_down);
        session
            .submit(vec![
                put(b"x"),
                Request::ReserveWithTimeout {
                    timeout_secs: Some(0),
                },
            ])
            .unwrap();
        assert_eq!(
            replies(&mut session, 2).await,
            vec![Response::Draining, Response::TimedOut]
        );
        // Not closed: the session goes on serving.
        session.submit(vec![Request::ListTubeUsed]).unwrap();
        assert_eq!(
            replies(&mut session, 1).await,
            vec![Response::Using(TubeName::default_tube())]
        );
        broker.set_draining(false);
        assert!(!broker.health().draining);
    }

    /// A broker whose log is the test itself: batches arrive on the
    /// returned receiver and are acknowledged only when the test says so.
    fn broker_with_manual_log() -> (
        LocalBroker,
        std::sync::mpsc::Receiver<LogMsg>,
        mpsc::UnboundedSender<CommitAck>,
    ) {
        let mut engine = Engine::new(EngineConfig {
            max_job_size: 1 << 16,
        });
        engine.enable_logging();
        let (messages, batches) = std::sync::mpsc::channel();
        let (ack_tx, acks) = mpsc::unbounded_channel();
        let link = LogLink {
            messages,
            acks,
            compaction_min_log_bytes: u64::MAX,
            stats: Default::default(),
        };
        let broker = LocalBroker::start(
            engine,
            engine_clock(),
            Some(LogSink::Thread(link)),
            ProcessInfo::new("test"),
        );
        (broker, batches, ack_tx)
    }

    /// Waits for the next batch the engine task sends the log; its round.
    async fn next_batch(batches: &std::sync::mpsc::Receiver<LogMsg>) -> u64 {
        for _ in 0..SNAPSHOT_POLLS_MAX {
            match batches.try_recv() {
                Ok(LogMsg::Batch { round, .. }) => return round,
                Ok(other) => panic!("unexpected {other:?}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        panic!("no batch reached the log");
    }

    /// Returns once every request submitted before the call has been
    /// executed and its round finished: a snapshot is answered as the
    /// engine task takes it in, so the second one is taken in a later
    /// wake-up than anything sent before the first.
    async fn barrier(broker: &LocalBroker) {
        broker.snapshot(SnapshotScope::Full).await.unwrap();
        broker.snapshot(SnapshotScope::Full).await.unwrap();
    }

    /// What the session has been handed so far, without waiting.
    fn delivered(session: &mut LocalSession) -> Vec<Response> {
        let mut out = Vec::new();
        let mut cx = Context::from_waker(Waker::noop());
        let _ = session.poll_recv(&mut cx, &mut out);
        out
    }

    #[tokio::test]
    async fn replies_wait_only_for_the_commits_they_depend_on() {
        let (broker, batches, acks) = broker_with_manual_log();
        let mut producer = broker.open_session(Peer::default()).unwrap();
        let mut worker = broker.open_session(Peer::default()).unwrap();

        producer.submit(vec![put(b"a")]).unwrap();
        assert_eq!(next_batch(&batches).await, 1);
        barrier(&broker).await;
        assert_eq!(
            delivered(&mut producer),
            vec![],
            "INSERTED waits for its fsync"
        );

        // Nothing durable: answered while round 1 is in flight.
        worker.submit(vec![Request::ListTubeUsed]).unwrap();
        let tube = TubeName::new(b"default").unwrap();
        assert_eq!(
            replies(&mut worker, 1).await,
            vec![Response::Using(tube.clone())]
        );

        // The job's put is not on disk yet: the reserve waits for it.
        worker.submit(vec![Request::Reserve]).unwrap();
        barrier(&broker).await;
        assert_eq!(delivered(&mut worker), vec![]);
        acks.send(CommitAck::Committed {
            round: 1,
            log_bytes: 0,
        })
        .unwrap();
        assert_eq!(replies(&mut producer, 1).await, vec![Response::Inserted(1)]);
        let got = replies(&mut worker, 1).await;
        assert!(
            matches!(got.as_slice(), [Response::Reserved { id: 1, .. }]),
            "{got:?}"
        );

        // A delete waits for its commit, and the worker's next reply waits
        // behind it even though it needs nothing durable.
        worker
            .submit(vec![Request::Delete(1), Request::ListTubeUsed])
            .unwrap();
        assert_eq!(next_batch(&batches).await, 2);
        barrier(&broker).await;
        assert_eq!(delivered(&mut worker), vec![]);
        // Another session is not held by the worker's commit.
        producer.submit(vec![Request::ListTubeUsed]).unwrap();
        assert_eq!(
            replies(&mut producer, 1).await,
            vec![Response::Using(tube.clone())]
        );
        // Not found may be the delete in flight: it waits for it.
        producer.submit(vec![Request::Peek(1)]).unwrap();
        barrier(&broker).await;
        assert_eq!(delivered(&mut producer), vec![]);
        acks.send(CommitAck::Committed {
            round: 2,
            log_bytes: 0,
        })
        .unwrap();
        assert_eq!(
            replies(&mut worker, 2).await,
            vec![Response::Deleted, Response::Using(tube)]
        );
        assert_eq!(replies(&mut producer, 1).await, vec![Response::NotFound]);
    }

    #[tokio::test]
    async fn a_failed_log_fails_the_held_changes_but_not_the_rest() {
        let (broker, batches, acks) = broker_with_manual_log();
        let mut producer = broker.open_session(Peer::default()).unwrap();
        producer
            .submit(vec![put(b"a"), Request::ListTubeUsed])
            .unwrap();
        assert_eq!(next_batch(&batches).await, 1);
        acks.send(CommitAck::Failed {
            error: "disk on fire".to_string(),
        })
        .unwrap();
        let tube = TubeName::new(b"default").unwrap();
        assert_eq!(
            replies(&mut producer, 2).await,
            vec![Response::InternalError, Response::Using(tube)]
        );
        assert!(broker.health().storage_failed.is_some());
    }

    /// An engine task whose log is written inline (`fsync never`) to
    /// `storage`, driven by the test itself; the space reserve lives in
    /// `dir`.
    fn task_with_inline_log(
        storage: &spool_wal::sim::SimStorage,
        dir: &std::path::Path,
    ) -> EngineTask {
        let clock = engine_clock();
        let mut engine = Engine::new(EngineConfig {
            max_job_size: 1 << 16,
        });
        let recovery = spool_wal::Wal::open_with_storage(
            Arc::new(storage.clone()),
            "/wal",
            spool_wal::WalOptions::default(),
        )
        .unwrap();
        let (wal, _) = recovery.finish().unwrap();
        engine.enable_logging();
        let log = crate::durable::InlineLog::new(
            wal,
            dir,
            crate::durable::FsyncPolicy::Never,
            clock.epoch_ns(),
            1 << 20,
            Default::default(),
        )
        .unwrap();
        EngineTask::new(
            engine,
            clock,
            Some(LogSink::Inline(Box::new(log))),
            ProcessInfo::new("test"),
            Default::default(),
        )
    }

    /// A fresh directory of our own for the space reserve.
    fn reserve_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "spool-local-{name}-{}-{}",
            std::process::id(),
            engine_clock().epoch_ns()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// One round of the engine task for `requests` of a new session 1;
    /// its mailbox.
    fn one_round(task: &mut EngineTask, requests: Vec<Request>) -> Arc<Mailbox> {
        let mailbox = Arc::new(Mailbox::default());
        task.handle(Msg::Open {
            id: 1,
            mailbox: mailbox.clone(),
        });
        task.handle(Msg::Submit { id: 1, requests });
        let mut now = task.clock.now_ns();
        task.run_sessions(&mut now);
        task.collect();
        task.finish_round();
        mailbox
    }

    /// A round whose `now` went stale while its requests ran: a delayed
    /// job that fell due meanwhile is made ready before the next session's
    /// requests run, at the clock's reading, not after the round.
    #[test]
    fn a_long_round_runs_due_timers_between_sessions() {
        let start_ns = 1_000_000_000;
        let clock = manual_engine_clock(start_ns);
        let engine = Engine::new(EngineConfig {
            max_job_size: 1 << 16,
        });
        let mut task = EngineTask::new(
            engine,
            clock.clone(),
            None,
            ProcessInfo::new("test"),
            Default::default(),
        );
        let mailbox = one_round(
            &mut task,
            vec![Request::Put(Put {
                pri: 0,
                delay_secs: 1,
                ttr_secs: 60,
                body: PutBody::Complete(Bytes::from_static(b"later")),
            })],
        );
        task.timers_at_ns = task.engine.next_wake().expect("the delay's timer");
        assert_eq!(task.timers_at_ns, start_ns + 1_000_000_000);
        // The next round starts before the job is due; its first session
        // runs long, and by the second the job is due (and the round has
        // gone longer than TIMER_CHECK_AFTER_NS without timers).
        let mut now = start_ns + 999_000_000;
        task.timers_run_ns = now;
        clock.advance(1_000_000_000 + TIMER_CHECK_AFTER_NS);
        task.handle(Msg::Submit {
            id: 1,
            requests: vec![Request::ReserveWithTimeout {
                timeout_secs: Some(0),
            }],
        });
        task.run_sessions(&mut now);
        assert_eq!(
            now,
            clock.now_ns(),
            "the round goes on at the clock's reading"
        );
        task.collect();
        task.finish_round();
        let replies = mailbox.lock().replies.clone();
        assert!(
            matches!(replies.last(), Some(Response::Reserved { id: 1, .. })),
            "{replies:?}"
        );
    }

    #[test]
    fn an_inline_commit_sends_the_round_out_without_holding_it() {
        let storage = spool_wal::sim::SimStorage::new();
        let dir = reserve_dir("inline-commit");
        let mut task = task_with_inline_log(&storage, &dir);
        let mailbox = one_round(&mut task, vec![put(b"a"), Request::ListTubeUsed]);
        let tube = TubeName::new(b"default").unwrap();
        assert_eq!(
            mailbox.lock().replies,
            vec![Response::Inserted(1), Response::Using(tube)]
        );
        // Committed as it was written: nothing was held on the way out.
        let log = task.log.as_ref().expect("the log still works");
        assert_eq!((log.last_round, log.committed_round), (1, 1));
        assert!(log.held.is_empty());
        assert!(log.uncommitted_jobs.is_empty());
        assert!(log.session_holds.is_empty(), "{:?}", log.session_holds);
        // The commit is published with its acknowledgement.
        let stats = log.sink.stats().lock().unwrap().clone();
        assert_eq!((stats.commits, stats.records_written), (1, 1));
        assert_eq!(stats.commit_batch_records.count(), 1);
        assert_eq!(stats.log_bytes, log.log_bytes);
        drop(task);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_inline_write_fails_the_rounds_changes_but_not_the_rest() {
        let storage = spool_wal::sim::SimStorage::new();
        let dir = reserve_dir("inline-failure");
        let mut task = task_with_inline_log(&storage, &dir);
        storage.inject(spool_wal::sim::Fault::Write {
            nth: 0,
            kind: std::io::ErrorKind::Other,
            written: 0,
        });
        let mailbox = one_round(&mut task, vec![put(b"a"), Request::ListTubeUsed]);
        let tube = TubeName::new(b"default").unwrap();
        assert_eq!(
            mailbox.lock().replies,
            vec![Response::InternalError, Response::Using(tube)]
        );
        assert!(task.log.is_none());
        assert!(task.health.storage_failed.get().is_some());
        drop(task);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
