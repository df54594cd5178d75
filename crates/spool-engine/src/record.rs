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
//! u8 payload version (= 1) | u8 kind | fields of the kind
//! kind 1 Put:    u64 id | u32 pri | u64 ttr_ns | u64 delay_ns | u64 created_wall_ns
//!                | u8 state | u64 due_wall_ns | u8 tube_len | tube | u32 body_len | body
//! kind 2 Update: u64 id | u32 pri | u8 state | u64 due_wall_ns
//! kind 3 Delete: u64 id
//! kind 4 Snapshot: as Put
//! kind 5 NextId: u64 id
//! state: 0 ready, 1 delayed (until due_wall_ns), 2 buried
//! ```
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

use bytes::Bytes;
use spool_proto::TubeName;

use crate::job::JobId;

/// Version of the payload layout above.
pub const RECORD_FORMAT_VERSION: u8 = 1;

const KIND_PUT: u8 = 1;
const KIND_UPDATE: u8 = 2;
const KIND_DELETE: u8 = 3;
const KIND_SNAPSHOT: u8 = 4;
const KIND_NEXT_ID: u8 = 5;

/// Bytes a job's Put or Snapshot record takes in the log, framing included
/// (the write-ahead log adds 8 bytes of length and checksum per record).
pub fn job_record_log_bytes(tube_len: usize, body_len: usize) -> u64 {
    (60 + tube_len + body_len) as u64
}

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
}

/// A job's whole durable state.
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogRecord {
    /// A new job.
    Put(JobRecord),
    Update {
        id: JobId,
        pri: u32,
        state: RestState,
    },
    Delete {
        id: JobId,
    },
    /// A job's current state, written by compaction: creates or replaces.
    Snapshot(JobRecord),
    /// Every id below this has been handed out.
    NextId {
        id: JobId,
    },
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
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::Truncated => f.write_str("record is shorter than its fields"),
            RecordError::UnknownVersion(v) => write!(f, "unknown record format version {v}"),
            RecordError::UnknownKind(k) => write!(f, "unknown record kind {k}"),
            RecordError::UnknownState(s) => write!(f, "unknown job state {s}"),
            RecordError::BadTubeName => f.write_str("record names an invalid tube"),
        }
    }
}

impl std::error::Error for RecordError {}

fn to_wall(ns: u64, epoch_ns: u64) -> u64 {
    epoch_ns.saturating_add(ns)
}

/// A wall time before this process started maps to engine time 0: due now.
fn from_wall(wall_ns: u64, epoch_ns: u64) -> u64 {
    wall_ns.saturating_sub(epoch_ns)
}

fn put_state(out: &mut Vec<u8>, state: RestState, epoch_ns: u64) {
    let (code, due) = match state {
        RestState::Ready => (0u8, 0),
        RestState::Delayed { due_ns } => (1, to_wall(due_ns, epoch_ns)),
        RestState::Buried => (2, 0),
    };
    out.push(code);
    out.extend_from_slice(&due.to_le_bytes());
}

impl LogRecord {
    /// Appends the payload to `out`.
    pub fn encode(&self, epoch_ns: u64, out: &mut Vec<u8>) {
        out.push(RECORD_FORMAT_VERSION);
        match self {
            LogRecord::Put(job) => {
                out.push(KIND_PUT);
                encode_job(job, epoch_ns, out);
            }
            LogRecord::Snapshot(job) => {
                out.push(KIND_SNAPSHOT);
                encode_job(job, epoch_ns, out);
            }
            LogRecord::NextId { id } => {
                out.push(KIND_NEXT_ID);
                out.extend_from_slice(&id.to_le_bytes());
            }
            LogRecord::Update { id, pri, state } => {
                out.push(KIND_UPDATE);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&pri.to_le_bytes());
                put_state(out, *state, epoch_ns);
            }
            LogRecord::Delete { id } => {
                out.push(KIND_DELETE);
                out.extend_from_slice(&id.to_le_bytes());
            }
        }
    }

    pub fn decode(payload: &[u8], epoch_ns: u64) -> Result<LogRecord, RecordError> {
        let mut r = Reader(payload);
        let version = r.u8()?;
        if version != RECORD_FORMAT_VERSION {
            return Err(RecordError::UnknownVersion(version));
        }
        let record = match r.u8()? {
            KIND_PUT => LogRecord::Put(decode_job(&mut r, epoch_ns)?),
            KIND_SNAPSHOT => LogRecord::Snapshot(decode_job(&mut r, epoch_ns)?),
            KIND_UPDATE => LogRecord::Update {
                id: r.u64()?,
                pri: r.u32()?,
                state: r.state(epoch_ns)?,
            },
            KIND_DELETE => LogRecord::Delete { id: r.u64()? },
            KIND_NEXT_ID => LogRecord::NextId { id: r.u64()? },
            kind => return Err(RecordError::UnknownKind(kind)),
        };
        Ok(record)
    }
}

fn encode_job(job: &JobRecord, epoch_ns: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(&job.id.to_le_bytes());
    out.extend_from_slice(&job.pri.to_le_bytes());
    out.extend_from_slice(&job.ttr_ns.to_le_bytes());
    out.extend_from_slice(&job.delay_ns.to_le_bytes());
    out.extend_from_slice(&to_wall(job.created_at_ns, epoch_ns).to_le_bytes());
    put_state(out, job.state, epoch_ns);
    // Tube names are at most 200 bytes.
    out.push(job.tube.as_str().len() as u8);
    out.extend_from_slice(job.tube.as_str().as_bytes());
    out.extend_from_slice(&(job.body.len() as u32).to_le_bytes());
    out.extend_from_slice(&job.body);
}

fn decode_job(r: &mut Reader<'_>, epoch_ns: u64) -> Result<JobRecord, RecordError> {
    let id = r.u64()?;
    let pri = r.u32()?;
    let ttr_ns = r.u64()?;
    let delay_ns = r.u64()?;
    let created_at_ns = from_wall(r.u64()?, epoch_ns);
    let state = r.state(epoch_ns)?;
    let tube_len = r.u8()? as usize;
    let tube = TubeName::new(r.bytes(tube_len)?).map_err(|_| RecordError::BadTubeName)?;
    let body_len = r.u32()? as usize;
    let body = Bytes::copy_from_slice(r.bytes(body_len)?);
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

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.0.len() < n {
            return Err(RecordError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.bytes(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, RecordError> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, RecordError> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn state(&mut self, epoch_ns: u64) -> Result<RestState, RecordError> {
        let code = self.u8()?;
        let due = self.u64()?;
        match code {
            0 => Ok(RestState::Ready),
            1 => Ok(RestState::Delayed {
                due_ns: from_wall(due, epoch_ns),
            }),
            2 => Ok(RestState::Buried),
            other => Err(RecordError::UnknownState(other)),
        }
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
