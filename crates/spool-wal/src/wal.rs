//! The writer: buffering appended records, handing them to the OS, fsyncing,
//! rotating segments, deleting old ones, and refusing to go on after an I/O
//! error it cannot prove harmless.
//!
//! The writer is synchronous and meant to live on one dedicated thread. It
//! separates the three costs so the caller can batch them (group commit):
//! [`Wal::append`] only copies into memory, [`Wal::write`] makes one `write`
//! system call per segment touched, [`Wal::sync`] makes one `fdatasync`.
//!
//! It also owns **zero-fill ahead**: the current segment's file is kept
//! longer than its records by a region of written (allocated) zeros, and
//! records are written into it with positioned writes. An `fdatasync` after
//! an append that grows the file must also commit the new size (a journal
//! commit on ext4); one that only overwrites allocated blocks does not, so
//! it is cheaper, and every commit pays for it under `fsync=always`. The
//! zeros are cut off when the segment stops being the last one.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::WalError;
use crate::format::{
    encode_record, RECORD_HEADER_LEN, RECORD_MAX_BYTES, SEGMENT_HEADER_LEN,
    SEGMENT_MAX_BYTES_DEFAULT,
};
use crate::manifest::ManifestWriter;
use crate::recovery::{create_segment, Recovery};
use crate::storage::{FsStorage, LockGuard, Storage, WriteFile};

/// After a write, a pending-record buffer that grew past this (say, for one
/// huge job) is shrunk back, so one big batch does not pin its memory forever.
const PENDING_RETAIN_MAX_BYTES: usize = 8 << 20;

/// Default size of the zeroed region kept ahead of the current segment's
/// last record ([`WalOptions::zero_fill_ahead_bytes`]). With small records
/// (a ~150-byte put) this is one file-size change, so one costlier fsync, per
/// ~25 000 records instead of one per commit; the zeros are written in one
/// call whose cost (a few ms, once per 4 MiB) is small next to what it saves,
/// and at most this much disk is held beyond the records.
pub const ZERO_FILL_AHEAD_BYTES: u64 = 4 << 20;

/// How the log is laid out on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WalOptions {
    /// A segment that has records and would grow past this starts a new
    /// segment first. A single record bigger than this gets a segment of its
    /// own. Default [`SEGMENT_MAX_BYTES_DEFAULT`] (64 MiB).
    pub segment_max_bytes: u64,
    /// How far ahead of the last record the current segment is kept filled
    /// with written zeros (never past `segment_max_bytes`); 0 turns zero-fill
    /// ahead off, so each write appends. Default [`ZERO_FILL_AHEAD_BYTES`].
    pub zero_fill_ahead_bytes: u64,
    /// Open a log that is missing data ([`WalError::Missing`]: segment files
    /// the manifest names, records at the end of the newest segment, or the
    /// manifest itself) with what is left, reporting the loss in
    /// [`RecoveryReport::lost`](crate::RecoveryReport::lost), instead of
    /// failing. The manifest is then rewritten to match, so the next open
    /// checks against what is there now. Default false: an operator decides.
    pub accept_data_loss: bool,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_max_bytes: SEGMENT_MAX_BYTES_DEFAULT,
            zero_fill_ahead_bytes: ZERO_FILL_AHEAD_BYTES,
            accept_data_loss: false,
        }
    }
}

impl WalOptions {
    /// Sets [`segment_max_bytes`](WalOptions::segment_max_bytes).
    pub fn segment_max_bytes(mut self, bytes: u64) -> Self {
        self.segment_max_bytes = bytes;
        self
    }

    /// Sets [`zero_fill_ahead_bytes`](WalOptions::zero_fill_ahead_bytes).
    pub fn zero_fill_ahead_bytes(mut self, bytes: u64) -> Self {
        self.zero_fill_ahead_bytes = bytes;
        self
    }

    /// Sets [`accept_data_loss`](WalOptions::accept_data_loss).
    pub fn accept_data_loss(mut self, accept: bool) -> Self {
        self.accept_data_loss = accept;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), WalError> {
        if self.segment_max_bytes < SEGMENT_HEADER_LEN + RECORD_HEADER_LEN {
            return Err(WalError::InvalidOptions(
                "segment_max_bytes must leave room for the 32-byte header and one record frame",
            ));
        }
        Ok(())
    }
}

/// One segment file of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub seq: u64,
    pub path: PathBuf,
    /// Logical length: the header and the records (for the current segment:
    /// those handed to the OS so far, not records only appended). The current
    /// segment's file may be longer, by its zero-filled region.
    pub len: u64,
}

/// Counters for metrics. Cumulative since the log was opened, except where
/// a field says otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WalStats {
    /// Records accepted by `append`.
    pub records_appended: u64,
    /// Records handed to the OS by `write`.
    pub records_written: u64,
    /// Bytes handed to the OS by `write` (framing included, headers not).
    pub bytes_written: u64,
    /// `write` system calls for records (each writes one contiguous chunk).
    pub write_calls: u64,
    /// Zero-fill-ahead extensions of the current segment (one `write` each,
    /// not counted in `write_calls`).
    pub zero_fills: u64,
    /// Zero bytes written by those extensions.
    pub zero_filled_bytes: u64,
    /// `fdatasync` calls on segment files (commits, rotations, repairs) and
    /// on the manifest (rotations, removals).
    pub fsyncs: u64,
    /// fsyncs of the data directory (segment creation and removal).
    pub dir_fsyncs: u64,
    /// Duration of the most recent fsync made by `sync`/`commit`.
    pub last_fsync: Duration,
    /// Sum of the durations of fsyncs made by `sync`/`commit`.
    pub fsync_total: Duration,
    /// Batches dropped because the disk was full ([`WalError::OutOfSpace`]).
    pub batches_rejected: u64,
    /// Segment files now (gauge).
    pub segments: usize,
    /// Sequence number of the segment being written (gauge).
    pub current_segment: u64,
    /// Records appended but not yet written (gauge).
    pub pending_records: u64,
    /// Bytes appended but not yet written (gauge).
    pub pending_bytes: u64,
}

/// What one [`Wal::commit`] made durable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Commit {
    /// Records made durable by this call (written now or by earlier `write`s).
    pub records: u64,
    /// Their framed size in bytes.
    pub bytes: u64,
    /// Time spent in fsync (zero if there was nothing to sync).
    pub fsync: Duration,
}

/// An open write-ahead log: a locked data directory of segment files, the
/// last of which receives new records.
///
/// Obtained from [`Wal::open`] through [`Recovery::finish`]. Records that were
/// appended but not written when the `Wal` is dropped are lost, like any
/// unacknowledged write; call [`Wal::close`] (or `commit`) first. Dropping a
/// log whose records are all synced (and that is not poisoned) closes it
/// cleanly, as `close` does.
pub struct Wal {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    options: WalOptions,
    _lock: Box<dyn LockGuard>,
    /// All segments, oldest first; the last is the one `file` writes to.
    segments: Vec<SegmentInfo>,
    file: Box<dyn WriteFile>,
    /// Length of the current segment's file: its records, then zeros up to
    /// here (equal to its `len` when nothing is zero-filled).
    file_len: u64,
    /// Framed records appended and not yet written.
    pending: Vec<u8>,
    /// Offsets into `pending` where a new segment must start.
    breaks: Vec<usize>,
    pending_records: u64,
    /// Length the segment that receives the last pending record will have
    /// once written.
    planned_len: u64,
    /// Written, not yet synced.
    unsynced_records: u64,
    unsynced_bytes: u64,
    unsynced: bool,
    poisoned: Option<String>,
    stats: WalStats,
    manifest: ManifestWriter,
    /// The clean close was recorded (nothing may be written after it).
    closed: bool,
}

impl fmt::Debug for Wal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.dir)
            .field("segments", &self.segments.len())
            .field("poisoned", &self.poisoned)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Wal {
    /// Opens (or creates) the log in `dir` on the real file system, taking
    /// its lock. Replay the records with [`Recovery::next_record`], then call
    /// [`Recovery::finish`] for the writer.
    pub fn open(dir: impl AsRef<Path>, options: WalOptions) -> Result<Recovery, WalError> {
        Self::open_with_storage(Arc::new(FsStorage), dir, options)
    }

    /// [`Wal::open`] on any [`Storage`] (tests use
    /// [`SimStorage`](crate::sim::SimStorage)).
    pub fn open_with_storage(
        storage: Arc<dyn Storage>,
        dir: impl AsRef<Path>,
        options: WalOptions,
    ) -> Result<Recovery, WalError> {
        Recovery::start(storage, dir.as_ref(), options)
    }

    #[allow(clippy::too_many_arguments)] // one call site, in recovery
    pub(crate) fn from_recovery(
        storage: Arc<dyn Storage>,
        dir: PathBuf,
        options: WalOptions,
        lock: Box<dyn LockGuard>,
        file: Box<dyn WriteFile>,
        file_len: u64,
        segments: Vec<SegmentInfo>,
        manifest: ManifestWriter,
    ) -> Wal {
        let current = segments.last().map_or(SEGMENT_HEADER_LEN, |s| s.len);
        Wal {
            file_len: file_len.max(current),
            storage,
            dir,
            options,
            _lock: lock,
            segments,
            file,
            pending: Vec::new(),
            breaks: Vec::new(),
            pending_records: 0,
            planned_len: current,
            unsynced_records: 0,
            unsynced_bytes: 0,
            unsynced: false,
            poisoned: None,
            stats: WalStats::default(),
            manifest,
            closed: false,
        }
    }

    /// Buffers one record. No system call; nothing is on disk until `write`
    /// (in the OS) and `sync` (durable).
    pub fn append(&mut self, payload: &[u8]) -> Result<(), WalError> {
        self.check()?;
        if payload.len() > RECORD_MAX_BYTES {
            return Err(WalError::RecordTooLarge {
                len: payload.len(),
                max: RECORD_MAX_BYTES,
            });
        }
        let framed = RECORD_HEADER_LEN + payload.len() as u64;
        if self.planned_len > SEGMENT_HEADER_LEN
            && self.planned_len + framed > self.options.segment_max_bytes
        {
            self.breaks.push(self.pending.len());
            self.planned_len = SEGMENT_HEADER_LEN;
        }
        encode_record(&mut self.pending, payload);
        self.planned_len += framed;
        self.pending_records += 1;
        self.stats.records_appended += 1;
        Ok(())
    }

    /// Hands every appended record to the OS: one positioned `write` call per
    /// segment the batch touches, plus, once every few MiB, one that extends
    /// the zero-filled region. When the batch fills the current segment, that
    /// segment is cut to its records, fsynced, and the next one created (see
    /// [`Wal::rotate`]).
    ///
    /// On [`WalError::OutOfSpace`] the batch was dropped and the log is still
    /// usable. On any other error the log is poisoned, and the batch must be
    /// treated as failed (though part of it may be replayed after a restart).
    pub fn write(&mut self) -> Result<(), WalError> {
        self.check()?;
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let breaks = std::mem::take(&mut self.breaks);
        let result = self.write_chunks(&pending, &breaks);
        let records = std::mem::take(&mut self.pending_records);
        self.pending = pending;
        self.pending.clear();
        if self.pending.capacity() > PENDING_RETAIN_MAX_BYTES {
            self.pending.shrink_to(PENDING_RETAIN_MAX_BYTES);
        }
        self.breaks = breaks;
        self.breaks.clear();
        self.planned_len = self.current().len;
        if result.is_ok() {
            self.stats.records_written += records;
            self.unsynced_records += records;
        }
        result
    }

    fn write_chunks(&mut self, pending: &[u8], breaks: &[usize]) -> Result<(), WalError> {
        let mut start = 0;
        // Until a chunk is written none of the batch can be durable (a
        // rotation fsyncs only what came before it): a full disk until then
        // drops the batch and leaves the log usable.
        let mut wrote_any = false;
        for (i, &end) in breaks
            .iter()
            .chain(std::iter::once(&pending.len()))
            .enumerate()
        {
            if i > 0 {
                match self.rotate_now() {
                    Ok(_) => {}
                    Err(e @ WalError::OutOfSpace { .. }) if !wrote_any => {
                        self.stats.batches_rejected += 1;
                        return Err(e);
                    }
                    // Part of the batch is durable: it cannot be dropped.
                    Err(WalError::OutOfSpace { path, source }) => {
                        return Err(self.poison(WalError::io("create segment", path, source)))
                    }
                    Err(e) => return Err(self.poison(e)),
                }
            }
            let chunk = &pending[start..end];
            start = end;
            if chunk.is_empty() {
                continue;
            }
            let n = chunk.len() as u64;
            let at = self.current().len;
            self.zero_fill_ahead(at + n)?;
            if let Err(e) = self.file.write_all_at(chunk, at) {
                return Err(self.write_failed(e, !wrote_any));
            }
            wrote_any = true;
            self.file_len = self.file_len.max(at + n);
            self.segments_last_mut().len += n;
            self.stats.bytes_written += n;
            self.stats.write_calls += 1;
            self.unsynced_bytes += n;
            self.unsynced = true;
        }
        Ok(())
    }

    /// Makes sure the current segment is zero-filled well past `end` (the
    /// end of the records about to be written), so that writing them changes
    /// no file metadata. Extends in one write, by `zero_fill_ahead_bytes`,
    /// once less than a quarter of that is left past `end` (so a batch rarely
    /// straddles the zeroed end); never past `segment_max_bytes`, which the
    /// records will not cross (a larger lone record just appends).
    ///
    /// A full disk is not an error here: the zeros are only an optimization,
    /// so the file is cut back to its records and the batch is written by
    /// appending, as without zero-fill (the server frees its space reserve
    /// for the records, not for zeros).
    fn zero_fill_ahead(&mut self, end: u64) -> Result<(), WalError> {
        let ahead = self.options.zero_fill_ahead_bytes;
        let max = self.options.segment_max_bytes;
        // Past `max` is a lone oversized record: zeros it overwrites at once
        // would only double its write.
        if ahead == 0 || end > max || end + ahead / 4 <= self.file_len {
            return Ok(());
        }
        let target = end.saturating_add(ahead).min(max);
        if target <= self.file_len {
            return Ok(());
        }
        let from = self.file_len;
        match self.file.zero_extend(from, target) {
            Ok(()) => {
                self.file_len = target;
                self.stats.zero_fills += 1;
                self.stats.zero_filled_bytes += target - from;
                self.unsynced = true;
                Ok(())
            }
            Err(e) if is_no_space(&e) => {
                let (path, len) = (self.current().path.clone(), self.current().len);
                if let Err(te) = self.file.truncate(len) {
                    return Err(self.poison(WalError::io(
                        "truncate after failed zero-fill",
                        path,
                        te,
                    )));
                }
                self.file_len = len;
                Ok(())
            }
            Err(e) => {
                let path = self.current().path.clone();
                Err(self.poison(WalError::io("zero-fill", path, e)))
            }
        }
    }

    /// Decides what a failed write means. A full disk before any byte of
    /// the batch could be durable is undone by cutting the file back to the
    /// last whole record; the batch is reported dropped and the log goes on.
    /// Anything else poisons the log.
    fn write_failed(&mut self, e: io::Error, batch_not_durable: bool) -> WalError {
        let path = self.current().path.clone();
        if is_no_space(&e) && batch_not_durable {
            match self.file.truncate(self.current().len) {
                Ok(()) => {
                    // The zeroed region went with the partial write; the
                    // next write fills ahead again.
                    self.file_len = self.current().len;
                    self.stats.batches_rejected += 1;
                    return WalError::OutOfSpace { path, source: e };
                }
                Err(te) => {
                    return self.poison(WalError::io("truncate after failed write", path, te))
                }
            }
        }
        self.poison(WalError::io("write", path, e))
    }

    /// Makes everything written so far durable with one `fdatasync`. Records
    /// appended but not written are not included (use `commit`). Returns the
    /// time spent in fsync; does nothing if nothing was written since the
    /// last sync. A failure poisons the log: a failed fsync is never retried.
    pub fn sync(&mut self) -> Result<Duration, WalError> {
        self.check()?;
        if !self.unsynced {
            return Ok(Duration::ZERO);
        }
        let took = self.sync_file()?;
        self.stats.last_fsync = took;
        self.stats.fsync_total += took;
        Ok(took)
    }

    /// `write` then `sync`: when this returns `Ok`, every record appended
    /// before the call is durable.
    pub fn commit(&mut self) -> Result<Commit, WalError> {
        self.write()?;
        let (records, bytes) = (self.unsynced_records, self.unsynced_bytes);
        let fsync = self.sync()?;
        Ok(Commit {
            records,
            bytes,
            fsync,
        })
    }

    /// Commits, then starts a new segment and returns its sequence number.
    /// The old segment is fsynced before the new one is created, and the new
    /// one's header and directory entry are fsynced before it is used, so a
    /// segment that is not the last is always complete on disk.
    ///
    /// On a full disk the new segment is removed again and
    /// [`WalError::OutOfSpace`] returned: the log goes on in the old
    /// segment, usable, and the rotation can be tried again later.
    ///
    /// For compaction: rotate, append a snapshot of the live state, commit,
    /// then [`remove_segments_before`](Wal::remove_segments_before) the
    /// returned sequence number. Until the removal, a crash replays the old
    /// segments *and* the snapshot, so snapshot records must be safe to apply
    /// on top of the state the old segments rebuild.
    pub fn rotate(&mut self) -> Result<u64, WalError> {
        self.commit()?;
        self.rotate_now()
    }

    fn rotate_now(&mut self) -> Result<u64, WalError> {
        let (seq, prev_len) = (self.current().seq + 1, self.current().len);
        if self.file_len > prev_len {
            // Only the last segment may end in zeros (recovery treats zeros
            // elsewhere as damage), and the next header records this
            // segment's exact length: cut the zeros off, durably, first.
            // `fsync`, not `fdatasync`: the size shrinks.
            if let Err(e) = self.file.truncate(prev_len) {
                let path = self.current().path.clone();
                return Err(self.poison(WalError::io("truncate zero-fill", path, e)));
            }
            self.file_len = prev_len;
            self.sync_file_with(true)?;
        } else if self.unsynced {
            self.sync_file()?;
        }
        let file = match create_segment(&*self.storage, &self.dir, seq, prev_len) {
            Ok(f) => f,
            // Not after a failed fsync, which is never retried or undone.
            Err(WalError::Io {
                op: "create segment" | "write header",
                source,
                path,
            }) if is_no_space(&source) => {
                return Err(self.undo_segment_creation(path, source));
            }
            Err(e) => return Err(self.poison(e)),
        };
        self.stats.fsyncs += 1;
        self.stats.dir_fsyncs += 1;
        // Before any record goes to the new segment, and before the old
        // file is let go: from here on, losing the new file is detected. A
        // crash before this leaves it unrecorded, which recovery allows (it
        // can hold no record yet); a full disk refusing the manifest's
        // write leaves its other slot, which does not claim the new
        // segment, so the new file goes again.
        let first = self.segments[0].seq;
        let path = self.dir.join(crate::format::segment_file_name(seq));
        match self.manifest.write(first, seq, SEGMENT_HEADER_LEN, false) {
            Ok(()) => {}
            Err(WalError::Io {
                op: "write manifest",
                source,
                ..
            }) if is_no_space(&source) => {
                drop(file);
                return Err(self.undo_segment_creation(path, source));
            }
            Err(e) => return Err(self.poison(e)),
        }
        self.file = file;
        self.file_len = SEGMENT_HEADER_LEN;
        self.segments.push(SegmentInfo {
            seq,
            path,
            len: SEGMENT_HEADER_LEN,
        });
        self.stats.fsyncs += 1;
        Ok(seq)
    }

    /// A full disk stopped the creation of segment `path`: removes what was
    /// created of it (a file with no header, or part of one), so that the
    /// current segment stays the last and nothing looks torn to recovery.
    /// Returns [`WalError::OutOfSpace`], or the error that poisoned the log
    /// if the file could not be removed.
    fn undo_segment_creation(&mut self, path: PathBuf, source: io::Error) -> WalError {
        match self.storage.remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return self.poison(WalError::io("remove unfinished segment", path, e)),
        }
        if let Err(e) = self.storage.sync_dir(&self.dir) {
            let dir = self.dir.clone();
            return self.poison(WalError::io("fsync directory", dir, e));
        }
        self.stats.dir_fsyncs += 1;
        WalError::OutOfSpace { path, source }
    }

    fn sync_file(&mut self) -> Result<Duration, WalError> {
        self.sync_file_with(false)
    }

    /// `fdatasync`, or `fsync` when `all` (after a size change that no data
    /// write depends on, which `fdatasync` need not persist).
    fn sync_file_with(&mut self, all: bool) -> Result<Duration, WalError> {
        let started = Instant::now();
        let result = if all {
            self.file.sync_all()
        } else {
            self.file.sync_data()
        };
        if let Err(e) = result {
            let path = self.current().path.clone();
            return Err(self.poison(WalError::io("fsync", path, e)));
        }
        self.stats.fsyncs += 1;
        self.unsynced = false;
        self.unsynced_records = 0;
        self.unsynced_bytes = 0;
        Ok(started.elapsed())
    }

    /// Commits, then deletes every segment older than `seq` (never the
    /// current one), oldest first, fsyncing the directory after each, so a
    /// crash part-way leaves a contiguous run of segments. Returns how many
    /// were deleted.
    pub fn remove_segments_before(&mut self, seq: u64) -> Result<usize, WalError> {
        // The records that replace the old segments must be durable before
        // the old segments go.
        self.commit()?;
        let cut = seq.min(self.current().seq);
        if self.segments.first().is_some_and(|s| s.seq < cut) {
            // The new start is recorded (and synced) before any file goes,
            // so a deleted segment is never mistaken for a lost one; a crash
            // part-way leaves segments before the start, which recovery
            // deletes.
            let (last, len) = (self.current().seq, self.current().len);
            if let Err(e) = self.manifest.write(cut, last, len, false) {
                return Err(self.poison(e));
            }
            self.stats.fsyncs += 1;
        }
        let mut removed = 0;
        while self.segments.first().is_some_and(|s| s.seq < cut) {
            let path = self.segments[0].path.clone();
            if let Err(e) = self.storage.remove_file(&path) {
                return Err(self.poison(WalError::io("remove segment", path, e)));
            }
            self.segments.remove(0);
            removed += 1;
            if let Err(e) = self.storage.sync_dir(&self.dir) {
                let dir = self.dir.clone();
                return Err(self.poison(WalError::io("fsync directory", dir, e)));
            }
            self.stats.dir_fsyncs += 1;
        }
        Ok(removed)
    }

    /// Commits and closes the log, releasing the directory lock. Records the
    /// clean close in the manifest: the newest segment's exact length, so
    /// that the next open detects records cut from its end.
    pub fn close(mut self) -> Result<(), WalError> {
        self.commit()?;
        self.mark_closed()
    }

    /// Records a clean close, if everything appended is synced.
    fn mark_closed(&mut self) -> Result<(), WalError> {
        self.check()?;
        if self.closed || !self.pending.is_empty() || self.unsynced {
            return Ok(());
        }
        self.closed = true;
        let (first, last, len) = (self.segments[0].seq, self.current().seq, self.current().len);
        self.manifest.write(first, last, len, true)
    }

    /// Sequence number of the segment the record appended last goes to
    /// when written (a later one than the current segment's if the
    /// appended records fill it). For callers that track where records are.
    pub fn pending_segment(&self) -> u64 {
        self.current().seq + self.breaks.len() as u64
    }

    /// The segment files, oldest first; the last is being written.
    pub fn segments(&self) -> &[SegmentInfo] {
        &self.segments
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Counters for metrics.
    pub fn stats(&self) -> WalStats {
        WalStats {
            segments: self.segments.len(),
            current_segment: self.current().seq,
            pending_records: self.pending_records,
            pending_bytes: self.pending.len() as u64,
            ..self.stats.clone()
        }
    }

    /// Whether an earlier error made the log unusable until reopened.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    fn check(&self) -> Result<(), WalError> {
        match &self.poisoned {
            Some(cause) => Err(WalError::Poisoned {
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    fn poison(&mut self, e: WalError) -> WalError {
        if self.poisoned.is_none() {
            self.poisoned = Some(e.to_string());
        }
        e
    }

    /// Length of the current segment's file, zero-filled region included
    /// (for tests and diagnostics; [`segments`](Wal::segments) gives the
    /// logical lengths).
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    fn current(&self) -> &SegmentInfo {
        // Recovery always hands over at least one segment, and the current
        // one is never removed.
        match self.segments.last() {
            Some(s) => s,
            None => unreachable!("a Wal always has a current segment"),
        }
    }

    fn segments_last_mut(&mut self) -> &mut SegmentInfo {
        match self.segments.last_mut() {
            Some(s) => s,
            None => unreachable!("a Wal always has a current segment"),
        }
    }
}

impl Drop for Wal {
    /// A log dropped with everything synced is closed cleanly: the server
    /// drops its log after the last sync rather than closing it. Best
    /// effort: without the mark, the next open only checks less.
    fn drop(&mut self) {
        let _ = self.mark_closed();
    }
}

/// A full disk or quota: the errors after which a write may be undone and
/// retried later rather than poisoning the log.
pub(crate) fn is_no_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}
