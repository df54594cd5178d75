//! Limits of the server side that are not part of the wire protocol (those
//! live in `spool_proto::limits`, shared with clients): connection
//! admission, fd headroom, socket timeouts and keepalive, the beanstalkd
//! connection task's buffers and fairness, and the HTTP listener's timeouts
//! and sizes. Each constant says why it has its value.

use std::time::Duration;

/// File descriptors kept free for everything that is not a client
/// connection: the WAL segment and the next one during rotation, compaction's
/// snapshot and the segments it reads, the space reserve file, the data
/// directory lock, the HTTP listener, `/proc` reads for metrics, stdio and
/// the runtime's own (epoll, eventfd, signal pipe). Together about a dozen;
/// 32 leaves room for a few more transient ones so that the log never fails
/// with `EMFILE` because clients took the last descriptors.
pub const FD_HEADROOM: u64 = 32;

/// Slots the kernel's fd table of the process is grown to at start (at most
/// the fd limit). The table doubles when a new fd does not fit, and in a
/// process with several threads each doubling waits for an RCU grace
/// period, during which every thread opening an fd sleeps: the HTTP
/// listener accepting a `/livez` probe waited 10-20 ms during a burst of
/// 8,000 beanstalkd connections. Grown once before the runtimes' threads
/// start, it costs no grace period. A slot is 8 bytes of kernel memory and
/// the table never shrinks: 65,536 slots are 512 KiB, enough for the
/// connections most deployments hold; past them the doublings come back,
/// a few more for each tenfold.
pub const FD_TABLE_PRESIZE_MAX: u64 = 65_536;

/// Most HTTP connections open at once, apart from `--max-connections`,
/// which bounds beanstalkd clients only: so that workers filling their cap
/// never shut out `/livez`, `/readyz` and `/metrics` (Kubernetes would
/// restart a server that is merely full). HTTP clients are probes,
/// scrapers, the admin CLI and, since the job API, producers and workers
/// of any language, each holding a kept-alive connection or a few (closed
/// after a short idle time). 16,384 lets a fleet of job-API clients in
/// while bounding what a client opening connections in a loop can take:
/// an idle one costs the server a few KiB (`spool bench --mode
/// http-idle`), so tens of MiB at the cap; the fd ceiling, with
/// [`HTTP_FD_RESERVE`], bounds them too.
pub const HTTP_CONNECTIONS_MAX: u64 = 16_384;

/// Of the fds client connections may use, the last few only HTTP
/// connections may take: when beanstalkd clients have used up their share,
/// liveness probes, metric scrapes and the admin CLI still get through (a
/// failing liveness probe would have Kubernetes restart a server that is
/// merely full). Probes and scrapes come one at a time; 8 leaves room for a
/// few at once.
pub const HTTP_FD_RESERVE: u64 = 8;

/// Longest time the admission's estimate of open fds (fds open at the last
/// count + live connections) may go without a recount from `/proc/self/fd`
/// while connections are near the limit. Counting costs a directory read of
/// every fd before Linux 6.2 (~16 ms at 16k fds; a count of the fd table's
/// bits after), too much per accept at high connection rates, and the
/// estimate drifts only by fds opened outside the registry, which the
/// headroom covers. The count runs on the registry's own thread.
pub const FD_RECOUNT_INTERVAL: Duration = Duration::from_secs(1);

/// The estimate is recounted only once it passes this share of the fd
/// ceiling (limit - headroom), in percent: below it a drift of a few fds
/// cannot matter, and a recount with thousands of fds open costs
/// milliseconds of CPU where the kernel lists them (before Linux 6.2).
pub const FD_RECOUNT_FROM_PERCENT: u64 = 75;

/// Connections one `/admin/connections` reply lists when the request gives
/// no `limit`: every connection of a server that a person reads through
/// (`spool conns`) in one page, while a server holding tens of thousands
/// answers with a page (about 180 KiB of JSON) instead of building
/// megabytes on an HTTP worker (16,700 connections: 2.9 MiB in 50-300 ms).
pub const ADMIN_CONNECTIONS_PAGE_DEFAULT: usize = 1_000;

/// Most connections one `/admin/connections` reply lists (`limit` above it
/// is refused): about 1.8 MiB of JSON and a few tens of ms on the HTTP
/// worker that builds it, which serves probes meanwhile.
pub const ADMIN_CONNECTIONS_PAGE_MAX: usize = 10_000;

/// Pending connections the beanstalkd listener asks the kernel to queue
/// before `accept`. A fleet of workers reconnecting at once after a deploy
/// or a network blip must queue, not be dropped: a dropped handshake costs
/// its client a SYN retry, a second or more. Clients finish their
/// handshakes faster than one event-loop thread accepts them, so the queue
/// has to hold a large part of a burst; 4096 (four times beanstalkd's 1024)
/// holds 8,000 connections opened 256 at a time with none dropped. An
/// entry is a kernel request socket of a few hundred bytes, taken only
/// while it waits. Linux caps it at `net.core.somaxconn` (4096 by default
/// since 5.4, 128 before); `spool serve` logs the backlog it got, and a
/// host that needs more raises that sysctl.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Most connections the beanstalkd listener accepts in one turn before it
/// lets the established connections run: each wake-up drains the listen
/// queue (a burst is taken in a few turns, not one connection per turn),
/// and this bounds how long clients already connected wait meanwhile
/// (an accept and a task spawn are a few microseconds, so under a
/// millisecond). tokio's cooperative budget (128 operations per poll)
/// ends a turn at the same point.
pub const ACCEPTS_PER_TURN_MAX: usize = 128;

/// Most beanstalkd connections the listener's task polls in one turn
/// before it yields to the engine task and comes back: the connections
/// share one task (see `beanstalk.rs`) and run outside tokio's budget, so
/// without this bound a burst of 8,000 clients sending at once would all
/// read, decode and hold their requests before the engine answered any
/// (memory at the high-water mark of every one busy, and the first
/// waiting for the last).
pub const CONNECTION_POLLS_PER_TURN_MAX: usize = 64;

/// Size of the per-thread scratch buffer beanstalkd reads land in (one per
/// runtime thread, not per connection): a burst of a few hundred pipelined
/// commands, or a default-sized (64 KiB) job body, in one read; larger
/// bodies continue in the connection's own buffer.
pub const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Replies encoded into the per-thread write buffer before one write (the
/// buffer is kept between uses, up to twice this): enough for hundreds of
/// pipelined replies or a default-sized job in one system call; the
/// connection writes again for what follows.
pub const WRITE_SCRATCH_BYTES: usize = 64 * 1024;

/// Rounds of work (read, submit, write) one poll of a beanstalkd connection
/// may do before yielding, so a client that never stops sending cannot
/// starve the others on the single data-path thread; 16 rounds of up to
/// [`READ_CHUNK_BYTES`] each is about 1 MiB per turn, enough to amortise
/// the yield.
pub const POLL_ROUNDS_MAX: usize = 16;

/// Most distinct command names the connection registry tells apart: an
/// entry stores its command as a byte, 0 meaning none, to stay within its
/// memory budget. The front doors have a few dozen commands (beanstalkd's
/// 25 and the HTTP routes); a name past the limit shows as none.
pub const COMMAND_NAMES_MAX: usize = u8::MAX as usize;

/// How long the accept loop pauses after `accept` fails (out of fds, or
/// another resource error), so that a persistent error cannot make it spin.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Idle time before the kernel sends TCP keepalive probes on a client
/// connection: finds peers that vanished without a FIN (a crashed host, a
/// dropped NAT entry) within minutes instead of the kernel's 2 hours, while
/// costing one small packet a minute per idle connection.
pub const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);

/// Time between unanswered keepalive probes; with the kernel's default of 9
/// probes, a dead peer is found 60 s + 9 × 10 s after it went silent.
pub const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Default of `--request-timeout`: how long after its first byte a command
/// line must be complete, and how long a body may take on top of its time
/// at [`REQUEST_BODY_MIN_BYTES_PER_SEC`] (the slowloris defence: bytes
/// trickling in do not push the deadline back). A command line is at most
/// 224 bytes, which any live client sends in well under a second; 30 s
/// leaves room for a congested link and a client that writes a request in
/// pieces, while bounding how long a connection that never completes one
/// can be held.
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// Slowest rate a job body may arrive at: a body's deadline is the request
/// timeout from the start of its request plus its length at this rate, so
/// large bodies on slow links get through while a client trickling bytes
/// cannot hold a connection for longer than its body would take at this
/// rate. 1 KiB/s is twice the minimum rate of Apache's slowloris defence
/// (mod_reqtimeout, 500 bytes/s) and far below any working link (a
/// GPRS-class mobile link moves several KiB/s); the default 64 KiB job gets
/// 64 s on top of the timeout.
pub const REQUEST_BODY_MIN_BYTES_PER_SEC: u64 = 1024;

/// Default of `--write-timeout`: how long replies may wait unwritten because
/// the client does not read before the connection is closed. The same
/// reasoning as the request timeout, on the other direction.
pub const WRITE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// Upper bounds, in seconds, of the connection duration histogram: from
/// 10 ms (a connect-query-close client) to a day (a worker that stays
/// connected). Roughly a factor of 3 to 10 apart: operators read from it
/// which kind of client dominates, not precise quantiles.
pub const CONNECTION_DURATION_BUCKETS_SECONDS: [f64; 14] = [
    0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0,
];

// --- HTTP listener -------------------------------------------------------

/// Pending connections the HTTP listener queues: probes and scrapes come a
/// few at a time, but a burst of `spool top`s or a restarted scraper fleet
/// should not see refused connects.
pub const HTTP_LISTEN_BACKLOG: u32 = 128;

/// Where the HTTP listener binds unless told otherwise.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:11301";

/// How long a client may take to send a whole request head, and how long a
/// kept-alive connection may sit idle before the next one (hyper runs one
/// timer for both). Long enough for any honest client on a slow link,
/// short enough that a slowloris cannot pin connections for long.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a request body may take to arrive once its head is in. Admin
/// bodies are a few bytes; the job API's are at most a job.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a handler may take: a snapshot or a job-API operation waits
/// for one engine round (and, for a change, its commit), which under any
/// sane load is milliseconds. Past this the answer is 503 rather than a
/// connection held open forever. A long-polling reserve gets
/// [`RESERVE_WAIT_MAX`] on top.
pub const HANDLER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a response may wait for a client that does not read it. HTTP
/// responses are at most a scrape or a listing of connections, which the
/// socket buffers mostly hold, so only a client that stopped reading
/// stalls; 10 s, like the other HTTP timeouts, is far beyond what a probe
/// or scraper waits (Prometheus' default scrape timeout is 10 s) and bounds
/// how long one such client pins a connection.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request body accepted. Admin bodies are a log filter directive;
/// 64 KiB leaves room for any sensible one and keeps a hostile upload from
/// costing memory.
pub const REQUEST_BODY_MAX_BYTES: usize = 64 << 10;

/// Bytes of an oversized body read and dropped so that the 413 reaches
/// the client (see `collect_body`); Go's net/http drains 256 KiB likewise.
/// Bodies announced larger than the limit plus this are refused unread.
pub const OVERSIZED_BODY_DRAIN_MAX_BYTES: usize = 256 << 10;

/// Largest request head (request line plus headers) hyper buffers; hyper
/// needs at least 8 KiB. Beyond this the client gets 431.
pub const REQUEST_HEAD_MAX_BYTES: usize = 16 << 10;

/// How long a graceful stop waits for HTTP requests in flight before it
/// drops the connections still open. Probes, scrapes and admin calls take
/// milliseconds; 5 s lets a slow one finish while keeping the stop well
/// inside the default shutdown grace (25 s) and Kubernetes' 30 s.
pub const SHUTDOWN_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How often an HTTP connection checks whether its writes are stalled: a
/// stall is noticed at most this long after [`WRITE_STALL_TIMEOUT`] runs
/// out (2.5 % late). Four timer wakes a second per connection are cheap
/// for the usual few hundred; at thousands of idle job-API connections
/// they add up (tens of thousands of wakes a second at
/// [`HTTP_CONNECTIONS_MAX`]), a cost to revisit if fleets that large
/// appear.
pub const HTTP_STALL_CHECK_INTERVAL: Duration = Duration::from_millis(250);

// --- write-ahead log: full disk --------------------------------------------

/// Wait before the first retry of a compaction abandoned for want of disk
/// space; each further abandonment doubles it, up to
/// [`COMPACTION_RETRY_MAX`]. Every attempt copies each live job into a
/// snapshot, so retrying at once on a disk that stays full would spend the
/// engine task on nothing; a second is short next to how long a disk stays
/// full.
pub const COMPACTION_RETRY_MIN: Duration = Duration::from_secs(1);

/// Longest wait between two compaction attempts after abandoned ones:
/// space that comes back (an operator freed some, or jobs were deleted) is
/// put to use within this, and attempts on a disk that stays full cost at
/// most one snapshot pass per 30 s.
pub const COMPACTION_RETRY_MAX: Duration = Duration::from_secs(30);

/// A compaction starts only when the disk has room for the live jobs'
/// records plus this fraction (1/16) of them, and the snapshot is abandoned
/// rather than written past the room held for deletes. The slack covers
/// what is rounded up on disk (the partly used last block of each segment,
/// the headers) and the puts that arrive while the snapshot is written;
/// 6 % is a few blocks per segment even for the smallest segments.
pub const COMPACTION_ROOM_SLACK_DIVISOR: u64 = 16;

/// Room kept for a new segment before a compaction rotates into one: its
/// 32-byte header takes a whole file system block (4 KiB on most, up to
/// 64 KiB on some), and the snapshot's first record follows it.
pub const SEGMENT_CREATE_ROOM_BYTES: u64 = 64 << 10;

// --- HTTP job API (`/v1`) --------------------------------------------------

/// JSON a `/v1` request body may carry besides one job's payload (or
/// result): the other fields of an enqueue, which the engine bounds in
/// bytes once decoded (headers 16 KiB, an idempotency key 256 B), can grow
/// up to six times when JSON-escaped (`\u0001`); 128 KiB covers that, the
/// numbers and key names, and a worker's error message of a few KiB. It only
/// bounds what one request makes the server buffer; each field's own limit
/// is checked after decoding.
pub const JOB_JSON_ALLOWANCE_BYTES: usize = 128 << 10;

/// Largest body of a `/v1` request that carries one job: the largest
/// payload as base64 (4 characters per 3 bytes; a JSON payload is stored as
/// the text sent, so it is never larger than that) plus
/// [`JOB_JSON_ALLOWANCE_BYTES`], and never less than the admin bound.
pub fn job_body_max_bytes(max_job_size: u32) -> usize {
    let base64 = (max_job_size as usize).div_ceil(3).saturating_mul(4);
    base64
        .saturating_add(JOB_JSON_ALLOWANCE_BYTES)
        .max(REQUEST_BODY_MAX_BYTES)
}

/// Largest body of a batch enqueue when one job's bound is smaller: a
/// batch of up to [`V1_BATCH_JOBS_MAX`] small jobs (about 8 KiB of JSON
/// each) fits, while a few concurrent batches cost tens of MiB at most.
/// Batches are for many small jobs; large payloads go one per request.
pub const BATCH_BODY_MAX_BYTES: usize = 8 << 20;

/// Largest body of `POST /v1/queues/{queue}/jobs/batch` and of
/// `POST /v1/jobs/complete` (results are small as payloads are).
pub fn batch_body_max_bytes(max_job_size: u32) -> usize {
    job_body_max_bytes(max_job_size).max(BATCH_BODY_MAX_BYTES)
}

/// Jobs in one batch enqueue: the engine's bound (one batch is one log
/// record and one engine round), checked before the jobs are decoded
/// further.
pub const V1_BATCH_JOBS_MAX: usize = spool_engine::limits::ENQUEUE_BATCH_JOBS_MAX;

/// Completions in one `POST /v1/jobs/complete`: what one reserve may hand
/// out, so a worker settles a reserved batch in one request. Each is its
/// own broker call (they run at once, and the PostgreSQL broker groups
/// them into one statement), so this bounds the calls one request starts.
pub const V1_COMPLETE_BATCH_MAX: usize = spool_engine::limits::RESERVE_BATCH_MAX as usize;

/// Longest `timeout_ms` of `POST /v1/reserve`. A long poll holds no thread
/// (it is parked in the broker), only a connection, so it may outlast
/// [`HANDLER_TIMEOUT`]: the reserve handler gets this on top of it. 30 s is
/// below common proxy and load-balancer idle timeouts (60 s), and a worker
/// simply polls again.
pub const RESERVE_WAIT_MAX: Duration = Duration::from_secs(30);

/// Longest `?wait_ms` of an enqueue or a job read: the same bound as a
/// reserve's long poll ([`RESERVE_WAIT_MAX`]) for the same reasons (proxy
/// idle timeouts; a client simply asks again). The handler gets it on top
/// of [`HANDLER_TIMEOUT`].
pub const JOB_WAIT_MAX: Duration = RESERVE_WAIT_MAX;

/// Most `?wait_ms` waits held at once; past it a wait is refused with 503
/// `too_many_waits` (the client may read the job without waiting, or try
/// again). A wait costs little in the broker, but each holds an HTTP
/// connection: 128 (well under [`HTTP_CONNECTIONS_MAX`]) keeps waiters
/// from taking the connections the workers that would settle their jobs,
/// and the probes, need. Enqueue-and-wait at 1,000 requests/s with
/// millisecond answers holds a handful at once.
pub const JOB_WAITS_MAX: usize = 128;
