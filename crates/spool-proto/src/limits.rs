//! Every limit of spool, in one place, each with its reason.
//!
//! Limits that the beanstalkd protocol fixes are copied from beanstalkd 1.12
//! so that clients written against it see the same boundaries. The relations
//! between them are asserted at compile time at the bottom of this file.

/// Longest command line, counting its trailing `\r\n`.
///
/// beanstalkd reads commands into a 224-byte buffer; a line that does not end
/// within it is answered `BAD_FORMAT` and its first 224 bytes are discarded.
/// Keeping the same number keeps a connection's line buffer small and bounded.
pub const LINE_MAX_BYTES: usize = 224;

/// Longest tube name. beanstalkd's `MAX_TUBE_NAME_LEN` is 201 including NUL.
pub const TUBE_NAME_MAX_BYTES: usize = 200;

/// Default largest job body (`-z` / `SPOOL_MAX_JOB_SIZE`): beanstalkd's
/// `JOB_DATA_SIZE_LIMIT_DEFAULT`, 2^16 - 1.
pub const DEFAULT_MAX_JOB_SIZE_BYTES: u32 = 65_535;

/// Largest value `-z` accepts: beanstalkd's `JOB_DATA_SIZE_LIMIT_MAX` (1 GiB).
/// A connection buffers at most one body, so this also caps per-connection
/// memory.
pub const MAX_JOB_SIZE_LIMIT_BYTES: u32 = 1_073_741_824;

/// Priorities below this count as "urgent" in the stats (beanstalkd's
/// `URGENT_THRESHOLD`).
pub const URGENT_PRIORITY_THRESHOLD: u32 = 1024;

/// A reserved job whose TTR ends within this margin makes a blocked or new
/// `reserve` on the same connection answer `DEADLINE_SOON` (beanstalkd's
/// `SAFETY_MARGIN`), so the worker can finish or `touch` the job first.
pub const DEADLINE_SAFETY_MARGIN_NS: u64 = 1_000_000_000;

/// The smallest TTR: beanstalkd raises a TTR of 0 to one second so that a
/// reservation cannot expire before the worker could possibly answer.
pub const MIN_TTR_NS: u64 = 1_000_000_000;

/// Commands one connection may queue in the server while an earlier one is
/// still blocked (`reserve`). Past it the server stops reading from the
/// connection until the blocked command completes, as beanstalkd stops reading
/// once its 224-byte line buffer is full. Bounds memory per connection.
pub const PIPELINED_REQUESTS_MAX: usize = 1024;

/// Bytes a connection may have waiting to be written before the server stops
/// executing its further commands. A client that pipelines many `peek`s of big
/// jobs but never reads cannot grow the server's memory past this.
pub const WRITE_BUFFER_MAX_BYTES: usize = 4 * 1024 * 1024;

const _: () = {
    assert!(TUBE_NAME_MAX_BYTES + "watch ".len() + 2 < LINE_MAX_BYTES);
    assert!(DEFAULT_MAX_JOB_SIZE_BYTES <= MAX_JOB_SIZE_LIMIT_BYTES);
    assert!(MIN_TTR_NS >= DEADLINE_SAFETY_MARGIN_NS);
};
