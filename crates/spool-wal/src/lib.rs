//! spool's write-ahead log: an append-only sequence of opaque, checksummed
//! records kept in numbered segment files in a data directory.
//!
//! The log never interprets its records; the engine defines and encodes
//! them. The byte format is documented in `docs/wal-format.md`.
//!
//! ```no_run
//! use spool_wal::{Wal, WalOptions};
//! # fn main() -> Result<(), spool_wal::WalError> {
//! let mut recovery = Wal::open("spool-data", WalOptions::default())?;
//! while let Some(record) = recovery.next_record()? {
//!     // rebuild state from `record`
//!     # let _ = record;
//! }
//! let (mut wal, report) = recovery.finish()?;
//! if let Some(torn) = &report.torn_tail {
//!     eprintln!("{torn}"); // a crash cut the last write short: log it
//! }
//! wal.append(b"put job 1")?;
//! wal.append(b"put job 2")?;
//! wal.commit()?; // one write, one fdatasync: both records are durable
//! # Ok(()) }
//! ```
//!
//! Modules:
//! - [`format`](mod@format): segment names, header, record and manifest
//!   layout, limits.
//! - `manifest`: reading and updating the manifest (which segments must
//!   exist), so that a missing segment file is detected, not silently absent.
//! - `recovery`: replaying segments, telling torn tails from corruption,
//!   checking the segments against the manifest.
//! - `wal`: the writer (append, write, sync, rotate, remove, poisoning, and
//!   the zero-filled region kept ahead of the last record).
//! - [`storage`]: the I/O seam, with the real file system behind it.
//! - [`sim`]: in-memory storage with fault injection and crash images, for tests.
//! - `error`: [`WalError`].

mod error;
pub mod format;
mod manifest;
mod recovery;
pub mod sim;
pub mod storage;
mod wal;

pub use error::WalError;
pub use format::{RECORD_MAX_BYTES, SEGMENT_MAX_BYTES_DEFAULT};
pub use recovery::{LostData, Recovery, RecoveryReport, TornTail, TAIL_SEARCH_BUDGET};
pub use storage::{FsStorage, Storage};
pub use wal::{Commit, SegmentInfo, Wal, WalOptions, WalStats, ZERO_FILL_AHEAD_BYTES};
