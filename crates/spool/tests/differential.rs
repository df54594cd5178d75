//! Differential test: scripted sessions are played against the real
//! beanstalkd 1.12 (the oracle) and against `spool serve --in-memory`, and
//! every reply must match byte for byte once job ids and volatile stats
//! values are normalised.
//!
//! * Needs `beanstalkd` 1.12 on PATH; `bash scripts/test.sh` installs it.
//! * `SPOOL_DIFF_FILTER=<substring>` runs only the scenarios whose name
//!   contains the substring.
//! * `SPOOL_DIFF_DUMP=1` prints every transcript (add `-- --nocapture`).
//! * `SPOOL_DIFF_PEER=beanstalkd` plays beanstalkd against itself, which
//!   checks that the scenarios themselves are deterministic.
//!
//! A scenario is data: steps over named connections. Each scenario gets a
//! fresh server of each kind, so job ids and counters start equal. Rules
//! for writing one, so that beanstalkd answers the same way every time:
//!
//! * Connections open on first use. The connection that proved the server
//!   was up becomes the first one, so `total-connections` counts only the
//!   scenario's connections.
//! * Only read another connection's effect on the server after a round
//!   trip on it, or a `quiet` step for a command that blocks: `quiet`
//!   first waits until the server has read the connection's bytes, and
//!   `close` until the server has closed its end (both seen in /proc, so
//!   Linux only), so the server sees the steps in their order however
//!   loaded the machine. The rest of the timing is the clock's: delays,
//!   TTRs, pauses and timeouts against sleeps and quiet windows.
//! * A loaded machine stalls a step for a second or more (seen at load 18
//!   on 2 cores), and a stall only ever makes time pass, never less. So
//!   wait for an event with an `Expect` (its deadline is generous) rather
//!   than a sleep; leave at least 2.5 s between a `quiet` window's end and
//!   the timer it says has not fired yet; and keep a lease that must still
//!   be held when it is read at least 3 s long, or read it in the same
//!   write that took it (or queued behind the reserve that takes it).
//! * Read time fields (`age`, `time-left`, `pause-time-left`) at once or
//!   well away from a whole second. A scenario whose transcripts differ in
//!   those fields only is played again (see [`CLOCK_ATTEMPTS`]).
//! * beanstalkd 1.12 sometimes loses a reserved job's TTR timer when other
//!   connections are busy (its issues #262 and #380); after a deadline the
//!   reserving connection sends a harmless command (`poke`), which re-arms
//!   it. A correct server has released the job already, so the replies match.

use std::collections::HashMap;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

/// How long one reply frame may take to arrive, or the server to close a
/// connection. Generous: an expected event (a delay or TTR ending) is waited
/// for with this deadline instead of a sleep, and a loaded machine (load 18
/// on 2 cores) can stall a process for a second or more.
const FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a `quiet` step waits for the server to read what was sent. A
/// server may leave bytes unread on purpose (beanstalkd behind a blocked
/// reserve), so this is a cost paid by such steps, not a deadline.
const UNREAD_WAIT: Duration = Duration::from_secs(3);
/// How long a server may take to accept its first TCP connection.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Scenarios played at the same time (most of their time is spent sleeping).
const WORKERS: usize = 8;
/// How often a clock-dependent scenario (see [`CLOCK_SCENARIOS`]), or one
/// whose transcripts differ only in time fields (see [`clock_only`]), is
/// played before its difference counts.
const CLOCK_ATTEMPTS: usize = 3;

// ---------------------------------------------------------------------------
// Steps and the helpers that build them.

type Conn = &'static str;

#[derive(Debug, Clone)]
enum Step {
    /// Write these bytes on the connection (opening it on first use).
    Send(Conn, Vec<u8>),
    /// Read exactly this many reply frames.
    Expect(Conn, usize),
    /// Assert that nothing arrives within this many milliseconds.
    ExpectNothing(Conn, u64),
    /// Wait this many milliseconds.
    Sleep(u64),
    /// The server has closed the connection.
    ExpectClosed(Conn),
    /// Close the connection from the client side.
    Close(Conn),
    /// Shut down the client's sending side (a half-close).
    HalfClose(Conn),
}

/// Send bytes.
fn s(c: Conn, data: impl AsRef<[u8]>) -> Vec<Step> {
    vec![Step::Send(c, data.as_ref().to_vec())]
}

/// Expect `n` reply frames.
fn e(c: Conn, n: usize) -> Vec<Step> {
    vec![Step::Expect(c, n)]
}

/// Send bytes, then expect `n` reply frames.
fn se(c: Conn, data: impl AsRef<[u8]>, n: usize) -> Vec<Step> {
    vec![Step::Send(c, data.as_ref().to_vec()), Step::Expect(c, n)]
}

/// Expect no reply for `ms` milliseconds.
fn quiet(c: Conn, ms: u64) -> Vec<Step> {
    vec![Step::ExpectNothing(c, ms)]
}

fn sleep(ms: u64) -> Vec<Step> {
    vec![Step::Sleep(ms)]
}

fn closed(c: Conn) -> Vec<Step> {
    vec![Step::ExpectClosed(c)]
}

fn close(c: Conn) -> Vec<Step> {
    vec![Step::Close(c)]
}

fn shutdown_write(c: Conn) -> Vec<Step> {
    vec![Step::HalfClose(c)]
}

/// A `put` of `body` with the given priority, delay and ttr.
fn put(pri: u32, delay: u32, ttr: u32, body: &str) -> String {
    format!("put {pri} {delay} {ttr} {}\r\n{body}\r\n", body.len())
}

/// Concatenates step lists.
macro_rules! script {
    ($($part:expr),* $(,)?) => {{
        let mut steps: Vec<Step> = Vec::new();
        $(steps.extend($part);)*
        steps
    }};
}

// ---------------------------------------------------------------------------
// Scenarios.

type Scenario = (&'static str, fn() -> Vec<Step>);

/// Names each scenario after its function.
macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), $name as fn() -> Vec<Step>)),*]
    };
}

const SCENARIOS: &[Scenario] = scenarios![
    put_reserve_delete,
    priority_order,
    job_bodies,
    put_limits,
    delayed_jobs,
    release,
    bury_and_kick,
    kick_job,
    delete_in_every_state,
    touch,
    ttr_expiry,
    ttr_expiry_hands_job_to_waiter,
    deadline_soon,
    deadline_soon_with_timeout,
    deadline_soon_prefers_ready_job,
    reserve_with_timeout,
    blocked_reserve_woken_by_put,
    release_wakes_waiter,
    waiters_on_one_tube,
    waiters_on_overlapping_tubes,
    reserve_across_tubes,
    close_releases_reserved_jobs,
    connection_counters,
    use_watch_ignore,
    list_tubes_order,
    pause_tube,
    pause_zero_pipelined,
    peek_commands,
    reserve_job,
    stats_counters,
    quit,
    half_close,
    pipelining,
    unknown_commands,
    bad_format,
    bad_integers,
    lenient_integers,
    bad_tube_names,
    long_lines,
    stray_cr,
    nul_bytes,
    expected_crlf,
    job_too_big,
    split_sends,
];

/// Scenarios whose replies depend on how much time passes between steps:
/// delays, TTRs, reserve timeouts and pauses of a second or so against the
/// harness's sleeps and quiet windows. Each server is played by its own
/// thread against its own clock, so a loaded machine can stretch a step
/// past a margin on one side only. Such a scenario that differs is played
/// again on fresh servers, once the others are done and one at a time, up
/// to [`CLOCK_ATTEMPTS`] times in all, and fails only
/// if it differs every time (a real difference does; the failed attempts
/// are printed). Every other scenario depends on bytes and ordering only
/// and gets one attempt, unless its transcripts differ in time fields alone
/// (see [`clock_only`]).
const CLOCK_SCENARIOS: &[&str] = &[
    "delayed_jobs",
    "release",
    "touch",
    "ttr_expiry",
    "ttr_expiry_hands_job_to_waiter",
    "deadline_soon",
    "deadline_soon_with_timeout",
    "deadline_soon_prefers_ready_job",
    "reserve_with_timeout",
    "release_wakes_waiter",
    "pause_tube",
    "lenient_integers",
];

fn put_reserve_delete() -> Vec<Step> {
    script![
        se("a", put(0, 0, 10, "hello"), 1),
        se("a", "reserve\r\n", 1),
        se("a", "stats-job 1\r\n", 1),
        se("a", "delete 1\r\n", 1),
        se("a", "delete 1\r\n", 1),
        se("a", "peek 1\r\n", 1),
        se("a", "stats-job 1\r\n", 1),
        se("a", "reserve-with-timeout 0\r\n", 1),
        se("a", "stats-tube default\r\n", 1),
        se("a", "stats\r\n", 1),
    ]
}

/// Lower priority first, then FIFO by id; urgent means pri < 1024.
fn priority_order() -> Vec<Step> {
    script![
        se("a", put(5, 0, 10, "five"), 1),
        se("a", put(1, 0, 10, "one-a"), 1),
        se("a", put(1, 0, 10, "one-b"), 1),
        se("a", put(u32::MAX, 0, 10, "max"), 1),
        se("a", put(0, 0, 10, "zero"), 1),
        se("a", put(1023, 0, 10, "urgent"), 1),
        se("a", put(1024, 0, 10, "not-urgent"), 1),
        se("a", "stats-tube default\r\n", 1),
        se("a", "peek-ready\r\n", 1),
        se("a", "reserve\r\n".repeat(7), 7),
        se("a", "stats-tube default\r\n", 1),
        se("a", "reserve-with-timeout 0\r\n", 1),
    ]
}

fn job_bodies() -> Vec<Step> {
    let binary = [&b"put 0 0 10 6\r\n"[..], b"\x00\xff\r\x80\n\x01\r\n"].concat();
    script![
        se("a", "put 0 0 10 0\r\n\r\n", 1),
        se("a", "put 0 0 10 6\r\nab\r\ncd\r\n", 1),
        se("a", binary, 1),
        se("a", put(0, 0, 10, &"b".repeat(65535)), 1),
        se("a", "peek 1\r\npeek 2\r\npeek 3\r\npeek 4\r\n", 4),
        se("a", "reserve\r\n".repeat(4), 4),
        se("a", "stats-job 4\r\n", 1),
    ]
}

fn put_limits() -> Vec<Step> {
    script![
        se("a", put(u32::MAX, u32::MAX, u32::MAX, "x"), 1),
        se("a", "stats-job 1\r\n", 1),
        se("a", "put 0 0 0 1\r\ny\r\n", 1),
        se("a", "stats-job 2\r\n", 1),
        se("a", "put 00 000 0010 01\r\nz\r\n", 1),
        se("a", "put  1  0  10  1\r\nw\r\n", 1),
        se("a", "stats-job 4\r\n", 1),
        se("a", "stats-tube default\r\n", 1),
    ]
}

fn delayed_jobs() -> Vec<Step> {
    script![
        se("a", put(0, 3, 10, "soon"), 1),
        se("a", put(0, 100, 10, "later"), 1),
        se("a", "peek-delayed\r\n", 1),
        se("a", "peek-ready\r\n", 1),
        se("a", "stats-job 1\r\n", 1),
        se("a", "stats-job 2\r\n", 1),
        se("a", "stats-tube default\r\n", 1),
        se("a", "reserve-with-timeout 0\r\n", 1),
        // The delayed job becomes ready after three seconds and wakes the reserve.
        s("a", "reserve\r\n"),
        quiet("a", 200),
        e("a", 1),
        sleep(300),
        se("a", "stats-job 1\r\n", 1),
        se("a", "peek-delayed\r\n", 1),
        se("a", "stats\r\n", 1),
    ]
}

fn release() -> Vec<Step> {
    script![
        se("a", put(5, 0, 10, "job"), 1),
        se("a", "reserve\r\n", 1),
        se("b", "release 1 1 0\r\n", 1),
        se("a", "release 1 7 0\r\n", 1),
        se("a", "stats-job 1\r\n", 1),
        se("a", "release 1 7 0\r\n", 1),
        se("a", "reserve\r\n", 1),
        se("a", "release 1 3 3\r\n", 1),
        se("a", "stats-job 1\r\n", 1),
        se("a", "peek-delayed\r\n", 1),
        se("a", "stats-tube default\r\n", 1),
        s("a", "reserve\r\n"),
        quiet("a", 200),
        e("a", 1),
        sleep(300),
        se("a", "stats-job 1\r\n", 1),
        se("a", "release 99 0 0\r\n", 1),
        se("a", "stats\r\n", 1),
    ]
}

/// Buried jobs form a FIFO list; kick kicks buried jobs first, and delayed
/// jobs only when no job is buried.
fn bury_and_kick() -> Vec<Step> {
    script![
        se("a", put(0, 0, 10, "one"), 1),
        se("a", put(0, 0, 10, "two"), 1),
        se("a", put(0, 0, 10, "three"), 1),
        se("a", put(0, 100, 10, "delayed-a"), 1),
        se("a", put(0, 100, 10, "delayed-b"), 1),
        se("a", "reserve\r\n", 1),
        se("a", "bury 1 20\r\n", 1),
        se("a", "reserve\r\n", 1),
        se("a", "bury 2 10\r\n", 1),
        se("a", "bury 3 0\r\n", 1),
        se("b", "bury 2 0\r\n", 1),
        se("a", "peek-buried\r\n", 1),
        se("a", "stats-job 1\r\n", 1),
        se("a", "stats-tube default\r\n", 1),
        se("a", "kick 1\r\n", 1),
        se("a", "peek-buried\r\n", 1),
        se("a", "kick 10\r\n", 1),
        se("a", "kick 10\r\n", 1),
        se("a", "kick 10\r\n", 1),
        se("a", "stats-job 1\r\n", 1),
        se("a", "stats-job 4\r\n", 1),
        se("a", "reserve\r\n".repeat(5), 5),
        se("a", "use other\r\n", 1),
        se("a", "bury 1 0\r\n", 1),
        se("a", "kick 10\r\n", 1),
        se("a", "use default\r\n", 1),
        se("a", "kick 10\r\n", 1),
        se("a", "stats\r\n", 1),
    ]
}

fn kick_job() -> Vec<Step> {
    script![
        se("a", put(0, 0, 10, "ready-first"), 1),
        se("a", put(0, 100, 10, "delayed"), 1),
        se("a", put(5, 0, 10, "ready-second"), 1),
        se("a", "reserve\r\n", 1),
        se("a", "bury 1 0\r\n", 1),
        se("a", "reserve\r\n", 1),
        se("a", "kick-job 1\r\n", 1),
        se("a", "kick-job 1\r\n", 1),
        se("a", "kick-job 2\r\n", 1),
        se("a", "kick-job 3\r\n", 1),
        se("a", "kick-job 99\r\n", 1),
        se("b", "use other\r\n", 1),
        se("b", put(0, 100, 10, "elsewhere"), 1),
        se("a", "kick-job 4\r\n", 1),
        se("a", "stats-job 1\r\n", 1),
        se("a", "stats-job 2\r\n", 1),
        se("a", "stats-job 4\r\n", 1),
        se("a", "stats-tube other\r\n", 1),
        se("a", "stats\r\n", 1),
    ]
}

fn delete_in_every_state() -> Vec<Step> {
    script![
        se("a", put(0, 0, 10, "reserved-by-a"), 1),
        se("a", put(1, 0, 10, "reserved-by-b"), 1),
        se("a", put(0, 100, 10, "delayed"), 1),
        se("a", put(2, 0, 10, "buried"), 1),
        se("a", put(3, 0, 10, "ready"), 1),
        se("a", "reserve\r\n", 1),
        se("b", "reserve\r\n", 1),
        se("a", "reserve\r\n", 1),
        se("a", "bury 4 0\r\n", 1),
        se("b", "delete 1\r\n", 1),
        se("a", "delete 2\r\n", 1),
        se("a", "delete 1\r\n", 1),
        se("b", "delete 2\r\n", 1),
        se("b", "delete 3\r\n", 1),
        se("b", "delete 4\r\n", 1),
        se("b", "delete 5\r\n", 1),
        se("b", "delete 5\r\n", 1),
        se("b", "stats-tube default\r\n", 1),
        se("b", "stats\r\n", 1),
    ]
}

fn touch() -> Vec<Step> {
    script![
        se("a", put(0, 0, 6, "t"), 1),
        se("a", "reserve\r\n", 1),
        se("b", "touch 1\r\n", 1),
        se("a", "touch 99\r\n", 1),
        sleep(3000),
        se("a", "touch 1\r\n", 1),
        se("a", "stats-job 1\r\n", 1),
        // Past the original deadline (6 s), well before the moved one (9 s).
        sleep(3300),
        se("a", "stats-job 1\r\n", 1),
        se("a", "delete 1\r\n", 1),
        se("a", put(0, 0, 10, "ready"), 1),
        se("a", "touch 2\r\n", 1),
        se("a", "stats\r\n", 1),
    ]
}

/// beanstalkd 1.12 sometimes loses a connection's TTR timer (its own
/// issues #262 and #380), so after the deadline has passed the reserving
/// connection sends a harmless command, which makes beanstalkd re-arm and
/// fire the timer. A correct server has released the job already.
fn poke(c: Conn) -> Vec<Step> {
    se(c, "list-tube-used\r\n", 1)
}

fn ttr_expiry() -> Vec<Step> {
    script![
        se("a", put(0, 0, 1, "x"), 1),
        se("a", "reserve\r\n", 1),
        se("a", "stats-job 1\r\n", 1),
        sleep(1200),
        poke("a"),
        se("b", "stats-job 1\r\n", 1),
        se("a", "release 1 0 0\r\n", 1),
        se("a", "touch 1\r\n", 1),
        se("a", "bury 1 0\r\n", 1),
        // One write, so no stall can end b's 1 s lease before it is read.
        se("b", "reserve\r\nstats-job 1\r\n", 2),
        se("b", "stats\r\n", 1),
    ]
}

fn ttr_expiry_hands_job_to_waiter() -> Vec<Step> {
    script![
        se("a", put(0, 0, 3, "x"), 1),
        se("a", "reserve\r\n", 1),
        s("b", "reserve\r\n"),
        quiet("b", 200),
        // Queued behind the blocked reserve, so it is answered the moment
        // b gets the job, however late the harness reads it.
        s("b", "stats-job 1\r\n"),
        sleep(3050),
        poke("a"),
        e("b", 2),
        se("a", "delete 1\r\n", 1),
        se("b", "delete 1\r\n", 1),
    ]
}

/// The last second of a reservation is a safety margin: a waiting reserve
/// is answered DEADLINE_SOON when it starts, and a reserve issued inside it
/// is answered at once.
fn deadline_soon() -> Vec<Step> {
    script![
        se("a", put(0, 0, 4, "x"), 1),
        se("a", "reserve\r\n", 1),
        s("a", "reserve\r\n"),
        quiet("a", 200),
        e("a", 1),
        se("a", "reserve\r\n", 1),
        se("a", "reserve-with-timeout 0\r\n", 1),
        se("a", "reserve-with-timeout 5\r\n", 1),
        se("a", "stats-job 1\r\n", 1),
        sleep(1300),
        poke("a"),
        se("a", "stats-job 1\r\n", 1),
        se("a", "reserve\r\n", 1),
        se("a", "stats\r\n", 1),
    ]
}

fn deadline_soon_with_timeout() -> Vec<Step> {
    script![
        se("a", put(0, 0, 5, "x"), 1),
        se("a", "reserve\r\n", 1),
        // Waits into the safety margin, which starts after four seconds.
        s("a", "reserve-with-timeout 10\r\n"),
        quiet("a", 1000),
        e("a", 1),
        se("a", "delete 1\r\n", 1),
        // A timeout shorter than the time to the margin wins.
        se("a", put(0, 0, 10, "y"), 1),
        se("a", "reserve\r\n", 1),
        s("a", "reserve-with-timeout 2\r\n"),
        quiet("a", 200),
        e("a", 1),
        se("a", "stats-job 2\r\n", 1),
    ]
}

/// Inside the safety margin a ready job is still handed out.
fn deadline_soon_prefers_ready_job() -> Vec<Step> {
    script![
        se("a", put(0, 0, 1, "short"), 1),
        se("a", put(5, 0, 10, "other"), 1),
        se("a", "reserve\r\n", 1),
        se("a", "reserve\r\n", 1),
        se("a", "reserve-with-timeout 0\r\n", 1),
        se("a", "stats-tube default\r\n", 1),
    ]
}

fn reserve_with_timeout() -> Vec<Step> {
    script![
        se("a", "reserve-with-timeout 0\r\n", 1),
        s("a", "reserve-with-timeout 3\r\n"),
        quiet("a", 200),
        e("a", 1),
        s("a", "reserve-with-timeout 10\r\n"),
        quiet("a", 300),
        se("b", put(0, 0, 10, "x"), 1),
        e("a", 1),
        se("b", "stats\r\n", 1),
    ]
}

fn blocked_reserve_woken_by_put() -> Vec<Step> {
    script![
        s("a", "reserve\r\n"),
        quiet("a", 300),
        se("b", "stats\r\n", 1),
        se("b", "stats-tube default\r\n", 1),
        se("b", put(0, 0, 10, "wake"), 1),
        e("a", 1),
        se("b", "stats\r\n", 1),
    ]
}

fn release_wakes_waiter() -> Vec<Step> {
    script![
        se("a", put(0, 0, 10, "x"), 1),
        se("a", "reserve\r\n", 1),
        s("b", "reserve\r\n"),
        quiet("b", 200),
        se("a", "release 1 0 0\r\n", 1),
        e("b", 1),
        s("a", "reserve\r\n"),
        // 800 ms, not 200: the quiet windows before the delayed release
        // then add up to just over a second, so `stats-job` reads an age
        // just past 4 s, a second away from 5, where 3.4 s was stalled
        // across 4 on one side at load 20.
        quiet("a", 800),
        se("b", "release 1 0 3\r\n", 1),
        quiet("a", 200),
        e("a", 1),
        se("a", "stats-job 1\r\n", 1),
    ]
}

/// Several connections wait on one tube. beanstalkd keeps waiters in an
/// array with swap-remove and hands jobs out round robin from a cursor, so
/// the order is a, b, d, c and then b, a, c, not first come first served.
fn waiters_on_one_tube() -> Vec<Step> {
    let mut steps = Vec::new();
    for c in ["a", "b", "c", "d"] {
        steps.extend(script![s(c, "reserve\r\n"), quiet(c, 100)]);
    }
    steps.extend(script![
        se("p", "stats-tube default\r\n", 1),
        se("p", put(0, 0, 10, "1"), 1),
        e("a", 1),
        se("p", put(0, 0, 10, "2"), 1),
        e("b", 1),
        se("p", put(0, 0, 10, "3"), 1),
        e("d", 1),
        se("p", put(0, 0, 10, "4"), 1),
        e("c", 1),
    ]);
    for c in ["a", "b", "c"] {
        steps.extend(script![s(c, "reserve\r\n"), quiet(c, 100)]);
    }
    steps.extend(script![
        se("p", put(0, 0, 10, "5"), 1),
        e("b", 1),
        se("p", put(0, 0, 10, "6"), 1),
        e("a", 1),
        se("p", put(0, 0, 10, "7"), 1),
        e("c", 1),
    ]);
    steps
}

fn waiters_on_overlapping_tubes() -> Vec<Step> {
    script![
        se("a", "watch t1\r\nignore default\r\n", 2),
        se("b", "watch t1\r\nwatch t2\r\nignore default\r\n", 3),
        se("c", "watch t2\r\nignore default\r\n", 2),
        s("a", "reserve\r\n"),
        quiet("a", 100),
        s("b", "reserve\r\n"),
        quiet("b", 100),
        s("c", "reserve\r\n"),
        quiet("c", 100),
        se("p", "stats-tube t1\r\nstats-tube t2\r\nstats\r\n", 3),
        se("p", "use t2\r\n", 1),
        se("p", put(0, 0, 10, "first-t2"), 1),
        e("b", 1),
        se("p", "use t1\r\n", 1),
        se("p", put(0, 0, 10, "t1"), 1),
        e("a", 1),
        se("p", "use t2\r\n", 1),
        se("p", put(0, 0, 10, "second-t2"), 1),
        e("c", 1),
        se("p", "stats-tube t1\r\nstats-tube t2\r\n", 2),
    ]
}

/// A reserve over several tubes takes the lowest priority, then the lowest
/// id, whichever tube it is in.
fn reserve_across_tubes() -> Vec<Step> {
    script![
        se("p", "use t1\r\n", 1),
        se("p", put(5, 0, 10, "t1-pri5"), 1),
        se("p", "use t2\r\n", 1),
        se("p", put(1, 0, 10, "t2-pri1"), 1),
        se("p", "use t1\r\n", 1),
        se("p", put(1, 0, 10, "t1-pri1"), 1),
        se("p", "use t3\r\n", 1),
        se("p", put(0, 0, 10, "t3-unwatched"), 1),
        se("a", "watch t1\r\nwatch t2\r\nignore default\r\n", 3),
        se("a", "reserve\r\n".repeat(3), 3),
        se("a", "reserve-with-timeout 0\r\n", 1),
        se("a", "list-tubes-watched\r\n", 1),
    ]
}

fn close_releases_reserved_jobs() -> Vec<Step> {
    script![
        se("a", put(3, 0, 10, "x"), 1),
        se("a", put(1, 0, 10, "y"), 1),
        se("a", "reserve\r\nreserve\r\n", 2),
        s("b", "reserve\r\n"),
        quiet("b", 200),
        close("a"),
        e("b", 1),
        se("b", "stats-job 1\r\n", 1),
        se("b", "stats-job 2\r\n", 1),
        se("b", "stats\r\n", 1),
    ]
}

fn connection_counters() -> Vec<Step> {
    script![
        se("a", "stats\r\n", 1),
        se("b", "list-tube-used\r\n", 1),
        se("c", put(0, 0, 10, "x"), 1),
        se("d", "watch other\r\nignore default\r\n", 2),
        s("d", "reserve-with-timeout 5\r\n"),
        quiet("d", 200),
        se("a", "stats\r\n", 1),
        close("d"),
        close("c"),
        se("a", "stats\r\n", 1),
        se("b", "reserve\r\n", 1),
        se("a", "stats\r\n", 1),
    ]
}

fn use_watch_ignore() -> Vec<Step> {
    script![
        se("a", "list-tube-used\r\n", 1),
        se("a", "list-tubes-watched\r\n", 1),
        se("a", "use t1\r\n", 1),
        se("a", "list-tube-used\r\n", 1),
        se("a", "watch t2\r\n", 1),
        se("a", "watch t2\r\n", 1),
        se("a", "watch t3\r\n", 1),
        se("a", "watch t4\r\n", 1),
        se("a", "list-tubes-watched\r\n", 1),
        se("a", "ignore t2\r\n", 1),
        se("a", "list-tubes-watched\r\n", 1),
        se("a", "ignore nosuch\r\n", 1),
        se("a", "list-tubes\r\n", 1),
        se("a", "ignore default\r\n", 1),
        se("a", "ignore t4\r\n", 1),
        se("a", "ignore t3\r\n", 1),
        se("a", "list-tubes-watched\r\n", 1),
        se("a", "stats-tube t3\r\n", 1),
        se("a", "stats-tube t1\r\n", 1),
        se("b", "use t3\r\nwatch t3\r\n", 2),
        se("a", "stats-tube t3\r\n", 1),
        se("a", "list-tubes\r\n", 1),
        se("a", "stats\r\n", 1),
    ]
}

/// Tubes live in an array with swap-remove: dropping a tube moves the last
/// one into its place.
fn list_tubes_order() -> Vec<Step> {
    script![
        se("a", "use t1\r\n", 1),
        se("b", "use t2\r\n", 1),
        se("c", "use t3\r\n", 1),
        se("a", "list-tubes\r\n", 1),
        se("a", "use default\r\n", 1),
        se("a", "list-tubes\r\n", 1),
        se("a", "use t4\r\n", 1),
        se("a", "list-tubes\r\n", 1),
        se("b", put(0, 0, 10, "keeps-t2"), 1),
        se("b", "use default\r\n", 1),
        se("a", "list-tubes\r\n", 1),
        se("a", "watch t2\r\nreserve\r\n", 2),
        se("a", "delete 1\r\n", 1),
        se("a", "list-tubes\r\n", 1),
        se("a", "ignore t2\r\n", 1),
        se("a", "list-tubes\r\n", 1),
        se("a", "stats-tube t2\r\n", 1),
        se("a", "pause-tube t3 100\r\n", 1),
        se("c", "use default\r\n", 1),
        se("a", "list-tubes\r\n", 1),
        se("a", "stats\r\n", 1),
    ]
}

fn pause_tube() -> Vec<Step> {
    script![
        se("a", "use p\r\n", 1),
        se("a", put(0, 0, 10, "x"), 1),
        se("a", "watch p\r\nignore default\r\n", 2),
        se("a", "pause-tube p 3\r\n", 1),
        se("a", "stats-tube p\r\n", 1),
        se("a", "reserve-with-timeout 0\r\n", 1),
        se("a", "peek-ready\r\n", 1),
        // Not served until the pause ends.
        s("a", "reserve\r\n"),
        quiet("a", 200),
        e("a", 1),
        sleep(200),
        se("a", "stats-tube p\r\n", 1),
        se("a", "delete 1\r\n", 1),
        se("a", "pause-tube nosuch 1\r\n", 1),
        se("a", "pause-tube p 100\r\n", 1),
        se("a", "stats-tube p\r\n", 1),
        se("a", put(0, 0, 10, "y"), 1),
        se("a", "reserve-with-timeout 0\r\n", 1),
        // Pausing for 0 seconds ends the pause.
        se("a", "pause-tube p 0\r\n", 1),
        se("a", "reserve-with-timeout 0\r\n", 1),
        se("a", "stats-tube p\r\n", 1),
        se("a", "stats\r\n", 1),
    ]
}

/// A pause of 0 is over by the next command, even one pipelined behind it
/// in the same read (beanstalkd reads its clock per command), and it wakes
/// a reserver blocked on the tube.
fn pause_zero_pipelined() -> Vec<Step> {
    script![
        se("a", "use t\r\n", 1),
        se("a", put(0, 0, 10, "x"), 1),
        se("a", "watch t\r\nignore default\r\n", 2),
        se("a", "pause-tube t 100\r\n", 1),
        se("a", "pause-tube t 0\r\nreserve-with-timeout 0\r\n", 2),
        se("a", "release 1 0 0\r\npause-tube t 100\r\n", 2),
        se("b", "watch t\r\n", 1),
        s("b", "reserve\r\n"),
        quiet("b", 100),
        se("a", "pause-tube t 0\r\n", 1),
        e("b", 1),
        se("a", "stats-tube t\r\n", 1),
    ]
}

fn peek_commands() -> Vec<Step> {
    script![
        se("a", "peek 1\r\n", 1),
        se("a", "peek-ready\r\npeek-delayed\r\npeek-buried\r\n", 3),
        se("a", put(0, 0, 10, "to-bury"), 1),
        se("a", put(5, 0, 10, "ready-5"), 1),
        se("a", put(1, 0, 10, "ready-1"), 1),
        se("a", put(0, 100, 10, "delay-100"), 1),
        se("a", put(0, 50, 10, "delay-50"), 1),
        se("a", "reserve\r\n", 1),
        se("a", "bury 1 0\r\n", 1),
        se("a", "peek-ready\r\npeek-delayed\r\npeek-buried\r\n", 3),
        se("b", "reserve\r\n", 1),
        se("a", "peek 3\r\n", 1),
        se("a", "peek 4\r\n", 1),
        se("a", "peek-ready\r\n", 1),
        se("a", "use other\r\n", 1),
        se("a", "peek-ready\r\npeek-delayed\r\npeek-buried\r\n", 3),
        se("a", "peek 2\r\n", 1),
        se("a", "stats\r\n", 1),
    ]
}

fn reserve_job() -> Vec<Step> {
    script![
        se("a", put(0, 0, 10, "first"), 1),
        se("a", put(0, 100, 10, "delayed"), 1),
        se("a", put(9, 0, 10, "third"), 1),
        se("b", "reserve\r\n", 1),
        se("a", "reserve-job 3\r\n", 1),
        se("a", "reserve-job 2\r\n", 1),
        se("a", "reserve-job 1\r\n", 1),
        se("b", "reserve-job 1\r\n", 1),
        se("a", "bury 3 0\r\n", 1),
        se("a", "reserve-job 3\r\n", 1),
        se("a", "reserve-job 99\r\n", 1),
        se("a", "stats-job 2\r\n", 1),
        se("a", "stats-tube default\r\n", 1),
        se("a", "release 2 0 0\r\n", 1),
        se("a", "pause-tube default 100\r\n", 1),
        se("a", "reserve-job 2\r\n", 1),
        se("a", "stats\r\n", 1),
    ]
}

/// Every command once, including failing ones, then the counters.
fn stats_counters() -> Vec<Step> {
    script![
        se("a", put(0, 0, 10, "x"), 1),
        se(
            "a",
            "peek 1\r\npeek-ready\r\npeek-delayed\r\npeek-buried\r\n",
            4
        ),
        se("a", "reserve\r\n", 1),
        se("a", "release 1 0 0\r\n", 1),
        se("a", "reserve-with-timeout 0\r\n", 1),
        se("a", "touch 1\r\n", 1),
        se("a", "bury 1 0\r\n", 1),
        se("a", "kick 1\r\n", 1),
        se("a", "reserve-job 1\r\n", 1),
        se("a", "bury 1 0\r\n", 1),
        se("a", "kick-job 1\r\n", 1),
        se("a", "reserve-job 1\r\n", 1),
        se("a", "delete 1\r\n", 1),
        se("a", "use t\r\nwatch t\r\nignore t\r\n", 3),
        se("a", "stats-job 1\r\nstats-tube t\r\n", 2),
        se(
            "a",
            "list-tubes\r\nlist-tube-used\r\nlist-tubes-watched\r\n",
            3
        ),
        se("a", "pause-tube t 0\r\n", 1),
        se("a", "delete x\r\ndelete 99\r\nfoo\r\nput 0 0 10\r\n", 4),
        se("a", "stats\r\n", 1),
        se("a", "stats-tube default\r\nstats-tube t\r\n", 2),
    ]
}

/// quit closes the connection; commands pipelined after it are not run.
fn quit() -> Vec<Step> {
    script![
        se("a", put(0, 0, 10, "x"), 1),
        s("a", "quit\r\nput 0 0 10 1\r\ny\r\n"),
        closed("a"),
        se("b", "list-tube-used\r\nquit\r\nlist-tube-used\r\n", 1),
        closed("b"),
        s("c", "quitxyz\r\n"),
        closed("c"),
        se("d", "stats\r\n", 1),
    ]
}

fn half_close() -> Vec<Step> {
    script![
        s("a", "reserve\r\n"),
        quiet("a", 200),
        shutdown_write("a"),
        e("a", 1),
        closed("a"),
        s("b", "list-tube-used\r\nlist-tubes\r\n"),
        shutdown_write("b"),
        e("b", 2),
        closed("b"),
        se("c", "stats\r\n", 1),
    ]
}

fn pipelining() -> Vec<Step> {
    let mut many = String::new();
    for i in 0..100 {
        many.push_str(&put(i, 0, 10, &format!("job-{i}")));
    }
    script![
        se(
            "a",
            concat!(
                "use pipe\r\n",
                "put 0 0 10 1\r\na\r\n",
                "put 0 0 10 1\r\nb\r\n",
                "put 0 0 10 1\r\nc\r\n",
                "watch pipe\r\n",
                "ignore default\r\n",
                "reserve\r\n",
                "delete 1\r\n",
                "peek-ready\r\n",
                "reserve\r\n",
                "release 2 0 0\r\n",
                "stats-tube pipe\r\n",
                "list-tube-used\r\n",
                "list-tubes-watched\r\n",
                "bogus\r\n",
                "peek 1\r\n",
            ),
            16
        ),
        se("b", many, 100),
        se("b", "reserve\r\n".repeat(100), 100),
        se("b", "stats\r\n", 1),
    ]
}

fn unknown_commands() -> Vec<Step> {
    let lines = [
        "foo\r\n",
        "\r\n",
        " \r\n",
        " list-tubes\r\n",
        "PUT 0 0 1 1\r\n",
        "put\r\n",
        "peek\r\n",
        "use\r\n",
        "watch\r\n",
        "ignore\r\n",
        "kick\r\n",
        "delete\r\n",
        "touch\r\n",
        "kick-job\r\n",
        "release\r\n",
        "bury\r\n",
        "stats-tube\r\n",
        "pause-tube\r\n",
        "touchy 1\r\n",
        "peekx 1\r\n",
        "kick-jobx 1\r\n",
        "a\nb\r\n",
        "\n\r\n",
        "list\r\n",
    ];
    lines.iter().flat_map(|line| se("a", line, 1)).collect()
}

/// Commands without arguments match as a prefix, so trailing text is
/// BAD_FORMAT rather than UNKNOWN_COMMAND.
fn bad_format() -> Vec<Step> {
    let lines = [
        "reservex\r\n",
        "reserve \r\n",
        "reserve-with-timeout\r\n",
        "reserve-job\r\n",
        "reserve-jobs 1\r\n",
        "stats x\r\n",
        "stats \r\n",
        "stats-foo\r\n",
        "stats-job\r\n",
        "stats-job \r\n",
        "stats-jobx\r\n",
        "stats-tubes x\r\n",
        "list-tubes x\r\n",
        "list-tube-usedx\r\n",
        "list-tube-used \r\n",
        "list-tubes-watchedx\r\n",
        "peek-readyx\r\n",
        "peek-ready x\r\n",
        "peek-delayed 1\r\n",
        "peek-buried 1\r\n",
        "use \r\n",
        "delete \r\n",
        "watch \r\n",
        "ignore \r\n",
        "stats-tube \r\n",
        "pause-tube default\r\n",
        "pause-tube default \r\n",
    ];
    lines.iter().flat_map(|line| se("a", line, 1)).collect()
}

fn bad_integers() -> Vec<Step> {
    // A rejected put line leaves its body to be read as a command line.
    let two_replies = [
        "put -1 0 10 5\r\nhello\r\n",
        "put 4294967296 0 10 5\r\nhello\r\n",
        "put 0 4294967296 10 5\r\nhello\r\n",
        "put 0 0 4294967296 5\r\nhello\r\n",
        "put 1x 0 10 5\r\nhello\r\n",
        "put +1 0 10 5\r\nhello\r\n",
        "put 0 0 10 5 \r\nhello\r\n",
        "put 0 0 10 5 6\r\nhello\r\n",
        "put 0 0 10 -0\r\nhello\r\n",
        "put 0 0 10 0x5\r\nhello\r\n",
    ];
    let one_reply = [
        "put 0 0 10\r\n",
        "put 0 0 10 99999999999\r\n",
        "delete -1\r\n",
        "delete x\r\n",
        "delete 0x1\r\n",
        "delete 1.5\r\n",
        "delete 1 2\r\n",
        "delete 18446744073709551616\r\n",
        "delete 18446744073709551615\r\n",
        "delete  1\r\n",
        "delete 00000000000000000000000000001\r\n",
        "release 1 4294967296 0\r\n",
        "release 1 0 4294967296\r\n",
        "release 1 -1 0\r\n",
        "release 1 0 x\r\n",
        "release 1 0\r\n",
        "release 1 0 0 0\r\n",
        "release 1 0 0 \r\n",
        "release 1  0 0\r\n",
        "bury 1\r\n",
        "bury 1 x\r\n",
        "bury 1 4294967296\r\n",
        "bury 1 -1\r\n",
        "bury 1 0 0\r\n",
        "touch x\r\n",
        "touch -1\r\n",
        "touch 1 2\r\n",
        "kick-job x\r\n",
        "kick-job 1 \r\n",
        "peek 1x\r\n",
        "peek -1\r\n",
        "stats-job -1\r\n",
        "stats-job x\r\n",
        "reserve-job x\r\n",
        "reserve-job 1 \r\n",
        "reserve-job  1\r\n",
        "pause-tube default 4294967296\r\n",
        "pause-tube default -1\r\n",
        "pause-tube default 1x\r\n",
        "pause-tube default x\r\n",
        "pause-tube default 1 \r\n",
        "pause-tube default  0\r\n",
        "pause-tube  default 0\r\n",
        "kick x\r\n",
        "kick 18446744073709551616\r\n",
        "reserve-with-timeout 18446744073709551616\r\n",
        "reserve-with-timeout 9223372036854775808\r\n",
    ];
    script![
        se("a", put(0, 0, 10, "x"), 1),
        two_replies
            .iter()
            .flat_map(|line| se("a", line, 2))
            .collect::<Vec<_>>(),
        one_reply
            .iter()
            .flat_map(|line| se("a", line, 1))
            .collect::<Vec<_>>(),
        se("a", "stats\r\n", 1),
    ]
}

/// `kick` and `reserve-with-timeout` parse their argument loosely: trailing
/// text is ignored and the value wraps to 32 bits.
fn lenient_integers() -> Vec<Step> {
    let mut setup = String::new();
    for i in 1..=12 {
        setup.push_str(&put(0, 0, 10, &format!("j{i}")));
    }
    let reserve_and_bury: String = (1..=12)
        .map(|i| format!("reserve\r\nbury {i} 0\r\n"))
        .collect();
    script![
        se("a", setup, 12),
        se("a", reserve_and_bury, 24),
        se("a", "kick 1x\r\n", 1),
        se("a", "kick 4294967297\r\n", 1),
        se("a", "kick 4294967296\r\n", 1),
        se("a", "kick -0\r\n", 1),
        se("a", "kick 0x5\r\n", 1),
        se("a", "kick  2\r\n", 1),
        se("a", "kick 2 and more\r\n", 1),
        se("a", "kick -1\r\n", 1),
        se("a", "kick 1\r\n", 1),
        // b watches only an empty tube, so every reserve below times out.
        se("b", "watch empty\r\nignore default\r\n", 2),
        se("b", "reserve-with-timeout x\r\n", 1),
        se("b", "reserve-with-timeout -0\r\n", 1),
        se("b", "reserve-with-timeout  0\r\n", 1),
        se("b", "reserve-with-timeout 0 \r\n", 1),
        se("b", "reserve-with-timeout 0x\r\n", 1),
        se("b", "reserve-with-timeout 4294967296\r\n", 1),
        s("b", "reserve-with-timeout 3x\r\n"),
        quiet("b", 200),
        e("b", 1),
        s("b", "reserve-with-timeout 4294967299\r\n"),
        quiet("b", 200),
        e("b", 1),
        // -1 wraps to 4294967295 seconds: a long wait, answered by a put.
        s("b", "reserve-with-timeout -1\r\n"),
        quiet("b", 300),
        se("a", "use empty\r\n", 1),
        se("a", put(0, 0, 10, "wake"), 1),
        e("b", 1),
    ]
}

fn bad_tube_names() -> Vec<Step> {
    let max = "n".repeat(200);
    let over = "n".repeat(201);
    script![
        se("a", "use -a\r\n", 1),
        se("a", "use -\r\n", 1),
        se("a", "use a*\r\n", 1),
        se("a", "use a\tb\r\n", 1),
        se("a", "use  a\r\n", 1),
        se("a", "use a \r\n", 1),
        se("a", "use a b\r\n", 1),
        se("a", b"use caf\xc3\xa9\r\n", 1),
        se("a", "use ()+/;.$_-9\r\n", 1),
        se("a", "use a-\r\n", 1),
        se("a", format!("use {over}\r\n"), 1),
        se("a", format!("use {max}\r\n"), 1),
        se("a", format!("watch {over}\r\n"), 1),
        se("a", format!("watch {max}\r\n"), 1),
        se("a", format!("ignore {over}\r\n"), 1),
        se("a", format!("stats-tube {over}\r\n"), 1),
        se("a", format!("pause-tube {over} 1\r\n"), 1),
        se("a", format!("pause-tube {max} 0\r\n"), 1),
        se(
            "a",
            "watch -a\r\nwatch a b\r\nignore -a\r\nstats-tube -x\r\n",
            4
        ),
        se("a", "pause-tube -x 1\r\n", 1),
        se("a", "list-tubes\r\n", 1),
        se("a", "list-tubes-watched\r\n", 1),
    ]
}

/// Lines may be 224 bytes including CRLF. A longer line is answered with a
/// single BAD_FORMAT once its CRLF arrives; beanstalkd looks for that CRLF
/// in 224-byte chunks, so a CRLF split across two chunks is missed.
fn long_lines() -> Vec<Step> {
    let fill = |prefix: &str, total: usize, suffix: &str| {
        format!(
            "{prefix}{}{suffix}\r\n",
            "0".repeat(total - prefix.len() - suffix.len() - 2)
        )
    };
    script![
        se("a", fill("delete ", 224, "99"), 1),
        // 225 bytes: the first chunk ends with the CR, so the LF alone
        // does not end the line and the next line is swallowed with it.
        s("a", fill("delete ", 225, "99")),
        quiet("a", 200),
        se("a", "list-tube-used\r\n", 1),
        se("a", "list-tube-used\r\n", 1),
        se(
            "a",
            format!("{}hello\r\n", fill("put 0 0 10 ", 224, "5")),
            1
        ),
        se("a", format!("{}list-tube-used\r\n", "x".repeat(224)), 1),
        se("a", "list-tube-used\r\n", 1),
        se(
            "a",
            format!("{}\r\nlist-tube-used\r\n", "x".repeat(1000)),
            2
        ),
        se("a", format!("{}\r\nlist-tube-used\r\n", "x".repeat(447)), 1),
        se("a", "list-tube-used\r\n", 1),
        se("a", format!("{}\r\nlist-tube-used\r\n", "x".repeat(222)), 2),
        s("a", "x".repeat(100)),
        quiet("a", 100),
        s("a", "x".repeat(200)),
        quiet("a", 200),
        se("a", "\r\n", 1),
        se("a", "list-tube-used\r\n", 1),
    ]
}

/// A line ends at the first CR only if LF follows it; otherwise beanstalkd
/// keeps reading until the 224-byte buffer is full.
fn stray_cr() -> Vec<Step> {
    script![
        s("a", "list-tube-used\r\r\n"),
        quiet("a", 200),
        s("a", "list-tube-used\r\n"),
        quiet("a", 200),
        s("a", "y".repeat(224 - 17 - 16)),
        quiet("a", 200),
        se("a", "z\r\n", 1),
        se("a", "list-tube-used\r\n", 1),
        s("b", "list-tube-used\n"),
        quiet("b", 200),
        se("b", "\r\n", 1),
        se("b", "list-tube-used\r\n", 1),
    ]
}

fn nul_bytes() -> Vec<Step> {
    script![
        se("a", "list-tubes\0\r\n", 1),
        se("a", "x\0y\r\n", 1),
        se("a", "use a\0b\r\n", 1),
        se("a", "\0\r\n", 1),
        se("a", "put 0 0 10 3\r\n\0\0\0\r\n", 1),
        se("a", "peek 1\r\n", 1),
        se("a", "delete 1\0\r\n", 1),
        se("a", "put 0 0 10 1\0\r\nx\r\n", 2),
        se("a", "list-tube-used\r\n", 1),
    ]
}

/// A body not followed by CRLF is rejected after the announced length;
/// what follows is read as the next command line. The failed put still
/// used up a job id.
fn expected_crlf() -> Vec<Step> {
    script![
        se("a", "put 0 0 10 3\r\nabcde\r\n", 2),
        se("a", "put 0 0 10 3\r\nabc\n\r\nlist-tube-used\r\n", 2),
        s("a", "put 0 0 10 5\r\nabc"),
        quiet("a", 200),
        se("a", "de\r\n", 1),
        se("a", "put 0 0 10 2\r\nab\r\r\nlist-tube-used\r\n", 2),
        se("a", "peek 1\r\npeek 2\r\npeek 3\r\npeek 4\r\n", 4),
        se("a", put(0, 0, 10, "next"), 1),
        se("a", "peek 5\r\n", 1),
        se("a", "stats\r\n", 1),
    ]
}

/// A body over max-job-size is read and thrown away (CRLF or not), then
/// JOB_TOO_BIG; the connection keeps working.
fn job_too_big() -> Vec<Step> {
    let too_big = 65536;
    let body = "z".repeat(too_big);
    script![
        s("a", format!("put 0 0 10 {too_big}\r\n")),
        quiet("a", 200),
        s("a", "z".repeat(40000)),
        quiet("a", 200),
        se("a", format!("{}\r\n", "z".repeat(too_big - 40000)), 1),
        se("a", "list-tube-used\r\n", 1),
        se(
            "a",
            format!("put 0 0 10 {too_big}\r\n{body}XYlist-tube-used\r\n"),
            2
        ),
        // The size is checked before trailing text on the line.
        se("a", format!("put 0 0 10 {too_big} x\r\n{body}\r\n"), 1),
        se("a", "put 0 0 10 4294967296\r\nlist-tube-used\r\n", 2),
        se("a", "stats\r\n", 1),
        se("a", put(0, 0, 10, &"m".repeat(65535)), 1),
        se("a", "peek 1\r\npeek 2\r\npeek 3\r\npeek 4\r\n", 4),
        se("a", "stats\r\n", 1),
    ]
}

fn split_sends() -> Vec<Step> {
    script![
        s("a", "pu"),
        quiet("a", 100),
        s("a", "t 0 0 10 11\r"),
        quiet("a", 100),
        s("a", "\nhel"),
        quiet("a", 100),
        s("a", "lo "),
        quiet("a", 100),
        s("a", "world\r"),
        quiet("a", 100),
        se("a", "\n", 1),
        s("a", "list-tube-"),
        quiet("a", 100),
        se("a", "used\r\nlist", 1),
        se("a", "-tubes\r\n", 1),
        se("a", "peek 1\r", 0),
        quiet("a", 100),
        se("a", "\n", 1),
    ]
}

// ---------------------------------------------------------------------------
// Servers.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    Beanstalkd,
    Spool,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Beanstalkd => "beanstalkd",
            Peer::Spool => "spool",
        }
    }

    fn command(self, port: u16) -> Command {
        let port = port.to_string();
        match self {
            Peer::Beanstalkd => {
                let mut cmd = Command::new(beanstalkd_path());
                cmd.args(["-l", "127.0.0.1", "-p", &port]);
                cmd
            }
            Peer::Spool => {
                let mut cmd = Command::new(env!("CARGO_BIN_EXE_spool"));
                cmd.args(["serve", "--in-memory", "-l", "127.0.0.1", "-p", &port])
                    .args(["--http-listen", "127.0.0.1:0"]);
                cmd
            }
        }
    }
}

/// Finds `beanstalkd` on PATH, or fails the test saying how to get it.
fn beanstalkd_path() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("beanstalkd"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`beanstalkd` is not on PATH. The differential test needs the real \
                 beanstalkd 1.12 as its oracle: run `bash scripts/test.sh`, which \
                 installs it (apt-get install beanstalkd)."
            )
        })
}

/// A running server; killing it is the guard's job.
struct Server {
    peer: Peer,
    child: Child,
    port: u16,
    log: PathBuf,
    /// The connection that proved the server is up; it becomes the
    /// scenario's first connection so no extra connection is counted.
    first: Option<TcpStream>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

impl Server {
    fn start(peer: Peer) -> Result<Server, String> {
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = free_port()?;
            let log = std::env::temp_dir().join(format!(
                "spool-differential-{}-{}-{port}.log",
                std::process::id(),
                peer.name()
            ));
            let log_file = File::create(&log)
                .map_err(|err| format!("cannot create {}: {err}", log.display()))?;
            let child = peer
                .command(port)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .map_err(|err| format!("cannot start {}: {err}", peer.name()))?;
            let mut server = Server {
                peer,
                child,
                port,
                log,
                first: None,
            };
            match server.wait_until_accepting() {
                Ok(stream) => {
                    server.first = Some(stream);
                    return Ok(server);
                }
                // Most likely the port was taken in between: try another.
                Err(err) => last_error = err,
            }
        }
        Err(last_error)
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Connects once the server process itself listens on the port, read
    /// from /proc: a connect that merely succeeds could reach another
    /// process's server that took the port first (ours then fails to bind).
    fn wait_until_accepting(&mut self) -> Result<TcpStream, String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.exited() {
                return Err(format!(
                    "{} exited at startup ({status}) on port {}{}",
                    self.peer.name(),
                    self.port,
                    self.log_tail()
                ));
            }
            if listens_on(self.child.id(), self.port) {
                return TcpStream::connect_timeout(&self.addr(), FRAME_TIMEOUT).map_err(|err| {
                    format!(
                        "cannot connect to {} at {}: {err}",
                        self.peer.name(),
                        self.addr()
                    )
                });
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not listen on {} within {START_TIMEOUT:?}{}",
                    self.peer.name(),
                    self.addr(),
                    self.log_tail()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the server has read every byte sent on the connection
    /// from `client_port` (none left in its socket's receive queue). Both
    /// servers act on what they read in read order (spool hands a read's
    /// requests to its engine before it reads again), so this orders
    /// commands across connections. A server may leave bytes unread on
    /// purpose (beanstalkd behind a blocked `reserve`): after
    /// `UNREAD_WAIT` the step goes on.
    fn wait_read(&self, client_port: u16) {
        self.wait_for(
            |end| end.is_none_or(|end| end.unread == 0),
            client_port,
            UNREAD_WAIT,
        );
    }

    /// Waits until the server has closed its end of the connection from
    /// `client_port` (no fd of its process refers to the socket).
    fn wait_closed(&self, client_port: u16) {
        let pid = self.child.id();
        self.wait_for(
            |end| end.is_none_or(|end| !holds_socket(pid, &end.inode)),
            client_port,
            FRAME_TIMEOUT,
        );
    }

    fn wait_for(
        &self,
        done: impl Fn(Option<ServerEnd>) -> bool,
        client_port: u16,
        limit: Duration,
    ) {
        let deadline = Instant::now() + limit;
        // Each look reads the whole socket table: not too often.
        while !done(server_end(self.child.id(), self.port, client_port))
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(err) => Some(format!("cannot poll the process: {err}")),
        }
    }

    /// The last lines the server wrote to stderr, for failure reports.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        if lines.is_empty() {
            return String::new();
        }
        let tail = lines[lines.len().saturating_sub(20)..].join("\n    ");
        format!("\n  {} stderr (last lines):\n    {tail}", self.peer.name())
    }
}

/// A loopback port that was free a moment ago, below the kernel's
/// ephemeral range. Ports in that range are what every socket on the
/// machine gets when it binds port 0 or connects: another test process (a
/// parallel run of this test, a server of another test, any client) can
/// take one between our check and our server's bind, and a connect to a
/// port in it can even connect to itself. Below the range only explicit
/// binds compete, such as this function in another process; a server that
/// loses that race exits and is started again on another port. Ports are
/// never handed out twice by this process.
fn free_port() -> Result<u16, String> {
    static TAKEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut taken = TAKEN.lock().map_err(|_| "port list poisoned".to_string())?;
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .map_err(|err| format!("cannot read the ephemeral port range: {err}"))?;
    let ephemeral_low = range
        .split_whitespace()
        .next()
        .and_then(|low| low.parse::<u32>().ok())
        .ok_or_else(|| format!("unexpected ip_local_port_range {range:?}"))?;
    let low = (ephemeral_low / 2).max(1024);
    let span = ephemeral_low.saturating_sub(low);
    if span < 1024 {
        return Err(format!(
            "no room below the ephemeral port range ({range:?}) for test servers"
        ));
    }
    // Another process running this test starts elsewhere in the span.
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let start = std::process::id().wrapping_mul(7919) ^ clock;
    for i in 0..span {
        let port = (low + (start.wrapping_add(i.wrapping_mul(97))) % span) as u16;
        if taken.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.push(port);
            return Ok(port);
        }
    }
    Err("no free port found below the ephemeral range".to_string())
}

/// The kernel's name for 127.0.0.1:`port` in /proc/net/tcp (the address
/// is printed as the in-memory u32, in hex).
fn proc_loopback(port: u16) -> String {
    format!("{:08X}:{port:04X}", u32::from_ne_bytes([127, 0, 0, 1]))
}

/// The rows of the TCP socket table seen by process `pid` (Linux /proc),
/// split into fields: sl, local address, remote address, state,
/// tx_queue:rx_queue, tr:tm->when, retrnsmt, uid, timeout, inode, ...
fn tcp_sockets(pid: u32) -> Vec<Vec<String>> {
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    table
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// Whether process `pid` has an fd open on the socket with this inode.
fn holds_socket(pid: u32, inode: &str) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let target = format!("socket:[{inode}]");
    fds.flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == target.as_str()))
}

/// Whether process `pid` holds a TCP socket listening on 127.0.0.1:`port`.
fn listens_on(pid: u32, port: u16) -> bool {
    let local = proc_loopback(port);
    tcp_sockets(pid).iter().any(|f| {
        // State 0A is LISTEN.
        f.get(1) == Some(&local)
            && f.get(3).is_some_and(|st| st == "0A")
            && f.get(9).is_some_and(|inode| holds_socket(pid, inode))
    })
}

/// The server's end of one client connection.
struct ServerEnd {
    /// Bytes received that the server has not read yet.
    unread: u64,
    /// "0" once no fd refers to it.
    inode: String,
}

/// The end at 127.0.0.1:`server_port` of the connection from
/// 127.0.0.1:`client_port`, if the kernel still has it.
fn server_end(pid: u32, server_port: u16, client_port: u16) -> Option<ServerEnd> {
    let (local, remote) = (proc_loopback(server_port), proc_loopback(client_port));
    tcp_sockets(pid).into_iter().find_map(|f| {
        if f.get(1) != Some(&local) || f.get(2) != Some(&remote) {
            return None;
        }
        let queues = f.get(4)?;
        let unread = u64::from_str_radix(queues.split(':').nth(1)?, 16).ok()?;
        Some(ServerEnd {
            unread,
            inode: f.get(9)?.clone(),
        })
    })
}

// ---------------------------------------------------------------------------
// Playing a scenario against one server.

/// One observation: the normalised reply frame, or a harness message
/// (`(...)` for an expected silence or close, `!...` for a failure).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    step: usize,
    conn: Conn,
    bytes: Vec<u8>,
}

struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The client's port: names the connection in the server's /proc.
    local_port: u16,
}

impl Client {
    fn new(stream: TcpStream) -> Result<Client, String> {
        stream
            .set_nodelay(true)
            .map_err(|err| format!("set_nodelay: {err}"))?;
        stream
            .set_write_timeout(Some(FRAME_TIMEOUT))
            .map_err(|err| format!("set_write_timeout: {err}"))?;
        let local_port = stream
            .local_addr()
            .map_err(|err| format!("local_addr: {err}"))?
            .port();
        Ok(Client {
            stream,
            buf: Vec::new(),
            local_port,
        })
    }

    /// Reads more bytes into `buf`; `Ok(0)` is end of stream.
    fn fill(&mut self, timeout: Duration) -> std::io::Result<usize> {
        self.stream
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let mut chunk = [0u8; 65536];
        match self.stream.read(&mut chunk) {
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            Err(err) if err.kind() == ErrorKind::ConnectionReset => Ok(0),
            Err(err) => Err(err),
        }
    }

    /// Reads one reply frame: a CRLF-terminated line, plus the announced body
    /// and its CRLF for `RESERVED`, `FOUND` and `OK` replies.
    fn read_frame(&mut self) -> Result<Vec<u8>, String> {
        let deadline = Instant::now() + FRAME_TIMEOUT;
        loop {
            if let Some(len) = frame_len(&self.buf) {
                return Ok(self.buf.drain(..len).collect());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "timed out waiting for a reply; unread: {}",
                    show(&self.buf, SHORT)
                ));
            }
            match self.fill(left) {
                Ok(0) => {
                    return Err(format!(
                        "connection closed; unread: {}",
                        show(&self.buf, SHORT)
                    ))
                }
                Ok(_) => {}
                Err(err) if is_timeout(&err) => {}
                Err(err) => return Err(format!("read failed: {err}")),
            }
        }
    }
}

fn is_timeout(err: &std::io::Error) -> bool {
    matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// The length of the first complete frame in `buf`, if there is one.
fn frame_len(buf: &[u8]) -> Option<usize> {
    let line_end = buf.windows(2).position(|w| w == b"\r\n")? + 2;
    let line = &buf[..line_end - 2];
    let has_body = [&b"RESERVED "[..], b"FOUND ", b"OK "]
        .iter()
        .any(|prefix| line.starts_with(prefix));
    let body_len = if has_body {
        let last = line.rsplit(|&b| b == b' ').next().unwrap_or_default();
        std::str::from_utf8(last).ok()?.parse::<usize>().ok()
    } else {
        None
    };
    let total = match body_len {
        Some(n) => line_end + n + 2,
        None => line_end,
    };
    (buf.len() >= total).then_some(total)
}

/// Plays `steps` against `server`. The first harness failure ends the
/// session, because later replies could not be lined up any more.
fn play(server: &mut Server, steps: &[Step]) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut clients: HashMap<Conn, Client> = HashMap::new();
    let mut ids = IdMap::default();
    for (index, step) in steps.iter().enumerate() {
        let step_no = index + 1;
        let mut note = |conn: Conn, bytes: Vec<u8>| {
            out.push(Entry {
                step: step_no,
                conn,
                bytes,
            })
        };
        let failed = match run_step(server, &mut clients, &mut ids, step, &mut note) {
            Ok(()) => false,
            Err((conn, message)) => {
                note(conn, format!("!{message}").into_bytes());
                true
            }
        };
        if failed {
            break;
        }
    }
    if let Some(status) = server.exited() {
        out.push(Entry {
            step: steps.len(),
            conn: "-",
            bytes: format!("!server exited: {status}{}", server.log_tail()).into_bytes(),
        });
    }
    out
}

fn run_step(
    server: &mut Server,
    clients: &mut HashMap<Conn, Client>,
    ids: &mut IdMap,
    step: &Step,
    note: &mut dyn FnMut(Conn, Vec<u8>),
) -> Result<(), (Conn, String)> {
    match step {
        Step::Send(c, data) => {
            let client = client(server, clients, c)?;
            client
                .stream
                .write_all(data)
                .map_err(|err| (*c, format!("send failed: {err}")))?;
        }
        Step::Expect(c, n) => {
            let client = client(server, clients, c)?;
            for _ in 0..*n {
                let frame = client.read_frame().map_err(|err| (*c, err))?;
                note(c, normalise(&frame, ids));
            }
        }
        Step::ExpectNothing(c, ms) => {
            let client = client(server, clients, c)?;
            // The server has read what was sent before the next step acts,
            // however loaded the machine: the order in which it sees
            // connections' commands is the steps' order.
            server.wait_read(client.local_port);
            let unexpected =
                |buf: &[u8]| (*c, format!("expected no reply, got {}", show(buf, SHORT)));
            if !client.buf.is_empty() {
                return Err(unexpected(&client.buf));
            }
            match client.fill(Duration::from_millis(*ms)) {
                Ok(0) => return Err((*c, "expected no reply, connection closed".to_string())),
                Ok(_) => return Err(unexpected(&client.buf)),
                Err(err) if is_timeout(&err) => {}
                Err(err) => return Err((*c, format!("read failed: {err}"))),
            }
            note(c, format!("(nothing for {ms} ms)").into_bytes());
        }
        Step::Sleep(ms) => thread::sleep(Duration::from_millis(*ms)),
        Step::ExpectClosed(c) => {
            let client = client(server, clients, c)?;
            if !client.buf.is_empty() {
                return Err((
                    *c,
                    format!("expected close, unread {}", show(&client.buf, SHORT)),
                ));
            }
            match client.fill(FRAME_TIMEOUT) {
                Ok(0) => note(c, b"(closed)".to_vec()),
                Ok(_) => {
                    return Err((
                        *c,
                        format!("expected close, got {}", show(&client.buf, SHORT)),
                    ))
                }
                Err(err) if is_timeout(&err) => {
                    return Err((*c, "expected close, connection still open".to_string()))
                }
                Err(err) => return Err((*c, format!("read failed: {err}"))),
            }
        }
        Step::Close(c) => {
            let client = clients
                .remove(c)
                .ok_or((*c, "close of a connection never opened".to_string()))?;
            let _ = client.stream.shutdown(Shutdown::Both);
            // The counters change when the server closes its end.
            server.wait_closed(client.local_port);
        }
        Step::HalfClose(c) => {
            let client = client(server, clients, c)?;
            client
                .stream
                .shutdown(Shutdown::Write)
                .map_err(|err| (*c, format!("shutdown failed: {err}")))?;
        }
    }
    Ok(())
}

/// The client for `c`, connecting on first use.
fn client<'a>(
    server: &mut Server,
    clients: &'a mut HashMap<Conn, Client>,
    c: &Conn,
) -> Result<&'a mut Client, (Conn, String)> {
    if !clients.contains_key(c) {
        let stream = match server.first.take() {
            Some(stream) => stream,
            None => TcpStream::connect_timeout(&server.addr(), FRAME_TIMEOUT)
                .map_err(|err| (*c, format!("connect failed: {err}")))?,
        };
        clients.insert(c, Client::new(stream).map_err(|err| (*c, err))?);
    }
    clients
        .get_mut(c)
        .ok_or((*c, "connection vanished".to_string()))
}

// ---------------------------------------------------------------------------
// Normalisation.

/// Renames job ids by order of first appearance: the first id seen is `#1`.
#[derive(Default)]
struct IdMap(HashMap<Vec<u8>, usize>);

impl IdMap {
    fn rename(&mut self, id: &[u8]) -> Vec<u8> {
        let next = self.0.len() + 1;
        let n = *self.0.entry(id.to_vec()).or_insert(next);
        format!("#{n}").into_bytes()
    }
}

/// Stats keys whose values differ between any two server processes.
/// (`version` is not one: spool answers beanstalkd's, which clients parse.)
const VOLATILE_KEYS: &[&str] = &[
    "pid",
    "rusage-utime",
    "rusage-stime",
    "uptime",
    "id",
    "hostname",
    "os",
    "platform",
];

/// Renames job ids in `INSERTED`, `BURIED`, `RESERVED` and `FOUND` replies
/// and in stats-job bodies; masks volatile values in stats bodies and
/// recomputes the `OK <bytes>` header after masking.
fn normalise(frame: &[u8], ids: &mut IdMap) -> Vec<u8> {
    let line_end = frame
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(frame.len());
    let mut words: Vec<Vec<u8>> = frame[..line_end]
        .split(|&b| b == b' ')
        .map(<[u8]>::to_vec)
        .collect();
    let body = &frame[(line_end + 2).min(frame.len())..];
    let verb = words[0].clone();
    let has_id = matches!(&verb[..], b"INSERTED" | b"BURIED" | b"RESERVED" | b"FOUND");
    if has_id && words.len() >= 2 {
        words[1] = ids.rename(&words[1]);
    }
    let is_yaml = verb == b"OK" && body.starts_with(b"---\n") && body.ends_with(b"\r\n");
    if !is_yaml {
        let mut out = words.join(&b' ');
        out.extend_from_slice(&frame[line_end..]);
        return out;
    }
    let yaml = &body[..body.len() - 2];
    let is_job_stats = yaml.starts_with(b"---\nid: ");
    let masked: Vec<Vec<u8>> = yaml
        .split(|&b| b == b'\n')
        .map(|line| {
            let text = String::from_utf8_lossy(line);
            let Some((key, value)) = text.split_once(": ") else {
                return line.to_vec();
            };
            if key == "id" && is_job_stats {
                let mut out = b"id: ".to_vec();
                out.extend(ids.rename(value.as_bytes()));
                out
            } else if VOLATILE_KEYS.contains(&key) || key.starts_with("binlog-") {
                format!("{key}: *").into_bytes()
            } else {
                line.to_vec()
            }
        })
        .collect();
    let masked = masked.join(&b'\n');
    let mut out = format!("OK {}\r\n", masked.len()).into_bytes();
    out.extend(masked);
    out.extend_from_slice(b"\r\n");
    out
}

// ---------------------------------------------------------------------------
// Running and comparing.

fn dump_requested() -> bool {
    std::env::var_os("SPOOL_DIFF_DUMP").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Shows bytes as a quoted string with escapes, shortened past `limit`.
fn show(bytes: &[u8], limit: usize) -> String {
    let escape = |part: &[u8]| -> String {
        part.iter()
            .map(|&b| match b {
                b'\r' => "\\r".to_string(),
                b'\n' => "\\n".to_string(),
                b'\t' => "\\t".to_string(),
                b'\\' => "\\\\".to_string(),
                b'"' => "\\\"".to_string(),
                0x20..=0x7e => (b as char).to_string(),
                _ => format!("\\x{b:02x}"),
            })
            .collect()
    };
    if bytes.len() <= limit {
        format!("\"{}\"", escape(bytes))
    } else {
        format!(
            "\"{}\"...({} bytes)...\"{}\"",
            escape(&bytes[..limit - 40]),
            bytes.len(),
            escape(&bytes[bytes.len() - 40..])
        )
    }
}

const SHORT: usize = 300;
const LONG: usize = 2000;

/// What a step did, and what its connection last sent, for reports.
fn describe(steps: &[Step], step: usize) -> String {
    let Some(current) = step.checked_sub(1).and_then(|i| steps.get(i)) else {
        return "after the last step".to_string();
    };
    let conn = match current {
        Step::Send(c, _)
        | Step::Expect(c, _)
        | Step::ExpectNothing(c, _)
        | Step::ExpectClosed(c)
        | Step::Close(c)
        | Step::HalfClose(c) => *c,
        Step::Sleep(_) => return format!("{current:?}"),
    };
    let what = match current {
        Step::Send(c, _) => format!("Send({c:?})"),
        other => format!("{other:?}"),
    };
    let last_send = steps[..step].iter().rev().find_map(|s| match s {
        Step::Send(c, data) if *c == conn => Some(show(data, SHORT)),
        _ => None,
    });
    match last_send {
        Some(sent) => format!("{what}; `{conn}` last sent {sent}"),
        None => what,
    }
}

fn render(entries: &[Entry], limit: usize) -> String {
    entries
        .iter()
        .map(|e| {
            format!(
                "    step {:>3} {}: {}\n",
                e.step,
                e.conn,
                show(&e.bytes, limit)
            )
        })
        .collect()
}

/// The lines that differ between two multi-line replies (stats bodies).
fn line_diff(a: &[u8], b: &[u8], name: &str) -> String {
    let a: Vec<&[u8]> = a.split(|&x| x == b'\n').collect();
    let b: Vec<&[u8]> = b.split(|&x| x == b'\n').collect();
    if a.len() < 3 && b.len() < 3 {
        return String::new();
    }
    let mut out = String::from("    differing lines:\n");
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (a.get(i), b.get(i));
        if x != y {
            let side = |l: Option<&&[u8]>| l.map_or("(none)".to_string(), |l| show(l, SHORT));
            out.push_str(&format!(
                "      line {i}: beanstalkd {} | {name} {}\n",
                side(x),
                side(y)
            ));
        }
    }
    out
}

/// Both sessions side by side, marking the entries that differ.
fn render_both(oracle: &[Entry], other: &[Entry], name: &str) -> String {
    let line = |e: &Entry| format!("step {:>3} {}: {}", e.step, e.conn, show(&e.bytes, SHORT));
    let mut out = String::new();
    for i in 0..oracle.len().max(other.len()) {
        match (oracle.get(i), other.get(i)) {
            (Some(a), Some(b)) if a == b => out.push_str(&format!("      {}\n", line(a))),
            (Some(a), Some(b)) => out.push_str(&format!(
                "    ≠ beanstalkd {}\n    ≠ {name:<10} {}\n",
                line(a),
                line(b)
            )),
            (Some(a), None) => out.push_str(&format!("    ≠ beanstalkd {}\n", line(a))),
            (None, Some(b)) => out.push_str(&format!("    ≠ {name:<10} {}\n", line(b))),
            (None, None) => {}
        }
    }
    out
}

/// Stats keys whose values are whole seconds read off the server's clock:
/// a step stalled across a second boundary on one side changes them.
const TIME_KEYS: &[&str] = &["age", "time-left", "pause-time-left"];

/// A reply with the values of [`TIME_KEYS`] and the body length masked.
fn mask_time_fields(reply: &[u8]) -> Vec<u8> {
    if !reply.starts_with(b"OK ") {
        return reply.to_vec();
    }
    let text = String::from_utf8_lossy(reply);
    text.split('\n')
        .enumerate()
        .map(|(index, line)| match line.split_once(": ") {
            _ if index == 0 => "OK *".to_string(),
            Some((key, _)) if TIME_KEYS.contains(&key) => format!("{key}: *"),
            _ => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

/// Whether two transcripts differ only in time fields: the same steps and
/// replies once those are masked. Such a difference is what a stall on one
/// side gives; a real one repeats when the scenario is played again.
fn clock_only(oracle: &[Entry], other: &[Entry]) -> bool {
    oracle.len() == other.len()
        && oracle.iter().zip(other).all(|(a, b)| {
            a.step == b.step
                && a.conn == b.conn
                && mask_time_fields(&a.bytes) == mask_time_fields(&b.bytes)
        })
}

/// Why a scenario failed, and whether playing it again may pass.
struct Failure {
    report: String,
    /// The transcripts differ only where time fields are read.
    clock_only: bool,
}

impl From<String> for Failure {
    fn from(report: String) -> Failure {
        Failure {
            report,
            clock_only: false,
        }
    }
}

/// Plays one scenario against both servers at once and compares.
fn run_scenario(name: &str, steps: &[Step], candidate: Peer) -> Result<(), Failure> {
    let started = Instant::now();
    let play_on = |peer: Peer| Server::start(peer).map(|mut server| play(&mut server, steps));
    let (oracle, other) = thread::scope(|scope| {
        let oracle = scope.spawn(|| play_on(Peer::Beanstalkd));
        let other = scope.spawn(|| play_on(candidate));
        let panicked = |who: &str| Err(format!("the thread playing {who} panicked"));
        (
            oracle.join().unwrap_or_else(|_| panicked("beanstalkd")),
            other.join().unwrap_or_else(|_| panicked(candidate.name())),
        )
    });
    let oracle = oracle.map_err(|err| format!("scenario `{name}`: beanstalkd: {err}"))?;
    let cand = candidate.name();
    let other = other.map_err(|err| format!("scenario `{name}`: {cand}: {err}"))?;
    if dump_requested() {
        println!(
            "=== {name} ({:.1} s)\n  beanstalkd:\n{}  {cand}:\n{}",
            started.elapsed().as_secs_f64(),
            render(&oracle, LONG),
            render(&other, LONG)
        );
    }
    if let Some(bad) = oracle.iter().find(|entry| entry.bytes.starts_with(b"!")) {
        return Err(Failure::from(format!(
            "scenario `{name}` fails against beanstalkd itself, so the scenario is wrong: \
             step {} ({}): {}\n  beanstalkd session:\n{}",
            bad.step,
            describe(steps, bad.step),
            String::from_utf8_lossy(&bad.bytes),
            render(&oracle, SHORT)
        )));
    }
    if oracle == other {
        return Ok(());
    }
    let first = oracle
        .iter()
        .zip(&other)
        .position(|(a, b)| a != b)
        .unwrap_or(oracle.len().min(other.len()));
    let (a, b) = (oracle.get(first), other.get(first));
    let at = a.or(b).map_or(0, |entry| entry.step);
    let bytes = |e: Option<&Entry>| {
        e.map_or(b"(nothing: the session had ended)".to_vec(), |e| {
            e.bytes.clone()
        })
    };
    let (a, b) = (bytes(a), bytes(b));
    let clock_only = clock_only(&oracle, &other);
    let report = format!(
        "scenario `{name}`: {cand} differs from beanstalkd at step {at}: {}\n    \
         beanstalkd: {}\n    {cand:<10}: {}\n{}  both sessions (≠ marks differences):\n{}",
        describe(steps, at),
        show(&a, LONG),
        show(&b, LONG),
        line_diff(&a, &b, cand),
        render_both(&oracle, &other, cand)
    );
    Err(Failure { report, clock_only })
}

fn candidate_peer() -> Peer {
    match std::env::var("SPOOL_DIFF_PEER").as_deref() {
        Ok("beanstalkd") => Peer::Beanstalkd,
        _ => Peer::Spool,
    }
}

#[test]
fn spool_matches_beanstalkd() {
    let oracle = beanstalkd_path();
    let version = Command::new(&oracle)
        .arg("-v")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .unwrap_or_else(|err| panic!("cannot run {} -v: {err}", oracle.display()));
    assert_eq!(
        version,
        "beanstalkd 1.12",
        "the oracle at {} must be beanstalkd 1.12",
        oracle.display()
    );
    let candidate = candidate_peer();
    let filter = std::env::var("SPOOL_DIFF_FILTER").unwrap_or_default();
    let chosen: Vec<&Scenario> = SCENARIOS
        .iter()
        .filter(|(name, _)| name.contains(filter.as_str()))
        .collect();
    assert!(!chosen.is_empty(), "no scenario name contains {filter:?}");

    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    // Scenarios to play again: a clock scenario that differed, or any whose
    // transcripts differ in time fields only.
    let retries = Mutex::new(Vec::new());
    let lock = |list: &Mutex<Vec<(usize, String)>>, entry| {
        list.lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(entry)
    };
    thread::scope(|scope| {
        for _ in 0..WORKERS.min(chosen.len()) {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, Ordering::SeqCst);
                let Some((name, build)) = chosen.get(index) else {
                    break;
                };
                if let Err(Failure { report, clock_only }) = run_scenario(name, &build(), candidate)
                {
                    let again = clock_only || CLOCK_SCENARIOS.contains(name);
                    lock(if again { &retries } else { &failures }, (index, report));
                }
            });
        }
    });
    // Played again one at a time, after the rest: the first pass's own
    // parallel servers no longer compete with them for the CPU.
    let mut retries = retries
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    retries.sort();
    for (index, first_report) in retries {
        let (name, build) = chosen[index];
        println!("attempt 1 of {CLOCK_ATTEMPTS} differed:\n{first_report}\n");
        for attempt in 2..=CLOCK_ATTEMPTS {
            let Err(Failure { report, clock_only }) = run_scenario(name, &build(), candidate)
            else {
                break;
            };
            let again = clock_only || CLOCK_SCENARIOS.contains(name);
            if attempt < CLOCK_ATTEMPTS && again {
                println!("attempt {attempt} of {CLOCK_ATTEMPTS} differed:\n{report}\n");
                continue;
            }
            lock(&failures, (index, report));
            break;
        }
    }
    let mut failures = failures
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    failures.sort();
    let reports: Vec<String> = failures.into_iter().map(|(_, report)| report).collect();
    println!(
        "{} scenarios against {} in {:.1} s",
        chosen.len(),
        candidate.name(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        reports.is_empty(),
        "{} of {} scenarios differ:\n\n{}",
        reports.len(),
        chosen.len(),
        reports.join("\n\n")
    );
}

#[test]
fn clock_scenarios_exist() {
    for name in CLOCK_SCENARIOS {
        assert!(
            SCENARIOS.iter().any(|(scenario, _)| scenario == name),
            "{name} in CLOCK_SCENARIOS is no scenario"
        );
    }
}

#[test]
fn scenario_names_are_unique() {
    let mut names: Vec<&str> = SCENARIOS.iter().map(|(name, _)| *name).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(before, names.len(), "duplicate scenario names");
}

#[test]
fn normaliser_renames_ids_and_masks_volatile_stats() {
    let mut ids = IdMap::default();
    assert_eq!(normalise(b"INSERTED 42\r\n", &mut ids), b"INSERTED #1\r\n");
    assert_eq!(
        normalise(b"RESERVED 7 2\r\nhi\r\n", &mut ids),
        b"RESERVED #2 2\r\nhi\r\n"
    );
    assert_eq!(
        normalise(b"FOUND 42 1\r\nx\r\n", &mut ids),
        b"FOUND #1 1\r\nx\r\n"
    );
    assert_eq!(normalise(b"BURIED 7\r\n", &mut ids), b"BURIED #2\r\n");
    assert_eq!(normalise(b"BURIED\r\n", &mut ids), b"BURIED\r\n");
    assert_eq!(
        normalise(b"OK 23\r\n---\nid: 7\nstate: ready\n\r\n", &mut ids),
        b"OK 24\r\n---\nid: #2\nstate: ready\n\r\n"
    );
    assert_eq!(
        normalise(
            b"OK 40\r\n---\npid: 123\nid: 9f3a\nbinlog-max-size: 5\n\r\n",
            &mut ids
        ),
        b"OK 36\r\n---\npid: *\nid: *\nbinlog-max-size: *\n\r\n"
    );
    assert_eq!(
        normalise(b"OK 14\r\n---\n- default\n\r\n", &mut ids),
        b"OK 14\r\n---\n- default\n\r\n"
    );
    assert_eq!(frame_len(b"RESERVED 1 3\r\nab"), None);
    assert_eq!(frame_len(b"RESERVED 1 3\r\nabc\r\nX"), Some(19));
    assert_eq!(frame_len(b"TIMED_OUT\r\nX"), Some(11));
}

#[test]
fn time_fields_alone_count_as_a_clock_difference() {
    let entry = |step, bytes: &[u8]| Entry {
        step,
        conn: "a",
        bytes: bytes.to_vec(),
    };
    let oracle = [
        entry(1, b"INSERTED #1\r\n"),
        entry(2, b"OK 30\r\n---\nid: #1\nstate: ready\nage: 0\n\r\n"),
    ];
    let age_differs = [
        entry(1, b"INSERTED #1\r\n"),
        entry(2, b"OK 31\r\n---\nid: #1\nstate: ready\nage: 10\n\r\n"),
    ];
    let state_differs = [
        entry(1, b"INSERTED #1\r\n"),
        entry(2, b"OK 33\r\n---\nid: #1\nstate: delayed\nage: 0\n\r\n"),
    ];
    assert!(clock_only(&oracle, &oracle));
    assert!(clock_only(&oracle, &age_differs));
    assert!(!clock_only(&oracle, &state_differs));
    assert!(!clock_only(&oracle, &age_differs[..1]));
    assert!(!clock_only(
        &[entry(1, b"TIMED_OUT\r\n")],
        &[entry(1, b"DEADLINE_SOON\r\n")]
    ));
}
