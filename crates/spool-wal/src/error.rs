//! The crate's one error type. Every variant names the file (and, for damage,
//! the byte offset) so that a startup failure can be acted on from the log
//! line alone.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// What went wrong in the write-ahead log.
#[derive(Debug)]
#[non_exhaustive]
pub enum WalError {
    /// A system call failed. `op` says which ("write", "fsync", "create", …).
    /// After one of these from a writing call the log is poisoned.
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// Another process (or another `Wal` in this one) holds the data
    /// directory's lock file.
    Locked(PathBuf),
    /// A record in the log is damaged where it cannot be a torn tail (in a
    /// segment other than the last, or followed by valid records), or the
    /// set of segment files is inconsistent. `offset` is the byte offset of
    /// the first damaged record in `path` (0 for file-level problems).
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// A segment's header is damaged, from another format version, or names
    /// another segment; or the `MANIFEST` is of a newer format.
    BadHeader { path: PathBuf, reason: String },
    /// Part of the log that must exist is gone: a segment file the manifest
    /// names (the oldest, the newest, or all of them), records the manifest
    /// recorded at the end of the newest segment, or the manifest itself
    /// where the segments say there is one. `path` names what is missing
    /// (the first missing file of a run); `detail` says what was expected.
    /// [`WalOptions::accept_data_loss`](crate::WalOptions::accept_data_loss)
    /// opens the log anyway, with what is left, and reports the loss in
    /// [`RecoveryReport::lost`](crate::RecoveryReport::lost).
    Missing { path: PathBuf, detail: String },
    /// An earlier write, fsync or file operation failed, so what is on disk is
    /// unknown; every call fails until the log is reopened (recovery then
    /// decides what survived). A failed fsync is never retried: the kernel may
    /// already have dropped the dirty pages it could not write.
    Poisoned {
        /// The error that poisoned the log.
        cause: String,
    },
    /// The disk (or quota) was full while writing a batch. The batch's records
    /// were dropped and are not in the log; everything appended before that
    /// batch is unaffected, and the log stays usable, so writes can resume when
    /// space returns.
    OutOfSpace { path: PathBuf, source: io::Error },
    /// `append` was given a payload over [`RECORD_MAX_BYTES`](crate::RECORD_MAX_BYTES).
    RecordTooLarge { len: usize, max: usize },
    /// [`WalOptions`](crate::WalOptions) that cannot work.
    InvalidOptions(&'static str),
}

impl WalError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        WalError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(
        path: impl Into<PathBuf>,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        WalError::Corrupt {
            path: path.into(),
            offset,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for WalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalError::Io { op, path, source } => {
                write!(f, "WAL {op} failed on {}: {source}", path.display())
            }
            WalError::Locked(path) => write!(
                f,
                "WAL directory is in use: {} is locked by another process (or another open log in this one)",
                path.display()
            ),
            WalError::Corrupt { path, offset, reason } => write!(
                f,
                "WAL is corrupt: {} at byte offset {offset}: {reason}",
                path.display()
            ),
            WalError::BadHeader { path, reason } => {
                write!(f, "WAL file {} has a bad header: {reason}", path.display())
            }
            WalError::Missing { path, detail } => {
                write!(f, "WAL data is missing: {}: {detail}", path.display())
            }
            WalError::Poisoned { cause } => write!(
                f,
                "WAL is unusable after an earlier I/O error ({cause}); restart to recover"
            ),
            WalError::OutOfSpace { path, source } => write!(
                f,
                "WAL write refused, no space left for {}: {source}; the batch was not logged",
                path.display()
            ),
            WalError::RecordTooLarge { len, max } => {
                write!(f, "WAL record of {len} bytes is over the {max}-byte limit")
            }
            WalError::InvalidOptions(why) => write!(f, "invalid WAL options: {why}"),
        }
    }
}

impl std::error::Error for WalError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WalError::Io { source, .. } | WalError::OutOfSpace { source, .. } => Some(source),
            _ => None,
        }
    }
}
