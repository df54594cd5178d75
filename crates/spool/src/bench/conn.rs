//! One client connection of the load generator: a socket, one read buffer,
//! one write buffer and the shared response decoder.
//!
//! Requests are appended to the write buffer and sent together by
//! [`Conn::flush`], so a pipelined batch costs one `write`. Replies are read
//! into one buffer that is reused for the whole run; a read that returns less
//! than the free space lets tokio skip the `read` that would only say "would
//! block", so at depth 1 a round trip is one `write` and one `read`.
//!
//! Every wait is bounded by the run's deadline, armed once per connection.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use spool_proto::{encode_request, Request, Response, ResponseDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// Free space guaranteed before each read. Large enough that a read rarely
/// fills it (a full read would cost an extra "would block" read) and that
/// a batch of pipelined replies fits in one read.
const READ_SPACE_BYTES: usize = 64 * 1024;

#[derive(Debug)]
pub(super) struct Conn {
    stream: TcpStream,
    rbuf: BytesMut,
    /// Requests not yet sent; callers append, [`Conn::flush`] sends.
    pub(super) wbuf: Vec<u8>,
    decoder: ResponseDecoder,
    /// The run's deadline, registered with the timer once and polled by
    /// every wait instead of arming a new timer per read.
    deadline: Pin<Box<Sleep>>,
}

impl Conn {
    /// Connects with Nagle off (requests are batched by us, not by the
    /// kernel). Must be called inside the runtime that will drive it.
    pub(super) async fn connect(
        addr: SocketAddr,
        max_body: u64,
        deadline: Instant,
    ) -> Result<Conn> {
        let mut sleep = Box::pin(tokio::time::sleep_until(deadline.into()));
        let stream = tokio::select! {
            biased;
            s = TcpStream::connect(addr) => s.with_context(|| format!("connecting to {addr}"))?,
            () = &mut sleep => bail!("time limit reached while connecting to {addr}"),
        };
        stream.set_nodelay(true).context("setting TCP_NODELAY")?;
        Ok(Conn {
            stream,
            rbuf: BytesMut::with_capacity(2 * READ_SPACE_BYTES),
            wbuf: Vec::with_capacity(16 * 1024),
            decoder: ResponseDecoder::new(max_body),
            deadline: sleep,
        })
    }

    pub(super) fn push(&mut self, request: &Request) {
        encode_request(request, &mut self.wbuf);
    }

    /// Sends everything queued. `Ok(false)`: the deadline passed first.
    pub(super) async fn flush(&mut self) -> Result<bool> {
        if self.wbuf.is_empty() {
            return Ok(true);
        }
        tokio::select! {
            biased;
            r = self.stream.write_all(&self.wbuf) => r.context("writing to the server")?,
            () = &mut self.deadline => return Ok(false),
        }
        self.wbuf.clear();
        Ok(true)
    }

    /// Pops a reply that is already buffered, without waiting.
    pub(super) fn buffered_reply(&mut self) -> Result<Option<Response>> {
        self.decoder
            .decode(&mut self.rbuf)
            .context("unreadable reply from the server")
    }

    /// Waits for the next reply. `Ok(None)`: the deadline passed first.
    pub(super) async fn next_reply(&mut self) -> Result<Option<Response>> {
        loop {
            if let Some(reply) = self.buffered_reply()? {
                return Ok(Some(reply));
            }
            // Reclaims the buffer in place once earlier reply bodies are
            // dropped, so the steady state allocates nothing here.
            self.rbuf.reserve(READ_SPACE_BYTES);
            tokio::select! {
                biased;
                r = self.stream.read_buf(&mut self.rbuf) => {
                    if r.context("reading from the server")? == 0 {
                        bail!("the server closed the connection");
                    }
                }
                () = &mut self.deadline => return Ok(None),
            }
        }
    }

    /// One request, one reply; for setup, not for the measured loops.
    pub(super) async fn call(&mut self, request: &Request) -> Result<Response> {
        self.push(request);
        if !self.flush().await? {
            bail!("time limit reached while sending {request:?}");
        }
        match self.next_reply().await? {
            Some(reply) => Ok(reply),
            None => bail!("time limit reached while waiting for the reply to {request:?}"),
        }
    }
}
