//! The PostgreSQL broker's errors: why it could not start, and how a
//! database failure becomes a [`BrokerError`].

use std::fmt;

use spool_broker::BrokerError;

/// A database failure inside an operation.
#[derive(Debug)]
pub(crate) enum DbError {
    /// No connection could be made.
    Unreachable(String),
    /// Every connection was busy for the whole acquire timeout.
    PoolExhausted {
        max: usize,
        waited_ms: u64,
    },
    /// The operation ran past its deadline.
    TimedOut {
        after_ms: u64,
    },
    /// A serialization failure or deadlock, or a lost race on an
    /// idempotency key: the operation is run again.
    Retry,
    Query(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for DbError {
    fn from(error: tokio_postgres::Error) -> Self {
        use tokio_postgres::error::SqlState;
        match error.code() {
            Some(code)
                if *code == SqlState::T_R_SERIALIZATION_FAILURE
                    || *code == SqlState::T_R_DEADLOCK_DETECTED =>
            {
                DbError::Retry
            }
            _ => DbError::Query(error),
        }
    }
}

impl DbError {
    /// Whether the database itself is away (then `/readyz` says so).
    pub fn is_unavailable(&self) -> bool {
        match self {
            DbError::Unreachable(_) | DbError::TimedOut { .. } => true,
            DbError::Query(error) => error.is_closed() || error.code().is_none(),
            DbError::PoolExhausted { .. } | DbError::Retry => false,
        }
    }
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DbError::Unreachable(why) => write!(f, "the database is unreachable: {why}"),
            DbError::PoolExhausted { max, waited_ms } => write!(
                f,
                "all {max} database connections stayed busy for {waited_ms} ms"
            ),
            DbError::TimedOut { after_ms } => {
                write!(f, "the database did not answer within {after_ms} ms")
            }
            DbError::Retry => f.write_str("the operation kept conflicting with others"),
            DbError::Query(error) => match error.as_db_error() {
                Some(db) => write!(f, "database error {}: {}", db.code().code(), db.message()),
                None => {
                    write!(f, "database: {error}")?;
                    match std::error::Error::source(error) {
                        Some(source) => write!(f, ": {source}"),
                        None => Ok(()),
                    }
                }
            },
        }
    }
}

/// What an operation answers: the job model's refusal, or the database's.
#[derive(Debug)]
pub(crate) enum OpError {
    Broker(BrokerError),
    Db(DbError),
}

impl From<BrokerError> for OpError {
    fn from(error: BrokerError) -> Self {
        OpError::Broker(error)
    }
}

impl From<DbError> for OpError {
    fn from(error: DbError) -> Self {
        OpError::Db(error)
    }
}

impl From<tokio_postgres::Error> for OpError {
    fn from(error: tokio_postgres::Error) -> Self {
        OpError::Db(error.into())
    }
}

/// Why [`crate::PgBroker::connect`] failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The URL does not parse.
    BadUrl(String),
    /// The server could not be reached or refused the login.
    Unreachable(String),
    /// The database was migrated by a newer spool than this binary.
    SchemaTooNew { found: i32, known: i32 },
    /// A migration failed; nothing of it was applied.
    Migration { version: i32, error: String },
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::BadUrl(why) => write!(f, "bad database URL: {why}"),
            ConnectError::Unreachable(why) => write!(f, "cannot reach the database: {why}"),
            ConnectError::SchemaTooNew { found, known } => write!(
                f,
                "the database's spool schema is version {found}, newer than this binary \
                 knows ({known}): run a spool release that knows it"
            ),
            ConnectError::Migration { version, error } => {
                write!(f, "schema migration {version} failed: {error}")
            }
        }
    }
}

impl std::error::Error for ConnectError {}
