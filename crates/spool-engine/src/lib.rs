//! The job state machine of spool, sans I/O.
//!
//! [`Engine`] owns every queue ("tube"), job and client session, and applies
//! beanstalkd's rules to them: priorities, delays, time-to-run, burying,
//! kicking, pausing, blocked reserves. It takes the current time as an
//! argument and returns replies through an outbox; it never reads a clock,
//! a socket or a file. The adapters in `spool-server` own all I/O.

mod engine;
mod job;
pub mod limits;
mod ms;
mod record;
pub mod schedule;
pub mod validate;
pub mod workflow;

pub use engine::{
    ConnId, Engine, EngineConfig, IdHasher, ReplayError, TubeId, WorkflowMetrics,
    RETIRED_QUEUES_MAX, SCHEDULE_TIMERS_PER_TICK_MAX, TIMERS_PER_TICK_MAX,
};
pub use job::{Backoff, Job, JobExtra, JobId, JobState};
pub use record::{
    job_record_log_bytes, job_snapshot_log_bytes, ChangeRecord, FiringAhead, FullJobRecord,
    JobRecord, LogRecord, QueueRecord, RecordError, RestState, ScheduleRecord,
    DELETE_RECORD_LOG_BYTES, RECORD_FORMAT_VERSION,
};
// The broker-neutral types the engine fills, under their old paths too.
pub use spool_broker::metrics;
pub use spool_broker::{
    Buckets, EngineSnapshot, Histogram, QueueCounters, QueueSnapshot, RetiredQueueSnapshot,
    SessionSnapshot, SnapshotScope, SNAPSHOT_RESERVED_IDS_MAX,
};
