//! The beanstalkd front door: a TCP or unix-socket listener and one task per
//! connection that moves bytes between the socket and a broker [`Session`].
//!
//! A connection task owns no job state. It decodes requests with the shared
//! sans-IO decoder, submits them in batches (everything one read produced),
//! and writes the replies in request order; malformed lines are answered
//! here, in their place in that order.
//!
//! Memory per connection is bounded and an idle connection holds no buffer:
//! the read buffer is allocated when bytes arrive and freed once they are
//! decoded; the write buffer likewise. At most `PIPELINED_REQUESTS_MAX`
//! requests may wait for replies and at most `WRITE_BUFFER_MAX_BYTES` wait
//! to be written before the task stops reading from the client.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::path::PathBuf;

use bytes::BytesMut;
use spool_proto::limits::{PIPELINED_REQUESTS_MAX, WRITE_BUFFER_MAX_BYTES};
use spool_proto::{encode_response, ProtocolError, Request, RequestDecoder, Response};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::broker::{Broker, Peer, Session};

/// Smallest read: enough for a burst of pipelined commands.
const READ_CHUNK_BYTES: usize = 16 * 1024;

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

/// The socket operations a connection needs; TCP and unix streams both
/// have them.
pub trait Socket: Send + 'static {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send;
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
            fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
                <$t>::readable(self)
            }
            fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
                <$t>::writable(self)
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
        loop {
            let can_read = !self.done_reading
                && self.awaiting < PIPELINED_REQUESTS_MAX
                && self.output.len() < WRITE_BUFFER_MAX_BYTES;
            let want_write = !self.output.is_empty();
            let step = tokio::select! {
                biased;
                open = self.session.recv(&mut self.responses) => self.on_replies(open),
                ready = self.stream.readable(), if can_read => match ready {
                    Ok(()) => self.on_readable(),
                    Err(_) => Step::Close,
                },
                ready = self.stream.writable(), if want_write => match ready {
                    Ok(()) => self.flush(),
                    Err(_) => Step::Close,
                },
            };
            if let Step::Close = step {
                return;
            }
            if self.done_reading && self.slots.is_empty() && self.output.is_empty() {
                return;
            }
        }
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
        self.encode_ready();
        if !open {
            // The broker closed the session: say what we have, then go.
            self.slots.clear();
            self.awaiting = 0;
            self.done_reading = true;
        }
        self.flush()
    }

    fn on_readable(&mut self) -> Step {
        if self.input.capacity() - self.input.len() < READ_CHUNK_BYTES {
            self.input
                .reserve(READ_CHUNK_BYTES.max(self.decoder.bytes_wanted()));
        }
        match self.stream.read_available(&mut self.input) {
            Ok(0) => {
                self.done_reading = true;
                self.input = BytesMut::new();
                self.session.hangup();
                return Step::Continue;
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Continue,
            Err(_) => return Step::Close,
        }
        while let Some(decoded) = self.decoder.decode(&mut self.input) {
            match decoded {
                Ok(Request::Quit) => {
                    self.done_reading = true;
                    break;
                }
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
            if self.awaiting >= PIPELINED_REQUESTS_MAX {
                break;
            }
        }
        if self.input.is_empty() || self.done_reading {
            // Nothing half-read: give the memory back while idle.
            self.input = BytesMut::new();
        }
        if !self.batch.is_empty() {
            let batch = std::mem::take(&mut self.batch);
            if self.session.submit(batch).is_err() {
                return Step::Close;
            }
        }
        self.encode_ready();
        self.flush()
    }

    fn encode_ready(&mut self) {
        while let Some(Some(_)) = self.slots.front() {
            if let Some(Some(response)) = self.slots.pop_front() {
                encode_response(&response, &mut self.output);
            }
        }
    }

    fn flush(&mut self) -> Step {
        while !self.output.is_empty() {
            match self.stream.try_write(&self.output) {
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Continue,
                Err(_) => return Step::Close,
            }
        }
        self.output = Vec::new();
        Step::Continue
    }
}
