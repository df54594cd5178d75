//! Log records: the durable changes the engine makes, and their byte form.
//!
//! The engine emits one record per change that must survive a restart (a
//! put, a delete, a release, bury or kick); the broker writes them to the
//! write-ahead log, which frames and checksums them but never looks inside.
//! Reservations are not logged: after a restart every reserved job is ready
//! again, as with beanstalkd's binlog. Replaying the records in order
//! rebuilds the jobs.
//!
//! Payload layout (little-endian), documented with the framing in
//! `docs/wal-format.md`:
//!
//! ```text
//! u8 payload version (1 or 2) | u8 kind | fields of the kind
//! kind 1 Put:    u64 id | u32 pri | u64 ttr_ns | u64 delay_ns | u64 created_wall_ns
//!                | state | u8 tube_len | tube | u32 body_len | body
//! kind 2 Update: u64 id | u32 pri | state                  (read only: version 1)
//! kind 3 Delete: u64 id
//! kind 4 Snapshot: as Put                                  (read only: version 1)
//! kind 5 NextId: u64 id
//! kind 6 Job, 7 JobSnapshot (version 2): as Put, then u32 attempts
//!                | u32 max_attempts | u64 version | extras
//! kind 8 Change (version 2): u64 id | u64 version | u32 attempts | u32 pri
//!                | u64 delay_ns | state | u8 flags (1 cancel requested)
//!                | opt str32 last_error | opt bytes32 result | u64 updated_wall_ns
//! kind 9 Batch (version 2): u32 count, then count × (u32 len | a payload)
//! kind 10 Queue (version 2): u8 name_len | name | policy | opt (u64 start, u64 until)
//! kind 20 Workflow (version 2): a workflow's whole state, the rest of the
//!                payload as `spool_engine::workflow` encodes it (its own
//!                version byte first; layout in `workflow.rs`)
//! kind 21 WorkflowProgress (version 2): a transition, likewise encoded
//! kind 22 WorkflowDelete (version 2): u64 workflow id
//! kind 23 WorkflowNextId (version 2): u64 next workflow id
//! kind 11 Schedule (version 2): u8 layout (1) | u8 name_len | name | str16 cron
//!                | str16 timezone | u8 queue_len | queue | template | u8 misfire
//!                (0 skip, 1 once, 2 all) | u32 catch_up_max | u64 jitter_ms
//!                | opt u64 max_backlog | u8 paused | opt u64 next_fire_at_ms
//!                | opt u64 last_fire_at_ms | opt u64 last_job | u64 fires
//!                | u64 misfires_skipped | u64 backlog_skips | opt u64 last_skew_ms
//!                | u64 created_at_ms | u64 updated_at_ms | u64 version
//!                (`_ms` fields: wall-clock ms, not converted by the epoch; a
//!                later layout appends fields and bumps the layout byte);
//!                layout 2 appends u64 ahead_due_ms | u64 ahead_job (a
//!                firing made ahead of its instant)
//! kind 12 ScheduleDeleted (version 2): u8 name_len | name
//! template: bytes32 payload | opt u32 priority | u8 run_at (0 now, 1 delay_ms,
//!        2 at_ms) | u64 ms | opt u64 ttr_ms | opt u32 max_attempts | opt backoff
//!        | u16 header count × (str16 name, str32 value) | opt str16 key
//!        | opt u64 idempotency_ttl_ms
//! state: u8 code | u64 wall_ns: 0 ready, 1 delayed (until), 2 buried,
//!        3 completed (at), 4 cancelled (at)
//! extras: u8 present; if 1: u16 header count × (str16 name, str32 value)
//!        | opt (str16 key, u64 expires_wall_ns) | opt backoff | opt str32 last_error
//!        | opt bytes32 result | u8 flags (1 cancel requested) | u64 updated_wall_ns
//! backoff: u64 initial_ms | u64 max_ms | f64 multiplier | f64 jitter
//! policy: u8 presence bits (max_jobs, max_attempts, backoff, ttr_ms,
//!        retention_ms, retention_max_jobs, concurrency, rate_per_s) then
//!        the present ones in that order: u64 | u32 | backoff | u64 | u64 |
//!        u64 | u32 | f64 bits as u64 (bits 6 and 7 came later; older
//!        records have them clear)
//! opt X: u8 0, or u8 1 then X; strN/bytesN: uN length then the bytes
//! ```
//!
//! A Batch is the records of one operation: replay applies all of them or
//! (when the batch is torn off the log's end, which the log's per-record
//! checksum catches) none.
//!
//! A Snapshot is a job's whole current state, written by compaction; it
//! creates or replaces the job. Compaction writes snapshots of every live
//! job after a cut and then deletes the segments before the cut, so after a
//! compaction an Update or Delete may name a job whose Put is gone; replay
//! skips those (the snapshot that follows holds the job's state). A NextId
//! record starts every snapshot: job ids are never reused, even when the
//! newest jobs were deleted and their records compacted away.
//!
//! Times are wall-clock nanoseconds since the Unix epoch on disk and the
//! engine's monotonic nanoseconds in memory; `epoch_ns` (wall time at
//! monotonic 0) converts between them.

use std::collections::BTreeMap;

use bytes::Bytes;
use spool_broker::{Backoff, Misfire, NewJob, QueuePolicy, RunAt, ScheduleSpec, ScheduleView};
use spool_proto::TubeName;

use crate::job::{JobExtra, JobId};
use crate::workflow::{Workflow, WorkflowId, WorkflowProgress};

/// Version of the payload layout written now; version 1 (kinds 1-5) is
/// still read.
pub const RECORD_FORMAT_VERSION: u8 = 2;

const KIND_PUT: u8 = 1;
const KIND_UPDATE: u8 = 2;
const KIND_DELETE: u8 = 3;
const KIND_SNAPSHOT: u8 = 4;
const KIND_NEXT_ID: u8 = 5;
const KIND_JOB: u8 = 6;
const KIND_JOB_SNAPSHOT: u8 = 7;
const KIND_CHANGE: u8 = 8;
const KIND_BATCH: u8 = 9;
const KIND_QUEUE: u8 = 10;
// Workflows take kinds from 20 on, leaving room below for other features.
const KIND_WORKFLOW: u8 = 20;
const KIND_WORKFLOW_PROGRESS: u8 = 21;
const KIND_WORKFLOW_DELETE: u8 = 22;
const KIND_WORKFLOW_NEXT_ID: u8 = 23;
const KIND_SCHEDULE: u8 = 11;
const KIND_SCHEDULE_DELETED: u8 = 12;
/// The layout of a Schedule record's fields written now.
/// Layout 1 has no firing made ahead; layout 2 appends one. A record with
/// none is still written in layout 1, which earlier releases read.
const SCHEDULE_LAYOUT: u8 = 1;
const SCHEDULE_LAYOUT_AHEAD: u8 = 2;

/// The write-ahead log's framing per record: length and checksum.
const FRAME_BYTES: u64 = 8;

/// Bytes a beanstalkd job's Put record takes in the log, framing included.
pub fn job_record_log_bytes(tube_len: usize, body_len: usize) -> u64 {
    FRAME_BYTES + 52 + tube_len as u64 + body_len as u64
}

/// Bytes a job without extras takes in a compaction's JobSnapshot record,
/// framing included: what a fully compacted log holds per live job.
pub fn job_snapshot_log_bytes(tube_len: usize, body_len: usize) -> u64 {
    job_record_log_bytes(tube_len, body_len) + 17
}

/// Bytes a Delete record takes in the log, framing included: the room the
/// space reserve keeps per live job so that a full disk never refuses a
/// delete. Checked against the encoder by a test.
pub const DELETE_RECORD_LOG_BYTES: u64 = FRAME_BYTES + 10;

/// Where a logged job rests. Reserved is not a resting state: it is logged
/// as the state the job returns to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestState {
    Ready,
    /// Delayed until this engine time.
    Delayed {
        due_ns: u64,
    },
    Buried,
    /// Final, since this engine time.
    Completed {
        at_ns: u64,
    },
    Cancelled {
        at_ns: u64,
    },
}

/// A job's durable state as a beanstalkd put has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub id: JobId,
    pub tube: TubeName,
    pub pri: u32,
    pub ttr_ns: u64,
    pub delay_ns: u64,
    pub created_at_ns: u64,
    pub state: RestState,
    pub body: Bytes,
}

/// A job's whole durable state, job-API fields included.
#[derive(Debug, Clone, PartialEq)]
pub struct FullJobRecord {
    pub job: JobRecord,
    pub attempts: u32,
    pub max_attempts: u32,
    pub version: u64,
    pub extra: Option<JobExtra>,
}

/// A job's durable fields after a change that keeps its body, headers and
/// key: a release, bury, kick, fail, completion, cancellation or expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRecord {
    pub id: JobId,
    pub version: u64,
    pub attempts: u32,
    pub pri: u32,
    pub delay_ns: u64,
    pub state: RestState,
    pub cancel_requested: bool,
    pub last_error: Option<String>,
    pub result: Option<Bytes>,
    pub updated_at_ns: u64,
}

/// A queue's settings as set through the job API: its policy and a pause.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QueueRecord {
    pub queue: Option<TubeName>,
    pub policy: QueuePolicy,
    /// (start, end) in engine time; `u64::MAX` ends never.
    pub pause: Option<(u64, u64)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum LogRecord {
    /// A new job, put through beanstalkd.
    Put(JobRecord),
    /// Written by version 1 only; replay still applies it.
    Update {
        id: JobId,
        pri: u32,
        state: RestState,
    },
    Delete {
        id: JobId,
    },
    /// Written by version 1 only (compaction now writes JobSnapshot).
    Snapshot(JobRecord),
    /// Every id below this has been handed out.
    NextId {
        id: JobId,
    },
    /// A new job, made through the job API.
    Job(Box<FullJobRecord>),
    /// A job's current state: creates or replaces (compaction, update).
    JobSnapshot(Box<FullJobRecord>),
    Change(Box<ChangeRecord>),
    /// The records of one operation: all or none.
    Batch(Vec<LogRecord>),
    /// A queue's settings: replaces the previous ones.
    Queue(Box<QueueRecord>),
    /// A workflow's whole state (its start, or a compaction's snapshot):
    /// creates or replaces it.
    Workflow(Box<Workflow>),
    /// A workflow's transition: its status and the steps that changed.
    WorkflowProgress(Box<WorkflowProgress>),
    /// A finished workflow past its retention is forgotten.
    WorkflowDelete {
        id: WorkflowId,
    },
    /// Every workflow id below this has been handed out.
    WorkflowNextId {
        id: WorkflowId,
    },
    /// A schedule's whole state: creates or replaces it.
    Schedule(Box<ScheduleRecord>),
    ScheduleDeleted {
        name: TubeName,
    },
}

/// A schedule's logged state: what the API shows, and the firing made
/// ahead of its due instant, if one is.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleRecord {
    pub view: ScheduleView,
    /// The next due instant (`view.next_fire_at_ms`) is already a delayed
    /// job: that instant is consumed, and the view counts it once the
    /// instant has passed (engine `schedules.rs`).
    pub ahead: Option<FiringAhead>,
}

/// A firing made ahead of its due instant: the instant and its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FiringAhead {
    pub due_ms: u64,
    pub job: JobId,
}

/// Why bytes are not a record. Recovery stops with this as an error: the
/// write-ahead log's checksums passed, so the bytes are what was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    Truncated,
    UnknownVersion(u8),
    UnknownKind(u8),
    UnknownState(u8),
    BadTubeName,
    BadText,
    /// A batch inside a batch, which no release writes.
    NestedBatch,
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::Truncated => f.write_str("record is shorter than its fields"),
            RecordError::UnknownVersion(v) => write!(f, "unknown record format version {v}"),
            RecordError::UnknownKind(k) => write!(f, "unknown record kind {k}"),
            RecordError::UnknownState(s) => write!(f, "unknown job state {s}"),
            RecordError::BadTubeName => f.write_str("record names an invalid tube"),
            RecordError::BadText => f.write_str("record holds text that is not UTF-8"),
            RecordError::NestedBatch => f.write_str("record nests a batch in a batch"),
        }
    }
}

impl std::error::Error for RecordError {}

fn to_wall(ns: u64, epoch_ns: u64) -> u64 {
    epoch_ns.saturating_add(ns)
}

/// A wall time before engine time 0 maps to 0: due now.
fn from_wall(wall_ns: u64, epoch_ns: u64) -> u64 {
    wall_ns.saturating_sub(epoch_ns)
}

pub(crate) struct Writer<'a> {
    pub(crate) out: &'a mut Vec<u8>,
    pub(crate) epoch_ns: u64,
}

impl Writer<'_> {
    pub(crate) fn u8(&mut self, v: u8) {
        self.out.push(v);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn time(&mut self, ns: u64) {
        self.u64(to_wall(ns, self.epoch_ns));
    }
    pub(crate) fn bytes32(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.out.extend_from_slice(b);
    }
    /// Callers bound these strings well below 64 KiB (limits.rs).
    pub(crate) fn str16(&mut self, s: &str) {
        self.u16(s.len() as u16);
        self.out.extend_from_slice(s.as_bytes());
    }
    pub(crate) fn opt_str32(&mut self, s: Option<&str>) {
        match s {
            Some(s) => {
                self.u8(1);
                self.bytes32(s.as_bytes());
            }
            None => self.u8(0),
        }
    }
    pub(crate) fn opt_bytes32(&mut self, b: Option<&Bytes>) {
        match b {
            Some(b) => {
                self.u8(1);
                self.bytes32(b);
            }
            None => self.u8(0),
        }
    }
    pub(crate) fn state(&mut self, state: RestState) {
        let (code, at) = match state {
            RestState::Ready => (0u8, None),
            RestState::Delayed { due_ns } => (1, Some(due_ns)),
            RestState::Buried => (2, None),
            RestState::Completed { at_ns } => (3, Some(at_ns)),
            RestState::Cancelled { at_ns } => (4, Some(at_ns)),
        };
        self.u8(code);
        match at {
            Some(ns) => self.time(ns),
            None => self.u64(0),
        }
    }
    pub(crate) fn backoff(&mut self, b: &Backoff) {
        self.u64(b.initial_ms);
        self.u64(b.max_ms);
        self.u64(b.multiplier.to_bits());
        self.u64(b.jitter.to_bits());
    }
    pub(crate) fn job(&mut self, job: &JobRecord) {
        self.u64(job.id);
        self.u32(job.pri);
        self.u64(job.ttr_ns);
        self.u64(job.delay_ns);
        self.time(job.created_at_ns);
        self.state(job.state);
        // Tube names are at most 200 bytes.
        self.u8(job.tube.as_str().len() as u8);
        self.out.extend_from_slice(job.tube.as_str().as_bytes());
        self.bytes32(&job.body);
    }
    pub(crate) fn full_job(&mut self, full: &FullJobRecord) {
        self.job(&full.job);
        self.u32(full.attempts);
        self.u32(full.max_attempts);
        self.u64(full.version);
        let Some(extra) = &full.extra else {
            self.u8(0);
            return;
        };
        self.u8(1);
        self.u16(extra.headers.len() as u16);
        for (name, value) in &extra.headers {
            self.str16(name);
            self.bytes32(value.as_bytes());
        }
        match &extra.idempotency_key {
            Some(key) => {
                self.u8(1);
                self.str16(key);
                self.time(extra.idempotency_expires_at_ns);
            }
            None => self.u8(0),
        }
        match &extra.backoff {
            Some(b) => {
                self.u8(1);
                self.backoff(b);
            }
            None => self.u8(0),
        }
        self.opt_str32(extra.last_error.as_deref());
        self.opt_bytes32(extra.result.as_ref());
        self.u8(u8::from(extra.cancel_requested));
        self.time(extra.updated_at_ns);
    }
    fn name8(&mut self, name: &TubeName) {
        // Tube names are at most 200 bytes.
        self.u8(name.as_str().len() as u8);
        self.out.extend_from_slice(name.as_str().as_bytes());
    }
    pub(crate) fn opt_u64(&mut self, v: Option<u64>) {
        match v {
            Some(v) => {
                self.u8(1);
                self.u64(v);
            }
            None => self.u8(0),
        }
    }
    pub(crate) fn opt_u32(&mut self, v: Option<u32>) {
        match v {
            Some(v) => {
                self.u8(1);
                self.u32(v);
            }
            None => self.u8(0),
        }
    }
    /// A job's enqueue body, as schedules and workflow steps keep it (the
    /// one layout for a `NewJob`; `parents` are derived, never stored).
    pub(crate) fn new_job(&mut self, job: &NewJob) {
        self.bytes32(&job.payload);
        self.opt_u32(job.priority);
        let (code, ms) = match job.run_at {
            RunAt::Now => (0u8, 0),
            RunAt::DelayMs(ms) => (1, ms),
            RunAt::AtMs(ms) => (2, ms),
        };
        self.u8(code);
        self.u64(ms);
        self.opt_u64(job.ttr_ms);
        self.opt_u32(job.max_attempts);
        match &job.backoff {
            Some(b) => {
                self.u8(1);
                self.backoff(b);
            }
            None => self.u8(0),
        }
        self.u16(job.headers.len() as u16);
        for (name, value) in &job.headers {
            self.str16(name);
            self.bytes32(value.as_bytes());
        }
        match &job.idempotency_key {
            Some(key) => {
                self.u8(1);
                self.str16(key);
            }
            None => self.u8(0),
        }
        self.opt_u64(job.idempotency_ttl_ms);
    }
    fn schedule(&mut self, record: &ScheduleRecord) {
        let view = &record.view;
        let spec = &view.spec;
        self.u8(if record.ahead.is_some() {
            SCHEDULE_LAYOUT_AHEAD
        } else {
            SCHEDULE_LAYOUT
        });
        // The name came from a queue name (validated on the way in).
        self.u8(view.name.len() as u8);
        self.out.extend_from_slice(view.name.as_bytes());
        self.str16(&spec.cron);
        self.str16(&spec.timezone);
        self.name8(&spec.queue);
        self.new_job(&spec.job);
        self.u8(match spec.misfire {
            Misfire::Skip => 0,
            Misfire::Once => 1,
            Misfire::All => 2,
        });
        self.u32(spec.catch_up_max);
        self.u64(spec.jitter_ms);
        self.opt_u64(spec.max_backlog);
        self.u8(u8::from(spec.paused));
        self.opt_u64(view.next_fire_at_ms);
        self.opt_u64(view.last_fire_at_ms);
        self.opt_u64(view.last_job);
        self.u64(view.fires);
        self.u64(view.misfires_skipped);
        self.u64(view.backlog_skips);
        self.opt_u64(view.last_skew_ms);
        self.u64(view.created_at_ms);
        self.u64(view.updated_at_ms);
        self.u64(view.version);
        if let Some(ahead) = record.ahead {
            self.u64(ahead.due_ms);
            self.u64(ahead.job);
        }
    }
    pub(crate) fn policy(&mut self, p: &QueuePolicy) {
        let bits = u8::from(p.max_jobs.is_some())
            | u8::from(p.max_attempts.is_some()) << 1
            | u8::from(p.backoff.is_some()) << 2
            | u8::from(p.ttr_ms.is_some()) << 3
            | u8::from(p.retention_ms.is_some()) << 4
            | u8::from(p.retention_max_jobs.is_some()) << 5
            | u8::from(p.concurrency.is_some()) << 6
            | u8::from(p.rate_per_s.is_some()) << 7;
        self.u8(bits);
        if let Some(v) = p.max_jobs {
            self.u64(v);
        }
        if let Some(v) = p.max_attempts {
            self.u32(v);
        }
        if let Some(b) = &p.backoff {
            self.backoff(b);
        }
        for v in [p.ttr_ms, p.retention_ms, p.retention_max_jobs]
            .into_iter()
            .flatten()
        {
            self.u64(v);
        }
        if let Some(v) = p.concurrency {
            self.u32(v);
        }
        if let Some(v) = p.rate_per_s {
            self.u64(v.to_bits());
        }
    }
}

impl LogRecord {
    /// Appends the payload to `out`.
    pub fn encode(&self, epoch_ns: u64, out: &mut Vec<u8>) {
        let mut w = Writer { out, epoch_ns };
        w.u8(RECORD_FORMAT_VERSION);
        match self {
            LogRecord::Put(job) => {
                w.u8(KIND_PUT);
                w.job(job);
            }
            LogRecord::Snapshot(job) => {
                w.u8(KIND_SNAPSHOT);
                w.job(job);
            }
            LogRecord::NextId { id } => {
                w.u8(KIND_NEXT_ID);
                w.u64(*id);
            }
            LogRecord::Update { id, pri, state } => {
                w.u8(KIND_UPDATE);
                w.u64(*id);
                w.u32(*pri);
                w.state(*state);
            }
            LogRecord::Delete { id } => {
                w.u8(KIND_DELETE);
                w.u64(*id);
            }
            LogRecord::Job(full) => {
                w.u8(KIND_JOB);
                w.full_job(full);
            }
            LogRecord::JobSnapshot(full) => {
                w.u8(KIND_JOB_SNAPSHOT);
                w.full_job(full);
            }
            LogRecord::Change(c) => {
                w.u8(KIND_CHANGE);
                w.u64(c.id);
                w.u64(c.version);
                w.u32(c.attempts);
                w.u32(c.pri);
                w.u64(c.delay_ns);
                w.state(c.state);
                w.u8(u8::from(c.cancel_requested));
                w.opt_str32(c.last_error.as_deref());
                w.opt_bytes32(c.result.as_ref());
                w.time(c.updated_at_ns);
            }
            LogRecord::Batch(records) => {
                w.u8(KIND_BATCH);
                w.u32(records.len() as u32);
                for record in records {
                    let at = w.out.len();
                    w.u32(0);
                    record.encode(epoch_ns, w.out);
                    let len = (w.out.len() - at - 4) as u32;
                    w.out[at..at + 4].copy_from_slice(&len.to_le_bytes());
                }
            }
            LogRecord::Queue(q) => {
                w.u8(KIND_QUEUE);
                let name = q.queue.as_ref().map_or("", |n| n.as_str());
                w.u8(name.len() as u8);
                w.out.extend_from_slice(name.as_bytes());
                w.policy(&q.policy);
                match q.pause {
                    Some((start, until)) => {
                        w.u8(1);
                        w.time(start);
                        // "Never" stays never, whatever the epoch.
                        w.u64(if until == u64::MAX {
                            u64::MAX
                        } else {
                            to_wall(until, epoch_ns)
                        });
                    }
                    None => w.u8(0),
                }
            }
            LogRecord::Workflow(workflow) => {
                w.u8(KIND_WORKFLOW);
                workflow.encode(w.out);
            }
            LogRecord::WorkflowProgress(progress) => {
                w.u8(KIND_WORKFLOW_PROGRESS);
                progress.encode(w.out);
            }
            LogRecord::WorkflowDelete { id } => {
                w.u8(KIND_WORKFLOW_DELETE);
                w.u64(*id);
            }
            LogRecord::WorkflowNextId { id } => {
                w.u8(KIND_WORKFLOW_NEXT_ID);
                w.u64(*id);
            }
            LogRecord::Schedule(view) => {
                w.u8(KIND_SCHEDULE);
                w.schedule(view);
            }
            LogRecord::ScheduleDeleted { name } => {
                w.u8(KIND_SCHEDULE_DELETED);
                w.name8(name);
            }
        }
    }

    /// The payload's length, as [`LogRecord::encode`] would write it.
    pub fn encoded_len(&self, epoch_ns: u64) -> usize {
        let mut out = Vec::new();
        self.encode(epoch_ns, &mut out);
        out.len()
    }

    pub fn decode(payload: &[u8], epoch_ns: u64) -> Result<LogRecord, RecordError> {
        Self::decode_in(payload, epoch_ns, false)
    }

    fn decode_in(payload: &[u8], epoch_ns: u64, in_batch: bool) -> Result<LogRecord, RecordError> {
        let mut r = Reader {
            buf: payload,
            epoch_ns,
        };
        let version = r.u8()?;
        if version != 1 && version != RECORD_FORMAT_VERSION {
            return Err(RecordError::UnknownVersion(version));
        }
        let kind = r.u8()?;
        if version == 1 && kind > KIND_NEXT_ID {
            return Err(RecordError::UnknownKind(kind));
        }
        let record = match kind {
            KIND_PUT => LogRecord::Put(r.job()?),
            KIND_SNAPSHOT => LogRecord::Snapshot(r.job()?),
            KIND_UPDATE => LogRecord::Update {
                id: r.u64()?,
                pri: r.u32()?,
                state: r.state()?,
            },
            KIND_DELETE => LogRecord::Delete { id: r.u64()? },
            KIND_NEXT_ID => LogRecord::NextId { id: r.u64()? },
            KIND_JOB => LogRecord::Job(Box::new(r.full_job()?)),
            KIND_JOB_SNAPSHOT => LogRecord::JobSnapshot(Box::new(r.full_job()?)),
            KIND_CHANGE => LogRecord::Change(Box::new(ChangeRecord {
                id: r.u64()?,
                version: r.u64()?,
                attempts: r.u32()?,
                pri: r.u32()?,
                delay_ns: r.u64()?,
                state: r.state()?,
                cancel_requested: r.u8()? & 1 == 1,
                last_error: r.opt_str32()?,
                result: r.opt_bytes32()?,
                updated_at_ns: r.time()?,
            })),
            KIND_BATCH => {
                if in_batch {
                    return Err(RecordError::NestedBatch);
                }
                let count = r.u32()?;
                // Each record takes at least 6 bytes: no allocation from a
                // count the payload cannot hold.
                let mut records = Vec::with_capacity((count as usize).min(r.buf.len() / 6));
                for _ in 0..count {
                    let len = r.u32()? as usize;
                    let inner = r.bytes(len)?;
                    records.push(Self::decode_in(inner, epoch_ns, true)?);
                }
                LogRecord::Batch(records)
            }
            KIND_QUEUE => {
                let len = r.u8()? as usize;
                let name = r.bytes(len)?;
                let queue = if name.is_empty() {
                    None
                } else {
                    Some(TubeName::new(name).map_err(|_| RecordError::BadTubeName)?)
                };
                let policy = r.policy()?;
                let pause = if r.u8()? == 1 {
                    let start = r.time()?;
                    let until = r.u64()?;
                    let until = if until == u64::MAX {
                        u64::MAX
                    } else {
                        from_wall(until, epoch_ns)
                    };
                    Some((start, until))
                } else {
                    None
                };
                LogRecord::Queue(Box::new(QueueRecord {
                    queue,
                    policy,
                    pause,
                }))
            }
            KIND_WORKFLOW => LogRecord::Workflow(Box::new(Workflow::decode(r.buf)?)),
            KIND_WORKFLOW_PROGRESS => {
                LogRecord::WorkflowProgress(Box::new(WorkflowProgress::decode(r.buf)?))
            }
            KIND_WORKFLOW_DELETE => LogRecord::WorkflowDelete { id: r.u64()? },
            KIND_WORKFLOW_NEXT_ID => LogRecord::WorkflowNextId { id: r.u64()? },
            KIND_SCHEDULE => LogRecord::Schedule(Box::new(r.schedule()?)),
            KIND_SCHEDULE_DELETED => LogRecord::ScheduleDeleted { name: r.name8()? },
            kind => return Err(RecordError::UnknownKind(kind)),
        };
        Ok(record)
    }
}

pub(crate) struct Reader<'a> {
    pub(crate) buf: &'a [u8],
    pub(crate) epoch_ns: u64,
}

impl<'a> Reader<'a> {
    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.buf.len() < n {
            return Err(RecordError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.bytes(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, RecordError> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, RecordError> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, RecordError> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    pub(crate) fn time(&mut self) -> Result<u64, RecordError> {
        Ok(from_wall(self.u64()?, self.epoch_ns))
    }

    pub(crate) fn text(&mut self, len: usize) -> Result<String, RecordError> {
        let bytes = self.bytes(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| RecordError::BadText)
    }

    pub(crate) fn str16(&mut self) -> Result<String, RecordError> {
        let len = self.u16()? as usize;
        self.text(len)
    }

    pub(crate) fn str32(&mut self) -> Result<String, RecordError> {
        let len = self.u32()? as usize;
        self.text(len)
    }

    pub(crate) fn bytes32(&mut self) -> Result<Bytes, RecordError> {
        let len = self.u32()? as usize;
        Ok(Bytes::copy_from_slice(self.bytes(len)?))
    }

    pub(crate) fn present(&mut self) -> Result<bool, RecordError> {
        Ok(self.u8()? == 1)
    }

    pub(crate) fn opt_str32(&mut self) -> Result<Option<String>, RecordError> {
        if self.present()? {
            Ok(Some(self.str32()?))
        } else {
            Ok(None)
        }
    }

    pub(crate) fn opt_bytes32(&mut self) -> Result<Option<Bytes>, RecordError> {
        if self.present()? {
            Ok(Some(self.bytes32()?))
        } else {
            Ok(None)
        }
    }

    pub(crate) fn state(&mut self) -> Result<RestState, RecordError> {
        let code = self.u8()?;
        let at = self.time()?;
        match code {
            0 => Ok(RestState::Ready),
            1 => Ok(RestState::Delayed { due_ns: at }),
            2 => Ok(RestState::Buried),
            3 => Ok(RestState::Completed { at_ns: at }),
            4 => Ok(RestState::Cancelled { at_ns: at }),
            other => Err(RecordError::UnknownState(other)),
        }
    }

    fn name8(&mut self) -> Result<TubeName, RecordError> {
        let len = self.u8()? as usize;
        TubeName::new(self.bytes(len)?).map_err(|_| RecordError::BadTubeName)
    }

    pub(crate) fn opt_u64(&mut self) -> Result<Option<u64>, RecordError> {
        Ok(if self.present()? {
            Some(self.u64()?)
        } else {
            None
        })
    }

    pub(crate) fn opt_u32(&mut self) -> Result<Option<u32>, RecordError> {
        Ok(if self.present()? {
            Some(self.u32()?)
        } else {
            None
        })
    }

    pub(crate) fn new_job(&mut self) -> Result<NewJob, RecordError> {
        let payload = self.bytes32()?;
        let priority = self.opt_u32()?;
        let code = self.u8()?;
        let ms = self.u64()?;
        let run_at = match code {
            0 => RunAt::Now,
            1 => RunAt::DelayMs(ms),
            2 => RunAt::AtMs(ms),
            other => return Err(RecordError::UnknownState(other)),
        };
        let ttr_ms = self.opt_u64()?;
        let max_attempts = self.opt_u32()?;
        let backoff = if self.present()? {
            Some(self.backoff()?)
        } else {
            None
        };
        let count = self.u16()?;
        let mut headers = BTreeMap::new();
        for _ in 0..count {
            let name = self.str16()?;
            let value = self.str32()?;
            headers.insert(name, value);
        }
        let idempotency_key = if self.present()? {
            Some(self.str16()?)
        } else {
            None
        };
        Ok(NewJob {
            payload,
            priority,
            run_at,
            ttr_ms,
            max_attempts,
            backoff,
            headers,
            idempotency_key,
            idempotency_ttl_ms: self.opt_u64()?,
            parents: BTreeMap::new(),
        })
    }

    fn schedule(&mut self) -> Result<ScheduleRecord, RecordError> {
        let layout = self.u8()?;
        if layout != SCHEDULE_LAYOUT && layout != SCHEDULE_LAYOUT_AHEAD {
            return Err(RecordError::UnknownVersion(layout));
        }
        let name = self.name8()?.as_str().to_owned();
        let cron = self.str16()?;
        let timezone = self.str16()?;
        let queue = self.name8()?;
        let job = self.new_job()?;
        let misfire = match self.u8()? {
            0 => Misfire::Skip,
            1 => Misfire::Once,
            2 => Misfire::All,
            other => return Err(RecordError::UnknownState(other)),
        };
        let spec = ScheduleSpec {
            cron,
            timezone,
            queue,
            job,
            misfire,
            catch_up_max: self.u32()?,
            jitter_ms: self.u64()?,
            max_backlog: self.opt_u64()?,
            paused: self.u8()? == 1,
        };
        let view = ScheduleView {
            name,
            spec,
            next_fire_at_ms: self.opt_u64()?,
            last_fire_at_ms: self.opt_u64()?,
            last_job: self.opt_u64()?,
            fires: self.u64()?,
            misfires_skipped: self.u64()?,
            backlog_skips: self.u64()?,
            last_skew_ms: self.opt_u64()?,
            created_at_ms: self.u64()?,
            updated_at_ms: self.u64()?,
            version: self.u64()?,
        };
        let ahead = if layout == SCHEDULE_LAYOUT_AHEAD {
            Some(FiringAhead {
                due_ms: self.u64()?,
                job: self.u64()?,
            })
        } else {
            None
        };
        Ok(ScheduleRecord { view, ahead })
    }

    pub(crate) fn backoff(&mut self) -> Result<Backoff, RecordError> {
        Ok(Backoff {
            initial_ms: self.u64()?,
            max_ms: self.u64()?,
            multiplier: f64::from_bits(self.u64()?),
            jitter: f64::from_bits(self.u64()?),
        })
    }

    pub(crate) fn job(&mut self) -> Result<JobRecord, RecordError> {
        let id = self.u64()?;
        let pri = self.u32()?;
        let ttr_ns = self.u64()?;
        let delay_ns = self.u64()?;
        let created_at_ns = self.time()?;
        let state = self.state()?;
        let tube_len = self.u8()? as usize;
        let tube = TubeName::new(self.bytes(tube_len)?).map_err(|_| RecordError::BadTubeName)?;
        let body = self.bytes32()?;
        Ok(JobRecord {
            id,
            tube,
            pri,
            ttr_ns,
            delay_ns,
            created_at_ns,
            state,
            body,
        })
    }

    pub(crate) fn full_job(&mut self) -> Result<FullJobRecord, RecordError> {
        let job = self.job()?;
        let attempts = self.u32()?;
        let max_attempts = self.u32()?;
        let version = self.u64()?;
        let extra = if self.present()? {
            let count = self.u16()?;
            let mut headers = BTreeMap::new();
            for _ in 0..count {
                let name = self.str16()?;
                let value = self.str32()?;
                headers.insert(name, value);
            }
            let (idempotency_key, idempotency_expires_at_ns) = if self.present()? {
                (Some(self.str16()?), self.time()?)
            } else {
                (None, 0)
            };
            let backoff = if self.present()? {
                Some(self.backoff()?)
            } else {
                None
            };
            Some(JobExtra {
                headers,
                idempotency_key,
                idempotency_expires_at_ns,
                backoff: backoff.map(Box::new),
                last_error: self.opt_str32()?.map(String::into_boxed_str),
                result: self.opt_bytes32()?,
                cancel_requested: self.u8()? & 1 == 1,
                updated_at_ns: self.time()?,
            })
        } else {
            None
        };
        Ok(FullJobRecord {
            job,
            attempts,
            max_attempts,
            version,
            extra,
        })
    }

    pub(crate) fn policy(&mut self) -> Result<QueuePolicy, RecordError> {
        let bits = self.u8()?;
        let has = |bit: u8| bits & (1 << bit) != 0;
        let max_jobs = if has(0) { Some(self.u64()?) } else { None };
        let max_attempts = if has(1) { Some(self.u32()?) } else { None };
        let backoff = if has(2) { Some(self.backoff()?) } else { None };
        let ttr_ms = if has(3) { Some(self.u64()?) } else { None };
        let retention_ms = if has(4) { Some(self.u64()?) } else { None };
        let retention_max_jobs = if has(5) { Some(self.u64()?) } else { None };
        // Bits 6 and 7 came later: an older record has them clear.
        let concurrency = if has(6) { Some(self.u32()?) } else { None };
        let rate_per_s = if has(7) {
            Some(f64::from_bits(self.u64()?))
        } else {
            None
        };
        Ok(QueuePolicy {
            max_jobs,
            max_attempts,
            backoff,
            ttr_ms,
            retention_ms,
            retention_max_jobs,
            concurrency,
            rate_per_s,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let epoch = 1_700_000_000_000_000_000;
        let job = JobRecord {
            id: 7,
            tube: TubeName::new(b"emails").unwrap(),
            pri: 1024,
            ttr_ns: 60_000_000_000,
            delay_ns: 5_000_000_000,
            created_at_ns: 42,
            state: RestState::Delayed {
                due_ns: 5_000_000_042,
            },
            body: Bytes::from_static(b"hello\r\nworld"),
        };
        let mut put = Vec::new();
        LogRecord::Put(job.clone()).encode(epoch, &mut put);
        assert_eq!(
            put.len() as u64 + 8,
            job_record_log_bytes("emails".len(), job.body.len()),
            "the size estimate matches the encoding plus framing"
        );
        let records = [
            LogRecord::Put(job.clone()),
            LogRecord::Snapshot(job),
            LogRecord::Update {
                id: 7,
                pri: 3,
                state: RestState::Buried,
            },
            LogRecord::Update {
                id: 7,
                pri: 3,
                state: RestState::Ready,
            },
            LogRecord::Delete { id: 7 },
            LogRecord::NextId { id: 8 },
        ];
        for record in records {
            let mut bytes = Vec::new();
            record.encode(epoch, &mut bytes);
            assert_eq!(LogRecord::decode(&bytes, epoch), Ok(record.clone()));
            for cut in 0..bytes.len() {
                assert!(
                    LogRecord::decode(&bytes[..cut], epoch).is_err(),
                    "cut at {cut}"
                );
            }
        }
    }

    fn full_job(extra: bool) -> FullJobRecord {
        let mut headers = BTreeMap::new();
        headers.insert("trace".to_string(), "abc".to_string());
        headers.insert("x".to_string(), String::new());
        FullJobRecord {
            job: JobRecord {
                id: 9,
                tube: TubeName::new(b"orders").unwrap(),
                pri: 1024,
                ttr_ns: 60_000_000_000,
                delay_ns: 0,
                created_at_ns: 1_000,
                state: RestState::Completed { at_ns: 5_000 },
                body: Bytes::from_static(b"{\"order\":42}"),
            },
            attempts: 2,
            max_attempts: 25,
            version: 7,
            extra: extra.then(|| JobExtra {
                headers,
                idempotency_key: Some("order-42".into()),
                idempotency_expires_at_ns: 86_400_000_000_000,
                backoff: Some(Box::default()),
                last_error: Some("boom".into()),
                result: Some(Bytes::from_static(b"done")),
                cancel_requested: true,
                updated_at_ns: 5_000,
            }),
        }
    }

    #[test]
    fn job_api_records_round_trip() {
        let epoch = 1_577_836_800_000_000_000;
        let change = ChangeRecord {
            id: 9,
            version: 8,
            attempts: 3,
            pri: 5,
            delay_ns: 2_000_000,
            state: RestState::Cancelled { at_ns: 77 },
            cancel_requested: true,
            last_error: Some("ü".into()),
            result: None,
            updated_at_ns: 77,
        };
        let queue = QueueRecord {
            queue: Some(TubeName::new(b"orders").unwrap()),
            policy: QueuePolicy {
                max_jobs: Some(10),
                max_attempts: None,
                backoff: Some(Backoff::default()),
                ttr_ms: Some(1),
                retention_ms: None,
                retention_max_jobs: Some(3),
                concurrency: Some(4),
                rate_per_s: Some(2.5),
            },
            pause: Some((10, u64::MAX)),
        };
        let records = [
            LogRecord::Job(Box::new(full_job(true))),
            LogRecord::JobSnapshot(Box::new(full_job(false))),
            LogRecord::Change(Box::new(change.clone())),
            LogRecord::Queue(Box::new(queue)),
            LogRecord::Batch(vec![
                LogRecord::Job(Box::new(full_job(true))),
                LogRecord::Change(Box::new(change)),
                LogRecord::Delete { id: 3 },
            ]),
        ];
        for record in records {
            let mut bytes = Vec::new();
            record.encode(epoch, &mut bytes);
            assert_eq!(bytes[0], RECORD_FORMAT_VERSION);
            assert_eq!(record.encoded_len(epoch), bytes.len());
            assert_eq!(LogRecord::decode(&bytes, epoch), Ok(record.clone()));
            for cut in 0..bytes.len() {
                assert!(
                    LogRecord::decode(&bytes[..cut], epoch).is_err(),
                    "cut at {cut} of {record:?}"
                );
            }
        }
    }

    fn schedule_view() -> ScheduleView {
        let mut headers = BTreeMap::new();
        headers.insert("team".to_owned(), "billing".to_owned());
        ScheduleView {
            name: "nightly".into(),
            spec: ScheduleSpec {
                cron: "0 30 2 * * *".into(),
                timezone: "Europe/Berlin".into(),
                queue: TubeName::new(b"reports").unwrap(),
                job: NewJob {
                    payload: Bytes::from_static(b"{}"),
                    priority: Some(7),
                    run_at: RunAt::DelayMs(250),
                    ttr_ms: Some(60_000),
                    max_attempts: None,
                    backoff: Some(Backoff::default()),
                    headers,
                    idempotency_key: None,
                    idempotency_ttl_ms: Some(1_000),
                    parents: BTreeMap::new(),
                },
                misfire: Misfire::All,
                catch_up_max: 100,
                jitter_ms: 5,
                max_backlog: Some(3),
                paused: false,
            },
            next_fire_at_ms: Some(1_800_000_000_000),
            last_fire_at_ms: None,
            last_job: Some(12),
            fires: 4,
            misfires_skipped: 2,
            backlog_skips: 1,
            last_skew_ms: Some(3),
            created_at_ms: 1_700_000_000_000,
            updated_at_ms: 1_700_000_000_500,
            version: 9,
        }
    }

    #[test]
    fn schedule_records_round_trip() {
        let name = TubeName::new(b"nightly").unwrap();
        let plain = || {
            Box::new(ScheduleRecord {
                view: schedule_view(),
                ahead: None,
            })
        };
        let ahead = Box::new(ScheduleRecord {
            view: schedule_view(),
            ahead: Some(FiringAhead {
                due_ms: 1_800_000_000_000,
                job: 13,
            }),
        });
        let records = [
            LogRecord::Schedule(plain()),
            LogRecord::Schedule(ahead.clone()),
            LogRecord::ScheduleDeleted { name: name.clone() },
            LogRecord::Batch(vec![
                LogRecord::Job(Box::new(full_job(true))),
                LogRecord::Schedule(ahead.clone()),
            ]),
        ];
        for record in records {
            // Schedule times are wall-clock ms: no epoch shifts them.
            for (write_epoch, read_epoch) in [(0, 0), (1_000, 5_000_000_000)] {
                let mut bytes = Vec::new();
                record.encode(write_epoch, &mut bytes);
                assert_eq!(bytes[0], RECORD_FORMAT_VERSION);
                if !matches!(record, LogRecord::Batch(_)) {
                    assert_eq!(LogRecord::decode(&bytes, read_epoch), Ok(record.clone()));
                }
                for cut in 0..bytes.len() {
                    assert!(LogRecord::decode(&bytes[..cut], read_epoch).is_err());
                }
            }
        }
        // The documented bytes of a deletion and of a schedule's head.
        let mut bytes = Vec::new();
        LogRecord::ScheduleDeleted { name }.encode(0, &mut bytes);
        assert_eq!(bytes, b"\x02\x0c\x07nightly");
        // A firing made ahead: layout 2, the instant and the job appended.
        let mut bytes = Vec::new();
        LogRecord::Schedule(ahead).encode(0, &mut bytes);
        assert_eq!(bytes[2], SCHEDULE_LAYOUT_AHEAD);
        let mut tail = Vec::new();
        for v in [9u64, 1_800_000_000_000, 13] {
            tail.extend_from_slice(&v.to_le_bytes());
        }
        assert!(bytes.ends_with(&tail));
        // None: layout 1, as earlier releases wrote and read it.
        let mut bytes = Vec::new();
        LogRecord::Schedule(plain()).encode(0, &mut bytes);
        let mut head = vec![2u8, KIND_SCHEDULE, SCHEDULE_LAYOUT, 7];
        head.extend_from_slice(b"nightly");
        head.extend_from_slice(&12u16.to_le_bytes());
        head.extend_from_slice(b"0 30 2 * * *");
        assert!(bytes.starts_with(&head));
        // The tail: created, updated, version.
        let mut tail = Vec::new();
        for v in [1_700_000_000_000u64, 1_700_000_000_500, 9] {
            tail.extend_from_slice(&v.to_le_bytes());
        }
        assert!(bytes.ends_with(&tail));
        // A layout this build does not know is refused, not misread.
        bytes[2] = SCHEDULE_LAYOUT_AHEAD + 1;
        assert_eq!(
            LogRecord::decode(&bytes, 0),
            Err(RecordError::UnknownVersion(SCHEDULE_LAYOUT_AHEAD + 1))
        );
    }

    #[test]
    fn size_figures_come_from_the_encoder() {
        let mut delete = Vec::new();
        LogRecord::Delete { id: u64::MAX }.encode(0, &mut delete);
        assert_eq!(delete.len() as u64 + FRAME_BYTES, DELETE_RECORD_LOG_BYTES);
        let plain = full_job(false);
        let mut snapshot = Vec::new();
        LogRecord::JobSnapshot(Box::new(plain.clone())).encode(0, &mut snapshot);
        assert_eq!(
            snapshot.len() as u64 + FRAME_BYTES,
            job_snapshot_log_bytes(plain.job.tube.as_str().len(), plain.job.body.len())
        );
    }

    #[test]
    fn version_1_payloads_are_read() {
        // A Delete and a NextId as spool 0.1.0 wrote them.
        let mut delete = vec![1, KIND_DELETE];
        delete.extend_from_slice(&42u64.to_le_bytes());
        assert_eq!(
            LogRecord::decode(&delete, 0),
            Ok(LogRecord::Delete { id: 42 })
        );
        let mut update = vec![1, KIND_UPDATE];
        update.extend_from_slice(&7u64.to_le_bytes());
        update.extend_from_slice(&3u32.to_le_bytes());
        update.push(2);
        update.extend_from_slice(&0u64.to_le_bytes());
        assert_eq!(
            LogRecord::decode(&update, 0),
            Ok(LogRecord::Update {
                id: 7,
                pri: 3,
                state: RestState::Buried
            })
        );
        // Version 1 had no job-API kinds; a later version byte is refused.
        assert_eq!(
            LogRecord::decode(&[1, KIND_JOB], 0),
            Err(RecordError::UnknownKind(KIND_JOB))
        );
        assert_eq!(
            LogRecord::decode(&[3, KIND_DELETE], 0),
            Err(RecordError::UnknownVersion(3))
        );
    }

    #[test]
    fn workflow_records_decode() {
        // Fixed bytes: a WorkflowDelete and a WorkflowNextId.
        let mut delete = vec![2, KIND_WORKFLOW_DELETE];
        delete.extend_from_slice(&7u64.to_le_bytes());
        assert_eq!(
            LogRecord::decode(&delete, 0),
            Ok(LogRecord::WorkflowDelete { id: 7 })
        );
        let mut next = vec![2, KIND_WORKFLOW_NEXT_ID];
        next.extend_from_slice(&8u64.to_le_bytes());
        assert_eq!(
            LogRecord::decode(&next, 0),
            Ok(LogRecord::WorkflowNextId { id: 8 })
        );
        // A progress record by hand: workflow 3 succeeded at version 4,
        // step 1 completed (the first to) with result "r".
        let mut progress = vec![2, KIND_WORKFLOW_PROGRESS, 1];
        progress.extend_from_slice(&3u64.to_le_bytes());
        progress.extend_from_slice(&[1, 0, 0]); // succeeded, no error, no flags
        progress.extend_from_slice(&5_000u64.to_le_bytes()); // updated at
        progress.push(1);
        progress.extend_from_slice(&5_000u64.to_le_bytes()); // finished at
        progress.extend_from_slice(&4u64.to_le_bytes()); // version
        progress.extend_from_slice(&1u32.to_le_bytes()); // one step
        progress.extend_from_slice(&1u32.to_le_bytes()); // step 1
        progress.push(2); // completed
        progress.push(1);
        progress.extend_from_slice(&42u64.to_le_bytes()); // job 42
        progress.push(1);
        progress.extend_from_slice(&1u32.to_le_bytes());
        progress.push(b'r');
        progress.push(0); // no error
        progress.extend_from_slice(&1u32.to_le_bytes()); // completed first
        progress.push(1);
        progress.extend_from_slice(&4_999u64.to_le_bytes());
        progress.push(0); // no compensation job
        let decoded = LogRecord::decode(&progress, 0).expect("decodes");
        let LogRecord::WorkflowProgress(p) = &decoded else {
            panic!("a progress record, got {decoded:?}");
        };
        assert_eq!(p.id, 3);
        assert_eq!(p.status.version, 4);
        assert_eq!(p.status.finished_at_ms, Some(5_000));
        assert_eq!(p.steps.len(), 1);
        assert_eq!(p.steps[0].0, 1);
        assert_eq!(p.steps[0].1.job, Some(42));
        assert_eq!(p.steps[0].1.result.as_deref(), Some(&b"r"[..]));
        let mut again = Vec::new();
        decoded.encode(0, &mut again);
        assert_eq!(again, progress, "the encoder writes the documented bytes");
        // Inside a batch, as an operation logs them.
        let batch = LogRecord::Batch(vec![decoded, LogRecord::WorkflowDelete { id: 7 }]);
        let mut bytes = Vec::new();
        batch.encode(0, &mut bytes);
        assert_eq!(LogRecord::decode(&bytes, 0), Ok(batch));
        // Version 1 payloads know no workflows.
        assert_eq!(
            LogRecord::decode(&[1, KIND_WORKFLOW_DELETE], 0),
            Err(RecordError::UnknownKind(KIND_WORKFLOW_DELETE))
        );
    }

    #[test]
    fn a_batch_in_a_batch_is_refused() {
        let mut bytes = Vec::new();
        LogRecord::Batch(vec![LogRecord::Batch(Vec::new())]).encode(0, &mut bytes);
        assert_eq!(LogRecord::decode(&bytes, 0), Err(RecordError::NestedBatch));
        // A count the payload cannot hold allocates nothing and is refused.
        let mut huge = vec![RECORD_FORMAT_VERSION, KIND_BATCH];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(LogRecord::decode(&huge, 0), Err(RecordError::Truncated));
    }

    #[test]
    fn times_from_before_this_process_are_due_now() {
        let mut bytes = Vec::new();
        LogRecord::Update {
            id: 1,
            pri: 0,
            state: RestState::Delayed { due_ns: 10 },
        }
        .encode(1_000, &mut bytes);
        // Reopened by a process that started later (epoch 5_000).
        assert_eq!(
            LogRecord::decode(&bytes, 5_000),
            Ok(LogRecord::Update {
                id: 1,
                pri: 0,
                state: RestState::Delayed { due_ns: 0 }
            })
        );
    }
}
