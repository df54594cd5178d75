//! Why a broker operation was refused. Each variant maps to one HTTP status
//! and one beanstalkd reply; front doors translate, brokers never format.

use std::fmt;

use crate::model::{JobState, Outcome};

/// Why an operation on a job held under a lease conflicts with its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// The job was cancelled: its lease is revoked and it never runs again.
    Cancelled,
    /// The lease is not (or no longer) the job's current reservation: it
    /// expired, or the job was released, failed or handed to another.
    LeaseExpired,
    /// The job is in a state the operation does not apply to.
    WrongState(JobState),
}

impl Conflict {
    /// The API's error code.
    pub fn code(self) -> &'static str {
        match self {
            Conflict::Cancelled => "cancelled",
            Conflict::LeaseExpired => "lease_expired",
            Conflict::WrongState(_) => "wrong_state",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerError {
    /// The broker has shut down.
    Closed,
    /// No such job (never made, deleted, or forgotten after its retention),
    /// or no such queue.
    NotFound,
    Conflict(Conflict),
    /// An `If-Match` precondition failed: the job is now at this version.
    VersionMismatch {
        current: u64,
    },
    /// Bad input; `field` names it.
    Invalid {
        field: &'static str,
        message: String,
    },
    /// A payload, result or batch is over its bound.
    TooLarge {
        max_bytes: u64,
    },
    /// The queue's `max_jobs` is reached.
    QueueFull {
        max_jobs: u64,
    },
    /// New jobs are refused: draining or shutting down.
    Draining,
    /// Storage cannot take the change: the log failed, the disk is full, or
    /// the database is away.
    Storage(String),
    /// A broker answered an operation with the wrong kind of outcome: a bug.
    Internal(String),
    /// The broker holds its maximum of `max` job waits ([`Op::Wait`]).
    ///
    /// [`Op::Wait`]: crate::Op::Wait
    TooManyWaits {
        max: usize,
    },
}

impl BrokerError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> BrokerError {
        BrokerError::Invalid {
            field,
            message: message.into(),
        }
    }

    pub(crate) fn unexpected(outcome: &Outcome) -> BrokerError {
        BrokerError::Internal(format!("unexpected outcome {outcome:?}"))
    }

    /// The API's error code (API.md).
    pub fn code(&self) -> &'static str {
        match self {
            BrokerError::Closed | BrokerError::Draining => "draining",
            BrokerError::NotFound => "not_found",
            BrokerError::Conflict(c) => c.code(),
            BrokerError::VersionMismatch { .. } => "version_mismatch",
            BrokerError::Invalid { .. } => "invalid",
            BrokerError::TooLarge { .. } => "too_large",
            BrokerError::QueueFull { .. } => "queue_full",
            BrokerError::Storage(_) | BrokerError::Internal(_) => "storage",
            BrokerError::TooManyWaits { .. } => "too_many_waits",
        }
    }
}

impl fmt::Display for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BrokerError::Closed => f.write_str("the broker has shut down"),
            BrokerError::NotFound => f.write_str("not found"),
            BrokerError::Conflict(Conflict::Cancelled) => f.write_str("the job was cancelled"),
            BrokerError::Conflict(Conflict::LeaseExpired) => {
                f.write_str("the lease is not held: it expired or the job moved on")
            }
            BrokerError::Conflict(Conflict::WrongState(state)) => {
                write!(f, "the job is {}", state.as_str())
            }
            BrokerError::VersionMismatch { current } => {
                write!(f, "the job has changed: it is at version {current}")
            }
            BrokerError::Invalid { field, message } => write!(f, "{field}: {message}"),
            BrokerError::TooLarge { max_bytes } => write!(f, "larger than {max_bytes} bytes"),
            BrokerError::QueueFull { max_jobs } => {
                write!(f, "the queue holds its maximum of {max_jobs} jobs")
            }
            BrokerError::Draining => f.write_str("the server is draining: no new jobs"),
            BrokerError::Storage(error) => write!(f, "storage: {error}"),
            BrokerError::Internal(error) => write!(f, "internal: {error}"),
            BrokerError::TooManyWaits { max } => write!(
                f,
                "the server holds its maximum of {max} job waits: ask again without wait_ms"
            ),
        }
    }
}

impl std::error::Error for BrokerError {}

impl Outcome {
    /// The job of a one-job outcome.
    pub fn into_job(self) -> Result<crate::model::JobView, BrokerError> {
        match self {
            Outcome::Job(job) | Outcome::Enqueued { job, .. } => Ok(job),
            other => Err(BrokerError::unexpected(&other)),
        }
    }
}
