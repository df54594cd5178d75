//! Recovery: reading every segment back in order when the log is opened,
//! deciding whether damage at the end of the last segment is a torn tail (cut
//! off and reported) or corruption (an error naming file and offset), and
//! handing the repaired log to the writer. Zeros after the last record of
//! the last segment are the writer's zero-filled region, the normal end of
//! that segment: they are neither reported nor cut.
//!
//! The segments found are checked against the `MANIFEST` (which segments
//! must exist, and how long the newest was when last recorded): a missing
//! oldest or newest segment file, or records gone from the end of the newest,
//! is [`WalError::Missing`] unless [`WalOptions::accept_data_loss`] is set,
//! in which case the loss is reported in [`RecoveryReport::lost`].
//!
//! Records are streamed to the caller from one reusable buffer, so replaying
//! millions of small records costs no allocation per record.

use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::WalError;
use crate::format::{
    self, classify_file_name, decode_segment_header, encode_segment_header, le_u32, record_crc,
    segment_file_name, valid_record_at, FileKind, HeaderError, ManifestSlot, FORMAT_VERSION,
    FORMAT_VERSION_OLDEST, RECORD_HEADER_LEN, RECORD_MAX_BYTES, SEGMENT_HEADER_LEN,
};
use crate::manifest::{manifest_path, read_manifest, ManifestState, ManifestWriter};
use crate::storage::{parent_dir, LockGuard, Storage, WriteFile};
use crate::wal::{is_no_space, SegmentInfo, Wal, WalOptions};

/// Read buffer size: big enough that reads are few and large (one system
/// call per MiB), small enough not to matter next to the engine's state.
/// A record larger than this grows the buffer to fit it.
const READ_BUFFER_BYTES: usize = 1 << 20;

/// Most work (bytes hashed plus byte offsets tried) spent looking for a valid
/// record after a damaged one in the last segment, which is what tells a torn
/// tail from corruption. Bounds the extra startup time after a crash to well
/// under a second even when the damaged record is a partly written 1 GiB one;
/// any tail of a few MiB is searched completely.
pub const TAIL_SEARCH_BUDGET: u64 = 512 << 20;

/// Candidate records at most this long are tried first when searching a
/// damaged tail, so that small valid records right after the damage are found
/// before the budget goes on long, unlikely candidates.
const TAIL_SEARCH_SMALL_RECORD_BYTES: u32 = 64 << 10;

/// What recovery found, for the caller to log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// Segment files read.
    pub segments: usize,
    /// Sequence numbers of the first and last segment (after recovery, the
    /// last one is the segment new records go to).
    pub first_segment: Option<u64>,
    pub last_segment: Option<u64>,
    /// Records replayed.
    pub records: u64,
    /// Sum of their payload lengths.
    pub payload_bytes: u64,
    /// Bytes of segment files kept, headers and framing included.
    pub file_bytes: u64,
    /// Set when the end of the last segment was cut off.
    pub torn_tail: Option<TornTail>,
    /// True when there was no log and a new one was created.
    pub created: bool,
    /// What was missing and opened without, because
    /// [`WalOptions::accept_data_loss`] was set (without it, recovery fails
    /// with [`WalError::Missing`] instead). For the caller to log loudly.
    pub lost: Vec<LostData>,
    /// How the log was last closed, per the manifest: `Some(true)` cleanly
    /// (everything synced, the newest segment's exact length recorded), so a
    /// cut anywhere would have been detected; `Some(false)` not (a crash, a
    /// kill, an I/O error), so records written after the manifest's last
    /// write (at start-up or at the newest segment's creation) are not
    /// covered; `None` when there was no manifest.
    pub previous_close_clean: Option<bool>,
    /// The log had segments of format version 1 only and no manifest (it was
    /// written by a release before the manifest existed): a manifest was
    /// created and new records go to a segment of the current version (a new
    /// one, or the newest, when its torn header was rewritten).
    /// Files missing before this open could not be detected; from now on
    /// they are.
    pub upgraded: bool,
    /// Segments before the manifest's first one, left by a compaction that a
    /// crash interrupted after it recorded its cut: not replayed (the
    /// snapshot after the cut replaces them) and deleted.
    pub compaction_leftovers_removed: usize,
}

/// Part of the log found missing and accepted
/// ([`WalOptions::accept_data_loss`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LostData {
    /// The missing file (the first of a run), or the file records are
    /// missing from.
    pub path: PathBuf,
    /// What was expected there.
    pub detail: String,
}

impl fmt::Display for LostData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.detail)
    }
}

/// The damaged end of the last segment that recovery cut off.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TornTail {
    pub segment: u64,
    pub path: PathBuf,
    /// The file now ends here: the end of the last whole record (or 0 when the
    /// segment's header itself was incomplete, and the header was rewritten).
    pub offset: u64,
    /// Bytes cut off.
    pub discarded_bytes: u64,
    /// What was wrong at `offset`.
    pub reason: String,
    /// False when the search for valid records after the damage ran out of
    /// its budget ([`TAIL_SEARCH_BUDGET`]) before covering the whole tail.
    pub search_complete: bool,
}

impl fmt::Display for TornTail {
    /// States only what recovery knows: it cannot tell a crash from other
    /// damage, nor which fsync policy wrote the records.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "damaged end of {} at byte offset {}: {}; cut the {} bytes from there. \
             A crash during a write leaves this, and then the records cut were never fsynced: \
             under fsync=always none of them was acknowledged, but under fsync=interval or never \
             acknowledged writes may be among them",
            self.path.display(),
            self.offset,
            self.reason,
            self.discarded_bytes
        )?;
        if !self.search_complete {
            write!(
                f,
                "; the search for valid records after it stopped at its budget"
            )?;
        }
        Ok(())
    }
}

/// How the last segment must be repaired before new records go after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repair {
    None,
    TruncateTo(u64),
    RewriteHeader,
}

/// The segment being read.
struct SegmentReader {
    seq: u64,
    path: PathBuf,
    file: Box<dyn Read + Send>,
    file_len: u64,
    is_last: bool,
    /// File offset of `buf[0]`.
    buf_offset: u64,
    start: usize,
    end: usize,
    eof: bool,
}

/// An opened log being replayed. Call [`next_record`](Recovery::next_record)
/// until it returns `None`, then [`finish`](Recovery::finish) to get the
/// writer; the data directory stays locked throughout.
///
/// ```no_run
/// # fn main() -> Result<(), spool_wal::WalError> {
/// let mut recovery = spool_wal::Wal::open("spool-data", spool_wal::WalOptions::default())?;
/// while let Some(record) = recovery.next_record()? {
///     // apply `record` to the in-memory state
///     # let _ = record;
/// }
/// let (wal, report) = recovery.finish()?;
/// if let Some(torn) = &report.torn_tail {
///     eprintln!("{torn}");
/// }
/// # drop(wal); Ok(()) }
/// ```
pub struct Recovery {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    options: WalOptions,
    lock: Box<dyn LockGuard>,
    seqs: Vec<u64>,
    next_index: usize,
    reader: Option<SegmentReader>,
    buf: Vec<u8>,
    done: Vec<SegmentInfo>,
    repair: Repair,
    /// File length of the last segment (past its records when it ends in
    /// the writer's zero-filled region).
    last_file_len: u64,
    report: RecoveryReport,
    failed: Option<String>,
    manifest: ManifestState,
    /// Segments before the manifest's first one: skipped, deleted in
    /// `finish`.
    leftovers: Vec<u64>,
    /// Segments read whose header is of version 2 or later (they say the
    /// directory has a manifest).
    manifest_era_segments: Vec<u64>,
    /// Header version of the last segment (None: its header was torn).
    last_version: Option<u32>,
    /// The checks that need every segment read have run.
    checked: bool,
}

impl fmt::Debug for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recovery")
            .field("dir", &self.dir)
            .field("segments", &self.seqs.len())
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

enum Step {
    Record(std::ops::Range<usize>),
    SegmentDone,
    Finished,
}

impl Recovery {
    pub(crate) fn start(
        storage: Arc<dyn Storage>,
        dir: &Path,
        options: WalOptions,
    ) -> Result<Self, WalError> {
        options.validate()?;
        storage
            .create_dir_all(dir)
            .map_err(|e| WalError::io("create directory", dir, e))?;
        let lock_path = dir.join(format::LOCK_FILE_NAME);
        let lock = match storage.lock(&lock_path) {
            Ok(guard) => guard,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(WalError::Locked(lock_path))
            }
            Err(e) => return Err(WalError::io("lock", lock_path, e)),
        };
        let names = storage
            .list(dir)
            .map_err(|e| WalError::io("list", dir, e))?;
        let mut seqs = Vec::new();
        for name in names {
            match classify_file_name(&name) {
                FileKind::Segment(seq) => seqs.push(seq),
                FileKind::MalformedSegment => return Err(WalError::corrupt(
                    dir.join(&name),
                    0,
                    "file ends in .wal but is not named like a segment (16 lowercase hex digits)",
                )),
                FileKind::Other => {}
            }
        }
        seqs.sort_unstable();
        // Segments are only ever removed from the front, so a gap means a
        // segment went missing and its records with it.
        for pair in seqs.windows(2) {
            if pair[1] != pair[0] + 1 {
                return Err(WalError::corrupt(
                    dir.join(segment_file_name(pair[1])),
                    0,
                    format!(
                        "segment {} is missing (segments {:#x} and {:#x} are not consecutive)",
                        segment_file_name(pair[0] + 1),
                        pair[0],
                        pair[1]
                    ),
                ));
            }
        }
        let manifest = read_manifest(&*storage, dir)?;
        let mut report = RecoveryReport::default();
        let mut leftovers = Vec::new();
        if let ManifestState::Valid(m, _) = &manifest {
            report.previous_close_clean = Some(m.clean);
            // Segments before the manifest's first were superseded by a
            // compaction whose snapshot was synced before it recorded the
            // cut; a crash kept them. Only while the first segment exists
            // (otherwise the snapshot is gone, and they are all that is left).
            if seqs.contains(&m.first_segment) {
                let keep = seqs.partition_point(|&s| s < m.first_segment);
                leftovers = seqs.drain(..keep).collect();
            }
            let missing = missing_segments(dir, &seqs, m);
            accept_or_fail(options.accept_data_loss, &mut report.lost, missing)?;
        }
        Ok(Recovery {
            storage,
            dir: dir.to_path_buf(),
            options,
            lock,
            seqs,
            next_index: 0,
            reader: None,
            buf: Vec::new(),
            done: Vec::new(),
            repair: Repair::None,
            last_file_len: 0,
            report,
            failed: None,
            manifest,
            leftovers,
            manifest_era_segments: Vec::new(),
            last_version: None,
            checked: false,
        })
    }

    /// The next surviving record, in log order, or `None` after the last one.
    ///
    /// The slice borrows an internal buffer and is valid until the next call.
    /// After an error every later call fails too.
    pub fn next_record(&mut self) -> Result<Option<&[u8]>, WalError> {
        if let Some(cause) = &self.failed {
            return Err(WalError::Poisoned {
                cause: cause.clone(),
            });
        }
        loop {
            match self.step() {
                Ok(Step::Record(range)) => return Ok(Some(&self.buf[range])),
                Ok(Step::SegmentDone) => {}
                Ok(Step::Finished) => return Ok(None),
                Err(e) => {
                    self.failed = Some(e.to_string());
                    return Err(e);
                }
            }
        }
    }

    /// What has been found so far (complete once `next_record` returned
    /// `None`).
    pub fn report(&self) -> &RecoveryReport {
        &self.report
    }

    /// Reads any records not yet read (discarding them), repairs the end of
    /// the last segment (cutting off a torn tail, or creating the first
    /// segment of a new log), records the log in the manifest, deletes the
    /// leftovers of an interrupted compaction, and returns the writer. A log
    /// whose newest segment is of format version 1 gets a new segment first,
    /// so its newest segment says it has a manifest.
    pub fn finish(mut self) -> Result<(Wal, RecoveryReport), WalError> {
        while self.next_record()?.is_some() {}
        let storage = Arc::clone(&self.storage);
        let (mut file, file_len, segments) = match self.done.last().cloned() {
            None => {
                let seq = 1;
                let path = self.dir.join(segment_file_name(seq));
                let file = create_segment(&*storage, &self.dir, seq, 0)?;
                // The data directory itself may be new: make its entry durable.
                let parent = parent_dir(&self.dir);
                storage
                    .sync_dir(&parent)
                    .map_err(|e| WalError::io("fsync directory", parent, e))?;
                self.report.created = true;
                self.report.segments = 1;
                self.report.first_segment = Some(seq);
                self.report.last_segment = Some(seq);
                self.report.file_bytes = SEGMENT_HEADER_LEN;
                let info = SegmentInfo {
                    seq,
                    path,
                    len: SEGMENT_HEADER_LEN,
                };
                (file, SEGMENT_HEADER_LEN, vec![info])
            }
            Some(last) => {
                let mut file = storage
                    .open_append(&last.path)
                    .map_err(|e| WalError::io("open for writing", &last.path, e))?;
                // What was read may still be only in the page cache (the
                // previous process was killed, the machine was not): make it
                // durable before the manifest says it is there.
                file.sync_data()
                    .map_err(|e| WalError::io("fsync", &last.path, e))?;
                // The writer goes on after the last record, into the zeros
                // (if any) that follow it.
                let mut file_len = match self.repair {
                    Repair::None => self.last_file_len,
                    Repair::TruncateTo(len) => len,
                    Repair::RewriteHeader => SEGMENT_HEADER_LEN,
                };
                // A torn header of a log that has a manifest is rewritten
                // now, before the manifest below claims the segment: on a
                // full disk there may be no room even for a header, and then
                // the segment (created with no record in it) is removed and
                // the one before it is the last again. (A version-1 log's
                // torn header is rewritten after the manifest exists; see
                // below.)
                if self.repair == Repair::RewriteHeader
                    && matches!(self.manifest, ManifestState::Valid(..))
                {
                    let prev_len = match self.done.len() {
                        n if n >= 2 => self.done[n - 2].len,
                        _ => 0,
                    };
                    file.truncate(0)
                        .map_err(|e| WalError::io("truncate torn header", &last.path, e))?;
                    match file.write_all(&encode_segment_header(last.seq, prev_len)) {
                        Ok(()) => file
                            .sync_all()
                            .map_err(|e| WalError::io("fsync", &last.path, e))?,
                        Err(e) if is_no_space(&e) && self.done.len() >= 2 => {
                            drop(file);
                            (file, file_len) = self.drop_torn_last_segment(e)?;
                        }
                        Err(e) => return Err(WalError::io("write header", &last.path, e)),
                    }
                    self.last_version = Some(FORMAT_VERSION);
                    self.repair = Repair::None;
                }
                (file, file_len, std::mem::take(&mut self.done))
            }
        };
        let (first, last) = match (segments.first(), segments.last()) {
            (Some(first), Some(last)) => (first.seq, last.clone()),
            _ => unreachable!("recovery hands over at least one segment"),
        };
        // Before the repairs below: a crash between the two leaves a log the
        // manifest describes (the repairs only cut what it does not claim),
        // and a header rewritten in the current version (which says there
        // is a manifest) only ever follows one.
        let manifest = ManifestWriter::open(
            &*storage,
            &self.dir,
            &self.manifest,
            ManifestSlot {
                generation: 0,
                first_segment: first,
                last_segment: last.seq,
                last_segment_len: last.len,
                clean: false,
            },
        )?;
        match self.repair {
            Repair::None => {}
            Repair::TruncateTo(len) => {
                file.truncate(len)
                    .map_err(|e| WalError::io("truncate torn tail", &last.path, e))?;
                file.sync_all()
                    .map_err(|e| WalError::io("fsync", &last.path, e))?;
            }
            Repair::RewriteHeader => {
                let prev_len = match segments.len() {
                    n if n >= 2 => segments[n - 2].len,
                    _ => 0,
                };
                file.truncate(0)
                    .map_err(|e| WalError::io("truncate torn header", &last.path, e))?;
                file.write_all(&encode_segment_header(last.seq, prev_len))
                    .map_err(|e| WalError::io("write header", &last.path, e))?;
                file.sync_all()
                    .map_err(|e| WalError::io("fsync", &last.path, e))?;
                self.last_version = Some(FORMAT_VERSION);
            }
        }
        // Oldest first, each removal synced, as compaction does: a crash
        // part-way leaves a consecutive run before the first segment.
        for &seq in &self.leftovers {
            let path = self.dir.join(segment_file_name(seq));
            match storage.remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(WalError::io("remove compacted segment", path, e)),
            }
            storage
                .sync_dir(&self.dir)
                .map_err(|e| WalError::io("fsync directory", &self.dir, e))?;
        }
        self.report.compaction_leftovers_removed = self.leftovers.len();
        let mut wal = Wal::from_recovery(
            storage,
            self.dir,
            self.options,
            self.lock,
            file,
            file_len,
            segments,
            manifest,
        );
        if self.last_version == Some(FORMAT_VERSION_OLDEST) {
            // Upgrade in place: the records stay where they are, new ones go
            // to a segment of the current version, whose header says the
            // manifest must exist.
            self.report.last_segment = Some(wal.rotate()?);
        }
        Ok((wal, self.report))
    }

    /// Removes the last segment, torn while it was created (so it holds no
    /// record), instead of rewriting its header: the segment before it,
    /// complete as rotation left it, becomes the last again. Returns that
    /// segment opened for writing, and its length. Without a segment before
    /// it, fails with `header_error`.
    fn drop_torn_last_segment(
        &mut self,
        header_error: io::Error,
    ) -> Result<(Box<dyn WriteFile>, u64), WalError> {
        let prev = self.done.len().checked_sub(2).map(|i| self.done[i].clone());
        let (Some(prev), Some(torn)) = (prev, self.done.last().cloned()) else {
            return Err(WalError::io("write header", &self.dir, header_error));
        };
        self.done.pop();
        self.storage
            .remove_file(&torn.path)
            .map_err(|e| WalError::io("remove torn segment", &torn.path, e))?;
        self.storage
            .sync_dir(&self.dir)
            .map_err(|e| WalError::io("fsync directory", &self.dir, e))?;
        let file = self
            .storage
            .open_append(&prev.path)
            .map_err(|e| WalError::io("open for writing", &prev.path, e))?;
        self.report.segments -= 1;
        self.report.last_segment = Some(prev.seq);
        self.report.file_bytes -= torn.len;
        if let Some(tail) = &mut self.report.torn_tail {
            tail.reason
                .push_str("; no room on the disk to rewrite its header, so it was removed");
        }
        Ok((file, prev.len))
    }

    /// Reads every record into memory and finishes. Convenient for tests and
    /// small logs; a large log is better replayed with `next_record`.
    pub fn collect_records(mut self) -> Result<(Wal, Vec<Vec<u8>>, RecoveryReport), WalError> {
        let mut records = Vec::new();
        while let Some(r) = self.next_record()? {
            records.push(r.to_vec());
        }
        let (wal, report) = self.finish()?;
        Ok((wal, records, report))
    }

    fn step(&mut self) -> Result<Step, WalError> {
        let Some(r) = self.reader.as_mut() else {
            if self.next_index == self.seqs.len() {
                if !self.checked {
                    self.checked = true;
                    self.check_end()?;
                }
                return Ok(Step::Finished);
            }
            self.open_segment()?;
            return Ok(Step::SegmentDone);
        };
        let pos = r.buf_offset + r.start as u64;
        if !fill(r, &mut self.buf, RECORD_HEADER_LEN as usize)
            .map_err(|e| WalError::io("read", &r.path, e))?
        {
            if r.start == r.end {
                self.end_segment(pos);
                return Ok(Step::SegmentDone);
            }
            let have = r.end - r.start;
            return self.damaged(pos, format!("partial record header ({have} of 8 bytes)"));
        }
        let header = &self.buf[r.start..r.start + RECORD_HEADER_LEN as usize];
        let len = le_u32(header);
        let stored_crc = le_u32(&header[4..]);
        if len as usize > RECORD_MAX_BYTES {
            return self.damaged(
                pos,
                format!("record length {len} is over the {RECORD_MAX_BYTES}-byte limit"),
            );
        }
        let total = RECORD_HEADER_LEN + u64::from(len);
        if pos + total > r.file_len {
            let left = r.file_len.saturating_sub(pos + RECORD_HEADER_LEN);
            return self.damaged(
                pos,
                format!("record of {len} bytes runs past the end of the file ({left} bytes left)"),
            );
        }
        #[allow(clippy::cast_possible_truncation)] // total <= RECORD_MAX_BYTES + 8
        let total = total as usize;
        if !fill(r, &mut self.buf, total).map_err(|e| WalError::io("read", &r.path, e))? {
            return self.damaged(
                pos,
                "file ended before the end of the record (it shrank while being read)".into(),
            );
        }
        let payload = r.start + RECORD_HEADER_LEN as usize..r.start + total;
        if record_crc(len.to_le_bytes(), &self.buf[payload.clone()]) != stored_crc {
            return self.damaged(pos, "record checksum mismatch".into());
        }
        r.start += total;
        self.report.records += 1;
        self.report.payload_bytes += u64::from(len);
        Ok(Step::Record(payload))
    }

    /// Opens the next segment and checks its header.
    fn open_segment(&mut self) -> Result<(), WalError> {
        let seq = self.seqs[self.next_index];
        let is_last = self.next_index + 1 == self.seqs.len();
        self.next_index += 1;
        let path = self.dir.join(segment_file_name(seq));
        let (file, file_len) = self
            .storage
            .open_read(&path)
            .map_err(|e| WalError::io("open", &path, e))?;
        // A small segment needs no more than its own size.
        let want = usize::try_from(file_len)
            .map_or(READ_BUFFER_BYTES, |len| len.clamp(64, READ_BUFFER_BYTES));
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        let mut r = SegmentReader {
            seq,
            path,
            file,
            file_len,
            is_last,
            buf_offset: 0,
            start: 0,
            end: 0,
            eof: false,
        };
        if is_last {
            self.last_file_len = file_len;
        }
        self.report.segments += 1;
        self.report.first_segment.get_or_insert(seq);
        self.report.last_segment = Some(seq);
        let full = fill(&mut r, &mut self.buf, SEGMENT_HEADER_LEN as usize)
            .map_err(|e| WalError::io("read", &r.path, e))?;
        let header = &self.buf[..r.end.min(SEGMENT_HEADER_LEN as usize)];
        let checked = if full {
            decode_segment_header(header, seq)
        } else {
            Err(HeaderError::Short)
        };
        match checked {
            Ok(header) => {
                if header.version > FORMAT_VERSION_OLDEST {
                    self.manifest_era_segments.push(seq);
                }
                if is_last {
                    self.last_version = Some(header.version);
                }
                if let Some(prev) = self.done.last() {
                    // 0: not recorded (no predecessor when it was written).
                    if header.prev_segment_len != 0 && prev.len != header.prev_segment_len {
                        return Err(WalError::corrupt(
                            &prev.path,
                            prev.len.min(header.prev_segment_len),
                            format!(
                                "segment is {} bytes long, but the next segment's header says it was {} bytes when \
                                 the next one was started: records were cut from its end (or bytes added)",
                                prev.len, header.prev_segment_len
                            ),
                        ));
                    }
                }
                r.start = SEGMENT_HEADER_LEN as usize;
                self.reader = Some(r);
                Ok(())
            }
            Err(e) => {
                // The writer fsyncs a new segment's header before writing any
                // record to it, so a last segment whose header did not survive
                // but which has no room for a record (or holds only zeros)
                // cannot contain acknowledged records: it was torn while being
                // created. A header that is intact but unexpected is not torn.
                let torn_kind = matches!(
                    e,
                    HeaderError::Short | HeaderError::BadMagic | HeaderError::BadChecksum
                );
                let torn = is_last
                    && torn_kind
                    && (file_len <= SEGMENT_HEADER_LEN || {
                        let mut rest = Vec::new();
                        read_rest(&mut r, &self.buf, &mut rest)?;
                        rest.iter().all(|&b| b == 0)
                    });
                if !torn {
                    return Err(WalError::BadHeader {
                        path: r.path,
                        reason: e.to_string(),
                    });
                }
                self.report.torn_tail = Some(TornTail {
                    segment: seq,
                    path: r.path.clone(),
                    offset: 0,
                    discarded_bytes: file_len,
                    reason: format!("segment header incomplete ({e}), left by a crash while the segment was created"),
                    search_complete: true,
                });
                self.repair = Repair::RewriteHeader;
                self.report.file_bytes += SEGMENT_HEADER_LEN;
                self.done.push(SegmentInfo {
                    seq,
                    path: r.path,
                    len: SEGMENT_HEADER_LEN,
                });
                Ok(())
            }
        }
    }

    /// The checks that need every segment read: records cut from the end of
    /// the segment the manifest last recorded, and a manifest that is gone
    /// although the segments say there is one.
    fn check_end(&mut self) -> Result<(), WalError> {
        let mut missing = Vec::new();
        match &self.manifest {
            ManifestState::Valid(m, _) => {
                // After a torn tail, `len` is where the cut will be.
                if let Some(s) = self.done.iter().find(|s| s.seq == m.last_segment) {
                    if s.len < m.last_segment_len {
                        let when = if m.clean {
                            "when the log was last closed (cleanly)"
                        } else {
                            "when the manifest was last written (at the last start or rotation)"
                        };
                        missing.push(LostData {
                            path: s.path.clone(),
                            detail: format!(
                                "the segment's records end at byte {}, but it held at least {} bytes of durable \
                                 records {when}: the records after byte {} were cut off or damaged",
                                s.len, m.last_segment_len, s.len
                            ),
                        });
                    }
                }
            }
            ManifestState::Absent | ManifestState::Damaged(_) => {
                // A new log creates its first segment before the manifest,
                // and an old one gets its manifest before any segment of the
                // current version: so a crash can leave no (valid) manifest
                // only next to format-1 segments or an empty segment 1.
                let first_has_records = self
                    .done
                    .first()
                    .is_some_and(|s| s.len > SEGMENT_HEADER_LEN);
                let needed = self
                    .manifest_era_segments
                    .iter()
                    .any(|&s| s != 1 || first_has_records)
                    || (self.seqs.is_empty() && self.manifest != ManifestState::Absent);
                if needed {
                    let state = match &self.manifest {
                        ManifestState::Damaged(why) => format!("has no valid slot ({why})"),
                        _ => "is missing".to_string(),
                    };
                    missing.push(LostData {
                        path: manifest_path(&self.dir),
                        detail: format!(
                            "the manifest {state}, but the segment headers (format version {FORMAT_VERSION}) say \
                             this log keeps one: which segment files must exist is unknown, so a missing oldest \
                             or newest segment could not be detected"
                        ),
                    });
                } else if !self.seqs.is_empty() {
                    self.report.upgraded = self.manifest_era_segments.is_empty();
                }
            }
        }
        accept_or_fail(
            self.options.accept_data_loss,
            &mut self.report.lost,
            missing,
        )
    }

    fn end_segment(&mut self, len: u64) {
        if let Some(r) = self.reader.take() {
            self.report.file_bytes += len;
            self.done.push(SegmentInfo {
                seq: r.seq,
                path: r.path,
                len,
            });
        }
    }

    /// The record at `pos` of the current segment is damaged: corruption,
    /// unless this is the last segment and nothing valid follows.
    fn damaged(&mut self, pos: u64, reason: String) -> Result<Step, WalError> {
        let Some(r) = self.reader.as_mut() else {
            return Ok(Step::Finished);
        };
        if !r.is_last {
            return Err(WalError::corrupt(
                &r.path,
                pos,
                format!(
                    "{reason} (in a segment that is not the last, so it cannot be a torn write)"
                ),
            ));
        }
        let mut tail = Vec::new();
        read_rest(r, &self.buf, &mut tail)?;
        if tail.iter().all(|&b| b == 0) {
            // The writer's zero-filled region (a zero-length record never
            // has a zero checksum, so zeros are never a record): the clean
            // end of the segment, left in place for the writer to go on in.
            self.end_segment(pos);
            return Ok(Step::SegmentDone);
        }
        match search_tail(&tail) {
            TailSearch::ValidRecordAt(rel) => Err(WalError::corrupt(
                &r.path,
                pos,
                format!(
                    "{reason}, and a valid record follows at offset {}, so this is not a torn write",
                    pos + rel as u64
                ),
            )),
            TailSearch::NothingValid { complete } => {
                self.report.torn_tail = Some(TornTail {
                    segment: r.seq,
                    path: r.path.clone(),
                    offset: pos,
                    discarded_bytes: r.file_len - pos,
                    reason,
                    search_complete: complete,
                });
                self.repair = Repair::TruncateTo(pos);
                self.end_segment(pos);
                Ok(Step::SegmentDone)
            }
        }
    }
}

/// Returns the first loss as [`WalError::Missing`] (naming all of them), or
/// with `accept` set, adds them to `lost`.
fn accept_or_fail(
    accept: bool,
    lost: &mut Vec<LostData>,
    missing: Vec<LostData>,
) -> Result<(), WalError> {
    let Some(first) = missing.first() else {
        return Ok(());
    };
    if accept {
        lost.extend(missing);
        return Ok(());
    }
    let mut detail = first.detail.clone();
    for more in &missing[1..] {
        detail.push_str(&format!("; also {more}"));
    }
    Err(WalError::Missing {
        path: first.path.clone(),
        detail,
    })
}

/// What to add to "missing" when segments `from` to `to` are: nothing for
/// one file (the error names it), else where the run ends.
fn and_the_rest(from: u64, to: u64) -> String {
    if from == to {
        String::new()
    } else {
        format!(
            ", and so is every segment up to {} ({} files)",
            segment_file_name(to),
            to - from + 1
        )
    }
}

/// The segments the manifest `m` says must exist that are not among
/// `seqs` (consecutive, sorted, without compaction leftovers), and a
/// manifest older than the segments.
fn missing_segments(dir: &Path, seqs: &[u64], m: &ManifestSlot) -> Vec<LostData> {
    let (first, last) = (m.first_segment, m.last_segment);
    let mut missing = Vec::new();
    let mut lose = |seq: u64, detail: String| {
        missing.push(LostData {
            path: dir.join(segment_file_name(seq)),
            detail,
        });
    };
    match (seqs.first().copied(), seqs.last().copied()) {
        (Some(a), Some(b)) if a <= last && b >= first => {
            if a > first {
                lose(
                    first,
                    format!(
                        "missing{}: the manifest says the log starts at {} (compaction records a new start \
                         before it deletes segments), so the oldest records are lost",
                        and_the_rest(first, a - 1),
                        segment_file_name(first)
                    ),
                );
            }
            if b < last {
                lose(
                    b + 1,
                    format!(
                        "missing{}: the manifest says the log runs to {}, so the newest records are lost",
                        and_the_rest(b + 1, last),
                        segment_file_name(last)
                    ),
                );
            }
        }
        _ => lose(
            first,
            format!(
                "missing{}: the manifest says the log is segments {} to {}, and none of them is here, \
                 so every record is lost",
                and_the_rest(first, last),
                segment_file_name(first),
                segment_file_name(last)
            ),
        ),
    }
    // The writer records a segment right after creating it, so one more may
    // exist; more than that means the manifest is older than the segments.
    if let Some(b) = seqs.last().copied().filter(|&b| b > last + 1) {
        missing.push(LostData {
            path: manifest_path(dir),
            detail: format!(
                "the manifest says {} is the newest segment, but segments up to {} exist: it is older than \
                 the segment files (restored from another copy?), so whether files are missing cannot be \
                 checked",
                segment_file_name(last),
                segment_file_name(b)
            ),
        });
    }
    missing
}

/// Makes `buf[r.start..r.end]` hold at least `n` bytes, reading more of the
/// file as needed. Returns false if the file ends first.
fn fill(r: &mut SegmentReader, buf: &mut Vec<u8>, n: usize) -> io::Result<bool> {
    while r.end - r.start < n {
        if r.eof {
            return Ok(false);
        }
        if r.start + n > buf.len() {
            // Move the unread bytes to the front; grow only for a record
            // larger than the buffer (its length was checked against the
            // file's, so this never allocates for a damaged length).
            buf.copy_within(r.start..r.end, 0);
            r.buf_offset += r.start as u64;
            r.end -= r.start;
            r.start = 0;
            if n > buf.len() {
                buf.resize(n, 0);
            }
        }
        match r.file.read(&mut buf[r.end..]) {
            Ok(0) => r.eof = true,
            Ok(read) => r.end += read,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Everything from `r.start` to the end of the file.
fn read_rest(r: &mut SegmentReader, buf: &[u8], out: &mut Vec<u8>) -> Result<(), WalError> {
    out.extend_from_slice(&buf[r.start..r.end]);
    r.file
        .read_to_end(out)
        .map_err(|e| WalError::io("read", &r.path, e))?;
    r.end = r.start;
    r.eof = true;
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum TailSearch {
    ValidRecordAt(usize),
    NothingValid { complete: bool },
}

/// Looks for a valid record after the damaged one at `tail[0]`.
///
/// Tries, in order: the place the damaged record's own length points to
/// (where the next record is if only the payload or checksum was hit), then
/// every later byte offset, short candidates before long ones (which also
/// finds the next record when the length field itself was hit). Zeros are
/// never a valid record (the CRC of a zero length is not zero), so a
/// preallocated or unwritten tail is quickly found to hold nothing.
fn search_tail(tail: &[u8]) -> TailSearch {
    search_tail_within(tail, TAIL_SEARCH_BUDGET)
}

fn search_tail_within(tail: &[u8], budget: u64) -> TailSearch {
    if tail.iter().all(|&b| b == 0) {
        return TailSearch::NothingValid { complete: true };
    }
    let h = RECORD_HEADER_LEN as usize;
    if tail.len() >= h {
        let next = h + le_u32(tail) as usize;
        if le_u32(tail) as usize <= RECORD_MAX_BYTES
            && next < tail.len()
            && valid_record_at(&tail[next..]).is_some()
        {
            return TailSearch::ValidRecordAt(next);
        }
    }
    let mut budget = budget;
    let mut spend = |cost: u64| match budget.checked_sub(cost) {
        Some(left) => {
            budget = left;
            true
        }
        None => false,
    };
    for small_pass in [true, false] {
        for p in 1..=tail.len().saturating_sub(h) {
            if !spend(1) {
                return TailSearch::NothingValid { complete: false };
            }
            let len = le_u32(&tail[p..]);
            if (len <= TAIL_SEARCH_SMALL_RECORD_BYTES) != small_pass
                || len as usize > RECORD_MAX_BYTES
                || p + h + len as usize > tail.len()
            {
                continue;
            }
            if !spend(4 + u64::from(len)) {
                return TailSearch::NothingValid { complete: false };
            }
            if valid_record_at(&tail[p..]).is_some() {
                return TailSearch::ValidRecordAt(p);
            }
        }
    }
    TailSearch::NothingValid { complete: true }
}

/// Creates segment `seq` with its header, durably (file and directory entry).
/// `prev_len` is the final length of segment `seq - 1`, 0 if none.
pub(crate) fn create_segment(
    storage: &dyn Storage,
    dir: &Path,
    seq: u64,
    prev_len: u64,
) -> Result<Box<dyn WriteFile>, WalError> {
    let path = dir.join(segment_file_name(seq));
    let mut file = storage
        .create_new(&path)
        .map_err(|e| WalError::io("create segment", &path, e))?;
    file.write_all(&encode_segment_header(seq, prev_len))
        .map_err(|e| WalError::io("write header", &path, e))?;
    // The header is durable before any record can be written after it, which
    // is what lets recovery treat a last segment with a bad header and no
    // room for records as torn rather than corrupt.
    file.sync_data()
        .map_err(|e| WalError::io("fsync", &path, e))?;
    storage
        .sync_dir(dir)
        .map_err(|e| WalError::io("fsync directory", dir, e))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::encode_record;

    fn records(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            encode_record(&mut out, p);
        }
        out
    }

    #[test]
    fn zeros_and_garbage_hold_nothing_valid() {
        assert_eq!(
            search_tail(&[0; 100]),
            TailSearch::NothingValid { complete: true }
        );
        let garbage: Vec<u8> = (0..5000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        assert_eq!(
            search_tail(&garbage),
            TailSearch::NothingValid { complete: true }
        );
    }

    #[test]
    fn finds_next_record_after_damaged_payload() {
        let mut tail = records(&[b"hello", b"world"]);
        tail[9] ^= 1;
        assert_eq!(search_tail(&tail), TailSearch::ValidRecordAt(13));
    }

    #[test]
    fn finds_next_record_after_damaged_length() {
        let mut tail = records(&[b"hello", b"world", b"again"]);
        tail[0..4].copy_from_slice(&[0x55, 0x13, 0x00, 0x7f]);
        assert_eq!(search_tail(&tail), TailSearch::ValidRecordAt(13));
    }

    #[test]
    fn search_stops_at_its_budget() {
        // A damaged record, then 10 KB of junk, then a valid record: found
        // with room to spare, not found (and said so) on a tiny budget.
        let mut tail = vec![0xee; 8];
        tail.extend((0..10_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
        tail.extend(records(&[b"valid"]));
        let at = tail.len() - 13;
        assert_eq!(search_tail(&tail), TailSearch::ValidRecordAt(at));
        assert_eq!(
            search_tail_within(&tail, 1000),
            TailSearch::NothingValid { complete: false }
        );
    }

    #[test]
    fn partial_record_holds_nothing_valid() {
        let tail = records(&[b"a longer payload that was cut short"]);
        assert_eq!(
            search_tail(&tail[..20]),
            TailSearch::NothingValid { complete: true }
        );
    }
}
