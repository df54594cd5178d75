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

use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spool_engine::{Buckets, Engine, Histogram, LogRecord, RecordError, ReplayError};
use spool_wal::{RecoveryReport, Wal, WalError, WalOptions};
use tokio::sync::mpsc;

use crate::local::{Clock, CommitAck, LogLink, LogMsg};

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
}

impl fmt::Display for RecoverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecoverError::Wal(e) => write!(f, "{e}"),
            RecoverError::Record { index, error } => {
                write!(f, "log record {index} cannot be read: {error}")
            }
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

/// Opens the log in `dir` and replays it into `engine`, which then logs
/// its changes. Blocking: run it off the async runtime.
pub fn recover(
    dir: &Path,
    options: WalOptions,
    engine: &mut Engine,
    clock: &Clock,
) -> Result<(Wal, RecoveryReport), RecoverError> {
    let mut recovery = Wal::open(dir, options)?;
    engine.set_replay_now(clock.now_ns());
    let mut index = 0u64;
    while let Some(payload) = recovery.next_record()? {
        let record = LogRecord::decode(payload, clock.epoch_ns())
            .map_err(|error| RecoverError::Record { index, error })?;
        engine
            .replay(record)
            .map_err(|error| RecoverError::Replay { index, error })?;
        index += 1;
    }
    let (wal, report) = recovery.finish()?;
    engine.enable_logging();
    Ok((wal, report))
}

/// Starts the log thread for `wal`; the returned link goes to
/// [`crate::LocalBroker::start`]. The thread ends, after a last sync, when
/// the broker drops the link; join it before the process exits.
pub fn spawn_log_thread(
    wal: Wal,
    dir: &Path,
    policy: FsyncPolicy,
    epoch_ns: u64,
    compaction_min_log_bytes: u64,
    stats: SharedStorageStats,
) -> std::io::Result<(LogLink, std::thread::JoinHandle<()>)> {
    let mut writer = LogWriter::new(wal, dir, policy, epoch_ns, compaction_min_log_bytes, &stats)?;
    let (batch_tx, batch_rx) = std::sync::mpsc::channel();
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let thread = std::thread::Builder::new()
        .name("spool-wal".to_string())
        .spawn(move || {
            if let Some(ack) = writer.check_space() {
                let _ = ack_tx.send(ack);
            }
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
        wal: Wal,
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
        let writer = LogWriter::new(wal, dir, policy, epoch_ns, compaction_min_log_bytes, &stats)?;
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
            self.writer.write_batch()?;
            let log_bytes = self.writer.publish();
            if let Some(round) = round {
                self.writer.unsynced = true;
                acks.push(CommitAck::Committed { round, log_bytes });
            }
            Ok(())
        });
        self.fail_on(result, acks);
    }

    /// Runs what is due: the interval fsync, restoring the space reserve.
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
        acks.extend(self.writer.check_space());
    }

    /// When [`InlineLog::tick`] next has work.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        let sync = match (self.writer.policy, self.writer.unsynced) {
            (FsyncPolicy::Interval(every), true) => Some(self.writer.last_sync + every),
            _ => None,
        };
        let retry = self
            .writer
            .reserve
            .full
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

struct LogWriter {
    wal: Wal,
    policy: FsyncPolicy,
    epoch_ns: u64,
    buf: Vec<u8>,
    unsynced: bool,
    last_sync: Instant,
    /// The first segment of a compaction in progress.
    cut: Option<u64>,
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
}

impl LogWriter {
    fn new(
        wal: Wal,
        dir: &Path,
        policy: FsyncPolicy,
        epoch_ns: u64,
        compaction_min_log_bytes: u64,
        stats: &SharedStorageStats,
    ) -> std::io::Result<LogWriter> {
        let headroom = compaction_min_log_bytes.min(RESERVE_HEADROOM_MAX_BYTES);
        let mut writer = LogWriter {
            wal,
            policy,
            epoch_ns,
            buf: Vec::new(),
            unsynced: false,
            last_sync: Instant::now(),
            cut: None,
            stats: stats.clone(),
            pending: PendingStats::default(),
            batch_records: 0,
            batch_bytes: 0,
            reserve: SpaceReserve::open(dir, headroom)?,
        };
        writer.publish();
        Ok(writer)
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
            let sync_due = match (self.policy, self.unsynced) {
                (FsyncPolicy::Interval(every), true) => {
                    Some(every.saturating_sub(self.last_sync.elapsed()))
                }
                _ => None,
            };
            let retry_due = self.reserve.full.then_some(DISK_FULL_RETRY);
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
                self.write_batch()?;
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
            if let Some(ack) = self.check_space() {
                if acks.send(ack).is_err() {
                    break;
                }
            }
        }
        if self.unsynced {
            self.sync()?;
            self.publish();
        }
        Ok(())
    }

    /// Applies one message; returns the round it carried, if a batch.
    fn handle(&mut self, message: LogMsg) -> Result<Option<u64>, WalError> {
        match message {
            LogMsg::Batch {
                round,
                records,
                live_jobs,
            } => {
                self.append(&records)?;
                self.reserve.live_jobs = live_jobs;
                Ok(Some(round))
            }
            LogMsg::BeginCompaction => {
                // Everything before the cut stays until the snapshot after
                // it is on disk. The new segment needs a little room.
                self.reserve
                    .make_room(self.batch_bytes + RESERVE_STEP_BYTES);
                self.cut = Some(self.wal.rotate()?);
                Ok(None)
            }
            LogMsg::EndCompaction => {
                let Some(cut) = self.cut.take() else {
                    return Ok(None);
                };
                // The snapshot must be on disk before the history it
                // replaces is deleted, whatever the fsync policy.
                self.reserve.make_room(self.batch_bytes);
                self.wal.write()?;
                self.sync()?;
                let removed = self.wal.remove_segments_before(cut)?;
                self.pending.compactions += 1;
                let log_bytes = self.publish();
                tracing::info!(removed_segments = removed, log_bytes, "compacted the log");
                Ok(None)
            }
        }
    }

    fn append(&mut self, records: &[LogRecord]) -> Result<(), WalError> {
        self.batch_records += records.len() as u64;
        for record in records {
            self.buf.clear();
            record.encode(self.epoch_ns, &mut self.buf);
            self.batch_bytes += self.buf.len() as u64 + 8;
            self.wal.append(&self.buf)?;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), WalError> {
        let took = self.wal.sync()?;
        self.unsynced = false;
        self.last_sync = Instant::now();
        self.pending.fsync_ns.push(took.as_nanos() as u64);
        Ok(())
    }

    /// Writes what was appended, first taking room from the reserve if the
    /// disk is nearly full.
    fn write_batch(&mut self) -> Result<(), WalError> {
        self.reserve.make_room(self.batch_bytes);
        self.wal.write()?;
        self.commit_done();
        Ok(())
    }

    /// Grows the reserve back to its size; says so when puts must stop or
    /// may resume.
    fn check_space(&mut self) -> Option<CommitAck> {
        let was_full = self.reserve.full;
        self.reserve.restore();
        if self.reserve.full == was_full {
            return None;
        }
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
        stats.segments = segments.len() as u64;
        stats.log_bytes = log_bytes;
        stats.oldest_segment = segments.first().map_or(0, |s| s.seq);
        stats.current_segment = segments.last().map_or(0, |s| s.seq);
        stats.bytes_written = self.wal.stats().bytes_written;
        log_bytes
    }
}

/// See the module documentation.
struct SpaceReserve {
    file: File,
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
    fn open(dir: &Path, headroom: u64) -> std::io::Result<SpaceReserve> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dir.join(RESERVE_FILE))?;
        let len = file.metadata()?.len();
        Ok(SpaceReserve {
            file,
            dir: dir.to_path_buf(),
            len,
            headroom,
            live_jobs: 0,
            full: false,
            free_estimate: 0,
            read_at: None,
        })
    }

    fn target(&self) -> u64 {
        let want = self.live_jobs * DELETE_RESERVE_BYTES + self.headroom;
        want.div_ceil(RESERVE_STEP_BYTES) * RESERVE_STEP_BYTES
    }

    /// Before writing `bytes` to the log: if the disk is nearly full, free
    /// that much of the reserve so the write fits.
    fn make_room(&mut self, bytes: u64) {
        let wanted = bytes + LOW_SPACE_MARGIN_BYTES;
        let fresh = self
            .read_at
            .is_some_and(|at| at.elapsed() < FREE_SPACE_READING_TTL);
        // Plenty of room by the last reading: no need to look again.
        if fresh && self.free_estimate >= wanted.saturating_mul(4) {
            self.free_estimate -= bytes;
            return;
        }
        let free = crate::process::available_bytes(&self.dir).unwrap_or(u64::MAX);
        self.read_at = Some(Instant::now());
        self.free_estimate = free.saturating_sub(bytes);
        if free >= wanted || self.len == 0 {
            return;
        }
        let give_back = (wanted - free).div_ceil(RESERVE_STEP_BYTES) * RESERVE_STEP_BYTES;
        let len = self.len.saturating_sub(give_back);
        if self.file.set_len(len).is_ok() {
            self.len = len;
        }
    }

    /// Grows the reserve to its size by writing zeros (a sparse extension
    /// would hold no blocks). On a full disk it keeps what it got.
    fn restore(&mut self) {
        let target = self.target();
        let zeros = [0u8; RESERVE_STEP_BYTES as usize];
        while self.len < target {
            let step = (target - self.len).min(RESERVE_STEP_BYTES) as usize;
            if self.file.write_all_at(&zeros[..step], self.len).is_err() {
                // Drop a partial step so the file length stays truthful.
                let _ = self.file.set_len(self.len);
                self.full = true;
                return;
            }
            self.len += step as u64;
        }
        self.full = false;
    }
}
