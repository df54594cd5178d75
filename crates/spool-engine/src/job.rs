//! The job model (DESIGN.md §3).
//!
//! A beanstalkd job is a small record; the fields only the HTTP API can set
//! (headers, retry policy, idempotency key, result) live behind one optional
//! box so a million beanstalkd jobs do not pay for them.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::TubeId;

/// Job ids are handed out from 1 upwards and never reused.
pub type JobId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    Ready,
    Reserved,
    Delayed,
    Buried,
}

impl JobState {
    /// The name beanstalkd's `stats-job` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Ready => "ready",
            JobState::Reserved => "reserved",
            JobState::Delayed => "delayed",
            JobState::Buried => "buried",
        }
    }
}

/// How a failed attempt is delayed before the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial_ns: u64,
    pub max_ns: u64,
    /// Jitter as a fraction of the delay, in per-mille (0 = none).
    pub jitter_permille: u16,
}

/// Fields that only the HTTP API can set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobExtra {
    pub headers: BTreeMap<String, String>,
    pub idempotency_key: Option<String>,
    pub backoff: Option<Backoff>,
    pub last_error: Option<String>,
    pub result: Option<Bytes>,
}

#[derive(Debug, Clone)]
pub struct Job {
    pub id: JobId,
    pub(crate) tube: TubeId,
    pub pri: u32,
    /// The delay of the last put or release.
    pub delay_ns: u64,
    pub ttr_ns: u64,
    pub body: Bytes,
    pub created_at_ns: u64,
    /// When a delayed job becomes ready, or when a reservation expires. A
    /// ready job has no deadline: there it holds when the job became ready,
    /// which the wait histogram needs (no extra field per job).
    pub deadline_at_ns: u64,
    pub state: JobState,
    /// Failed attempts so far (TTR expiries, later also worker `fail`s).
    pub attempts: u32,
    /// 0 means no limit: beanstalkd's semantics.
    pub max_attempts: u32,
    /// Incremented on every change, for HTTP `If-Match`.
    pub version: u64,
    pub reserves: u32,
    pub timeouts: u32,
    pub releases: u32,
    pub buries: u32,
    pub kicks: u32,
    /// Orders the buried list (FIFO) and a connection's reservations.
    pub(crate) seq: u64,
    pub(crate) reserver: Option<crate::ConnId>,
    pub extra: Option<Box<JobExtra>>,
}
