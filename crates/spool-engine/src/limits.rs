//! Every limit of the engine's job model, with its reason. Protocol limits
//! (line length, tube names, minimum TTR) are `spool_proto::limits`.

/// Headers one job may carry. Headers are metadata for routing and tracing,
/// not a second payload; the bound keeps a job's metadata small next to
/// its body.
pub const HEADERS_MAX: usize = 64;

/// Bytes of all of a job's header names and values together.
pub const HEADERS_MAX_BYTES: usize = 16 << 10;

/// Bytes of one header name (the log stores it with a 16-bit length).
pub const HEADER_NAME_MAX_BYTES: usize = 256;

/// Bytes of an idempotency key: long enough for a composite key of a few
/// ids (`schedule:<name>:<due ms>` with a 200-byte name fits), short enough
/// that the index stays small.
pub const IDEMPOTENCY_KEY_MAX_BYTES: usize = 256;

/// How long an idempotency key matches when the enqueue does not say (API.md:
/// 24 h).
pub const IDEMPOTENCY_TTL_MS_DEFAULT: u64 = 24 * 3_600_000;

/// Bytes of a failed attempt's error (or a burial's reason) that are kept;
/// longer messages are cut at a character boundary, not refused: a worker
/// reporting a failure must not fail to report it.
pub const ERROR_MAX_BYTES: usize = 4 << 10;

/// Metadata a job's log record can hold besides its body and result: the
/// bounds above plus fixed fields, with room to spare. A job's record must
/// fit `RECORD_PAYLOAD_MAX_BYTES`.
pub const JOB_METADATA_MAX_BYTES: usize = 32 << 10;

/// The largest log record the write-ahead log takes (spool-wal's
/// `RECORD_MAX_BYTES`; spool-server asserts they agree). An operation
/// whose records would not fit is refused before it changes anything.
pub const RECORD_PAYLOAD_MAX_BYTES: usize = (1 << 30) + (64 << 10);

/// Jobs in one batch enqueue: one batch is one log record and one engine
/// call, so it must stay a bounded amount of work for a round.
pub const ENQUEUE_BATCH_JOBS_MAX: usize = 1_000;

/// Jobs one reserve may hand out.
pub const RESERVE_BATCH_MAX: u32 = 1_000;

/// Jobs one listing page may hold.
pub const LIST_LIMIT_MAX: u32 = 1_000;

/// Jobs one purge deletes: a purge is one operation committed as one log
/// record, so a queue of millions is purged in several calls.
pub const PURGE_JOBS_MAX: usize = 100_000;

/// Defaults of a job enqueued through the job API (API.md).
pub const PRIORITY_DEFAULT: u32 = 1024;
pub const TTR_MS_DEFAULT: u64 = 60_000;
pub const MAX_ATTEMPTS_DEFAULT: u32 = 25;

/// How long completed and cancelled jobs stay readable by default, and how
/// many per queue (API.md).
pub const RETENTION_MS_DEFAULT: u64 = 3_600_000;
pub const RETENTION_MAX_JOBS_DEFAULT: u64 = 10_000;

/// The longest delay: beanstalkd's (a 32-bit count of seconds), so both
/// front doors agree and no instant overflows.
pub const DELAY_MS_MAX: u64 = u32::MAX as u64 * 1_000;

/// The highest `rate_per_s` of a queue policy. The bucket hands out one
/// token every `1e9 / rate` ns, rounded up so the rate is never exceeded;
/// at a million a second that interval is at least 1,000 ns and the
/// rounding costs under 0.1 % of the rate. Faster than that is no limit a
/// single-threaded engine could reach anyway.
pub const RATE_PER_S_MAX: f64 = 1_000_000.0;

/// The longest TTR, for the same reason.
pub const TTR_MS_MAX: u64 = u32::MAX as u64 * 1_000;

const _: () = {
    assert!(
        HEADERS_MAX_BYTES + IDEMPOTENCY_KEY_MAX_BYTES + ERROR_MAX_BYTES + 1_024
            < JOB_METADATA_MAX_BYTES
    );
    assert!(HEADER_NAME_MAX_BYTES <= u16::MAX as usize);
    assert!(IDEMPOTENCY_KEY_MAX_BYTES <= u16::MAX as usize);
    assert!(HEADERS_MAX <= u16::MAX as usize);
};

/// Steps in one workflow. Starting a workflow is one log record holding
/// every step's definition, and every transition scans the steps, so a
/// workflow stays a bounded amount of work; sagas and DAGs people write
/// have a handful to a few dozen steps.
pub const WORKFLOW_STEPS_MAX: usize = 256;

/// Dependencies of one step: a join of more than this many steps is better
/// written as a step that waits for a few aggregating ones.
pub const WORKFLOW_DEPENDS_ON_MAX: usize = 64;

/// Bytes of a step's name: it travels in the `spool-step` header of every
/// job of the step, so it stays well inside a header's size.
pub const WORKFLOW_STEP_NAME_MAX_BYTES: usize = 128;

/// Bytes of a workflow's (free-form, informational) name.
pub const WORKFLOW_NAME_MAX_BYTES: usize = 256;

/// How long a succeeded or compensated workflow stays readable, and how
/// many such workflows are kept at most (the oldest-finished go first):
/// as for jobs, final state is kept for inspection, not forever.
pub const WORKFLOW_RETENTION_MS: u64 = 24 * 3_600_000;
pub const WORKFLOW_RETENTION_MAX: usize = 10_000;

/// Workflows one listing page may hold.
pub const WORKFLOW_LIST_LIMIT_MAX: u32 = 1_000;

/// How long before its due instant a schedule's firing is made: its job is
/// enqueued delayed until the instant, logged with the schedule's state,
/// so that at the instant itself only the delay timer moves it to ready
/// (what thousands of schedules due on the same second would otherwise
/// spend there, ≈5 µs a firing, is spent here, spread over batches).
/// Shorter than the shortest gap between two instants of a rule (1 s), so
/// a schedule has at most one firing made ahead; long enough that 10k
/// firings (≈60 ms of CPU on a loaded machine) are made before their
/// instant. A firing counts (`fires`, `last_fire_at`) only once its instant
/// has passed, and its state is logged again this long after the instant.
pub const SCHEDULE_FIRE_AHEAD_MS: u64 = 500;
