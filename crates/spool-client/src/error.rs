//! What a call can fail with: the server's refusal (API.md's error codes) or
//! the way to it (connecting, timing out, an answer that is not the API's).

use std::fmt;
use std::time::Duration;

/// The `code` of the server's `{"error": {...}}` answer (API.md).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorCode {
    /// 400: bad input; `field` names it.
    Invalid,
    /// 401: the server needs `Authorization: Bearer <token>`.
    Unauthorized,
    /// 404: no such job (or forgotten after its retention) or queue.
    NotFound,
    /// 409: the job was cancelled; its lease is revoked.
    Cancelled,
    /// 409: the lease is not held: it expired, or the job moved on.
    LeaseExpired,
    /// 409: the job is in a state the operation does not apply to.
    WrongState,
    /// 412: `If-Match` named an older version.
    VersionMismatch,
    /// 413: a payload, result or batch over its bound.
    TooLarge,
    /// 429: the queue holds its `max_jobs`.
    QueueFull,
    /// 503: the server is draining (shutting down) and takes no new jobs.
    Draining,
    /// 503: storage cannot take the change (log failed, disk full).
    Storage,
    /// 503: too many `?wait_ms` waits at once; ask again later.
    TooManyWaits,
    /// A code this client does not know (a newer server's).
    Other(String),
}

impl ErrorCode {
    /// The code as the server spells it.
    pub fn parse(code: &str) -> ErrorCode {
        match code {
            "invalid" => ErrorCode::Invalid,
            "unauthorized" => ErrorCode::Unauthorized,
            "not_found" => ErrorCode::NotFound,
            "cancelled" => ErrorCode::Cancelled,
            "lease_expired" => ErrorCode::LeaseExpired,
            "wrong_state" => ErrorCode::WrongState,
            "version_mismatch" => ErrorCode::VersionMismatch,
            "too_large" => ErrorCode::TooLarge,
            "queue_full" => ErrorCode::QueueFull,
            "draining" => ErrorCode::Draining,
            "storage" => ErrorCode::Storage,
            "too_many_waits" => ErrorCode::TooManyWaits,
            other => ErrorCode::Other(other.to_string()),
        }
    }

    /// The code as the server spells it.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::Invalid => "invalid",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::LeaseExpired => "lease_expired",
            ErrorCode::WrongState => "wrong_state",
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::Draining => "draining",
            ErrorCode::Storage => "storage",
            ErrorCode::TooManyWaits => "too_many_waits",
            ErrorCode::Other(code) => code,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed call.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The server refused the request: its status and error body.
    Api {
        status: u16,
        code: ErrorCode,
        message: String,
        field: Option<String>,
    },
    /// The server could not be reached, or the connection broke before the
    /// answer was read: the request may or may not have been applied.
    Connect { addr: String, message: String },
    /// No whole answer within the request's time bound.
    Timeout { after: Duration },
    /// The server answered something that is not the API's JSON (a proxy's
    /// page, a truncated body, a field of the wrong type).
    Protocol(String),
    /// The request could not be built from what the caller gave (a server
    /// address that is not `host:port`, a payload that is not JSON).
    Usage(String),
}

impl Error {
    /// The server's error code, for a refusal.
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether the job was cancelled (its lease revoked).
    pub fn is_cancelled(&self) -> bool {
        self.code() == Some(&ErrorCode::Cancelled)
    }

    /// Whether the lease named is no longer held.
    pub fn is_lease_expired(&self) -> bool {
        self.code() == Some(&ErrorCode::LeaseExpired)
    }

    /// Whether the same call may succeed later unchanged: the server was
    /// away, slow, draining or out of storage.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Timeout { .. } => true,
            Error::Api { code, status, .. } => {
                matches!(
                    code,
                    ErrorCode::Draining | ErrorCode::Storage | ErrorCode::TooManyWaits
                ) || *status >= 500
            }
            Error::Protocol(_) | Error::Usage(_) => false,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Api {
                status,
                code,
                message,
                field,
            } => {
                write!(f, "{code} ({status}): {message}")?;
                if let Some(field) = field {
                    write!(f, " (field {field})")?;
                }
                Ok(())
            }
            Error::Connect { addr, message } => {
                write!(
                    f,
                    "cannot reach the spool HTTP listener at {addr}: {message}"
                )
            }
            Error::Timeout { after } => {
                write!(f, "no answer within {} ms", after.as_millis())
            }
            Error::Protocol(message) => write!(f, "unexpected answer: {message}"),
            Error::Usage(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Error {}
