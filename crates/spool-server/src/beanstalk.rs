//! The beanstalkd front door: a TCP or unix-socket listener and one task per
//! connection that moves bytes between the socket and a broker [`Session`].
//!
//! A connection task owns no job state. It decodes requests with the shared
//! sans-IO decoder, submits them in batches (everything one read produced),
//! and writes the replies in request order; malformed lines are answered
//! here, in their place in that order.
//!
//! Memory per connection is bounded and an idle connection holds no buffer:
//! bytes are read into a per-thread scratch buffer and decoded there; only a
//! half-received request is copied into a buffer of the connection's own,
//! which is freed as soon as it is decoded. The write buffer is freed once
//! written. At most `PIPELINED_REQUESTS_MAX` requests wait for replies, and
//! replies are encoded only while fewer than `WRITE_BUFFER_MAX_BYTES` wait
//! to be written; past either bound the task stops reading from the client.
//! The task polls its mailbox and socket by hand rather than through
//! `select!`, so a waiting connection stores no futures.
//!
//! Every accepted connection is admitted through the [`Connections`]
//! registry (refused ones are closed at once) and keeps its record there up
//! to date: bytes, state, current command. A timer, allocated only while it
//! runs, guards against clients that hold a connection hostage (the
//! slowloris attack). A request has a deadline that bytes trickling in do
//! not push back: a command line must be complete within `request_timeout`
//! of its first byte, and a body within `request_timeout` of the start of
//! its request plus its length at [`REQUEST_BODY_MIN_BYTES_PER_SEC`], so a
//! large body on a slow link gets through but a client sending a byte now
//! and then does not hold the connection. Replies that wait unread for
//! `write_timeout` (restarted by every byte the client takes) close it too.
//! A connection idle between commands, or blocked in `reserve`, has no
//! timer and is never closed for idling; TCP keepalive finds peers that
//! vanished.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::stream::{FuturesUnordered, Stream};
use socket2::{SockRef, TcpKeepalive};
use spool_proto::limits::{LINE_MAX_BYTES, PIPELINED_REQUESTS_MAX, WRITE_BUFFER_MAX_BYTES};
use spool_proto::{encode_response, ProtocolError, Request, RequestDecoder, Response};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::task::Unconstrained;
use tokio::time::{Instant, Sleep};

use crate::connections::{CloseReason, ConnHandle, ConnState, Connections, Protocol};
use crate::limits::{
    ACCEPTS_PER_TURN_MAX, ACCEPT_ERROR_BACKOFF, CONNECTION_POLLS_PER_TURN_MAX, POLL_ROUNDS_MAX,
    READ_CHUNK_BYTES, REQUEST_BODY_MIN_BYTES_PER_SEC, REQUEST_TIMEOUT_DEFAULT, TCP_KEEPALIVE_IDLE,
    TCP_KEEPALIVE_INTERVAL, WRITE_SCRATCH_BYTES, WRITE_TIMEOUT_DEFAULT,
};
use spool_broker::{Broker, Peer, Session};

/// Kept here too, where `spool serve` binds the listener.
pub use crate::limits::LISTEN_BACKLOG;

thread_local! {
    /// Where reads land before decoding. Shared by every connection on the
    /// thread (a connection never holds it across an await), so an idle or
    /// fully decoded connection owns no read buffer.
    static SCRATCH: RefCell<BytesMut> = RefCell::new(BytesMut::new());

    /// Where replies are encoded before they are written, shared the same
    /// way: a connection keeps only what its socket did not take.
    static WRITE_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

#[derive(Debug, Clone)]
pub struct BeanstalkConfig {
    pub max_job_size: u32,
    /// A command line not complete this long after its first byte, or a
    /// body not complete this long after the start of its request plus its
    /// length at [`REQUEST_BODY_MIN_BYTES_PER_SEC`], closes the connection
    /// (reason `request_timeout`).
    pub request_timeout: Duration,
    /// A connection whose replies wait unwritten, the client not reading,
    /// for this long is closed (reason `write_timeout`).
    pub write_timeout: Duration,
}

impl BeanstalkConfig {
    /// The given job size limit and the default timeouts.
    pub fn new(max_job_size: u32) -> BeanstalkConfig {
        BeanstalkConfig {
            max_job_size,
            request_timeout: REQUEST_TIMEOUT_DEFAULT,
            write_timeout: WRITE_TIMEOUT_DEFAULT,
        }
    }
}

/// Where the beanstalkd protocol is served.
#[derive(Debug)]
pub enum BeanstalkListener {
    Tcp(TcpListener),
    /// The socket file is removed when the listener is dropped.
    Unix(UnixListener, PathBuf),
}

impl Drop for BeanstalkListener {
    fn drop(&mut self) {
        if let BeanstalkListener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl BeanstalkListener {
    pub fn local_addr(&self) -> String {
        match self {
            BeanstalkListener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            BeanstalkListener::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }
}

/// Accepts connections until `shutdown` completes, admitting each through
/// `connections`; then drops the listener and returns. Connections keep
/// running: the caller ends them through the broker (drain) and
/// [`Connections::close_all`].
///
/// Each wake-up drains the listen queue: it accepts until the kernel has
/// no more (or [`ACCEPTS_PER_TURN_MAX`], then yields to the established
/// connections and comes back), so a burst of reconnecting clients is
/// taken in a few turns instead of one connection per event-loop turn,
/// and the queue does not overflow. The TCP options every connection gets
/// are set once on the listener, which accepted sockets inherit on Linux,
/// rather than with four `setsockopt` calls per connection.
///
/// Every connection's future lives in one [`ConnectionSet`] polled by this
/// task, not in a task of its own: tokio aligns a task to 128 bytes, and
/// glibc's `memalign` spends about 455 bytes of the heap on each such
/// 256-byte task, more than half of what beanstalkd spends on a whole
/// connection. A set's entry is an ordinary allocation of about 220
/// bytes with its own waker, so a connection is still polled only when
/// its socket, mailbox or timer wakes it.
pub async fn serve<B: Broker>(
    listener: BeanstalkListener,
    broker: B,
    config: BeanstalkConfig,
    connections: Connections,
    shutdown: impl Future<Output = ()>,
) {
    // The listener and its connections run in a task of their own, not in
    // the caller's future: `spool serve` awaits this in the runtime's
    // `block_on`, whose future tokio polls only after a pass through the
    // I/O driver, which would cost an `epoll_wait` per wake-up of a
    // connection.
    let (stop, stop_requested) = tokio::sync::oneshot::channel::<()>();
    let (stopped, listener_closed) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(run_listener(
        listener,
        broker,
        Arc::new(config),
        connections,
        stop_requested,
        stopped,
    ));
    shutdown.await;
    let _ = stop.send(());
    // Returns once the listener is closed (or its task is gone).
    let _ = listener_closed.await;
}

/// The listener's task: accepts and drives connections until told to
/// stop (or the sender is dropped), then closes the listener, says so on
/// `stopped`, and drives the connections left until they end.
async fn run_listener<B: Broker>(
    listener: BeanstalkListener,
    broker: B,
    config: Arc<BeanstalkConfig>,
    connections: Connections,
    mut stop_requested: tokio::sync::oneshot::Receiver<()>,
    stopped: tokio::sync::oneshot::Sender<()>,
) {
    let options_per_connection = match &listener {
        BeanstalkListener::Tcp(l) => !set_inherited_options(l),
        BeanstalkListener::Unix(..) => false,
    };
    let mut open = ConnectionSet::<B::Session>::default();
    let mut backoff: Option<Pin<Box<Sleep>>> = None;
    poll_fn(|cx| {
        if Pin::new(&mut stop_requested).poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let mut more = false;
        if backoff
            .as_mut()
            .is_some_and(|sleep| sleep.as_mut().poll(cx).is_pending())
        {
            // Still backing off after an accept error.
        } else {
            backoff = None;
            match accept_turn(
                &listener,
                cx,
                options_per_connection,
                &broker,
                &config,
                &connections,
                &mut open,
            ) {
                AcceptTurn::Drained => {}
                AcceptTurn::More => more = true,
                AcceptTurn::Failed(e) => {
                    // Counted when it is fd exhaustion; either way back
                    // off instead of spinning on an error that persists.
                    if connections.record_accept_error(&e) {
                        tracing::debug!(error = %e, "accept failed: out of file descriptors");
                    } else {
                        tracing::warn!(error = %e, "accept failed");
                    }
                    let mut sleep = Box::pin(tokio::time::sleep(ACCEPT_ERROR_BACKOFF));
                    // Polled once so that its end wakes this task.
                    more = sleep.as_mut().poll(cx).is_ready();
                    backoff = Some(sleep);
                }
            }
        }
        open.poll_connections(cx);
        if more {
            // Let the other tasks (the engine's) run, then continue.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    })
    .await;
    drop(listener);
    let _ = stopped.send(());
    // The connections outlive the listener, until the drain ends them.
    poll_fn(|cx| {
        open.poll_connections(cx);
        if open.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
}

/// What one turn of accepting ended with.
enum AcceptTurn {
    /// The listen queue is empty (the listener's waker is registered), or
    /// tokio's cooperative budget ran out (the task is woken).
    Drained,
    /// [`ACCEPTS_PER_TURN_MAX`] taken: come back after the others ran.
    More,
    Failed(io::Error),
}

fn accept_turn<B: Broker>(
    listener: &BeanstalkListener,
    cx: &mut Context<'_>,
    options_per_connection: bool,
    broker: &B,
    config: &Arc<BeanstalkConfig>,
    connections: &Connections,
    open: &mut ConnectionSet<B::Session>,
) -> AcceptTurn {
    for _ in 0..ACCEPTS_PER_TURN_MAX {
        match listener.poll_accept(cx) {
            Poll::Ready(Ok(accepted)) => admit(
                accepted,
                options_per_connection,
                broker,
                config,
                connections,
                open,
            ),
            Poll::Ready(Err(e)) => return AcceptTurn::Failed(e),
            Poll::Pending => return AcceptTurn::Drained,
        }
    }
    AcceptTurn::More
}

/// The open connections of one listener, each polled when its own waker
/// fires (`FuturesUnordered` gives every entry one), by the task that
/// polls the set.
///
/// Each connection is polled outside tokio's cooperative budget
/// (`unconstrained`): the budget is per task, and one shared by every
/// connection and the accepts runs out after 128 socket operations, after
/// which every other connection's poll would be turned away until the
/// next turn, stalling them behind a burst of accepts. A turn is bounded
/// by [`CONNECTION_POLLS_PER_TURN_MAX`] connection polls instead ([`SetEntry`]).
struct ConnectionSet<Sess> {
    tcp: FuturesUnordered<SetEntry<ConnectionTask<TcpStream, Sess>>>,
    unix: FuturesUnordered<SetEntry<ConnectionTask<UnixStream, Sess>>>,
}

thread_local! {
    /// Connections polled in the current turn of the set being polled on
    /// this thread (reset by `ConnectionSet::poll_connections`).
    static TURN_POLLS: Cell<usize> = const { Cell::new(0) };
}

/// A connection as an entry of a [`ConnectionSet`]: polled outside tokio's
/// budget, and not at all once the turn has polled
/// [`CONNECTION_POLLS_PER_TURN_MAX`] connections: it then wakes itself,
/// which makes the set yield (it yields after two such entries) and come
/// back after the other tasks ran.
struct SetEntry<F>(Unconstrained<F>);

impl<F: Future<Output = ()> + Unpin> Future for SetEntry<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let polls = TURN_POLLS.get();
        if polls >= CONNECTION_POLLS_PER_TURN_MAX {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        TURN_POLLS.set(polls + 1);
        Pin::new(&mut self.get_mut().0).poll(cx)
    }
}

impl<Sess> Default for ConnectionSet<Sess> {
    fn default() -> Self {
        ConnectionSet {
            tcp: FuturesUnordered::new(),
            unix: FuturesUnordered::new(),
        }
    }
}

impl<Sess: Session> ConnectionSet<Sess> {
    fn is_empty(&self) -> bool {
        self.tcp.is_empty() && self.unix.is_empty()
    }

    /// Polls the connections that were woken, until none is left to poll
    /// or the set yields so that other tasks get a turn (it has then woken
    /// the task to come back).
    fn poll_connections(&mut self, cx: &mut Context<'_>) {
        TURN_POLLS.set(0);
        poll_set(&mut self.tcp, cx);
        poll_set(&mut self.unix, cx);
    }
}

/// Polls `set` until it has nothing ready or yields.
fn poll_set<F: Future<Output = ()> + Unpin>(set: &mut FuturesUnordered<F>, cx: &mut Context<'_>) {
    // Each `Ready(Some)` is a connection that ended; the set bounds the
    // polls of one call itself (each woken entry at most once, then it
    // yields).
    while let Poll::Ready(Some(())) = Pin::new(&mut *set).poll_next(cx) {}
}

/// Sets on the listener the options every client connection gets: no
/// Nagle (replies are small and latency matters more than packet count)
/// and TCP keepalive at [`TCP_KEEPALIVE_IDLE`]. Says whether accepted
/// sockets inherit them, which Linux guarantees (an accepted socket is a
/// clone of its listener); elsewhere, or if setting them failed, they are
/// set on each connection.
fn set_inherited_options(listener: &TcpListener) -> bool {
    let socket = SockRef::from(listener);
    let set =
        socket.set_tcp_nodelay(true).is_ok() && socket.set_tcp_keepalive(&keepalive()).is_ok();
    set && cfg!(target_os = "linux")
}

fn keepalive() -> TcpKeepalive {
    TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL)
}

/// Admits one accepted connection into `open`, or closes it.
fn admit<B: Broker>(
    accepted: Accepted,
    options_per_connection: bool,
    broker: &B,
    config: &Arc<BeanstalkConfig>,
    connections: &Connections,
    open: &mut ConnectionSet<B::Session>,
) {
    let handle = match connections.try_admit(Protocol::Beanstalk) {
        Ok(handle) => handle,
        Err(reason) => {
            // Dropping the socket closes it; the refusal is counted.
            tracing::debug!(%reason, "connection refused");
            return;
        }
    };
    match accepted {
        Accepted::Tcp(stream, addr) => {
            if options_per_connection {
                let _ = stream.set_nodelay(true);
                if let Err(e) = SockRef::from(&stream).set_tcp_keepalive(&keepalive()) {
                    tracing::debug!(error = %e, "cannot enable TCP keepalive");
                }
            }
            handle.set_peer_addr(addr);
            let peer = Peer {
                addr: addr.to_string(),
            };
            if let Some(task) = start_connection(stream, peer, handle, broker, config) {
                open.tcp.push(SetEntry(tokio::task::unconstrained(task)));
            }
        }
        Accepted::Unix(stream) => {
            let peer = Peer {
                addr: "unix".to_string(),
            };
            handle.set_peer(peer.addr.clone());
            if let Some(task) = start_connection(stream, peer, handle, broker, config) {
                open.unix.push(SetEntry(tokio::task::unconstrained(task)));
            }
        }
    }
}

enum Accepted {
    Tcp(TcpStream, SocketAddr),
    Unix(UnixStream),
}

impl BeanstalkListener {
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Accepted>> {
        match self {
            BeanstalkListener::Tcp(l) => l
                .poll_accept(cx)
                .map_ok(|(stream, addr)| Accepted::Tcp(stream, addr)),
            BeanstalkListener::Unix(l, _) => l
                .poll_accept(cx)
                .map_ok(|(stream, _)| Accepted::Unix(stream)),
        }
    }
}

/// Opens the connection's broker session; the connection's future, or
/// `None` (the socket closed, the record counted) if the broker refuses.
fn start_connection<S: Socket, B: Broker>(
    stream: S,
    peer: Peer,
    handle: ConnHandle,
    broker: &B,
    config: &Arc<BeanstalkConfig>,
) -> Option<ConnectionTask<S, B::Session>> {
    match broker.open_session(peer) {
        Ok(session) => {
            handle.set_session_id(session.id());
            Some(Connection::new(stream, session, handle, config.clone()).run())
        }
        Err(e) => {
            handle.close_reason(CloseReason::Server);
            tracing::warn!(error = %e, "cannot open a session");
            None
        }
    }
}

pub trait Socket: Send + 'static {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Reads what is available into `buf`'s spare capacity.
    ///
    /// A read that leaves spare capacity has drained the socket, so it also
    /// clears the readiness flag; the usual next read that would only return
    /// `EAGAIN` is skipped. This is safe with tokio's edge-triggered epoll:
    /// bytes that arrive later raise a new edge.
    fn read_available(&self, buf: &mut BytesMut) -> io::Result<usize>;
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
}

macro_rules! impl_socket {
    ($t:ty) => {
        impl Socket for $t {
            fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_read_ready(self, cx)
            }
            fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_write_ready(self, cx)
            }
            fn read_available(&self, buf: &mut BytesMut) -> io::Result<usize> {
                let mut read = 0;
                let outcome = self.try_io(tokio::io::Interest::READABLE, || {
                    let spare = buf.capacity() - buf.len();
                    read = <$t>::try_read_buf(self, buf)?;
                    if read > 0 && read < spare {
                        // Drained: report WouldBlock so try_io clears readiness.
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    Ok(())
                });
                match outcome {
                    Ok(()) => Ok(read),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && read > 0 => Ok(read),
                    Err(e) => Err(e),
                }
            }
            fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
                <$t>::try_write(self, buf)
            }
        }
    };
}

impl_socket!(TcpStream);
impl_socket!(UnixStream);

struct Connection<S, Sess> {
    stream: S,
    session: Sess,
    decoder: RequestDecoder,
    /// Bytes read but not decoded: a half-received request, or complete
    /// requests waiting for room in the pipeline.
    input: BytesMut,
    output: Vec<u8>,
    /// One entry per request not yet answered, in order.
    slots: VecDeque<Slot>,
    /// Slots that are `Waiting` (at most `PIPELINED_REQUESTS_MAX`).
    awaiting: u32,
    /// Set once the client sent `quit` or closed its side, or the broker
    /// closed the session: nothing more is read, and the connection closes
    /// for this reason once its replies are written.
    ending: Option<CloseReason>,
    config: Arc<BeanstalkConfig>,
    /// Runs while the connection is stalled (see [`Stall`]): until the
    /// request's deadline, or until `write_timeout` after the client last
    /// took a byte. One timer, not one per direction, keeps the task's
    /// memory unchanged by it.
    stall_timer: Option<Pin<Box<Sleep>>>,
    /// What `stall_timer` times, when it runs.
    stall: Stall,
    /// When the request being received must be complete; `None` between
    /// requests (and while reading is paused, so the clock restarts when
    /// it resumes).
    request_deadline: Option<Instant>,
    /// What `request_deadline` allows for so far.
    request_part: RequestPart,
    /// A request was decoded since `request_deadline` was set: what remains
    /// buffered, if anything, is a new request.
    request_completed: bool,
    /// The waker registered for `close_all`: registering again only when
    /// the task's waker changes keeps polls off the entry's lock.
    close_waker: Option<Waker>,
    /// The command last published to the registry: publishing takes a
    /// global lock, so it is skipped while the command stays the same.
    shown_command: Option<&'static str>,
    /// Last, so the record ends after the session and socket are gone.
    handle: ConnHandle,
}

/// The task of one connection (see [`Connection::run`]). Between requests
/// it holds only what an idle connection needs ([`IdleConnection`], so the
/// tokio task is 256 bytes); when woken it moves that into a boxed
/// [`Connection`] with the buffers, decoder and timers a request needs, and
/// back once the connection is idle again: one allocation per request, and
/// an idle connection costs half the memory.
enum ConnectionTask<S, Sess> {
    Idle(IdleConnection<S, Sess>),
    Busy(Box<Connection<S, Sess>>),
    /// Closed (or between the two states, inside `poll`).
    Done,
}

/// The parts of a [`Connection`] that outlive a request.
struct IdleConnection<S, Sess> {
    stream: S,
    session: Sess,
    config: Arc<BeanstalkConfig>,
    close_waker: Option<Waker>,
    shown_command: Option<&'static str>,
    /// Last, so the record ends after the session and socket are gone.
    handle: ConnHandle,
}

// The connection is only ever used through `&mut` (nothing in it relies on
// staying at one address), so the task may move whatever the socket and
// session types are.
impl<S, Sess> Unpin for ConnectionTask<S, Sess> {}

impl<S: Socket, Sess: Session> Future for ConnectionTask<S, Sess> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let task = self.get_mut();
        let mut connection = match std::mem::replace(task, ConnectionTask::Done) {
            ConnectionTask::Idle(idle) => Box::new(Connection::from_idle(idle)),
            ConnectionTask::Busy(connection) => connection,
            ConnectionTask::Done => return Poll::Ready(()),
        };
        // The connection shares its task with every other connection of
        // the listener: a bug that panics ends this connection (dropping
        // it closes the socket and ends the session), not all of them.
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let poll = connection.poll_connection(cx);
            (connection, poll)
        }));
        let Ok((connection, poll)) = polled else {
            tracing::error!("a beanstalkd connection panicked and was closed");
            return Poll::Ready(());
        };
        match poll {
            Poll::Pending => {
                *task = if connection.is_idle() {
                    ConnectionTask::Idle(connection.into_idle())
                } else {
                    ConnectionTask::Busy(connection)
                };
                Poll::Pending
            }
            Poll::Ready(reason) => {
                tracing::debug!(
                    connection = connection.handle.id(),
                    reason = reason.as_str(),
                    "beanstalkd connection closed"
                );
                connection.handle.close_reason(reason);
                Poll::Ready(())
            }
        }
    }
}

/// A request's place in the reply order.
enum Slot {
    /// Handed to the broker, reply not back; the command's name.
    Waiting(&'static str),
    Answered(Response),
}

enum Step {
    Continue,
    Close(CloseReason),
}

/// What [`Connection::write_through_scratch`] did.
enum Written {
    /// No reply was ready.
    Nothing,
    /// Every encoded byte went out.
    All,
    /// The socket would block: the rest waits in `output`.
    Part,
    Failed(CloseReason),
}

/// The part of a request the deadline has been set for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RequestPart {
    /// No deadline set.
    None,
    /// The command line: `request_timeout` from its first byte.
    Line,
    /// A body of known length: its time at the minimum rate added.
    Body,
    /// An oversized body being discarded (the decoder does not say how
    /// long): time added for the bytes of it that arrive.
    DiscardedBody,
}

/// What a stalled connection waits for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stall {
    /// The rest of a request it has begun (its deadline).
    Request,
    /// The client to read its replies (`write_timeout`). Checked first:
    /// a client that does not read is stalled whatever else it sends.
    Write,
}

/// Why a socket error ends a connection: the client going away, or
/// something else.
fn io_close_reason(error: &io::Error) -> CloseReason {
    match error.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof => CloseReason::Client,
        _ => CloseReason::IoError,
    }
}

/// The command's name as the protocol spells it, for introspection.
fn command_name(request: &Request) -> &'static str {
    match request {
        Request::Put(_) => "put",
        Request::Use(_) => "use",
        Request::Reserve => "reserve",
        Request::ReserveWithTimeout { .. } => "reserve-with-timeout",
        Request::ReserveJob(_) => "reserve-job",
        Request::Delete(_) => "delete",
        Request::Release { .. } => "release",
        Request::Bury { .. } => "bury",
        Request::Touch(_) => "touch",
        Request::Watch(_) => "watch",
        Request::Ignore(_) => "ignore",
        Request::Peek(_) => "peek",
        Request::PeekReady => "peek-ready",
        Request::PeekDelayed => "peek-delayed",
        Request::PeekBuried => "peek-buried",
        Request::Kick { .. } => "kick",
        Request::KickJob(_) => "kick-job",
        Request::StatsJob(_) => "stats-job",
        Request::StatsTube(_) => "stats-tube",
        Request::Stats => "stats",
        Request::ListTubes => "list-tubes",
        Request::ListTubeUsed => "list-tube-used",
        Request::ListTubesWatched => "list-tubes-watched",
        Request::PauseTube { .. } => "pause-tube",
        Request::Quit => "quit",
    }
}

/// A body the decoder waits for.
enum BodyBytes {
    /// None: between requests or in a command line.
    None,
    /// This many bytes, its CRLF included.
    Known(usize),
    /// An oversized body being read and discarded, of a length not known.
    Discarded,
}

/// How long `bytes` take at [`REQUEST_BODY_MIN_BYTES_PER_SEC`].
fn time_at_min_body_rate(bytes: usize) -> Duration {
    let millis = (bytes as u64).saturating_mul(1000) / REQUEST_BODY_MIN_BYTES_PER_SEC;
    Duration::from_millis(millis)
}

/// Whether a command may wait for a job, for the `reserving` state.
fn blocks_for_a_job(command: &str) -> bool {
    matches!(command, "reserve" | "reserve-with-timeout")
}

impl<S: Socket, Sess: Session> Connection<S, Sess> {
    fn new(stream: S, session: Sess, handle: ConnHandle, config: Arc<BeanstalkConfig>) -> Self {
        Connection {
            stream,
            session,
            decoder: RequestDecoder::new(config.max_job_size),
            input: BytesMut::new(),
            output: Vec::new(),
            slots: VecDeque::new(),
            awaiting: 0,
            ending: None,
            config,
            stall_timer: None,
            stall: Stall::Request,
            request_deadline: None,
            request_part: RequestPart::None,
            request_completed: false,
            close_waker: None,
            shown_command: None,
            handle,
        }
    }

    /// The connection's task: a future that is the connection itself and
    /// nothing more (an `async fn` would store it twice, the argument and
    /// the moved value), idle until its first bytes.
    fn run(self) -> ConnectionTask<S, Sess> {
        ConnectionTask::Idle(self.into_idle())
    }

    fn from_idle(idle: IdleConnection<S, Sess>) -> Self {
        let IdleConnection {
            stream,
            session,
            config,
            close_waker,
            shown_command,
            handle,
        } = idle;
        Connection {
            close_waker,
            shown_command,
            ..Connection::new(stream, session, handle, config)
        }
    }

    /// Nothing received, pending, buffered or timed: what is left is the
    /// state [`Connection::new`] starts with, so the connection may shrink
    /// to an [`IdleConnection`].
    fn is_idle(&self) -> bool {
        self.ending.is_none()
            && self.input.is_empty()
            && self.decoder.is_idle()
            && self.output.is_empty()
            && self.slots.is_empty()
            && self.awaiting == 0
            && self.stall_timer.is_none()
            && self.request_deadline.is_none()
            && self.request_part == RequestPart::None
    }

    fn into_idle(self) -> IdleConnection<S, Sess> {
        IdleConnection {
            stream: self.stream,
            session: self.session,
            config: self.config,
            close_waker: self.close_waker,
            shown_command: self.shown_command,
            handle: self.handle,
        }
    }

    fn done_reading(&self) -> bool {
        self.ending.is_some()
    }

    /// With room in the pipeline, `pump` has decoded every complete request,
    /// so leftover input is a partial one that needs bytes.
    fn can_read(&self) -> bool {
        !self.done_reading()
            && self.slots.len() < PIPELINED_REQUESTS_MAX
            && self.output.len() < WRITE_BUFFER_MAX_BYTES
    }

    /// Polls the mailbox and the socket directly instead of awaiting futures,
    /// so the task stores nothing but the `Connection` while it waits.
    fn poll_connection(&mut self, cx: &mut Context<'_>) -> Poll<CloseReason> {
        if self
            .handle
            .poll_close_requested(cx, &mut self.close_waker)
            .is_ready()
        {
            return Poll::Ready(CloseReason::Shutdown);
        }
        for _ in 0..POLL_ROUNDS_MAX {
            let mut progressed = false;
            // Takes the mailbox's buffer, freed once the replies are placed.
            let mut responses = Vec::new();
            if let Poll::Ready(open) = self.session.poll_recv(cx, &mut responses) {
                progressed = true;
                if let Step::Close(reason) = self.on_replies(open, responses) {
                    return Poll::Ready(reason);
                }
            }
            if self.can_read() {
                if let Poll::Ready(ready) = self.stream.poll_read_ready(cx) {
                    progressed = true;
                    let step = match ready {
                        Ok(()) => self.on_readable(),
                        Err(e) => Step::Close(io_close_reason(&e)),
                    };
                    if let Step::Close(reason) = step {
                        return Poll::Ready(reason);
                    }
                }
            }
            if !self.output.is_empty() {
                if let Poll::Ready(ready) = self.stream.poll_write_ready(cx) {
                    progressed = true;
                    let step = match ready {
                        Ok(()) => self.pump(),
                        Err(e) => Step::Close(io_close_reason(&e)),
                    };
                    if let Step::Close(reason) = step {
                        return Poll::Ready(reason);
                    }
                }
            }
            if let Some(reason) = self.ending {
                if self.slots.is_empty() && self.output.is_empty() {
                    return Poll::Ready(reason);
                }
            }
            if !progressed {
                self.show_state();
                return self.poll_timer(cx);
            }
        }
        // Busy connection: let others run, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Starts, keeps or drops the stall timer for what the connection
    /// waits on now, and says whether it has run out. Called when nothing
    /// more can be done, so an idle connection drops it.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<CloseReason> {
        let deadline = if !self.output.is_empty() {
            match &self.stall_timer {
                // Restarted by each byte written (`made_progress`).
                Some(timer) if self.stall == Stall::Write => timer.deadline(),
                _ => Instant::now() + self.config.write_timeout,
            }
        } else if self.can_read() && self.has_partial_request() {
            self.track_request_deadline(0);
            match self.request_deadline {
                Some(deadline) => deadline,
                None => Instant::now() + self.config.request_timeout,
            }
        } else {
            self.stall_timer = None;
            if !self.can_read() {
                // Reading paused by the pipeline or write bound (the server
                // holds the rest back): the request's clock starts over
                // when reading resumes.
                self.request_deadline = None;
                self.request_part = RequestPart::None;
            }
            return Poll::Pending;
        };
        let stall = if self.output.is_empty() {
            Stall::Request
        } else {
            Stall::Write
        };
        match &mut self.stall_timer {
            Some(timer) if timer.deadline() == deadline => {}
            Some(timer) => timer.as_mut().reset(deadline),
            None => self.stall_timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
        self.stall = stall;
        if let Some(timer) = &mut self.stall_timer {
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(match stall {
                    Stall::Request => CloseReason::RequestTimeout,
                    Stall::Write => CloseReason::WriteTimeout,
                });
            }
        }
        Poll::Pending
    }

    /// Part of a request is buffered or being decoded.
    fn has_partial_request(&self) -> bool {
        !self.input.is_empty() || !self.decoder.is_idle()
    }

    /// Sets or extends the deadline of the request being received, after
    /// `read` more bytes arrived (0: called without a read). A request's
    /// first bytes start it at `request_timeout`; reaching its body adds
    /// the body's length at [`REQUEST_BODY_MIN_BYTES_PER_SEC`]; bytes of
    /// the same line or body never push it back.
    fn track_request_deadline(&mut self, read: usize) {
        if self.request_completed || !self.has_partial_request() {
            // What is left, if anything, began in the latest read.
            self.request_completed = false;
            self.request_deadline = None;
            self.request_part = RequestPart::None;
        }
        if !self.has_partial_request() {
            return;
        }
        let deadline = match self.request_deadline {
            Some(deadline) => deadline,
            None => {
                self.request_part = RequestPart::Line;
                Instant::now() + self.config.request_timeout
            }
        };
        let deadline = match (self.request_part, self.body_bytes_expected()) {
            (RequestPart::Line, BodyBytes::Known(len)) => {
                self.request_part = RequestPart::Body;
                deadline + time_at_min_body_rate(len)
            }
            (RequestPart::Line, BodyBytes::Discarded) => {
                self.request_part = RequestPart::DiscardedBody;
                deadline + time_at_min_body_rate(read)
            }
            (RequestPart::DiscardedBody, _) => deadline + time_at_min_body_rate(read),
            _ => deadline,
        };
        self.request_deadline = Some(deadline);
    }

    /// What the decoder says of the body it waits for, if it waits for one.
    fn body_bytes_expected(&self) -> BodyBytes {
        if self.decoder.is_idle() {
            return BodyBytes::None;
        }
        match self.decoder.bytes_wanted() {
            // An oversized body is counted off as it streams past; the
            // decoder does not say how much is left.
            0 => BodyBytes::Discarded,
            // A too-long line being dropped (or a body of exactly that
            // size, which the line's deadline covers anyway).
            LINE_MAX_BYTES => BodyBytes::None,
            wanted => BodyBytes::Known(wanted),
        }
    }

    /// Bytes written to the client restart the write timer.
    fn made_progress(&mut self) {
        if self.stall != Stall::Write {
            return;
        }
        let timeout = self.config.write_timeout;
        if let Some(timer) = &mut self.stall_timer {
            timer.as_mut().reset(Instant::now() + timeout);
        }
    }

    /// Publishes what the connection waits on, and the command it runs.
    fn show_state(&mut self) {
        let state = if !self.output.is_empty() {
            ConnState::Writing
        } else if self.awaiting > 0 {
            let running = self.slots.iter().find_map(|slot| match slot {
                Slot::Waiting(command) => Some(*command),
                Slot::Answered(_) => None,
            });
            if let Some(command) = running {
                // Names are literals: the same command is the same pointer.
                if !self
                    .shown_command
                    .is_some_and(|shown| std::ptr::eq(shown, command))
                {
                    self.handle.set_command(command);
                    self.shown_command = Some(command);
                }
            }
            match running {
                Some(command) if blocks_for_a_job(command) => ConnState::Reserving,
                _ => ConnState::Executing,
            }
        } else if !self.input.is_empty() || !self.decoder.is_idle() {
            ConnState::Reading
        } else {
            ConnState::Idle
        };
        self.handle.set_state(state);
    }

    fn on_replies(&mut self, open: bool, responses: Vec<Response>) -> Step {
        for response in responses {
            match self
                .slots
                .iter_mut()
                .find(|slot| matches!(slot, Slot::Waiting(_)))
            {
                Some(slot) => {
                    *slot = Slot::Answered(response);
                    self.awaiting -= 1;
                }
                // A reply we did not ask for: the broker is confused; drop
                // the connection rather than answer out of order.
                None => return Step::Close(CloseReason::Server),
            }
        }
        if !open {
            // The broker closed the session: say what we have, then go.
            self.slots.retain(|slot| matches!(slot, Slot::Answered(_)));
            self.awaiting = 0;
            if self.ending.is_none() {
                self.ending = Some(CloseReason::Server);
            }
            self.input = BytesMut::new();
        }
        self.pump()
    }

    fn on_readable(&mut self) -> Step {
        let (read, decoded) = if self.input.is_empty() {
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                scratch.clear();
                scratch.reserve(READ_CHUNK_BYTES);
                let read = self.stream.read_available(&mut scratch);
                let mut decoded = Step::Continue;
                if matches!(read, Ok(n) if n > 0) {
                    decoded = self.decode(&mut scratch);
                    if !scratch.is_empty() && !self.done_reading() {
                        // Keep only what is not decoded yet, in a buffer of
                        // our own sized for the request it starts.
                        let capacity = scratch.len().max(self.decoder.bytes_wanted());
                        let mut own = BytesMut::with_capacity(capacity);
                        own.extend_from_slice(&scratch);
                        self.input = own;
                    }
                }
                (read, decoded)
            })
        } else {
            // The rest of a partial request: read into its own buffer, which
            // is sized for it (a body up to the max job size).
            let wanted = self.decoder.bytes_wanted().max(self.input.len() + 1024);
            self.input.reserve(wanted - self.input.len());
            (self.stream.read_available(&mut self.input), Step::Continue)
        };
        if let Step::Close(reason) = decoded {
            return Step::Close(reason);
        }
        match read {
            Ok(0) => {
                if self.ending.is_none() {
                    self.ending = Some(CloseReason::Client);
                }
                self.input = BytesMut::new();
                self.session.hangup();
                Step::Continue
            }
            Ok(n) => {
                self.handle.add_bytes_in(n);
                let step = self.pump();
                self.track_request_deadline(n);
                step
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Continue,
            Err(e) => Step::Close(io_close_reason(&e)),
        }
    }

    /// Decodes requests from `buf` while this connection may take more,
    /// and submits them as one batch.
    fn decode(&mut self, buf: &mut BytesMut) -> Step {
        let mut batch = Vec::new();
        while !self.done_reading() && self.slots.len() < PIPELINED_REQUESTS_MAX {
            let Some(decoded) = self.decoder.decode(buf) else {
                break;
            };
            self.request_completed = true;
            // Most clients send one request at a time: room for one (48
            // bytes, not the default four) keeps a burst of connections
            // each with a request in flight small. Bytes left after it are
            // most often one more request (a worker's `delete` and
            // `reserve`): room for two then, not a second allocation.
            let room = if buf.is_empty() { 1 } else { 2 };
            if self.slots.is_empty() {
                self.slots.reserve_exact(room);
            }
            match decoded {
                Ok(Request::Quit) => self.ending = Some(CloseReason::Quit),
                Ok(request) => {
                    self.slots.push_back(Slot::Waiting(command_name(&request)));
                    if batch.capacity() == 0 {
                        batch.reserve_exact(room);
                    }
                    batch.push(request);
                    self.awaiting += 1;
                }
                Err(ProtocolError::BadFormat) => {
                    self.slots.push_back(Slot::Answered(Response::BadFormat))
                }
                Err(ProtocolError::UnknownCommand) => self
                    .slots
                    .push_back(Slot::Answered(Response::UnknownCommand)),
            }
        }
        if !batch.is_empty() && self.session.submit(batch).is_err() {
            return Step::Close(CloseReason::Server);
        }
        Step::Continue
    }

    /// Moves work along until it would block: decodes buffered input while
    /// there is room, submits it, encodes answered requests in order up to
    /// the write bound, and writes.
    fn pump(&mut self) -> Step {
        loop {
            if !self.input.is_empty() && !self.done_reading() {
                let mut input = std::mem::take(&mut self.input);
                let decoded = self.decode(&mut input);
                if !input.is_empty() && !self.done_reading() {
                    self.input = input;
                }
                if let Step::Close(reason) = decoded {
                    return Step::Close(reason);
                }
            }
            if self.done_reading() {
                self.input = BytesMut::new();
            }
            if self.output.is_empty() {
                // Nothing left from an earlier write: encode and write
                // from the thread's buffer.
                let written = self.write_through_scratch();
                self.give_back_slots();
                match written {
                    Written::Nothing | Written::Part => return Step::Continue,
                    Written::All => continue,
                    Written::Failed(reason) => return Step::Close(reason),
                }
            }
            self.encode_ready();
            self.give_back_slots();
            while !self.output.is_empty() {
                match self.stream.try_write(&self.output) {
                    Ok(n) => {
                        self.output.drain(..n);
                        self.handle.add_bytes_out(n);
                        self.made_progress();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Continue,
                    Err(e) => return Step::Close(io_close_reason(&e)),
                }
            }
            // Written out: give the memory back while idle.
            self.output = Vec::new();
        }
    }

    fn give_back_slots(&mut self) {
        if self.slots.is_empty() && self.slots.capacity() > 0 {
            // Every request answered: give the memory back while idle.
            self.slots = VecDeque::new();
        }
    }

    /// Encodes answered requests, in order, into the thread's
    /// [`WRITE_SCRATCH`] (up to [`WRITE_SCRATCH_BYTES`] and one reply) and
    /// writes them; only what the socket does not take is copied into the
    /// connection's own `output`. (Encoding into `output` allocated, grew
    /// and freed a buffer for every reply: about a fifth of the user-space
    /// instructions of a job at pipeline 1, callgrind.)
    fn write_through_scratch(&mut self) -> Written {
        WRITE_SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            scratch.clear();
            while scratch.len() < WRITE_SCRATCH_BYTES
                && matches!(self.slots.front(), Some(Slot::Answered(_)))
            {
                if let Some(Slot::Answered(response)) = self.slots.pop_front() {
                    encode_response(&response, &mut scratch);
                }
            }
            if scratch.is_empty() {
                return Written::Nothing;
            }
            let mut done = 0;
            let written = loop {
                if done == scratch.len() {
                    break Written::All;
                }
                match self.stream.try_write(&scratch[done..]) {
                    Ok(n) => {
                        done += n;
                        self.handle.add_bytes_out(n);
                        self.made_progress();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.output = scratch[done..].to_vec();
                        break Written::Part;
                    }
                    Err(e) => break Written::Failed(io_close_reason(&e)),
                }
            };
            if scratch.capacity() > 2 * WRITE_SCRATCH_BYTES {
                // A big reply grew it: keep the thread's memory bounded.
                *scratch = Vec::new();
            }
            written
        })
    }

    /// Encodes answered requests, in order, until the write buffer is full;
    /// the rest wait in `slots` (job bodies there are shared, not copied).
    fn encode_ready(&mut self) {
        while self.output.len() < WRITE_BUFFER_MAX_BYTES {
            if !matches!(self.slots.front(), Some(Slot::Answered(_))) {
                return;
            }
            if let Some(Slot::Answered(response)) = self.slots.pop_front() {
                encode_response(&response, &mut self.output);
            }
        }
    }
}

#[cfg(test)]
mod tests;
