//! Crash test of the HTTP job API (`/v1`, API.md): `kill -9` the durable
//! server while concurrent job-API clients are mid-flight, restart it on the
//! same data directory, and check that recovery keeps exactly what was
//! acknowledged: nothing acknowledged lost, nothing resurrected.
//!
//! Each round starts `spool serve -b DIR` (`--fsync always` and `never` in
//! turn: a SIGKILL does not lose what reached the OS), checks the recovered
//! state against the model, then runs a few client threads for a random
//! 150–700 ms and kills the server in the middle of it. The clients do a
//! random mix: enqueues (idempotency keys, delays, attempt limits, backoff
//! without jitter), repeated keys, batch enqueues, batch reserves,
//! completions with a result, failures (retried soon or buried when the
//! attempts are used up), heartbeats, cancels (also of jobs another client
//! holds), `PATCH` and `DELETE` with `If-Match`, and heartbeats with a lease
//! handed out before the last restart.
//!
//! The model is what the previous check saw (every job read back, so it is
//! exact) plus what the round's clients were told: a 2xx reply received
//! whole is a promise, a refusal (a whole 4xx) changed nothing, and a
//! request without its whole reply may or may not have happened; the check
//! after the restart resolves each "may" by looking, and allows exactly
//! those. Checked after every restart, for every job:
//! - an acknowledged enqueue or batch job exists, with its payload and
//!   options; an unacknowledged batch is all or none (its jobs are found by
//!   a marker in their payloads, listing every state of every queue);
//! - an acknowledged completion is `completed` with its result, an
//!   acknowledged cancel `cancelled`, an acknowledged delete gone; final and
//!   deleted jobs stay so, and are never handed out again;
//! - the version is at least every version a reply showed, and attempts
//!   count exactly the failures that landed (acknowledged ones, plus
//!   possibly those in flight at the kill), with the last one's error;
//! - a job no change was sent to is exactly as it was: a reserved job is
//!   ready again with its version unchanged (leases are not logged), a
//!   delayed one keeps its due time (or became ready at it);
//! - two acknowledged enqueues with the same key name the same job, also
//!   across restarts, and no key names two jobs;
//! - nothing appears that no request asked for; nothing stays reserved.
//!
//! Interleavings come from the OS scheduler, so a seed does not replay a run
//! exactly; it fixes the load durations and the operation mix.
//! `SPOOL_CRASH_SEED=N` reruns with seed N.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{crash_seed, Rng, Server, TempDir};

/// Kill/restart rounds on one data directory (the last kill is followed by
/// one more restart and check).
const ROUNDS: usize = 6;
/// Rounds run whatever the time budget says.
const MIN_ROUNDS: usize = 2;
/// No new round starts past this (a loaded machine runs fewer rounds).
const TIME_BUDGET: Duration = Duration::from_secs(35);
/// Client threads of each round's load.
const CLIENTS: usize = 4;
/// How long the load runs before the kill, chosen per round.
const LOAD_MIN_MS: u64 = 150;
const LOAD_MAX_MS: u64 = 700;
/// Bounds each client even if it never notices the kill.
const MAX_OPS_PER_CLIENT: usize = 5_000;
/// A load request without its whole reply in this long counts as
/// unanswered and ends the client; generous, as the kill is what should
/// end it.
const LOAD_REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// The checker talks to a live, idle server: a missing reply is a failure.
const CHECK_REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Recovery of the log in a debug build on a loaded machine.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const QUEUES: [&str; 2] = ["cj-a", "cj-b"];
/// The smallest segment the server takes: the log rotates and compacts
/// within the test, so snapshots of job-API jobs are recovered too.
const SEGMENT_BYTES: &str = "1048576";
/// Far beyond the test's length: no lease expires (an expiry would be an
/// attempt nobody sent), a held job stays reserved until the kill.
const TTR_MS: u64 = 600_000;
/// Final jobs stay readable for the whole test, so an acknowledged
/// completion or cancel can always be checked.
const RETENTION_MS: u64 = 7 * 24 * 3_600_000;
const RETENTION_MAX_JOBS: u64 = 1_000_000;
/// A delay that outlives the test: the job must keep its due time.
const LONG_DELAY_MS: u64 = 3_600_000;
/// Varied payload padding, so that the log fills segments.
const MAX_PADDING: u64 = 1_500;
/// Leases kept for the next rounds' stale heartbeats.
const STALE_LEASES_MAX: usize = 200;
/// Listing page size (the server's most).
const LIST_LIMIT: u32 = 1_000;

// ---------------------------------------------------------------------------
// A keep-alive HTTP/1.1 client whose failures are values: for the load, a
// dead server is the expected end of the conversation, not a test failure.

#[derive(Debug)]
struct Http {
    addr: SocketAddr,
    timeout: Duration,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

/// A whole reply: its status and its JSON body (`Null` when empty).
#[derive(Debug)]
struct Reply {
    status: u16,
    body: Value,
}

fn bad_data(what: String) -> std::io::Error {
    std::io::Error::new(ErrorKind::InvalidData, what)
}

impl Http {
    fn new(addr: SocketAddr, timeout: Duration) -> Http {
        Http {
            addr,
            timeout,
            stream: None,
            buf: Vec::new(),
        }
    }

    /// One request. Err when no whole reply came: bytes of a reply cut
    /// short by the kill are never taken for an answer.
    fn request(
        &mut self,
        method: &str,
        path: &str,
        if_match: Option<u64>,
        body: Option<&Value>,
    ) -> std::io::Result<Reply> {
        let result = self.exchange(method, path, if_match, body);
        if result.is_err() {
            // Whatever is left on the connection belongs to no request.
            self.stream = None;
        }
        result
    }

    fn exchange(
        &mut self,
        method: &str,
        path: &str,
        if_match: Option<u64>,
        body: Option<&Value>,
    ) -> std::io::Result<Reply> {
        let deadline = Instant::now() + self.timeout;
        if self.stream.is_none() {
            let stream = TcpStream::connect_timeout(&self.addr, self.timeout)?;
            stream.set_nodelay(true)?;
            stream.set_write_timeout(Some(self.timeout))?;
            self.stream = Some(stream);
            self.buf.clear();
        }
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        if let Some(version) = if_match {
            request.push_str(&format!("If-Match: \"{version}\"\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(&body);
        self.stream
            .as_mut()
            .expect("connected")
            .write_all(request.as_bytes())?;

        let head_end = loop {
            if let Some(pos) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos;
            }
            self.fill(deadline)?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| bad_data(format!("bad status line in {head:?}")))?;
        let mut length = None;
        let mut chunked = false;
        let mut close = false;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            match name.as_str() {
                "content-length" => length = value.parse::<usize>().ok(),
                "transfer-encoding" => chunked = value.contains("chunked"),
                "connection" => close = value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let raw = if chunked {
            self.read_chunked(deadline)?
        } else {
            let length = length.unwrap_or(0);
            while self.buf.len() < length {
                self.fill(deadline)?;
            }
            self.buf.drain(..length).collect()
        };
        if close {
            self.stream = None;
        }
        let body = if raw.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&raw).map_err(|e| {
                bad_data(format!(
                    "{status} reply to {method} {path} is not JSON ({e}): {}",
                    String::from_utf8_lossy(&raw)
                ))
            })?
        };
        Ok(Reply { status, body })
    }

    fn read_chunked(&mut self, deadline: Instant) -> std::io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break pos;
                }
                self.fill(deadline)?;
            };
            let size = std::str::from_utf8(&self.buf[..line_end])
                .ok()
                .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
                .ok_or_else(|| bad_data("bad chunk size".into()))?;
            while self.buf.len() < line_end + 2 + size + 2 {
                self.fill(deadline)?;
            }
            body.extend_from_slice(&self.buf[line_end + 2..line_end + 2 + size]);
            self.buf.drain(..line_end + 2 + size + 2);
            if size == 0 {
                return Ok(body);
            }
        }
    }

    fn fill(&mut self, deadline: Instant) -> std::io::Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        let stream = self.stream.as_mut().expect("connected");
        stream.set_read_timeout(Some(left))?;
        let mut chunk = [0u8; 64 * 1024];
        match stream.read(&mut chunk) {
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

    /// For the checker: the server is up and idle, so anything but a whole
    /// reply is a failure.
    #[track_caller]
    fn call(&mut self, method: &str, path: &str, body: Option<&Value>) -> Reply {
        self.request(method, path, None, body)
            .unwrap_or_else(|e| panic!("{method} {path}: no reply from the live server: {e}"))
    }

    #[track_caller]
    fn ok(&mut self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let reply = self.call(method, path, body);
        assert!(
            (200..300).contains(&reply.status),
            "{method} {path}: {} {}",
            reply.status,
            reply.body
        );
        reply.body
    }
}

// ---------------------------------------------------------------------------
// What the clients sent and were told.

/// What became of one request.
#[derive(Debug, Clone)]
enum Outcome {
    /// A 2xx reply, received whole: a promise.
    Acked(u16, Value),
    /// A whole non-2xx reply: refused, nothing changed.
    Refused(u16, Value),
    /// No whole reply: it may or may not have happened.
    Unknown,
}

#[derive(Debug, Clone)]
enum Kind {
    Enqueue {
        queue: String,
        marker: String,
        payload: Value,
        priority: u32,
        key: Option<String>,
        /// The job the key names already (an acknowledged enqueue's).
        dup_of: Option<u64>,
    },
    Batch {
        queue: String,
        marker: String,
        payloads: Vec<Value>,
        priorities: Vec<u32>,
    },
    Reserve,
    Complete {
        id: u64,
        result: Value,
    },
    Fail {
        id: u64,
        error: String,
    },
    Heartbeat {
        id: u64,
        /// A lease handed out before the last restart.
        stale: bool,
    },
    Cancel {
        id: u64,
    },
    Patch {
        id: u64,
        if_match: u64,
        priority: u32,
    },
    Delete {
        id: u64,
    },
    Get {
        id: u64,
    },
}

/// One request, with its place in the order of all clients' requests:
/// `sent` before it was written, `done` after its reply (or failure).
#[derive(Debug, Clone)]
struct Event {
    sent: u64,
    done: u64,
    kind: Kind,
    outcome: Outcome,
}

/// What the clients of one round share.
#[derive(Debug)]
struct Shared {
    addr: SocketAddr,
    round: usize,
    seq: AtomicU64,
    stop: AtomicBool,
    /// Jobs to cancel, patch, delete or read: (id, has a key). Keyed jobs
    /// are never deleted, so that a key keeps naming its job.
    targets: Mutex<Vec<(u64, bool)>>,
    /// Acknowledged keys: (queue, key, job).
    keys: Mutex<Vec<(String, String, u64)>>,
    /// Leases handed out before the last restart: (job, lease).
    stale_leases: Vec<(u64, String)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn padding(rng: &mut Rng) -> String {
    let n = rng.below(MAX_PADDING + 1);
    (0..n)
        .map(|i| char::from(b'a' + ((i + n) % 26) as u8))
        .collect()
}

fn id_of(job: &Value) -> u64 {
    job["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("a job without an id: {job}"))
}

fn version_of(job: &Value) -> u64 {
    job["version"]
        .as_u64()
        .unwrap_or_else(|| panic!("a job without a version: {job}"))
}

fn state_of(job: &Value) -> &str {
    job["state"]
        .as_str()
        .unwrap_or_else(|| panic!("a job without a state: {job}"))
}

fn attempts_of(job: &Value) -> u64 {
    job["attempts"]
        .as_u64()
        .unwrap_or_else(|| panic!("a job without attempts: {job}"))
}

fn is_final(state: &str) -> bool {
    matches!(state, "completed" | "cancelled")
}

/// One load client: a random mix of job-API calls until the server dies
/// (the first request without a whole reply), the round stops it, or its
/// op budget runs out.
struct Client {
    shared: Arc<Shared>,
    me: usize,
    rng: Rng,
    http: Http,
    events: Vec<Event>,
    /// Leases this client holds: (job, lease).
    held: Vec<(u64, String)>,
    n: usize,
}

impl Client {
    fn run(mut self) -> Vec<Event> {
        while self.events.len() < MAX_OPS_PER_CLIENT && !self.shared.stop.load(Ordering::SeqCst) {
            self.n += 1;
            let alive = if !self.held.is_empty() && self.rng.below(10) < 7 {
                self.work()
            } else {
                match self.rng.below(100) {
                    0..=24 => self.enqueue(),
                    25..=31 => self.duplicate(),
                    32..=41 => self.batch(),
                    42..=69 => self.reserve(),
                    70..=79 => self.cancel(),
                    80..=87 => self.patch(),
                    88..=94 => self.delete(),
                    95..=97 => self.stale_heartbeat(),
                    _ => self.get(),
                }
            };
            if !alive {
                break;
            }
        }
        self.events
    }

    /// Sends one request and records it; None when no whole reply came.
    fn send(
        &mut self,
        kind: Kind,
        method: &str,
        path: &str,
        if_match: Option<u64>,
        body: Option<Value>,
    ) -> Option<Outcome> {
        let sent = self.shared.seq.fetch_add(1, Ordering::SeqCst);
        let outcome = match self.http.request(method, path, if_match, body.as_ref()) {
            Ok(r) if (200..300).contains(&r.status) => Outcome::Acked(r.status, r.body),
            Ok(r) => Outcome::Refused(r.status, r.body),
            Err(_) => Outcome::Unknown,
        };
        let done = self.shared.seq.fetch_add(1, Ordering::SeqCst);
        self.events.push(Event {
            sent,
            done,
            kind,
            outcome: outcome.clone(),
        });
        match outcome {
            Outcome::Unknown => None,
            other => Some(other),
        }
    }

    fn marker(&self, what: char) -> String {
        format!("{what}{}.{}.{}", self.shared.round, self.me, self.n)
    }

    /// Random options of an enqueue body: delays, attempt limits, backoff.
    fn options(&mut self, body: &mut Value) {
        match self.rng.below(10) {
            0 | 1 => body["delay_ms"] = json!(50 + self.rng.below(400)),
            2 => body["delay_ms"] = json!(LONG_DELAY_MS),
            _ => {}
        }
        if self.rng.below(3) == 0 {
            body["max_attempts"] = json!(1 + self.rng.below(4));
        }
        if self.rng.below(2) == 0 {
            // No jitter, short: retries come back within the round.
            body["backoff"] = json!({
                "initial_ms": 20 + self.rng.below(100), "max_ms": 500,
                "multiplier": 2.0, "jitter": 0
            });
        }
    }

    fn queue(&mut self) -> &'static str {
        QUEUES[self.rng.below(QUEUES.len() as u64) as usize]
    }

    fn enqueue(&mut self) -> bool {
        let queue = self.queue();
        let marker = self.marker('s');
        let payload = json!({"m": marker, "p": padding(&mut self.rng)});
        let priority = self.rng.below(2_000) as u32;
        let mut body = json!({"payload": payload, "priority": priority});
        self.options(&mut body);
        let key = (self.rng.below(3) == 0).then(|| format!("k-{marker}"));
        if let Some(key) = &key {
            body["idempotency_key"] = json!(key);
        }
        let kind = Kind::Enqueue {
            queue: queue.to_string(),
            marker,
            payload,
            priority,
            key: key.clone(),
            dup_of: None,
        };
        let path = format!("/v1/queues/{queue}/jobs");
        let Some(outcome) = self.send(kind, "POST", &path, None, Some(body)) else {
            return false;
        };
        if let Outcome::Acked(_, job) = outcome {
            let id = id_of(&job);
            lock(&self.shared.targets).push((id, key.is_some()));
            if let Some(key) = key {
                lock(&self.shared.keys).push((queue.to_string(), key, id));
            }
        }
        true
    }

    /// An enqueue with a key an acknowledged enqueue used (maybe before a
    /// restart): it must name that job and make none.
    fn duplicate(&mut self) -> bool {
        let picked = {
            let keys = lock(&self.shared.keys);
            self.rng.pick(&keys).cloned()
        };
        let Some((queue, key, id)) = picked else {
            return self.enqueue();
        };
        let marker = self.marker('d');
        let payload = json!({"m": marker});
        let priority = self.rng.below(2_000) as u32;
        let body = json!({"payload": payload, "priority": priority, "idempotency_key": key});
        let path = format!("/v1/queues/{queue}/jobs");
        let kind = Kind::Enqueue {
            queue,
            marker,
            payload,
            priority,
            key: Some(key),
            dup_of: Some(id),
        };
        self.send(kind, "POST", &path, None, Some(body)).is_some()
    }

    fn batch(&mut self) -> bool {
        let queue = self.queue();
        let marker = self.marker('b');
        let size = 2 + self.rng.below(5) as usize;
        let mut payloads = Vec::new();
        let mut priorities = Vec::new();
        let mut bodies = Vec::new();
        for i in 0..size {
            let payload = json!({"m": marker, "i": i, "p": padding(&mut self.rng)});
            let priority = self.rng.below(2_000) as u32;
            let mut body = json!({"payload": payload, "priority": priority});
            self.options(&mut body);
            payloads.push(payload);
            priorities.push(priority);
            bodies.push(body);
        }
        let kind = Kind::Batch {
            queue: queue.to_string(),
            marker,
            payloads,
            priorities,
        };
        let path = format!("/v1/queues/{queue}/jobs/batch");
        let body = json!({ "jobs": bodies });
        let Some(outcome) = self.send(kind, "POST", &path, None, Some(body)) else {
            return false;
        };
        if let Outcome::Acked(_, reply) = outcome {
            let mut targets = lock(&self.shared.targets);
            for job in reply["jobs"].as_array().into_iter().flatten() {
                targets.push((id_of(job), false));
            }
        }
        true
    }

    fn reserve(&mut self) -> bool {
        let queues: Vec<&str> = match self.rng.below(3) {
            0 => QUEUES.to_vec(),
            _ => vec![self.queue()],
        };
        let body = json!({
            "queues": queues,
            "batch": 1 + self.rng.below(4),
            "timeout_ms": self.rng.below(200),
        });
        let Some(outcome) = self.send(Kind::Reserve, "POST", "/v1/reserve", None, Some(body))
        else {
            return false;
        };
        if let Outcome::Acked(_, reply) = outcome {
            for job in reply["jobs"].as_array().into_iter().flatten() {
                let lease = job["lease"].as_str().unwrap_or_default().to_string();
                self.held.push((id_of(job), lease));
            }
        }
        true
    }

    /// Works off one held job: complete, fail, heartbeat, or leave it
    /// reserved until the kill.
    fn work(&mut self) -> bool {
        let at = self.rng.below(self.held.len() as u64) as usize;
        let (id, lease) = self.held.swap_remove(at);
        match self.rng.below(100) {
            0..=44 => {
                let result = json!({"r": self.marker('r')});
                let body = json!({"lease": lease, "result": result});
                let kind = Kind::Complete { id, result };
                let path = format!("/v1/jobs/{id}/complete");
                self.send(kind, "POST", &path, None, Some(body)).is_some()
            }
            45..=84 => {
                let error = self.marker('e');
                let mut body = json!({"lease": lease, "error": error});
                if self.rng.below(2) == 0 {
                    // 0 included: ready again at once.
                    body["retry_in_ms"] = json!(self.rng.below(300));
                }
                let kind = Kind::Fail { id, error };
                let path = format!("/v1/jobs/{id}/fail");
                self.send(kind, "POST", &path, None, Some(body)).is_some()
            }
            85..=94 => {
                let body = json!({ "lease": lease });
                let kind = Kind::Heartbeat { id, stale: false };
                let path = format!("/v1/jobs/{id}/heartbeat");
                match self.send(kind, "POST", &path, None, Some(body)) {
                    None => false,
                    Some(Outcome::Acked(..)) => {
                        self.held.push((id, lease));
                        true
                    }
                    Some(_) => true,
                }
            }
            _ => true,
        }
    }

    fn target(&mut self, unkeyed: bool) -> Option<u64> {
        let targets = lock(&self.shared.targets);
        for _ in 0..8 {
            let &(id, keyed) = self.rng.pick(&targets)?;
            if !(unkeyed && keyed) {
                return Some(id);
            }
        }
        None
    }

    /// Reads a random target; false when the server is gone.
    fn get(&mut self) -> bool {
        match self.target(false) {
            Some(id) => self.read(id).is_some(),
            None => true,
        }
    }

    /// Reads a job: Some(Some((version, state))) when it exists,
    /// Some(None) when it does not, None when the server is gone.
    fn read(&mut self, id: u64) -> Option<Option<(u64, String)>> {
        let path = format!("/v1/jobs/{id}");
        match self.send(Kind::Get { id }, "GET", &path, None, None)? {
            Outcome::Acked(_, job) => Some(Some((version_of(&job), state_of(&job).into()))),
            _ => Some(None),
        }
    }

    fn cancel(&mut self) -> bool {
        let Some(id) = self.target(false) else {
            return true;
        };
        // Half of them against the version just read.
        let if_match = if self.rng.below(2) == 0 {
            match self.read(id) {
                None => return false,
                Some(None) => return true,
                Some(Some((version, _))) => Some(version),
            }
        } else {
            None
        };
        let path = format!("/v1/jobs/{id}/cancel");
        self.send(Kind::Cancel { id }, "POST", &path, if_match, None)
            .is_some()
    }

    fn patch(&mut self) -> bool {
        let Some(id) = self.target(false) else {
            return true;
        };
        let (version, state) = match self.read(id) {
            None => return false,
            Some(None) => return true,
            Some(Some(read)) => read,
        };
        if !matches!(state.as_str(), "ready" | "delayed" | "buried") {
            return true;
        }
        let priority = self.rng.below(2_000) as u32;
        let kind = Kind::Patch {
            id,
            if_match: version,
            priority,
        };
        let path = format!("/v1/jobs/{id}");
        let body = json!({ "priority": priority });
        self.send(kind, "PATCH", &path, Some(version), Some(body))
            .is_some()
    }

    /// Deletes only a job just read as live, against that version: a
    /// delete never lands on a final job, so final jobs stay checkable.
    fn delete(&mut self) -> bool {
        let Some(id) = self.target(true) else {
            return true;
        };
        let version = match self.read(id) {
            None => return false,
            Some(Some((version, state)))
                if matches!(state.as_str(), "ready" | "delayed" | "buried") =>
            {
                version
            }
            Some(_) => return true,
        };
        let path = format!("/v1/jobs/{id}");
        self.send(Kind::Delete { id }, "DELETE", &path, Some(version), None)
            .is_some()
    }

    /// A heartbeat with a lease from before the last restart: the holder
    /// of a lease from a previous life of the server holds nothing now.
    fn stale_heartbeat(&mut self) -> bool {
        let Some((id, lease)) = self.rng.pick(&self.shared.stale_leases).cloned() else {
            return true;
        };
        let kind = Kind::Heartbeat { id, stale: true };
        let path = format!("/v1/jobs/{id}/heartbeat");
        let body = json!({ "lease": lease });
        self.send(kind, "POST", &path, None, Some(body)).is_some()
    }
}

// ---------------------------------------------------------------------------
// The model.

/// An enqueue or batch request as sent, by its marker.
#[derive(Debug)]
struct Sent {
    queue: String,
    batch: bool,
    payloads: Vec<Value>,
    priorities: Vec<u32>,
    key: Option<String>,
    /// An acknowledged duplicate: it made no job.
    duplicate: bool,
    /// The reply was acknowledged (its jobs are in the model).
    acked: bool,
}

/// What one round's replies said about a job; cleared by each check.
#[derive(Debug, Default)]
struct Facts {
    /// The highest version a whole 2xx reply showed.
    seen_version: u64,
    /// Completions that may have landed: (result, acknowledged).
    completes: Vec<(Value, bool)>,
    /// Failures that may have landed: (error, the version its reply showed).
    fails: Vec<(String, Option<u64>)>,
    cancel_acked: bool,
    cancel_maybe: bool,
    /// Patches that may have landed: (If-Match, priority, reply's version).
    patches: Vec<(u64, u32, Option<u64>)>,
    delete_acked: bool,
    delete_maybe: bool,
    /// The earliest reply (its `done`) that acknowledged the job completed,
    /// cancelled or deleted: no reserve sent after it may hand it out.
    ended_at: Option<u64>,
    /// A change was sent that was not refused.
    changed: bool,
    /// A read found the job absent.
    read_absent: bool,
}

#[derive(Debug)]
struct JobModel {
    id: u64,
    queue: String,
    /// The request that made it, and the job's index in it.
    marker: String,
    index: usize,
    payload: Value,
    priority: u32,
    key: Option<String>,
    /// The job as the last check read it, or as the reply that made it
    /// showed it; None for a job first seen in a reserve or a listing.
    base: Option<Value>,
    /// The check found it deleted: it must stay gone.
    gone: bool,
    facts: Facts,
}

/// Totals for the report.
#[derive(Debug, Default)]
struct Counts {
    acked: BTreeMap<&'static str, usize>,
    refused: usize,
    unknown: usize,
    stale_refused: usize,
}

#[derive(Debug, Default)]
struct Model {
    jobs: BTreeMap<u64, JobModel>,
    sent: HashMap<String, Sent>,
    /// (queue, key) → the job the key names.
    keys: BTreeMap<(String, String), u64>,
    stale_leases: Vec<(u64, String)>,
    counts: Counts,
}

fn kind_name(kind: &Kind) -> &'static str {
    match kind {
        Kind::Enqueue {
            dup_of: Some(_), ..
        } => "enqueue (repeated key)",
        Kind::Enqueue { .. } => "enqueue",
        Kind::Batch { .. } => "batch",
        Kind::Reserve => "reserve",
        Kind::Complete { .. } => "complete",
        Kind::Fail { .. } => "fail",
        Kind::Heartbeat { stale: true, .. } => "heartbeat (stale lease)",
        Kind::Heartbeat { .. } => "heartbeat",
        Kind::Cancel { .. } => "cancel",
        Kind::Patch { .. } => "patch",
        Kind::Delete { .. } => "delete",
        Kind::Get { .. } => "get",
    }
}

impl Model {
    /// Adds a job first seen in a reserve or a listing: it must come from
    /// an enqueue whose reply was lost, or from a batch.
    fn adopt(&mut self, job: &Value, how: &str) {
        let id = id_of(job);
        let marker = job["payload"]["m"].as_str().unwrap_or_default().to_string();
        let index = job["payload"]["i"].as_u64().unwrap_or(0) as usize;
        let sent = self.sent.get(&marker).unwrap_or_else(|| {
            panic!("{how}: job {id} was never enqueued (no request has its marker): {job}")
        });
        assert!(
            !sent.duplicate,
            "{how}: job {id} was made by an enqueue acknowledged as a duplicate \
             (it must make no job): {job}"
        );
        assert!(
            !sent.acked || sent.batch,
            "{how}: job {id} was made by an acknowledged enqueue of another job: {job}"
        );
        let twin = self
            .jobs
            .values()
            .find(|j| j.marker == marker && j.index == index);
        if let Some(twin) = twin {
            panic!(
                "{how}: job {id} and job {} were both made by one request ({marker:?} #{index}): {job}",
                twin.id
            );
        }
        let payload = sent.payloads.get(index).cloned().unwrap_or_else(|| {
            panic!("{how}: job {id} has an index its batch does not have: {job}")
        });
        self.jobs.insert(
            id,
            JobModel {
                id,
                queue: sent.queue.clone(),
                marker,
                index,
                payload,
                priority: sent.priorities[index],
                key: sent.key.clone(),
                base: None,
                gone: false,
                facts: Facts::default(),
            },
        );
    }

    /// A whole 2xx reply showed `job`: it exists, with at least this
    /// version, and it is the job the model knows under its id.
    fn observe(&mut self, job: &Value, how: &str, sent_at: u64) {
        let id = id_of(job);
        if !self.jobs.contains_key(&id) {
            self.adopt(job, how);
        }
        let m = self.jobs.get_mut(&id).expect("adopted");
        assert!(
            !m.gone,
            "{how}: job {id}, deleted before the last restart, is back: {job}"
        );
        assert_eq!(
            job["payload"], m.payload,
            "{how}: job {id} has another job's payload"
        );
        if how == "reserve" {
            if let Some(base) = &m.base {
                assert!(
                    !is_final(state_of(base)),
                    "reserve: job {id}, final before the last restart, was handed out again: \
                     {job}\nwas: {base}"
                );
            }
            if let Some(ended) = m.facts.ended_at.filter(|&at| at < sent_at) {
                panic!(
                    "reserve: job {id} was handed out by a reserve sent after a reply \
                     acknowledged it completed, cancelled or deleted (at {ended}): {job}"
                );
            }
        }
        m.facts.seen_version = m.facts.seen_version.max(version_of(job));
    }

    fn job_mut(&mut self, id: u64, how: &str) -> &mut JobModel {
        self.jobs
            .get_mut(&id)
            .unwrap_or_else(|| panic!("{how}: job {id} is not one the clients knew"))
    }

    /// Folds a round's events into the model, checking what the replies
    /// alone can show (a duplicate naming its job, a final job handed out
    /// again, a stale lease honoured).
    fn fold(&mut self, mut events: Vec<Event>) {
        // Enqueues first: a parked reserve sent before an enqueue may hand
        // out its job, and the job must be known by then. Creation aside,
        // the order of sending is what the checks need.
        events.sort_by_key(|e| {
            let creates = matches!(e.kind, Kind::Enqueue { .. } | Kind::Batch { .. });
            (!creates, e.sent)
        });
        for event in events {
            let name = kind_name(&event.kind);
            match &event.outcome {
                Outcome::Acked(..) => *self.counts.acked.entry(name).or_default() += 1,
                Outcome::Refused(..) => self.counts.refused += 1,
                Outcome::Unknown => self.counts.unknown += 1,
            }
            self.fold_one(event);
        }
    }

    fn fold_one(&mut self, event: Event) {
        let Event {
            sent: sent_at,
            done,
            kind,
            outcome,
        } = event;
        let name = kind_name(&kind);
        // Refusals each request may get; anything else (a 5xx above all)
        // is a failure.
        if let Outcome::Refused(status, body) = &outcome {
            let allowed: &[u16] = match &kind {
                Kind::Complete { .. } | Kind::Fail { .. } => &[409],
                Kind::Heartbeat { .. } => &[404, 409],
                Kind::Cancel { .. } | Kind::Patch { .. } | Kind::Delete { .. } => &[404, 409, 412],
                Kind::Get { .. } => &[404],
                _ => &[],
            };
            assert!(
                allowed.contains(status),
                "{name} {kind:?}: refused with {status}: {body}"
            );
        }
        match kind {
            Kind::Enqueue {
                queue,
                marker,
                payload,
                priority,
                key,
                dup_of,
            } => {
                let mut sent = Sent {
                    queue: queue.clone(),
                    batch: false,
                    payloads: vec![payload.clone()],
                    priorities: vec![priority],
                    key: key.clone(),
                    duplicate: false,
                    acked: false,
                };
                if let Outcome::Acked(status, job) = &outcome {
                    let id = id_of(job);
                    sent.acked = true;
                    if let Some(named) = dup_of {
                        assert_eq!(
                            (*status, job["duplicate"].as_bool(), id),
                            (200, Some(true), named),
                            "an enqueue with the key {key:?} of job {named} must name that job \
                             and make none: {job}"
                        );
                        sent.duplicate = true;
                        self.sent.insert(marker, sent);
                        self.observe(job, name, sent_at);
                        return;
                    }
                    assert_eq!(
                        (*status, job["duplicate"].as_bool()),
                        (201, Some(false)),
                        "an enqueue with a fresh key or none makes a job: {job}"
                    );
                    assert!(
                        !self.jobs.contains_key(&id),
                        "enqueue: id {id} given twice: {job}"
                    );
                    self.sent.insert(marker.clone(), sent);
                    if let Some(key) = &key {
                        self.keys.insert((queue.clone(), key.clone()), id);
                    }
                    self.jobs.insert(
                        id,
                        JobModel {
                            id,
                            queue,
                            marker,
                            index: 0,
                            payload,
                            priority,
                            key,
                            base: Some(without(job, "duplicate")),
                            gone: false,
                            facts: Facts::default(),
                        },
                    );
                    self.observe(job, name, sent_at);
                } else {
                    self.sent.insert(marker, sent);
                }
            }
            Kind::Batch {
                queue,
                marker,
                payloads,
                priorities,
            } => {
                let acked = matches!(outcome, Outcome::Acked(..));
                self.sent.insert(
                    marker.clone(),
                    Sent {
                        queue: queue.clone(),
                        batch: true,
                        payloads: payloads.clone(),
                        priorities: priorities.clone(),
                        key: None,
                        duplicate: false,
                        acked,
                    },
                );
                if let Outcome::Acked(_, reply) = &outcome {
                    let jobs = reply["jobs"].as_array().cloned().unwrap_or_default();
                    assert_eq!(
                        jobs.len(),
                        payloads.len(),
                        "a batch of {} jobs acknowledged with {reply}",
                        payloads.len()
                    );
                    for (index, job) in jobs.iter().enumerate() {
                        let id = id_of(job);
                        assert!(
                            !self.jobs.contains_key(&id),
                            "batch: id {id} given twice: {job}"
                        );
                        self.jobs.insert(
                            id,
                            JobModel {
                                id,
                                queue: queue.clone(),
                                marker: marker.clone(),
                                index,
                                payload: payloads[index].clone(),
                                priority: priorities[index],
                                key: None,
                                base: Some(job.clone()),
                                gone: false,
                                facts: Facts::default(),
                            },
                        );
                        self.observe(job, name, sent_at);
                    }
                }
            }
            Kind::Reserve => {
                if let Outcome::Acked(_, reply) = &outcome {
                    for job in reply["jobs"].as_array().into_iter().flatten() {
                        assert_eq!(state_of(job), "reserved", "reserve: {job}");
                        self.observe(job, name, sent_at);
                        if let Some(lease) = job["lease"].as_str() {
                            self.stale_leases.push((id_of(job), lease.to_string()));
                        }
                    }
                }
            }
            Kind::Complete { id, result } => {
                let acked = match &outcome {
                    Outcome::Acked(_, job) => {
                        assert_eq!(
                            (state_of(job), &job["result"]),
                            ("completed", &result),
                            "complete of job {id}: {job}"
                        );
                        self.observe(job, name, sent_at);
                        true
                    }
                    Outcome::Refused(..) => return,
                    Outcome::Unknown => false,
                };
                let f = &mut self.job_mut(id, name).facts;
                f.completes.push((result, acked));
                f.changed = true;
                if acked {
                    f.ended_at = Some(f.ended_at.map_or(done, |at| at.min(done)));
                }
            }
            Kind::Fail { id, error } => {
                let version = match &outcome {
                    Outcome::Acked(_, job) => {
                        assert!(
                            matches!(state_of(job), "delayed" | "ready" | "buried")
                                && job["last_error"] == json!(error),
                            "fail of job {id}: {job}"
                        );
                        self.observe(job, name, sent_at);
                        Some(version_of(job))
                    }
                    Outcome::Refused(..) => return,
                    Outcome::Unknown => None,
                };
                let f = &mut self.job_mut(id, name).facts;
                f.fails.push((error, version));
                f.changed = true;
            }
            Kind::Heartbeat { id, stale } => match &outcome {
                Outcome::Acked(_, reply) if stale => panic!(
                    "job {id}: a heartbeat with a lease handed out before a restart was \
                     honoured ({reply}): a lease from a previous life of the server must \
                     not match a lease of this one"
                ),
                Outcome::Refused(..) if stale => self.counts.stale_refused += 1,
                _ => {}
            },
            Kind::Cancel { id } => {
                let acked = match &outcome {
                    Outcome::Acked(_, job) => {
                        assert_eq!(state_of(job), "cancelled", "cancel of job {id}: {job}");
                        self.observe(job, name, sent_at);
                        true
                    }
                    Outcome::Refused(..) => return,
                    Outcome::Unknown => false,
                };
                let f = &mut self.job_mut(id, name).facts;
                f.changed = true;
                if acked {
                    f.cancel_acked = true;
                    f.ended_at = Some(f.ended_at.map_or(done, |at| at.min(done)));
                } else {
                    f.cancel_maybe = true;
                }
            }
            Kind::Patch {
                id,
                if_match,
                priority,
            } => {
                let version = match &outcome {
                    Outcome::Acked(_, job) => {
                        assert_eq!(job["priority"], json!(priority), "patch of job {id}: {job}");
                        self.observe(job, name, sent_at);
                        Some(version_of(job))
                    }
                    Outcome::Refused(..) => return,
                    Outcome::Unknown => None,
                };
                let f = &mut self.job_mut(id, name).facts;
                f.patches.push((if_match, priority, version));
                f.changed = true;
            }
            Kind::Delete { id } => {
                let acked = match &outcome {
                    Outcome::Acked(..) => true,
                    Outcome::Refused(..) => return,
                    Outcome::Unknown => false,
                };
                let f = &mut self.job_mut(id, name).facts;
                f.changed = true;
                if acked {
                    f.delete_acked = true;
                    f.ended_at = Some(f.ended_at.map_or(done, |at| at.min(done)));
                } else {
                    f.delete_maybe = true;
                }
            }
            Kind::Get { id } => match &outcome {
                Outcome::Acked(_, job) => self.observe(job, name, sent_at),
                Outcome::Refused(..) => self.job_mut(id, name).facts.read_absent = true,
                Outcome::Unknown => {}
            },
        }
    }
}

/// `job` without one field.
fn without(job: &Value, field: &str) -> Value {
    let mut job = job.clone();
    if let Some(map) = job.as_object_mut() {
        map.remove(field);
    }
    job
}

// ---------------------------------------------------------------------------
// The check after a restart.

/// Every job of every queue in every state, by id, paging through the
/// listings. With no client connected, the only move is a delayed job
/// falling due, so delayed jobs are listed before ready ones: a job that
/// moves in between is listed twice (the later one kept), never missed.
fn list_all(http: &mut Http) -> BTreeMap<u64, Value> {
    let mut all: BTreeMap<u64, Value> = BTreeMap::new();
    for queue in QUEUES {
        for state in [
            "delayed",
            "ready",
            "reserved",
            "buried",
            "completed",
            "cancelled",
        ] {
            let mut after = 0u64;
            // Bounded: each page moves `after` forward.
            for _ in 0..10_000 {
                let path = format!(
                    "/v1/queues/{queue}/jobs?state={state}&limit={LIST_LIMIT}&after={after}"
                );
                let page = http.ok("GET", &path, None);
                for job in page["jobs"].as_array().into_iter().flatten() {
                    let id = id_of(job);
                    if let Some(twice) = all.insert(id, job.clone()) {
                        assert!(
                            state_of(&twice) == "delayed" && state == "ready",
                            "job {id} listed twice: {twice} and {job}"
                        );
                    }
                }
                match page["next"].as_u64() {
                    Some(next) if next > after => after = next,
                    _ => break,
                }
            }
        }
    }
    all
}

/// The fields of a job nothing in this test changes.
const FIXED_FIELDS: [&str; 8] = [
    "id",
    "queue",
    "payload",
    "headers",
    "max_attempts",
    "backoff",
    "ttr_ms",
    "created_at",
];

/// Checks one job as the restarted server shows it (`got`, None when
/// absent) against the model, then makes that the job's new base.
fn check_job(m: &mut JobModel, got: Option<&Value>, round: usize) {
    let id = m.id;
    let f = std::mem::take(&mut m.facts);
    let ctx = || {
        format!(
            "after restart {round}, job {id} ({:?} #{})",
            m.marker, m.index
        )
    };
    if m.gone {
        assert!(
            got.is_none(),
            "{}: deleted earlier, it is back: {got:?}",
            ctx()
        );
        return;
    }
    assert!(
        !f.read_absent || f.delete_acked || f.delete_maybe,
        "{}: a read found it absent during the load, and no delete was sent",
        ctx()
    );
    let Some(v) = got else {
        assert!(
            f.delete_acked || f.delete_maybe,
            "{}: LOST: it is gone, and no delete was sent; what was known: {:?}; facts: {f:?}",
            ctx(),
            m.base
        );
        m.gone = true;
        return;
    };
    let (state, version, attempts) = (state_of(v), version_of(v), attempts_of(v));
    assert!(
        !f.delete_acked,
        "{}: RESURRECTED: acknowledged deleted, it is back: {v}",
        ctx()
    );
    assert_eq!(v["payload"], m.payload, "{}: wrong payload", ctx());
    assert_eq!(v["queue"], json!(m.queue), "{}: wrong queue", ctx());
    assert_eq!(
        v["idempotency_key"],
        json!(m.key),
        "{}: wrong idempotency key",
        ctx()
    );
    assert!(
        state != "reserved",
        "{}: reserved after a restart (leases are not logged): {v}",
        ctx()
    );
    assert!(
        version >= f.seen_version,
        "{}: version {version} below {} that a reply showed: {v}",
        ctx(),
        f.seen_version
    );
    let base = m.base.take();
    if let Some(base) = &base {
        for field in FIXED_FIELDS {
            assert_eq!(
                v[field],
                base[field],
                "{}: {field} changed (nothing changes it)\nnow: {v}\nwas: {base}",
                ctx()
            );
        }
        assert!(
            version >= version_of(base),
            "{}: version went back\nnow: {v}\nwas: {base}",
            ctx()
        );
        if is_final(state_of(base)) {
            assert_eq!(v, base, "{}: a final job changed (now, was)", ctx());
        }
    }

    // Final states: exactly those a landed request explains.
    let acked_result = f.completes.iter().find(|(_, acked)| *acked).map(|(r, _)| r);
    match state {
        "completed" => {
            let explained = f.completes.iter().any(|(r, _)| *r == v["result"])
                || base.as_ref().is_some_and(|b| state_of(b) == "completed");
            assert!(
                explained,
                "{}: completed with a result no landed completion sent: {v}; facts: {f:?}",
                ctx()
            );
            if let Some(result) = acked_result {
                assert_eq!(&v["result"], result, "{}: the acknowledged result", ctx());
            }
            assert!(
                !f.cancel_acked,
                "{}: acknowledged both cancelled and completed: {v}",
                ctx()
            );
        }
        "cancelled" => {
            let explained = f.cancel_acked
                || f.cancel_maybe
                || base.as_ref().is_some_and(|b| state_of(b) == "cancelled");
            assert!(explained, "{}: cancelled, no cancel sent: {v}", ctx());
            assert!(
                acked_result.is_none(),
                "{}: acknowledged completed, it is cancelled: {v}; facts: {f:?}",
                ctx()
            );
        }
        _ => {
            assert!(
                acked_result.is_none() && !f.cancel_acked,
                "{}: RESURRECTED: acknowledged completed or cancelled, it is {state}: {v}; facts: {f:?}",
                ctx()
            );
        }
    }
    assert_eq!(
        v["cancel_requested"],
        json!(state == "cancelled"),
        "{}: cancel_requested",
        ctx()
    );

    // Attempts: the failures that landed, no more, no fewer.
    let base_attempts = base.as_ref().map_or(0, attempts_of);
    let acked_fails = f.fails.iter().filter(|(_, v)| v.is_some()).count() as u64;
    let maybe_fails = f.fails.len() as u64 - acked_fails;
    let (lo, hi) = (
        base_attempts + acked_fails,
        base_attempts + acked_fails + maybe_fails,
    );
    assert!(
        (lo..=hi).contains(&attempts),
        "{}: attempts {attempts}, expected {lo}..={hi} (acknowledged failures {acked_fails}, \
         in flight {maybe_fails}): {v}",
        ctx()
    );
    let last_acked_error = f
        .fails
        .iter()
        .filter_map(|(e, v)| v.map(|v| (v, e)))
        .max()
        .map(|(_, e)| json!(e));
    let landed = attempts - base_attempts;
    if landed == 0 {
        let before = base
            .as_ref()
            .map_or(Value::Null, |b| b["last_error"].clone());
        assert_eq!(v["last_error"], before, "{}: last_error", ctx());
    } else {
        let mut allowed: Vec<Value> = f
            .fails
            .iter()
            .filter(|(_, v)| v.is_none())
            .map(|(e, _)| json!(e))
            .collect();
        allowed.extend(last_acked_error);
        assert!(
            allowed.contains(&v["last_error"]),
            "{}: last_error is none of the failures that may be the last: {v}; facts: {f:?}",
            ctx()
        );
    }
    if !is_final(state) {
        let max_attempts = v["max_attempts"].as_u64().unwrap_or(0);
        assert_eq!(
            state == "buried",
            max_attempts > 0 && attempts >= max_attempts,
            "{}: buried exactly when the attempts are used up: {v}",
            ctx()
        );
    }

    // Priority: the last patch that landed.
    let base_priority = base
        .as_ref()
        .map_or(json!(m.priority), |b| b["priority"].clone());
    let last_acked_patch = f
        .patches
        .iter()
        .filter_map(|&(_, p, v)| v.map(|v| (v, p)))
        .max();
    let mut allowed: Vec<Value> = match last_acked_patch {
        Some((_, p)) => vec![json!(p)],
        None => vec![base_priority],
    };
    let after = last_acked_patch.map_or(0, |(v, _)| v);
    allowed.extend(
        f.patches
            .iter()
            .filter(|&&(if_match, _, v)| v.is_none() && if_match >= after)
            .map(|&(_, p, _)| json!(p)),
    );
    assert!(
        allowed.contains(&v["priority"]),
        "{}: priority none of {allowed:?}: {v}; facts: {f:?}",
        ctx()
    );

    // A job no change was sent to is as it was: a reserved one ready
    // again with its version, a delayed one with its due time (or ready
    // since it, one version on).
    if let (false, Some(base)) = (f.changed, &base) {
        let mut expected = base.clone();
        if state_of(base) == "delayed" && state == "ready" {
            expected["state"] = json!("ready");
            expected["updated_at"] = base["run_at"].clone();
            expected["run_at"] = Value::Null;
            expected["version"] = json!(version_of(base) + 1);
        }
        assert_eq!(
            v,
            &expected,
            "{}: no change was sent, yet it changed (now, expected)",
            ctx()
        );
    }
    m.base = Some(v.clone());
}

/// The check after a restart: reads every job the model knows and every
/// job the listings hold, and resolves what the round left open.
fn check(model: &mut Model, http: &mut Http, round: usize) {
    for queue in QUEUES {
        let info = http.ok("GET", &format!("/v1/queues/{queue}"), None);
        assert_eq!(
            (
                &info["policy"]["retention_ms"],
                &info["policy"]["retention_max_jobs"],
                &info["policy"]["ttr_ms"]
            ),
            (
                &json!(RETENTION_MS),
                &json!(RETENTION_MAX_JOBS),
                &json!(TTR_MS)
            ),
            "after restart {round}: the policy of {queue}: {info}"
        );
    }
    let listed = list_all(http);
    for (&id, job) in &listed {
        if !model.jobs.contains_key(&id) {
            // Made by a request whose reply was lost: it landed.
            model.adopt(job, &format!("after restart {round}, listing"));
        }
    }
    let ids: Vec<u64> = model.jobs.keys().copied().collect();
    for id in ids {
        let reply = http.call("GET", &format!("/v1/jobs/{id}"), None);
        let got = match reply.status {
            200 => Some(reply.body),
            404 => None,
            other => panic!("GET /v1/jobs/{id}: {other} {}", reply.body),
        };
        assert_eq!(
            got.is_some(),
            listed.contains_key(&id),
            "after restart {round}: job {id} read as {got:?} but listed as {:?}",
            listed.get(&id)
        );
        let m = model.jobs.get_mut(&id).expect("known");
        check_job(m, got.as_ref(), round);
    }

    // Batches: all or none, acknowledged ones all.
    let mut by_request: HashMap<&str, BTreeSet<usize>> = HashMap::new();
    for m in model.jobs.values() {
        by_request.entry(&m.marker).or_default().insert(m.index);
    }
    for (marker, sent) in &model.sent {
        let made = by_request.get(marker.as_str()).map_or(0, BTreeSet::len);
        if sent.batch {
            assert!(
                made == sent.payloads.len() || (made == 0 && !sent.acked),
                "after restart {round}: batch {marker:?} of {} jobs ({}) made {made}: \
                 all or none",
                sent.payloads.len(),
                if sent.acked {
                    "acknowledged"
                } else {
                    "reply lost"
                },
            );
        } else {
            assert!(
                made <= 1 && (made == 1 || !sent.acked || sent.duplicate),
                "after restart {round}: enqueue {marker:?} made {made} jobs"
            );
        }
    }

    // Keys: each names one job, the one acknowledged enqueues named.
    let mut named: BTreeMap<(String, String), u64> = BTreeMap::new();
    for m in model.jobs.values() {
        let Some(key) = &m.key else { continue };
        if m.gone || m.base.is_none() {
            continue;
        }
        let entry = (m.queue.clone(), key.clone());
        if let Some(other) = named.insert(entry.clone(), m.id) {
            panic!(
                "after restart {round}: key {key:?} names both job {other} and job {}",
                m.id
            );
        }
        match model.keys.get(&entry) {
            Some(&bound) => assert_eq!(
                bound, m.id,
                "after restart {round}: key {key:?} was acknowledged for job {bound}, \
                 job {} has it",
                m.id
            ),
            None => {
                model.keys.insert(entry, m.id);
            }
        }
    }
    for (entry, id) in &model.keys {
        assert_eq!(
            named.get(entry),
            Some(id),
            "after restart {round}: key {entry:?} of job {id} names no job"
        );
    }

    let keep = model.stale_leases.len().saturating_sub(STALE_LEASES_MAX);
    model.stale_leases.drain(..keep);
}

// ---------------------------------------------------------------------------
// The rounds.

fn fsync_policy(round: usize) -> &'static str {
    if round.is_multiple_of(2) {
        "always"
    } else {
        "never"
    }
}

fn start(dir: &Path, round: usize) -> (Server, Http) {
    let server = Server::start_durable(dir, &["--fsync", fsync_policy(round), "-s", SEGMENT_BYTES]);
    let mut http = Http::new(server.http_addr(), CHECK_REPLY_TIMEOUT);
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(reply) = http.request("GET", "/readyz", None, None) {
            if reply.status == 200 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "round {round}: not ready after {READY_TIMEOUT:?}: {}",
            server.output_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (server, http)
}

#[test]
fn kill_9_under_job_api_load_keeps_what_was_acknowledged() {
    let seed = crash_seed();
    eprintln!("crash_jobs: SPOOL_CRASH_SEED={seed}");
    let mut rng = Rng::new(seed);
    let dir = TempDir::new("crash-jobs");
    let began = Instant::now();
    let mut model = Model::default();
    let mut rounds = 0;
    let mut events_total = 0;

    for round in 0..=ROUNDS {
        let (server, mut http) = start(dir.path(), round);
        if round == 0 {
            for queue in QUEUES {
                let policy = json!({
                    "ttr_ms": TTR_MS,
                    "retention_ms": RETENTION_MS,
                    "retention_max_jobs": RETENTION_MAX_JOBS,
                });
                http.ok("PUT", &format!("/v1/queues/{queue}/policy"), Some(&policy));
            }
        }
        check(&mut model, &mut http, round);
        let out_of_time = round >= MIN_ROUNDS && began.elapsed() > TIME_BUDGET;
        if round == ROUNDS || out_of_time {
            break;
        }

        let shared = Arc::new(Shared {
            addr: server.http_addr(),
            round,
            seq: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            targets: Mutex::new(
                model
                    .jobs
                    .values()
                    .filter(|m| !m.gone && m.base.as_ref().is_some_and(|b| !is_final(state_of(b))))
                    .map(|m| (m.id, m.key.is_some()))
                    .collect(),
            ),
            keys: Mutex::new(
                model
                    .keys
                    .iter()
                    .map(|((q, k), &id)| (q.clone(), k.clone(), id))
                    .collect(),
            ),
            stale_leases: model.stale_leases.clone(),
        });
        let clients: Vec<_> = (0..CLIENTS)
            .map(|me| {
                let client = Client {
                    shared: shared.clone(),
                    me,
                    rng: Rng::new(rng.next()),
                    http: Http::new(shared.addr, LOAD_REPLY_TIMEOUT),
                    events: Vec::new(),
                    held: Vec::new(),
                    n: 0,
                };
                std::thread::spawn(move || client.run())
            })
            .collect();
        let load_ms = LOAD_MIN_MS + rng.below(LOAD_MAX_MS - LOAD_MIN_MS + 1);
        std::thread::sleep(Duration::from_millis(load_ms));
        // Clients between requests stop (none connects anew, to a port
        // another server may take); those mid-request are cut by the
        // SIGKILL that dropping the server sends.
        shared.stop.store(true, Ordering::SeqCst);
        drop(server);
        let mut events = Vec::new();
        for client in clients {
            events.extend(client.join().expect("a load client panicked"));
        }
        events_total += events.len();
        model.fold(events);
        rounds += 1;
    }

    let jobs = model.jobs.values().filter(|m| !m.gone).count();
    let states = model.jobs.values().filter_map(|m| m.base.as_ref()).fold(
        BTreeMap::<String, usize>::new(),
        |mut acc, b| {
            *acc.entry(state_of(b).to_string()).or_default() += 1;
            acc
        },
    );
    eprintln!(
        "crash_jobs: {rounds} kills in {:?}, {events_total} requests; acknowledged {:?}; \
         refused {}, lost at a kill {}, stale leases refused {}; {jobs} jobs kept {states:?}",
        began.elapsed(),
        model.counts.acked,
        model.counts.refused,
        model.counts.unknown,
        model.counts.stale_refused,
    );
    assert!(rounds >= MIN_ROUNDS, "only {rounds} rounds ran");
}

/// A restart ends every reservation, and leases are not logged: a lease
/// handed out before a kill must name nothing after the restart, even when
/// the same job is reserved again. (Tokens counted from 1 in each life of
/// the server gave the first job reserved after a restart the very lease
/// its previous holder had, and that holder's heartbeat and completion
/// were honoured.)
#[test]
fn a_lease_from_before_a_kill_is_refused_after_the_restart() {
    let dir = TempDir::new("crash-jobs-lease");
    let (server, mut http) = start(dir.path(), 0);
    let job = http.ok(
        "POST",
        "/v1/queues/lease/jobs",
        Some(&json!({"payload": 1})),
    );
    let id = id_of(&job);
    let reserve = json!({"queues": ["lease"], "timeout_ms": 0});
    let old = http.ok("POST", "/v1/reserve", Some(&reserve))["jobs"][0]["lease"].clone();
    drop(server);

    let (_server, mut http) = start(dir.path(), 0);
    let new = http.ok("POST", "/v1/reserve", Some(&reserve))["jobs"][0]["lease"].clone();
    assert!(new.is_string(), "job {id} is ready again after the restart");
    assert_ne!(
        old, new,
        "a lease handed out before the kill handed out again"
    );
    for action in ["heartbeat", "complete"] {
        let reply = http.call(
            "POST",
            &format!("/v1/jobs/{id}/{action}"),
            Some(&json!({ "lease": old })),
        );
        assert_eq!(
            (reply.status, &reply.body["error"]["code"]),
            (409, &json!("lease_expired")),
            "{action} with the lease from before the kill: {}",
            reply.body
        );
    }
    let done = http.ok(
        "POST",
        &format!("/v1/jobs/{id}/complete"),
        Some(&json!({ "lease": new, "result": "mine" })),
    );
    assert_eq!(
        (state_of(&done), &done["result"]),
        ("completed", &json!("mine"))
    );
}
