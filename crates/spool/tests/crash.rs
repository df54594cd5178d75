//! Crash test: `kill -9` the durable server at a random moment under a
//! concurrent load, restart it on the same data directory, and check that
//! recovery brings back exactly what was acknowledged (DESIGN.md §5: no
//! acknowledged put is ever lost in `fsync=always` mode, whatever is killed
//! and when).
//!
//! Each round starts `spool serve -b DIR` on the same directory, checks the
//! recovered state against a model of everything acknowledged so far, runs
//! producers and consumers over plain TCP for a random 50–400 ms and kills
//! the server in the middle of it. The model is a snapshot of what the
//! previous check saw (every id is peeked, so it is exact) plus what the
//! round's clients were told: an acknowledged reply is a promise, a request
//! without its reply may or may not have happened, and the check after the
//! restart resolves each "may" by looking.
//!
//! Checked after every restart: each acknowledged put is there with its
//! body, tube, priority and TTR; each acknowledged delete stays gone; an
//! acknowledged bury is buried; a delayed job keeps its due time; no job
//! appears that was never put or is gone, and none twice; ids are never
//! reused. Stricter than §5 asks, and true of spool's design (a reply is
//! held until the log has its round): a job a consumer was handed does not
//! vanish. Some rounds run with `--fsync interval:5`; some restarts are
//! killed again during recovery; now and then the checker deletes most
//! jobs so the server compacts its log under the next load. The last check
//! is followed by a drain of every job and one more kill.
//!
//! The interleavings come from the OS scheduler, so a seed does not replay
//! a run exactly; it does fix the load durations, the operation mix and the
//! fsync policies. `SPOOL_CRASH_SEED=N` reruns with seed N.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use support::{clear_spool_env, crash_seed, show, yaml_map, Rng, TempDir};

/// Kill/restart rounds on one data directory; the check after the last
/// kill is followed by a full drain.
const ROUNDS: usize = 12;
/// Producer thread t puts into tube `crash-t`; consumers watch them all.
const TUBES: usize = 3;
/// Each round runs 1..=TUBES producers and 2..=3 consumers, so that some
/// rounds grow the queue and others shrink it (which makes the log worth
/// compacting).
const MAX_CONSUMERS: usize = 3;
/// The smallest segment the server takes (and so its compaction threshold):
/// the log rotates and compacts within the test.
const SEGMENT_BYTES: &str = "1048576";
/// How long the load runs before the kill, chosen per round.
const LOAD_MIN_MS: u64 = 50;
const LOAD_MAX_MS: u64 = 400;
/// Bounds each load thread even if it never notices the kill.
const MAX_OPS_PER_THREAD: usize = 20_000;
const LOAD_GRACE: Duration = Duration::from_secs(5);
/// A load request without its reply in this long counts as unacknowledged
/// and ends the thread: the test only needs acknowledgments to be kept.
const LOAD_REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// The checker talks to a live, idle server: a missing reply is a failure.
const CHECK_REPLY_TIMEOUT: Duration = Duration::from_secs(20);
/// Recovery of the growing log in a debug build can take a moment.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Requests the checker sends before reading their replies.
const PIPELINE: usize = 256;
/// Ids past the largest one seen that the checker also peeks: puts whose
/// reply was lost may hold a few (at most one in flight per producer).
const ID_SCAN_MARGIN: u64 = 64;
const TTR: u32 = 60;
/// A delay no round outlives: the job must still be delayed, with its due
/// time kept across restarts.
const LONG_DELAY: u32 = 3600;
/// A delay that runs out during the test: the job becomes ready on its own.
const SHORT_DELAY: u32 = 1;
/// How late past its due time a delayed job may still report `delayed`.
const DUE_SLACK: Duration = Duration::from_secs(2);
/// Added to a job's priority when a consumer buries it, so the priority a
/// buried job reports shows the bury's update was the one recovered.
const BURY_PRI_OFFSET: u32 = 1_000_000;

/// The fsync policy of each round's server. `interval:5` acknowledges once
/// written to the OS, which survives a killed process, so its rounds get the
/// same checks.
fn fsync_policy(round: usize) -> &'static str {
    if round % 4 == 3 {
        "interval:5"
    } else {
        "always"
    }
}

/// A unique body: its name, then up to this much varied padding, so that
/// the log fills segments (and a record cut or shifted in recovery shows).
const MAX_PADDING: u64 = 600;

fn body_for(round: usize, tube: usize, n: usize, padding: u64) -> String {
    let mut body = format!("job-{round}-{tube}-{n}-");
    body.extend((0..padding).map(|i| char::from(b'a' + ((n as u64 + i) % 26) as u8)));
    body
}

/// A body as failure messages show it: its unique name and its length.
fn label(body: &str) -> String {
    match body.match_indices('-').nth(3) {
        Some((i, _)) => format!("{:?}+{}B", &body[..=i], body.len() - i - 1),
        None => format!("{:?}", show(body.as_bytes())),
    }
}

/// Where two bodies first differ, for a wrong-body message.
fn diff(got: &str, expected: &str) -> String {
    let at = got
        .bytes()
        .zip(expected.bytes())
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(expected.len()));
    format!(
        "{} bytes vs {}, first difference at byte {at}: {} vs {}",
        got.len(),
        expected.len(),
        show(&got.as_bytes()[at..got.len().min(at + 16)]),
        show(&expected.as_bytes()[at..expected.len().min(at + 16)])
    )
}

fn tube_name(tube: usize) -> String {
    format!("crash-{tube}")
}

/// The priority a job is put and released with, derived from its body so
/// that consumers know it without asking (FNV-1a).
fn base_pri(body: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in body.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h % 1000
}

// ---------------------------------------------------------------------------
// The server under test.

/// `spool serve -b DIR` on an ephemeral loopback port, killed when dropped
/// (also on panic), its stderr drained so the server never blocks on it.
struct Spool {
    child: Child,
    port: u16,
    /// The server's stderr (stdout is not kept), drained by a thread.
    output: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Spool {
    fn start(dir: &Path, fsync: &str) -> Result<Spool, String> {
        // Binding port 0 picks a free port for the server to bind; another
        // process may take it in between, so a bind failure is retried.
        let mut last = String::new();
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("picking an ephemeral port")
                .port();
            match Spool::spawn(dir, fsync, port) {
                Ok(spool) => return Ok(spool),
                Err((retry, e)) if retry => last = e,
                Err((_, e)) => return Err(e),
            }
        }
        Err(format!("could not start the server: {last}"))
    }

    /// Starts the process without waiting for it to accept.
    fn launch(dir: &Path, fsync: &str, port: u16) -> Result<Spool, String> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_spool"));
        clear_spool_env(&mut cmd);
        cmd.arg("serve")
            .arg("-b")
            .arg(dir)
            .args(["-l", "127.0.0.1", "-p", &port.to_string()])
            .args(["--fsync", fsync, "-s", SEGMENT_BYTES])
            .args(["--http-listen", "127.0.0.1:0"])
            .env("SPOOL_LOG_LEVEL", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("spawning: {e}"))?;
        let (output, readers) = support::drain_output(&mut child);
        Ok(Spool {
            child,
            port,
            output,
            readers,
        })
    }

    /// Err((worth retrying on another port, why)).
    fn spawn(dir: &Path, fsync: &str, port: u16) -> Result<Spool, (bool, String)> {
        let mut spool = Spool::launch(dir, fsync, port).map_err(|e| (false, e))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = spool.child.try_wait() {
                for reader in spool.readers.drain(..) {
                    let _ = reader.join();
                }
                let text = spool.stderr_text();
                let retry = text.contains("binding") || text.contains("in use");
                return Err((retry, format!("the server exited with {status}: {text}")));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(spool);
            }
            if Instant::now() >= deadline {
                return Err((
                    false,
                    format!(
                        "the server was not accepting after {START_TIMEOUT:?}: {}",
                        spool.stderr_text()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL (what `Child::kill` sends on unix), then reap it.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn stderr_text(&self) -> String {
        let kept = self.output.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&kept).into_owned()
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.kill();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

// ---------------------------------------------------------------------------
// A protocol connection whose failures are values: for the load, a dead
// server is the expected end of the conversation, not a test failure.

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// One reply: its first line, and the body for `RESERVED`, `FOUND`, `OK`.
#[derive(Debug)]
struct Reply {
    line: String,
    body: Option<Vec<u8>>,
}

impl Reply {
    fn words(&self) -> Vec<&str> {
        self.line.split(' ').collect()
    }

    /// The reply's bytes as the server sent them, for `yaml_map`.
    fn text_raw(&self) -> String {
        match &self.body {
            Some(body) => format!("{}\r\n{}\r\n", self.line, String::from_utf8_lossy(body)),
            None => format!("{}\r\n", self.line),
        }
    }

    fn text(&self) -> String {
        match &self.body {
            Some(body) => format!("{} + body {}", self.line, show(body)),
            None => self.line.clone(),
        }
    }
}

impl Conn {
    fn connect(port: u16) -> std::io::Result<Conn> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        Ok(Conn {
            stream,
            buf: Vec::new(),
        })
    }

    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads more bytes, waiting until `deadline`.
    fn fill(&mut self, deadline: Instant) -> std::io::Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut chunk = [0u8; 64 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(()),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Err(ErrorKind::TimedOut.into()),
            Err(e) => Err(e),
        }
    }

    /// One whole reply. Bytes of a reply cut short by the kill are never
    /// returned: without its `\r\n` (and whole body) it was not received.
    fn reply(&mut self, limit: Duration) -> std::io::Result<Reply> {
        let deadline = Instant::now() + limit;
        let line = loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..pos + 2).collect();
                break String::from_utf8_lossy(&line[..pos]).into_owned();
            }
            self.fill(deadline)?;
        };
        let words: Vec<&str> = line.split(' ').collect();
        let len = match words.as_slice() {
            ["RESERVED", _, len] | ["FOUND", _, len] | ["OK", len] => len.parse::<usize>().ok(),
            _ => None,
        };
        let Some(len) = len else {
            return Ok(Reply { line, body: None });
        };
        while self.buf.len() < len + 2 {
            self.fill(deadline)?;
        }
        let mut body: Vec<u8> = self.buf.drain(..len + 2).collect();
        if !body.ends_with(b"\r\n") {
            return Err(std::io::Error::new(
                ErrorKind::InvalidData,
                format!("body of {line:?} not followed by \\r\\n"),
            ));
        }
        body.truncate(len);
        Ok(Reply {
            line,
            body: Some(body),
        })
    }

    fn call(&mut self, cmd: &[u8], limit: Duration) -> std::io::Result<Reply> {
        self.send(cmd)?;
        self.reply(limit)
    }
}

// ---------------------------------------------------------------------------
// The load.

/// One put a producer sent, and its acknowledgment if the reply came.
#[derive(Debug, Clone)]
struct Sent {
    body: String,
    tube: usize,
    pri: u32,
    delay: u32,
    sent_at: Instant,
    /// `(id, buried)` from `INSERTED <id>` / `BURIED <id>`.
    ack: Option<(u64, bool)>,
    acked_at: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Delete,
    Release,
    Bury,
}

/// A consumer's command on a job it had reserved.
#[derive(Debug, Clone)]
struct Op {
    id: u64,
    kind: OpKind,
    acked: bool,
}

#[derive(Debug, Default)]
struct LoadLog {
    sent: Vec<Sent>,
    reserved: Vec<(u64, Vec<u8>)>,
    ops: Vec<Op>,
    /// Replies no correct server gives to these requests.
    unexpected: Vec<String>,
    /// Requests whose reply timed out while the server may have been alive.
    timeouts: usize,
}

impl LoadLog {
    fn merge(&mut self, other: LoadLog) {
        self.sent.extend(other.sent);
        self.reserved.extend(other.reserved);
        self.ops.extend(other.ops);
        self.unexpected.extend(other.unexpected);
        self.timeouts += other.timeouts;
    }

    /// Notes why a thread stops: a timeout is counted, a dead server is
    /// the normal end.
    fn ended(&mut self, e: &std::io::Error) {
        if e.kind() == ErrorKind::TimedOut {
            self.timeouts += 1;
        }
    }
}

fn produce(port: u16, round: usize, tube: usize, mut rng: Rng, deadline: Instant) -> LoadLog {
    let mut log = LoadLog::default();
    let Ok(mut conn) = Conn::connect(port) else {
        return log;
    };
    let using = tube_name(tube);
    match conn.call(format!("use {using}\r\n").as_bytes(), LOAD_REPLY_TIMEOUT) {
        Ok(r) if r.line == format!("USING {using}") => {}
        Ok(r) => {
            log.unexpected
                .push(format!("producer {tube}: `use {using}` -> {}", r.text()));
            return log;
        }
        Err(e) => {
            log.ended(&e);
            return log;
        }
    }
    for n in 0..MAX_OPS_PER_THREAD {
        if Instant::now() >= deadline {
            break;
        }
        let body = body_for(round, tube, n, rng.below(MAX_PADDING));
        let pri = base_pri(&body);
        let delay = match rng.below(32) {
            0 => LONG_DELAY,
            1 => SHORT_DELAY,
            _ => 0,
        };
        let cmd = format!("put {pri} {delay} {TTR} {}\r\n{body}\r\n", body.len());
        // Recorded before sending: once any byte is out, the put may happen.
        log.sent.push(Sent {
            body,
            tube,
            pri,
            delay,
            sent_at: Instant::now(),
            ack: None,
            acked_at: None,
        });
        let reply = match conn.call(cmd.as_bytes(), LOAD_REPLY_TIMEOUT) {
            Ok(reply) => reply,
            Err(e) => {
                log.ended(&e);
                break;
            }
        };
        let ack = match reply.words().as_slice() {
            ["INSERTED", id] => id.parse().ok().map(|id| (id, false)),
            // Out of memory: inserted, but buried.
            ["BURIED", id] => id.parse().ok().map(|id| (id, true)),
            _ => None,
        };
        let last = log.sent.last_mut().expect("just pushed");
        match ack {
            Some(ack) => {
                last.ack = Some(ack);
                last.acked_at = Some(Instant::now());
            }
            None => {
                log.unexpected.push(format!(
                    "producer {tube}: put of {} -> {}",
                    label(&last.body),
                    reply.text()
                ));
                break;
            }
        }
    }
    log
}

fn consume(port: u16, who: usize, mut rng: Rng, deadline: Instant) -> LoadLog {
    let mut log = LoadLog::default();
    let Ok(mut conn) = Conn::connect(port) else {
        return log;
    };
    let mut setup: Vec<(String, String)> = (0..TUBES)
        .map(|t| {
            (
                format!("watch {}\r\n", tube_name(t)),
                format!("WATCHING {}", t + 2),
            )
        })
        .collect();
    setup.push((
        "ignore default\r\n".to_string(),
        format!("WATCHING {TUBES}"),
    ));
    for (cmd, expected) in setup {
        match conn.call(cmd.as_bytes(), LOAD_REPLY_TIMEOUT) {
            Ok(r) if r.line == expected => {}
            Ok(r) => {
                log.unexpected.push(format!(
                    "consumer {who}: {:?} -> {} (expected {expected})",
                    cmd.trim_end(),
                    r.text()
                ));
                return log;
            }
            Err(e) => {
                log.ended(&e);
                return log;
            }
        }
    }
    for _ in 0..MAX_OPS_PER_THREAD {
        if Instant::now() >= deadline {
            break;
        }
        let reply = match conn.call(b"reserve-with-timeout 0\r\n", LOAD_REPLY_TIMEOUT) {
            Ok(reply) => reply,
            Err(e) => {
                log.ended(&e);
                break;
            }
        };
        let (id, body) = match (reply.words().as_slice(), &reply.body) {
            (["RESERVED", id, _], Some(body)) => match id.parse::<u64>() {
                Ok(id) => (id, body.clone()),
                Err(_) => {
                    log.unexpected
                        .push(format!("consumer {who}: reserve -> {}", reply.text()));
                    break;
                }
            },
            (["TIMED_OUT"], _) => {
                // Nothing ready: let the producers catch up.
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            _ => {
                log.unexpected
                    .push(format!("consumer {who}: reserve -> {}", reply.text()));
                break;
            }
        };
        log.reserved.push((id, body.clone()));
        let pri = base_pri(&String::from_utf8_lossy(&body));
        let (kind, cmd, ok) = match rng.below(100) {
            0..=69 => (OpKind::Delete, format!("delete {id}\r\n"), "DELETED"),
            70..=84 => (
                OpKind::Release,
                format!("release {id} {pri} 0\r\n"),
                "RELEASED",
            ),
            _ => (
                OpKind::Bury,
                format!("bury {id} {}\r\n", pri + BURY_PRI_OFFSET),
                "BURIED",
            ),
        };
        log.ops.push(Op {
            id,
            kind,
            acked: false,
        });
        match conn.call(cmd.as_bytes(), LOAD_REPLY_TIMEOUT) {
            Ok(r) if r.line == ok => log.ops.last_mut().expect("just pushed").acked = true,
            // Releasing can bury a job when memory runs out.
            Ok(r) if kind == OpKind::Release && r.line == "BURIED" => {
                log.unexpected.push(format!(
                    "consumer {who}: {:?} -> BURIED (out of memory?)",
                    cmd.trim_end()
                ));
                break;
            }
            Ok(r) => {
                log.unexpected.push(format!(
                    "consumer {who}: {:?} on a job it holds -> {}",
                    cmd.trim_end(),
                    r.text()
                ));
                break;
            }
            Err(e) => {
                log.ended(&e);
                break;
            }
        }
    }
    log
}

/// Runs the load against `spool` for `load` and kills the server while it
/// runs; returns what the clients were told and when the kill happened.
fn load_and_kill(
    spool: &mut Spool,
    round: usize,
    seed: u64,
    load: Duration,
    producers: usize,
    consumers: usize,
) -> (LoadLog, Instant) {
    let deadline = Instant::now() + load + LOAD_GRACE;
    let port = spool.port;
    let mut threads = Vec::new();
    for t in 0..producers {
        let rng = Rng::new(seed ^ ((round as u64) << 16) ^ (t as u64 + 1));
        threads.push(std::thread::spawn(move || {
            produce(port, round, t, rng, deadline)
        }));
    }
    for c in 0..consumers {
        let rng = Rng::new(seed ^ ((round as u64) << 16) ^ ((c as u64 + 1) << 8));
        threads.push(std::thread::spawn(move || consume(port, c, rng, deadline)));
    }
    std::thread::sleep(load);
    spool.kill();
    let killed_at = Instant::now();
    let mut log = LoadLog::default();
    for t in threads {
        match t.join() {
            Ok(part) => log.merge(part),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
    (log, killed_at)
}

// ---------------------------------------------------------------------------
// The model and the check.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Ready,
    Delayed,
    Buried,
}

impl State {
    fn parse(s: &str) -> Option<State> {
        match s {
            "ready" => Some(State::Ready),
            "delayed" => Some(State::Delayed),
            "buried" => Some(State::Buried),
            _ => None,
        }
    }
}

/// What every put sent says about its job, by body (bodies are unique).
#[derive(Debug, Clone)]
struct Spec {
    round: usize,
    tube: usize,
    pri: u32,
    delay: u32,
    sent_at: Instant,
    /// The latest the put can have happened: its acknowledgment, or the
    /// kill that cut it off.
    latest: Instant,
}

/// A job as the last check saw it.
#[derive(Debug, Clone)]
struct Seen {
    body: String,
    state: State,
    pri: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presence {
    Must,
    May,
    Forbidden,
}

/// What the check after a kill expects of one id.
#[derive(Debug, Clone)]
struct Expect {
    body: String,
    presence: Presence,
    states: Vec<State>,
    pris: Vec<u32>,
    /// A delete was sent without its reply: the job may be gone.
    unacked_delete: bool,
    /// Why, for the failure message.
    why: String,
}

impl Expect {
    fn allow_state(&mut self, s: State) {
        if !self.states.contains(&s) {
            self.states.push(s);
        }
    }

    fn allow_pri(&mut self, p: u32) {
        if !self.pris.contains(&p) {
            self.pris.push(p);
        }
    }
}

fn states_for_delay(delay: u32) -> Vec<State> {
    match delay {
        0 => vec![State::Ready],
        LONG_DELAY => vec![State::Delayed],
        _ => vec![State::Delayed, State::Ready],
    }
}

#[derive(Debug, Default)]
struct Model {
    specs: HashMap<String, Spec>,
    /// Every job on the server at the last check, exactly.
    jobs: BTreeMap<u64, Seen>,
    /// Ids that were acknowledged or seen at a check: their put record is
    /// in the log, so no later put may get them again.
    used_ids: HashSet<u64>,
    max_id: u64,
    /// Bodies that were on the server or sent once and are gone for good,
    /// with why: none may come back.
    gone: HashMap<String, String>,
}

/// What one check found, for the round's summary line.
#[derive(Debug, Default)]
struct CheckStats {
    present: usize,
    unacked_puts_kept: usize,
    unacked_puts_gone: usize,
    unacked_deletes_done: usize,
    scanned: u64,
    /// `binlog-oldest-index..=binlog-current-index`: the segments on disk
    /// (an oldest above 1 means compaction removed some).
    segments: (String, String),
}

/// The checker's connection to a live, idle server: anything but a prompt
/// reply is a failure.
struct Checker {
    conn: Conn,
}

impl Checker {
    fn connect(spool: &Spool) -> Checker {
        let conn = Conn::connect(spool.port).unwrap_or_else(|e| {
            panic!(
                "connecting the checker: {e}; server stderr: {}",
                spool.stderr_text()
            )
        });
        Checker { conn }
    }

    /// Sends `cmds` in batches and returns their replies in order.
    fn pipeline(&mut self, cmds: &[String]) -> Vec<Reply> {
        let mut replies = Vec::with_capacity(cmds.len());
        for batch in cmds.chunks(PIPELINE) {
            let bytes: Vec<u8> = batch.iter().flat_map(|c| c.bytes()).collect();
            self.conn
                .send(&bytes)
                .unwrap_or_else(|e| panic!("checker: sending {:?}…: {e}", batch[0].trim_end()));
            for cmd in batch {
                let reply = self
                    .conn
                    .reply(CHECK_REPLY_TIMEOUT)
                    .unwrap_or_else(|e| panic!("checker: no reply to {:?}: {e}", cmd.trim_end()));
                replies.push(reply);
            }
        }
        replies
    }

    fn call(&mut self, cmd: &str) -> Reply {
        self.conn
            .call(cmd.as_bytes(), CHECK_REPLY_TIMEOUT)
            .unwrap_or_else(|e| panic!("checker: no reply to {:?}: {e}", cmd.trim_end()))
    }
}

/// Everything a failure message needs to be reproduced.
struct Ctx<'a> {
    seed: u64,
    round: usize,
    spool: &'a Spool,
}

impl Ctx<'_> {
    fn fail(&self, what: &str, problems: &[String]) -> ! {
        let shown = problems.len().min(40);
        let round = if self.round >= ROUNDS {
            "the final drain".to_string()
        } else {
            format!(
                "round {} (its load ran with --fsync {})",
                self.round,
                fsync_policy(self.round)
            )
        };
        panic!(
            "crash test failed: {what}\nseed {seed} (rerun with SPOOL_CRASH_SEED={seed}), {round}\n\
             {} problem(s){}:\n  {}\nserver stderr (tail):\n{}",
            problems.len(),
            if shown < problems.len() { ", the first shown" } else { "" },
            problems[..shown].join("\n  "),
            tail(&self.spool.stderr_text(), 4000),
            seed = self.seed,
        );
    }
}

fn tail(s: &str, max: usize) -> &str {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

impl Model {
    /// Folds a round's load into expectations for the server that
    /// recovered from it. Returns the expectations by id, the bodies whose
    /// put may have happened at an id nobody was told, and problems found
    /// in the load's own replies.
    fn expectations(
        &mut self,
        round: usize,
        log: &LoadLog,
        killed_at: Instant,
    ) -> (BTreeMap<u64, Expect>, HashSet<String>, Vec<String>) {
        let mut problems = log.unexpected.clone();
        let mut expect: BTreeMap<u64, Expect> = BTreeMap::new();
        for (&id, seen) in &self.jobs {
            let mut states = vec![seen.state];
            if seen.state == State::Delayed && self.specs[&seen.body].delay == SHORT_DELAY {
                // A short delay may have run out since; whether it should
                // have is judged from its due time with `stats-job`.
                states.push(State::Ready);
            }
            expect.insert(
                id,
                Expect {
                    body: seen.body.clone(),
                    presence: Presence::Must,
                    states,
                    pris: vec![seen.pri],
                    unacked_delete: false,
                    why: format!("present at the check before round {round}"),
                },
            );
        }
        let mut unclaimed = HashSet::new();
        for sent in &log.sent {
            self.specs.insert(
                sent.body.clone(),
                Spec {
                    round,
                    tube: sent.tube,
                    pri: sent.pri,
                    delay: sent.delay,
                    sent_at: sent.sent_at,
                    latest: sent.acked_at.unwrap_or(killed_at),
                },
            );
            let Some((id, buried)) = sent.ack else {
                unclaimed.insert(sent.body.clone());
                continue;
            };
            if self.used_ids.contains(&id) || expect.contains_key(&id) {
                problems.push(format!(
                    "ID REUSED: put of {} acknowledged as id {id}, which an earlier job \
                     (acknowledged or recovered) already had",
                    label(&sent.body)
                ));
                continue;
            }
            expect.insert(
                id,
                Expect {
                    body: sent.body.clone(),
                    presence: Presence::Must,
                    states: if buried {
                        vec![State::Buried]
                    } else {
                        states_for_delay(sent.delay)
                    },
                    pris: vec![sent.pri],
                    unacked_delete: false,
                    why: format!("put acknowledged in round {round} (INSERTED {id})"),
                },
            );
        }
        // A reserved job exists even if its producer never heard back.
        for (id, body) in &log.reserved {
            let body = String::from_utf8_lossy(body).into_owned();
            match expect.get_mut(id) {
                Some(e) if e.body != body => problems.push(format!(
                    "WRONG BODY: id {id} was reserved as {}, but it is {} ({}; {})",
                    label(&body),
                    label(&e.body),
                    e.why,
                    diff(&body, &e.body)
                )),
                Some(e) => {
                    // Reserved means ready (a short delay ran out), and a
                    // reserved job comes back ready.
                    e.allow_state(State::Ready);
                }
                None => match self.specs.get(&body) {
                    Some(spec) if spec.round == round && unclaimed.remove(&body) => {
                        expect.insert(
                            *id,
                            Expect {
                                body: body.clone(),
                                presence: Presence::May,
                                states: vec![State::Ready],
                                pris: vec![spec.pri],
                                unacked_delete: false,
                                why: format!(
                                    "reserved in round {round}; its put was never acknowledged"
                                ),
                            },
                        );
                    }
                    Some(_) => problems.push(format!(
                        "PHANTOM: id {id} was reserved as {}, a job that was acknowledged \
                         under another id or was already gone",
                        label(&body)
                    )),
                    None => problems.push(format!(
                        "PHANTOM: id {id} was reserved as {}, which no producer sent",
                        label(&body)
                    )),
                },
            }
        }
        // Per id, an acknowledged delete or bury is final within a round
        // (nothing kicks during the load); a request without its reply
        // may or may not have happened.
        let mut by_id: BTreeMap<u64, Vec<&Op>> = BTreeMap::new();
        for op in &log.ops {
            by_id.entry(op.id).or_default().push(op);
        }
        for (id, ops) in by_id {
            let Some(e) = expect.get_mut(&id) else {
                // Its reservation was already reported as a problem.
                continue;
            };
            let body_pri = base_pri(&e.body);
            let acked = |k: OpKind| ops.iter().any(|o| o.kind == k && o.acked);
            let unacked = |k: OpKind| ops.iter().any(|o| o.kind == k && !o.acked);
            if acked(OpKind::Delete) {
                e.presence = Presence::Forbidden;
                e.why = format!("delete acknowledged in round {round} (DELETED)");
                continue;
            }
            if unacked(OpKind::Delete) {
                e.presence = Presence::May;
                e.unacked_delete = true;
                e.why = format!("{}; a delete in round {round} got no reply", e.why);
            }
            if acked(OpKind::Bury) {
                e.states = vec![State::Buried];
                e.pris = vec![body_pri + BURY_PRI_OFFSET];
                e.why = format!("{}; bury acknowledged in round {round} (BURIED)", e.why);
                continue;
            }
            e.states = vec![State::Ready];
            if acked(OpKind::Release) {
                e.pris = vec![body_pri];
            }
            if unacked(OpKind::Release) {
                e.allow_pri(body_pri);
            }
            if unacked(OpKind::Bury) {
                e.allow_state(State::Buried);
                e.allow_pri(body_pri + BURY_PRI_OFFSET);
            }
        }
        (expect, unclaimed, problems)
    }

    /// Checks the recovered server against the expectations and makes the
    /// model the state it found.
    fn check(
        &mut self,
        ctx: &Ctx,
        checker: &mut Checker,
        mut expect: BTreeMap<u64, Expect>,
        mut unclaimed: HashSet<String>,
        mut problems: Vec<String>,
    ) -> CheckStats {
        let mut stats = CheckStats::default();
        let hi = expect.keys().copied().max().unwrap_or(0).max(self.max_id) + ID_SCAN_MARGIN;
        stats.scanned = hi;
        // Every id up to past the largest one seen is peeked, so a job
        // nobody was told about cannot hide; `stats` covers ids beyond.
        let cmds: Vec<String> = (1..=hi).map(|id| format!("peek {id}\r\n")).collect();
        let replies = checker.pipeline(&cmds);
        let mut found: BTreeMap<u64, String> = BTreeMap::new();
        let mut bodies: HashMap<String, u64> = HashMap::new();
        for (id, reply) in (1..=hi).zip(replies) {
            let body = match (reply.words().as_slice(), &reply.body) {
                (["FOUND", got, _], Some(body)) if *got == id.to_string() => {
                    String::from_utf8_lossy(body).into_owned()
                }
                (["NOT_FOUND"], _) => {
                    match expect.get(&id) {
                        Some(e) if e.presence == Presence::Must => problems.push(format!(
                            "LOST: id {id} ({}) is gone after the restart: {}",
                            label(&e.body),
                            e.why
                        )),
                        Some(e) if e.presence == Presence::May => {
                            if e.unacked_delete {
                                stats.unacked_deletes_done += 1;
                            } else {
                                // Stricter than an acknowledged put, by
                                // design: the server holds every reply
                                // until the log has its round, so a job it
                                // handed out was in the log, and a reserved
                                // job comes back ready.
                                problems.push(format!(
                                    "VANISHED: id {id} ({}) is gone after the restart, \
                                     but a consumer had reserved it and sent no delete: {}",
                                    label(&e.body),
                                    e.why
                                ));
                            }
                        }
                        _ => {}
                    }
                    continue;
                }
                _ => {
                    problems.push(format!("peek {id} -> {}", reply.text()));
                    continue;
                }
            };
            if let Some(other) = bodies.insert(body.clone(), id) {
                problems.push(format!(
                    "DUPLICATE: {} is both id {other} and id {id}",
                    label(&body)
                ));
            }
            match expect.get(&id) {
                Some(e) if e.presence == Presence::Forbidden => problems.push(format!(
                    "RESURRECTED: id {id} ({}) is back after the restart: {}",
                    label(&body),
                    e.why
                )),
                Some(e) if e.body != body => problems.push(format!(
                    "WRONG BODY: id {id} is {}, expected {} ({}; {})",
                    label(&body),
                    label(&e.body),
                    e.why,
                    diff(&body, &e.body)
                )),
                Some(_) => {}
                None if unclaimed.remove(&body) => {
                    // A put whose reply was lost, recovered: from now on
                    // it is a job like any other.
                    let spec = &self.specs[&body];
                    stats.unacked_puts_kept += 1;
                    expect.insert(
                        id,
                        Expect {
                            body: body.clone(),
                            presence: Presence::May,
                            states: states_for_delay(spec.delay),
                            pris: vec![spec.pri],
                            unacked_delete: false,
                            why: format!("put in round {} without a reply", spec.round),
                        },
                    );
                }
                None => problems.push(match (self.gone.get(&body), self.specs.get(&body)) {
                    (Some(why), _) => format!(
                        "RESURRECTED: id {id} ({}) is back after the restart; it was gone: {why}",
                        label(&body)
                    ),
                    (None, None) => format!(
                        "PHANTOM: id {id} is {}, which no producer sent",
                        label(&body)
                    ),
                    (None, Some(_)) => format!(
                        "PHANTOM: id {id} is {}, which is (or was) another id",
                        label(&body)
                    ),
                }),
            }
            found.insert(id, body);
        }
        stats.unacked_puts_gone = unclaimed.len();
        for body in unclaimed {
            let why = format!(
                "its put in round {} got no reply and was not recovered",
                self.specs[&body].round
            );
            self.gone.insert(body, why);
        }
        for (id, e) in &expect {
            if !found.contains_key(id) {
                self.gone.insert(e.body.clone(), e.why.clone());
            }
        }

        // State, priority, tube and due time of every job found.
        let ids: Vec<u64> = found.keys().copied().collect();
        let cmds: Vec<String> = ids.iter().map(|id| format!("stats-job {id}\r\n")).collect();
        let asked_at = Instant::now();
        let replies = checker.pipeline(&cmds);
        let answered_at = Instant::now();
        let mut jobs = BTreeMap::new();
        for (id, reply) in ids.iter().copied().zip(replies) {
            let body = found[&id].clone();
            let Some(e) = expect.get(&id) else {
                continue; // a phantom, already reported
            };
            let Some(spec) = self.specs.get(&body) else {
                continue;
            };
            if !(reply.line.starts_with("OK ") && reply.body.is_some()) {
                problems.push(format!("stats-job {id} -> {}", reply.text()));
                continue;
            }
            let map = yaml_map(&reply.text_raw());
            let field = |k: &str| map.get(k).map(String::as_str).unwrap_or("<missing>");
            let state = State::parse(field("state"));
            let pri: Option<u32> = field("pri").parse().ok();
            let mut bad = Vec::new();
            if field("tube") != tube_name(spec.tube) {
                bad.push(format!(
                    "tube {} (expected {})",
                    field("tube"),
                    tube_name(spec.tube)
                ));
            }
            if field("ttr") != TTR.to_string() {
                bad.push(format!("ttr {} (expected {TTR})", field("ttr")));
            }
            match state {
                Some(s) if e.states.contains(&s) => {}
                _ => bad.push(format!(
                    "state {} (expected one of {:?})",
                    field("state"),
                    e.states
                )),
            }
            match pri {
                Some(p) if e.pris.contains(&p) => {}
                _ => bad.push(format!(
                    "pri {} (expected one of {:?})",
                    field("pri"),
                    e.pris
                )),
            }
            let age = |at: Instant, now: Instant| now.saturating_duration_since(at);
            match (state, spec.delay) {
                (Some(State::Delayed), LONG_DELAY) => {
                    // Due at put time + delay, whatever restarts happened
                    // since; `time-left` is whole seconds.
                    let lo = u64::from(LONG_DELAY)
                        .saturating_sub(age(spec.sent_at, answered_at).as_secs() + 2);
                    let hi = u64::from(LONG_DELAY)
                        .saturating_sub(age(spec.latest, asked_at).as_secs())
                        + 1;
                    match field("time-left").parse::<u64>() {
                        Ok(left) if (lo..=hi).contains(&left) => {}
                        _ => bad.push(format!(
                            "time-left {} (expected {lo}..={hi}: the due time moved)",
                            field("time-left")
                        )),
                    }
                }
                (Some(State::Delayed), SHORT_DELAY)
                    if asked_at
                        > spec.latest + Duration::from_secs(u64::from(SHORT_DELAY)) + DUE_SLACK =>
                {
                    bad.push(format!(
                        "still delayed {:?} after its due time",
                        age(spec.latest, asked_at) - Duration::from_secs(u64::from(SHORT_DELAY))
                    ));
                }
                (Some(State::Ready), SHORT_DELAY)
                    if answered_at < spec.sent_at + Duration::from_secs(u64::from(SHORT_DELAY)) =>
                {
                    bad.push("ready before its due time".to_string());
                }
                _ => {}
            }
            if !bad.is_empty() {
                problems.push(format!(
                    "WRONG STATE: id {id} ({}): {} ({})",
                    label(&body),
                    bad.join(", "),
                    e.why
                ));
            }
            if let (Some(state), Some(pri)) = (state, pri) {
                jobs.insert(id, Seen { body, state, pri });
            }
        }

        // Jobs past the scanned ids would show up only here.
        let s = yaml_map(&checker.call("stats\r\n").text_raw());
        let count = |k: &str| s.get(k).and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
        let field = |k: &str| s.get(k).cloned().unwrap_or_else(|| "?".to_string());
        stats.segments = (field("binlog-oldest-index"), field("binlog-current-index"));
        let total = count("current-jobs-ready")
            + count("current-jobs-delayed")
            + count("current-jobs-buried")
            + count("current-jobs-reserved");
        if total != found.len() || count("current-jobs-reserved") != 0 {
            problems.push(format!(
                "stats counts {total} jobs ({} reserved), but peeking ids 1..={hi} found {}",
                count("current-jobs-reserved"),
                found.len()
            ));
        }
        if !problems.is_empty() {
            ctx.fail(
                "the recovered state does not match what was acknowledged",
                &problems,
            );
        }
        stats.present = jobs.len();
        self.used_ids.extend(
            expect
                .keys()
                .copied()
                .filter(|id| expect[id].presence != Presence::May || found.contains_key(id)),
        );
        self.used_ids.extend(jobs.keys().copied());
        self.max_id = self.max_id.max(found.keys().last().copied().unwrap_or(0));
        self.max_id = self.max_id.max(
            expect
                .iter()
                .filter(|(_, e)| e.presence != Presence::May)
                .map(|(id, _)| *id)
                .max()
                .unwrap_or(0),
        );
        self.jobs = jobs;
        stats
    }
}

/// Acknowledged changes the checker makes before a round's load: kicks
/// of buried and delayed jobs, so that those are logged and recovered too,
/// and now and then a mass delete, which leaves the log mostly dead so the
/// server compacts it while the next load runs (and maybe gets killed).
/// Returns (kicked, deleted).
fn checker_changes(
    model: &mut Model,
    ctx: &Ctx,
    checker: &mut Checker,
    rng: &mut Rng,
    round: usize,
) -> (usize, usize) {
    let ids_in = |state: State, delay: Option<u32>| -> Vec<u64> {
        model
            .jobs
            .iter()
            .filter(|(_, j)| j.state == state)
            .filter(|(_, j)| delay.is_none_or(|d| model.specs[&j.body].delay == d))
            .map(|(id, _)| *id)
            .collect()
    };
    let buried = ids_in(State::Buried, None);
    let delayed = ids_in(State::Delayed, Some(LONG_DELAY));
    let ready = ids_in(State::Ready, None);
    let mut kicks = Vec::new();
    for _ in 0..2 {
        if !buried.is_empty() {
            kicks.push(buried[rng.below(buried.len() as u64) as usize]);
        }
    }
    if !delayed.is_empty() && rng.below(2) == 0 {
        kicks.push(delayed[rng.below(delayed.len() as u64) as usize]);
    }
    kicks.sort_unstable();
    kicks.dedup();
    let deletes: Vec<u64> = if rng.below(3) == 0 {
        ready
            .into_iter()
            .filter(|id| !kicks.contains(id) && rng.below(10) < 9)
            .collect()
    } else {
        Vec::new()
    };
    let cmds: Vec<String> = kicks
        .iter()
        .map(|id| format!("kick-job {id}\r\n"))
        .chain(deletes.iter().map(|id| format!("delete {id}\r\n")))
        .collect();
    let replies = checker.pipeline(&cmds);
    let mut problems = Vec::new();
    for ((id, cmd), reply) in kicks
        .iter()
        .map(|id| (id, "KICKED"))
        .chain(deletes.iter().map(|id| (id, "DELETED")))
        .zip(replies)
    {
        if reply.line != cmd {
            problems.push(format!(
                "{} {id} -> {} (expected {cmd})",
                if cmd == "KICKED" {
                    "kick-job"
                } else {
                    "delete"
                },
                reply.text()
            ));
        }
    }
    if !problems.is_empty() {
        ctx.fail("the checker's changes to the recovered jobs", &problems);
    }
    for id in &kicks {
        if let Some(job) = model.jobs.get_mut(id) {
            job.state = State::Ready;
        }
    }
    for id in &deletes {
        if let Some(job) = model.jobs.remove(id) {
            let why = format!("deleted by the checker before round {round} (DELETED)");
            model.gone.insert(job.body, why);
        }
    }
    (kicks.len(), deletes.len())
}

/// After the last check: kick everything, drain it with reserve/delete,
/// and check each job comes out exactly once with its body.
fn drain_all(model: &mut Model, ctx: &Ctx, checker: &mut Checker) -> usize {
    let mut problems = Vec::new();
    for t in 0..TUBES {
        checker.call(&format!("watch {}\r\n", tube_name(t)));
    }
    let waiting: Vec<u64> = model
        .jobs
        .iter()
        .filter(|(_, j)| j.state != State::Ready)
        .map(|(id, _)| *id)
        .collect();
    let cmds: Vec<String> = waiting
        .iter()
        .map(|id| format!("kick-job {id}\r\n"))
        .collect();
    for (id, reply) in waiting.iter().zip(checker.pipeline(&cmds)) {
        let short = model.specs[&model.jobs[id].body].delay == SHORT_DELAY;
        // A short delay may have run out since the check: then the job is
        // ready, kick-job answers NOT_FOUND, and the drain must find it.
        if reply.line != "KICKED" && !(short && reply.line == "NOT_FOUND") {
            problems.push(format!("kick-job {id} -> {}", reply.text()))
        }
    }
    // Reserves in batches, then their deletes: one connection may hold
    // many reservations, and pipelining keeps a large drain quick.
    let mut drained: HashSet<u64> = HashSet::new();
    let reserves = vec!["reserve-with-timeout 0\r\n".to_string(); PIPELINE];
    for _ in 0..=model.jobs.len() / PIPELINE + 1 {
        let mut batch = Vec::new();
        let mut empty = false;
        for reply in checker.pipeline(&reserves) {
            let (id, body) = match (reply.words().as_slice(), &reply.body) {
                (["RESERVED", id, _], Some(body)) => (
                    id.parse::<u64>().unwrap_or(0),
                    String::from_utf8_lossy(body).into_owned(),
                ),
                (["TIMED_OUT"], _) => {
                    empty = true;
                    continue;
                }
                _ => {
                    problems.push(format!("reserve-with-timeout 0 -> {}", reply.text()));
                    continue;
                }
            };
            match model.jobs.get(&id) {
                None => problems.push(format!(
                    "drain: reserved id {id} ({}), not a known job",
                    label(&body)
                )),
                Some(j) if j.body != body => problems.push(format!(
                    "drain: reserved id {id} as {}, expected {} ({})",
                    label(&body),
                    label(&j.body),
                    diff(&body, &j.body)
                )),
                Some(_) => {}
            }
            if !drained.insert(id) {
                problems.push(format!("drain: id {id} reserved twice"));
            }
            batch.push(id);
        }
        let deletes: Vec<String> = batch.iter().map(|id| format!("delete {id}\r\n")).collect();
        for (id, reply) in batch.iter().zip(checker.pipeline(&deletes)) {
            if reply.line != "DELETED" {
                problems.push(format!("delete {id} -> {}", reply.text()));
            }
        }
        if empty {
            break;
        }
    }
    for (id, j) in &model.jobs {
        if !drained.contains(id) {
            problems.push(format!(
                "drain: id {id} ({}) never came out",
                label(&j.body)
            ));
        }
    }
    if !problems.is_empty() {
        ctx.fail("draining the recovered jobs", &problems);
    }
    let n = drained.len();
    model.jobs.clear();
    n
}

#[test]
fn acknowledged_writes_survive_kill_9_under_load() {
    let seed = crash_seed();
    println!("crash test seed {seed} (rerun with SPOOL_CRASH_SEED={seed})");
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    // Declared before any server, so it is removed after they are killed.
    let dir = TempDir::new("crash");
    let mut model = Model::default();
    let mut pending: Option<(LoadLog, Instant)> = None;
    let mut early_kills = 0;
    for round in 0..=ROUNDS {
        // Round ROUNDS only checks the last kill and drains.
        let policy = if round == ROUNDS {
            "always"
        } else {
            fsync_policy(round)
        };
        if round > 0 && rng.below(3) == 0 {
            // "Whatever is killed and when" includes recovery itself (it
            // may be cutting off a torn tail): kill a start before it is
            // done, then start for real.
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("picking an ephemeral port")
                .port();
            let mut early = Spool::launch(dir.path(), policy, port)
                .unwrap_or_else(|e| panic!("starting a server to kill early: {e}"));
            std::thread::sleep(Duration::from_millis(rng.below(30)));
            early.kill();
            early_kills += 1;
        }
        let t0 = Instant::now();
        let mut spool = Spool::start(dir.path(), policy).unwrap_or_else(|e| {
            panic!(
                "crash test failed: the server did not come back\nseed {seed} (rerun with \
                 SPOOL_CRASH_SEED={seed}), starting round {round} after the kill in round {}: {e}",
                round.saturating_sub(1)
            )
        });
        let startup = t0.elapsed();
        let mut checker = Checker::connect(&spool);
        let mut line = format!("round {round:2}: start {startup:?}");
        if let Some((log, killed_at)) = pending.take() {
            let ctx = Ctx {
                seed,
                round: round - 1,
                spool: &spool,
            };
            let (expect, unclaimed, problems) = model.expectations(round - 1, &log, killed_at);
            let t1 = Instant::now();
            let s = model.check(&ctx, &mut checker, expect, unclaimed, problems);
            line.push_str(&format!(
                ", check {:?}: {} jobs (ids 1..={} peeked), unacked puts kept {} / gone {}, \
                 unacked deletes done {}, log segments {}..={}",
                t1.elapsed(),
                s.present,
                s.scanned,
                s.unacked_puts_kept,
                s.unacked_puts_gone,
                s.unacked_deletes_done,
                s.segments.0,
                s.segments.1
            ));
        }
        let ctx = Ctx {
            seed,
            round,
            spool: &spool,
        };
        if round == ROUNDS {
            let n = drain_all(&mut model, &ctx, &mut checker);
            drop(checker);
            println!("{line}; drained {n}");
            // The drain's deletes were acknowledged: after one more kill
            // the log must hold no job at all.
            spool.kill();
            drop(spool);
            let spool = Spool::start(dir.path(), "always")
                .unwrap_or_else(|e| panic!("restart after the drain (seed {seed}): {e}"));
            let mut checker = Checker::connect(&spool);
            let s = yaml_map(&checker.call("stats\r\n").text_raw());
            let left: Vec<String> = [
                "current-jobs-ready",
                "current-jobs-delayed",
                "current-jobs-buried",
            ]
            .iter()
            .filter(|k| s.get(**k).map(String::as_str) != Some("0"))
            .map(|k| format!("{k}: {:?}", s.get(*k)))
            .collect();
            if !left.is_empty() {
                Ctx {
                    seed,
                    round,
                    spool: &spool,
                }
                .fail("jobs left after an acknowledged drain and a kill", &left);
            }
            break;
        }
        let (kicked, deleted) = checker_changes(&mut model, &ctx, &mut checker, &mut rng, round);
        drop(checker);
        let load = Duration::from_millis(LOAD_MIN_MS + rng.below(LOAD_MAX_MS - LOAD_MIN_MS + 1));
        let producers = 1 + rng.below(TUBES as u64) as usize;
        let consumers = 2 + rng.below(MAX_CONSUMERS as u64 - 1) as usize;
        let (log, killed_at) = load_and_kill(&mut spool, round, seed, load, producers, consumers);
        let acked = log.sent.iter().filter(|s| s.ack.is_some()).count();
        let count = |k: OpKind, a: bool| {
            log.ops
                .iter()
                .filter(|o| o.kind == k && o.acked == a)
                .count()
        };
        println!(
            "{line}\n          fsync {policy}, kicked {kicked}, deleted {deleted}, load {load:?} \
             ({producers} producers, {consumers} consumers): puts {acked} acked / {} sent, \
             reserves {}, deletes {} (+{} unacked), releases {} (+{}), buries {} (+{}), timeouts {}",
            log.sent.len(),
            log.reserved.len(),
            count(OpKind::Delete, true),
            count(OpKind::Delete, false),
            count(OpKind::Release, true),
            count(OpKind::Release, false),
            count(OpKind::Bury, true),
            count(OpKind::Bury, false),
            log.timeouts,
        );
        pending = Some((log, killed_at));
    }
    println!(
        "crash test passed in {:?} (seed {seed}; {early_kills} starts killed early)",
        started.elapsed()
    );
}
