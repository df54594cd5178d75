//! The job model (DESIGN.md §3) as the engine stores it.
//!
//! A beanstalkd job is a small record; the fields only the job API sets
//! (headers, retry policy, idempotency key, error, result) live behind one
//! optional box, so a million beanstalkd jobs do not pay for them.

use std::collections::BTreeMap;

use bytes::Bytes;
pub use spool_broker::{Backoff, JobId, JobState};

use crate::TubeId;

/// Fields that only the job API sets; absent on a plain beanstalkd job.
///
/// Every job put through the job API has one, so its size is paid per job:
/// it is kept within 128 bytes, one of jemalloc's size classes (the next is
/// 160; at 168 bytes it took 192). The rarely set backoff and error are
/// boxed or unsized for that.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobExtra {
    pub headers: BTreeMap<String, String>,
    pub idempotency_key: Option<String>,
    /// Engine time the idempotency key stops matching.
    pub idempotency_expires_at_ns: u64,
    /// The job's own backoff; `None` takes the queue's, then the default.
    pub backoff: Option<Box<Backoff>>,
    pub last_error: Option<Box<str>>,
    pub result: Option<Bytes>,
    pub cancel_requested: bool,
    /// Engine time of the last change. Plain jobs derive it from their
    /// state's timestamps instead (see `Engine::updated_at_ns`).
    pub updated_at_ns: u64,
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
    /// which the wait histogram needs (no extra field per job). A final job
    /// holds when it finished.
    pub deadline_at_ns: u64,
    pub state: JobState,
    /// Failed attempts so far (lease expiries and worker fails).
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
    /// Orders the buried list (FIFO) and a connection's reservations; while
    /// reserved it is the lease's token.
    pub(crate) seq: u64,
    pub(crate) reserver: Option<crate::ConnId>,
    pub extra: Option<Box<JobExtra>>,
}

impl Job {
    pub(crate) fn extra_mut(&mut self) -> &mut JobExtra {
        self.extra.get_or_insert_with(Box::default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every job put through the job API pays for one `JobExtra`: at 129
    /// bytes or more jemalloc rounds it to 160 (it was 168, rounded to 192).
    #[test]
    fn the_job_api_fields_fit_one_128_byte_size_class() {
        assert!(
            std::mem::size_of::<JobExtra>() <= 128,
            "JobExtra is {} bytes",
            std::mem::size_of::<JobExtra>()
        );
    }
}
