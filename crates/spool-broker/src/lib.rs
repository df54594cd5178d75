//! The seam of spool: the [`Broker`] trait every storage backend implements
//! and every front door calls, the job model it speaks ([`model`]), its
//! errors, broker-neutral snapshots for the operating surface, and the
//! [`conformance`] suite every broker must pass.
//!
//! This crate does no I/O and knows no front door's syntax beyond the
//! beanstalkd session it carries as requests (see [`Session`]).

mod broker;
mod clock;
pub mod conformance;
mod error;
pub mod metrics;
pub mod model;
mod op_session;
pub mod schedule;
mod snapshot;
pub mod workflow;

pub use broker::{Broker, BrokerHealth, Peer, Session};
pub use clock::Clock;
pub use error::{BrokerError, Conflict};
pub use metrics::{Buckets, Histogram};
pub use model::{
    Backoff, JobChange, JobId, JobPage, JobState, JobView, Lease, Leased, NewJob, Op, Outcome,
    QueueInfo, QueueName, QueuePolicy, RunAt,
};
pub use op_session::{OpSession, SessionBroker, SESSION_PARK_AFTER};
pub use schedule::{Misfire, ScheduleName, ScheduleSpec, ScheduleView};
pub use snapshot::{
    EngineSnapshot, QueueCounters, QueueSnapshot, RetiredQueueSnapshot, ScheduleSnapshot,
    SessionSnapshot, SnapshotScope, WaitCounts, WorkflowCounters, SNAPSHOT_RESERVED_IDS_MAX,
};
pub use workflow::{
    NewStep, NewWorkflow, StepState, StepView, WorkflowId, WorkflowPage, WorkflowState,
    WorkflowView,
};
