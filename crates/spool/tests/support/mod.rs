//! Shared helpers for the integration tests: start a fresh `spool serve
//! --in-memory` per test on an ephemeral loopback port (or a unix socket),
//! and a small blocking client whose every read is bounded in time, so that
//! tests read like protocol transcripts:
//!
//! ```ignore
//! let server = Server::start();
//! let mut c = server.client();
//! c.expect("put 0 0 60 5\r\nhello\r\n", "INSERTED 1\r\n");
//! c.expect("reserve\r\n", "RESERVED 1 5\r\nhello\r\n");
//! ```
//!
//! Setting `SPOOL_TEST_ORACLE=/usr/bin/beanstalkd` runs the same tests
//! against a real beanstalkd instead (it gets `-l`, `-p` and `-z` only), which
//! is how the expected replies were checked against beanstalkd 1.12.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long any single expected reply may take to arrive.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server may take to start accepting connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The spool binary cargo built for these tests.
pub fn spool_bin() -> &'static str {
    env!("CARGO_BIN_EXE_spool")
}

/// Runs `spool ARGS` to completion (bounded to 60 s) with extra environment
/// variables, and returns its exit status and output.
pub fn run_spool(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(spool_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    clear_spool_env(&mut cmd);
    // Parallel tests must not all try the default HTTP port.
    cmd.env("SPOOL_HTTP_LISTEN", "127.0.0.1:0");
    for (key, value) in env {
        cmd.env(key, value);
    }
    let child = cmd.spawn().expect("spawning spool");
    wait_output(child, Duration::from_secs(60))
}

/// Removes every `SPOOL_*` variable of the host environment from `cmd`, so
/// a developer's settings cannot leak into a test.
pub fn clear_spool_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SPOOL_") {
            cmd.env_remove(key);
        }
    }
}

/// Waits for `child` to exit within `limit`, killing it otherwise, and
/// collects its output.
pub fn wait_output(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait().expect("waiting for child") {
            Some(_) => return child.wait_with_output().expect("collecting output"),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("collecting output");
                panic!(
                    "process did not exit within {limit:?}; stdout: {:?} stderr: {:?}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// A unique scratch directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "spool-{tag}-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("creating a temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where a test server listens.
#[derive(Debug, Clone)]
pub enum Addr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// A running server, killed when dropped.
pub struct Server {
    child: Child,
    addr: Addr,
    /// The HTTP listener (probes, /metrics, /admin); None for an oracle.
    http: Option<SocketAddr>,
    /// The server's stdout (its logs) and stderr, drained by threads so
    /// they can never block the server; the last 64 KiB are kept.
    output: Arc<Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    /// Keeps a unix socket's directory alive as long as the server.
    _dir: Option<TempDir>,
}

/// The binary that tests run against: spool, or beanstalkd when
/// `SPOOL_TEST_ORACLE` names one.
fn oracle() -> Option<String> {
    std::env::var("SPOOL_TEST_ORACLE")
        .ok()
        .filter(|s| !s.is_empty())
}

impl Server {
    /// `spool serve --in-memory` on an ephemeral loopback port.
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// Like [`Server::start`] with extra `spool serve` flags (only `-z N`
    /// is passed on to an oracle).
    pub fn start_with(extra: &[&str]) -> Server {
        Server::start_storage(&["--in-memory"], extra)
    }

    /// `spool serve -b DIR EXTRA` (durable, fsync always unless `extra`
    /// says otherwise) on an ephemeral loopback port.
    pub fn start_durable(dir: &Path, extra: &[&str]) -> Server {
        let dir = dir.to_str().expect("utf-8 path");
        Server::start_storage(&["-b", dir], extra)
    }

    /// `spool serve --database-url URL EXTRA` on an ephemeral loopback
    /// port.
    pub fn start_postgres(url: &str, extra: &[&str]) -> Server {
        Server::start_storage(&["--database-url", url], extra)
    }

    fn start_storage(storage: &[&str], extra: &[&str]) -> Server {
        // Binding port 0 picks a free port; the server then binds it. If
        // another process takes it in between, the server exits and we try
        // again with a new port.
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = {
                let probe = TcpListener::bind("127.0.0.1:0").expect("binding an ephemeral port");
                probe.local_addr().expect("local addr").port()
            };
            let addr = Addr::Tcp(SocketAddr::from(([127, 0, 0, 1], port)));
            let mut args: Vec<String> = storage.iter().map(|s| s.to_string()).collect();
            args.extend([
                "-l".to_string(),
                "127.0.0.1".to_string(),
                "-p".to_string(),
                port.to_string(),
            ]);
            match Server::spawn(args, extra, addr, None) {
                Ok(server) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("could not start a server: {last_error}");
    }

    /// `spool serve --in-memory -l unix:<tempdir>/s.sock`.
    pub fn start_unix() -> Server {
        let dir = TempDir::new("sock");
        let path = dir.path().join("s.sock");
        let args = vec![
            "--in-memory".to_string(),
            "-l".to_string(),
            format!("unix:{}", path.display()),
        ];
        Server::spawn(args, &[], Addr::Unix(path), Some(dir))
            .unwrap_or_else(|e| panic!("could not start a server: {e}"))
    }

    fn spawn(
        listen: Vec<String>,
        extra: &[&str],
        addr: Addr,
        dir: Option<TempDir>,
    ) -> Result<Server, String> {
        let mut http = None;
        let mut cmd = match oracle() {
            Some(bin) => {
                let mut cmd = Command::new(bin);
                let listen = listen.iter().filter(|a| *a != "--in-memory");
                cmd.args(listen).args(extra);
                cmd
            }
            None => {
                let mut cmd = Command::new(spool_bin());
                clear_spool_env(&mut cmd);
                cmd.arg("serve")
                    .args(&listen)
                    .args(extra)
                    .env("SPOOL_LOG_LEVEL", "warn");
                if !extra.contains(&"--http-listen") {
                    let port = free_port();
                    let http_addr = SocketAddr::from(([127, 0, 0, 1], port));
                    cmd.args(["--http-listen", &http_addr.to_string()]);
                    http = Some(http_addr);
                }
                cmd
            }
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawning: {e}"))?;
        let (output, readers) = drain_output(&mut child);
        let mut server = Server {
            child,
            addr,
            http,
            output,
            readers,
            _dir: dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = server.child.try_wait().map_err(|e| e.to_string())? {
                for reader in server.readers.drain(..) {
                    let _ = reader.join();
                }
                return Err(format!(
                    "server exited with {status}: {}",
                    server.output_text()
                ));
            }
            if server.probe() {
                return Ok(server);
            }
            if Instant::now() >= deadline {
                return Err(format!("server not accepting after {START_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One connect attempt. A successful probe is a real connection, so a
    /// test that counts `total-connections` sees it.
    fn probe(&self) -> bool {
        match &self.addr {
            Addr::Tcp(a) => TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok(),
            Addr::Unix(p) => UnixStream::connect(p).is_ok(),
        }
    }

    pub fn addr(&self) -> &Addr {
        &self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True when the tests run against `SPOOL_TEST_ORACLE`, not spool.
    pub fn is_oracle(&self) -> bool {
        oracle().is_some()
    }

    /// A new client connection.
    pub fn client(&self) -> Client {
        Client::connect(&self.addr)
    }

    /// The server's resident set size in bytes, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("reading /proc/<pid>/status");
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .expect("VmRSS in /proc/<pid>/status");
        let kb: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .expect("VmRSS value");
        kb * 1024
    }

    /// What the server wrote to stdout and stderr so far (the last 64 KiB).
    pub fn output_text(&self) -> String {
        let kept = self.output.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&kept).into_owned()
    }

    /// The server's HTTP listener.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
            .expect("the server has an HTTP listener (spool, not an oracle)")
    }

    /// One HTTP/1.1 request to the server's HTTP listener.
    pub fn http(&self, method: &str, path: &str, body: &str) -> HttpReply {
        http_request(self.http_addr(), method, path, &[], body)
    }

    /// Sends `signal` (e.g. libc's SIGTERM number) to the server.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits up to `limit` for the server to exit; None if it is still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Panics unless the server process is still running.
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!(
                "the server exited: {status}; output: {}",
                self.output_text()
            );
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

/// A free loopback port (another process may take it before it is bound:
/// callers retry on a bind failure).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding an ephemeral port")
        .port()
}

/// Drains a child's stdout and stderr into one buffer (the last 64 KiB), so
/// the child can never block on a full pipe.
pub fn drain_output(child: &mut Child) -> (Arc<Mutex<Vec<u8>>>, Vec<std::thread::JoinHandle<()>>) {
    let output = Arc::new(Mutex::new(Vec::new()));
    let mut readers = Vec::new();
    let pipes: Vec<Box<dyn Read + Send>> = [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .collect();
    for mut pipe in pipes {
        let output = output.clone();
        readers.push(std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                let mut kept = output.lock().unwrap_or_else(|e| e.into_inner());
                kept.extend_from_slice(&chunk[..n]);
                let excess = kept.len().saturating_sub(64 * 1024);
                kept.drain(..excess);
            }
        }));
    }
    (output, readers)
}

/// An HTTP reply: status, headers (lower-cased names) and body.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request with `Connection: close`, every step bounded by
/// [`REPLY_TIMEOUT`]. A hand-rolled client on purpose: the tests check the
/// server's bytes, not a client library's reading of them.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpReply {
    let mut stream = TcpStream::connect_timeout(&addr, REPLY_TIMEOUT)
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .expect("timeout");
    stream
        .set_write_timeout(Some(REPLY_TIMEOUT))
        .expect("timeout");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream
        .write_all(request.as_bytes())
        .expect("sending the request");
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("reading the reply to {method} {path}: {e}"));
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let rest = &raw[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    HttpReply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Decodes a chunked body, on bytes: a chunk may end inside a character.
fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    while let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&rest[..line_end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .unwrap_or(0);
        let after = &rest[line_end + 2..];
        if size == 0 || after.len() < size {
            break;
        }
        body.extend_from_slice(&after[..size]);
        rest = after[size..]
            .strip_prefix(b"\r\n")
            .unwrap_or(&after[size..]);
    }
    body
}

/// A TCP or unix-socket stream.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn set_read_timeout(&self, t: Option<Duration>) {
        let r = match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        };
        r.expect("set_read_timeout");
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) {
        let r = match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        };
        r.expect("set_write_timeout");
    }

    fn shutdown_write(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// What a read with a deadline found.
enum Fill {
    Data,
    Eof,
    TimedOut,
}

/// A blocking protocol client. Every read is bounded by [`REPLY_TIMEOUT`]
/// unless a method says otherwise.
pub struct Client {
    stream: Stream,
    buf: Vec<u8>,
}

/// Renders bytes for an assertion message: printable ASCII as is, the rest
/// escaped, long runs shortened.
pub fn show(bytes: &[u8]) -> String {
    let mut s = String::new();
    let shown = &bytes[..bytes.len().min(400)];
    for &b in shown {
        match b {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            0x20..=0x7e => s.push(b as char),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    if bytes.len() > shown.len() {
        s.push_str(&format!("... ({} bytes)", bytes.len()));
    }
    s
}

impl Client {
    pub fn connect(addr: &Addr) -> Client {
        let stream = match addr {
            Addr::Tcp(a) => {
                let s = TcpStream::connect_timeout(a, REPLY_TIMEOUT).expect("connecting");
                s.set_nodelay(true).expect("nodelay");
                Stream::Tcp(s)
            }
            Addr::Unix(p) => Stream::Unix(UnixStream::connect(p).expect("connecting")),
        };
        stream.set_write_timeout(Some(Duration::from_secs(10)));
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Writes all of `bytes` in one write call (as far as the kernel takes it).
    pub fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.stream
            .write_all(bytes.as_ref())
            .expect("writing to the server");
    }

    /// Writes `bytes` one byte per write, with a short pause between, so
    /// the server sees them arrive in separate reads.
    pub fn send_bytewise(&mut self, bytes: impl AsRef<[u8]>) {
        for b in bytes.as_ref() {
            self.send([*b]);
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Closes the writing half: the server sees end of input.
    pub fn shutdown_write(&self) {
        self.stream.shutdown_write();
    }

    /// Reads more bytes into the buffer, waiting until `deadline`.
    fn fill(&mut self, deadline: Instant) -> Fill {
        let now = Instant::now();
        if now >= deadline {
            return Fill::TimedOut;
        }
        self.stream.set_read_timeout(Some(deadline - now));
        let mut chunk = [0u8; 64 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => Fill::Eof,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Fill::Data
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Fill::TimedOut
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => Fill::Data,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => Fill::Eof,
            Err(e) => panic!("reading from the server: {e}"),
        }
    }

    /// Reads exactly `n` bytes (beyond what is buffered) by `deadline`.
    fn need(&mut self, n: usize, deadline: Instant, what: &str) {
        while self.buf.len() < n {
            match self.fill(deadline) {
                Fill::Data => {}
                Fill::Eof => panic!(
                    "connection closed while waiting for {what}; got so far: {}",
                    show(&self.buf)
                ),
                Fill::TimedOut => panic!(
                    "no complete {what} within {REPLY_TIMEOUT:?}; got so far: {}",
                    show(&self.buf)
                ),
            }
        }
    }

    fn line_within(&mut self, limit: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let mut line: Vec<u8> = self.buf.drain(..pos + 2).collect();
                line.truncate(pos);
                return Some(line);
            }
            match self.fill(deadline) {
                Fill::Data => {}
                Fill::Eof => panic!(
                    "connection closed while waiting for a reply line; got so far: {}",
                    show(&self.buf)
                ),
                Fill::TimedOut => return None,
            }
        }
    }

    /// Reads one `\r\n`-terminated line and returns it without the `\r\n`.
    pub fn line(&mut self) -> String {
        match self.line_within(REPLY_TIMEOUT) {
            Some(line) => String::from_utf8(line).expect("a reply line in UTF-8"),
            None => panic!(
                "no reply line within {REPLY_TIMEOUT:?}; got so far: {}",
                show(&self.buf)
            ),
        }
    }

    /// Reads one whole reply, its body included (`RESERVED`, `FOUND`, `OK`),
    /// as the exact bytes the server sent.
    pub fn reply_bytes(&mut self) -> Vec<u8> {
        self.reply_bytes_within(REPLY_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "no reply within {REPLY_TIMEOUT:?}; got so far: {}",
                show(&self.buf)
            )
        })
    }

    /// Like [`Client::reply_bytes`], `None` if no reply line starts within
    /// `limit`.
    pub fn reply_bytes_within(&mut self, limit: Duration) -> Option<Vec<u8>> {
        let line = self.line_within(limit)?;
        let mut reply = line.clone();
        reply.extend_from_slice(b"\r\n");
        let text = String::from_utf8_lossy(&line);
        let words: Vec<&str> = text.split(' ').collect();
        let body_len = match words.as_slice() {
            ["RESERVED", _, len] | ["FOUND", _, len] | ["OK", len] => Some(
                len.parse::<usize>()
                    .unwrap_or_else(|_| panic!("bad body length in reply line {:?}", show(&line))),
            ),
            _ => None,
        };
        if let Some(len) = body_len {
            let deadline = Instant::now() + REPLY_TIMEOUT;
            self.need(len + 2, deadline, "reply body");
            let body: Vec<u8> = self.buf.drain(..len + 2).collect();
            assert_eq!(
                &body[len..],
                b"\r\n",
                "reply body not followed by \\r\\n: {}",
                show(&body)
            );
            reply.extend_from_slice(&body);
        }
        Some(reply)
    }

    /// Reads one whole reply as text.
    pub fn reply(&mut self) -> String {
        String::from_utf8(self.reply_bytes()).expect("a reply in UTF-8")
    }

    /// Reads one reply and asserts it is exactly `expected`.
    pub fn expect_reply(&mut self, expected: &str) {
        let got = self.reply_bytes();
        assert_eq!(
            show(&got),
            show(expected.as_bytes()),
            "unexpected reply (got, expected)"
        );
    }

    /// Sends `cmd` and asserts the next reply is exactly `expected`.
    pub fn expect(&mut self, cmd: impl AsRef<[u8]>, expected: &str) {
        let cmd = cmd.as_ref();
        self.send(cmd);
        let got = self.reply_bytes();
        assert_eq!(
            show(&got),
            show(expected.as_bytes()),
            "unexpected reply to {:?} (got, expected)",
            show(cmd)
        );
    }

    /// Asserts that no byte arrives within `wait`.
    pub fn expect_no_reply(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        while self.buf.is_empty() {
            match self.fill(deadline) {
                Fill::Data => {}
                Fill::Eof => panic!("connection closed; expected it to stay open and quiet"),
                Fill::TimedOut => return,
            }
        }
        panic!(
            "expected no reply within {wait:?}, got: {}",
            show(&self.buf)
        );
    }

    /// Asserts that the server closes the connection (within the reply
    /// timeout) without sending anything more.
    pub fn expect_closed(&mut self) {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            match self.fill(deadline) {
                Fill::Data => {}
                Fill::Eof => break,
                Fill::TimedOut => panic!(
                    "connection still open after {REPLY_TIMEOUT:?}; got: {}",
                    show(&self.buf)
                ),
            }
        }
        assert!(
            self.buf.is_empty(),
            "unexpected bytes before close: {}",
            show(&self.buf)
        );
    }

    /// `put` with the given fields; asserts `INSERTED` and returns the id.
    pub fn put(&mut self, pri: u32, delay: u32, ttr: u32, body: &[u8]) -> u64 {
        let mut cmd = format!("put {pri} {delay} {ttr} {}\r\n", body.len()).into_bytes();
        cmd.extend_from_slice(body);
        cmd.extend_from_slice(b"\r\n");
        self.send(&cmd);
        let line = self.line();
        line.strip_prefix("INSERTED ")
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("expected INSERTED <id>, got {line:?}"))
    }

    /// `reserve-with-timeout 0`; asserts a job was reserved and returns its
    /// id and body.
    pub fn reserve_now(&mut self) -> (u64, Vec<u8>) {
        self.send(b"reserve-with-timeout 0\r\n");
        parse_job(&self.reply_bytes(), "RESERVED")
    }

    /// Sends a `stats*` command and returns its YAML as a map.
    pub fn stats_map(&mut self, cmd: &str) -> HashMap<String, String> {
        self.send(cmd.as_bytes());
        let reply = self.reply();
        yaml_map(&reply)
    }

    /// Sends a `stats*` command and returns the YAML keys in order.
    pub fn stats_keys(&mut self, cmd: &str) -> Vec<String> {
        self.send(cmd.as_bytes());
        let reply = self.reply();
        yaml_pairs(&reply).into_iter().map(|(k, _)| k).collect()
    }

    /// `stats` until `key` has `value`, for counters that settle a moment
    /// after a connection closes; panics after the reply timeout.
    pub fn wait_for_stat(&mut self, cmd: &str, key: &str, value: &str) {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            let map = self.stats_map(cmd);
            if map.get(key).map(String::as_str) == Some(value) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{cmd:?}: {key} is {:?}, expected {value:?}",
                map.get(key)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Parses `WORD <id> <len>\r\n<body>\r\n` and returns the id and body.
pub fn parse_job(reply: &[u8], word: &str) -> (u64, Vec<u8>) {
    let end = reply
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or_else(|| panic!("not a reply: {}", show(reply)));
    let head = String::from_utf8_lossy(&reply[..end]).to_string();
    let words: Vec<&str> = head.split(' ').collect();
    match words.as_slice() {
        [w, id, len] if *w == word => {
            let id = id.parse().expect("job id");
            let len: usize = len.parse().expect("body length");
            (id, reply[end + 2..end + 2 + len].to_vec())
        }
        _ => panic!("expected {word} <id> <len>, got {}", show(reply)),
    }
}

/// The `key: value` lines of an `OK <len>` YAML reply, in order. Asserts
/// the reply is framed as beanstalkd frames it: `OK <len>\r\n---\n...\r\n`.
pub fn yaml_pairs(reply: &str) -> Vec<(String, String)> {
    let (head, rest) = reply
        .split_once("\r\n")
        .unwrap_or_else(|| panic!("not a reply: {reply:?}"));
    let len: usize = head
        .strip_prefix("OK ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("expected OK <len>, got {reply:?}"));
    let yaml = &rest[..len];
    assert!(yaml.starts_with("---\n"), "YAML without ---: {yaml:?}");
    yaml["---\n".len()..]
        .lines()
        .map(|l| {
            let (k, v) = l
                .split_once(": ")
                .unwrap_or_else(|| panic!("not a `key: value` line: {l:?}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// The `key: value` lines of an `OK <len>` YAML reply as a map.
pub fn yaml_map(reply: &str) -> HashMap<String, String> {
    yaml_pairs(reply).into_iter().collect()
}

/// The `- item` lines of an `OK <len>` YAML list reply.
pub fn yaml_list(reply: &str) -> Vec<String> {
    let (_, rest) = reply
        .split_once("\r\n")
        .unwrap_or_else(|| panic!("not a reply: {reply:?}"));
    let yaml = rest.strip_suffix("\r\n").expect("YAML ends with \\r\\n");
    assert!(yaml.starts_with("---\n"), "YAML without ---: {yaml:?}");
    yaml["---\n".len()..]
        .lines()
        .map(|l| {
            l.strip_prefix("- ")
                .unwrap_or_else(|| panic!("not a list item: {l:?}"))
                .to_string()
        })
        .collect()
}

/// xorshift64*: small, std-only, and reproducible from a printed seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // splitmix64 spreads nearby seeds apart and never yields the
        // all-zero state xorshift cannot leave.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            items.get(self.below(items.len() as u64) as usize)
        }
    }
}

/// The crash tests' seed: `SPOOL_CRASH_SEED` when set (to replay a run),
/// else the time.
pub fn crash_seed() -> u64 {
    match std::env::var("SPOOL_CRASH_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("SPOOL_CRASH_SEED={s:?}: expected an unsigned integer")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    }
}
