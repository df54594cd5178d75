//! Durable storage for the local broker: recovery of the engine from the
//! write-ahead log at start, and the log thread that writes each round's
//! records and acknowledges them per the fsync policy.
//!
//! The log thread is a plain OS thread because `write` and `fsync` block.
//! It takes every batch waiting in its channel before it writes, so all
//! rounds that arrive while one fsync runs share the next one (group
//! commit).

use std::fmt;
use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spool_engine::{Engine, LogRecord, RecordError, ReplayError};
use spool_wal::{RecoveryReport, Wal, WalError, WalOptions};
use tokio::sync::mpsc;

use crate::local::{Clock, CommitAck, LogLink, LogMsg};

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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
    policy: FsyncPolicy,
    epoch_ns: u64,
    compaction_min_log_bytes: u64,
    stats: SharedStorageStats,
) -> std::io::Result<(LogLink, std::thread::JoinHandle<()>)> {
    let (batch_tx, batch_rx) = std::sync::mpsc::channel();
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let thread_stats = stats.clone();
    let thread = std::thread::Builder::new()
        .name("spool-wal".to_string())
        .spawn(move || {
            let stats = thread_stats;
            let mut writer = LogWriter {
                wal,
                policy,
                epoch_ns,
                buf: Vec::new(),
                unsynced: false,
                last_sync: Instant::now(),
                cut: None,
                stats,
                batch_records: 0,
            };
            writer.publish();
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
        stats: stats.clone(),
    };
    Ok((link, thread))
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
    /// Records in the commit being assembled.
    batch_records: u64,
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
            let first = match (self.policy, self.unsynced) {
                (FsyncPolicy::Interval(every), true) => {
                    let left = every.saturating_sub(self.last_sync.elapsed());
                    match batches.recv_timeout(left) {
                        Ok(batch) => Some(batch),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
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
                self.wal.write()?;
                self.commit_done();
                if let Some(round) = round {
                    match self.policy {
                        FsyncPolicy::Always => self.sync()?,
                        FsyncPolicy::Interval(_) | FsyncPolicy::Never => self.unsynced = true,
                    }
                    let log_bytes = self.wal.segments().iter().map(|s| s.len).sum();
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
                }
            }
        }
        if self.unsynced {
            self.sync()?;
        }
        Ok(())
    }

    /// Applies one message; returns the round it carried, if a batch.
    fn handle(&mut self, message: LogMsg) -> Result<Option<u64>, WalError> {
        match message {
            LogMsg::Batch { round, records } => {
                self.append(&records)?;
                Ok(Some(round))
            }
            LogMsg::BeginCompaction => {
                // Everything before the cut stays until the snapshot after
                // it is on disk.
                self.cut = Some(self.wal.rotate()?);
                Ok(None)
            }
            LogMsg::EndCompaction => {
                let Some(cut) = self.cut.take() else {
                    return Ok(None);
                };
                // The snapshot must be on disk before the history it
                // replaces is deleted, whatever the fsync policy.
                self.wal.write()?;
                self.sync()?;
                let removed = self.wal.remove_segments_before(cut)?;
                lock(&self.stats).compactions += 1;
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
            self.wal.append(&self.buf)?;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), WalError> {
        let took = self.wal.sync()?;
        self.unsynced = false;
        self.last_sync = Instant::now();
        let ns = took.as_nanos() as u64;
        let mut stats = lock(&self.stats);
        stats.fsyncs += 1;
        stats.fsync_ns_total += ns;
        stats.fsync_ns_max = stats.fsync_ns_max.max(ns);
        Ok(())
    }

    /// Counts the commit just written.
    fn commit_done(&mut self) {
        let records = std::mem::take(&mut self.batch_records);
        let mut stats = lock(&self.stats);
        stats.commits += 1;
        stats.records_written += records;
        stats.largest_commit_records = stats.largest_commit_records.max(records);
    }

    /// Publishes the log's shape; returns its size in bytes.
    fn publish(&self) -> u64 {
        let segments = self.wal.segments();
        let log_bytes = segments.iter().map(|s| s.len).sum();
        let mut stats = lock(&self.stats);
        stats.segments = segments.len() as u64;
        stats.log_bytes = log_bytes;
        stats.oldest_segment = segments.first().map_or(0, |s| s.seq);
        stats.current_segment = segments.last().map_or(0, |s| s.seq);
        stats.bytes_written = self.wal.stats().bytes_written;
        log_bytes
    }
}
