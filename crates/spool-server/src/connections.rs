//! The registry of client connections that every front door (the beanstalkd
//! listener, the HTTP listener) admits its connections through: admission
//! control, per-connection introspection, lifecycle metrics and shutdown.
//!
//! Admission refuses a new connection when its front door's cap is reached
//! (`max_connections` beanstalkd connections, [`HTTP_CONNECTIONS_MAX`] HTTP
//! ones: each front door has its own, so workers filling theirs never shut
//! out liveness probes and scrapes) or when one more would bring the
//! process's open fds within
//! [`FD_HEADROOM`] of its limit, so that the log, compaction and the
//! listeners never meet `EMFILE` because clients took the last descriptors;
//! beanstalkd connections stop [`HTTP_FD_RESERVE`] fds earlier, so probes
//! and scrapes still get through when workers have taken their share.
//! Counting `/proc/self/fd` on every accept is too slow at high connection
//! rates, so admission keeps an estimate (fds open at the last count that
//! are not connections, plus the live connections) and recounts only when
//! the estimate nears the ceiling, at most every [`FD_RECOUNT_INTERVAL`], or
//! right after `accept` failed with `EMFILE`/`ENFILE`; a recount also
//! re-reads the soft limit, so a limit raised after start takes effect.
//! The admission that recounts claims it under the lock and hands it to the
//! registry's recount thread: listing `/proc/self/fd` takes ~16 ms at 16k
//! fds (a second at a million), which on the accepting runtime thread held
//! every connection and probe that thread serves. Admissions meanwhile go
//! by the estimate, and the count replaces the estimate's base when it
//! arrives; after `EMFILE`/`ENFILE` the estimate is known to be short, so
//! admission refuses until that recount is in. An admission takes the lock
//! once.
//!
//! Each admitted connection gets a [`ConnHandle`]; dropping it ends the
//! connection's record and counts it as closed with its reason. A
//! connection costs about 140 bytes here (one 128-byte allocation for its
//! entry, peer address included, and its registry slot); updating it is an
//! atomic store, or a short lock for the command name. Totals of live
//! connections are summed when metrics are read, not on every read or
//! write.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::limits::{
    COMMAND_NAMES_MAX, CONNECTION_DURATION_BUCKETS_SECONDS, FD_HEADROOM, FD_RECOUNT_FROM_PERCENT,
    FD_RECOUNT_INTERVAL, HTTP_CONNECTIONS_MAX, HTTP_FD_RESERVE,
};
use crate::process;

/// The front door a connection came through (the `protocol` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Beanstalk,
    Http,
}

impl Protocol {
    pub const ALL: [Protocol; 2] = [Protocol::Beanstalk, Protocol::Http];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Beanstalk => "beanstalk",
            Protocol::Http => "http",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Fds below the admission ceiling that connections of this protocol
    /// may not take ([`HTTP_FD_RESERVE`] keeps them for HTTP).
    fn fds_reserved_for_others(self) -> u64 {
        match self {
            Protocol::Beanstalk => HTTP_FD_RESERVE,
            Protocol::Http => 0,
        }
    }
}

/// Why a new connection was refused (the `reason` label of
/// `spool_connections_rejected_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The front door's cap was reached: `max_connections` beanstalkd
    /// connections, or [`HTTP_CONNECTIONS_MAX`] HTTP ones, were open.
    MaxConnections,
    /// The process's open fds were within the headroom of their limit, or
    /// `accept` itself failed for want of fds.
    FdLimit,
}

impl RejectReason {
    pub const ALL: [RejectReason; 2] = [RejectReason::MaxConnections, RejectReason::FdLimit];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::MaxConnections => "max_connections",
            RejectReason::FdLimit => "fd_limit",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a connection ended (the `reason` label of
/// `spool_connections_closed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// The client closed its side or reset the connection.
    Client,
    /// The client sent `quit`.
    Quit,
    /// The client stalled in the middle of a request.
    RequestTimeout,
    /// The client did not read its replies.
    WriteTimeout,
    /// A socket error other than the client going away.
    IoError,
    /// The server closed it at shutdown.
    Shutdown,
    /// The broker closed the session.
    Server,
    /// The server closed a connection that sat idle between requests past
    /// a timeout (the HTTP listener's kept-alive connections).
    IdleTimeout,
}

impl CloseReason {
    pub const ALL: [CloseReason; 8] = [
        CloseReason::Client,
        CloseReason::Quit,
        CloseReason::RequestTimeout,
        CloseReason::WriteTimeout,
        CloseReason::IoError,
        CloseReason::Shutdown,
        CloseReason::Server,
        CloseReason::IdleTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Client => "client",
            CloseReason::Quit => "quit",
            CloseReason::RequestTimeout => "request_timeout",
            CloseReason::WriteTimeout => "write_timeout",
            CloseReason::IoError => "io_error",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Server => "server",
            CloseReason::IdleTimeout => "idle_timeout",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn from_index(index: u8) -> CloseReason {
        CloseReason::ALL
            .get(usize::from(index))
            .copied()
            .unwrap_or(CloseReason::Client)
    }
}

/// What a connection is doing, for `/admin/connections`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnState {
    /// Between requests, nothing buffered.
    Idle,
    /// Part of a request received, waiting for the rest.
    Reading,
    /// Requests handed to the broker, replies not yet back.
    Executing,
    /// Blocked in a `reserve` waiting for a job.
    Reserving,
    /// Replies waiting for the client to read them.
    Writing,
}

impl ConnState {
    const ALL: [ConnState; 5] = [
        ConnState::Idle,
        ConnState::Reading,
        ConnState::Executing,
        ConnState::Reserving,
        ConnState::Writing,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Idle => "idle",
            ConnState::Reading => "reading",
            ConnState::Executing => "executing",
            ConnState::Reserving => "reserving",
            ConnState::Writing => "writing",
        }
    }

    fn from_index(index: u8) -> ConnState {
        ConnState::ALL
            .get(usize::from(index))
            .copied()
            .unwrap_or(ConnState::Idle)
    }
}

/// A fixed-bucket histogram of connection durations
/// ([`CONNECTION_DURATION_BUCKETS_SECONDS`]), shaped like
/// `spool_engine::metrics::Histogram` so the exposition prints both alike.
#[derive(Debug, Clone, PartialEq)]
pub struct DurationHistogram {
    /// Observations per bucket (not cumulative); the last counts those
    /// above every bound.
    counts: [u64; CONNECTION_DURATION_BUCKETS_SECONDS.len() + 1],
    count: u64,
    sum_seconds: f64,
}

impl Default for DurationHistogram {
    fn default() -> Self {
        DurationHistogram {
            counts: [0; CONNECTION_DURATION_BUCKETS_SECONDS.len() + 1],
            count: 0,
            sum_seconds: 0.0,
        }
    }
}

impl DurationHistogram {
    pub fn observe(&mut self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        // Prometheus buckets are upper-inclusive (`le`).
        let bucket = CONNECTION_DURATION_BUCKETS_SECONDS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(CONNECTION_DURATION_BUCKETS_SECONDS.len());
        self.counts[bucket] += 1;
        self.count += 1;
        self.sum_seconds += seconds;
    }

    /// Upper bounds of the finite buckets, in seconds.
    pub fn bounds(&self) -> &'static [f64] {
        &CONNECTION_DURATION_BUCKETS_SECONDS
    }

    /// Observations per bucket (not cumulative), one more than
    /// [`DurationHistogram::bounds`]: the last is the `+Inf` bucket.
    pub fn bucket_counts(&self) -> &[u64] {
        &self.counts
    }

    /// (upper bound, observations at or below it) for the finite buckets.
    pub fn cumulative(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        CONNECTION_DURATION_BUCKETS_SECONDS
            .iter()
            .zip(self.counts.iter())
            .scan(0u64, |total, (&bound, &count)| {
                *total += count;
                Some((bound, *total))
            })
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sum of the observed durations, in seconds.
    pub fn sum(&self) -> f64 {
        self.sum_seconds
    }
}

/// One connection as `/admin/connections` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionInfo {
    /// Unique for the life of the process, in order of admission.
    pub id: u64,
    pub protocol: Protocol,
    pub peer: String,
    #[serde(rename = "age_seconds", serialize_with = "serialize_seconds")]
    pub age: Duration,
    pub state: ConnState,
    /// The command being executed or, when idle, the last one.
    pub command: Option<&'static str>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The broker session serving the connection, where the front door
    /// has one.
    pub session_id: Option<u64>,
}

fn serialize_seconds<S: serde::Serializer>(age: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(age.as_secs_f64())
}

/// Lifecycle figures of one protocol.
#[derive(Debug, Clone)]
pub struct ProtocolMetrics {
    pub protocol: Protocol,
    /// Open now (`spool_connections`).
    pub active: u64,
    /// `spool_connections_opened_total`.
    pub opened_total: u64,
    /// `spool_connections_closed_total`, one entry per reason (all of
    /// [`CloseReason::ALL`], zeros included).
    pub closed_total: Vec<(CloseReason, u64)>,
    /// Bytes received from clients, closed and live connections together.
    pub bytes_in_total: u64,
    /// Bytes sent to clients.
    pub bytes_out_total: u64,
    /// `spool_connection_duration_seconds`, of closed connections.
    pub duration: DurationHistogram,
}

/// Everything the registry counts, for `/metrics` and `/admin/stats`.
#[derive(Debug, Clone)]
pub struct ConnectionMetrics {
    /// One entry per protocol of [`Protocol::ALL`].
    pub protocols: Vec<ProtocolMetrics>,
    /// `spool_connections_rejected_total`, one entry per reason.
    pub rejected_total: Vec<(RejectReason, u64)>,
    /// The soft fd limit admission works against; `None` when unlimited or
    /// unknown.
    pub fd_limit: Option<u64>,
    /// Admission's current estimate of the process's open fds.
    pub fds_estimate: u64,
    /// `max_connections`, when set: the cap on beanstalkd connections.
    pub max_connections: Option<u64>,
}

impl ConnectionMetrics {
    pub fn protocol(&self, protocol: Protocol) -> Option<&ProtocolMetrics> {
        self.protocols.iter().find(|p| p.protocol == protocol)
    }

    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected_total
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }
}

impl ProtocolMetrics {
    pub fn closed(&self, reason: CloseReason) -> u64 {
        self.closed_total
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }
}

/// The registry. Cheap to clone (one `Arc`); every clone is the same
/// registry.
#[derive(Clone, Debug)]
pub struct Connections {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Zero of the entries' `opened_ns`.
    epoch: Instant,
    /// Command names seen so far; an entry stores its command as an index
    /// into this list plus one (0: none), a byte instead of a `&str`.
    command_names: Mutex<Vec<&'static str>>,
    max_connections: Option<u64>,
    /// The fd limit is the process's, re-read at every recount (so raising
    /// it later, or `prlimit` on the running process, takes effect), rather
    /// than one fixed at construction.
    fd_limit_is_the_process_limit: bool,
    /// Open fds are counted from `/proc/self/fd`; false only in unit tests
    /// that give the base, so other tests' sockets cannot disturb them.
    counts_fds: bool,
    /// Counts the process's open fds: `process::open_fd_count`, or a
    /// stand-in that unit tests observe and hold.
    count_fds: FdCounter,
    /// Wakes the recount thread, started at the first recount; dropped
    /// with the registry, which ends the thread.
    recount_requests: OnceLock<mpsc::Sender<()>>,
    state: Mutex<State>,
    /// Woken whenever a connection ends, for `wait_until_none`.
    ended: tokio::sync::Notify,
    /// Set at SIGTERM: a session the broker ends from then on is counted as
    /// closed by `shutdown`, not as an ordinary `server` close.
    shutting_down: AtomicBool,
}

#[derive(Debug)]
struct State {
    /// Live entries by slot; a slab, so a connection costs one pointer here.
    slots: Vec<Option<Arc<Entry>>>,
    free_slots: Vec<u32>,
    live: u64,
    next_id: u64,
    protocols: [ProtocolTotals; Protocol::ALL.len()],
    rejected: [u64; RejectReason::ALL.len()],
    /// Open fds that are not live connections, as of the last count.
    fds_base: u64,
    fds_counted_at: Instant,
    /// `accept` failed for want of fds: recount at the next admission.
    recount_due: bool,
    /// A recount is claimed and not yet applied: no other starts.
    recount_running: bool,
    /// `accept` failed for want of fds: the estimate is short of the real
    /// count, so admission refuses until the next recount is applied.
    refusing_until_recount: bool,
    /// Fewest live connections since the running recount was claimed: its
    /// count saw at least these, so the base it gives (count - these)
    /// errs high (refusing a little early) however connections come and
    /// go while it lists, never low (admitting past the ceiling).
    live_low_water: u64,
    /// Recounts claimed and recounts applied (their results in the
    /// estimate), for tests.
    recounts_started: u64,
    recounts_applied: u64,
    /// The soft fd limit admission works against; `None`: no fd check.
    fd_limit: Option<u64>,
    /// Highest number of fds admission lets the process reach:
    /// `fd_limit - FD_HEADROOM`.
    fd_ceiling: u64,
}

/// What counts the process's open fds (see `Inner::count_fds`).
struct FdCounter(Box<dyn Fn() -> io::Result<u64> + Send + Sync>);

impl FdCounter {
    fn process() -> FdCounter {
        FdCounter(Box::new(process::open_fd_count))
    }

    fn count(&self) -> io::Result<u64> {
        (self.0)()
    }
}

impl std::fmt::Debug for FdCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FdCounter")
    }
}

/// The admission ceiling for an fd limit.
fn fd_ceiling(fd_limit: Option<u64>) -> u64 {
    fd_limit.map_or(u64::MAX, |limit| limit.saturating_sub(FD_HEADROOM))
}

#[derive(Debug, Default)]
struct ProtocolTotals {
    active: u64,
    opened: u64,
    closed: [u64; CloseReason::ALL.len()],
    /// Bytes of connections that have ended (live ones are summed on read).
    bytes_in_closed: u64,
    bytes_out_closed: u64,
    duration: DurationHistogram,
}

/// `session_id` of an entry that has none.
const NO_SESSION: u64 = u64::MAX;

/// Bit of `Entry::flags` set by `close_all`; the bits below it hold the
/// close reason's index.
const CLOSE_REQUESTED: u8 = 0x80;

// Every close reason's index fits below the close-requested bit.
const _: () = assert!(CloseReason::ALL.len() <= CLOSE_REQUESTED as usize);

#[derive(Debug)]
struct Entry {
    id: u64,
    /// Admission time, in nanoseconds since the registry's epoch.
    opened_ns: u64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    session_id: AtomicU64,
    slot: u32,
    protocol: Protocol,
    state: AtomicU8,
    /// Index of the command name plus one (see `Inner::command_names`).
    command: AtomicU8,
    /// The close reason's index, and [`CLOSE_REQUESTED`].
    flags: AtomicU8,
    details: Mutex<Details>,
}

#[derive(Debug)]
struct Details {
    peer: PeerAddr,
    /// The connection task, woken by `close_all`.
    waker: Option<Waker>,
}

/// A peer as the front door gave it: a socket address when it parses as
/// one, stored inline (no allocation per connection), text otherwise.
#[derive(Debug)]
enum PeerAddr {
    Unset,
    Socket(SocketAddr),
    Text(Box<str>),
}

impl PeerAddr {
    fn new(peer: String) -> PeerAddr {
        match peer.parse::<SocketAddr>() {
            // Only when it prints back the same, so the list shows what was
            // given.
            Ok(addr) if addr.to_string() == peer => PeerAddr::Socket(addr),
            _ => PeerAddr::Text(peer.into_boxed_str()),
        }
    }

    fn to_text(&self) -> String {
        match self {
            PeerAddr::Unset => String::new(),
            PeerAddr::Socket(addr) => addr.to_string(),
            PeerAddr::Text(text) => text.to_string(),
        }
    }
}

/// Locks `mutex` whatever a panic elsewhere left it: what the server's
/// locks guard (counters, wakers, the engine's future) stays usable after
/// one, and poisoning must not take the server down.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Connections {
    /// A registry admitting up to `max_connections` beanstalkd connections
    /// (none: only the fd limit bounds them) and [`HTTP_CONNECTIONS_MAX`]
    /// HTTP ones, against the process's soft fd limit (read now,
    /// and again whenever admission recounts the open fds).
    pub fn new(max_connections: Option<u32>) -> Connections {
        let fd_limit = process::fd_limit().ok();
        let fds_base = process::open_fd_count().unwrap_or(0);
        Connections::build(max_connections, fd_limit, true, Some(fds_base))
    }

    /// A registry that admits against `fd_limit` instead of the process's
    /// own (tests use it to exercise the fd check without lowering the
    /// limit of the whole test process). `None`: no fd check.
    pub fn with_fd_limit(max_connections: Option<u32>, fd_limit: Option<u64>) -> Connections {
        let fds_base = process::open_fd_count().unwrap_or(0);
        Connections::build(max_connections, fd_limit, false, Some(fds_base))
    }

    /// A registry that takes `fds_base` fds to be open besides its
    /// connections, and never counts them: unit tests get exact ceilings.
    #[cfg(test)]
    fn with_fd_base(fd_limit: u64, fds_base: u64) -> Connections {
        Connections::build(None, Some(fd_limit), false, None).with_base(fds_base)
    }

    /// A registry whose recounts call `count_fds` (starting from a base of
    /// `fds_base`), and whose first admission recounts: unit tests see
    /// where and when a recount runs, and give it the count it finds.
    #[cfg(test)]
    fn with_fd_counter(
        fd_limit: u64,
        fds_base: u64,
        count_fds: impl Fn() -> io::Result<u64> + Send + Sync + 'static,
    ) -> Connections {
        let mut registry = Connections::build(None, Some(fd_limit), false, Some(fds_base));
        let inner = Arc::get_mut(&mut registry.inner).expect("not shared yet");
        inner.count_fds = FdCounter(Box::new(count_fds));
        lock(&inner.state).recount_due = true;
        registry
    }

    #[cfg(test)]
    fn with_base(self, fds_base: u64) -> Connections {
        lock(&self.inner.state).fds_base = fds_base;
        self
    }

    /// `fds_base`: the open fds counted now; `None`: do not count them.
    fn build(
        max_connections: Option<u32>,
        fd_limit: Option<u64>,
        fd_limit_is_the_process_limit: bool,
        fds_base: Option<u64>,
    ) -> Connections {
        let now = Instant::now();
        let fd_limit = fd_limit.filter(|&limit| limit != u64::MAX);
        let counts_fds = fds_base.is_some();
        let fds_base = fds_base.unwrap_or(0);
        Connections {
            inner: Arc::new(Inner {
                epoch: now,
                command_names: Mutex::new(Vec::new()),
                max_connections: max_connections.map(u64::from),
                fd_limit_is_the_process_limit,
                counts_fds,
                count_fds: FdCounter::process(),
                recount_requests: OnceLock::new(),
                state: Mutex::new(State {
                    slots: Vec::new(),
                    free_slots: Vec::new(),
                    live: 0,
                    next_id: 1,
                    protocols: Default::default(),
                    rejected: [0; RejectReason::ALL.len()],
                    fds_base,
                    fds_counted_at: now,
                    recount_due: false,
                    recount_running: false,
                    refusing_until_recount: false,
                    live_low_water: 0,
                    recounts_started: 0,
                    recounts_applied: 0,
                    fd_limit,
                    fd_ceiling: fd_ceiling(fd_limit),
                }),
                ended: tokio::sync::Notify::new(),
                shutting_down: AtomicBool::new(false),
            }),
        }
    }

    /// Admits a connection that was just accepted, or says why not (and
    /// counts the refusal); on refusal the caller closes the socket.
    pub fn try_admit(&self, protocol: Protocol) -> Result<ConnHandle, RejectReason> {
        let now = Instant::now();
        let mut state = lock(&self.inner.state);
        if self.inner.recount_wanted(&state, now) {
            // Claimed under the lock, so admissions meanwhile use the
            // estimate instead of all counting at once; counted on the
            // recount thread, never on this one (a runtime thread).
            state.fds_counted_at = now;
            state.recount_due = false;
            state.recount_running = true;
            state.live_low_water = state.live;
            state.recounts_started += 1;
            if !self.request_recount() {
                // No recount thread (it could not be started): count here,
                // as the only way the estimate stays true.
                drop(state);
                self.inner.recount();
                state = lock(&self.inner.state);
            }
        }
        if let Some(reason) = self.refusal(&state, protocol) {
            state.rejected[reason.index()] += 1;
            return Err(reason);
        }
        let slot = match state.free_slots.pop() {
            Some(slot) => slot,
            None => {
                state.slots.push(None);
                // More than 4 billion live connections cannot happen (each
                // holds an fd); saturate rather than panic.
                u32::try_from(state.slots.len() - 1).unwrap_or(u32::MAX)
            }
        };
        let id = state.next_id;
        state.next_id += 1;
        let entry = Arc::new(Entry {
            id,
            opened_ns: u64::try_from(now.duration_since(self.inner.epoch).as_nanos())
                .unwrap_or(u64::MAX),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            session_id: AtomicU64::new(NO_SESSION),
            slot,
            protocol,
            state: AtomicU8::new(ConnState::Idle as u8),
            command: AtomicU8::new(0),
            flags: AtomicU8::new(CloseReason::Client as u8),
            details: Mutex::new(Details {
                peer: PeerAddr::Unset,
                waker: None,
            }),
        });
        if let Some(place) = state.slots.get_mut(slot as usize) {
            *place = Some(entry.clone());
        }
        state.live += 1;
        let totals = &mut state.protocols[protocol.index()];
        totals.active += 1;
        totals.opened += 1;
        Ok(ConnHandle {
            inner: self.inner.clone(),
            entry,
        })
    }

    /// Why one more connection cannot be admitted now, if it cannot.
    fn refusal(&self, state: &State, protocol: Protocol) -> Option<RejectReason> {
        let cap = match protocol {
            Protocol::Beanstalk => self.inner.max_connections,
            Protocol::Http => Some(HTTP_CONNECTIONS_MAX),
        };
        if cap.is_some_and(|cap| state.protocols[protocol.index()].active >= cap) {
            return Some(RejectReason::MaxConnections);
        }
        // The accepted socket is already open: it counts as the +1.
        let ceiling = state
            .fd_ceiling
            .saturating_sub(protocol.fds_reserved_for_others());
        if state.fds_base + state.live + 1 > ceiling || state.refusing_until_recount {
            return Some(RejectReason::FdLimit);
        }
        None
    }

    /// Wakes the recount thread, starting it the first time; false if it
    /// cannot be started. Called with the state locked (the send is a
    /// queue push; starting the thread happens once).
    fn request_recount(&self) -> bool {
        let requests = match self.inner.recount_requests.get() {
            Some(requests) => requests,
            None => {
                let (requests, received) = mpsc::channel();
                let inner = Arc::downgrade(&self.inner);
                let started = std::thread::Builder::new()
                    .name("spool-fd-recount".to_string())
                    .spawn(move || recount_thread(inner, received));
                if let Err(e) = started {
                    tracing::warn!(error = %e, "cannot start the fd recount thread");
                    return false;
                }
                // Only admissions set it, under the state lock: it was empty.
                self.inner.recount_requests.get_or_init(|| requests)
            }
        };
        requests.send(()).is_ok()
    }

    /// Notes a failed `accept`. Running out of fds (`EMFILE`, `ENFILE`) is
    /// counted as a refusal for `fd_limit` and makes the next admission
    /// recount, refusing until that count is in; the answer says whether
    /// it was that. The caller still backs off before accepting again.
    pub fn record_accept_error(&self, error: &io::Error) -> bool {
        let out_of_fds = matches!(
            error.raw_os_error(),
            Some(libc::EMFILE) | Some(libc::ENFILE)
        );
        if out_of_fds {
            let mut state = lock(&self.inner.state);
            state.rejected[RejectReason::FdLimit.index()] += 1;
            if self.inner.recounts(&state) {
                state.recount_due = true;
                state.refusing_until_recount = true;
            }
        }
        out_of_fds
    }

    /// Every live connection, oldest first.
    pub fn list(&self) -> Vec<ConnectionInfo> {
        let entries: Vec<Arc<Entry>> = {
            let state = lock(&self.inner.state);
            state.slots.iter().flatten().cloned().collect()
        };
        self.infos(entries)
    }

    /// What `entries` show, ordered by id.
    fn infos(&self, entries: Vec<Arc<Entry>>) -> Vec<ConnectionInfo> {
        let now_ns = self.now_ns();
        let command_names = lock(&self.inner.command_names).clone();
        let mut infos: Vec<ConnectionInfo> = entries
            .iter()
            .map(|entry| {
                let peer = lock(&entry.details).peer.to_text();
                let command = usize::from(entry.command.load(Ordering::Relaxed))
                    .checked_sub(1)
                    .and_then(|index| command_names.get(index).copied());
                let session_id = entry.session_id.load(Ordering::Relaxed);
                ConnectionInfo {
                    id: entry.id,
                    protocol: entry.protocol,
                    peer,
                    age: Duration::from_nanos(now_ns.saturating_sub(entry.opened_ns)),
                    state: ConnState::from_index(entry.state.load(Ordering::Relaxed)),
                    command,
                    bytes_in: entry.bytes_in.load(Ordering::Relaxed),
                    bytes_out: entry.bytes_out.load(Ordering::Relaxed),
                    session_id: (session_id != NO_SESSION).then_some(session_id),
                }
            })
            .collect();
        infos.sort_by_key(|info| info.id);
        infos
    }

    /// Up to `limit` live connections with ids above `after`, oldest
    /// first, and whether more follow them. Costs one pass over the live
    /// entries (no sort of them all) and builds only the page.
    pub fn list_page(&self, after: u64, limit: usize) -> (Vec<ConnectionInfo>, bool) {
        let (entries, more) = {
            let state = lock(&self.inner.state);
            let mut later: Vec<&Arc<Entry>> = state
                .slots
                .iter()
                .flatten()
                .filter(|entry| entry.id > after)
                .collect();
            let more = later.len() > limit;
            if more {
                if limit > 0 {
                    later.select_nth_unstable_by_key(limit - 1, |entry| entry.id);
                }
                later.truncate(limit);
            }
            let entries: Vec<Arc<Entry>> = later.into_iter().cloned().collect();
            (entries, more)
        };
        (self.infos(entries), more)
    }

    /// Lifecycle figures per protocol and refusals.
    pub fn metrics(&self) -> ConnectionMetrics {
        let state = lock(&self.inner.state);
        let mut live_bytes = [(0u64, 0u64); Protocol::ALL.len()];
        for entry in state.slots.iter().flatten() {
            let bytes = &mut live_bytes[entry.protocol.index()];
            bytes.0 += entry.bytes_in.load(Ordering::Relaxed);
            bytes.1 += entry.bytes_out.load(Ordering::Relaxed);
        }
        let protocols = Protocol::ALL
            .iter()
            .map(|&protocol| {
                let totals = &state.protocols[protocol.index()];
                let (live_in, live_out) = live_bytes[protocol.index()];
                ProtocolMetrics {
                    protocol,
                    active: totals.active,
                    opened_total: totals.opened,
                    closed_total: CloseReason::ALL
                        .iter()
                        .map(|&reason| (reason, totals.closed[reason.index()]))
                        .collect(),
                    bytes_in_total: totals.bytes_in_closed + live_in,
                    bytes_out_total: totals.bytes_out_closed + live_out,
                    duration: totals.duration.clone(),
                }
            })
            .collect();
        ConnectionMetrics {
            protocols,
            rejected_total: RejectReason::ALL
                .iter()
                .map(|&reason| (reason, state.rejected[reason.index()]))
                .collect(),
            fd_limit: state.fd_limit,
            fds_estimate: state.fds_base + state.live,
            max_connections: self.inner.max_connections,
        }
    }

    /// Connections of `protocol` open now.
    pub fn active(&self, protocol: Protocol) -> u64 {
        lock(&self.inner.state).protocols[protocol.index()].active
    }

    /// The server is shutting down: connections the broker ends from now on
    /// are counted with reason `shutdown`.
    pub fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Every live connection's entry, taken out of the lock so that no
    /// waker runs under it.
    fn live_entries(&self) -> Vec<Arc<Entry>> {
        let state = lock(&self.inner.state);
        state.slots.iter().flatten().cloned().collect()
    }

    /// Wakes every live connection's task once, closing none: after
    /// `Broker::begin_shutdown`, so that each polls its session again and an
    /// idle one closes (a session need not watch the shutdown itself). The
    /// wakers stay registered for [`Connections::close_all`].
    pub fn wake_all(&self) {
        for entry in self.live_entries() {
            let waker = lock(&entry.details).waker.clone();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }

    /// Asks every live connection to close: each task is woken, closes its
    /// socket and ends with reason `shutdown`. Connections admitted later
    /// are not affected.
    pub fn close_all(&self) {
        for entry in self.live_entries() {
            entry.flags.fetch_or(CLOSE_REQUESTED, Ordering::SeqCst);
            let waker = lock(&entry.details).waker.take();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }

    /// Completes once no connection of `protocol` is open.
    pub async fn wait_until_none(&self, protocol: Protocol) {
        loop {
            let ended = self.inner.ended.notified();
            tokio::pin!(ended);
            // Registered before the check, so an end between the check and
            // the await still wakes us.
            ended.as_mut().enable();
            if self.active(protocol) == 0 {
                return;
            }
            ended.await;
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.inner.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// The recount thread: counts the open fds whenever an admission asks,
/// off the runtime threads; ends with the registry.
fn recount_thread(inner: Weak<Inner>, requests: mpsc::Receiver<()>) {
    while requests.recv().is_ok() {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.recount();
    }
}

impl Inner {
    /// Whether this registry counts fds at all: it has an fd limit to
    /// admit against, and counts rather than taking a given base.
    fn recounts(&self, state: &State) -> bool {
        self.counts_fds && (state.fd_limit.is_some() || self.fd_limit_is_the_process_limit)
    }

    fn recount_wanted(&self, state: &State, now: Instant) -> bool {
        if !self.recounts(state) || state.recount_running {
            return false;
        }
        if state.recount_due {
            return true;
        }
        let estimate = state.fds_base + state.live + 1;
        let near = estimate.saturating_mul(100)
            >= state.fd_ceiling.saturating_mul(FD_RECOUNT_FROM_PERCENT);
        near && now.duration_since(state.fds_counted_at) >= FD_RECOUNT_INTERVAL
    }

    /// Counts the open fds (outside the lock: it reads a directory) and
    /// resets the estimate's base from it. An admission has claimed the
    /// recount (`recount_running`); on failure the old estimate stays until
    /// the next interval.
    fn recount(&self) {
        let counted = self.count_fds.count();
        let limit = if self.fd_limit_is_the_process_limit {
            process::fd_limit().ok()
        } else {
            None
        };
        let mut state = lock(&self.state);
        if let Ok(open) = counted {
            let live_seen = state.live_low_water.min(state.live);
            state.fds_base = open.saturating_sub(live_seen);
        }
        if let Some(limit) = limit {
            state.fd_limit = Some(limit).filter(|&limit| limit != u64::MAX);
            state.fd_ceiling = fd_ceiling(state.fd_limit);
        }
        state.recount_running = false;
        state.refusing_until_recount = false;
        state.recounts_applied += 1;
    }

    /// The byte an entry stores for `command` (0 when the list is full).
    fn command_index(&self, command: &'static str) -> u8 {
        let mut names = lock(&self.command_names);
        let known = names
            .iter()
            .position(|name| std::ptr::eq(*name, command) || *name == command);
        let index = match known {
            Some(index) => index,
            None if names.len() < COMMAND_NAMES_MAX => {
                names.push(command);
                names.len() - 1
            }
            None => return 0,
        };
        u8::try_from(index + 1).unwrap_or(0)
    }
}

/// One admitted connection's record. Dropping it ends the record: the
/// connection counts as closed with the reason set by
/// [`ConnHandle::close_reason`], or `client` when none was set.
#[derive(Debug)]
pub struct ConnHandle {
    inner: Arc<Inner>,
    entry: Arc<Entry>,
}

impl ConnHandle {
    /// The connection's id in [`Connections::list`].
    pub fn id(&self) -> u64 {
        self.entry.id
    }

    pub fn set_peer(&self, peer: String) {
        lock(&self.entry.details).peer = PeerAddr::new(peer);
    }

    /// [`ConnHandle::set_peer`] for a socket address: stored as it is,
    /// without printing and parsing it.
    pub fn set_peer_addr(&self, peer: SocketAddr) {
        lock(&self.entry.details).peer = PeerAddr::Socket(peer);
    }

    pub fn set_session_id(&self, session_id: u64) {
        self.entry.session_id.store(session_id, Ordering::Relaxed);
    }

    pub fn add_bytes_in(&self, bytes: usize) {
        self.entry
            .bytes_in
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn add_bytes_out(&self, bytes: usize) {
        self.entry
            .bytes_out
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn set_state(&self, state: ConnState) {
        self.entry.state.store(state as u8, Ordering::Relaxed);
    }

    /// The command being executed (e.g. `"reserve"`), shown until the next.
    /// Takes a short global lock: callers that poll often skip it when the
    /// command has not changed.
    pub fn set_command(&self, command: &'static str) {
        let index = self.inner.command_index(command);
        self.entry.command.store(index, Ordering::Relaxed);
    }

    /// Why the connection is ending; the last call before the drop wins.
    pub fn close_reason(&self, reason: CloseReason) {
        // Keeps the close-requested bit that close_all may set meanwhile.
        let _ = self
            .entry
            .flags
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |flags| {
                Some((flags & CLOSE_REQUESTED) | reason.index() as u8)
            });
    }

    /// True once [`Connections::close_all`] asked this connection to close.
    pub fn is_close_requested(&self) -> bool {
        self.entry.flags.load(Ordering::SeqCst) & CLOSE_REQUESTED != 0
    }

    /// `Ready` once [`Connections::close_all`] asked this connection to
    /// close; otherwise makes sure the task is woken when it does.
    ///
    /// `registered` is the caller's record of the waker it registered: the
    /// entry is locked only when the task's waker is not the one registered
    /// (the first poll, or a task whose waker changed), so a task polled
    /// over and over costs an atomic load and a `will_wake` here.
    pub fn poll_close_requested(
        &self,
        cx: &mut Context<'_>,
        registered: &mut Option<Waker>,
    ) -> Poll<()> {
        if self.is_close_requested() {
            return Poll::Ready(());
        }
        if registered
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()))
        {
            // close_all takes the registered waker only after setting the
            // flag, which the load above would have seen.
            return Poll::Pending;
        }
        let waker = cx.waker().clone();
        lock(&self.entry.details).waker = Some(waker.clone());
        *registered = Some(waker);
        // Checked again after registering: close_all sets the flag before
        // it takes the waker, so one of the two sees the other.
        if self.is_close_requested() {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// Completes once [`Connections::close_all`] asked this connection to
    /// close (for front doors that select over futures).
    pub async fn close_requested(&self) {
        let mut registered = None;
        poll_fn(|cx| self.poll_close_requested(cx, &mut registered)).await
    }
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        let entry = &self.entry;
        let mut reason =
            CloseReason::from_index(entry.flags.load(Ordering::SeqCst) & !CLOSE_REQUESTED);
        if reason == CloseReason::Server && self.inner.shutting_down.load(Ordering::SeqCst) {
            reason = CloseReason::Shutdown;
        }
        let opened = Duration::from_nanos(entry.opened_ns);
        let age = self.inner.epoch.elapsed().saturating_sub(opened);
        {
            let mut state = lock(&self.inner.state);
            if let Some(place) = state.slots.get_mut(entry.slot as usize) {
                *place = None;
                state.free_slots.push(entry.slot);
            }
            state.live = state.live.saturating_sub(1);
            state.live_low_water = state.live_low_water.min(state.live);
            let totals = &mut state.protocols[entry.protocol.index()];
            totals.active = totals.active.saturating_sub(1);
            totals.closed[reason.index()] += 1;
            totals.bytes_in_closed += entry.bytes_in.load(Ordering::Relaxed);
            totals.bytes_out_closed += entry.bytes_out.load(Ordering::Relaxed);
            totals.duration.observe(age);
        }
        self.inner.ended.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_indexes_are_positions_in_all() {
        // The per-reason and per-protocol arrays are sized by `ALL` and
        // indexed by `index()`: each must be its position.
        for (i, p) in Protocol::ALL.iter().enumerate() {
            assert_eq!(p.index(), i);
        }
        for (i, r) in RejectReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        for (i, r) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            assert_eq!(CloseReason::from_index(i as u8), *r);
        }
    }

    #[test]
    fn entry_stays_small() {
        // The budget per connection is about 150 bytes: the entry with the
        // Arc's two counters fits malloc's 128-byte chunk (with its 8-byte
        // header), plus the slab slot; the handle adds 16 to the task.
        assert!(
            std::mem::size_of::<Entry>() + 16 + 8 <= 128,
            "{}",
            std::mem::size_of::<Entry>()
        );
        assert_eq!(std::mem::size_of::<ConnHandle>(), 16);
    }

    #[test]
    fn peers_and_commands_read_back_as_given() {
        let registry = Connections::with_fd_limit(None, None);
        let peers = ["127.0.0.1:4000", "[::1]:5000", "unix", ""];
        let handles: Vec<ConnHandle> = peers
            .iter()
            .map(|peer| {
                let handle = registry.try_admit(Protocol::Http).unwrap();
                handle.set_peer(peer.to_string());
                handle
            })
            .collect();
        handles[0].set_command("GET /metrics");
        handles[1].set_command("GET /metrics");
        handles[2].set_command("reserve");
        let list = registry.list();
        let shown: Vec<&str> = list.iter().map(|info| info.peer.as_str()).collect();
        assert_eq!(shown, peers);
        let commands: Vec<Option<&str>> = list.iter().map(|info| info.command).collect();
        assert_eq!(
            commands,
            [
                Some("GET /metrics"),
                Some("GET /metrics"),
                Some("reserve"),
                None
            ]
        );
        handles[3].close_reason(CloseReason::Server);
        registry.close_all();
        assert!(handles[3].is_close_requested());
        drop(handles);
        let metrics = registry.metrics();
        let http = metrics.protocol(Protocol::Http).unwrap();
        // The close request does not change the reason each one set.
        assert_eq!(http.closed(CloseReason::Server), 1);
        assert_eq!(http.closed(CloseReason::Client), 3);
    }

    #[test]
    fn max_connections_refuses_and_counts() {
        let registry = Connections::with_fd_limit(Some(2), None);
        let a = registry.try_admit(Protocol::Beanstalk).unwrap();
        let _b = registry.try_admit(Protocol::Beanstalk).unwrap();
        // HTTP connections neither count against the cap nor are refused by it.
        let _http = registry.try_admit(Protocol::Http).unwrap();
        assert_eq!(
            registry.try_admit(Protocol::Beanstalk).unwrap_err(),
            RejectReason::MaxConnections
        );
        drop(a);
        let _c = registry.try_admit(Protocol::Beanstalk).unwrap();
        let metrics = registry.metrics();
        assert_eq!(metrics.rejected(RejectReason::MaxConnections), 1);
        assert_eq!(metrics.rejected(RejectReason::FdLimit), 0);
        let beanstalk = metrics.protocol(Protocol::Beanstalk).unwrap();
        assert_eq!(beanstalk.active, 2);
        assert_eq!(beanstalk.opened_total, 3);
        assert_eq!(beanstalk.closed(CloseReason::Client), 1);
        assert_eq!(beanstalk.duration.count(), 1);
        assert_eq!(metrics.protocol(Protocol::Http).unwrap().active, 1);
    }

    #[test]
    fn http_has_its_own_cap() {
        let registry = Connections::with_fd_limit(Some(1), None);
        let _worker = registry.try_admit(Protocol::Beanstalk).unwrap();
        let (http, refused) = admit_until_refused(&registry, Protocol::Http);
        assert_eq!(refused, Some(RejectReason::MaxConnections));
        assert_eq!(http.len() as u64, HTTP_CONNECTIONS_MAX);
        drop(http);
        let _probe = registry.try_admit(Protocol::Http).unwrap();
        assert_eq!(registry.metrics().rejected(RejectReason::MaxConnections), 1);
    }

    /// Admits connections of `protocol` until one is refused (at most
    /// a few hundred); returns them and the refusal.
    fn admit_until_refused(
        registry: &Connections,
        protocol: Protocol,
    ) -> (Vec<ConnHandle>, Option<RejectReason>) {
        let mut admitted = Vec::new();
        for _ in 0..=HTTP_CONNECTIONS_MAX.max(100) {
            match registry.try_admit(protocol) {
                Ok(handle) => admitted.push(handle),
                Err(reason) => return (admitted, Some(reason)),
            }
        }
        (admitted, None)
    }

    #[test]
    fn fd_ceiling_refuses_with_headroom_and_keeps_a_reserve_for_http() {
        // 10 fds open besides connections, and a limit that leaves room for
        // exactly 3 beanstalk connections, and then the HTTP reserve.
        let base = 10;
        let limit = base + FD_HEADROOM + HTTP_FD_RESERVE + 3;
        let registry = Connections::with_fd_base(limit, base);
        let (beanstalk, refused) = admit_until_refused(&registry, Protocol::Beanstalk);
        assert_eq!(refused, Some(RejectReason::FdLimit));
        assert_eq!(beanstalk.len(), 3);
        let (http, refused) = admit_until_refused(&registry, Protocol::Http);
        assert_eq!(refused, Some(RejectReason::FdLimit));
        assert_eq!(http.len() as u64, HTTP_FD_RESERVE);
        assert_eq!(registry.metrics().rejected(RejectReason::FdLimit), 2);
        assert_eq!(registry.metrics().fds_estimate, limit - FD_HEADROOM);
        // Closed connections make room again.
        drop(http);
        let _probe = registry.try_admit(Protocol::Http).unwrap();
        drop(beanstalk);
    }

    /// A stand-in for counting `/proc/self/fd`: each count says which
    /// thread it ran on, then waits for the test to give the number it
    /// finds.
    struct HeldCount {
        counted_on: mpsc::Receiver<std::thread::ThreadId>,
        finds: mpsc::Sender<u64>,
    }

    /// A registry with `fds_base` fds open besides its connections, an fd
    /// limit with room for `room` beanstalkd connections above them, and
    /// its recounts held by the test; its first admission recounts.
    fn registry_with_held_recounts(fds_base: u64, room: u64) -> (Connections, HeldCount) {
        let (report, counted_on) = mpsc::channel();
        let (finds, found) = mpsc::channel();
        let (report, found) = (Mutex::new(report), Mutex::new(found));
        let limit = fds_base + FD_HEADROOM + HTTP_FD_RESERVE + room;
        let registry = Connections::with_fd_counter(limit, fds_base, move || {
            let _ = lock(&report).send(std::thread::current().id());
            // Bounded, so that a count made on the admitting thread (which
            // the test then holds up) fails the test instead of hanging it.
            lock(&found)
                .recv_timeout(Duration::from_secs(60))
                .map_err(|_| io::Error::other("the test gave no count"))
        });
        (registry, HeldCount { counted_on, finds })
    }

    impl Connections {
        /// (recounts claimed, recounts applied).
        fn recounts(&self) -> (u64, u64) {
            let state = lock(&self.inner.state);
            (state.recounts_started, state.recounts_applied)
        }

        /// Waits (bounded) until `applied` recounts are in the estimate.
        fn wait_for_recounts_applied(&self, applied: u64) {
            let deadline = Instant::now() + Duration::from_secs(60);
            while self.recounts().1 < applied {
                assert!(Instant::now() < deadline, "no recount applied");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    #[test]
    fn a_recount_runs_off_the_admitting_thread_which_goes_by_the_estimate_meanwhile() {
        let base = 10;
        let (registry, held) = registry_with_held_recounts(base, 5);
        // Admitted by the estimate while its recount waits on the test,
        // which would block here if the admission counted itself.
        let first = registry.try_admit(Protocol::Beanstalk).unwrap();
        let counted_on = held.counted_on.recv().unwrap();
        assert_ne!(counted_on, std::thread::current().id());
        // While it counts, admissions go by the estimate and start no other.
        let second = registry.try_admit(Protocol::Beanstalk).unwrap();
        assert_eq!(registry.recounts(), (1, 0));
        assert_eq!(registry.metrics().fds_estimate, base + 2);
        // The count finds 100 fds opened outside the registry: once it is
        // in, the estimate has them, and the ceiling refuses.
        held.finds.send(base + 2 + 100).unwrap();
        registry.wait_for_recounts_applied(1);
        // The count may not have seen connections admitted while it ran:
        // it is taken to have seen the fewest that were live (none here),
        // so the base errs high, never low.
        assert_eq!(registry.metrics().fds_estimate, base + 102 + 2);
        assert_eq!(
            registry.try_admit(Protocol::Http).unwrap_err(),
            RejectReason::FdLimit
        );
        // Within the interval, no admission recounts again.
        assert_eq!(registry.recounts(), (1, 1));
        drop((first, second));
    }

    #[test]
    fn out_of_fds_refuses_until_the_recount_is_in() {
        let base = 10;
        let (registry, held) = registry_with_held_recounts(base, 5);
        let first = registry.try_admit(Protocol::Beanstalk).unwrap();
        held.counted_on.recv().unwrap();
        held.finds.send(base + 1).unwrap();
        registry.wait_for_recounts_applied(1);
        // accept failed for want of fds: the estimate (room for 4 more) is
        // wrong, so the next admissions are refused, and the first starts
        // a recount.
        assert!(registry.record_accept_error(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert_eq!(
            registry.try_admit(Protocol::Beanstalk).unwrap_err(),
            RejectReason::FdLimit
        );
        let counted_on = held.counted_on.recv().unwrap();
        assert_ne!(counted_on, std::thread::current().id());
        assert_eq!(
            registry.try_admit(Protocol::Http).unwrap_err(),
            RejectReason::FdLimit
        );
        assert_eq!(registry.recounts(), (2, 1));
        // The count finds the fds that ran out freed again: admitted.
        held.finds.send(base + 1).unwrap();
        registry.wait_for_recounts_applied(2);
        let _second = registry.try_admit(Protocol::Beanstalk).unwrap();
        assert_eq!(registry.metrics().rejected(RejectReason::FdLimit), 3);
        drop(first);
    }

    #[test]
    fn accept_out_of_fds_counts_as_fd_limit() {
        let registry = Connections::with_fd_limit(None, None);
        assert!(registry.record_accept_error(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(!registry.record_accept_error(&io::Error::from_raw_os_error(libc::ECONNABORTED)));
        assert_eq!(registry.metrics().rejected(RejectReason::FdLimit), 1);
    }

    #[test]
    fn list_and_metrics_show_what_handles_record() {
        let registry = Connections::with_fd_limit(None, None);
        let handle = registry.try_admit(Protocol::Beanstalk).unwrap();
        handle.set_peer("127.0.0.1:4000".to_string());
        handle.set_session_id(7);
        handle.set_command("reserve");
        handle.set_state(ConnState::Reserving);
        handle.add_bytes_in(9);
        handle.add_bytes_out(20);
        let list = registry.list();
        assert_eq!(list.len(), 1);
        let info = &list[0];
        assert_eq!(info.id, handle.id());
        assert_eq!(info.peer, "127.0.0.1:4000");
        assert_eq!(info.session_id, Some(7));
        assert_eq!(info.command, Some("reserve"));
        assert_eq!(info.state, ConnState::Reserving);
        assert_eq!((info.bytes_in, info.bytes_out), (9, 20));
        let json = serde_json::to_value(info).unwrap();
        assert_eq!(json["state"], "reserving");
        assert_eq!(json["protocol"], "beanstalk");
        assert!(json["age_seconds"].is_number());
        handle.close_reason(CloseReason::Quit);
        drop(handle);
        assert!(registry.list().is_empty());
        let metrics = registry.metrics();
        let beanstalk = metrics.protocol(Protocol::Beanstalk).unwrap();
        assert_eq!(beanstalk.closed(CloseReason::Quit), 1);
        assert_eq!(
            (beanstalk.bytes_in_total, beanstalk.bytes_out_total),
            (9, 20)
        );
    }

    #[test]
    fn pages_list_every_connection_once_in_order() {
        let registry = Connections::with_fd_limit(None, None);
        let mut handles: Vec<ConnHandle> = (0..10)
            .map(|_| registry.try_admit(Protocol::Beanstalk).unwrap())
            .collect();
        // A freed slot is reused by a later connection: slot order is not
        // id order.
        handles.remove(2);
        handles.push(registry.try_admit(Protocol::Http).unwrap());
        let all: Vec<u64> = registry.list().iter().map(|info| info.id).collect();
        assert_eq!(all.len(), 10);
        for limit in 1..=11 {
            let (mut seen, mut after) = (Vec::new(), 0);
            loop {
                let (page, more) = registry.list_page(after, limit);
                assert!(page.len() <= limit);
                seen.extend(page.iter().map(|info| info.id));
                match page.last() {
                    Some(last) if more => after = last.id,
                    _ => {
                        assert!(!more);
                        break;
                    }
                }
            }
            assert_eq!(seen, all, "pages of {limit}");
        }
        let (page, more) = registry.list_page(u64::MAX, 5);
        assert!(page.is_empty() && !more);
        drop(handles);
    }

    #[test]
    fn histogram_buckets_are_upper_inclusive() {
        let mut histogram = DurationHistogram::default();
        histogram.observe(Duration::from_millis(10));
        histogram.observe(Duration::from_secs(2));
        histogram.observe(Duration::from_secs(200_000));
        let cumulative: Vec<(f64, u64)> = histogram.cumulative().collect();
        assert_eq!(cumulative[0], (0.01, 1));
        assert_eq!(cumulative.last().copied(), Some((86400.0, 2)));
        assert_eq!(histogram.count(), 3);
        assert_eq!(histogram.bucket_counts().last().copied(), Some(1));
    }

    /// A waker that counts its wakes.
    struct CountingWaker(AtomicU64);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn close_all_wakes_the_latest_waker_a_task_polled_with() {
        let registry = Connections::with_fd_limit(None, None);
        let handle = registry.try_admit(Protocol::Beanstalk).unwrap();
        let first = Arc::new(CountingWaker(AtomicU64::new(0)));
        let second = Arc::new(CountingWaker(AtomicU64::new(0)));
        let (first_waker, second_waker) = (Waker::from(first.clone()), Waker::from(second.clone()));
        let mut registered = None;
        for waker in [&first_waker, &first_waker, &second_waker, &second_waker] {
            let mut cx = Context::from_waker(waker);
            assert!(handle
                .poll_close_requested(&mut cx, &mut registered)
                .is_pending());
        }
        registry.close_all();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
        let mut cx = Context::from_waker(&second_waker);
        assert!(handle
            .poll_close_requested(&mut cx, &mut registered)
            .is_ready());
    }

    #[test]
    fn wake_all_wakes_each_task_and_leaves_it_registered_for_close_all() {
        let registry = Connections::with_fd_limit(None, None);
        let handle = registry.try_admit(Protocol::Beanstalk).unwrap();
        let counted = Arc::new(CountingWaker(AtomicU64::new(0)));
        let waker = Waker::from(counted.clone());
        let mut cx = Context::from_waker(&waker);
        let mut registered = None;
        assert!(handle
            .poll_close_requested(&mut cx, &mut registered)
            .is_pending());
        registry.wake_all();
        assert_eq!(counted.0.load(Ordering::SeqCst), 1);
        // Polled again after the wake: not asked to close, nothing to
        // register anew, and close_all still finds the waker.
        assert!(handle
            .poll_close_requested(&mut cx, &mut registered)
            .is_pending());
        registry.close_all();
        assert_eq!(counted.0.load(Ordering::SeqCst), 2);
        assert!(handle
            .poll_close_requested(&mut cx, &mut registered)
            .is_ready());
    }

    #[test]
    fn close_all_wakes_and_wait_until_none_completes() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let registry = Connections::with_fd_limit(None, None);
            let mut tasks = Vec::new();
            for _ in 0..3 {
                let handle = registry.try_admit(Protocol::Http).unwrap();
                tasks.push(tokio::spawn(async move {
                    handle.close_requested().await;
                    handle.close_reason(CloseReason::Shutdown);
                }));
            }
            tokio::task::yield_now().await;
            registry.close_all();
            tokio::time::timeout(
                Duration::from_secs(10),
                registry.wait_until_none(Protocol::Http),
            )
            .await
            .unwrap();
            for task in tasks {
                task.await.unwrap();
            }
            let metrics = registry.metrics();
            let http = metrics.protocol(Protocol::Http).unwrap();
            assert_eq!(http.closed(CloseReason::Shutdown), 3);
            assert_eq!(http.active, 0);
        });
    }
}
