//! Each broker operation as SQL: one transaction per [`Op`], `now` passed
//! as a parameter, the job model's checks in Rust before (or, for the
//! state a row is in, inside) the statements that change anything.
//!
//! Conflicts are found the way the ARCHITECTURE sketch says: an `UPDATE`
//! guarded by the state and lease it needs, and only when it touched no
//! row a second `SELECT` to name why (not found, cancelled, lease expired,
//! wrong state).

use std::collections::{BTreeMap, HashMap, HashSet};

use bytes::Bytes;
use spool_broker::{
    Backoff, BrokerError, Conflict, JobChange, JobPage, JobState, JobView, Lease, Leased, NewJob,
    Op, Outcome, QueueInfo, QueueName, QueuePolicy, RunAt,
};
use spool_engine::limits;
use spool_engine::validate::{check_backoff, check_headers, check_policy};
use spool_engine::workflow::JobEvent;
use tokio_postgres::Row;

use crate::error::{DbError, OpError};
use crate::pool::Conn;
use crate::{schedules, workflows};

pub(crate) const NS_PER_MS: u64 = 1_000_000;
const NS_PER_SEC: u64 = 1_000_000_000;

/// Rows one timer pass moves per kind (due jobs, expired leases, forgotten
/// final jobs, expired keys): a pass stays a short transaction, and a
/// backlog is worked off over passes instead of in one huge one.
pub(crate) const TIMER_BATCH_ROWS: i64 = 1_000;

/// The error of a lease that expired with no heartbeat: the engine's words.
const LEASE_EXPIRED_ERROR: &str = "lease expired: no heartbeat or completion within the TTR";

/// What the operations need of the broker.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub max_job_size: u32,
    /// Whose leases these are: a node that restarts hands its own back.
    pub node_id: String,
}

/// What a transaction leaves for the broker to do after it: when a parked
/// reserve should look again although nobody notified it (a token of a
/// rate limit, the end of a pause), and the lateness of what its timers
/// made ready (kept only once it committed).
#[derive(Debug, Default)]
pub(crate) struct Effects {
    pub wake_at_ns: Option<u64>,
    pub skews: Vec<Skew>,
}

/// How late (due → ready, in ns) a delayed job of a queue or a schedule's
/// firing was, for `spool_schedule_skew_seconds` and
/// `spool_schedule_fire_skew_seconds` on the node that did it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Skew {
    Queue(String, u64),
    Schedule(String, u64),
}

impl Effects {
    fn wake_at(&mut self, at_ns: u64) {
        self.wake_at_ns = Some(self.wake_at_ns.map_or(at_ns, |old| old.min(at_ns)));
    }
}

/// A unit of work run as one transaction.
// One lives per transaction, moved once: boxing the op would cost an
// allocation per call for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub(crate) enum Task {
    Op(Op),
    /// Due jobs, expired leases, retention and expired keys.
    Timers,
    /// Due jobs and expired leases only: the frequent pass.
    DueTimers,
    /// Due schedules fire (their own transaction, so that a schedule's
    /// trouble never holds back the job timers).
    FireSchedules,
    /// Counts per queue and state, for snapshots.
    Counts,
    /// A node starting hands back the leases it held before.
    ReleaseOwnLeases,
    /// A queue policy's attempt limit, for beanstalkd puts.
    AttemptLimit(QueueName),
    /// beanstalkd's delete of a job held under this lease.
    DeleteLeased(Lease),
    /// Completions of several callers in one statement (`group.rs`).
    CompleteGroup(Vec<(Lease, Option<Bytes>)>),
    /// beanstalkd deletes under a lease of several sessions in one
    /// statement (`group.rs`).
    DeleteGroup(Vec<Lease>),
    /// Reserves of one queue by several callers as one reservation of
    /// their batches summed (`group.rs`).
    ReserveGroup {
        queue: QueueName,
        rows: u32,
    },
    /// The hot table's partitions vacuumed (outside any transaction) when
    /// [`vacuum_due`] by their dead rows; the live partition's dead rows at
    /// least the given count: those this node's own operations left, which
    /// the statistics may not show yet.
    VacuumIfChurned(u64),
    /// Whether this node's role may vacuum `spool_jobs`.
    MayVacuum,
    /// The live partition's indexes rebuilt (outside any transaction) when
    /// [`reindex_due`]; the caller holds it to [`REINDEX_INTERVAL`].
    ReindexLiveIfBloated,
}

/// Dead row versions of `spool_jobs` that start a vacuum at the least
/// (a small table is not vacuumed for a handful).
pub const VACUUM_DEAD_ROWS_MIN: u64 = 1_000;
/// ... and beyond that, a quarter of its live rows: each job leaves three
/// dead versions (the reserve's and the completion's updates, the
/// retention's delete), so at thousands of jobs a second a fixed interval
/// lets the dead outgrow the live many times over, while a vacuum due by
/// churn keeps them within a quarter (plus what piles up while one runs).
pub const VACUUM_DEAD_SHARE_OF_LIVE: u64 = 4;

/// ... but a sixteenth for the final partition: its dead rows are the
/// retention's deletes, and until a vacuum enters their space in the free
/// space map every completion's insert extends the heap instead of
/// refilling it (which gives back only empty pages at its end), so the
/// partition's size is its retained rows plus the dead at their peak (at
/// a quarter, 38-45% of its heap was free space at 1M-2M jobs through). A
/// vacuum of it (tens of thousands of rows, a few MB of index) costs
/// milliseconds.
pub const VACUUM_FINAL_DEAD_SHARE_OF_LIVE: u64 = 16;

/// Whether `spool_jobs_live` is due a vacuum with `dead_rows` dead and
/// `live_rows` live versions.
pub fn vacuum_due(dead_rows: u64, live_rows: u64) -> bool {
    dead_rows >= VACUUM_DEAD_ROWS_MIN.saturating_add(live_rows / VACUUM_DEAD_SHARE_OF_LIVE)
}

/// Whether `spool_jobs_final` is due a vacuum with `dead_rows` dead and
/// `live_rows` live versions.
pub fn final_vacuum_due(dead_rows: u64, live_rows: u64) -> bool {
    dead_rows >= VACUUM_DEAD_ROWS_MIN.saturating_add(live_rows / VACUUM_FINAL_DEAD_SHARE_OF_LIVE)
}

/// Bytes of `spool_jobs_live`'s indexes below which they are never
/// rebuilt: a few hundred pages, what a few thousand waiting jobs and the
/// churn between two vacuums need.
pub const REINDEX_LIVE_BYTES_MIN: u64 = 1 << 20;
/// ... and beyond that, bytes of index per live row (its five indexes need
/// about 200 packed): a vacuum frees a B-tree's emptied pages for the
/// index's own reuse but never gives them back, so a peak of dead entries
/// (a burst, a vacuum held back) leaves the nearly empty partition with
/// megabytes of index for good. Only a rebuild returns them.
pub const REINDEX_LIVE_BYTES_PER_ROW: u64 = 1_024;
/// Live rows above which the live partition's indexes are never rebuilt
/// by a node: the rebuild must stay a matter of milliseconds, well inside
/// the statement timeout; a partition that large is a backlog, whose
/// indexes are mostly live entries anyway.
pub const REINDEX_LIVE_ROWS_MAX: u64 = 100_000;
/// How often each node looks whether the live partition's indexes are due
/// a rebuild (one statistics query), so also the shortest time between two
/// rebuilds by one node: a churn that keeps making peaks (a loaded machine
/// whose vacuums fall behind) costs a rebuild of a small table every few
/// seconds at most, and a peak's pages are gone within seconds of it.
pub const REINDEX_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether `spool_jobs_live`'s indexes, `index_bytes` in all, are due a
/// rebuild with `live_rows` live rows in the partition.
pub fn reindex_due(index_bytes: u64, live_rows: u64) -> bool {
    live_rows <= REINDEX_LIVE_ROWS_MAX
        && index_bytes
            >= REINDEX_LIVE_BYTES_MIN.max(live_rows.saturating_mul(REINDEX_LIVE_BYTES_PER_ROW))
}

/// What a [`Task::ReindexLiveIfBloated`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReindexPass {
    /// Bytes of the live partition's indexes before.
    pub index_bytes_before: u64,
    /// ... and after (the same when nothing was rebuilt).
    pub index_bytes_after: u64,
    /// Live rows of the partition in the statistics.
    pub live_rows: u64,
    /// `REINDEX TABLE CONCURRENTLY` ran (not when another node held the
    /// rebuild's advisory lock).
    pub reindexed: bool,
    /// Invalid indexes a rebuild cut short left behind (`…_ccnew`,
    /// `…_ccold`), dropped first.
    pub leftovers_dropped: u32,
}

/// What a [`Task::VacuumIfChurned`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VacuumPass {
    /// Dead row versions of `spool_jobs`' partitions in the statistics.
    pub dead_rows: u64,
    /// Live row versions of `spool_jobs`' partitions in the statistics.
    pub live_rows: u64,
    /// A `VACUUM (SKIP_LOCKED)` of the partitions due ran (it skips one
    /// while another node or autovacuum is vacuuming it).
    pub vacuumed: bool,
    /// This node's role may vacuum the table. When it may not (it is not
    /// the owner), the node never tries again and autovacuum alone cleans
    /// up: a refused `VACUUM` is a warning in PostgreSQL's log each time.
    pub permitted: bool,
}

#[derive(Debug)]
pub(crate) enum Done {
    Outcome(Box<Outcome>),
    Counts(Box<Figures>),
    AttemptLimit(Option<u32>),
    /// The earliest due instant of any schedule, wall-clock ms.
    NextFire(Option<u64>),
    /// The jobs a [`Task::CompleteGroup`] completed.
    Completed(Vec<JobView>),
    /// The jobs a [`Task::DeleteGroup`] deleted.
    Deleted(Vec<u64>),
    /// The jobs a [`Task::ReserveGroup`] leased, in the queue's order.
    Leased(Vec<Leased>),
    /// A [`Task::Timers`] pass: whether the retention has more to delete.
    Retention {
        backlog: bool,
    },
    Vacuum(VacuumPass),
    MayVacuum(bool),
    Reindex(ReindexPass),
    Nothing,
}

/// What a snapshot reads from the database.
#[derive(Debug, Default)]
pub(crate) struct Figures {
    pub queues: Vec<QueueCounts>,
    pub schedules: Vec<spool_broker::ScheduleSnapshot>,
    /// Workflows held now, by state.
    pub workflows: BTreeMap<&'static str, u64>,
}

/// One queue's jobs by state, its pause, for snapshots.
#[derive(Debug, Default, Clone)]
pub(crate) struct QueueCounts {
    pub name: String,
    pub ready: u64,
    pub urgent: u64,
    pub reserved: u64,
    pub delayed: u64,
    pub buried: u64,
    pub paused: bool,
}

// ---- conversions -------------------------------------------------------

pub(crate) fn db_u64(n: u64) -> i64 {
    n.min(i64::MAX as u64) as i64
}

pub(crate) fn from_db(n: i64) -> u64 {
    n.max(0) as u64
}

fn ms(ns: i64) -> u64 {
    from_db(ns) / NS_PER_MS
}

fn state_of(text: &str) -> Result<JobState, OpError> {
    JobState::parse(text).ok_or_else(|| {
        OpError::Broker(BrokerError::Internal(format!(
            "unknown job state {text:?} in the database"
        )))
    })
}

/// The columns a [`JobView`] is read from: the job `j` and its queue `q`
/// (for the queue's backoff), in the order [`view`] reads them.
macro_rules! view_cols {
    () => {
        "j.id, j.queue, j.state, j.priority, j.payload, j.header_names, j.header_values, \
         j.attempts, j.max_attempts, j.backoff_initial_ms, j.backoff_max_ms, \
         j.backoff_multiplier, j.backoff_jitter, q.backoff_initial_ms, q.backoff_max_ms, \
         q.backoff_multiplier, q.backoff_jitter, j.ttr_ms, j.run_at_ns, j.deadline_ns, \
         j.created_ns, j.updated_ns, j.finished_ns, j.last_error, j.result, \
         j.idempotency_key, j.cancel_requested, j.version, j.lease_token, j.workflow_id, \
         j.parent_names, j.parent_results"
    };
}

/// A completion of the live rows that `$held` matches (a condition on the
/// live partition, aliased `spool_jobs`): `g` deletes them; `f` inserts
/// each as completed into the final partition unless its queue keeps no
/// final jobs (`retention_max_jobs` 0, which the embedded engine forgets at
/// once too) and no workflow waits on it; `j` is the rows as completed, for
/// [`select_views!`]. `$result` and `$now` are parameter expressions, the
/// result (of the row `g`) and the time; `$retention` the default
/// retention in ms.
///
/// What PostgreSQL does for an `UPDATE` that moves a row to another
/// partition (delete it, insert it), written out: the row is found once,
/// by primary key, whether it is kept or not. An `UPDATE` beside a delete
/// of the rows kept by none looked each row up twice, and the delete's
/// `EXISTS` on the queue's policy was planned as a join that read every
/// job of the queue (22 ms for 32 rows, measured).
macro_rules! complete_rows {
    ($held:literal, $result:literal, $now:literal, $retention:literal) => {
        concat!(
            "WITH g AS (DELETE FROM spool_jobs_live AS spool_jobs WHERE ",
            $held,
            " RETURNING spool_jobs.*), \
             f AS (INSERT INTO spool_jobs_final (id, queue, state, priority, payload, \
             header_names, header_values, attempts, max_attempts, backoff_initial_ms, \
             backoff_max_ms, backoff_multiplier, backoff_jitter, ttr_ms, run_at_ns, \
             lease_token, deadline_ns, lease_owner, created_ns, updated_ns, finished_ns, \
             purge_at_ns, last_error, result, idempotency_key, cancel_requested, version, \
             reserves, timeouts, releases, buries, kicks, workflow_id, parent_names, \
             parent_results, schedule) \
             SELECT g.id, g.queue, 'completed', g.priority, g.payload, g.header_names, \
             g.header_values, g.attempts, g.max_attempts, g.backoff_initial_ms, \
             g.backoff_max_ms, g.backoff_multiplier, g.backoff_jitter, g.ttr_ms, g.run_at_ns, \
             NULL, NULL, NULL, g.created_ns, ",
            $now,
            ", ",
            $now,
            ", ",
            $now,
            " + coalesce(k.retention_ms, ",
            $retention,
            ") * 1000000, g.last_error, ",
            $result,
            ", g.idempotency_key, g.cancel_requested, g.version + 1, g.reserves, g.timeouts, \
             g.releases, g.buries, g.kicks, g.workflow_id, g.parent_names, g.parent_results, \
             g.schedule FROM g LEFT JOIN spool_queues k ON k.name = g.queue \
             WHERE g.workflow_id IS NOT NULL OR k.retention_max_jobs IS DISTINCT FROM 0), \
             j AS (SELECT id, queue, 'completed' AS state, priority, payload, header_names, \
             header_values, attempts, max_attempts, backoff_initial_ms, backoff_max_ms, \
             backoff_multiplier, backoff_jitter, ttr_ms, run_at_ns, NULL::int8 AS deadline_ns, \
             created_ns, ",
            $now,
            " AS updated_ns, ",
            $now,
            " AS finished_ns, last_error, ",
            $result,
            " AS result, idempotency_key, cancel_requested, version + 1 AS version, \
             NULL::int8 AS lease_token, workflow_id, parent_names, parent_results FROM g)",
            select_views!()
        )
    };
}

/// `SELECT` of the views of the rows a CTE named `j` returns.
macro_rules! select_views {
    () => {
        concat!(
            " SELECT ",
            view_cols!(),
            " FROM j LEFT JOIN spool_queues q ON q.name = j.queue"
        )
    };
}

fn backoff_at(row: &Row, first: usize) -> Option<Backoff> {
    let initial_ms: Option<i64> = row.get(first);
    Some(Backoff {
        initial_ms: from_db(initial_ms?),
        max_ms: from_db(row.get::<_, Option<i64>>(first + 1)?),
        multiplier: row.get::<_, Option<f64>>(first + 2)?,
        jitter: row.get::<_, Option<f64>>(first + 3)?,
    })
}

fn view(row: &Row) -> Result<JobView, OpError> {
    let state = state_of(row.get(2))?;
    let names: Option<Vec<String>> = row.get(5);
    let values: Option<Vec<String>> = row.get(6);
    let headers: BTreeMap<String, String> = names
        .unwrap_or_default()
        .into_iter()
        .zip(values.unwrap_or_default())
        .collect();
    let run_at_ns: Option<i64> = row.get(18);
    let deadline_ns: Option<i64> = row.get(19);
    let finished_ns: Option<i64> = row.get(22);
    let result: Option<Vec<u8>> = row.get(24);
    Ok(JobView {
        id: from_db(row.get(0)),
        queue: row.get(1),
        state,
        priority: from_db(row.get(3)) as u32,
        payload: Bytes::from(row.get::<_, Vec<u8>>(4)),
        headers,
        attempts: row.get::<_, i32>(7).max(0) as u32,
        max_attempts: row.get::<_, i32>(8).max(0) as u32,
        backoff: backoff_at(row, 9)
            .or_else(|| backoff_at(row, 13))
            .unwrap_or_default(),
        ttr_ms: from_db(row.get(17)),
        run_at_ms: (state == JobState::Delayed).then(|| ms(run_at_ns.unwrap_or(0))),
        deadline_at_ms: (state == JobState::Reserved).then(|| ms(deadline_ns.unwrap_or(0))),
        created_at_ms: ms(row.get(20)),
        updated_at_ms: ms(row.get(21)),
        finished_at_ms: state.is_final().then(|| ms(finished_ns.unwrap_or(0))),
        last_error: row.get(23),
        result: result.map(Bytes::from),
        idempotency_key: row.get(25),
        cancel_requested: row.get(26),
        version: from_db(row.get(27)),
        parents: parents_of(row),
    })
}

/// A workflow step's inputs, from the two arrays of the row (NULL for
/// every other job).
fn parents_of(row: &Row) -> BTreeMap<String, Option<Bytes>> {
    let names: Option<Vec<String>> = row.get(30);
    let Some(names) = names else {
        return BTreeMap::new();
    };
    let results: Vec<Option<Vec<u8>>> = row.get::<_, Option<_>>(31).unwrap_or_default();
    names
        .into_iter()
        .zip(results.into_iter().map(|r| r.map(Bytes::from)))
        .collect()
}

/// The workflow a row of [`view_cols`] belongs to, if any.
pub(crate) fn workflow_of(row: &Row) -> Option<i64> {
    row.get(29)
}

fn leased(row: &Row) -> Result<Leased, OpError> {
    let job = view(row)?;
    let token: Option<i64> = row.get(28);
    Ok(Leased {
        lease: Lease {
            job: job.id,
            token: from_db(token.unwrap_or(0)),
        },
        job,
    })
}

fn views(rows: &[Row]) -> Result<Vec<JobView>, OpError> {
    rows.iter().map(view).collect()
}

fn one_view(rows: &[Row]) -> Result<Option<JobView>, OpError> {
    rows.first().map(view).transpose()
}

// ---- the job model's checks (the engine's, for the same answers) -------

/// SplitMix64, as the engine draws a backoff's jitter: from the job and
/// the time, no entropy source; the run-at it gives is what is stored.
fn mix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn jitter_unit(id: u64, now: u64) -> f64 {
    (mix(now ^ id.rotate_left(32)) >> 11) as f64 / (1u64 << 53) as f64
}

fn truncated(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

fn wrong_state(state: JobState) -> OpError {
    OpError::Broker(BrokerError::Conflict(Conflict::WrongState(state)))
}

fn refuse<T>(error: BrokerError) -> Result<T, OpError> {
    Err(OpError::Broker(error))
}

/// The delay until `run_at` in nanoseconds, checked.
pub(crate) fn delay_of(run_at: RunAt, now: u64) -> Result<u64, BrokerError> {
    match run_at {
        RunAt::Now => Ok(0),
        RunAt::DelayMs(ms) if ms > limits::DELAY_MS_MAX => Err(BrokerError::invalid(
            "delay_ms",
            format!("at most {} ms", limits::DELAY_MS_MAX),
        )),
        RunAt::DelayMs(ms) => Ok(ms * NS_PER_MS),
        RunAt::AtMs(at) => {
            let delay = at.saturating_mul(NS_PER_MS).saturating_sub(now);
            if delay > limits::DELAY_MS_MAX * NS_PER_MS {
                return Err(BrokerError::invalid("run_at", "too far in the future"));
            }
            Ok(delay)
        }
    }
}

/// A rate limit as GCRA, as the engine keeps it: a token every
/// `interval_ns`, `tau_ns` of credit beyond the one due now.
#[derive(Debug, Clone, Copy)]
struct Rate {
    interval_ns: u64,
    tau_ns: u64,
}

impl Rate {
    fn of(rate: f64) -> Rate {
        let max = (limits::DELAY_MS_MAX * NS_PER_MS) as f64;
        let interval = (NS_PER_SEC as f64 / rate).ceil();
        let tau = (rate.max(1.0) - 1.0) * NS_PER_SEC as f64 / rate;
        Rate {
            interval_ns: interval.clamp(1.0, max) as u64,
            tau_ns: tau.clamp(0.0, max) as u64,
        }
    }

    fn may_take(&self, tat_ns: u64, now: u64) -> bool {
        now.saturating_add(self.tau_ns) >= tat_ns
    }

    fn take(&self, tat_ns: u64, now: u64) -> u64 {
        tat_ns.max(now).saturating_add(self.interval_ns)
    }
}

// ---- running -----------------------------------------------------------

/// Runs `task` as one transaction at `now` (a single read as one
/// statement, which is a transaction of its own).
pub(crate) async fn run(
    c: &mut Conn,
    ctx: &Ctx,
    task: Task,
    now: u64,
    fx: &mut Effects,
) -> Result<Done, OpError> {
    match task {
        Task::Op(Op::Get { id }) => {
            return Ok(Done::Outcome(Box::new(Outcome::Job(get(c, id).await?))))
        }
        Task::AttemptLimit(queue) => {
            let row = c
                .query_opt(
                    "SELECT max_attempts FROM spool_queues WHERE name = $1",
                    &[&queue.as_str()],
                )
                .await?;
            let limit = row.and_then(|row| row.get::<_, Option<i32>>(0));
            return Ok(Done::AttemptLimit(limit.map(|n| n.max(0) as u32)));
        }
        Task::DeleteLeased(lease) => {
            // One statement, so its own transaction: the row goes and the
            // queue is announced (a freed concurrency slot) at its commit.
            // A workflow's job is left to the transaction below, which also
            // moves its workflow.
            let gone = c
                .query_opt(
                    "WITH j AS (DELETE FROM spool_jobs WHERE id = $1 AND lease_token = $2 \
                     AND state = 'reserved' AND deadline_ns >= $3 AND workflow_id IS NULL \
                     RETURNING queue) SELECT pg_notify('spool', queue) FROM j",
                    &[&db_u64(lease.job), &db_u64(lease.token), &db_u64(now)],
                )
                .await?;
            if gone.is_some() {
                return Ok(Done::Nothing);
            }
        }
        Task::CompleteGroup(group) => {
            // One statement, so its own transaction, committed before
            // anyone is answered.
            return Ok(Done::Completed(complete_group(c, &group, now).await?));
        }
        Task::DeleteGroup(group) => {
            // As a completion group: one statement, committed before
            // anyone is answered.
            return Ok(Done::Deleted(delete_group(c, &group, now).await?));
        }
        Task::VacuumIfChurned(live_churn) => {
            // Each partition by its own rows: the live one, small and
            // churned, is due far more often than the final one.
            let mut partitions = c.jobs_dead_and_live_rows().await?;
            partitions[0].0 = partitions[0].0.max(live_churn);
            let due = [
                vacuum_due(partitions[0].0, partitions[0].1),
                final_vacuum_due(partitions[1].0, partitions[1].1),
            ];
            let vacuumed = due.contains(&true);
            if vacuumed {
                c.vacuum_jobs(due).await?;
            }
            return Ok(Done::Vacuum(VacuumPass {
                dead_rows: partitions.iter().map(|(dead, _)| dead).sum(),
                live_rows: partitions.iter().map(|(_, live)| live).sum(),
                vacuumed,
                permitted: true,
            }));
        }
        Task::MayVacuum => return Ok(Done::MayVacuum(c.may_vacuum_jobs().await?)),
        Task::ReindexLiveIfBloated => {
            let (index_bytes_before, live_rows) = c.live_index_bytes_and_rows().await?;
            let mut pass = ReindexPass {
                index_bytes_before,
                index_bytes_after: index_bytes_before,
                live_rows,
                reindexed: false,
                leftovers_dropped: 0,
            };
            if reindex_due(index_bytes_before, live_rows) {
                if let Some(dropped) = c.reindex_live().await? {
                    pass.reindexed = true;
                    pass.leftovers_dropped = dropped;
                    pass.index_bytes_after = c.live_index_bytes_and_rows().await?.0;
                }
            }
            return Ok(Done::Reindex(pass));
        }
        _ => {}
    }
    c.begin().await?;
    let result = apply(c, ctx, task, now, fx).await;
    match result {
        Ok(done) => {
            c.commit().await?;
            Ok(done)
        }
        Err(error) => {
            c.rollback().await?;
            Err(error)
        }
    }
}

async fn apply(
    c: &mut Conn,
    ctx: &Ctx,
    task: Task,
    now: u64,
    fx: &mut Effects,
) -> Result<Done, OpError> {
    let op = match task {
        Task::Op(op) => op,
        Task::Timers => {
            let backlog = timers(c, ctx, now, fx).await?;
            return Ok(Done::Retention { backlog });
        }
        Task::DueTimers => {
            promote_due(c, now, fx).await?;
            expire_leases(c, ctx, now).await?;
            return Ok(Done::Nothing);
        }
        Task::Counts => {
            return Ok(Done::Counts(Box::new(Figures {
                queues: counts(c, now).await?,
                schedules: schedules::snapshots(c).await?,
                workflows: workflows::count_by_state(c).await?,
            })))
        }
        Task::FireSchedules => {
            return Ok(Done::NextFire(schedules::fire_due(c, ctx, now, fx).await?))
        }
        Task::ReleaseOwnLeases => {
            release_own_leases(c, ctx).await?;
            return Ok(Done::Nothing);
        }
        Task::AttemptLimit(_) => {
            return refuse(BrokerError::Internal(
                "a single statement runs outside a transaction".into(),
            ))
        }
        Task::DeleteLeased(lease) => {
            delete_leased_step(c, ctx, lease, now).await?;
            return Ok(Done::Nothing);
        }
        Task::ReserveGroup { queue, rows } => {
            let queues = [queue];
            return Ok(Done::Leased(
                reserve_rows(c, ctx, &queues, rows, now, fx).await?,
            ));
        }
        Task::CompleteGroup(_)
        | Task::DeleteGroup(_)
        | Task::VacuumIfChurned(_)
        | Task::MayVacuum
        | Task::ReindexLiveIfBloated => {
            return refuse(BrokerError::Internal(
                "a single statement runs outside a transaction".into(),
            ))
        }
    };
    let outcome = match op {
        Op::Enqueue { queue, job } => {
            let mut made = enqueue(c, ctx, vec![(queue, job)], now).await?;
            let (job, duplicate) = made.remove(0);
            Outcome::Enqueued { job, duplicate }
        }
        Op::EnqueueBatch { jobs } => {
            if jobs.len() > limits::ENQUEUE_BATCH_JOBS_MAX {
                return refuse(BrokerError::invalid(
                    "jobs",
                    format!("at most {} jobs a batch", limits::ENQUEUE_BATCH_JOBS_MAX),
                ));
            }
            let made = enqueue(c, ctx, jobs, now).await?;
            Outcome::Batch(made.into_iter().map(|(job, _)| job).collect())
        }
        Op::Reserve { queues, batch, .. } => {
            Outcome::Leased(reserve(c, ctx, &queues, batch, now, fx).await?)
        }
        Op::Heartbeat { lease } => heartbeat(c, lease, now).await?,
        Op::Complete { lease, result } => complete(c, ctx, lease, result, now).await?,
        Op::Fail {
            lease,
            error,
            retry_in_ms,
            permanent,
        } => fail(c, ctx, lease, error, retry_in_ms, permanent, now).await?,
        Op::Release {
            lease,
            delay_ms,
            priority,
        } => release(c, lease, delay_ms, priority, now).await?,
        Op::Bury { id, lease, reason } => bury(c, ctx, id, lease, reason, now).await?,
        Op::Kick { id } => kick(c, ctx, id, now).await?,
        Op::Cancel {
            id,
            expected_version,
        } => cancel(c, ctx, id, expected_version, now).await?,
        Op::Get { id } | Op::Wait { id, .. } => Outcome::Job(get(c, id).await?),
        Op::Update {
            id,
            expected_version,
            change,
        } => update(c, ctx, id, expected_version, change, now).await?,
        Op::Delete {
            id,
            expected_version,
        } => delete(c, ctx, id, expected_version, now).await?,
        Op::List {
            queue,
            state,
            after,
            limit,
        } => list(c, &queue, state, after, limit).await?,
        Op::Purge { queue, state } => purge(c, ctx, &queue, state, now).await?,
        Op::Peek { queue, state } => peek(c, &queue, state).await?,
        Op::SetPolicy { queue, policy } => set_policy(c, &queue, policy, now).await?,
        Op::GetQueue { queue } => Outcome::Queue(queue_info(c, queue.as_str(), now).await?),
        Op::ListQueues => Outcome::Queues(list_queues(c, now).await?),
        Op::Pause { queue, duration_ms } => {
            let until = match duration_ms {
                Some(ms) => db_u64(now.saturating_add(ms.min(limits::DELAY_MS_MAX) * NS_PER_MS)),
                None => i64::MAX,
            };
            c.execute(
                "INSERT INTO spool_queues (name, paused_until_ns) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET paused_until_ns = EXCLUDED.paused_until_ns",
                &[&queue.as_str(), &until],
            )
            .await?;
            Outcome::Queue(queue_info(c, queue.as_str(), now).await?)
        }
        Op::Resume { queue } => {
            c.execute(
                "UPDATE spool_queues SET paused_until_ns = NULL WHERE name = $1",
                &[&queue.as_str()],
            )
            .await?;
            notify(c, queue.as_str()).await?;
            Outcome::Queue(queue_info(c, queue.as_str(), now).await?)
        }
        Op::PutSchedule { name, spec } => schedules::put(c, ctx, name.as_str(), *spec, now).await?,
        Op::GetSchedule { name } => schedules::get(c, name.as_str()).await?,
        Op::ListSchedules => schedules::list(c).await?,
        Op::DeleteSchedule { name } => schedules::delete(c, name.as_str()).await?,
        Op::PauseSchedule { name } => schedules::set_paused(c, name.as_str(), true, now).await?,
        Op::ResumeSchedule { name } => schedules::set_paused(c, name.as_str(), false, now).await?,
        Op::TriggerSchedule { name } => schedules::trigger(c, ctx, name.as_str(), now).await?,
        Op::StartWorkflow { workflow } => workflows::start(c, ctx, workflow, now).await?,
        Op::GetWorkflow { id } => workflows::get(c, id).await?,
        Op::ListWorkflows {
            state,
            after,
            limit,
        } => workflows::list(c, state, after, limit).await?,
        Op::CancelWorkflow { id } => workflows::cancel(c, ctx, id, now).await?,
    };
    Ok(Done::Outcome(Box::new(outcome)))
}

/// Wakes parked reserves and job waits on every node, at commit.
/// (Sent with the transaction's `COMMIT`: no round trip of its own.)
pub(crate) async fn notify(c: &mut Conn, queue: &str) -> Result<(), DbError> {
    c.notify_at_commit(queue);
    Ok(())
}

async fn get(c: &mut Conn, id: u64) -> Result<JobView, OpError> {
    let rows = c
        .query(
            concat!(
                "SELECT ",
                view_cols!(),
                " FROM spool_jobs j LEFT JOIN spool_queues q ON q.name = j.queue WHERE j.id = $1"
            ),
            &[&db_u64(id)],
        )
        .await?;
    one_view(&rows)?.ok_or(OpError::Broker(BrokerError::NotFound))
}

/// beanstalkd's delete of a reserved workflow job: its completion (with no
/// result) to the workflow, in the transaction of the delete; or the
/// refusal when no such reservation exists.
async fn delete_leased_step(
    c: &mut Conn,
    ctx: &Ctx,
    lease: Lease,
    now: u64,
) -> Result<(), OpError> {
    let row = c
        .query_opt(
            "DELETE FROM spool_jobs WHERE id = $1 AND lease_token = $2 \
             AND state = 'reserved' AND deadline_ns >= $3 RETURNING queue, workflow_id",
            &[&db_u64(lease.job), &db_u64(lease.token), &db_u64(now)],
        )
        .await?;
    let Some(row) = row else {
        return Err(lease_refusal(c, lease).await);
    };
    notify(c, row.get(0)).await?;
    if let Some(workflow) = row.get::<_, Option<i64>>(1) {
        let event = JobEvent::Completed { result: None };
        workflows::on_job_event(c, ctx, workflow, lease.job, event, now).await?;
    }
    Ok(())
}

/// Why a guarded change of job `id` touched no row: the job is gone, or
/// in `state`.
async fn state_of_job(c: &mut Conn, id: u64) -> Result<Option<JobState>, OpError> {
    let row = c
        .query_opt("SELECT state FROM spool_jobs WHERE id = $1", &[&db_u64(id)])
        .await?;
    row.map(|row| state_of(row.get(0))).transpose()
}

/// The refusal of an operation under `lease` that found no such
/// reservation.
async fn lease_refusal(c: &mut Conn, lease: Lease) -> OpError {
    match state_of_job(c, lease.job).await {
        Ok(None) => OpError::Broker(BrokerError::NotFound),
        Ok(Some(JobState::Cancelled)) => {
            OpError::Broker(BrokerError::Conflict(Conflict::Cancelled))
        }
        Ok(Some(_)) => OpError::Broker(BrokerError::Conflict(Conflict::LeaseExpired)),
        Err(error) => error,
    }
}

// ---- enqueue -----------------------------------------------------------

/// A checked enqueue, before the queue's defaults.
struct Checked {
    queue: QueueName,
    job: NewJob,
    delay_ns: u64,
}

struct QueueDefaults {
    max_jobs: Option<u64>,
    max_attempts: Option<u32>,
    ttr_ms: Option<u64>,
    /// The queue's backoff, which a new job without its own shows.
    backoff: Option<Backoff>,
}

/// Where jobs come from when not from a client: a workflow's step or
/// compensation, a schedule's firing.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Origin<'a> {
    pub workflow: Option<u64>,
    pub schedule: Option<&'a str>,
    /// The enqueue is the whole operation (a client's): a single job's
    /// `INSERT` may go out with the `COMMIT`.
    pub whole_op: bool,
}

async fn enqueue(
    c: &mut Conn,
    ctx: &Ctx,
    jobs: Vec<(QueueName, NewJob)>,
    now: u64,
) -> Result<Vec<(JobView, bool)>, OpError> {
    let origin = Origin {
        whole_op: true,
        ..Origin::default()
    };
    enqueue_from(c, ctx, jobs, now, origin).await
}

/// What an enqueue of `job` is refused for before any row is read, else
/// its delay from `now`.
pub(crate) fn check_new_job(ctx: &Ctx, job: &NewJob, now: u64) -> Result<u64, OpError> {
    if job.payload.len() > ctx.max_job_size as usize {
        return refuse(BrokerError::TooLarge {
            max_bytes: u64::from(ctx.max_job_size),
        });
    }
    check_headers(&job.headers)?;
    check_backoff(job.backoff.as_ref())?;
    if let Some(key) = &job.idempotency_key {
        if key.is_empty() || key.len() > limits::IDEMPOTENCY_KEY_MAX_BYTES {
            return refuse(BrokerError::invalid(
                "idempotency_key",
                format!("1 to {} bytes", limits::IDEMPOTENCY_KEY_MAX_BYTES),
            ));
        }
    }
    if job.ttr_ms.is_some_and(|t| t > limits::TTR_MS_MAX) {
        return refuse(BrokerError::invalid(
            "ttr_ms",
            format!("at most {} ms", limits::TTR_MS_MAX),
        ));
    }
    Ok(delay_of(job.run_at, now)?)
}

/// Enqueues `jobs` (checked as a client's) made by `origin`.
pub(crate) async fn enqueue_from(
    c: &mut Conn,
    ctx: &Ctx,
    jobs: Vec<(QueueName, NewJob)>,
    now: u64,
    origin: Origin<'_>,
) -> Result<Vec<(JobView, bool)>, OpError> {
    // Everything that needs no row first.
    let mut checked = Vec::with_capacity(jobs.len());
    for (queue, job) in jobs {
        let delay_ns = check_new_job(ctx, &job, now)?;
        checked.push(Checked {
            queue,
            job,
            delay_ns,
        });
    }
    let names: Vec<&str> = {
        let mut names: Vec<&str> = checked.iter().map(|c| c.queue.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names
    };
    let mut defaults: HashMap<String, QueueDefaults> = HashMap::new();
    for row in c
        .query(
            "SELECT name, max_jobs, max_attempts, ttr_ms, backoff_initial_ms, backoff_max_ms, \
             backoff_multiplier, backoff_jitter FROM spool_queues WHERE name = ANY($1)",
            &[&names],
        )
        .await?
    {
        defaults.insert(
            row.get(0),
            QueueDefaults {
                max_jobs: row.get::<_, Option<i64>>(1).map(from_db),
                max_attempts: row.get::<_, Option<i32>>(2).map(|n| n.max(0) as u32),
                ttr_ms: row.get::<_, Option<i64>>(3).map(from_db),
                backoff: backoff_at(&row, 4),
            },
        );
    }
    // Queues with a bound: their rows are locked so that two nodes cannot
    // both take the last place. A workflow's jobs bypass `max_jobs`, as on
    // the local broker: the workflow was admitted whole, and refusing its
    // next step would fail it.
    let mut bounded: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| defaults.get(*n).is_some_and(|d| d.max_jobs.is_some()))
        .filter(|_| origin.workflow.is_none())
        .collect();
    bounded.sort_unstable();
    if !bounded.is_empty() {
        c.query(
            "SELECT 1 FROM spool_queues WHERE name = ANY($1) ORDER BY name FOR UPDATE",
            &[&bounded],
        )
        .await?;
    }
    // Which enqueues a live key answers, by an existing job or by an
    // earlier one of this batch.
    enum Slot {
        New,
        Existing(i64),
        SameAs(usize),
    }
    let mut slots = Vec::with_capacity(checked.len());
    let mut batch_keys: HashMap<(&str, &str), usize> = HashMap::new();
    for (index, job) in checked.iter().enumerate() {
        let Some(key) = job.job.idempotency_key.as_deref() else {
            slots.push(Slot::New);
            continue;
        };
        if let Some(&first) = batch_keys.get(&(job.queue.as_str(), key)) {
            slots.push(Slot::SameAs(first));
            continue;
        }
        let holder = c
            .query_opt(
                "SELECT job_id FROM spool_idempotency \
                 WHERE queue = $1 AND key = $2 AND expires_ns > $3",
                &[&job.queue.as_str(), &key, &db_u64(now)],
            )
            .await?;
        match holder {
            Some(row) => slots.push(Slot::Existing(row.get(0))),
            None => {
                batch_keys.insert((job.queue.as_str(), key), index);
                slots.push(Slot::New);
            }
        }
    }
    let mut added: HashMap<&str, u64> = HashMap::new();
    for (job, slot) in checked.iter().zip(&slots) {
        if matches!(slot, Slot::New) {
            *added.entry(job.queue.as_str()).or_default() += 1;
        }
    }
    for queue in &bounded {
        let Some(max_jobs) = defaults.get(*queue).and_then(|d| d.max_jobs) else {
            continue;
        };
        let live: i64 = c
            .query(QUEUE_LIVE_COUNTS_SQL, &[queue])
            .await?
            .iter()
            .map(|row| row.get::<_, i64>(1))
            .sum();
        if from_db(live) + added.get(queue).copied().unwrap_or(0) > max_jobs {
            return refuse(BrokerError::QueueFull { max_jobs });
        }
    }
    // A batch of plain new jobs (no key, headers or parents: what one row
    // of arrays carries) goes in one statement instead of one a job.
    let plain = |c: &Checked| {
        c.job.idempotency_key.is_none() && c.job.headers.is_empty() && c.job.parents.is_empty()
    };
    if checked.len() > 1
        && slots.iter().all(|s| matches!(s, Slot::New))
        && checked.iter().all(plain)
    {
        return insert_plain(c, &checked, &defaults, now, origin).await;
    }
    let mut made: Vec<(JobView, bool)> = Vec::with_capacity(checked.len());
    let mut ready_queues: HashSet<&str> = HashSet::new();
    for (index, (job, slot)) in checked.iter().zip(&slots).enumerate() {
        let view = match *slot {
            Slot::Existing(id) => (get(c, from_db(id)).await?, true),
            Slot::SameAs(first) => (made[first].0.clone(), true),
            Slot::New => {
                let new = &job.job;
                let (ttr_ms, max_attempts) = job_limits(new, defaults.get(job.queue.as_str()));
                let (state, run_at) = if job.delay_ns > 0 {
                    ("delayed", Some(db_u64(now.saturating_add(job.delay_ns))))
                } else {
                    ready_queues.insert(job.queue.as_str());
                    ("ready", None)
                };
                let (names, values): (Vec<&str>, Vec<&str>) = new
                    .headers
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_str()))
                    .unzip();
                let (names, values) = if names.is_empty() {
                    (None, None)
                } else {
                    (Some(names), Some(values))
                };
                let backoff = new.backoff;
                let (parent_names, parent_results): (Vec<&str>, Vec<Option<&[u8]>>) = new
                    .parents
                    .iter()
                    .map(|(n, r)| (n.as_str(), r.as_deref()))
                    .unzip();
                let (parent_names, parent_results) = if parent_names.is_empty() {
                    (None, None)
                } else {
                    (Some(parent_names), Some(parent_results))
                };
                // One job without a key, the whole operation: nothing follows
                // the insert, so it travels with the COMMIT (and the queue's
                // notification, sent at commit anyway).
                let last = origin.whole_op && checked.len() == 1 && new.idempotency_key.is_none();
                if last {
                    for queue in ready_queues.drain() {
                        notify(c, queue).await?;
                    }
                }
                let rows = c
                    .query_maybe_committing(
                        last,
                        concat!(
                            "WITH j AS (INSERT INTO spool_jobs (id, queue, state, priority, \
                             payload, header_names, header_values, max_attempts, \
                             backoff_initial_ms, backoff_max_ms, backoff_multiplier, \
                             backoff_jitter, ttr_ms, run_at_ns, created_ns, updated_ns, \
                             idempotency_key, version, workflow_id, parent_names, \
                             parent_results, schedule) VALUES (nextval('spool_job_ids'), \
                             $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $14, \
                             $15, 1, $16, $17, $18, $19) RETURNING *)",
                            select_views!()
                        ),
                        &[
                            &job.queue.as_str(),
                            &state,
                            &i64::from(new.priority.unwrap_or(limits::PRIORITY_DEFAULT)),
                            &&new.payload[..],
                            &names,
                            &values,
                            &(max_attempts.min(i32::MAX as u32) as i32),
                            &backoff.map(|b| db_u64(b.initial_ms)),
                            &backoff.map(|b| db_u64(b.max_ms)),
                            &backoff.map(|b| b.multiplier),
                            &backoff.map(|b| b.jitter),
                            &db_u64(ttr_ms),
                            &run_at,
                            &db_u64(now),
                            &new.idempotency_key.as_deref(),
                            &origin.workflow.map(db_u64),
                            &parent_names,
                            &parent_results,
                            &origin.schedule,
                        ],
                    )
                    .await?;
                let view = one_view(&rows)?.ok_or_else(|| {
                    OpError::Broker(BrokerError::Internal("an insert returned no row".into()))
                })?;
                if let Some(key) = new.idempotency_key.as_deref() {
                    let ttl_ms = new
                        .idempotency_ttl_ms
                        .unwrap_or(limits::IDEMPOTENCY_TTL_MS_DEFAULT);
                    let expires = db_u64(now.saturating_add(ttl_ms.saturating_mul(NS_PER_MS)));
                    let claimed = c
                        .execute(
                            "INSERT INTO spool_idempotency (queue, key, job_id, expires_ns) \
                             VALUES ($1, $2, $3, $4) ON CONFLICT (queue, key) DO UPDATE \
                             SET job_id = EXCLUDED.job_id, expires_ns = EXCLUDED.expires_ns \
                             WHERE spool_idempotency.expires_ns <= $5",
                            &[
                                &job.queue.as_str(),
                                &key,
                                &db_u64(view.id),
                                &expires,
                                &db_u64(now),
                            ],
                        )
                        .await?;
                    if claimed == 0 {
                        // Another node committed the key since we looked:
                        // run again, and find its job.
                        return Err(OpError::Db(DbError::Retry));
                    }
                }
                debug_assert!(index == made.len());
                (view, false)
            }
        };
        made.push(view);
    }
    for queue in ready_queues {
        notify(c, queue).await?;
    }
    Ok(made)
}

/// The TTR and attempt limit of a new job: its own, else its queue's, else
/// the defaults.
fn job_limits(job: &NewJob, defaults: Option<&QueueDefaults>) -> (u64, u32) {
    let ttr_ms = job
        .ttr_ms
        .or(defaults.and_then(|d| d.ttr_ms))
        .unwrap_or(limits::TTR_MS_DEFAULT)
        // beanstalkd's least TTR, for jobs of both front doors.
        .max(spool_proto::limits::MIN_TTR_NS / NS_PER_MS);
    let max_attempts = job
        .max_attempts
        .or(defaults.and_then(|d| d.max_attempts))
        .unwrap_or(limits::MAX_ATTEMPTS_DEFAULT);
    (ttr_ms, max_attempts)
}

/// Inserts checked jobs without keys, headers or parents as one
/// statement over arrays (ids taken in the batch's order), and announces
/// the queues with ready jobs at commit.
async fn insert_plain(
    c: &mut Conn,
    checked: &[Checked],
    defaults: &HashMap<String, QueueDefaults>,
    now: u64,
    origin: Origin<'_>,
) -> Result<Vec<(JobView, bool)>, OpError> {
    let n = checked.len();
    let mut queues = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    let mut priorities = Vec::with_capacity(n);
    let mut payloads: Vec<&[u8]> = Vec::with_capacity(n);
    let mut max_attempts = Vec::with_capacity(n);
    let mut backoff_initial = Vec::with_capacity(n);
    let mut backoff_max = Vec::with_capacity(n);
    let mut backoff_multiplier = Vec::with_capacity(n);
    let mut backoff_jitter = Vec::with_capacity(n);
    let mut ttrs = Vec::with_capacity(n);
    let mut run_ats = Vec::with_capacity(n);
    let mut ready_queues: Vec<&str> = Vec::new();
    for job in checked {
        let new = &job.job;
        let (ttr_ms, attempts) = job_limits(new, defaults.get(job.queue.as_str()));
        queues.push(job.queue.as_str());
        if job.delay_ns > 0 {
            states.push("delayed");
            run_ats.push(Some(db_u64(now.saturating_add(job.delay_ns))));
        } else {
            states.push("ready");
            run_ats.push(None);
            if !ready_queues.contains(&job.queue.as_str()) {
                ready_queues.push(job.queue.as_str());
            }
        }
        priorities.push(i64::from(new.priority.unwrap_or(limits::PRIORITY_DEFAULT)));
        payloads.push(&new.payload[..]);
        max_attempts.push(attempts.min(i32::MAX as u32) as i32);
        backoff_initial.push(new.backoff.map(|b| db_u64(b.initial_ms)));
        backoff_max.push(new.backoff.map(|b| db_u64(b.max_ms)));
        backoff_multiplier.push(new.backoff.map(|b| b.multiplier));
        backoff_jitter.push(new.backoff.map(|b| b.jitter));
        ttrs.push(db_u64(ttr_ms));
    }
    for queue in ready_queues {
        notify(c, queue).await?;
    }
    // The whole operation (a client's): nothing follows the insert, so
    // it travels with the COMMIT. Only the ids come back: the rest of
    // each view is what was sent. Returning the rows (and joining them to
    // the input for their order, and to the queues for their backoff) was
    // 43% of the statement's time, measured on a quiet database (4.2
    // against 2.4 ms for 500 jobs), and every payload travelled back.
    let rows = c
        .query_maybe_committing(
            origin.whole_op,
            "WITH input AS (SELECT nextval('spool_job_ids') AS id, t.* FROM \
             unnest($1::text[], $2::text[], $3::int8[], $4::bytea[], $5::int4[], \
             $6::int8[], $7::int8[], $8::float8[], $9::float8[], $10::int8[], $11::int8[]) \
             WITH ORDINALITY AS t(queue, state, priority, payload, max_attempts, \
             backoff_initial_ms, backoff_max_ms, backoff_multiplier, backoff_jitter, \
             ttr_ms, run_at_ns, ord)) \
             INSERT INTO spool_jobs (id, queue, state, priority, payload, \
             max_attempts, backoff_initial_ms, backoff_max_ms, backoff_multiplier, \
             backoff_jitter, ttr_ms, run_at_ns, created_ns, updated_ns, version, \
             workflow_id, schedule) SELECT id, queue, state, priority, payload, \
             max_attempts, backoff_initial_ms, backoff_max_ms, backoff_multiplier, \
             backoff_jitter, ttr_ms, run_at_ns, $12, $12, 1, $13, $14 FROM input \
             ORDER BY ord RETURNING id",
            &[
                &queues,
                &states,
                &priorities,
                &payloads,
                &max_attempts,
                &backoff_initial,
                &backoff_max,
                &backoff_multiplier,
                &backoff_jitter,
                &ttrs,
                &run_ats,
                &db_u64(now),
                &origin.workflow.map(db_u64),
                &origin.schedule,
            ],
        )
        .await?;
    if rows.len() != n {
        return refuse(BrokerError::Internal(format!(
            "a batch insert of {n} jobs returned {} rows",
            rows.len()
        )));
    }
    // The ids were drawn in the input's order (`input` is a CTE with a
    // volatile column, so it is computed once, in the order `unnest`
    // yields the rows), so sorted they line up with the jobs.
    let mut ids: Vec<u64> = rows.iter().map(|row| from_db(row.get(0))).collect();
    ids.sort_unstable();
    let now_ms = now / NS_PER_MS;
    Ok(checked
        .iter()
        .zip(ids)
        .enumerate()
        .map(|(index, (job, id))| {
            let new = &job.job;
            let queue = defaults.get(job.queue.as_str());
            let delayed = job.delay_ns > 0;
            let view = JobView {
                id,
                queue: job.queue.as_str().to_string(),
                state: if delayed {
                    JobState::Delayed
                } else {
                    JobState::Ready
                },
                priority: new.priority.unwrap_or(limits::PRIORITY_DEFAULT),
                payload: new.payload.clone(),
                headers: BTreeMap::new(),
                attempts: 0,
                max_attempts: max_attempts[index].max(0) as u32,
                backoff: new
                    .backoff
                    .or(queue.and_then(|q| q.backoff))
                    .unwrap_or_default(),
                ttr_ms: from_db(ttrs[index]),
                run_at_ms: delayed.then(|| run_ats[index].map_or(0, ms)),
                deadline_at_ms: None,
                created_at_ms: now_ms,
                updated_at_ms: now_ms,
                finished_at_ms: None,
                last_error: None,
                result: None,
                idempotency_key: None,
                cancel_requested: false,
                version: 1,
                parents: BTreeMap::new(),
            };
            (view, false)
        })
        .collect())
}

// ---- leases ------------------------------------------------------------

/// A queue's dispatch state, read in the reserve.
struct Dispatch {
    name: String,
    concurrency: Option<u32>,
    rate: Option<Rate>,
    tat_ns: u64,
}

async fn reserve(
    c: &mut Conn,
    ctx: &Ctx,
    queues: &[QueueName],
    batch: u32,
    now: u64,
    fx: &mut Effects,
) -> Result<Vec<Leased>, OpError> {
    if batch == 0 || batch > limits::RESERVE_BATCH_MAX {
        return refuse(BrokerError::invalid(
            "batch",
            format!("1 to {}", limits::RESERVE_BATCH_MAX),
        ));
    }
    if queues.is_empty() {
        return refuse(BrokerError::invalid("queues", "name at least one queue"));
    }
    reserve_rows(c, ctx, queues, batch, now, fx).await
}

/// [`reserve`] of `batch` jobs at most, checked (a group's may exceed one
/// caller's limit).
async fn reserve_rows(
    c: &mut Conn,
    ctx: &Ctx,
    queues: &[QueueName],
    batch: u32,
    now: u64,
    fx: &mut Effects,
) -> Result<Vec<Leased>, OpError> {
    let mut names: Vec<&str> = queues.iter().map(|q| q.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let mut open: Vec<&str> = names.clone();
    let mut limited: Vec<Dispatch> = Vec::new();
    // Timers first, so that due jobs and expired leases count now; the
    // queues' settings read with them: three statements, one round trip.
    let now_db = db_u64(now);
    let (due, expired, settings) = c
        .query3(
            (PROMOTE_DUE_SQL, &[&now_db, &TIMER_BATCH_ROWS]),
            (EXPIRED_LEASES_SQL, &[&now_db, &TIMER_BATCH_ROWS]),
            (
                "SELECT name, paused_until_ns, concurrency, rate_per_s FROM spool_queues \
                 WHERE name = ANY($1) AND (paused_until_ns IS NOT NULL \
                 OR concurrency IS NOT NULL OR rate_per_s IS NOT NULL)",
                &[&names],
            ),
        )
        .await?;
    promoted(c, due, now, fx).await?;
    expire(c, ctx, expired, now).await?;
    let mut lock: Vec<String> = Vec::new();
    for row in &settings {
        let name: String = row.get(0);
        let paused_until: Option<i64> = row.get(1);
        if let Some(until) = paused_until.map(from_db) {
            if until > now {
                if until != i64::MAX as u64 {
                    fx.wake_at(until);
                }
                open.retain(|n| *n != name);
                continue;
            }
        }
        let concurrency: Option<i32> = row.get(2);
        let rate: Option<f64> = row.get(3);
        if concurrency.is_some() || rate.is_some() {
            open.retain(|n| *n != name);
            lock.push(name);
        }
    }
    if let ([queue], true) = (open.as_slice(), lock.is_empty()) {
        // One queue without dispatch limits (the common case): candidates
        // and their reservation are one statement, sent with the COMMIT.
        // A reservation stays in the live partition, so the statement names
        // it: through the parent, each row was also looked up in the final
        // partition's primary key, and planning took longer (0.29 against
        // 0.21 ms for 41 rows: the plan is made at each call). One lease
        // token for the statement (an init plan, drawn once): a lease is
        // the job and the token, and each reservation of a job draws a
        // new one, which is all a token must do; a draw per row was a
        // sequence lock per row.
        let rows = c
            .query_and_commit(
                concat!(
                    "WITH c AS MATERIALIZED (SELECT id FROM spool_jobs_live WHERE queue = $1 \
                     AND state = 'ready' ORDER BY priority, id LIMIT $2 FOR UPDATE SKIP LOCKED), \
                     j AS (UPDATE spool_jobs_live SET state = 'reserved', \
                     lease_token = (SELECT nextval('spool_lease_tokens')), \
                     deadline_ns = $3 + ttr_ms * 1000000, lease_owner = $4, \
                     reserves = reserves + 1 FROM c WHERE spool_jobs_live.id = c.id \
                     RETURNING spool_jobs_live.*)",
                    select_views!(),
                    " ORDER BY j.priority, j.id"
                ),
                &[queue, &i64::from(batch), &now_db, &ctx.node_id],
            )
            .await?;
        return rows.iter().map(leased).collect();
    }
    if !lock.is_empty() {
        // The limits are global: the queue's row is locked for the
        // transaction, so nodes take slots and tokens one at a time.
        for row in c
            .query(
                "SELECT name, concurrency, rate_per_s, rate_tat_ns FROM spool_queues \
                 WHERE name = ANY($1) ORDER BY name FOR UPDATE",
                &[&lock],
            )
            .await?
        {
            limited.push(Dispatch {
                name: row.get(0),
                concurrency: row.get::<_, Option<i32>>(1).map(|n| n.max(0) as u32),
                rate: row.get::<_, Option<f64>>(2).map(Rate::of),
                tat_ns: from_db(row.get(3)),
            });
        }
    }
    // Candidates: (priority, id, queue index in `limited` or none). One
    // query per queue, so that each is an ordered scan of the queue's part
    // of the ready index that stops at the limit (`queue = ANY(…)` would
    // sort every ready job of the queues).
    let mut candidates: Vec<(i64, i64, Option<usize>)> = Vec::new();
    for queue in &open {
        for row in c
            .query(
                "SELECT priority, id FROM spool_jobs WHERE queue = $1 AND state = 'ready' \
                 ORDER BY priority, id LIMIT $2 FOR UPDATE SKIP LOCKED",
                &[queue, &i64::from(batch)],
            )
            .await?
        {
            candidates.push((row.get(0), row.get(1), None));
        }
    }
    for (index, queue) in limited.iter().enumerate() {
        let mut allowed = u64::from(batch);
        if let Some(concurrency) = queue.concurrency {
            let reserved: i64 = c
                .query_opt(
                    "SELECT count(*) FROM spool_jobs WHERE queue = $1 AND state = 'reserved'",
                    &[&queue.name],
                )
                .await?
                .map_or(0, |row| row.get(0));
            allowed = allowed.min(u64::from(concurrency).saturating_sub(from_db(reserved)));
        }
        if let Some(rate) = queue.rate {
            let mut tat = queue.tat_ns;
            let mut tokens = 0;
            while tokens < allowed && rate.may_take(tat, now) {
                tat = rate.take(tat, now);
                tokens += 1;
            }
            allowed = tokens;
        }
        if allowed == 0 {
            continue;
        }
        for row in c
            .query(
                "SELECT priority, id FROM spool_jobs WHERE queue = $1 AND state = 'ready' \
                 ORDER BY priority, id LIMIT $2 FOR UPDATE SKIP LOCKED",
                &[&queue.name, &db_u64(allowed)],
            )
            .await?
        {
            candidates.push((row.get(0), row.get(1), Some(index)));
        }
    }
    candidates.sort_unstable();
    candidates.truncate(batch as usize);
    let mut taken = vec![0u64; limited.len()];
    for &(_, _, queue) in &candidates {
        if let Some(index) = queue {
            taken[index] += 1;
        }
    }
    for (queue, taken) in limited.iter().zip(taken) {
        let Some(rate) = queue.rate else { continue };
        let mut tat = queue.tat_ns;
        for _ in 0..taken {
            tat = rate.take(tat, now);
        }
        if taken > 0 {
            c.execute(
                "UPDATE spool_queues SET rate_tat_ns = $2 WHERE name = $1",
                &[&queue.name, &db_u64(tat)],
            )
            .await?;
        }
        if !rate.may_take(tat, now) {
            fx.wake_at(tat - rate.tau_ns);
        }
    }
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = candidates.iter().map(|&(_, id, _)| id).collect();
    let rows = c
        .query(
            concat!(
                "WITH j AS (UPDATE spool_jobs_live SET state = 'reserved', \
                 lease_token = (SELECT nextval('spool_lease_tokens')), \
                 deadline_ns = $2 + ttr_ms * 1000000, lease_owner = $3, \
                 reserves = reserves + 1 WHERE id = ANY($1) RETURNING *)",
                select_views!(),
                " ORDER BY j.priority, j.id"
            ),
            &[&ids, &db_u64(now), &ctx.node_id],
        )
        .await?;
    rows.iter().map(leased).collect()
}

async fn heartbeat(c: &mut Conn, lease: Lease, now: u64) -> Result<Outcome, OpError> {
    let row = c
        .query_opt(
            "UPDATE spool_jobs SET deadline_ns = $3 + ttr_ms * 1000000 \
             WHERE id = $1 AND lease_token = $2 AND state = 'reserved' AND deadline_ns >= $3 \
             RETURNING deadline_ns",
            &[&db_u64(lease.job), &db_u64(lease.token), &db_u64(now)],
        )
        .await?;
    match row {
        Some(row) => Ok(Outcome::Deadline(ms(row.get(0)))),
        None => Err(lease_refusal(c, lease).await),
    }
}

async fn complete(
    c: &mut Conn,
    ctx: &Ctx,
    lease: Lease,
    result: Option<Bytes>,
    now: u64,
) -> Result<Outcome, OpError> {
    if result
        .as_ref()
        .is_some_and(|r| r.len() > ctx.max_job_size as usize)
    {
        return refuse(BrokerError::TooLarge {
            max_bytes: u64::from(ctx.max_job_size),
        });
    }
    let rows = c
        .query(
            complete_rows!(
                "id = $1 AND lease_token = $2 AND state = 'reserved' AND deadline_ns >= $3",
                "$4::bytea",
                "$3::int8",
                "$5::int8"
            ),
            &[
                &db_u64(lease.job),
                &db_u64(lease.token),
                &db_u64(now),
                &result.as_deref(),
                &db_u64(limits::RETENTION_MS_DEFAULT),
            ],
        )
        .await?;
    match one_view(&rows)? {
        Some(job) => {
            notify(c, &job.queue).await?;
            if let Some(workflow) = rows.first().and_then(workflow_of) {
                let event = JobEvent::Completed {
                    result: job.result.clone(),
                };
                workflows::on_job_event(c, ctx, workflow, job.id, event, now).await?;
            }
            Ok(Outcome::Job(job))
        }
        None => Err(lease_refusal(c, lease).await),
    }
}

/// Completes every lease of `group` that is held, unexpired and not a
/// workflow's job, in one statement: the same change as [`complete`] makes,
/// with each job's queue announced right after the commit. The jobs it did not complete
/// are not in the answer: their callers run [`complete`] alone, which names
/// the refusal or moves the workflow. Results were checked against the size
/// limit before joining.
///
/// The rows are found by primary key (`id = ANY($1)`), and each row's
/// token and result by a binary search of the ids, which come sorted
/// (`width_bucket`): no join, so no plan can compare every row with every
/// input row. Joined with the input (`FROM unnest(…) WHERE id = input.id`)
/// as before, the generic plan PostgreSQL settles on after a few calls (it
/// assumes 10 input rows) did just that: quadratic, 654 ms for a group of
/// 810 (an HTTP request a reserved batch makes groups that large), and a
/// custom plan over a live partition whose statistics said it was nearly
/// empty looped over a scan of it for each input row, seconds a group.
/// The state test is written `(…) IS TRUE` so that it does not match the
/// partial index of reserved jobs: with `state = 'reserved'` the planner,
/// whose statistics rarely see the many jobs held under load, scans that
/// whole index (and its dead entries) instead: 3.3 ms a statement,
/// measured. The rows are deleted from the live partition by name (see
/// [`complete_rows!`]), so no id is looked up in the final partition.
async fn complete_group(
    c: &mut Conn,
    group: &[(Lease, Option<Bytes>)],
    now: u64,
) -> Result<Vec<JobView>, OpError> {
    // Sorted by id for the statement's binary search. Of two completions
    // of one job (an expired lease's and the new one's) only the first is
    // tried here, the one `group::answer` hands the row to; the other runs
    // alone and gets its own answer.
    let mut sorted: Vec<&(Lease, Option<Bytes>)> = group.iter().collect();
    sorted.sort_by_key(|(lease, _)| lease.job);
    sorted.dedup_by_key(|(lease, _)| lease.job);
    let ids: Vec<i64> = sorted.iter().map(|(l, _)| db_u64(l.job)).collect();
    let tokens: Vec<i64> = sorted.iter().map(|(l, _)| db_u64(l.token)).collect();
    let results: Vec<Option<&[u8]>> = sorted.iter().map(|(_, r)| r.as_deref()).collect();
    let rows = c
        .query(
            COMPLETE_GROUP_SQL,
            &[
                &ids,
                &tokens,
                &results,
                &db_u64(now),
                &db_u64(limits::RETENTION_MS_DEFAULT),
            ],
        )
        .await?;
    let jobs = views(&rows)?;
    // Announced after the commit, not in it (see `Conn::notify_now`). The
    // completions stand whatever happens to the announcement: a failed
    // one is left to the waits' fallback poll, and the connection closed.
    let mut queues: Vec<String> = jobs.iter().map(|j| j.queue.clone()).collect();
    queues.sort_unstable();
    queues.dedup();
    let _ = c.notify_now(&queues).await;
    Ok(jobs)
}

/// [`complete_group`]'s statement: ($1 ids, sorted; $2 lease tokens and
/// $3 results in the same order; $4 now, $5 the default retention in ms)
/// → the views of the jobs completed.
pub const COMPLETE_GROUP_SQL: &str = complete_rows!(
    "spool_jobs.id = ANY($1::int8[]) \
     AND spool_jobs.lease_token = ($2::int8[])[width_bucket(spool_jobs.id, $1::int8[])] \
     AND (spool_jobs.state = 'reserved') IS TRUE AND spool_jobs.deadline_ns >= $4 \
     AND spool_jobs.workflow_id IS NULL",
    "($3::bytea[])[width_bucket(g.id, $1::int8[])]",
    "$4::int8",
    "$5::int8"
);

/// [`delete_group`]'s statement: ($1 ids, sorted; $2 lease tokens in the
/// same order; $3 now) → the ids and queues of the jobs deleted. Found as
/// [`COMPLETE_GROUP_SQL`] finds them.
pub const DELETE_GROUP_SQL: &str = "DELETE FROM spool_jobs WHERE spool_jobs.id = ANY($1::int8[]) \
     AND spool_jobs.lease_token = ($2::int8[])[width_bucket(spool_jobs.id, $1::int8[])] \
     AND spool_jobs.state IN ('ready', 'reserved', 'delayed', 'buried') \
     AND (spool_jobs.state = 'reserved') IS TRUE AND spool_jobs.deadline_ns >= $3 \
     AND spool_jobs.workflow_id IS NULL RETURNING spool_jobs.id, spool_jobs.queue";

/// Deletes every job of `group` held under its lease, unexpired and not a
/// workflow's, in one statement (beanstalkd's delete, as
/// [`Task::DeleteLeased`]'s first statement does for one), and announces
/// their queues after the commit (a freed concurrency slot). The ids it
/// did not delete are not in the answer: their callers run the delete
/// alone, which names the refusal or moves the workflow. Found by primary
/// key, the state test kept off the partial index of reserved jobs as in
/// [`complete_group`].
async fn delete_group(c: &mut Conn, group: &[Lease], now: u64) -> Result<Vec<u64>, OpError> {
    // Sorted by id for the statement's binary search; the first of two
    // deletes of one job only, as in `complete_group`.
    let mut sorted: Vec<&Lease> = group.iter().collect();
    sorted.sort_by_key(|lease| lease.job);
    sorted.dedup_by_key(|lease| lease.job);
    let ids: Vec<i64> = sorted.iter().map(|l| db_u64(l.job)).collect();
    let tokens: Vec<i64> = sorted.iter().map(|l| db_u64(l.token)).collect();
    let rows = c
        .query(DELETE_GROUP_SQL, &[&ids, &tokens, &db_u64(now)])
        .await?;
    let mut queues: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
    queues.sort_unstable();
    queues.dedup();
    // As the completion group's: the deletes stand whatever happens to
    // the announcement.
    let _ = c.notify_now(&queues).await;
    Ok(rows.iter().map(|r| from_db(r.get(0))).collect())
}

/// Where a failed attempt leaves a job: delayed by its backoff (or
/// `retry_in_ms`) while attempts remain, else buried.
fn after_failure(
    id: u64,
    attempts: u32,
    max_attempts: u32,
    backoff: Backoff,
    retry_in_ms: Option<u64>,
    permanent: bool,
    now: u64,
) -> (&'static str, Option<i64>) {
    if permanent || (max_attempts > 0 && attempts >= max_attempts) {
        return ("buried", None);
    }
    let delay_ms = retry_in_ms.unwrap_or_else(|| backoff.delay_ms(attempts, jitter_unit(id, now)));
    if delay_ms == 0 {
        ("ready", None)
    } else {
        let at = now.saturating_add(delay_ms.saturating_mul(NS_PER_MS));
        ("delayed", Some(db_u64(at)))
    }
}

async fn fail(
    c: &mut Conn,
    ctx: &Ctx,
    lease: Lease,
    error: String,
    retry_in_ms: Option<u64>,
    permanent: bool,
    now: u64,
) -> Result<Outcome, OpError> {
    let row = c
        .query_opt(
            "SELECT j.attempts, j.max_attempts, j.backoff_initial_ms, j.backoff_max_ms, \
             j.backoff_multiplier, j.backoff_jitter, q.backoff_initial_ms, q.backoff_max_ms, \
             q.backoff_multiplier, q.backoff_jitter FROM spool_jobs j \
             LEFT JOIN spool_queues q ON q.name = j.queue \
             WHERE j.id = $1 AND j.lease_token = $2 AND j.state = 'reserved' \
             AND j.deadline_ns >= $3 FOR UPDATE OF j",
            &[&db_u64(lease.job), &db_u64(lease.token), &db_u64(now)],
        )
        .await?;
    let Some(row) = row else {
        return Err(lease_refusal(c, lease).await);
    };
    if retry_in_ms.is_some_and(|ms| ms > limits::DELAY_MS_MAX) {
        return refuse(BrokerError::invalid(
            "retry_in_ms",
            format!("at most {} ms", limits::DELAY_MS_MAX),
        ));
    }
    let attempts = (row.get::<_, i32>(0).max(0) as u32).saturating_add(1);
    let max_attempts = row.get::<_, i32>(1).max(0) as u32;
    let backoff = backoff_at(&row, 2)
        .or_else(|| backoff_at(&row, 6))
        .unwrap_or_default();
    let (state, run_at) = after_failure(
        lease.job,
        attempts,
        max_attempts,
        backoff,
        retry_in_ms,
        permanent,
        now,
    );
    let error = truncated(error, limits::ERROR_MAX_BYTES);
    let rows = c
        .query(
            concat!(
                "WITH j AS (UPDATE spool_jobs SET state = $2, attempts = $3, last_error = $4, \
                 run_at_ns = $5, updated_ns = $6, version = version + 1, \
                 buries = buries + (CASE WHEN $2 = 'buried' THEN 1 ELSE 0 END), \
                 lease_token = NULL, deadline_ns = NULL, lease_owner = NULL \
                 WHERE id = $1 RETURNING *)",
                select_views!()
            ),
            &[
                &db_u64(lease.job),
                &state,
                &(attempts.min(i32::MAX as u32) as i32),
                &error,
                &run_at,
                &db_u64(now),
            ],
        )
        .await?;
    let job = one_view(&rows)?.ok_or(OpError::Broker(BrokerError::NotFound))?;
    notify(c, &job.queue).await?;
    if job.state == JobState::Buried {
        if let Some(workflow) = rows.first().and_then(workflow_of) {
            let event = JobEvent::Buried {
                error: job.last_error.clone(),
            };
            workflows::on_job_event(c, ctx, workflow, job.id, event, now).await?;
        }
    }
    Ok(Outcome::Job(job))
}

async fn release(
    c: &mut Conn,
    lease: Lease,
    delay_ms: u64,
    priority: Option<u32>,
    now: u64,
) -> Result<Outcome, OpError> {
    let delay_ns = delay_of(RunAt::DelayMs(delay_ms), now)?;
    let (state, run_at) = if delay_ns > 0 {
        ("delayed", Some(db_u64(now.saturating_add(delay_ns))))
    } else {
        ("ready", None)
    };
    let rows = c
        .query(
            concat!(
                "WITH j AS (UPDATE spool_jobs SET state = $4, run_at_ns = $5, \
                 priority = coalesce($6, priority), releases = releases + 1, \
                 updated_ns = $3, version = version + 1, \
                 lease_token = NULL, deadline_ns = NULL, lease_owner = NULL \
                 WHERE id = $1 AND lease_token = $2 AND state = 'reserved' AND deadline_ns >= $3 \
                 RETURNING *)",
                select_views!()
            ),
            &[
                &db_u64(lease.job),
                &db_u64(lease.token),
                &db_u64(now),
                &state,
                &run_at,
                &priority.map(i64::from),
            ],
        )
        .await?;
    match one_view(&rows)? {
        Some(job) => {
            notify(c, &job.queue).await?;
            Ok(Outcome::Job(job))
        }
        None => Err(lease_refusal(c, lease).await),
    }
}

async fn bury(
    c: &mut Conn,
    ctx: &Ctx,
    id: u64,
    lease: Option<Lease>,
    reason: Option<String>,
    now: u64,
) -> Result<Outcome, OpError> {
    let reason = reason.map(|r| truncated(r, limits::ERROR_MAX_BYTES));
    let rows = match lease {
        Some(lease) if lease.job != id => {
            return refuse(BrokerError::Conflict(Conflict::LeaseExpired))
        }
        Some(lease) => {
            c.query(
                concat!(
                    "WITH j AS (UPDATE spool_jobs SET state = 'buried', \
                     last_error = coalesce($4, last_error), buries = buries + 1, \
                     updated_ns = $3, version = version + 1, run_at_ns = NULL, \
                     lease_token = NULL, deadline_ns = NULL, lease_owner = NULL \
                     WHERE id = $1 AND lease_token = $2 AND state = 'reserved' \
                     AND deadline_ns >= $3 RETURNING *)",
                    select_views!()
                ),
                &[
                    &db_u64(id),
                    &db_u64(lease.token),
                    &db_u64(now),
                    &reason.as_deref(),
                ],
            )
            .await?
        }
        None => {
            c.query(
                concat!(
                    "WITH j AS (UPDATE spool_jobs SET state = 'buried', \
                     last_error = coalesce($3, last_error), buries = buries + 1, \
                     updated_ns = $2, version = version + 1, run_at_ns = NULL \
                     WHERE id = $1 AND state IN ('ready', 'delayed') RETURNING *)",
                    select_views!()
                ),
                &[&db_u64(id), &db_u64(now), &reason.as_deref()],
            )
            .await?
        }
    };
    match (one_view(&rows)?, lease) {
        (Some(job), _) => {
            notify(c, &job.queue).await?;
            if let Some(workflow) = rows.first().and_then(workflow_of) {
                let event = JobEvent::Buried {
                    error: job.last_error.clone(),
                };
                workflows::on_job_event(c, ctx, workflow, job.id, event, now).await?;
            }
            Ok(Outcome::Job(job))
        }
        (None, Some(lease)) => Err(lease_refusal(c, lease).await),
        (None, None) => match state_of_job(c, id).await? {
            None => refuse(BrokerError::NotFound),
            Some(state) => Err(wrong_state(state)),
        },
    }
}

async fn kick(c: &mut Conn, ctx: &Ctx, id: u64, now: u64) -> Result<Outcome, OpError> {
    let rows = c
        .query(
            concat!(
                "WITH j AS (UPDATE spool_jobs SET state = 'ready', run_at_ns = NULL, \
                 kicks = kicks + 1, updated_ns = $2, version = version + 1 \
                 WHERE id = $1 AND state IN ('buried', 'delayed') RETURNING *)",
                select_views!()
            ),
            &[&db_u64(id), &db_u64(now)],
        )
        .await?;
    match one_view(&rows)? {
        Some(job) => {
            notify(c, &job.queue).await?;
            // Only a buried compensation job's kick means anything to its
            // workflow (a delayed one's is ignored by the state machine).
            if let Some(workflow) = rows.first().and_then(workflow_of) {
                workflows::on_job_event(c, ctx, workflow, job.id, JobEvent::Kicked, now).await?;
            }
            Ok(Outcome::Job(job))
        }
        None => match state_of_job(c, id).await? {
            None => refuse(BrokerError::NotFound),
            Some(state) => Err(wrong_state(state)),
        },
    }
}

/// Locks job `id` and checks it is live and at `expected` (if given).
async fn lock_live(
    c: &mut Conn,
    id: u64,
    expected: Option<u64>,
    refuse_reserved: bool,
) -> Result<JobState, OpError> {
    let row = c
        .query_opt(
            "SELECT state, version FROM spool_jobs WHERE id = $1 FOR UPDATE",
            &[&db_u64(id)],
        )
        .await?;
    let Some(row) = row else {
        return refuse(BrokerError::NotFound);
    };
    let state = state_of(row.get(0))?;
    if state.is_final() || (refuse_reserved && state == JobState::Reserved) {
        return Err(wrong_state(state));
    }
    let current = from_db(row.get(1));
    match expected {
        Some(expected) if expected != current => refuse(BrokerError::VersionMismatch { current }),
        _ => Ok(state),
    }
}

async fn cancel(
    c: &mut Conn,
    ctx: &Ctx,
    id: u64,
    expected_version: Option<u64>,
    now: u64,
) -> Result<Outcome, OpError> {
    lock_live(c, id, expected_version, false).await?;
    let rows = c
        .query(
            concat!(
                "WITH j AS (UPDATE spool_jobs SET state = 'cancelled', cancel_requested = true, \
                 finished_ns = $2, updated_ns = $2, version = version + 1, run_at_ns = NULL, \
                 purge_at_ns = $2 + coalesce((SELECT retention_ms FROM spool_queues \
                 WHERE name = spool_jobs.queue), $3) * 1000000, \
                 lease_token = NULL, deadline_ns = NULL, lease_owner = NULL \
                 WHERE id = $1 RETURNING *)",
                select_views!()
            ),
            &[
                &db_u64(id),
                &db_u64(now),
                &db_u64(limits::RETENTION_MS_DEFAULT),
            ],
        )
        .await?;
    let job = one_view(&rows)?.ok_or(OpError::Broker(BrokerError::NotFound))?;
    notify(c, &job.queue).await?;
    if let Some(workflow) = rows.first().and_then(workflow_of) {
        workflows::on_job_event(c, ctx, workflow, job.id, JobEvent::Cancelled, now).await?;
    }
    Ok(Outcome::Job(job))
}

async fn update(
    c: &mut Conn,
    ctx: &Ctx,
    id: u64,
    expected_version: Option<u64>,
    change: JobChange,
    now: u64,
) -> Result<Outcome, OpError> {
    let state = lock_live(c, id, expected_version, true).await?;
    if change
        .payload
        .as_ref()
        .is_some_and(|p| p.len() > ctx.max_job_size as usize)
    {
        return refuse(BrokerError::TooLarge {
            max_bytes: u64::from(ctx.max_job_size),
        });
    }
    if let Some(headers) = &change.headers {
        check_headers(headers)?;
    }
    let delay_ns = change.run_at.map(|r| delay_of(r, now)).transpose()?;
    // A new run-at moves the job to ready or delayed; else it stays where
    // it is (a delayed one keeps its due time).
    let (new_state, run_at) = match (delay_ns, state) {
        (Some(0), _) => ("ready", None),
        (Some(delay), _) => ("delayed", Some(db_u64(now.saturating_add(delay)))),
        (None, JobState::Delayed) => ("delayed", None),
        (None, JobState::Buried) => ("buried", None),
        (None, _) => ("ready", None),
    };
    let (names, values): (Option<Vec<&str>>, Option<Vec<&str>>) = match &change.headers {
        Some(headers) => {
            let (n, v) = headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .unzip();
            (Some(n), Some(v))
        }
        None => (None, None),
    };
    let rows = c
        .query(
            concat!(
                "WITH j AS (UPDATE spool_jobs SET state = $2, \
                 run_at_ns = CASE WHEN $2 = 'delayed' THEN coalesce($3, run_at_ns) END, \
                 priority = coalesce($4, priority), max_attempts = coalesce($5, max_attempts), \
                 payload = coalesce($6, payload), \
                 header_names = CASE WHEN $7 THEN $8 ELSE header_names END, \
                 header_values = CASE WHEN $7 THEN $9 ELSE header_values END, \
                 updated_ns = $10, version = version + 1 WHERE id = $1 RETURNING *)",
                select_views!()
            ),
            &[
                &db_u64(id),
                &new_state,
                &run_at,
                &change.priority.map(i64::from),
                &change.max_attempts.map(|n| n.min(i32::MAX as u32) as i32),
                &change.payload.as_deref(),
                &change.headers.is_some(),
                &names,
                &values,
                &db_u64(now),
            ],
        )
        .await?;
    let job = one_view(&rows)?.ok_or(OpError::Broker(BrokerError::NotFound))?;
    if job.state == JobState::Ready {
        notify(c, &job.queue).await?;
    }
    Ok(Outcome::Job(job))
}

async fn delete(
    c: &mut Conn,
    ctx: &Ctx,
    id: u64,
    expected_version: Option<u64>,
    now: u64,
) -> Result<Outcome, OpError> {
    let row = c
        .query_opt(
            "SELECT state, version, workflow_id FROM spool_jobs WHERE id = $1 FOR UPDATE",
            &[&db_u64(id)],
        )
        .await?;
    let Some(row) = row else {
        return refuse(BrokerError::NotFound);
    };
    let state = state_of(row.get(0))?;
    if state == JobState::Reserved {
        return Err(wrong_state(state));
    }
    let current = from_db(row.get(1));
    if expected_version.is_some_and(|v| v != current) {
        return refuse(BrokerError::VersionMismatch { current });
    }
    c.execute("DELETE FROM spool_jobs WHERE id = $1", &[&db_u64(id)])
        .await?;
    // A live step job deleted is one cancelled, for its workflow.
    if let (Some(workflow), false) = (row.get::<_, Option<i64>>(2), state.is_final()) {
        workflows::on_job_event(c, ctx, workflow, id, JobEvent::Cancelled, now).await?;
    }
    Ok(Outcome::Done)
}

// ---- queues ------------------------------------------------------------

/// `$build!("<name>")` for `state`'s name: statements that write the state
/// into their text as a literal (see [`list_sql`]), one per state.
macro_rules! by_state {
    ($state:expr, $build:ident) => {
        match $state {
            JobState::Ready => $build!("ready"),
            JobState::Reserved => $build!("reserved"),
            JobState::Delayed => $build!("delayed"),
            JobState::Buried => $build!("buried"),
            JobState::Completed => $build!("completed"),
            JobState::Cancelled => $build!("cancelled"),
        }
    };
}

/// `list`'s statement for jobs in `state`: ($1 queue, $2 after this id,
/// $3 rows) → views in id order. The state is written into the statement,
/// not passed: the partial index of delayed and buried jobs serves only a
/// statement whose state is known when it is planned, and a literal prunes
/// to one partition.
pub fn list_sql(state: JobState) -> &'static str {
    macro_rules! list_in {
        ($state:literal) => {
            concat!(
                "SELECT ",
                view_cols!(),
                " FROM spool_jobs j LEFT JOIN spool_queues q ON q.name = j.queue \
                 WHERE j.queue = $1 AND j.state = '",
                $state,
                "' AND j.id > $2 ORDER BY j.id LIMIT $3"
            )
        };
    }
    by_state!(state, list_in)
}

async fn list(
    c: &mut Conn,
    queue: &QueueName,
    state: JobState,
    after: Option<u64>,
    limit: u32,
) -> Result<Outcome, OpError> {
    if limit == 0 || limit > limits::LIST_LIMIT_MAX {
        return refuse(BrokerError::invalid(
            "limit",
            format!("1 to {}", limits::LIST_LIMIT_MAX),
        ));
    }
    let sql = list_sql(state);
    let rows = c
        .query(
            sql,
            &[
                &queue.as_str(),
                &db_u64(after.unwrap_or(0)),
                &(i64::from(limit) + 1),
            ],
        )
        .await?;
    let mut jobs = views(&rows)?;
    let more = jobs.len() > limit as usize;
    jobs.truncate(limit as usize);
    let next = more.then(|| jobs.last().map(|j| j.id)).flatten();
    Ok(Outcome::Page(JobPage { jobs, next }))
}

/// `Op::Peek`'s statement for `state` ($1 queue) → the view of the tube's
/// first job in that state as beanstalkd's peek commands order them: ready
/// jobs by priority, then id (the ready index); delayed ones by due time;
/// buried ones by when they were buried, which is a buried job's last
/// change (`updated_ns`). `None` for the other states.
pub fn peek_sql(state: JobState) -> Option<&'static str> {
    macro_rules! first_in {
        ($state:literal, $order:literal) => {
            concat!(
                "SELECT ",
                view_cols!(),
                " FROM spool_jobs_live j LEFT JOIN spool_queues q ON q.name = j.queue \
                 WHERE j.queue = $1 AND j.state = '",
                $state,
                "' ORDER BY ",
                $order,
                " LIMIT 1"
            )
        };
    }
    match state {
        JobState::Ready => Some(first_in!("ready", "j.priority, j.id")),
        JobState::Delayed => Some(first_in!("delayed", "j.run_at_ns, j.id")),
        JobState::Buried => Some(first_in!("buried", "j.updated_ns, j.id")),
        _ => None,
    }
}

async fn peek(c: &mut Conn, queue: &QueueName, state: JobState) -> Result<Outcome, OpError> {
    let Some(sql) = peek_sql(state) else {
        return refuse(BrokerError::invalid("state", "ready, delayed or buried"));
    };
    match one_view(&c.query(sql, &[&queue.as_str()]).await?)? {
        Some(job) => Ok(Outcome::Job(job)),
        None => refuse(BrokerError::NotFound),
    }
}

async fn purge(
    c: &mut Conn,
    ctx: &Ctx,
    queue: &QueueName,
    state: JobState,
    now: u64,
) -> Result<Outcome, OpError> {
    if state == JobState::Reserved {
        return refuse(BrokerError::invalid(
            "state",
            "reserved jobs are not purged: cancel them",
        ));
    }
    // The step jobs among the deleted rows, with their workflows: live ones
    // are cancelled steps to their workflows.
    // The state a literal, as in `list`.
    macro_rules! purge_in {
        ($state:literal) => {
            concat!(
                "WITH d AS (DELETE FROM spool_jobs WHERE id IN (SELECT id FROM spool_jobs \
                 WHERE queue = $1 AND state = '",
                $state,
                "' ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 RETURNING id, workflow_id) SELECT count(*), \
                 array_agg(id ORDER BY id) FILTER (WHERE workflow_id IS NOT NULL), \
                 array_agg(workflow_id ORDER BY id) FILTER (WHERE workflow_id IS NOT NULL) FROM d"
            )
        };
    }
    let sql = by_state!(state, purge_in);
    let rows = c
        .query(sql, &[&queue.as_str(), &(limits::PURGE_JOBS_MAX as i64)])
        .await?;
    let Some(row) = rows.first() else {
        return Ok(Outcome::Purged(0));
    };
    let purged = from_db(row.get(0));
    let jobs: Option<Vec<i64>> = row.get(1);
    let owners: Option<Vec<i64>> = row.get(2);
    if let (Some(jobs), Some(owners), false) = (jobs, owners, state.is_final()) {
        for (job, workflow) in jobs.into_iter().zip(owners) {
            workflows::on_job_event(c, ctx, workflow, from_db(job), JobEvent::Cancelled, now)
                .await?;
        }
    }
    Ok(Outcome::Purged(purged))
}

async fn set_policy(
    c: &mut Conn,
    queue: &QueueName,
    policy: QueuePolicy,
    now: u64,
) -> Result<Outcome, OpError> {
    check_policy(&policy)?;
    let backoff = policy.backoff;
    c.execute(
        "INSERT INTO spool_queues (name, max_jobs, max_attempts, backoff_initial_ms, \
         backoff_max_ms, backoff_multiplier, backoff_jitter, ttr_ms, retention_ms, \
         retention_max_jobs, concurrency, rate_per_s) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
         ON CONFLICT (name) DO UPDATE SET max_jobs = EXCLUDED.max_jobs, \
         max_attempts = EXCLUDED.max_attempts, backoff_initial_ms = EXCLUDED.backoff_initial_ms, \
         backoff_max_ms = EXCLUDED.backoff_max_ms, \
         backoff_multiplier = EXCLUDED.backoff_multiplier, \
         backoff_jitter = EXCLUDED.backoff_jitter, ttr_ms = EXCLUDED.ttr_ms, \
         retention_ms = EXCLUDED.retention_ms, retention_max_jobs = EXCLUDED.retention_max_jobs, \
         concurrency = EXCLUDED.concurrency, rate_per_s = EXCLUDED.rate_per_s",
        &[
            &queue.as_str(),
            &policy.max_jobs.map(db_u64),
            &policy.max_attempts.map(|n| n.min(i32::MAX as u32) as i32),
            &backoff.map(|b| db_u64(b.initial_ms)),
            &backoff.map(|b| db_u64(b.max_ms)),
            &backoff.map(|b| b.multiplier),
            &backoff.map(|b| b.jitter),
            &policy.ttr_ms.map(db_u64),
            &policy.retention_ms.map(db_u64),
            &policy.retention_max_jobs.map(db_u64),
            &policy.concurrency.map(|n| n.min(i32::MAX as u32) as i32),
            &policy.rate_per_s,
        ],
    )
    .await?;
    // The new retention applies to the final jobs kept now.
    c.execute(
        "UPDATE spool_jobs SET purge_at_ns = finished_ns + $2::bigint * 1000000 \
         WHERE queue = $1 AND state IN ('completed', 'cancelled')",
        &[
            &queue.as_str(),
            &db_u64(policy.retention_ms.unwrap_or(limits::RETENTION_MS_DEFAULT)),
        ],
    )
    .await?;
    // Lifted or loosened limits may open the queue.
    notify(c, queue.as_str()).await?;
    Ok(Outcome::Queue(queue_info(c, queue.as_str(), now).await?))
}

fn policy_of(row: &Row) -> (QueuePolicy, Option<u64>) {
    let policy = QueuePolicy {
        max_jobs: row.get::<_, Option<i64>>(1).map(from_db),
        max_attempts: row.get::<_, Option<i32>>(2).map(|n| n.max(0) as u32),
        backoff: backoff_at(row, 3),
        ttr_ms: row.get::<_, Option<i64>>(7).map(from_db),
        retention_ms: row.get::<_, Option<i64>>(8).map(from_db),
        retention_max_jobs: row.get::<_, Option<i64>>(9).map(from_db),
        concurrency: row.get::<_, Option<i32>>(10).map(|n| n.max(0) as u32),
        rate_per_s: row.get(11),
    };
    (policy, row.get::<_, Option<i64>>(12).map(from_db))
}

fn count_into(info: &mut QueueInfo, state: &str, count: i64) {
    let count = from_db(count);
    match JobState::parse(state) {
        Some(JobState::Ready) => info.ready = count,
        Some(JobState::Reserved) => info.reserved = count,
        Some(JobState::Delayed) => info.delayed = count,
        Some(JobState::Buried) => info.buried = count,
        Some(JobState::Completed) => info.completed = count,
        Some(JobState::Cancelled) => info.cancelled = count,
        None => {}
    }
}

fn set_settings(info: &mut QueueInfo, row: &Row, now: u64) {
    let (policy, paused_until) = policy_of(row);
    info.policy = policy;
    info.paused_until_ms = paused_until.filter(|&until| until > now).map(|until| {
        if until == i64::MAX as u64 {
            u64::MAX
        } else {
            until / NS_PER_MS
        }
    });
}

/// A queue's live jobs by state: ($1 queue) → a (state, count) row for
/// each live state, 0 included. Each state is counted through an index
/// that leads with the queue (the live partition has no `(queue, state,
/// id)` index since schema 5: ready jobs by the ready index, delayed and
/// buried by the parked one) or, for reserved jobs, through the lease
/// index, which holds only the jobs running. A `GROUP BY` over the live
/// partition would read every queue's jobs.
macro_rules! live_counts {
    () => {
        "SELECT 'ready', count(*) FROM spool_jobs_live WHERE queue = $1 AND state = 'ready' \
         UNION ALL SELECT 'reserved', count(*) FROM spool_jobs_live \
         WHERE queue = $1 AND state = 'reserved' \
         UNION ALL SELECT 'delayed', count(*) FROM spool_jobs_live \
         WHERE queue = $1 AND state = 'delayed' \
         UNION ALL SELECT 'buried', count(*) FROM spool_jobs_live \
         WHERE queue = $1 AND state = 'buried'"
    };
}

/// [`live_counts!`]'s statement.
pub const QUEUE_LIVE_COUNTS_SQL: &str = live_counts!();

/// [`live_counts!`] and the queue's final jobs by state (those present),
/// through the final partition's `(queue, state, id)` index.
pub const QUEUE_COUNTS_SQL: &str = concat!(
    live_counts!(),
    " UNION ALL SELECT state, count(*) FROM spool_jobs_final WHERE queue = $1 GROUP BY state"
);

async fn queue_info(c: &mut Conn, queue: &str, now: u64) -> Result<QueueInfo, OpError> {
    let mut info = QueueInfo {
        name: queue.to_string(),
        ..QueueInfo::default()
    };
    for row in c.query(QUEUE_COUNTS_SQL, &[&queue]).await? {
        count_into(&mut info, row.get(0), row.get(1));
    }
    if let Some(row) = c
        .query_opt(
            "SELECT name, max_jobs, max_attempts, backoff_initial_ms, backoff_max_ms, \
             backoff_multiplier, backoff_jitter, ttr_ms, retention_ms, retention_max_jobs, \
             concurrency, rate_per_s, paused_until_ns FROM spool_queues WHERE name = $1",
            &[&queue],
        )
        .await?
    {
        set_settings(&mut info, &row, now);
    }
    Ok(info)
}

async fn list_queues(c: &mut Conn, now: u64) -> Result<Vec<QueueInfo>, OpError> {
    let mut infos: BTreeMap<String, QueueInfo> = BTreeMap::new();
    for row in c
        .query(
            "SELECT queue, state, count(*) FROM spool_jobs GROUP BY queue, state",
            &[],
        )
        .await?
    {
        let name: String = row.get(0);
        let info = infos.entry(name.clone()).or_insert_with(|| QueueInfo {
            name,
            ..QueueInfo::default()
        });
        count_into(info, row.get(1), row.get(2));
    }
    for row in c
        .query(
            "SELECT name, max_jobs, max_attempts, backoff_initial_ms, backoff_max_ms, \
             backoff_multiplier, backoff_jitter, ttr_ms, retention_ms, retention_max_jobs, \
             concurrency, rate_per_s, paused_until_ns FROM spool_queues",
            &[],
        )
        .await?
    {
        let name: String = row.get(0);
        let info = infos.entry(name.clone()).or_insert_with(|| QueueInfo {
            name,
            ..QueueInfo::default()
        });
        set_settings(info, &row, now);
    }
    Ok(infos.into_values().collect())
}

async fn counts(c: &mut Conn, now: u64) -> Result<Vec<QueueCounts>, OpError> {
    let mut queues: BTreeMap<String, QueueCounts> = BTreeMap::new();
    for row in c
        .query(
            "SELECT queue, state, count(*), count(*) FILTER (WHERE priority < $1) \
             FROM spool_jobs WHERE state IN ('ready', 'reserved', 'delayed', 'buried') \
             GROUP BY queue, state",
            &[&i64::from(spool_proto::limits::URGENT_PRIORITY_THRESHOLD)],
        )
        .await?
    {
        let name: String = row.get(0);
        let entry = queues.entry(name.clone()).or_insert_with(|| QueueCounts {
            name,
            ..QueueCounts::default()
        });
        let count = from_db(row.get(2));
        match row.get::<_, &str>(1) {
            "ready" => {
                entry.ready = count;
                entry.urgent = from_db(row.get(3));
            }
            "reserved" => entry.reserved = count,
            "delayed" => entry.delayed = count,
            _ => entry.buried = count,
        }
    }
    for row in c
        .query(
            "SELECT name FROM spool_queues WHERE paused_until_ns > $1",
            &[&db_u64(now)],
        )
        .await?
    {
        if let Some(entry) = queues.get_mut(row.get::<_, &str>(0)) {
            entry.paused = true;
        }
    }
    Ok(queues.into_values().collect())
}

// ---- timers ------------------------------------------------------------

/// Delayed jobs whose time has come become ready: a change (the version
/// moves), dated at the due time as the engine dates it.
async fn promote_due(c: &mut Conn, now: u64, fx: &mut Effects) -> Result<(), OpError> {
    let rows = c
        .query(PROMOTE_DUE_SQL, &[&db_u64(now), &TIMER_BATCH_ROWS])
        .await?;
    promoted(c, rows, now, fx).await
}

/// `promote_due`'s statement: ($1 now, $2 rows) → each queue it made jobs
/// ready in, with their due instants (`updated_ns` is set to the due
/// instant, so `RETURNING` gives it after `run_at_ns` is cleared).
const PROMOTE_DUE_SQL: &str = "WITH j AS (UPDATE spool_jobs SET state = 'ready', \
     version = version + 1, updated_ns = run_at_ns, run_at_ns = NULL WHERE id IN (SELECT id \
     FROM spool_jobs WHERE state = 'delayed' AND run_at_ns <= $1 ORDER BY run_at_ns LIMIT $2 \
     FOR UPDATE SKIP LOCKED) RETURNING queue, updated_ns) \
     SELECT queue, array_agg(updated_ns) FROM j GROUP BY queue";

async fn promoted(
    c: &mut Conn,
    queues: Vec<Row>,
    now: u64,
    fx: &mut Effects,
) -> Result<(), OpError> {
    for row in queues {
        let queue: String = row.get(0);
        let due: Vec<i64> = row.get(1);
        fx.skews.extend(
            due.into_iter()
                .map(|due| Skew::Queue(queue.clone(), now.saturating_sub(from_db(due)))),
        );
        notify(c, &queue).await?;
    }
    Ok(())
}

/// `expire_leases`' look-up: ($1 now, $2 rows) → the leases past their
/// deadline, locked, with what their failed attempt needs.
const EXPIRED_LEASES_SQL: &str = "SELECT j.id, j.attempts, j.max_attempts, \
     j.backoff_initial_ms, j.backoff_max_ms, j.backoff_multiplier, j.backoff_jitter, \
     q.backoff_initial_ms, q.backoff_max_ms, q.backoff_multiplier, q.backoff_jitter, j.queue, \
     j.workflow_id FROM spool_jobs j LEFT JOIN spool_queues q ON q.name = j.queue \
     WHERE j.state = 'reserved' AND j.deadline_ns < $1 \
     ORDER BY j.deadline_ns LIMIT $2 FOR UPDATE OF j SKIP LOCKED";

/// Leases past their deadline end: a failed attempt for a job with an
/// attempt limit (retried after its backoff, or buried), back to ready at
/// once for one without (beanstalkd's semantics). Any node runs this.
async fn expire_leases(c: &mut Conn, ctx: &Ctx, now: u64) -> Result<(), OpError> {
    let rows = c
        .query(EXPIRED_LEASES_SQL, &[&db_u64(now), &TIMER_BATCH_ROWS])
        .await?;
    expire(c, ctx, rows, now).await
}

/// Ends the leases [`EXPIRED_LEASES_SQL`] found.
async fn expire(c: &mut Conn, ctx: &Ctx, rows: Vec<Row>, now: u64) -> Result<(), OpError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(rows.len());
    let mut states = Vec::with_capacity(rows.len());
    let mut attempts_after = Vec::with_capacity(rows.len());
    let mut run_ats: Vec<Option<i64>> = Vec::with_capacity(rows.len());
    let mut errors: Vec<Option<&str>> = Vec::with_capacity(rows.len());
    let mut queues: HashSet<String> = HashSet::new();
    // Step jobs buried by the expiry: their workflows move after the update.
    let mut buried_steps: Vec<(i64, u64)> = Vec::new();
    for row in &rows {
        let id = from_db(row.get(0));
        let attempts = (row.get::<_, i32>(1).max(0) as u32).saturating_add(1);
        let max_attempts = row.get::<_, i32>(2).max(0) as u32;
        let (state, run_at, error) = if max_attempts > 0 {
            let backoff = backoff_at(row, 3)
                .or_else(|| backoff_at(row, 7))
                .unwrap_or_default();
            let (state, run_at) =
                after_failure(id, attempts, max_attempts, backoff, None, false, now);
            (state, run_at, Some(LEASE_EXPIRED_ERROR))
        } else {
            ("ready", None, None)
        };
        if state == "ready" {
            queues.insert(row.get(11));
        }
        if let (Some(workflow), "buried") = (row.get::<_, Option<i64>>(12), state) {
            buried_steps.push((workflow, id));
        }
        ids.push(db_u64(id));
        states.push(state);
        attempts_after.push(attempts.min(i32::MAX as u32) as i32);
        run_ats.push(run_at);
        errors.push(error);
    }
    c.execute(
        "UPDATE spool_jobs j SET state = u.state, attempts = u.attempts, run_at_ns = u.run_at, \
         last_error = coalesce(u.error, j.last_error), timeouts = j.timeouts + 1, \
         buries = j.buries + (CASE WHEN u.state = 'buried' THEN 1 ELSE 0 END), \
         version = j.version + 1, updated_ns = $6, \
         lease_token = NULL, deadline_ns = NULL, lease_owner = NULL \
         FROM unnest($1::bigint[], $2::text[], $3::integer[], $4::bigint[], $5::text[]) \
         AS u(id, state, attempts, run_at, error) WHERE j.id = u.id",
        &[
            &ids,
            &states,
            &attempts_after,
            &run_ats,
            &errors,
            &db_u64(now),
        ],
    )
    .await?;
    for queue in queues {
        notify(c, &queue).await?;
    }
    for (workflow, job) in buried_steps {
        let event = JobEvent::Buried {
            error: Some(LEASE_EXPIRED_ERROR.to_owned()),
        };
        workflows::on_job_event(c, ctx, workflow, job, event, now).await?;
    }
    Ok(())
}

/// Due jobs, expired leases, final jobs past their queue's retention (age
/// and count), expired idempotency keys: each bounded per pass.
/// One pass of every timer; true when the retention left a backlog (a
/// delete took its whole batch), so the next pass should run it again.
async fn timers(c: &mut Conn, ctx: &Ctx, now: u64, fx: &mut Effects) -> Result<bool, OpError> {
    promote_due(c, now, fx).await?;
    expire_leases(c, ctx, now).await?;
    // The retention's statements name the final partition (only final jobs
    // are trimmed): through the parent, each row found was also looked up
    // in the live partition's primary key.
    let aged = c
        .execute(
            "DELETE FROM spool_jobs_final WHERE id IN (SELECT id FROM spool_jobs_final \
         WHERE purge_at_ns <= $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&db_u64(now), &TIMER_BATCH_ROWS],
        )
        .await?;
    let over = c
        .query(
            "SELECT queue, count(*) - coalesce(max(q.retention_max_jobs), $1) \
             FROM spool_jobs_final j LEFT JOIN spool_queues q ON q.name = j.queue \
             GROUP BY j.queue HAVING count(*) > coalesce(max(q.retention_max_jobs), $1)",
            &[&db_u64(limits::RETENTION_MAX_JOBS_DEFAULT)],
        )
        .await?;
    let mut backlog = aged >= TIMER_BATCH_ROWS as u64;
    for row in over {
        let queue: String = row.get(0);
        let excess: i64 = row.get(1);
        backlog |= excess > TIMER_BATCH_ROWS;
        c.execute(
            "DELETE FROM spool_jobs_final WHERE id IN (SELECT id FROM spool_jobs_final \
             WHERE queue = $1 ORDER BY finished_ns, id LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&queue, &excess.min(TIMER_BATCH_ROWS)],
        )
        .await?;
    }
    c.execute(
        "DELETE FROM spool_idempotency WHERE (queue, key) IN (SELECT queue, key \
         FROM spool_idempotency WHERE expires_ns <= $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
        &[&db_u64(now), &TIMER_BATCH_ROWS],
    )
    .await?;
    workflows::retention(c, now, TIMER_BATCH_ROWS).await?;
    Ok(backlog)
}

/// The leases this node held before it restarted end: not a change (the
/// version stays), not an attempt, as leases end with a local broker's
/// process.
async fn release_own_leases(c: &mut Conn, ctx: &Ctx) -> Result<(), OpError> {
    let rows = c
        .query(
            "WITH j AS (UPDATE spool_jobs SET state = 'ready', lease_token = NULL, \
             deadline_ns = NULL, lease_owner = NULL \
             WHERE state = 'reserved' AND lease_owner = $1 RETURNING queue) \
             SELECT DISTINCT queue FROM j",
            &[&ctx.node_id],
        )
        .await?;
    for row in rows {
        notify(c, row.get(0)).await?;
    }
    Ok(())
}
