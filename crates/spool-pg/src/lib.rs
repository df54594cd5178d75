//! spool's PostgreSQL broker: the job model of `spool-broker` on a database
//! that several spool nodes share.
//!
//! Every [`Op`] is one SQL transaction (see `ops.rs`), with the node's own
//! clock passed as `now`; nothing is answered before its commit. Waiting
//! (a reserve's timeout, a job wait) is a loop around the one-shot
//! operation, woken by `LISTEN/NOTIFY` through one listener connection per
//! broker, with a bounded fallback poll. Timers (due jobs, expired leases,
//! retention) are `UPDATE`s and `DELETE`s any node runs: at the start of
//! each reserve and from a periodic task. beanstalkd sessions are
//! [`OpSession`]s: the protocol translated into the same operations.

mod clock;
mod error;
mod group;
mod ops;
mod pool;
mod schedules;
mod schema;
pub mod testing;
mod workflows;

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use spool_broker::{
    Broker, BrokerError, BrokerHealth, EngineSnapshot, Histogram, JobView, Lease, Leased, NewJob,
    Op, OpSession, Outcome, Peer, QueueCounters, QueueName, QueueSnapshot, SessionBroker,
    SnapshotScope, WaitCounts, WorkflowCounters,
};
use spool_proto::{ProcessStats, ServerStats};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_postgres::AsyncMessage;

pub use clock::Clock;
pub use error::ConnectError;
pub use ops::{
    final_vacuum_due, reindex_due, vacuum_due, ReindexPass, VacuumPass, REINDEX_INTERVAL,
    REINDEX_LIVE_BYTES_MIN, REINDEX_LIVE_BYTES_PER_ROW, REINDEX_LIVE_ROWS_MAX,
    VACUUM_DEAD_ROWS_MIN, VACUUM_DEAD_SHARE_OF_LIVE, VACUUM_FINAL_DEAD_SHARE_OF_LIVE,
};
/// The group, listing and count statements, for the tests of their plans.
#[doc(hidden)]
pub use ops::{
    list_sql, COMPLETE_GROUP_SQL, DELETE_GROUP_SQL, QUEUE_COUNTS_SQL, QUEUE_LIVE_COUNTS_SQL,
};
pub use pool::PoolStats;
pub use schema::SCHEMA_VERSION;

use error::{DbError, OpError};
use ops::{Ctx, Done, Effects, Skew, Task};
use pool::Pool;

/// Attempts of one operation that keeps meeting serialization failures,
/// deadlocks or a lost idempotency race: each attempt is a new transaction
/// that sees the winner's commit, so a second one almost always succeeds.
const OP_ATTEMPTS_MAX: usize = 3;

/// How often a parked reserve or job wait looks again although no
/// notification came: covers a listener that is reconnecting and timers
/// no node announces (a delayed job coming due on another node's clock).
pub const WAKE_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// How often each node runs the timers (due jobs, expired leases) on the
/// wall clock; the retention's deletes every [`RETENTION_EVERY_PASSES`]th
/// pass. A reserve runs the first two itself, so this bounds only how
/// late a `get` sees a due job as ready.
pub const TIMER_INTERVAL: Duration = Duration::from_millis(200);
pub const RETENTION_EVERY_PASSES: u64 = 25;
/// Jobs a node finishes that make its next timer pass run the retention,
/// whatever the pass's number: at most this many final rows (per node)
/// beyond a queue's count wait for it.
pub const RETENTION_AFTER_FINISHED: u64 = 1_000;
/// The shortest sleep of the timer task before a schedule's due instant.
const SCHEDULE_WAKE_MIN: Duration = Duration::from_millis(5);

/// How long the listener waits before reconnecting after losing its
/// connection.
pub const LISTEN_RETRY: Duration = Duration::from_secs(1);

/// Job waits ([`Op::Wait`]) one broker holds at once; each holds no
/// connection while parked, only a task.
pub const JOB_WAITS_MAX: usize = 10_000;

/// How a [`PgBroker`] connects and bounds its work.
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// A libpq-style URL or key=value string (`host` may be a unix socket
    /// directory).
    pub url: String,
    /// Connections in the pool (the listener's is extra).
    pub pool_size: usize,
    /// How long an operation waits for a free connection before it fails.
    pub acquire_timeout: Duration,
    /// How long opening a connection may take.
    pub connect_timeout: Duration,
    /// The server-side `statement_timeout` of every connection.
    pub statement_timeout: Duration,
    /// The deadline of a whole operation (its transaction), on our side.
    pub op_timeout: Duration,
    pub max_job_size: u32,
    /// This node's name: the leases it holds carry it, and a node starting
    /// under the same name hands back the leases its previous life held.
    pub node_id: String,
    /// The process's facts for beanstalkd's `stats` (pid, version, CPU
    /// time, uptime, host): the binary knows them, this crate does not
    /// read the process. Without it they are zero and empty.
    pub process_stats: Option<ProcessStatsSource>,
}

/// Reads the process's facts when `stats` is answered.
#[derive(Clone)]
pub struct ProcessStatsSource(Arc<dyn Fn() -> ProcessStats + Send + Sync>);

impl ProcessStatsSource {
    pub fn new(read: impl Fn() -> ProcessStats + Send + Sync + 'static) -> ProcessStatsSource {
        ProcessStatsSource(Arc::new(read))
    }

    fn read(&self) -> ProcessStats {
        (self.0)()
    }
}

impl std::fmt::Debug for ProcessStatsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProcessStatsSource")
    }
}

impl PgConfig {
    pub fn new(url: impl Into<String>, node_id: impl Into<String>) -> PgConfig {
        PgConfig {
            url: url.into(),
            pool_size: 16,
            acquire_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
            op_timeout: Duration::from_secs(10),
            max_job_size: spool_proto::limits::DEFAULT_MAX_JOB_SIZE_BYTES,
            node_id: node_id.into(),
            process_stats: None,
        }
    }
}

/// The PostgreSQL broker; cheap to clone (one shared state).
#[derive(Debug, Clone)]
pub struct PgBroker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: Arc<Pool>,
    clock: Clock,
    ctx: Ctx,
    op_timeout: Duration,
    process_stats: Option<ProcessStatsSource>,
    draining: AtomicBool,
    shutting_down: AtomicBool,
    shutdown: watch::Sender<bool>,
    /// Bumped by every clock advance, shutdown and listener reconnect:
    /// every parked wait looks again.
    wake: watch::Sender<u64>,
    /// Parked waits by the queue they wait on: a notification naming a
    /// queue wakes only its waits.
    queue_waits: Mutex<HashMap<String, Vec<WaitEntry>>>,
    next_wait: AtomicU64,
    /// Why the database is unusable, while it is.
    storage_error: Mutex<Option<String>>,
    storage_failed: AtomicBool,
    /// Whether this node's role may vacuum `spool_jobs`, once known.
    vacuum_permitted: OnceLock<bool>,
    query_errors: AtomicU64,
    next_session: AtomicU64,
    /// beanstalkd sessions open on this node (`stats`'s
    /// `current-connections`, per node as each beanstalkd server counts its
    /// own); `next_session` - 1 is the total.
    open_sessions: AtomicU64,
    job_waits: AtomicUsize,
    reserve_waits: AtomicU64,
    /// Row versions this node's reserves and completions left dead in
    /// `spool_jobs_live` since its last vacuum: PostgreSQL's statistics
    /// count them a second or so late, which at thousands of jobs a second
    /// is many times the partition's live rows.
    live_churn: AtomicU64,
    /// Jobs this node finished since its retention last ran: the retention
    /// runs early once they reach [`RETENTION_AFTER_FINISHED`], so the final
    /// rows kept stay near the policy's count instead of swinging by the
    /// thousands that finish between two regular passes.
    finished_since_retention: AtomicU64,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Lateness of what this node's timers made ready and fired, by queue
    /// and by schedule (each node shows its own, as a local broker does).
    skews: Mutex<SkewHistograms>,
    /// A schedule was created or resumed here: the timer task looks at
    /// when it falls due (other nodes find it by their bounded poll).
    schedules_changed: Arc<Notify>,
    /// Completions waiting to go to the database together.
    complete_groups: group::Groups<group::Pending>,
    /// beanstalkd deletes under a lease waiting to go together.
    delete_groups: group::Groups<group::PendingDelete>,
    /// Enqueues of plain jobs waiting to go together as one batch.
    enqueue_groups: group::Groups<group::PendingEnqueue>,
    /// Reserves' looks at one queue waiting to go together.
    reserve_groups: group::Groups<group::PendingReserve>,
}

/// This node's skew histograms, by name.
#[derive(Debug, Default)]
struct SkewHistograms {
    queues: HashMap<String, Histogram>,
    schedules: HashMap<String, Histogram>,
}

impl SkewHistograms {
    fn observe(&mut self, skews: impl Iterator<Item = Skew>) {
        for skew in skews {
            let (map, name, ns) = match skew {
                Skew::Queue(name, ns) => (&mut self.queues, name, ns),
                Skew::Schedule(name, ns) => (&mut self.schedules, name, ns),
            };
            map.entry(name)
                .or_insert_with(Histogram::skew)
                .observe_ns(ns);
        }
    }
}

impl Inner {
    fn skews(&self) -> std::sync::MutexGuard<'_, SkewHistograms> {
        self.skews.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Draining or shutting down: new jobs are refused, and schedules do
    /// not fire.
    fn accepting_refused(&self) -> bool {
        self.draining.load(Ordering::Acquire) || self.shutting_down.load(Ordering::Acquire)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(tasks) = self.tasks.lock() {
            for task in tasks.iter() {
                task.abort();
            }
        }
    }
}

impl PgBroker {
    /// Connects, migrates the schema (under an advisory lock), hands back
    /// the leases this node's previous life held, and starts the listener
    /// and (on the wall clock) the timer task.
    pub async fn connect(config: PgConfig, clock: Clock) -> Result<PgBroker, ConnectError> {
        let mut pg: tokio_postgres::Config = config
            .url
            .parse()
            .map_err(|e: tokio_postgres::Error| ConnectError::BadUrl(e.to_string()))?;
        pg.options(format!(
            "-c statement_timeout={} -c idle_in_transaction_session_timeout={}",
            config.statement_timeout.as_millis(),
            config.op_timeout.as_millis()
        ));
        pg.application_name("spool");
        let pool = Arc::new(Pool::new(
            pg,
            config.pool_size.max(1),
            config.acquire_timeout,
            config.connect_timeout,
        ));
        {
            let (client, connection) = pool
                .connect()
                .await
                .map_err(|e| ConnectError::Unreachable(e.to_string()))?;
            let driver = tokio::spawn(connection);
            let migrated = schema::migrate(&client).await;
            drop(client);
            let _ = driver.await;
            migrated?;
        }
        let (shutdown, _) = watch::channel(false);
        let (wake, _) = watch::channel(0);
        let broker = PgBroker {
            inner: Arc::new(Inner {
                pool,
                clock,
                ctx: Ctx {
                    max_job_size: config.max_job_size,
                    node_id: config.node_id,
                },
                op_timeout: config.op_timeout,
                process_stats: config.process_stats,
                draining: AtomicBool::new(false),
                shutting_down: AtomicBool::new(false),
                shutdown,
                wake,
                queue_waits: Mutex::new(HashMap::new()),
                next_wait: AtomicU64::new(0),
                storage_error: Mutex::new(None),
                skews: Mutex::default(),
                storage_failed: AtomicBool::new(false),
                vacuum_permitted: OnceLock::new(),
                query_errors: AtomicU64::new(0),
                next_session: AtomicU64::new(1),
                open_sessions: AtomicU64::new(0),
                job_waits: AtomicUsize::new(0),
                reserve_waits: AtomicU64::new(0),
                live_churn: AtomicU64::new(0),
                finished_since_retention: AtomicU64::new(0),
                tasks: Mutex::new(Vec::new()),
                schedules_changed: Arc::new(Notify::new()),
                complete_groups: group::Groups::default(),
                delete_groups: group::Groups::default(),
                enqueue_groups: group::Groups::default(),
                reserve_groups: group::Groups::default(),
            }),
        };
        broker
            .run(Task::ReleaseOwnLeases)
            .await
            .map_err(|e| ConnectError::Unreachable(e.to_string()))?;
        let weak = Arc::downgrade(&broker.inner);
        let mut tasks = vec![tokio::spawn(listen(weak.clone()))];
        if !broker.inner.clock.is_manual() {
            let schedules_changed = broker.inner.schedules_changed.clone();
            tasks.push(tokio::spawn(run_timers_periodically(
                weak.clone(),
                schedules_changed,
            )));
            tasks.push(tokio::spawn(vacuum_periodically(weak)));
        }
        if let Ok(mut held) = broker.inner.tasks.lock() {
            held.extend(tasks);
        }
        Ok(broker)
    }

    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    pub fn pool_stats(&self) -> PoolStats {
        PoolStats {
            query_errors: self.inner.query_errors.load(Ordering::Relaxed),
            ..self.inner.pool.stats()
        }
    }

    /// How long this node's operations waited for a database connection
    /// (`spool_db_pool_acquire_seconds`), those that gave up included.
    pub fn pool_acquire_wait(&self) -> spool_broker::Histogram {
        self.inner.pool.acquire_wait()
    }

    /// Vacuums `spool_jobs` if its dead rows are due ([`vacuum_due`]):
    /// what each node's vacuum task does every [`TIMER_INTERVAL`], since
    /// autovacuum looks at a table at most once a minute
    /// (`autovacuum_naptime`), and a minute of churn at thousands of jobs
    /// a second leaves the table several times the size of its rows.
    ///
    /// The first pass asks whether this node's role may vacuum the table;
    /// when it may not, it logs one warning and no pass vacuums again.
    pub async fn vacuum_if_churned(&self) -> Result<VacuumPass, BrokerError> {
        let permitted = match self.inner.vacuum_permitted.get() {
            Some(permitted) => *permitted,
            None => {
                let permitted = match self.run(Task::MayVacuum).await? {
                    Done::MayVacuum(permitted) => permitted,
                    other => {
                        return Err(BrokerError::Internal(format!(
                            "a vacuum privilege check answered {other:?}"
                        )))
                    }
                };
                if self.inner.vacuum_permitted.set(permitted).is_ok() && !permitted {
                    tracing::warn!(
                        "this node's database role may not vacuum spool_jobs (it is not \
                         its owner): its churn is left to autovacuum, and the table \
                         may grow larger under load"
                    );
                }
                permitted
            }
        };
        if !permitted {
            return Ok(VacuumPass {
                dead_rows: 0,
                live_rows: 0,
                vacuumed: false,
                permitted: false,
            });
        }
        let live_churn = self.inner.live_churn.load(Ordering::Relaxed);
        let pass = self.run(Task::VacuumIfChurned(live_churn)).await;
        if matches!(pass, Ok(Done::Vacuum(VacuumPass { vacuumed: true, .. }))) {
            self.inner
                .live_churn
                .fetch_sub(live_churn, Ordering::Relaxed);
        }
        match pass? {
            Done::Vacuum(pass) => Ok(pass),
            other => Err(BrokerError::Internal(format!(
                "a vacuum answered {other:?}"
            ))),
        }
    }

    /// Rebuilds `spool_jobs_live`'s indexes if they hold far more pages than
    /// its rows need ([`reindex_due`]): what the vacuum task looks at every
    /// [`REINDEX_INTERVAL`]. Needs the same privilege
    /// as a vacuum; call it only where [`PgBroker::vacuum_if_churned`]
    /// found it.
    pub async fn reindex_live_if_bloated(&self) -> Result<ReindexPass, BrokerError> {
        match self.run(Task::ReindexLiveIfBloated).await? {
            Done::Reindex(pass) => Ok(pass),
            other => Err(BrokerError::Internal(format!(
                "a rebuild answered {other:?}"
            ))),
        }
    }

    /// Moves a manual clock forward and runs the timers due by then, so
    /// that an operation sent after this returns sees them; parked waits
    /// look again.
    pub async fn advance_clock(&self, ns: u64) -> Result<(), BrokerError> {
        self.inner.clock.advance(ns);
        let result = self.run_timers().await;
        self.wake_waiters();
        result
    }

    /// One pass of every timer at the clock's `now`, then the due
    /// schedules fire.
    pub async fn run_timers(&self) -> Result<(), BrokerError> {
        self.run(Task::Timers).await?;
        self.fire_schedules().await.map(|_| ())
    }

    /// Fires the due schedules, unless the node is draining: then, as on
    /// the local broker, nothing fires and the instants stay due (the next
    /// pass after the drain ends fires them under their misfire policy).
    async fn fire_schedules(&self) -> Result<Done, BrokerError> {
        if self.inner.accepting_refused() {
            return Ok(Done::NextFire(None));
        }
        self.run(Task::FireSchedules).await
    }

    fn wake_waiters(&self) {
        self.inner.wake.send_modify(|generation| *generation += 1);
    }

    fn db_failed(&self, error: DbError) -> BrokerError {
        self.inner.query_errors.fetch_add(1, Ordering::Relaxed);
        let message = error.to_string();
        if error.is_unavailable() {
            if let Ok(mut held) = self.inner.storage_error.lock() {
                *held = Some(message.clone());
            }
            self.inner.storage_failed.store(true, Ordering::Release);
        }
        BrokerError::Storage(message)
    }

    fn db_ok(&self) {
        if self.inner.storage_failed.swap(false, Ordering::AcqRel) {
            if let Ok(mut held) = self.inner.storage_error.lock() {
                *held = None;
            }
        }
    }

    /// Runs `task` in a transaction of its own, again after a retryable
    /// conflict, within the operation's deadline.
    async fn run_with(&self, task: Task, fx: &mut Effects) -> Result<Done, BrokerError> {
        let inner = &self.inner;
        let mut attempt = 0;
        loop {
            attempt += 1;
            // What a rolled-back attempt observed did not happen.
            fx.skews.clear();
            let mut conn = inner.pool.get().await.map_err(|e| self.db_failed(e))?;
            let now = inner.clock.now_ns();
            // Boxed: the operation's future is the size of the largest of
            // them all (kilobytes), and every caller's future held it
            // inline, moved with it into each `join_all` and spawn, though
            // a grouped caller only waits for its group's answer.
            let result = tokio::time::timeout(
                inner.op_timeout,
                Box::pin(ops::run(&mut conn, &inner.ctx, task.clone(), now, fx)),
            )
            .await;
            match result {
                // The connection is mid-transaction: the pool closes it.
                Err(_) => {
                    return Err(self.db_failed(DbError::TimedOut {
                        after_ms: inner.op_timeout.as_millis() as u64,
                    }))
                }
                Ok(Ok(done)) => {
                    self.db_ok();
                    if !fx.skews.is_empty() {
                        inner.skews().observe(fx.skews.drain(..));
                    }
                    return Ok(done);
                }
                Ok(Err(OpError::Broker(error))) => {
                    self.db_ok();
                    return Err(error);
                }
                Ok(Err(OpError::Db(DbError::Retry))) if attempt < OP_ATTEMPTS_MAX => {}
                Ok(Err(OpError::Db(error))) => return Err(self.db_failed(error)),
            }
        }
    }

    async fn run(&self, task: Task) -> Result<Done, BrokerError> {
        self.run_with(task, &mut Effects::default()).await
    }

    /// Boxed, as `run_with` boxes the operation: a caller that may end up
    /// here (a grouped completion or enqueue the group did not settle)
    /// stays small in the common case.
    fn run_op<'a>(
        &'a self,
        op: Op,
        fx: &'a mut Effects,
    ) -> Pin<Box<dyn Future<Output = Result<Outcome, BrokerError>> + Send + 'a>> {
        Box::pin(async move {
            match self.run_with(Task::Op(op), fx).await? {
                Done::Outcome(outcome) => Ok(*outcome),
                other => Err(BrokerError::Internal(format!(
                    "an operation answered {other:?}"
                ))),
            }
        })
    }

    async fn execute(&self, op: Op, sent_ns: u64) -> Result<Outcome, BrokerError> {
        let inner = &self.inner;
        match op {
            Op::Enqueue { .. }
            | Op::EnqueueBatch { .. }
            | Op::StartWorkflow { .. }
            | Op::TriggerSchedule { .. }
                if inner.accepting_refused() =>
            {
                Err(BrokerError::Draining)
            }
            Op::Reserve {
                queues,
                batch,
                timeout_ms,
            } => self
                .reserve_waiting(queues, batch, timeout_ms, sent_ns)
                .await
                .map(Outcome::Leased),
            // Boxed (as `run_op`): every call's future is its largest arm.
            Op::Wait { id, wait_ms } => Box::pin(self.wait_job(id, wait_ms, sent_ns))
                .await
                .map(Outcome::Job),
            // A job refused on its face is not let into a group, where it
            // would refuse the whole batch (and send every member alone).
            Op::Enqueue { queue, job }
                if group::plain(&job)
                    && ops::check_new_job(&inner.ctx, &job, inner.clock.now_ns()).is_ok() =>
            {
                self.enqueue_grouped(queue, job).await
            }
            Op::Complete { lease, result }
                if result
                    .as_ref()
                    .is_none_or(|r| r.len() <= inner.ctx.max_job_size as usize) =>
            {
                self.complete_grouped(lease, result).await
            }
            op @ (Op::PutSchedule { .. } | Op::ResumeSchedule { .. }) => {
                let outcome = self.run_op(op, &mut Effects::default()).await;
                inner.schedules_changed.notify_one();
                outcome
            }
            op => self.run_op(op, &mut Effects::default()).await,
        }
    }

    /// A completion, sent with the others waiting at this node in one
    /// statement (`group.rs`); run alone when the group did not settle it.
    async fn complete_grouped(
        &self,
        lease: Lease,
        result: Option<Bytes>,
    ) -> Result<Outcome, BrokerError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let pending = group::Pending {
            lease,
            result: result.clone(),
            reply,
        };
        if self.inner.complete_groups.join(pending) {
            let broker = self.clone();
            tokio::spawn(async move { broker.run_complete_groups().await });
        }
        match answer.await {
            Ok(Ok(Some(job))) => Ok(Outcome::Job(job)),
            Ok(Ok(None)) => {
                self.run_op(Op::Complete { lease, result }, &mut Effects::default())
                    .await
            }
            Ok(Err(error)) => Err(error),
            Err(_) => Err(BrokerError::Internal(
                "a completion's group ended without answering it".into(),
            )),
        }
    }

    /// Runs groups of completions until none waits; those that arrive
    /// while one is in the database form the next.
    async fn run_complete_groups(&self) {
        while let Some(group) = self
            .inner
            .complete_groups
            .next_group(group::COMPLETE_GROUP_MAX)
        {
            let leases = group.iter().map(|p| (p.lease, p.result.clone())).collect();
            let outcome = match self
                .run_with(Task::CompleteGroup(leases), &mut Effects::default())
                .await
            {
                Ok(Done::Completed(jobs)) => {
                    // Each moved its row out of the live partition.
                    let finished = jobs.len() as u64;
                    self.inner.live_churn.fetch_add(finished, Ordering::Relaxed);
                    self.inner
                        .finished_since_retention
                        .fetch_add(finished, Ordering::Relaxed);
                    Ok(jobs)
                }
                Ok(other) => Err(BrokerError::Internal(format!(
                    "a completion group answered {other:?}"
                ))),
                Err(error) => Err(error),
            };
            group::answer(group, outcome);
        }
    }

    /// An enqueue of a plain job, sent with the others waiting at this node
    /// as one batch enqueue (`group.rs`); run alone when the batch was
    /// refused (a queue full, a job invalid), so each gets its own answer.
    async fn enqueue_grouped(&self, queue: QueueName, job: NewJob) -> Result<Outcome, BrokerError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let pending = group::PendingEnqueue {
            queue: queue.clone(),
            job: job.clone(),
            reply,
        };
        if self.inner.enqueue_groups.join(pending) {
            let broker = self.clone();
            tokio::spawn(async move { broker.run_enqueue_groups().await });
        }
        match answer.await {
            Ok(Ok(Some(job))) => Ok(Outcome::Enqueued {
                job,
                duplicate: false,
            }),
            Ok(Ok(None)) => {
                self.run_op(Op::Enqueue { queue, job }, &mut Effects::default())
                    .await
            }
            Ok(Err(error)) => Err(error),
            Err(_) => Err(BrokerError::Internal(
                "an enqueue's group ended without answering it".into(),
            )),
        }
    }

    /// Runs groups of enqueues until none waits, each one batch enqueue
    /// (one transaction, one `INSERT`). A group of one is its own enqueue,
    /// run by its caller.
    async fn run_enqueue_groups(&self) {
        while let Some(group) = self
            .inner
            .enqueue_groups
            .next_group(spool_engine::limits::ENQUEUE_BATCH_JOBS_MAX)
        {
            if group.len() == 1 {
                group::answer_enqueues(group, Ok(None));
                continue;
            }
            let jobs = group
                .iter()
                .map(|p| (p.queue.clone(), p.job.clone()))
                .collect();
            let outcome = match self
                .run_op(Op::EnqueueBatch { jobs }, &mut Effects::default())
                .await
            {
                Ok(Outcome::Batch(jobs)) => Ok(Some(jobs)),
                Ok(other) => Err(BrokerError::Internal(format!(
                    "an enqueue group answered {other:?}"
                ))),
                // The database's trouble (the batch may even have
                // committed): every member is told, none runs again.
                Err(error @ BrokerError::Storage(_)) => Err(error),
                // Refused as a batch (rolled back): each alone.
                Err(_) => Ok(None),
            };
            group::answer_enqueues(group, outcome);
        }
    }

    /// One look of a reserve of one queue, sent with the others waiting at
    /// this node as one reservation (`group.rs`): one statement and commit
    /// for the node's idle workers, instead of each scanning past the
    /// others' locked rows. Answers its jobs and when to look again.
    async fn reserve_grouped(&self, queue: QueueName, batch: u32) -> group::ReserveAnswer {
        let (reply, answer) = tokio::sync::oneshot::channel();
        if self.inner.reserve_groups.join(group::PendingReserve {
            queue,
            batch,
            reply,
        }) {
            let broker = self.clone();
            tokio::spawn(async move { broker.run_reserve_groups().await });
        }
        answer.await.unwrap_or_else(|_| {
            Err(BrokerError::Internal(
                "a reserve's group ended without answering it".into(),
            ))
        })
    }

    /// Runs groups of reserves until none waits: per queue of a group (in
    /// the order they joined), one transaction leases the members' batches
    /// summed and deals them out.
    async fn run_reserve_groups(&self) {
        while let Some(mut group) = self
            .inner
            .reserve_groups
            .next_group_weighted(group::RESERVE_GROUP_ROWS_MAX, |p| p.batch as usize)
        {
            while let Some(first) = group.first() {
                let queue = first.queue.clone();
                let (members, rest): (Vec<_>, Vec<_>) =
                    group.into_iter().partition(|p| p.queue == queue);
                group = rest;
                let rows = members.iter().map(|p| p.batch).sum();
                let mut fx = Effects::default();
                let outcome = match self
                    .run_with(Task::ReserveGroup { queue, rows }, &mut fx)
                    .await
                {
                    Ok(Done::Leased(leased)) => Ok(leased),
                    Ok(other) => Err(BrokerError::Internal(format!(
                        "a reserve group answered {other:?}"
                    ))),
                    Err(error) => Err(error),
                };
                let unclaimed = group::answer_reserves(members, outcome, fx.wake_at_ns);
                // Leased for callers that went away meanwhile: back to
                // ready now, not at their deadline.
                for leased in unclaimed {
                    let op = Op::Release {
                        lease: leased.lease,
                        delay_ms: 0,
                        priority: None,
                    };
                    if let Err(error) = self.run_op(op, &mut Effects::default()).await {
                        tracing::debug!(%error, "a lease nobody took returns at its deadline");
                    }
                }
            }
        }
    }

    /// beanstalkd's delete of a held job, sent with the others waiting at
    /// this node in one statement (`group.rs`); run alone (a workflow's
    /// job, a refusal to name) when the group did not settle it.
    async fn delete_grouped(&self, lease: spool_broker::Lease) -> Result<(), BrokerError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        if self
            .inner
            .delete_groups
            .join(group::PendingDelete { lease, reply })
        {
            let broker = self.clone();
            tokio::spawn(async move { broker.run_delete_groups().await });
        }
        match answer.await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => self.run(Task::DeleteLeased(lease)).await.map(|_| ()),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(BrokerError::Internal(
                "a delete's group ended without answering it".into(),
            )),
        }
    }

    /// Runs groups of beanstalkd deletes until none waits.
    async fn run_delete_groups(&self) {
        while let Some(group) = self.inner.delete_groups.next_group(group::DELETE_GROUP_MAX) {
            let leases = group.iter().map(|p| p.lease).collect();
            let outcome = match self.run(Task::DeleteGroup(leases)).await {
                Ok(Done::Deleted(ids)) => Ok(ids),
                Ok(other) => Err(BrokerError::Internal(format!(
                    "a delete group answered {other:?}"
                ))),
                Err(error) => Err(error),
            };
            group::answer_deletes(group, outcome);
        }
    }

    /// How long a parked wait sleeps before looking again: until its
    /// deadline or the next instant a timer said to look, at most the
    /// fallback poll. On a manual clock only advances (which wake every
    /// wait) move time, so just the fallback poll.
    fn park_for(&self, deadline_ns: u64, wake_at_ns: Option<u64>) -> Duration {
        if self.inner.clock.is_manual() {
            return WAKE_POLL_INTERVAL;
        }
        let now = self.inner.clock.now_ns();
        let until = wake_at_ns.map_or(deadline_ns, |at| at.min(deadline_ns));
        Duration::from_nanos(until.saturating_sub(now)).min(WAKE_POLL_INTERVAL)
    }

    async fn reserve_waiting(
        &self,
        queues: Vec<QueueName>,
        batch: u32,
        timeout_ms: u64,
        sent_ns: u64,
    ) -> Result<Vec<Leased>, BrokerError> {
        let inner = &self.inner;
        let deadline = sent_ns.saturating_add(timeout_ms.saturating_mul(1_000_000));
        let mut wake = inner.wake.subscribe();
        // Registered before the first look, so no notification in between
        // is missed.
        let names: Vec<&str> = queues.iter().map(|q| q.as_str()).collect();
        let queue_wait = (timeout_ms > 0).then(|| QueueWait::new(inner, &names));
        let mut parked = false;
        let result = loop {
            if inner.shutting_down.load(Ordering::Acquire) {
                break Ok(Vec::new());
            }
            wake.borrow_and_update();
            // The deadline is judged by the clock before the look: a look
            // that began in time and found nothing while the clock passed
            // the deadline looks once more (at or after it).
            let looked_at_ns = inner.clock.now_ns();
            let mut fx = Effects::default();
            let looked = if let ([queue], 1..=spool_engine::limits::RESERVE_BATCH_MAX) =
                (queues.as_slice(), batch)
            {
                self.reserve_grouped(queue.clone(), batch).await
            } else {
                let op = Op::Reserve {
                    queues: queues.clone(),
                    batch,
                    timeout_ms: 0,
                };
                match self.run_op(op, &mut fx).await {
                    Ok(Outcome::Leased(got)) => Ok((got, fx.wake_at_ns)),
                    Ok(other) => Err(BrokerError::Internal(format!("reserve answered {other:?}"))),
                    Err(error) => Err(error),
                }
            };
            let got = match looked {
                Ok((got, wake_at_ns)) => {
                    fx.wake_at_ns = wake_at_ns;
                    got
                }
                Err(error) => break Err(error),
            };
            if !got.is_empty() || looked_at_ns >= deadline {
                // Each reservation left the ready version dead.
                inner
                    .live_churn
                    .fetch_add(got.len() as u64, Ordering::Relaxed);
                break Ok(got);
            }
            if !parked {
                parked = true;
                inner.reserve_waits.fetch_add(1, Ordering::Relaxed);
            }
            let sleep = self.park_for(deadline, fx.wake_at_ns);
            park(&mut wake, queue_wait.as_ref(), sleep).await;
        };
        if parked {
            inner.reserve_waits.fetch_sub(1, Ordering::Relaxed);
        }
        result
    }

    async fn wait_job(&self, id: u64, wait_ms: u64, sent_ns: u64) -> Result<JobView, BrokerError> {
        let inner = &self.inner;
        let deadline = sent_ns.saturating_add(wait_ms.saturating_mul(1_000_000));
        let mut wake = inner.wake.subscribe();
        let mut parked = false;
        let mut queue_wait: Option<QueueWait> = None;
        let result = loop {
            wake.borrow_and_update();
            // As in `reserve_waiting`: the clock before the look decides.
            let looked_at_ns = inner.clock.now_ns();
            let job = match self.run_op(Op::Get { id }, &mut Effects::default()).await {
                Ok(outcome) => outcome.into_job(),
                Err(error) => Err(error),
            };
            let job = match job {
                Ok(job) => job,
                Err(error) => break Err(error),
            };
            let settled = job.state.is_final() || job.state == spool_broker::JobState::Buried;
            if settled || looked_at_ns >= deadline || inner.shutting_down.load(Ordering::Acquire) {
                break Ok(job);
            }
            if !parked {
                if inner.job_waits.fetch_add(1, Ordering::AcqRel) >= JOB_WAITS_MAX {
                    inner.job_waits.fetch_sub(1, Ordering::AcqRel);
                    return Err(BrokerError::TooManyWaits { max: JOB_WAITS_MAX });
                }
                parked = true;
            }
            if queue_wait.is_none() {
                // Settling announces the job's queue. Registered after the
                // first look: the next look, right away, sees a change made
                // in between.
                queue_wait = Some(QueueWait::new(inner, &[job.queue.as_str()]));
                continue;
            }
            let sleep = self.park_for(deadline, None);
            park(&mut wake, queue_wait.as_ref(), sleep).await;
        };
        if parked {
            inner.job_waits.fetch_sub(1, Ordering::AcqRel);
        }
        result
    }
}

/// A parked wait's number and what wakes it.
type WaitEntry = (u64, Arc<Notify>);

/// A parked wait's interest in some queues, withdrawn when dropped.
struct QueueWait {
    inner: Arc<Inner>,
    id: u64,
    queues: Vec<String>,
    notify: Arc<Notify>,
}

impl QueueWait {
    fn new(inner: &Arc<Inner>, queues: &[&str]) -> QueueWait {
        let id = inner.next_wait.fetch_add(1, Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        let mut queues: Vec<String> = queues.iter().map(|q| q.to_string()).collect();
        queues.sort_unstable();
        queues.dedup();
        if let Ok(mut waits) = inner.queue_waits.lock() {
            for queue in &queues {
                waits
                    .entry(queue.clone())
                    .or_default()
                    .push((id, Arc::clone(&notify)));
            }
        }
        QueueWait {
            inner: Arc::clone(inner),
            id,
            queues,
            notify,
        }
    }
}

impl Drop for QueueWait {
    fn drop(&mut self) {
        if let Ok(mut waits) = self.inner.queue_waits.lock() {
            for queue in &self.queues {
                if let Some(list) = waits.get_mut(queue) {
                    list.retain(|(id, _)| *id != self.id);
                    if list.is_empty() {
                        waits.remove(queue);
                    }
                }
            }
        }
    }
}

/// Wakes the waits on `queue` (a permit is kept for one not waiting at
/// this instant, so a wake between its query and its sleep is not lost).
fn wake_queue(inner: &Inner, queue: &str) {
    if let Ok(waits) = inner.queue_waits.lock() {
        for (_, notify) in waits.get(queue).into_iter().flatten() {
            notify.notify_one();
        }
    }
}

/// Sleeps until `changed` (a broadcast wake), the wait's queue is named by
/// a notification, or `limit` passes.
async fn park(wake: &mut watch::Receiver<u64>, queue_wait: Option<&QueueWait>, limit: Duration) {
    let notified = async {
        match queue_wait {
            Some(w) => w.notify.notified().await,
            None => std::future::pending().await,
        }
    };
    let _ = tokio::time::timeout(limit, async {
        tokio::select! {
            _ = wake.changed() => {}
            _ = notified => {}
        }
    })
    .await;
}

/// The listener: one connection that `LISTEN`s and turns every batch of
/// notifications into one wake of the parked waits; reconnects after
/// [`LISTEN_RETRY`] when it loses its connection, waking the waits so that
/// nothing announced meanwhile is missed for longer than a poll.
async fn listen(broker: Weak<Inner>) {
    // Logged when the listener loses the database and when it is back, not
    // at every retry.
    let mut lost = false;
    loop {
        let Some(pool) = broker.upgrade().map(|inner| Arc::clone(&inner.pool)) else {
            return;
        };
        match pool.connect().await {
            Ok((client, mut connection)) => {
                drop(pool);
                if lost {
                    lost = false;
                    tracing::info!("the notification listener is connected again");
                }
                let subscribe = client.batch_execute("LISTEN spool");
                let mut subscribe = pin!(subscribe);
                let mut subscribed = false;
                let ended = poll_fn(|cx| {
                    // Every wait looks again after (re)subscribing; after
                    // that, only the waits of the queues named.
                    let mut woke = false;
                    let mut named: Vec<String> = Vec::new();
                    if !subscribed {
                        match subscribe.as_mut().poll(cx) {
                            Poll::Ready(Ok(())) => {
                                subscribed = true;
                                // Jobs may have come while nobody listened.
                                woke = true;
                            }
                            Poll::Ready(Err(error)) => return Poll::Ready(Some(error)),
                            Poll::Pending => {}
                        }
                    }
                    let ended = loop {
                        match connection.poll_message(cx) {
                            Poll::Ready(Some(Ok(AsyncMessage::Notification(n)))) => {
                                if !named.iter().any(|q| q == n.payload()) {
                                    named.push(n.payload().to_string());
                                }
                            }
                            Poll::Ready(Some(Ok(_))) => {}
                            Poll::Ready(Some(Err(error))) => break Poll::Ready(Some(error)),
                            Poll::Ready(None) => break Poll::Ready(None),
                            Poll::Pending => break Poll::Pending,
                        }
                    };
                    if woke || !named.is_empty() {
                        let Some(inner) = broker.upgrade() else {
                            return Poll::Ready(None);
                        };
                        if woke {
                            inner.wake.send_modify(|g| *g += 1);
                        }
                        for queue in &named {
                            wake_queue(&inner, queue);
                        }
                    }
                    ended
                })
                .await;
                if let Some(error) = ended {
                    lost = true;
                    tracing::warn!(%error, "the notification listener lost its connection");
                }
            }
            Err(error) => {
                drop(pool);
                if !lost {
                    lost = true;
                    tracing::warn!(%error, "the notification listener cannot connect");
                }
            }
        }
        match broker.upgrade() {
            Some(inner) => inner.wake.send_modify(|g| *g += 1),
            None => return,
        }
        tokio::time::sleep(LISTEN_RETRY).await;
    }
}

/// Looks every [`TIMER_INTERVAL`] (wall clock only) whether `spool_jobs`
/// is due a vacuum, and runs it: a task of its own, so that a vacuum (a
/// scan of the table and every index) never holds back the timers and
/// the schedules' firing.
async fn vacuum_periodically(broker: Weak<Inner>) {
    let mut last_rebuild_check = std::time::Instant::now();
    loop {
        tokio::time::sleep(TIMER_INTERVAL).await;
        let Some(inner) = broker.upgrade() else {
            return;
        };
        let broker = PgBroker { inner };
        match broker.vacuum_if_churned().await {
            // Autovacuum alone, as the one warning said.
            Ok(pass) if !pass.permitted => return,
            Ok(pass) if pass.vacuumed => tracing::debug!(?pass, "vacuumed spool_jobs"),
            Ok(_) => {}
            Err(error) => tracing::debug!(%error, "vacuum of spool_jobs failed"),
        }
        // Not only after a vacuum: the peak's pages stay once the churn
        // that made them has stopped and no vacuum is due any more.
        if last_rebuild_check.elapsed() < REINDEX_INTERVAL {
            continue;
        }
        last_rebuild_check = std::time::Instant::now();
        match broker.reindex_live_if_bloated().await {
            Ok(pass) if pass.reindexed => tracing::info!(
                index_bytes_before = pass.index_bytes_before,
                index_bytes_after = pass.index_bytes_after,
                live_rows = pass.live_rows,
                leftovers_dropped = pass.leftovers_dropped,
                "rebuilt the indexes of spool_jobs_live"
            ),
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "rebuilding the indexes of spool_jobs_live failed")
            }
        }
    }
}

/// Runs the timers every [`TIMER_INTERVAL`] (wall clock only), and fires
/// schedules: each pass sleeps until the earliest schedule's due instant if
/// that is sooner, or until a schedule changes on this node.
async fn run_timers_periodically(broker: Weak<Inner>, schedules_changed: Arc<Notify>) {
    let mut pass: u64 = 0;
    // Logged when it starts failing and when it works again, not at every
    // pass while the database is away.
    let mut failing = false;
    let mut next_fire_ms: Option<u64> = None;
    let mut retention_backlog = false;
    loop {
        let mut sleep = TIMER_INTERVAL;
        if let Some(at_ms) = next_fire_ms {
            let now_ns = match broker.upgrade() {
                Some(inner) => inner.clock.now_ns(),
                None => return,
            };
            let until =
                Duration::from_nanos(at_ms.saturating_mul(1_000_000).saturating_sub(now_ns));
            // A floor: a due schedule another node is firing (its row
            // skipped as locked) must not make this loop spin.
            sleep = sleep.min(until.max(SCHEDULE_WAKE_MIN));
        }
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            () = schedules_changed.notified() => {}
        }
        let Some(inner) = broker.upgrade() else {
            return;
        };
        let broker = PgBroker { inner };
        // The retention runs every pass while it has a backlog: jobs
        // finishing faster than one batch every RETENTION_EVERY_PASSES
        // passes would otherwise pile up in the table.
        let finished = broker
            .inner
            .finished_since_retention
            .load(Ordering::Relaxed);
        let task = if retention_backlog
            || pass.is_multiple_of(RETENTION_EVERY_PASSES)
            || finished >= RETENTION_AFTER_FINISHED
        {
            broker
                .inner
                .finished_since_retention
                .fetch_sub(finished, Ordering::Relaxed);
            Task::Timers
        } else {
            Task::DueTimers
        };
        let timers = broker.run(task).await;
        if let Ok(Done::Retention { backlog }) = &timers {
            retention_backlog = *backlog;
        }
        let result = match timers {
            Ok(_) => broker.fire_schedules().await,
            Err(error) => Err(error),
        };
        next_fire_ms = match &result {
            Ok(Done::NextFire(at_ms)) => *at_ms,
            _ => None,
        };
        match result {
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(%error, "the timers cannot run: the database is away or refusing");
            }
            Ok(_) if failing => {
                failing = false;
                tracing::info!("the timers run again");
            }
            _ => {}
        }
        pass = pass.wrapping_add(1);
    }
}

/// beanstalkd sessions' two steps as one statement each: the attempt limit
/// read by key (not `GetQueue`, which counts the queue), and a delete under
/// a lease as one `DELETE` (not a completion and a delete: two commits).
impl SessionBroker for PgBroker {
    fn session_ended(&self) {
        self.inner.open_sessions.fetch_sub(1, Ordering::Relaxed);
    }

    fn attempt_limit(
        &self,
        queue: QueueName,
    ) -> impl Future<Output = Result<Option<u32>, BrokerError>> + Send {
        let this = self.clone();
        async move {
            match this.run(Task::AttemptLimit(queue)).await? {
                Done::AttemptLimit(limit) => Ok(limit),
                other => Err(BrokerError::Internal(format!(
                    "an attempt limit answered {other:?}"
                ))),
            }
        }
    }

    fn delete_leased(
        &self,
        lease: spool_broker::Lease,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send {
        let this = self.clone();
        async move {
            this.delete_grouped(lease).await?;
            // The row left the live partition: a dead version there.
            this.inner.live_churn.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }
}

impl Broker for PgBroker {
    type Session = OpSession<PgBroker>;

    fn open_session(&self, _peer: Peer) -> Result<Self::Session, BrokerError> {
        let id = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        // Counted out by `session_ended` when the session's task ends.
        self.inner.open_sessions.fetch_add(1, Ordering::Relaxed);
        Ok(OpSession::new(
            self.clone(),
            id,
            self.inner.shutdown.subscribe(),
        ))
    }

    fn set_draining(&self, draining: bool) {
        self.inner.draining.store(draining, Ordering::Release);
    }

    fn snapshot(
        &self,
        _scope: SnapshotScope,
    ) -> impl Future<Output = Result<EngineSnapshot, BrokerError>> + Send {
        let this = self.clone();
        async move {
            let figures = match this.run(Task::Counts).await? {
                Done::Counts(figures) => *figures,
                other => return Err(BrokerError::Internal(format!("counts answered {other:?}"))),
            };
            let inner = &this.inner;
            let draining = inner.draining.load(Ordering::Acquire)
                || inner.shutting_down.load(Ordering::Acquire);
            let mut server = ServerStats {
                max_job_size: u64::from(inner.ctx.max_job_size),
                current_tubes: figures.queues.len() as u64,
                current_connections: inner.open_sessions.load(Ordering::Relaxed),
                total_connections: inner.next_session.load(Ordering::Relaxed) - 1,
                draining,
                process: inner
                    .process_stats
                    .as_ref()
                    .map(ProcessStatsSource::read)
                    .unwrap_or_default(),
                ..ServerStats::default()
            };
            let mut jobs_total = 0;
            let skews = inner.skews();
            let queues = figures
                .queues
                .into_iter()
                .map(|q| {
                    server.current_jobs_urgent += q.urgent;
                    server.current_jobs_ready += q.ready;
                    server.current_jobs_reserved += q.reserved;
                    server.current_jobs_delayed += q.delayed;
                    server.current_jobs_buried += q.buried;
                    jobs_total += q.ready + q.reserved + q.delayed + q.buried;
                    let skew = skews
                        .queues
                        .get(&q.name)
                        .cloned()
                        .unwrap_or_else(Histogram::skew);
                    QueueSnapshot {
                        name: q.name,
                        ready: q.ready,
                        urgent: q.urgent,
                        reserved: q.reserved,
                        delayed: q.delayed,
                        buried: q.buried,
                        waiting_reservers: 0,
                        using: 0,
                        watching: 0,
                        paused: q.paused,
                        total_jobs: 0,
                        counters: QueueCounters::default(),
                        wait: Histogram::queue_latency(),
                        run: Histogram::queue_latency(),
                        skew,
                    }
                })
                .collect();
            let mut schedules = figures.schedules;
            for schedule in &mut schedules {
                if let Some(skew) = skews.schedules.get(&schedule.name) {
                    schedule.skew = skew.clone();
                }
            }
            drop(skews);
            Ok(EngineSnapshot {
                now_ns: inner.clock.now_ns(),
                jobs_total,
                queues,
                retired_queues: Vec::new(),
                sessions: Vec::new(),
                draining,
                shutting_down: inner.shutting_down.load(Ordering::Acquire),
                storage_failed: inner.storage_failed.load(Ordering::Acquire),
                disk_full: false,
                next_job_id: 0,
                server,
                waits: WaitCounts {
                    reserve: inner.reserve_waits.load(Ordering::Relaxed),
                    job: inner.job_waits.load(Ordering::Relaxed) as u64,
                },
                // The counters of workflow events are not kept across nodes;
                // the workflows held now are.
                workflows: WorkflowCounters {
                    current: figures.workflows,
                    ..WorkflowCounters::default()
                },
                schedules,
            })
        }
    }

    fn health(&self) -> BrokerHealth {
        let inner = &self.inner;
        let storage_failed = if inner.storage_failed.load(Ordering::Acquire) {
            inner
                .storage_error
                .lock()
                .ok()
                .and_then(|held| held.clone())
        } else {
            None
        };
        BrokerHealth {
            storage_failed,
            disk_full: false,
            draining: inner.draining.load(Ordering::Acquire),
            shutting_down: inner.shutting_down.load(Ordering::Acquire),
        }
    }

    fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::Release);
        self.inner.shutdown.send_replace(true);
        self.wake_waiters();
    }

    fn call(&self, op: Op) -> impl Future<Output = Result<Outcome, BrokerError>> + Send {
        // A wait's time counts from when it was sent, not from when its
        // future is first polled.
        let sent_ns = self.inner.clock.now_ns();
        let this = self.clone();
        async move { this.execute(op, sent_ns).await }
    }
}

#[cfg(test)]
mod future_sizes {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn size_of_ret<A, R, F: Fn(A) -> R>(_: &F) -> usize {
        std::mem::size_of::<R>()
    }

    /// A call's future is moved whole into each `join_all`, spawn and box
    /// of its caller (an HTTP batch completion makes one a job): held
    /// inline, the operation's future made it 10,424 bytes, and copying
    /// those was a fifth of a node's CPU under load.
    #[test]
    fn a_call_does_not_hold_the_operation_inline() {
        let call = size_of_ret(&|(b, op): (PgBroker, Op)| async move { b.call(op).await });
        assert!(call <= 4_096, "a call's future is {call} bytes");
        let complete = size_of_ret(&|(b, lease): (PgBroker, Lease)| async move {
            b.complete_grouped(lease, None).await
        });
        assert!(
            complete <= 1_024,
            "a grouped completion's future is {complete} bytes"
        );
    }
}
