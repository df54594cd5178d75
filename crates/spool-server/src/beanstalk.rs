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

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::task::{Context, Poll};

use bytes::BytesMut;
use spool_proto::limits::{PIPELINED_REQUESTS_MAX, WRITE_BUFFER_MAX_BYTES};
use spool_proto::{encode_response, ProtocolError, Request, RequestDecoder, Response};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::broker::{Broker, Peer, Session};

/// Size of the per-thread scratch buffer reads land in: enough for a burst
/// of pipelined commands.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Rounds of work one poll of a connection may do before yielding, so a
/// client that never stops sending cannot starve the others.
const POLL_ROUNDS_MAX: usize = 16;

/// How many connections the kernel may queue before `accept`, as beanstalkd.
pub const LISTEN_BACKLOG: u32 = 1024;

thread_local! {
    /// Where reads land before decoding. Shared by every connection on the
    /// thread (a connection never holds it across an await), so an idle or
    /// fully decoded connection owns no read buffer.
    static SCRATCH: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

#[derive(Debug, Clone)]
pub struct BeanstalkConfig {
    pub max_job_size: u32,
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

/// Accepts connections until `shutdown` completes.
pub async fn serve<B: Broker>(
    listener: BeanstalkListener,
    broker: B,
    config: BeanstalkConfig,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            accepted = accept(&listener) => accepted,
        };
        match accepted {
            Ok(Accepted::Tcp(stream, peer)) => {
                // Replies are small and latency matters more than packet count.
                let _ = stream.set_nodelay(true);
                spawn_connection(stream, peer, &broker, &config);
            }
            Ok(Accepted::Unix(stream)) => {
                let peer = Peer {
                    addr: "unix".to_string(),
                };
                spawn_connection(stream, peer, &broker, &config);
            }
            Err(e) => {
                // Out of fds or similar: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

enum Accepted {
    Tcp(TcpStream, Peer),
    Unix(UnixStream),
}

async fn accept(listener: &BeanstalkListener) -> io::Result<Accepted> {
    match listener {
        BeanstalkListener::Tcp(l) => {
            let (stream, addr) = l.accept().await?;
            Ok(Accepted::Tcp(
                stream,
                Peer {
                    addr: addr.to_string(),
                },
            ))
        }
        BeanstalkListener::Unix(l, _) => Ok(Accepted::Unix(l.accept().await?.0)),
    }
}

fn spawn_connection<S: Socket, B: Broker>(
    stream: S,
    peer: Peer,
    broker: &B,
    config: &BeanstalkConfig,
) {
    match broker.open_session(peer) {
        Ok(session) => {
            tokio::spawn(Connection::new(stream, session, config.max_job_size).run());
        }
        Err(e) => tracing::warn!(error = %e, "cannot open a session"),
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
    /// One entry per request not yet answered, in order: `None` while the
    /// broker works on it, `Some` once the reply is known.
    slots: VecDeque<Option<Response>>,
    /// Slots that are `None`.
    awaiting: usize,
    responses: Vec<Response>,
    batch: Vec<Request>,
    /// The client sent `quit` or closed its side.
    done_reading: bool,
}

enum Step {
    Continue,
    Close,
}

impl<S: Socket, Sess: Session> Connection<S, Sess> {
    fn new(stream: S, session: Sess, max_job_size: u32) -> Self {
        Connection {
            stream,
            session,
            decoder: RequestDecoder::new(max_job_size),
            input: BytesMut::new(),
            output: Vec::new(),
            slots: VecDeque::new(),
            awaiting: 0,
            responses: Vec::new(),
            batch: Vec::new(),
            done_reading: false,
        }
    }

    async fn run(mut self) {
        std::future::poll_fn(|cx| self.poll(cx)).await;
    }

    /// Polls the mailbox and the socket directly instead of awaiting futures,
    /// so the task stores nothing but the `Connection` while it waits.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        for _ in 0..POLL_ROUNDS_MAX {
            let mut progressed = false;
            if let Poll::Ready(open) = self.session.poll_recv(cx, &mut self.responses) {
                progressed = true;
                if let Step::Close = self.on_replies(open) {
                    return Poll::Ready(());
                }
            }
            // With room in the pipeline, `pump` has decoded every complete
            // request, so leftover input is a partial one that needs bytes.
            let can_read = !self.done_reading
                && self.slots.len() < PIPELINED_REQUESTS_MAX
                && self.output.len() < WRITE_BUFFER_MAX_BYTES;
            if can_read {
                if let Poll::Ready(ready) = self.stream.poll_read_ready(cx) {
                    progressed = true;
                    let step = match ready {
                        Ok(()) => self.on_readable(),
                        Err(_) => Step::Close,
                    };
                    if let Step::Close = step {
                        return Poll::Ready(());
                    }
                }
            }
            if !self.output.is_empty() {
                if let Poll::Ready(ready) = self.stream.poll_write_ready(cx) {
                    progressed = true;
                    let step = match ready {
                        Ok(()) => self.pump(),
                        Err(_) => Step::Close,
                    };
                    if let Step::Close = step {
                        return Poll::Ready(());
                    }
                }
            }
            if self.done_reading && self.slots.is_empty() && self.output.is_empty() {
                return Poll::Ready(());
            }
            if !progressed {
                return Poll::Pending;
            }
        }
        // Busy connection: let others run, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn on_replies(&mut self, open: bool) -> Step {
        for response in self.responses.drain(..) {
            match self.slots.iter_mut().find(|s| s.is_none()) {
                Some(slot) => {
                    *slot = Some(response);
                    self.awaiting -= 1;
                }
                // A reply we did not ask for: the broker is confused; drop
                // the connection rather than answer out of order.
                None => return Step::Close,
            }
        }
        if !open {
            // The broker closed the session: say what we have, then go.
            self.slots.retain(Option::is_some);
            self.awaiting = 0;
            self.done_reading = true;
            self.input = BytesMut::new();
        }
        self.pump()
    }

    fn on_readable(&mut self) -> Step {
        let read = if self.input.is_empty() {
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                scratch.clear();
                scratch.reserve(READ_CHUNK_BYTES);
                let read = self.stream.read_available(&mut scratch);
                if matches!(read, Ok(n) if n > 0) {
                    self.decode(&mut scratch);
                    if !scratch.is_empty() && !self.done_reading {
                        // Keep only what is not decoded yet, in a buffer of
                        // our own sized for the request it starts.
                        let capacity = scratch.len().max(self.decoder.bytes_wanted());
                        let mut own = BytesMut::with_capacity(capacity);
                        own.extend_from_slice(&scratch);
                        self.input = own;
                    }
                }
                read
            })
        } else {
            // The rest of a partial request: read into its own buffer, which
            // is sized for it (a body up to the max job size).
            let wanted = self.decoder.bytes_wanted().max(self.input.len() + 1024);
            self.input.reserve(wanted - self.input.len());
            self.stream.read_available(&mut self.input)
        };
        match read {
            Ok(0) => {
                self.done_reading = true;
                self.input = BytesMut::new();
                self.session.hangup();
                Step::Continue
            }
            Ok(_) => self.pump(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Continue,
            Err(_) => Step::Close,
        }
    }

    /// Decodes requests from `buf` while this connection may take more.
    fn decode(&mut self, buf: &mut BytesMut) {
        while !self.done_reading && self.slots.len() < PIPELINED_REQUESTS_MAX {
            let Some(decoded) = self.decoder.decode(buf) else {
                break;
            };
            match decoded {
                Ok(Request::Quit) => self.done_reading = true,
                Ok(request) => {
                    self.batch.push(request);
                    self.slots.push_back(None);
                    self.awaiting += 1;
                }
                Err(ProtocolError::BadFormat) => self.slots.push_back(Some(Response::BadFormat)),
                Err(ProtocolError::UnknownCommand) => {
                    self.slots.push_back(Some(Response::UnknownCommand))
                }
            }
        }
    }

    /// Moves work along until it would block: decodes buffered input while
    /// there is room, submits it, encodes answered requests in order up to
    /// the write bound, and writes.
    fn pump(&mut self) -> Step {
        loop {
            if !self.input.is_empty() && !self.done_reading {
                let mut input = std::mem::take(&mut self.input);
                self.decode(&mut input);
                if !input.is_empty() && !self.done_reading {
                    self.input = input;
                }
            }
            if self.done_reading {
                self.input = BytesMut::new();
            }
            if !self.batch.is_empty() {
                let batch = std::mem::take(&mut self.batch);
                if self.session.submit(batch).is_err() {
                    return Step::Close;
                }
            }
            self.encode_ready();
            if self.output.is_empty() {
                return Step::Continue;
            }
            while !self.output.is_empty() {
                match self.stream.try_write(&self.output) {
                    Ok(n) => {
                        self.output.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Continue,
                    Err(_) => return Step::Close,
                }
            }
            // Written out: give the memory back while idle.
            self.output = Vec::new();
        }
    }

    /// Encodes answered requests, in order, until the write buffer is full;
    /// the rest wait in `slots` (job bodies there are shared, not copied).
    fn encode_ready(&mut self) {
        while self.output.len() < WRITE_BUFFER_MAX_BYTES {
            if !matches!(self.slots.front(), Some(Some(_))) {
                return;
            }
            if let Some(Some(response)) = self.slots.pop_front() {
                encode_response(&response, &mut self.output);
            }
        }
    }
}
