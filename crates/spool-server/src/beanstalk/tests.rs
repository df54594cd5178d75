//! The connection task over a scripted socket: the test decides exactly
//! which bytes each read returns, so how a stream is split into reads is
//! chosen, not left to the kernel and the scheduler.

use std::sync::Mutex;

use spool_engine::{Engine, EngineConfig};

use super::*;
use crate::local::{engine_clock, LocalBroker};
use crate::process::ProcessInfo;

/// What the scripted socket holds, shared with the test.
#[derive(Default)]
struct Script {
    /// Pieces not read yet; one read returns at most one piece.
    pieces: VecDeque<Vec<u8>>,
    /// After the pieces, reads return end of stream.
    eof: bool,
    written: Vec<u8>,
    /// When not 0, a write takes at most this many bytes and the next one
    /// would block, as a socket whose buffer is full does.
    write_chunk: usize,
    write_blocked: bool,
    reader: Option<Waker>,
}

#[derive(Clone, Default)]
struct ScriptedSocket(Arc<Mutex<Script>>);

impl ScriptedSocket {
    fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, piece: &[u8]) {
        let mut script = self.script();
        script.pieces.push_back(piece.to_vec());
        if let Some(waker) = script.reader.take() {
            waker.wake();
        }
    }

    fn hang_up(&self) {
        let mut script = self.script();
        script.eof = true;
        if let Some(waker) = script.reader.take() {
            waker.wake();
        }
    }

    fn all_read(&self) -> bool {
        self.script().pieces.is_empty()
    }
}

impl Socket for ScriptedSocket {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut script = self.script();
        if script.pieces.is_empty() && !script.eof {
            script.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }

    fn poll_write_ready(&self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn read_available(&self, buf: &mut BytesMut) -> io::Result<usize> {
        let mut script = self.script();
        let Some(mut piece) = script.pieces.pop_front() else {
            if script.eof {
                return Ok(0);
            }
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let spare = buf.capacity() - buf.len();
        assert!(spare > 0, "a read with no room");
        if piece.len() > spare {
            // The rest is what the next read returns, as from a socket.
            let rest = piece.split_off(spare);
            script.pieces.push_front(rest);
        }
        buf.extend_from_slice(&piece);
        Ok(piece.len())
    }

    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        let mut script = self.script();
        let mut taken = buf.len();
        if script.write_chunk > 0 {
            if script.write_blocked {
                script.write_blocked = false;
                return Err(io::ErrorKind::WouldBlock.into());
            }
            script.write_blocked = true;
            taken = taken.min(script.write_chunk);
        }
        script.written.extend_from_slice(&buf[..taken]);
        Ok(taken)
    }
}

const MAX_JOB_SIZE: u32 = 64;

/// Every reply a fresh server sends to a client that writes `pieces`, each
/// arriving in a read of its own (the next is sent only once the previous
/// one was read), and then hangs up.
async fn replies_to(pieces: &[&[u8]]) -> Vec<u8> {
    replies_written_in_chunks(pieces, 0).await
}

/// [`replies_to`], through a socket that takes at most `write_chunk` bytes
/// a write, every other write blocking (0: all at once).
async fn replies_written_in_chunks(pieces: &[&[u8]], write_chunk: usize) -> Vec<u8> {
    let engine = Engine::new(EngineConfig {
        max_job_size: MAX_JOB_SIZE,
    });
    let broker = LocalBroker::start(engine, engine_clock(), None, ProcessInfo::new("test"));
    let connections = Connections::new(None);
    let handle = connections
        .try_admit(Protocol::Beanstalk)
        .expect("admitted");
    let session = broker
        .open_session(Peer::default())
        .expect("a session opens");
    let socket = ScriptedSocket::default();
    socket.script().write_chunk = write_chunk;
    let config = Arc::new(BeanstalkConfig::new(MAX_JOB_SIZE));
    let task = tokio::spawn(Connection::new(socket.clone(), session, handle, config).run());
    for piece in pieces {
        socket.push(piece);
        // Runs the connection task (on this thread) until it took the piece.
        while !socket.all_read() {
            tokio::task::yield_now().await;
        }
    }
    socket.hang_up();
    task.await.expect("the connection task ends");
    let written = socket.script().written.clone();
    written
}

/// Lines that end only at the edge of a 224-byte window or not at all
/// (stray CRs, a lone LF, an over-long line), bodies with and without
/// their CRLF, and an oversized body, as beanstalkd 1.12 (`-z 64`)
/// answers them, sent whole and byte by byte.
const TRICKY: &[(&[u8], &[u8])] = &[
    (b"put 0 0 10 5\r\nhello\r\n", b"INSERTED 1\r\n"),
    // The stray CR hides the CRLFs after it until the window is full.
    (b"list-tube-used\r\r\n", b""),
    (b"list-tube-used\r\n", b""),
    (&[b'y'; 191], b""),
    (b"z\r\n", b"BAD_FORMAT\r\n"),
    (&[b'x'; 300], b""),
    (b"\r\n", b"BAD_FORMAT\r\n"),
    (
        b"put 0 0 10 3\r\nabcde\r\n",
        b"EXPECTED_CRLF\r\nUNKNOWN_COMMAND\r\n",
    ),
    (b"put 0 0 10 70\r\n", b""),
    (&[b'b'; 70], b""),
    (b"\r\n", b"JOB_TOO_BIG\r\n"),
    (b"list-tube-used\n\r\n", b"BAD_FORMAT\r\n"),
    (b"peek 1\r\n", b"FOUND 1 5\r\nhello\r\n"),
    (b"list-tube-used\r\n", b"USING default\r\n"),
];

fn tricky() -> (Vec<u8>, Vec<u8>) {
    let mut sent = Vec::new();
    let mut answered = Vec::new();
    for (bytes, replies) in TRICKY {
        sent.extend_from_slice(bytes);
        answered.extend_from_slice(replies);
    }
    (sent, answered)
}

#[tokio::test]
async fn replies_do_not_depend_on_how_reads_split_the_input() {
    let (sent, want) = tricky();
    let show = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert_eq!(
        show(&replies_to(&[&sent]).await),
        show(&want),
        "in one read"
    );
    let bytes: Vec<&[u8]> = sent.chunks(1).collect();
    assert_eq!(show(&replies_to(&bytes).await), show(&want), "byte by byte");
    for split in 1..sent.len() {
        let (a, b) = sent.split_at(split);
        assert_eq!(
            show(&replies_to(&[a, b]).await),
            show(&want),
            "split after byte {split} of {}",
            show(&sent)
        );
    }
}

/// Replies are encoded into the thread's buffer and only what the socket
/// does not take is kept by the connection: whatever the socket takes a
/// write, the bytes and their order are the same.
#[tokio::test]
async fn replies_do_not_depend_on_how_writes_split_them() {
    let (sent, want) = tricky();
    let show = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let bytes: Vec<&[u8]> = sent.chunks(1).collect();
    for write_chunk in [1, 2, 5, 13, 64] {
        assert_eq!(
            show(&replies_written_in_chunks(&[&sent], write_chunk).await),
            show(&want),
            "in one read, {write_chunk} bytes a write"
        );
        assert_eq!(
            show(&replies_written_in_chunks(&bytes, write_chunk).await),
            show(&want),
            "byte by byte, {write_chunk} bytes a write"
        );
    }
}

/// The pieces as the differential scenario `stray_cr` sends them, each in a
/// read of its own, then split at every byte: the connection waits for the
/// line end (no reply, no close) until the 224-byte window is full.
#[tokio::test]
async fn stray_cr_waits_for_the_window_whatever_the_reads() {
    let pieces: [&[u8]; 5] = [
        b"list-tube-used\r\r\n",
        b"list-tube-used\r\n",
        &[b'y'; 224 - 17 - 16],
        b"z\r\n",
        b"list-tube-used\r\n",
    ];
    let want = "BAD_FORMAT\r\nUSING default\r\n";
    let got = replies_to(&pieces).await;
    assert_eq!(String::from_utf8_lossy(&got), want);
    let sent = pieces.concat();
    for split in 1..sent.len() {
        let (a, b) = sent.split_at(split);
        let got = replies_to(&[a, b]).await;
        assert_eq!(String::from_utf8_lossy(&got), want, "split after {split}");
    }
}

#[test]
fn an_idle_connection_future_stays_small() {
    // Every connection's future is an entry of the listener's
    // `ConnectionSet` (a `FuturesUnordered` node: the future plus 64
    // bytes), allocated as it is: each byte here is a byte per idle
    // connection. Measured by scripts/bench-connections.sh.
    let size = std::mem::size_of::<ConnectionTask<TcpStream, crate::local::LocalSession>>();
    assert!(size <= 152, "the connection's future is {size} bytes");
}

#[tokio::test]
async fn accepted_sockets_inherit_the_listener_s_tcp_options() {
    // The listener sets no-delay and keepalive once (`set_inherited_options`)
    // and skips them per connection where the kernel copies them to
    // accepted sockets; check that this kernel does.
    let listener = crate::net::bind_tcp("127.0.0.1:0".parse().unwrap(), 16).unwrap();
    let inherited = set_inherited_options(&listener);
    assert_eq!(inherited, cfg!(target_os = "linux"));
    let addr = listener.local_addr().unwrap();
    let _client = TcpStream::connect(addr).await.unwrap();
    let (accepted, _) = listener.accept().await.unwrap();
    let socket = SockRef::from(&accepted);
    if inherited {
        assert!(accepted.nodelay().unwrap());
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), TCP_KEEPALIVE_IDLE);
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            TCP_KEEPALIVE_INTERVAL
        );
    }
}
