//! Durable storage for the local broker: recovery of the engine from the
//! write-ahead log at start, and the log thread that writes each round's
//! records and acknowledges them per the fsync policy.
//!
//! The log thread is a plain OS thread because `write` and `fsync` block.
//! It takes every batch waiting in its channel before it writes, so all
//! rounds that arrive while one fsync runs share the next one (group
//! commit).
//!
//! Under `interval` and `never` there is no fsync to wait for, so no thread
//! either: the engine task writes each round's records itself
//! ([`InlineLog`]) and replies as soon as the `write` returns, as
//! beanstalkd does; the interval fsync then runs on the engine task too.
//!
//! A full disk must not break the log. The thread keeps a reserve file in
//! the data directory holding room for every live job's future delete
//! record plus some headroom. When free space runs low, it gives reserve
//! bytes back right before a write so the write fits; when it cannot grow
//! the reserve back, it reports the disk full and the engine refuses puts
//! (`OUT_OF_MEMORY`) while deletes go on in the reserved room. It retries
//! every second, and puts resume once space returns.
//!
//! Deletes give space back without a compaction: the thread knows which
//! segment holds each live job's state ([`LiveJobs`]), and deletes the
//! oldest segments as soon as they hold none (trimming); queues are mostly
//! first in, first out, so the oldest segments empty first. A compaction
//! starts only when there is room for its snapshot beside the room held for
//! deletes; if the disk fills while it is written, the compaction is
//! abandoned (the snapshot records written so far stay valid, the old
//! segments stay) and tried again after a backoff. Neither ever fails the
//! log: a full disk only refuses puts.

use std::collections::{btree_map, BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spool_broker::Clock;
use spool_engine::{
    job_record_log_bytes, Buckets, Engine, Histogram, LogRecord, QueueRecord, RecordError,
    ReplayError, ScheduleRecord,
};
use spool_wal::format::RECORD_HEADER_LEN;
use spool_wal::{FsStorage, RecoveryReport, Storage, Wal, WalError, WalOptions};
use tokio::sync::mpsc;

use crate::limits::{
    COMPACTION_RETRY_MAX, COMPACTION_RETRY_MIN, COMPACTION_ROOM_SLACK_DIVISOR,
    SEGMENT_CREATE_ROOM_BYTES,
};
use crate::local::{CommitAck, LogLink, LogMsg};

/// Room held for one job's delete record, as the engine encodes it.
const DELETE_RESERVE_BYTES: u64 = spool_engine::DELETE_RECORD_LOG_BYTES;

// The engine refuses operations whose records the log could not take.
const _: () =
    assert!(spool_engine::limits::RECORD_PAYLOAD_MAX_BYTES == spool_wal::RECORD_MAX_BYTES);

/// Free space below which a write first takes its room from the reserve.
const LOW_SPACE_MARGIN_BYTES: u64 = 256 << 10;

/// Largest headroom the reserve keeps beyond the delete reservations: room
/// for the batches written between two checks of free space.
const RESERVE_HEADROOM_MAX_BYTES: u64 = 16 << 20;

/// The reserve grows and shrinks in steps of this, so most batches do not
/// touch it.
const RESERVE_STEP_BYTES: u64 = 64 << 10;

/// How long a free-space reading is trusted (less what was written since).
const FREE_SPACE_READING_TTL: Duration = Duration::from_millis(100);

/// How often the log thread tries to restore a reserve a full disk emptied.
const DISK_FULL_RETRY: Duration = Duration::from_secs(1);

/// The file name of the reserve in the data directory.
pub const RESERVE_FILE: &str = "space.reserve";

/// Log bytes of any record but a Put or Snapshot, at most (an Update, the
/// largest, is 23 bytes and 8 of framing): estimates a batch's size before
/// it is encoded.
const SMALL_RECORD_LOG_BYTES: u64 = 32;

/// When an acknowledged change is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// A write is acknowledged only after the fsync that covers it.
    Always,
    /// A write is acknowledged once written to the OS (it survives the
    /// process being killed) and is on disk within this interval (it may be
    /// lost if the machine loses power before that).
    Interval(Duration),
    /// Written to the OS, never synced by spool: the OS decides when.
    Never,
}

/// Figures about the log for metrics and `stats`, updated by the log thread
/// after every commit. Counters only grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageStats {
    /// Commits: one write (and, with `fsync always`, one fsync) each.
    pub commits: u64,
    /// Records written, over all commits: with `commits`, the mean group
    /// commit batch size.
    pub records_written: u64,
    /// Largest number of records one commit carried.
    pub largest_commit_records: u64,
    pub bytes_written: u64,
    pub fsyncs: u64,
    pub fsync_ns_total: u64,
    pub fsync_ns_max: u64,
    pub compactions: u64,
    /// Compactions given up because the disk had no room for their
    /// snapshot; the log stays as it was, and another is tried later.
    pub compactions_abandoned: u64,
    /// Segments deleted, without a compaction, because no live job's state
    /// was in them any more.
    pub segments_trimmed: u64,
    /// The disk is full: puts are refused until the space reserve is whole.
    pub disk_full: bool,
    /// Bytes a compaction may write now: free space and the reserve, less
    /// the room the reserve holds for deletes (see [`compaction_due`]).
    pub compaction_room_bytes: u64,
    /// No compaction starts before this, after one was abandoned.
    pub compaction_retry_at: Option<Instant>,
    /// The log thread is in a compaction (until it has handled its end).
    pub compacting: bool,
    /// Segment files now, and their total size.
    pub segments: u64,
    pub log_bytes: u64,
    /// Sequence numbers of the oldest and newest segment.
    pub oldest_segment: u64,
    pub current_segment: u64,
    /// Set once the log failed; changes are refused until restart.
    pub failed: Option<String>,
    /// Every fsync's duration (`spool_wal_fsync_seconds`).
    pub fsync_seconds: Histogram,
    /// Records per commit (`spool_wal_commit_batch_size`).
    pub commit_batch_records: Histogram,
}

impl Default for StorageStats {
    fn default() -> Self {
        StorageStats {
            commits: 0,
            records_written: 0,
            largest_commit_records: 0,
            bytes_written: 0,
            fsyncs: 0,
            fsync_ns_total: 0,
            fsync_ns_max: 0,
            compactions: 0,
            compactions_abandoned: 0,
            segments_trimmed: 0,
            disk_full: false,
            compaction_room_bytes: 0,
            compaction_retry_at: None,
            compacting: false,
            segments: 0,
            log_bytes: 0,
            oldest_segment: 0,
            current_segment: 0,
            failed: None,
            fsync_seconds: Histogram::new(Buckets::IoLatency),
            commit_batch_records: Histogram::new(Buckets::CommitBatch),
        }
    }
}

/// Shared view of [`StorageStats`].
pub type SharedStorageStats = Arc<Mutex<StorageStats>>;

/// Why the log could not be recovered.
#[derive(Debug)]
pub enum RecoverError {
    Wal(WalError),
    /// A record passed its checksum but does not decode: written by a newer
    /// version, or a bug.
    Record {
        index: u64,
        error: RecordError,
    },
    /// A record does not fit the records before it.
    Replay {
        index: u64,
        error: ReplayError,
    },
    /// The caller asked the replay to stop (a signal); nothing was changed.
    Stopped,
}

impl fmt::Display for RecoverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecoverError::Wal(e) => write!(f, "{e}"),
            RecoverError::Record { index, error } => {
                write!(f, "log record {index} cannot be read: {error}")
            }
            RecoverError::Stopped => f.write_str("the replay was stopped"),
            RecoverError::Replay { index, error } => {
                write!(f, "log record {index} cannot be applied: {error}")
            }
        }
    }
}

impl std::error::Error for RecoverError {}

impl From<WalError> for RecoverError {
    fn from(e: WalError) -> Self {
        RecoverError::Wal(e)
    }
}

/// A log opened by [`recover`], for [`spawn_log_thread`] or
/// [`InlineLog::new`]: the writer, and where the live jobs' records are.
pub struct RecoveredLog {
    wal: Wal,
    live: LiveJobs,
}

impl fmt::Debug for RecoveredLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecoveredLog")
            .field("wal", &self.wal)
            .field("live_jobs", &self.live.len())
            .finish()
    }
}

impl RecoveredLog {
    /// The log's writer (its segments, for tests and diagnostics).
    pub fn wal(&self) -> &Wal {
        &self.wal
    }
}

/// A log whose records were not replayed through [`recover`]: where its
/// live jobs are is unknown, so its segments go only by compaction.
impl From<Wal> for RecoveredLog {
    fn from(wal: Wal) -> Self {
        RecoveredLog {
            wal,
            live: LiveJobs {
                untrusted: true,
                ..LiveJobs::default()
            },
        }
    }
}

/// Opens the log in `dir` and replays it into `engine`, which then logs
/// its changes. Blocking: run it off the async runtime.
pub fn recover(
    dir: &Path,
    options: WalOptions,
    engine: &mut Engine,
    clock: &Clock,
) -> Result<(RecoveredLog, RecoveryReport), RecoverError> {
    recover_with_storage(Arc::new(FsStorage), dir, options, engine, clock)
}

/// [`recover`] that gives up with [`RecoverError::Stopped`], changing
/// nothing, soon after `stop` is set (checked every
/// `REPLAY_STOP_CHECK_RECORDS` records): a signal during a long replay then
/// ends it before the process exits, instead of the process exiting
/// around a thread still replaying.
pub fn recover_unless_stopped(
    dir: &Path,
    options: WalOptions,
    engine: &mut Engine,
    clock: &Clock,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(RecoveredLog, RecoveryReport), RecoverError> {
    replay(Arc::new(FsStorage), dir, options, engine, clock, Some(stop))
}

/// [`recover`] on any [`Storage`] (tests use
/// [`SimStorage`](spool_wal::sim::SimStorage)).
pub fn recover_with_storage(
    storage: Arc<dyn Storage>,
    dir: &Path,
    options: WalOptions,
    engine: &mut Engine,
    clock: &Clock,
) -> Result<(RecoveredLog, RecoveryReport), RecoverError> {
    replay(storage, dir, options, engine, clock, None)
}

/// Records replayed between two looks at the stop flag: a few milliseconds
/// of replay, so a signal is obeyed at once, at no measurable cost.
const REPLAY_STOP_CHECK_RECORDS: u64 = 4096;

fn replay(
    storage: Arc<dyn Storage>,
    dir: &Path,
    options: WalOptions,
    engine: &mut Engine,
    clock: &Clock,
    stop: Option<&std::sync::atomic::AtomicBool>,
) -> Result<(RecoveredLog, RecoveryReport), RecoverError> {
    let mut recovery = Wal::open_with_storage(storage, dir, options)?;
    engine.set_replay_now(clock.now_ns());
    let mut live = LiveJobs::default();
    let mut effects = Vec::new();
    let mut index = 0u64;
    while let Some(payload) = recovery.next_record()? {
        if index.is_multiple_of(REPLAY_STOP_CHECK_RECORDS)
            && stop.is_some_and(|stop| stop.load(std::sync::atomic::Ordering::Relaxed))
        {
            return Err(RecoverError::Stopped);
        }
        let record = LogRecord::decode(payload, clock.epoch_ns())
            .map_err(|error| RecoverError::Record { index, error })?;
        // Segments are read one after the other and the report names the
        // one opened last: this record's.
        let segment = recovery.report().last_segment.unwrap_or(0);
        effects.clear();
        Effect::of(&record, &mut effects);
        for effect in effects.drain(..) {
            // After a compaction, records may name jobs replay does not
            // hold (their creation was compacted away): the engine knows.
            let effect = match effect {
                Effect::State { id, .. } => Effect::State {
                    id,
                    replaces: engine.holds(id),
                },
                Effect::Gone(id) if !engine.holds(id) => continue,
                other => other,
            };
            live.apply(effect, segment);
        }
        engine
            .replay(record)
            .map_err(|error| RecoverError::Replay { index, error })?;
        index += 1;
    }
    let (wal, report) = recovery.finish()?;
    live.check(engine.durable_job_count() as u64);
    engine.enable_logging();
    Ok((RecoveredLog { wal, live }, report))
}

/// Whether the engine task should start a compaction now: the log holds
/// more than twice the live jobs' records, and more than `min_log_bytes`
/// unless the disk is full (then any space is worth getting back); the
/// last compaction is over and none was abandoned too recently; and the
/// disk has room for the snapshot beside what the space reserve holds for
/// deletes.
///
/// `log_bytes` is the size the last acknowledgement reported; the size the
/// log thread published since decides (an acknowledgement sent before a
/// compaction ended may arrive after it).
pub(crate) fn compaction_due(
    stats: &SharedStorageStats,
    log_bytes: u64,
    live_bytes: u64,
    min_log_bytes: u64,
) -> bool {
    let worth_it = |log_bytes: u64, disk_full: bool| {
        log_bytes > live_bytes.saturating_mul(2) && (log_bytes > min_log_bytes || disk_full)
    };
    // Most rounds stop here, without taking the lock.
    if !worth_it(log_bytes, true) {
        return false;
    }
    let stats = lock(stats);
    if stats.compacting || !worth_it(stats.log_bytes, stats.disk_full) {
        return false;
    }
    if stats
        .compaction_retry_at
        .is_some_and(|at| Instant::now() < at)
    {
        return false;
    }
    let needed = live_bytes
        .saturating_add(live_bytes / COMPACTION_ROOM_SLACK_DIVISOR)
        .saturating_add(SEGMENT_CREATE_ROOM_BYTES);
    needed <= stats.compaction_room_bytes
}

/// Starts the log thread for `log`; the returned link goes to
/// [`crate::LocalBroker::start`]. The thread ends, after a last sync, when
/// the broker drops the link; join it before the process exits.
pub fn spawn_log_thread(
    log: impl Into<RecoveredLog>,
    dir: &Path,
    policy: FsyncPolicy,
    epoch_ns: u64,
    compaction_min_log_bytes: u64,
    stats: SharedStorageStats,
) -> std::io::Result<(LogLink, std::thread::JoinHandle<()>)> {
    let log = log.into();
    let mut writer = LogWriter::new(log, dir, policy, epoch_ns, compaction_min_log_bytes, &stats);
    let (batch_tx, batch_rx) = std::sync::mpsc::channel();
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let thread = std::thread::Builder::new()
        .name("spool-wal".to_string())
        .spawn(move || {
            let error = match writer.run(&batch_rx, &ack_tx) {
                Ok(()) => return,
                Err(e) => e.to_string(),
            };
            lock(&writer.stats).failed = Some(error.clone());
            let _ = ack_tx.send(CommitAck::Failed { error });
        })?;
    let link = LogLink {
        messages: batch_tx,
        acks: ack_rx,
        compaction_min_log_bytes,
        stats,
    };
    Ok((link, thread))
}

/// The log written by the engine task itself, for the fsync policies that
/// do not wait for an fsync. See the module documentation.
pub struct InlineLog {
    writer: LogWriter,
    compaction_min_log_bytes: u64,
    failed: bool,
}

impl fmt::Debug for InlineLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InlineLog").finish_non_exhaustive()
    }
}

impl InlineLog {
    pub fn new(
        log: impl Into<RecoveredLog>,
        dir: &Path,
        policy: FsyncPolicy,
        epoch_ns: u64,
        compaction_min_log_bytes: u64,
        stats: SharedStorageStats,
    ) -> std::io::Result<InlineLog> {
        assert!(
            policy != FsyncPolicy::Always,
            "fsync always waits for fsyncs: use the log thread"
        );
        let writer = LogWriter::new(
            log.into(),
            dir,
            policy,
            epoch_ns,
            compaction_min_log_bytes,
            &stats,
        );
        Ok(InlineLog {
            writer,
            compaction_min_log_bytes,
            failed: false,
        })
    }

    pub(crate) fn compaction_min_log_bytes(&self) -> u64 {
        self.compaction_min_log_bytes
    }

    pub(crate) fn stats(&self) -> &SharedStorageStats {
        &self.writer.stats
    }

    /// Applies a message and writes it out at once; the acknowledgements
    /// it produces are returned, never delayed.
    pub(crate) fn submit(&mut self, message: LogMsg, acks: &mut Vec<CommitAck>) {
        if self.failed {
            return;
        }
        let result = self.writer.handle(message).and_then(|round| {
            self.writer.write_group()?;
            let log_bytes = self.writer.publish();
            if let Some(round) = round {
                self.writer.unsynced = true;
                acks.push(CommitAck::Committed { round, log_bytes });
            }
            // After the acknowledgement: it does not wait for unlinks.
            self.writer.trim()
        });
        self.fail_on(result, acks);
    }

    /// Runs what is due: the interval fsync, deleting segments no job
    /// needs (at start, and again once a full disk has room), restoring
    /// the space reserve.
    pub(crate) fn tick(&mut self, acks: &mut Vec<CommitAck>) {
        if self.failed {
            return;
        }
        if let FsyncPolicy::Interval(every) = self.writer.policy {
            if self.writer.unsynced && self.writer.last_sync.elapsed() >= every {
                let result = self.writer.sync().map(|()| {
                    self.writer.publish();
                });
                self.fail_on(result, acks);
            }
        }
        let result = self.writer.trim();
        self.fail_on(result, acks);
        if !self.failed {
            acks.extend(self.writer.check_space());
        }
    }

    /// When [`InlineLog::tick`] next has work.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        let sync = match (self.writer.policy, self.writer.unsynced) {
            (FsyncPolicy::Interval(every), true) => Some(self.writer.last_sync + every),
            _ => None,
        };
        let retry = self
            .writer
            .waits_for_space()
            .then(|| Instant::now() + DISK_FULL_RETRY);
        sync.into_iter().chain(retry).min()
    }

    fn fail_on(&mut self, result: Result<(), WalError>, acks: &mut Vec<CommitAck>) {
        if let Err(e) = result {
            let error = e.to_string();
            lock(&self.writer.stats).failed = Some(error.clone());
            self.failed = true;
            acks.push(CommitAck::Failed { error });
        }
    }
}

impl Drop for InlineLog {
    /// What was written reaches the disk before the process goes.
    fn drop(&mut self) {
        if !self.failed && self.writer.unsynced {
            match self.writer.sync() {
                Ok(()) => {
                    self.writer.publish();
                }
                Err(e) => tracing::error!(error = %e, "the last sync of the log failed"),
            }
        }
    }
}

/// Where a compaction is (see [`LogMsg::BeginCompaction`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compaction {
    Idle,
    /// Snapshot records are being written after the cut, the first
    /// segment that will be kept.
    Active {
        cut: u64,
    },
    /// Given up for want of space: the engine's snapshot records are
    /// dropped until it ends the compaction.
    Abandoned,
}

struct LogWriter {
    wal: Wal,
    policy: FsyncPolicy,
    epoch_ns: u64,
    buf: Vec<u8>,
    /// Records handed over since the last write, in order: kept, not
    /// appended at once, so that a compaction's snapshot records can still
    /// be left out when the disk has no room for them.
    group: Vec<LogRecord>,
    /// What the records appended to the log change in `live`, and their
    /// segments: applied once they are written.
    effects: Vec<(Effect, u64)>,
    unsynced: bool,
    last_sync: Instant,
    compaction: Compaction,
    /// What the next abandoned compaction waits before another may start,
    /// and when the last one may be followed.
    compaction_backoff: Duration,
    compaction_retry_at: Option<Instant>,
    /// Which segments live jobs need.
    live: LiveJobs,
    /// The disk had no room for the record that would let the oldest
    /// segments go: when to try again.
    trim_retry_at: Option<Instant>,
    stats: SharedStorageStats,
    /// What happened since the last [`LogWriter::publish`], so that the
    /// shared stats are locked once per commit, not once per step.
    pending: PendingStats,
    /// Records and bytes in the commit being assembled.
    batch_records: u64,
    batch_bytes: u64,
    reserve: SpaceReserve,
}

/// Figures not yet in the shared [`StorageStats`]. Each list holds what
/// happened between two publishes: a commit and an fsync or two.
#[derive(Debug, Default)]
struct PendingStats {
    /// Records of each commit written.
    commit_records: Vec<u64>,
    /// Duration of each fsync.
    fsync_ns: Vec<u64>,
    compactions: u64,
    compactions_abandoned: u64,
    segments_trimmed: u64,
}

impl LogWriter {
    fn new(
        log: RecoveredLog,
        dir: &Path,
        policy: FsyncPolicy,
        epoch_ns: u64,
        compaction_min_log_bytes: u64,
        stats: &SharedStorageStats,
    ) -> LogWriter {
        let RecoveredLog { wal, live } = log;
        let headroom = compaction_min_log_bytes.min(RESERVE_HEADROOM_MAX_BYTES);
        let mut reserve = SpaceReserve::open(dir, headroom);
        reserve.live_jobs = live.len();
        reserve.refresh();
        let mut writer = LogWriter {
            wal,
            policy,
            epoch_ns,
            buf: Vec::new(),
            group: Vec::new(),
            effects: Vec::new(),
            unsynced: false,
            last_sync: Instant::now(),
            compaction: Compaction::Idle,
            compaction_backoff: COMPACTION_RETRY_MIN,
            compaction_retry_at: None,
            live,
            trim_retry_at: None,
            stats: stats.clone(),
            pending: PendingStats::default(),
            batch_records: 0,
            batch_bytes: 0,
            reserve,
        };
        writer.publish();
        writer
    }
}

fn lock(stats: &SharedStorageStats) -> std::sync::MutexGuard<'_, StorageStats> {
    stats.lock().unwrap_or_else(|e| e.into_inner())
}

impl LogWriter {
    /// Runs until the broker goes away (then syncs what is written) or the
    /// log fails (then the error is returned and the log is not touched
    /// again: a failed fsync must not be retried).
    fn run(
        &mut self,
        batches: &Receiver<LogMsg>,
        acks: &mpsc::UnboundedSender<CommitAck>,
    ) -> Result<(), WalError> {
        loop {
            // At start and after every commit: segments no live job needs
            // go, and the reserve grows back into the space they held.
            self.trim()?;
            if let Some(ack) = self.check_space() {
                if acks.send(ack).is_err() {
                    break;
                }
            }
            let sync_due = match (self.policy, self.unsynced) {
                (FsyncPolicy::Interval(every), true) => {
                    Some(every.saturating_sub(self.last_sync.elapsed()))
                }
                _ => None,
            };
            let retry_due = self.waits_for_space().then_some(DISK_FULL_RETRY);
            let first = match sync_due.into_iter().chain(retry_due).min() {
                Some(left) => match batches.recv_timeout(left) {
                    Ok(batch) => Some(batch),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
                _ => match batches.recv() {
                    Ok(batch) => Some(batch),
                    Err(_) => break,
                },
            };
            if let Some(message) = first {
                let mut round = self.handle(message)?;
                // Everything that queued up meanwhile shares this write.
                while let Ok(message) = batches.try_recv() {
                    round = self.handle(message)?.or(round);
                }
                self.write_group()?;
                if round.is_some() {
                    match self.policy {
                        FsyncPolicy::Always => self.sync()?,
                        FsyncPolicy::Interval(_) | FsyncPolicy::Never => self.unsynced = true,
                    }
                }
                // Published per commit, before its acknowledgement: /metrics
                // reads the log's size and bytes written from the shared
                // stats.
                let log_bytes = self.publish();
                if let Some(round) = round {
                    if acks
                        .send(CommitAck::Committed { round, log_bytes })
                        .is_err()
                    {
                        break;
                    }
                }
            }
            if let FsyncPolicy::Interval(every) = self.policy {
                if self.unsynced && self.last_sync.elapsed() >= every {
                    self.sync()?;
                    self.publish();
                }
            }
        }
        if self.unsynced {
            self.sync()?;
            self.publish();
        }
        Ok(())
    }

    /// Takes one message; returns the round it carried, if a batch.
    fn handle(&mut self, message: LogMsg) -> Result<Option<u64>, WalError> {
        match message {
            LogMsg::Batch {
                round,
                records,
                live_jobs,
            } => {
                if self.group.is_empty() {
                    self.group = records;
                } else {
                    self.group.extend(records);
                }
                self.reserve.live_jobs = live_jobs;
                Ok(Some(round))
            }
            LogMsg::BeginCompaction => {
                self.begin_compaction()?;
                Ok(None)
            }
            LogMsg::EndCompaction => {
                self.end_compaction()?;
                Ok(None)
            }
        }
    }

    /// The cut: a new segment, after which the snapshot follows. Without
    /// room for it the compaction is abandoned at once.
    fn begin_compaction(&mut self) -> Result<(), WalError> {
        // Earlier rounds' records go before the cut.
        self.write_group()?;
        if self.compaction != Compaction::Idle {
            return Ok(());
        }
        if !self.reserve.has_room(SEGMENT_CREATE_ROOM_BYTES) {
            self.abandon_compaction("no room for a new segment");
            return Ok(());
        }
        self.reserve.make_room(SEGMENT_CREATE_ROOM_BYTES);
        match self.wal.rotate() {
            Ok(cut) => self.compaction = Compaction::Active { cut },
            // The log goes on in the old segment.
            Err(WalError::OutOfSpace { .. }) => {
                self.abandon_compaction("no room for a new segment");
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// The snapshot is complete: once it is on disk, the segments before
    /// the cut go.
    fn end_compaction(&mut self) -> Result<(), WalError> {
        // The snapshot's last records (which may still find no room).
        self.write_group()?;
        let Compaction::Active { cut } = std::mem::replace(&mut self.compaction, Compaction::Idle)
        else {
            return Ok(());
        };
        // The snapshot must be on disk before the history it replaces is
        // deleted, whatever the fsync policy.
        self.sync()?;
        let removed = self.remove_dead_segments(Some(cut))?;
        self.pending.compactions += 1;
        self.compaction_backoff = COMPACTION_RETRY_MIN;
        self.compaction_retry_at = None;
        let log_bytes = self.publish();
        tracing::info!(removed_segments = removed, log_bytes, "compacted the log");
        Ok(())
    }

    /// Gives up the compaction in progress for want of disk space. The
    /// log stays healthy: the snapshot records written so far are valid
    /// (they restate live jobs, and let the segments those jobs were in go
    /// sooner), the old segments stay, and another compaction may start
    /// after a backoff.
    fn abandon_compaction(&mut self, why: &'static str) {
        self.compaction = Compaction::Abandoned;
        self.pending.compactions_abandoned += 1;
        let wait = self.compaction_backoff;
        self.compaction_retry_at = Some(Instant::now() + wait);
        self.compaction_backoff = wait.saturating_mul(2).min(COMPACTION_RETRY_MAX);
        tracing::warn!(
            reason = why,
            retry_in_ms = wait.as_millis() as u64,
            "compaction abandoned for want of disk space; the log is unchanged and healthy"
        );
    }

    /// Appends the records handed over since the last write and writes
    /// them, first taking room from the reserve if the disk is nearly full.
    /// A compaction's snapshot records are left out, and the compaction
    /// abandoned, when they would eat into the room held for deletes or do
    /// not fit. The other records must be logged: if the disk turns out
    /// full, they are written again with all of the reserve's room before
    /// the log fails.
    fn write_group(&mut self) -> Result<(), WalError> {
        if self.group.is_empty() {
            return Ok(());
        }
        let has_snapshots = self.group.iter().any(is_snapshot);
        let mut snapshots = match self.compaction {
            Compaction::Abandoned => false,
            Compaction::Idle => true,
            Compaction::Active { .. } => {
                let needed = self.group.iter().map(record_log_bytes).sum();
                let room = !has_snapshots || self.reserve.has_room(needed);
                if !room {
                    self.abandon_compaction("no room for the snapshot");
                }
                room
            }
        };
        self.append_group(snapshots)?;
        self.reserve.make_room(self.batch_bytes);
        match self.wal.write() {
            Ok(()) => {}
            // Dropped whole; the log is fine.
            Err(WalError::OutOfSpace { .. }) => {
                if snapshots && has_snapshots {
                    if matches!(self.compaction, Compaction::Active { .. }) {
                        self.abandon_compaction("the disk filled up under the snapshot");
                    }
                    snapshots = false;
                }
                self.batch_records = 0;
                self.batch_bytes = 0;
                self.append_group(snapshots)?;
                self.reserve.release_all();
                self.wal.write()?;
            }
            Err(e) => return Err(e),
        }
        self.group.clear();
        for (effect, segment) in self.effects.drain(..) {
            self.live.apply(effect, segment);
        }
        self.live.check(self.reserve.live_jobs);
        self.commit_done();
        Ok(())
    }

    /// Encodes the group's records (without snapshot records unless
    /// `snapshots`) into the log's buffer.
    fn append_group(&mut self, snapshots: bool) -> Result<(), WalError> {
        self.effects.clear();
        for record in &self.group {
            if !snapshots && is_snapshot(record) {
                continue;
            }
            self.buf.clear();
            record.encode(self.epoch_ns, &mut self.buf);
            self.batch_records += 1;
            self.batch_bytes += self.buf.len() as u64 + RECORD_HEADER_LEN;
            self.wal.append(&self.buf)?;
            let segment = self.wal.pending_segment();
            let mut effects = Vec::new();
            Effect::of(record, &mut effects);
            self.effects
                .extend(effects.into_iter().map(|effect| (effect, segment)));
        }
        Ok(())
    }

    /// Deletes the segments no live job needs any more (see [`LiveJobs`]).
    fn trim(&mut self) -> Result<(), WalError> {
        let removed = self.remove_dead_segments(None)?;
        if removed > 0 {
            self.pending.segments_trimmed += removed as u64;
            let log_bytes = self.publish();
            tracing::debug!(
                removed_segments = removed,
                log_bytes,
                "deleted segments that hold no live job"
            );
        }
        Ok(())
    }

    /// Deletes the oldest segments, up to the first that holds a live
    /// job's state (never the current one), once what was written is
    /// synced. If the bookkeeping cannot be trusted, only a finished
    /// compaction's `cut` says which segments may go. Returns how many
    /// went.
    fn remove_dead_segments(&mut self, cut: Option<u64>) -> Result<usize, WalError> {
        self.write_group()?;
        let current = self.current_segment();
        let oldest = self.wal.segments().first().map_or(current, |s| s.seq);
        let mut to = match (self.live.keep_from(current), cut) {
            (Some(keep), _) => keep,
            (None, Some(cut)) => cut,
            (None, None) => return Ok(0),
        };
        if oldest >= to {
            self.trim_retry_at = None;
            return Ok(0);
        }
        let mut wrote = false;
        // Records that would go with the segments but still say something:
        // which ids are taken (ids are never reused), queue settings and
        // schedules.
        let mut again: Vec<LogRecord> = self.live.settings_before(to);
        if self.live.next_id != 0 && self.live.next_id_segment < to {
            again.push(LogRecord::NextId {
                id: self.live.next_id,
            });
        }
        if self.live.next_workflow_id != 0 && self.live.next_workflow_id_segment < to {
            again.push(LogRecord::WorkflowNextId {
                id: self.live.next_workflow_id,
            });
        }
        if again.is_empty() {
            self.trim_retry_at = None;
        } else {
            // Say them again in the current segment first.
            let due = self.trim_retry_at.is_none_or(|at| Instant::now() >= at);
            if due && self.log_again(again)? {
                self.trim_retry_at = None;
                wrote = true;
            } else {
                if due {
                    self.trim_retry_at = Some(Instant::now() + DISK_FULL_RETRY);
                }
                let pinned = [
                    (self.live.next_id != 0).then_some(self.live.next_id_segment),
                    (self.live.next_workflow_id != 0).then_some(self.live.next_workflow_id_segment),
                    self.live.oldest_settings_segment(),
                ];
                to = pinned.into_iter().flatten().fold(to, u64::min);
            }
        }
        if oldest >= to {
            return Ok(0);
        }
        if self.unsynced || wrote {
            // Whatever made the segments dead must be on disk first.
            self.sync()?;
        }
        let removed = self.wal.remove_segments_before(to)?;
        if self.live.keep_from(current).is_some() {
            self.live.segments_removed_before(to);
        }
        // The space is back; look again rather than trust the last reading.
        self.reserve.forget_reading();
        Ok(removed)
    }

    /// Writes records that old segments hold and that still say something
    /// (which ids are taken, queue settings) into the current segment.
    /// False if the disk had no room for them.
    fn log_again(&mut self, records: Vec<LogRecord>) -> Result<bool, WalError> {
        let mut bytes = 0;
        for record in &records {
            self.buf.clear();
            record.encode(self.epoch_ns, &mut self.buf);
            bytes += self.buf.len() as u64 + RECORD_HEADER_LEN;
            self.wal.append(&self.buf)?;
        }
        let segment = self.wal.pending_segment();
        self.reserve.make_room(bytes);
        match self.wal.write() {
            Ok(()) => {}
            Err(WalError::OutOfSpace { .. }) => return Ok(false),
            Err(e) => return Err(e),
        }
        let mut effects = Vec::new();
        for record in &records {
            Effect::of(record, &mut effects);
        }
        for effect in effects {
            self.live.apply(effect, segment);
        }
        self.pending.commit_records.push(records.len() as u64);
        Ok(true)
    }

    fn current_segment(&self) -> u64 {
        self.wal.segments().last().map_or(0, |s| s.seq)
    }

    /// True while something waits for disk space to come back: the reserve
    /// (puts are refused), or the deletion of segments no job needs.
    fn waits_for_space(&self) -> bool {
        self.reserve.full || self.trim_retry_at.is_some()
    }

    fn sync(&mut self) -> Result<(), WalError> {
        let took = self.wal.sync()?;
        self.unsynced = false;
        self.last_sync = Instant::now();
        self.pending.fsync_ns.push(took.as_nanos() as u64);
        Ok(())
    }

    /// Grows the reserve back to its size; says so when puts must stop or
    /// may resume.
    fn check_space(&mut self) -> Option<CommitAck> {
        let was_full = self.reserve.full;
        self.reserve.restore();
        let refreshed = self.reserve.refresh();
        if self.reserve.full == was_full {
            if refreshed {
                self.publish();
            }
            return None;
        }
        self.publish();
        if self.reserve.full {
            tracing::warn!("disk full: refusing puts until space returns");
        } else {
            tracing::info!("disk space is back: accepting puts");
        }
        Some(CommitAck::DiskFull(self.reserve.full))
    }

    /// Counts the commit just written (published with the next
    /// [`LogWriter::publish`]).
    fn commit_done(&mut self) {
        self.batch_bytes = 0;
        let records = std::mem::take(&mut self.batch_records);
        self.pending.commit_records.push(records);
    }

    /// Publishes what happened since the last call (commits, fsyncs,
    /// compactions) and the log's shape, under one lock of the shared
    /// stats; returns the log's size in bytes.
    fn publish(&mut self) -> u64 {
        let segments = self.wal.segments();
        let log_bytes = segments.iter().map(|s| s.len).sum();
        let mut stats = lock(&self.stats);
        for records in self.pending.commit_records.drain(..) {
            stats.commits += 1;
            stats.records_written += records;
            stats.largest_commit_records = stats.largest_commit_records.max(records);
            stats.commit_batch_records.observe_records(records);
        }
        for ns in self.pending.fsync_ns.drain(..) {
            stats.fsyncs += 1;
            stats.fsync_ns_total += ns;
            stats.fsync_ns_max = stats.fsync_ns_max.max(ns);
            stats.fsync_seconds.observe_ns(ns);
        }
        stats.compactions += std::mem::take(&mut self.pending.compactions);
        stats.compactions_abandoned += std::mem::take(&mut self.pending.compactions_abandoned);
        stats.segments_trimmed += std::mem::take(&mut self.pending.segments_trimmed);
        stats.disk_full = self.reserve.full;
        stats.compaction_room_bytes = self.reserve.room();
        stats.compaction_retry_at = self.compaction_retry_at;
        stats.compacting = self.compaction != Compaction::Idle;
        stats.segments = segments.len() as u64;
        stats.log_bytes = log_bytes;
        stats.oldest_segment = segments.first().map_or(0, |s| s.seq);
        stats.current_segment = segments.last().map_or(0, |s| s.seq);
        stats.bytes_written = self.wal.stats().bytes_written;
        log_bytes
    }
}

/// A compaction's snapshot of a job. (An update through the job API is
/// logged as a one-record batch, so it is never taken for one.)
fn is_snapshot(record: &LogRecord) -> bool {
    matches!(record, LogRecord::Snapshot(_) | LogRecord::JobSnapshot(_))
}

/// A record's size in the log, framing included, without encoding it
/// (exact for jobs, an upper bound for the small records).
fn record_log_bytes(record: &LogRecord) -> u64 {
    match record {
        LogRecord::Put(job) | LogRecord::Snapshot(job) => {
            job_record_log_bytes(job.tube.as_str().len(), job.body.len())
        }
        LogRecord::Update { .. }
        | LogRecord::Delete { .. }
        | LogRecord::NextId { .. }
        | LogRecord::WorkflowDelete { .. }
        | LogRecord::WorkflowNextId { .. } => SMALL_RECORD_LOG_BYTES,
        // Job-API records: rare next to puts; their encoder says exactly.
        LogRecord::Job(_)
        | LogRecord::JobSnapshot(_)
        | LogRecord::Change(_)
        | LogRecord::Batch(_)
        | LogRecord::Queue(_)
        | LogRecord::Workflow(_)
        | LogRecord::WorkflowProgress(_)
        | LogRecord::Schedule(_)
        | LogRecord::ScheduleDeleted { .. } => record.encoded_len(0) as u64 + RECORD_HEADER_LEN,
    }
}

/// What a record changes in [`LiveJobs`].
#[derive(Debug, Clone, PartialEq)]
enum Effect {
    /// The job's whole state (a Put, Job or snapshot); `replaces` when the
    /// job was live before it.
    State {
        id: u64,
        replaces: bool,
    },
    Gone(u64),
    /// Every id below this is taken.
    NextId(u64),
    /// A queue's settings, kept to be said again when their segment goes.
    Settings(Box<QueueRecord>),
    /// A workflow's whole state (its start or a compaction's snapshot).
    WorkflowState(u64),
    WorkflowGone(u64),
    /// Every workflow id below this is taken.
    WorkflowNextId(u64),
    /// A schedule's state, kept likewise.
    Schedule(Box<ScheduleRecord>),
    /// A schedule was deleted: nothing to say again.
    ScheduleGone(String),
}

impl Effect {
    /// The effects of a record, a batch's in order.
    fn of(record: &LogRecord, out: &mut Vec<Effect>) {
        match record {
            LogRecord::Put(job) => out.push(Effect::State {
                id: job.id,
                replaces: false,
            }),
            LogRecord::Job(full) => out.push(Effect::State {
                id: full.job.id,
                replaces: false,
            }),
            // A snapshot the engine writes is of a job it holds.
            LogRecord::Snapshot(job) => out.push(Effect::State {
                id: job.id,
                replaces: true,
            }),
            LogRecord::JobSnapshot(full) => out.push(Effect::State {
                id: full.job.id,
                replaces: true,
            }),
            LogRecord::Delete { id } => out.push(Effect::Gone(*id)),
            LogRecord::NextId { id } => out.push(Effect::NextId(*id)),
            // Changes ride on the state record before them.
            LogRecord::Update { .. } | LogRecord::Change(_) => {}
            LogRecord::Batch(records) => {
                for record in records {
                    Effect::of(record, out);
                }
            }
            LogRecord::Queue(queue) => out.push(Effect::Settings(queue.clone())),
            LogRecord::Workflow(workflow) => out.push(Effect::WorkflowState(workflow.id)),
            // Transitions ride on the workflow's state record before them.
            LogRecord::WorkflowProgress(_) => {}
            LogRecord::WorkflowDelete { id } => out.push(Effect::WorkflowGone(*id)),
            LogRecord::WorkflowNextId { id } => out.push(Effect::WorkflowNextId(*id)),
            LogRecord::Schedule(view) => out.push(Effect::Schedule(view.clone())),
            LogRecord::ScheduleDeleted { name } => {
                out.push(Effect::ScheduleGone(name.as_str().to_owned()))
            }
        }
    }
}

/// Which segments the live jobs need: each live job's state is its last
/// Put, Job or snapshot record plus the changes after it, so the segments
/// before the oldest one holding such a record can be deleted (replay
/// skips changes and Deletes of jobs it has not seen). A job put first in
/// is deleted first in most queues, so the oldest segments empty first and
/// go without a compaction.
///
/// Kept as runs of ids, not an entry per job: ids are handed out in order
/// and written in order, and a compaction snapshots them in order too, so
/// the live jobs of one segment are a few ranges of ids. A run claims that
/// every *live* id in its range has its state in the run's segment; ids
/// that died inside a run stay in it (ids are never reused, and deletes
/// are counted per segment). Only an update of one job (its snapshot in the
/// current segment) splits a run. A few dozen bytes per run instead of
/// about forty per live job.
#[derive(Debug, Default)]
struct LiveJobs {
    /// start id → run.
    runs: BTreeMap<u64, Run>,
    /// Live jobs per segment, for those with any.
    per_segment: BTreeMap<u64, u64>,
    /// Live jobs in all.
    live: u64,
    /// Every id below this is taken, and the segment of the last record
    /// that says so (0 and 0 before any).
    next_id: u64,
    next_id_segment: u64,
    /// Set when this disagrees with the engine's job count (a bug): then
    /// no segment goes on its word.
    untrusted: bool,
    /// Each queue's last settings record and its segment: said again in
    /// the current segment before the segment holding it goes.
    settings: HashMap<String, (u64, QueueRecord)>,
    /// Each held workflow's segment of its last whole-state record (its
    /// transitions ride on it, like a job's changes), and how many such
    /// records each segment holds. Workflows are few next to jobs: an
    /// entry each.
    workflows: HashMap<u64, u64>,
    workflows_per_segment: BTreeMap<u64, u64>,
    /// As `next_id`, for workflow ids.
    next_workflow_id: u64,
    next_workflow_id_segment: u64,
    /// Each schedule's last state record and its segment, the same way.
    schedules: HashMap<String, (u64, ScheduleRecord)>,
}

/// Ids `start..=end` (the key is `start`) whose live jobs have their state
/// in `segment`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    end: u64,
    segment: u64,
}

impl LiveJobs {
    fn apply(&mut self, effect: Effect, segment: u64) {
        match effect {
            Effect::State { id, replaces } => {
                if replaces {
                    if let Some(old) = self.segment_of(id) {
                        self.forget(old);
                        self.carve(id);
                    }
                }
                self.place(id, segment);
                *self.per_segment.entry(segment).or_insert(0) += 1;
                self.live += 1;
                self.taken(id.saturating_add(1), segment);
            }
            Effect::Gone(id) => {
                if let Some(old) = self.segment_of(id) {
                    self.forget(old);
                }
            }
            Effect::NextId(id) => self.taken(id, segment),
            Effect::WorkflowState(id) => {
                self.workflow_gone(id);
                self.workflows.insert(id, segment);
                *self.workflows_per_segment.entry(segment).or_insert(0) += 1;
                self.workflow_id_taken(id.saturating_add(1), segment);
            }
            Effect::WorkflowGone(id) => self.workflow_gone(id),
            Effect::WorkflowNextId(id) => self.workflow_id_taken(id, segment),
            Effect::Settings(record) => {
                let name = record
                    .queue
                    .as_ref()
                    .map_or(String::new(), |q| q.to_string());
                self.settings.insert(name, (segment, *record));
            }
            Effect::Schedule(record) => {
                self.schedules
                    .insert(record.view.name.clone(), (segment, *record));
            }
            Effect::ScheduleGone(name) => {
                self.schedules.remove(&name);
            }
        }
    }

    /// The segment a live id's state is in, by its run.
    fn segment_of(&self, id: u64) -> Option<u64> {
        let (_, run) = self.runs.range(..=id).next_back()?;
        (id <= run.end).then_some(run.segment)
    }

    /// Takes `id` out of its run, splitting it.
    fn carve(&mut self, id: u64) {
        let Some((&start, &run)) = self.runs.range(..=id).next_back() else {
            return;
        };
        if id > run.end {
            return;
        }
        self.runs.remove(&start);
        if start < id {
            self.runs.insert(
                start,
                Run {
                    end: id - 1,
                    segment: run.segment,
                },
            );
        }
        if id < run.end {
            self.runs.insert(id + 1, run);
        }
    }

    /// Adds `id`, in no run, to `segment`, joining the runs next to it when
    /// they are of the same segment (no live id lies between adjacent runs).
    fn place(&mut self, id: u64, segment: u64) {
        let right = self
            .runs
            .range(id.saturating_add(1)..)
            .next()
            .map(|(&s, &r)| (s, r));
        if right.is_none() {
            // The common case, a new id after every other: grow the last run.
            if let Some((_, last)) = self.runs.range_mut(..id).next_back() {
                if last.segment == segment {
                    last.end = id;
                    return;
                }
            }
        }
        let left = self.runs.range(..id).next_back().map(|(&s, &r)| (s, r));
        let (mut start, mut end) = (id, id);
        if let Some((left_start, left)) = left {
            if left.segment == segment {
                start = left_start;
                self.runs.remove(&left_start);
            }
        }
        if let Some((right_start, right)) = right {
            if right.segment == segment {
                end = right.end;
                self.runs.remove(&right_start);
            }
        }
        self.runs.insert(start, Run { end, segment });
    }

    /// Forgets the runs of segments before `seq`, which are gone: every id
    /// in them died.
    fn segments_removed_before(&mut self, seq: u64) {
        // The dead runs between them gone, runs of one segment that are now
        // adjacent join (a compaction leaves one run per stretch of ids
        // between dead ranges).
        let runs = std::mem::take(&mut self.runs);
        for (start, run) in runs.into_iter().filter(|(_, run)| run.segment >= seq) {
            match self.runs.last_entry() {
                Some(mut last) if last.get().segment == run.segment => last.get_mut().end = run.end,
                _ => {
                    self.runs.insert(start, run);
                }
            }
        }
    }

    /// Settings and schedule records in segments before `to`, which must
    /// be said again before those segments go.
    fn settings_before(&self, to: u64) -> Vec<LogRecord> {
        let queues = self
            .settings
            .values()
            .filter(|(segment, _)| *segment < to)
            .map(|(_, record)| LogRecord::Queue(Box::new(record.clone())));
        let schedules = self
            .schedules
            .values()
            .filter(|(segment, _)| *segment < to)
            .map(|(_, record)| LogRecord::Schedule(Box::new(record.clone())));
        queues.chain(schedules).collect()
    }

    /// The oldest segment holding settings or a schedule, if any.
    fn oldest_settings_segment(&self) -> Option<u64> {
        self.settings
            .values()
            .map(|(segment, _)| *segment)
            .chain(self.schedules.values().map(|(segment, _)| *segment))
            .min()
    }

    fn forget(&mut self, segment: u64) {
        if let btree_map::Entry::Occupied(mut entry) = self.per_segment.entry(segment) {
            self.live -= 1;
            *entry.get_mut() -= 1;
            if *entry.get() == 0 {
                entry.remove();
            }
        }
    }

    fn workflow_gone(&mut self, id: u64) {
        let Some(segment) = self.workflows.remove(&id) else {
            return;
        };
        if let btree_map::Entry::Occupied(mut entry) = self.workflows_per_segment.entry(segment) {
            *entry.get_mut() -= 1;
            if *entry.get() == 0 {
                entry.remove();
            }
        }
    }

    fn workflow_id_taken(&mut self, next_id: u64, segment: u64) {
        if next_id >= self.next_workflow_id {
            self.next_workflow_id = next_id;
            self.next_workflow_id_segment = segment;
        }
    }

    fn taken(&mut self, next_id: u64, segment: u64) {
        // A later record saying the same is kept for its segment.
        if next_id >= self.next_id {
            self.next_id = next_id;
            self.next_id_segment = segment;
        }
    }

    fn len(&self) -> u64 {
        self.live
    }

    /// The oldest segment to keep, given the current one (always kept);
    /// None if this cannot be trusted.
    fn keep_from(&self, current: u64) -> Option<u64> {
        if self.untrusted {
            return None;
        }
        let oldest_needed = [
            self.per_segment.keys().next().copied(),
            self.workflows_per_segment.keys().next().copied(),
        ]
        .into_iter()
        .flatten()
        .min();
        Some(oldest_needed.map_or(current, |seq| seq.min(current)))
    }

    /// Compares with the engine's count of live jobs.
    fn check(&mut self, live_jobs: u64) {
        if !self.untrusted && self.len() != live_jobs {
            self.untrusted = true;
            tracing::warn!(
                tracked = self.len(),
                live_jobs,
                "the log thread's list of live jobs disagrees with the engine; \
                 old segments go only by compaction from now on"
            );
        }
    }
}

/// See the module documentation.
struct SpaceReserve {
    /// None when the file could not be opened (then the reserve holds
    /// nothing and puts are refused; opening is tried again).
    file: Option<File>,
    dir: PathBuf,
    /// Current size of the reserve file.
    len: u64,
    headroom: u64,
    live_jobs: u64,
    /// The reserve could not be grown to its size: puts are refused.
    full: bool,
    /// Free space at the last reading, less what was written since, and
    /// when it was read: `statvfs` is not worth a call per commit.
    free_estimate: u64,
    read_at: Option<Instant>,
}

impl SpaceReserve {
    /// Opens (or creates) the reserve file. A failure is not fatal: the
    /// server must start on a full disk, where creating a file may fail.
    fn open(dir: &Path, headroom: u64) -> SpaceReserve {
        let mut reserve = SpaceReserve {
            file: None,
            dir: dir.to_path_buf(),
            len: 0,
            headroom,
            live_jobs: 0,
            full: false,
            free_estimate: 0,
            read_at: None,
        };
        reserve.open_file();
        reserve
    }

    fn open_file(&mut self) {
        let opened = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(self.dir.join(RESERVE_FILE))
            .and_then(|file| Ok((file.metadata()?.len(), file)));
        match opened {
            Ok((len, file)) => {
                self.file = Some(file);
                self.len = len;
            }
            Err(e) => {
                if !self.full {
                    tracing::warn!(error = %e, file = RESERVE_FILE, "cannot open the space reserve");
                }
                self.full = true;
            }
        }
    }

    fn target(&self) -> u64 {
        let want = self.held_for_deletes() + self.headroom;
        want.div_ceil(RESERVE_STEP_BYTES) * RESERVE_STEP_BYTES
    }

    /// The part of the reserve that deletes may need.
    fn held_for_deletes(&self) -> u64 {
        self.live_jobs.saturating_mul(DELETE_RESERVE_BYTES)
    }

    /// Free space: the last reading less what was written since, if fresh
    /// and comfortably above `wanted`; else a new reading.
    fn free(&mut self, wanted: u64) -> u64 {
        let fresh = self
            .read_at
            .is_some_and(|at| at.elapsed() < FREE_SPACE_READING_TTL);
        if fresh && self.free_estimate >= wanted.saturating_mul(4) {
            return self.free_estimate;
        }
        self.read()
    }

    fn read(&mut self) -> u64 {
        let free = crate::process::available_bytes(&self.dir).unwrap_or(u64::MAX);
        self.read_at = Some(Instant::now());
        self.free_estimate = free;
        free
    }

    /// Reads free space again if the last reading is stale; true if it did.
    fn refresh(&mut self) -> bool {
        let fresh = self
            .read_at
            .is_some_and(|at| at.elapsed() < FREE_SPACE_READING_TTL);
        if !fresh {
            self.read();
        }
        !fresh
    }

    /// After space came back: the next use reads it.
    fn forget_reading(&mut self) {
        self.read_at = None;
    }

    /// Bytes a compaction may write as of the last reading: free space and
    /// the reserve, less what the reserve holds for deletes and the margin
    /// kept free.
    fn room(&self) -> u64 {
        self.free_estimate
            .saturating_add(self.len)
            .saturating_sub(self.held_for_deletes() + LOW_SPACE_MARGIN_BYTES)
    }

    /// Whether a compaction may write `bytes` now.
    fn has_room(&mut self, bytes: u64) -> bool {
        let wanted = bytes
            .saturating_add(self.held_for_deletes())
            .saturating_add(LOW_SPACE_MARGIN_BYTES);
        self.free(wanted);
        self.room() >= bytes
    }

    /// Before writing `bytes` to the log: if the disk is nearly full, free
    /// that much of the reserve so the write fits.
    fn make_room(&mut self, bytes: u64) {
        let wanted = bytes + LOW_SPACE_MARGIN_BYTES;
        let free = self.free(wanted);
        self.free_estimate = free.saturating_sub(bytes);
        if free >= wanted || self.len == 0 {
            return;
        }
        let give_back = (wanted - free).div_ceil(RESERVE_STEP_BYTES) * RESERVE_STEP_BYTES;
        self.shrink_to(self.len.saturating_sub(give_back));
    }

    /// Gives the whole reserve back, for records that must be logged on a
    /// disk that turned out fuller than read.
    fn release_all(&mut self) {
        self.shrink_to(0);
        self.forget_reading();
    }

    fn shrink_to(&mut self, len: u64) {
        if let Some(file) = &self.file {
            if file.set_len(len).is_ok() {
                self.len = len;
            }
        }
    }

    /// Grows the reserve to its size by writing zeros (a sparse extension
    /// would hold no blocks). On a full disk it keeps what it got.
    fn restore(&mut self) {
        if self.file.is_none() {
            self.open_file();
        }
        let Some(file) = &self.file else {
            return;
        };
        let target = self.target();
        let zeros = [0u8; RESERVE_STEP_BYTES as usize];
        while self.len < target {
            let step = (target - self.len).min(RESERVE_STEP_BYTES) as usize;
            if file.write_all_at(&zeros[..step], self.len).is_err() {
                // Drop a partial step so the file length stays truthful.
                let _ = file.set_len(self.len);
                self.full = true;
                return;
            }
            self.len += step as u64;
        }
        self.full = false;
    }
}

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;

    use bytes::Bytes;
    use spool_engine::{EngineConfig, JobRecord, RestState};
    use spool_proto::TubeName;
    use spool_wal::sim::{Fault, SimStorage};

    use super::*;

    /// Where the logs live inside the simulated storage.
    const SIM_DIR: &str = "/wal";

    /// The runs of `LiveJobs` say what a map of every live job would: random
    /// puts, compactions (snapshots of every live job, oldest id first, in
    /// a new segment), updates (one job's snapshot), deletes and removals
    /// of dead segments, checked against that map after every step.
    #[test]
    fn live_job_runs_match_a_map_of_every_job() {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut random = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _round in 0..50 {
            let mut live = LiveJobs::default();
            let mut model: BTreeMap<u64, u64> = BTreeMap::new();
            let (mut next_id, mut segment) = (1u64, 1u64);
            for _step in 0..400 {
                match random(10) {
                    0..=3 => {
                        live.apply(
                            Effect::State {
                                id: next_id,
                                replaces: false,
                            },
                            segment,
                        );
                        model.insert(next_id, segment);
                        next_id += 1;
                    }
                    4..=5 if !model.is_empty() => {
                        let ids: Vec<u64> = model.keys().copied().collect();
                        let id = ids[random(ids.len() as u64) as usize];
                        live.apply(Effect::Gone(id), segment);
                        model.remove(&id);
                    }
                    6 if !model.is_empty() => {
                        let ids: Vec<u64> = model.keys().copied().collect();
                        let id = ids[random(ids.len() as u64) as usize];
                        live.apply(Effect::State { id, replaces: true }, segment);
                        model.insert(id, segment);
                    }
                    7 => segment += 1,
                    8 => {
                        segment += 1;
                        let ids: Vec<u64> = model.keys().rev().copied().collect();
                        for id in ids {
                            live.apply(Effect::State { id, replaces: true }, segment);
                            model.insert(id, segment);
                        }
                        // Every live job is in one segment now: one run,
                        // once the older segments are gone.
                        assert_eq!(live.keep_from(segment), Some(segment));
                        live.segments_removed_before(segment);
                        assert!(live.runs.len() <= 1, "{:?}", live.runs);
                    }
                    _ => {
                        if let Some(keep) = live.keep_from(segment) {
                            live.segments_removed_before(keep);
                        }
                    }
                }
                let mut counts: BTreeMap<u64, u64> = BTreeMap::new();
                for (&id, &seg) in &model {
                    assert_eq!(live.segment_of(id), Some(seg), "job {id}");
                    *counts.entry(seg).or_default() += 1;
                }
                assert_eq!(live.per_segment, counts);
                assert_eq!(live.len(), model.len() as u64);
            }
        }
    }

    /// Segments of 400 bytes hold two 167-byte jobs each.
    fn small_segments() -> WalOptions {
        WalOptions::default().segment_max_bytes(400)
    }

    fn job(id: u64) -> JobRecord {
        JobRecord {
            id,
            tube: TubeName::default_tube(),
            pri: 0,
            ttr_ns: 1_000_000_000,
            delay_ns: 0,
            created_at_ns: 0,
            state: RestState::Ready,
            body: Bytes::from(vec![b'0' + (id % 10) as u8; 100]),
        }
    }

    fn puts(ids: std::ops::RangeInclusive<u64>) -> Vec<LogRecord> {
        ids.map(|id| LogRecord::Put(job(id))).collect()
    }

    /// A fresh directory of our own for the space reserve.
    fn reserve_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "spool-durable-{name}-{}-{}",
            std::process::id(),
            crate::local::engine_clock().epoch_ns()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Replays the log in `sim` into a fresh engine.
    fn replay(sim: &SimStorage, options: WalOptions, clock: &Clock) -> (Engine, RecoveredLog) {
        let mut engine = Engine::new(EngineConfig {
            max_job_size: 1 << 16,
        });
        let (log, _) = recover_with_storage(
            Arc::new(sim.clone()),
            SIM_DIR.as_ref(),
            options,
            &mut engine,
            clock,
        )
        .unwrap();
        (engine, log)
    }

    /// A log writer (fsync always) over the log in `sim`, as the server
    /// starts one.
    fn writer(sim: &SimStorage, options: WalOptions, clock: &Clock, dir: &Path) -> LogWriter {
        let (_, log) = replay(sim, options, clock);
        LogWriter::new(
            log,
            dir,
            FsyncPolicy::Always,
            clock.epoch_ns(),
            1 << 20,
            &SharedStorageStats::default(),
        )
    }

    /// One engine round's records, written and synced as the log thread
    /// does.
    fn commit(w: &mut LogWriter, round: u64, records: Vec<LogRecord>, live_jobs: u64) {
        let message = LogMsg::Batch {
            round,
            records,
            live_jobs,
        };
        assert_eq!(w.handle(message).unwrap(), Some(round));
        w.write_group().unwrap();
        w.sync().unwrap();
        w.publish();
    }

    fn deletes(ids: &[u64]) -> Vec<LogRecord> {
        ids.iter().map(|&id| LogRecord::Delete { id }).collect()
    }

    fn first_segment(w: &LogWriter) -> u64 {
        w.wal.segments()[0].seq
    }

    fn live_ids(engine: &Engine) -> Vec<u64> {
        let mut ids: Vec<u64> = engine.jobs().map(|j| j.id).collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn segments_that_no_live_job_needs_go_and_ids_stay_taken() {
        let (sim, clock, dir) = (
            SimStorage::new(),
            crate::local::engine_clock(),
            reserve_dir("trim"),
        );
        let mut w = writer(&sim, small_segments(), &clock, &dir);
        // Segments 1, 2, 3 hold jobs 1-2, 3-4, 5-6.
        commit(&mut w, 1, puts(1..=6), 6);
        assert_eq!(w.wal.segments().len(), 3);
        commit(&mut w, 2, deletes(&[1]), 5);
        w.trim().unwrap();
        assert_eq!(first_segment(&w), 1, "job 2 still needs segment 1");
        commit(&mut w, 3, deletes(&[2]), 4);
        w.trim().unwrap();
        assert_eq!(first_segment(&w), 2, "segment 1 went with its last job");
        // Every job deleted, newest first: all but the current segment go,
        // once the last id is restated where it stays.
        commit(&mut w, 4, deletes(&[6, 5, 4, 3]), 0);
        w.trim().unwrap();
        assert_eq!(w.wal.segments().len(), 1);
        assert_eq!(lock(&w.stats).segments_trimmed, 3);
        assert!(!w.wal.is_poisoned());
        drop(w);
        let (engine, _) = replay(&sim, small_segments(), &clock);
        assert_eq!(engine.job_count(), 0);
        assert_eq!(engine.next_job_id(), 7, "ids are never reused");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn trimming_picks_up_where_recovery_left_off() {
        let (sim, clock, dir) = (
            SimStorage::new(),
            crate::local::engine_clock(),
            reserve_dir("retrim"),
        );
        let mut w = writer(&sim, small_segments(), &clock, &dir);
        commit(&mut w, 1, puts(1..=6), 6);
        drop(w);
        // After a restart the writer knows where each job is.
        let mut w = writer(&sim, small_segments(), &clock, &dir);
        commit(&mut w, 1, deletes(&[1, 2, 3]), 3);
        w.trim().unwrap();
        assert_eq!(first_segment(&w), 2, "job 4 keeps segment 2");
        drop(w);
        let (engine, _) = replay(&sim, small_segments(), &clock);
        assert_eq!(live_ids(&engine), vec![4, 5, 6]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_compaction_that_cannot_get_space_is_abandoned_and_retried() {
        let (sim, clock, dir) = (
            SimStorage::new(),
            crate::local::engine_clock(),
            reserve_dir("abandon"),
        );
        let options = WalOptions::default();
        let mut w = writer(&sim, options.clone(), &clock, &dir);
        commit(&mut w, 1, puts(1..=4), 4);
        commit(&mut w, 2, deletes(&[1, 2]), 2);
        assert_eq!(w.handle(LogMsg::BeginCompaction).unwrap(), None);
        assert_eq!(w.compaction, Compaction::Active { cut: 2 });

        // The disk fills while the snapshot is written: the compaction is
        // given up, the round's other records are logged all the same.
        sim.inject(Fault::Write {
            nth: 0,
            kind: ErrorKind::StorageFull,
            written: 7,
        });
        let snapshot = |ids: &[u64]| -> Vec<LogRecord> {
            ids.iter().map(|&id| LogRecord::Snapshot(job(id))).collect()
        };
        let mut records = vec![LogRecord::NextId { id: 5 }];
        records.extend(snapshot(&[3]));
        records.push(LogRecord::Delete { id: 3 });
        commit(&mut w, 3, records, 1);
        assert_eq!(w.compaction, Compaction::Abandoned);
        // The engine's later snapshot records are dropped.
        commit(&mut w, 4, snapshot(&[4]), 1);
        assert_eq!(w.handle(LogMsg::EndCompaction).unwrap(), None);
        w.publish();
        assert_eq!(w.compaction, Compaction::Idle);
        {
            let stats = lock(&w.stats);
            assert_eq!(stats.compactions_abandoned, 1);
            assert_eq!(stats.compactions, 0);
            assert_eq!(stats.failed, None);
            assert!(stats.compaction_retry_at.is_some(), "a retry waits");
            assert_eq!(stats.segments, 2, "the old segment stays");
        }
        assert!(!w.wal.is_poisoned());
        // Not yet: the backoff runs.
        assert!(!compaction_due(&w.stats, 1 << 30, 100, 0));
        lock(&w.stats).compaction_retry_at = Some(Instant::now());
        assert!(compaction_due(&w.stats, 1 << 30, 100, 0));

        // Space is back: the next compaction finishes and the old segments
        // go.
        assert_eq!(w.handle(LogMsg::BeginCompaction).unwrap(), None);
        commit(&mut w, 5, vec![LogRecord::NextId { id: 5 }], 1);
        commit(&mut w, 6, snapshot(&[4]), 1);
        assert_eq!(w.handle(LogMsg::EndCompaction).unwrap(), None);
        w.publish();
        {
            let stats = lock(&w.stats);
            assert_eq!(stats.compactions, 1);
            assert_eq!(stats.compaction_retry_at, None, "the backoff is reset");
            assert_eq!(stats.segments, 1);
        }
        assert_eq!(w.compaction_backoff, COMPACTION_RETRY_MIN);
        drop(w);
        let (engine, _) = replay(&sim, options, &clock);
        assert_eq!(live_ids(&engine), vec![4]);
        assert_eq!(engine.job(4).map(|j| j.body.clone()), Some(job(4).body));
        assert_eq!(engine.next_job_id(), 5);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn no_room_for_the_cut_abandons_the_compaction_and_keeps_the_log() {
        let (sim, clock, dir) = (
            SimStorage::new(),
            crate::local::engine_clock(),
            reserve_dir("nocut"),
        );
        let mut w = writer(&sim, WalOptions::default(), &clock, &dir);
        commit(&mut w, 1, puts(1..=2), 2);
        // The new segment's header does not fit.
        sim.inject(Fault::Write {
            nth: 0,
            kind: ErrorKind::StorageFull,
            written: 0,
        });
        assert_eq!(w.handle(LogMsg::BeginCompaction).unwrap(), None);
        assert_eq!(w.compaction, Compaction::Abandoned);
        assert_eq!(w.wal.segments().len(), 1);
        assert!(!w.wal.is_poisoned());
        // The engine goes on with its snapshot and deletes; the snapshot
        // records are dropped, the deletes logged.
        let mut records = vec![LogRecord::NextId { id: 3 }, LogRecord::Snapshot(job(1))];
        records.push(LogRecord::Delete { id: 2 });
        commit(&mut w, 2, records, 1);
        assert_eq!(w.handle(LogMsg::EndCompaction).unwrap(), None);
        assert_eq!(w.wal.stats().records_written, 4, "2 puts, next id, delete");
        drop(w);
        let (engine, _) = replay(&sim, WalOptions::default(), &clock);
        assert_eq!(live_ids(&engine), vec![1]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn compactions_wait_for_room_and_for_the_last_one_to_end() {
        let stats = SharedStorageStats::default();
        let set = |f: &dyn Fn(&mut StorageStats)| f(&mut lock(&stats));
        set(&|s| {
            s.log_bytes = 100 << 20;
            s.compaction_room_bytes = 50 << 20;
        });
        let due = |log_bytes, live_bytes, min| compaction_due(&stats, log_bytes, live_bytes, min);
        assert!(due(100 << 20, 10 << 20, 64 << 20));
        assert!(
            !due(100 << 20, 60 << 20, 64 << 20),
            "not twice the live jobs"
        );
        assert!(
            !due(100 << 20, 48 << 20, 64 << 20),
            "no room for the snapshot"
        );
        // A small log is worth compacting only when the disk is full.
        set(&|s| s.log_bytes = 30 << 20);
        assert!(!due(30 << 20, 10 << 20, 64 << 20));
        set(&|s| s.disk_full = true);
        assert!(due(30 << 20, 10 << 20, 64 << 20));
        // Not while the log thread still works on the last one, nor after
        // it shrank the log (the engine's figure may be stale).
        set(&|s| s.compacting = true);
        assert!(!due(30 << 20, 10 << 20, 64 << 20));
        set(&|s| {
            s.compacting = false;
            s.log_bytes = 12 << 20;
        });
        assert!(!due(30 << 20, 10 << 20, 64 << 20));
        set(&|s| {
            s.log_bytes = 30 << 20;
            s.compaction_retry_at = Some(Instant::now() + Duration::from_secs(60));
        });
        assert!(!due(30 << 20, 10 << 20, 64 << 20), "backing off");
    }
}
