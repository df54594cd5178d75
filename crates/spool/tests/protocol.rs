//! The beanstalkd protocol, driven over real sockets against a fresh
//! `spool serve --in-memory` per test, with the exact replies beanstalkd 1.12
//! gives (checked against it: `SPOOL_TEST_ORACLE=/usr/bin/beanstalkd`).
//!
//! Every read has a timeout; timing tests use 1-second delays and TTRs, the
//! smallest the protocol has, and bound their waits from both sides.

mod support;

use std::collections::HashSet;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use support::{parse_job, show, yaml_list, Client, Server};

/// How long a test waits to be sure that nothing is coming.
const QUIET: Duration = Duration::from_millis(300);

fn body_of(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| b'a' + ((i + seed as usize) % 26) as u8)
        .collect()
}

fn put_cmd(pri: u32, delay: u32, ttr: u32, body: &[u8]) -> Vec<u8> {
    let mut cmd = format!("put {pri} {delay} {ttr} {}\r\n", body.len()).into_bytes();
    cmd.extend_from_slice(body);
    cmd.extend_from_slice(b"\r\n");
    cmd
}

// ---------------------------------------------------------------------------
// put / reserve / delete

#[test]
fn put_reserve_delete() {
    let server = Server::start();
    let mut c = server.client();
    c.expect("put 0 0 60 5\r\nhello\r\n", "INSERTED 1\r\n");
    c.expect("reserve\r\n", "RESERVED 1 5\r\nhello\r\n");
    c.expect("delete 1\r\n", "DELETED\r\n");
    c.expect("delete 1\r\n", "NOT_FOUND\r\n");
    c.expect("peek 1\r\n", "NOT_FOUND\r\n");
    c.expect("reserve-with-timeout 0\r\n", "TIMED_OUT\r\n");
}

#[test]
fn put_ids_increase_and_bodies_are_opaque() {
    let server = Server::start();
    let mut c = server.client();
    c.expect("put 0 0 60 0\r\n\r\n", "INSERTED 1\r\n");
    // A body may hold CR, LF, NUL and any byte; only its length counts.
    let body: Vec<u8> = b"a\r\nb\0c\xff\r\n".to_vec();
    c.send(put_cmd(0, 0, 60, &body));
    c.expect_reply("INSERTED 2\r\n");
    c.expect("reserve\r\n", "RESERVED 1 0\r\n\r\n");
    c.send(b"reserve\r\n");
    let mut want = b"RESERVED 2 9\r\n".to_vec();
    want.extend_from_slice(&body);
    want.extend_from_slice(b"\r\n");
    assert_eq!(show(&c.reply_bytes()), show(&want));
}

#[test]
fn put_job_too_big_discards_body_and_connection_lives() {
    let server = Server::start();
    let mut c = server.client();
    // Default max job size is 65535: one byte more is refused, and the body
    // (which here contains what looks like commands) is read and discarded.
    let mut big = b"put 0 0 60 65536\r\n".to_vec();
    let mut body = b"list-tubes\r\n".repeat(65536 / 12);
    body.resize(65536, b'x');
    big.extend_from_slice(&body);
    big.extend_from_slice(b"\r\n");
    c.send(&big);
    c.expect_reply("JOB_TOO_BIG\r\n");
    c.expect("list-tube-used\r\n", "USING default\r\n");
    // No job was made and no id was used.
    c.expect("peek-ready\r\n", "NOT_FOUND\r\n");
    let exact = body_of(65535, 0);
    c.send(put_cmd(0, 0, 60, &exact));
    c.expect_reply("INSERTED 1\r\n");
    c.send(b"peek 1\r\n");
    let (id, got) = parse_job(&c.reply_bytes(), "FOUND");
    assert_eq!((id, got.len()), (1, 65535));
    assert_eq!(got, exact);
}

#[test]
fn put_job_too_big_body_arriving_in_pieces() {
    let server = Server::start();
    let mut c = server.client();
    c.send(b"put 0 0 60 100000\r\n");
    for _ in 0..10 {
        c.send(vec![b'z'; 10_000]);
        std::thread::sleep(Duration::from_millis(5));
    }
    c.send(b"\r\nput 0 0 60 2\r\nok\r\n");
    c.expect_reply("JOB_TOO_BIG\r\n");
    c.expect_reply("INSERTED 1\r\n");
}

#[test]
fn put_too_big_with_trailing_garbage_is_job_too_big() {
    // beanstalkd checks the size before the rest of the line, so an
    // oversized put with junk after its size is still JOB_TOO_BIG and its
    // body is skipped, not parsed as commands.
    let server = Server::start();
    let mut c = server.client();
    let mut cmd = b"put 0 0 60 70000 \r\n".to_vec();
    cmd.extend_from_slice(&vec![b'x'; 70_000]);
    cmd.extend_from_slice(b"\r\nlist-tube-used\r\n");
    c.send(&cmd);
    c.expect_reply("JOB_TOO_BIG\r\n");
    c.expect_reply("USING default\r\n");
}

#[test]
fn put_expected_crlf() {
    let server = Server::start();
    let mut c = server.client();
    // The two bytes after the body are not \r\n: the job is refused and
    // those two bytes are consumed; the next command is read normally.
    c.expect("put 0 0 60 5\r\nhelloXY", "EXPECTED_CRLF\r\n");
    c.expect("list-tube-used\r\n", "USING default\r\n");
    c.expect("peek-ready\r\n", "NOT_FOUND\r\n");
    // beanstalkd allots the failed job an id before it reads the body.
    c.expect("put 0 0 60 2\r\nok\r\n", "INSERTED 2\r\n");
}

#[test]
fn put_bad_format_variants() {
    let server = Server::start();
    let mut c = server.client();
    for bad in [
        "put 0 0 60\r\n",
        "put 0 0 60 \r\n",
        "put a 0 60 1\r\n",
        "put -1 0 60 1\r\n",
        "put 0 -1 60 1\r\n",
        "put 0 0 60 -1\r\n",
        "put 4294967296 0 60 1\r\n",
        "put 0 0 60 1x\r\n",
        "put 0 0 60 1 \r\n",
        "put 0 0 60 1 2\r\n",
        "put  0 0 60\r\n",
    ] {
        c.expect(bad, "BAD_FORMAT\r\n");
    }
    // "put" without its space is not the put command at all.
    c.expect("put\r\n", "UNKNOWN_COMMAND\r\n");
    // Nothing was read as a body: the connection is in step.
    c.expect("put 4294967295 0 60 1\r\nz\r\n", "INSERTED 1\r\n");
    c.expect("peek-ready\r\n", "FOUND 1 1\r\nz\r\n");
}

#[test]
fn put_body_split_across_writes_waits_for_the_rest() {
    let server = Server::start();
    let mut c = server.client();
    c.send(b"put 0 0 60 5\r\nhel");
    c.expect_no_reply(QUIET);
    c.send(b"lo\r");
    c.expect_no_reply(QUIET);
    c.expect("\n", "INSERTED 1\r\n");
}

#[test]
fn ttr_zero_is_raised_to_one_second() {
    let server = Server::start();
    let mut c = server.client();
    c.expect("put 0 0 0 1\r\nx\r\n", "INSERTED 1\r\n");
    let job = c.stats_map("stats-job 1\r\n");
    assert_eq!(job["ttr"], "1");
}

// ---------------------------------------------------------------------------
// priorities and order

#[test]
fn priorities_then_fifo() {
    let server = Server::start();
    let mut c = server.client();
    let jobs: [(u32, &str); 7] = [
        (10, "a"),
        (5, "b"),
        (10, "c"),
        (0, "d"),
        (5, "e"),
        (4294967295, "f"),
        (0, "g"),
    ];
    for (i, (pri, body)) in jobs.iter().enumerate() {
        c.expect(
            put_cmd(*pri, 0, 60, body.as_bytes()),
            &format!("INSERTED {}\r\n", i + 1),
        );
    }
    c.expect("peek-ready\r\n", "FOUND 4 1\r\nd\r\n");
    for (id, body) in [
        (4, "d"),
        (7, "g"),
        (2, "b"),
        (5, "e"),
        (1, "a"),
        (3, "c"),
        (6, "f"),
    ] {
        c.expect("reserve\r\n", &format!("RESERVED {id} 1\r\n{body}\r\n"));
    }
    c.expect("reserve-with-timeout 0\r\n", "TIMED_OUT\r\n");
}

// ---------------------------------------------------------------------------
// delayed jobs

#[test]
fn delayed_job_becomes_ready() {
    let server = Server::start();
    let mut c = server.client();
    c.expect("put 0 1 60 1\r\nd\r\n", "INSERTED 1\r\n");
    c.expect("peek-ready\r\n", "NOT_FOUND\r\n");
    c.expect("peek-delayed\r\n", "FOUND 1 1\r\nd\r\n");
    c.expect("reserve-with-timeout 0\r\n", "TIMED_OUT\r\n");
    let job = c.stats_map("stats-job 1\r\n");
    assert_eq!(job["state"], "delayed");
    assert_eq!(job["delay"], "1");
    let tube = c.stats_map("stats-tube default\r\n");
    assert_eq!(tube["current-jobs-delayed"], "1");
    assert_eq!(tube["current-jobs-ready"], "0");
    std::thread::sleep(Duration::from_millis(1300));
    c.expect("peek-delayed\r\n", "NOT_FOUND\r\n");
    c.expect("peek-ready\r\n", "FOUND 1 1\r\nd\r\n");
    assert_eq!(c.stats_map("stats-job 1\r\n")["state"], "ready");
    c.expect("reserve\r\n", "RESERVED 1 1\r\nd\r\n");
}

#[test]
fn peek_delayed_shows_the_soonest() {
    let server = Server::start();
    let mut c = server.client();
    c.expect("put 0 100 60 1\r\na\r\n", "INSERTED 1\r\n");
    c.expect("put 0 50 60 1\r\nb\r\n", "INSERTED 2\r\n");
    c.expect("put 0 200 60 1\r\nc\r\n", "INSERTED 3\r\n");
    c.expect("peek-delayed\r\n", "FOUND 2 1\r\nb\r\n");
}

#[test]
fn blocked_reserve_gets_a_delayed_job_when_due() {
    let server = Server::start();
    let mut c = server.client();
    // Measured from before the put: a stall after it only adds time.
    let start = Instant::now();
    c.expect("put 0 1 60 1\r\nd\r\n", "INSERTED 1\r\n");
    c.send(b"reserve\r\n");
    c.expect_reply("RESERVED 1 1\r\nd\r\n");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(800),
        "reserved a 1 s delayed job after {waited:?}"
    );
}

// ---------------------------------------------------------------------------
// release

#[test]
fn release_returns_job_with_new_priority() {
    let server = Server::start();
    let mut c = server.client();
    c.expect("put 100 0 60 1\r\na\r\n", "INSERTED 1\r\n");
    c.expect("put 50 0 60 1\r\nb\r\n", "INSERTED 2\r\n");
    c.expect("reserve\r\n", "RESERVED 2 1\r\nb\r\n");
    c.expect("release 2 200 0\r\n", "RELEASED\r\n");
    c.expect("release 2 200 0\r\n", "NOT_FOUND\r\n");
    let job = c.stats_map("stats-job 2\r\n");
    assert_eq!(job["state"], "ready");
    assert_eq!(job["pri"], "200");
    assert_eq!(job["releases"], "1");
    assert_eq!(job["reserves"], "1");
    // Now job 1 comes first.
    c.expect("reserve\r\n", "RESERVED 1 1\r\na\r\n");
    c.expect("reserve\r\n", "RESERVED 2 1\r\nb\r\n");
    let stats = c.stats_map("stats\r\n");
    assert_eq!(stats["cmd-release"], "2");
    c.expect("release 999 0 0\r\n", "NOT_FOUND\r\n");
    c.expect("release 1 0\r\n", "BAD_FORMAT\r\n");
    c.expect("release 1 x 0\r\n", "BAD_FORMAT\r\n");
}

#[test]
fn release_with_delay() {
    let server = Server::start();
    let mut c = server.client();
    c.expect("put 0 0 60 1\r\na\r\n", "INSERTED 1\r\n");
    c.expect("reserve\r\n", "RESERVED 1 1\r\na\r\n");
    // 2 s, so the checks below stay inside the delay through a stall of a
    // second; measured from before the release, as a stall only adds time.
    let start = Instant::now();
    c.expect("release 1 7 2\r\n", "RELEASED\r\n");
    c.expect("peek-ready\r\n", "NOT_FOUND\r\n");
    c.expect("peek-delayed\r\n", "FOUND 1 1\r\na\r\n");
    let job = c.stats_map("stats-job 1\r\n");
    assert_eq!(job["state"], "delayed");
    assert_eq!(job["delay"], "2");
    assert_eq!(job["pri"], "7");
    c.expect("reserve\r\n", "RESERVED 1 1\r\na\r\n");
    assert!(start.elapsed() >= Duration::from_millis(1800));
}

#[test]
fn only_the_reserver_may_release_bury_touch_or_delete() {
    let server = Server::start();
    let mut owner = server.client();
    let mut other = server.client();
    owner.expect("put 0 0 60 1\r\na\r\n", "INSERTED 1\r\n");
    owner.expect("reserve\r\n", "RESERVED 1 1\r\na\r\n");
    other.expect("release 1 0 0\r\n", "NOT_FOUND\r\n");
    other.expect("bury 1 0\r\n", "NOT_FOUND\r\n");
    other.expect("touch 1\r\n", "NOT_FOUND\r\n");
    other.expect("delete 1\r\n", "NOT_FOUND\r\n");
    other.expect("reserve-job 1\r\n", "NOT_FOUND\r\n");
    // A job that is not reserved may be deleted by anyone.
    owner.expect("put 0 0 60 1\r\nb\r\n", "INSERTED 2\r\n");
    other.expect("delete 2\r\n", "DELETED\r\n");
    owner.expect("delete 1\r\n", "DELETED\r\n");
}

// ---------------------------------------------------------------------------
// bury, kick

#[test]
fn bury_peek_buried_and_kick() {
    let server = Server::start();
    let mut c = server.client();
    c.expect("put 5 0 60 1\r\na\r\n", "INSERTED 1\r\n");
    c.expect("put 5 0 60 1\r\nb\r\n", "INSERTED 2\r\n");
    c.expect("peek-buried\r\n", "NOT_FOUND\r\n");
    c.expect("bury 1 0\r\n", "NOT_FOUND\r\n");
    c.expect("reserve\r\n", "RESERVED 1 1\r\na\r\n");
    c.expect("bury 1 3\r\n", "BURIED\r\n");
    c.expect("reserve\r\n", "RESERVED 2 1\r\nb\r\n");
    c.expect("bury 2 1\r\n", "BURIED\r\n");
    // Buried jobs leave in the order they were buried.
    c.expect("peek-buried\r\n", "FOUND 1 1\r\na\r\n");
    let job = c.stats_map("stats-job 1\r\n");
    assert_eq!(job["state"], "buried");
    assert_eq!(job["pri"], "3");
    assert_eq!(job["buries"], "1");
    let tube = c.stats_map("stats-tube default\r\n");
    assert_eq!(tube["current-jobs-buried"], "2");
    c.expect("reserve-with-timeout 0\r\n", "TIMED_OUT\r\n");
    c.expect("kick 1\r\n", "KICKED 1\r\n");
    c.expect("peek-buried\r\n", "FOUND 2 1\r\nb\r\n");
    c.expect("kick 10\r\n", "KICKED 1\r\n");
    c.expect("kick 10\r\n", "KICKED 0\r\n");
    c.expect("peek-buried\r\n", "NOT_FOUND\r\n");
    let job = c.stats_map("stats-job 1\r\n");
    assert_eq!(job["state"], "ready");
    assert_eq!(job["kicks"], "1");
    c.expect("reserve\r\n", "RESERVED 2 1\r\nb\r\n");
    c.expect("reserve\r\n", "RESERVED 1 1\r\na\r\n");
    c.expect("bury 1\r\n", "BAD_FORMAT\r\n");
    c.expect("kick x\r\n", "BAD_FORMAT\r\n");
    c.expect("kick\r\n", "UNKNOWN_COMMAND\r\n");
}

#[test]
fn kick_prefers_buried_over_delayed() {
    let server = Server::start();
    let mut c = server.client();
    c.expect("put 0 100 60 1\r\nd\r\n", "INSERTED 1\r\n");
    c.expect("put 0 0 60 1\r\nb\r\n", "INSERTED 2\r\n");
    c.expect("reserve\r\n", "RESERVED 2 1\r\nb\r\n");
    c.expect("bury 2 0\r\n", "BURIED\r\n");
    c.expect("kick 10\r\n", "KICKED 1\r\n");
    c.expect("peek-delayed\r\n", "FOUND 1 1\r\nd\r\n");
    // With nothing buried, kick moves delayed jobs to ready.
    c.expect("kick 10\r\n", "KICKED 1\r\n");
    c.expect("peek-delayed\r\n", "NOT_FOUND\r\n");
    c.expect("reserve\r\n", "RESERVED 1 1\r\nd\r\n");
}

#[test]
fn kick_job() {
    let server = Server::start();
    let mut c = server.client();
    c.expect("put 0 0 60 1\r\na\r\n", "INSERTED 1\r\n");
    c.expect("put 0 100 60 1\r\nb\r\n", "INSERTED 2\r\n");
    c.expect("reserve\r\n", "RESERVED 1 1\r\na\r\n");
    // Reserved: not kickable.
    c.expect("kick-job 1\r\n", "NOT_FOUND\r\n");
    c.expect("bury 1 0\r\n", "BURIED\r\n");
    c.expect("kick-job 1\r\n", "KICKED\r\n");
    // Ready: not kickable.
    c.expect("kick-job 1\r\n", "NOT_FOUND\r\n");
    // Delayed: kickable.
    c.expect("kick-job 2\r\n", "KICKED\r\n");
    c.expect("peek-delayed\r\n", "NOT_FOUND\r\n");
    c.expect("kick-job 999\r\n", "NOT_FOUND\r\n");
    c.expect("kick-job x\r\n", "BAD_FORMAT\r\n");
    c.expect("kick-job\r\n", "UNKNOWN_COMMAND\r\n");
}

// ---------------------------------------------------------------------------
// peek

#[test]
fn peek_commands() {
    let server = Server::start();
    let mut c = server.client();
    c.expect("peek-ready\r\n", "NOT_FOUND\r\n");
    c.expect("peek-delayed\r\n", "NOT_FOUND\r\n");
    c.expect("peek-buried\r\n", "NOT_FOUND\r\n");
    c.expect("put 9 0 60 4\r\nnine\r\n", "INSERTED 1\r\n");
    c.expect("put 1 0 60 3\r\none\r\n", "INSERTED 2\r\n");
    c.expect("peek 1\r\n", "FOUND 1 4\r\nnine\r\n");
    c.expect("peek-ready\r\n", "FOUND 2 3\r\none\r\n");
    c.expect("peek 3\r\n", "NOT_FOUND\r\n");
    c.expect("peek 18446744073709551615\r\n", "NOT_FOUND\r\n");
    c.expect("peek 18446744073709551616\r\n", "BAD_FORMAT\r\n");
    c.expect("peek x\r\n", "BAD_FORMAT\r\n");
    c.expect("peek 2 \r\n", "BAD_FORMAT\r\n");
    c.expect("peek\r\n", "UNKNOWN_COMMAND\r\n");
    c.expect("peek-ready \r\n", "BAD_FORMAT\r\n");
    // peek-* look at the used tube only, peek <id> at any tube.
    c.expect("use other\r\n", "USING other\r\n");
    c.expect("peek-ready\r\n", "NOT_FOUND\r\n");
    c.expect("peek 2\r\n", "FOUND 2 3\r\none\r\n");
}

#[test]
fn reserve_job_by_id() {
    let server = Server::start();
    let mut c = server.client();
    c.expect("put 5 0 60 1\r\na\r\n", "INSERTED 1\r\n");
    c.expect("put 0 0 60 1\r\nb\r\n", "INSERTED 2\r\n");
    c.expect("reserve-job 1\r\n", "RESERVED 1 1\r\na\r\n");
    c.expect("reserve-job 1\r\n", "NOT_FOUND\r\n");
    c.expect("reserve-job 999\r\n", "NOT_FOUND\r\n");
    c.expect("reserve-job x\r\n", "BAD_FORMAT\r\n");
    assert_eq!(c.stats_map("stats-job 1\r\n")["state"], "reserved");
    c.expect("delete 1\r\n", "DELETED\r\n");
}

// ---------------------------------------------------------------------------
// touch, TTR, DEADLINE_SOON

#[test]
fn touch_extends_the_reservation() {
    let server = Server::start();
    let mut c = server.client();
    // A 4 s TTR, so a loaded machine's stalls (a second or more) fit in
    // the 1.8 s left before each deadline.
    c.expect("put 0 0 4 1\r\na\r\n", "INSERTED 1\r\n");
    c.expect("reserve\r\n", "RESERVED 1 1\r\na\r\n");
    std::thread::sleep(Duration::from_millis(2200));
    c.expect("touch 1\r\n", "TOUCHED\r\n");
    std::thread::sleep(Duration::from_millis(2200));
    // 4.4 s after the reserve, past the 4 s TTR, but 2.2 s after the touch.
    let job = c.stats_map("stats-job 1\r\n");
    assert_eq!(job["state"], "reserved");
    assert_eq!(job["timeouts"], "0");
    c.expect("delete 1\r\n", "DELETED\r\n");
    c.expect("touch 1\r\n", "NOT_FOUND\r\n");
    c.expect("touch x\r\n", "BAD_FORMAT\r\n");
    c.expect("touch\r\n", "UNKNOWN_COMMAND\r\n");
    assert_eq!(c.stats_map("stats\r\n")["cmd-touch"], "2");
}

#[test]
fn ttr_expiry_returns_the_job_to_ready() {
    let server = Server::start();
    let mut worker = server.client();
    let mut waiter = server.client();
    worker.expect("put 0 0 1 1\r\nt\r\n", "INSERTED 1\r\n");
    // Measured from before the reserve: a stall after it only adds time.
    let reserved_at = Instant::now();
    worker.expect("reserve\r\n", "RESERVED 1 1\r\nt\r\n");
    let job = worker.stats_map("stats-job 1\r\n");
    assert_eq!(job["state"], "reserved");
    assert_eq!(job["ttr"], "1");
    assert_eq!(job["time-left"], "0");
    // The waiter gets the job once the worker's TTR runs out.
    waiter.send(b"reserve\r\n");
    waiter.expect_reply("RESERVED 1 1\r\nt\r\n");
    let after = reserved_at.elapsed();
    assert!(
        after >= Duration::from_millis(800),
        "TTR of 1 s expired after {after:?}"
    );
    // The first worker no longer holds it.
    worker.expect("delete 1\r\n", "NOT_FOUND\r\n");
    worker.expect("touch 1\r\n", "NOT_FOUND\r\n");
    let job = waiter.stats_map("stats-job 1\r\n");
    assert_eq!(job["timeouts"], "1");
    assert_eq!(job["reserves"], "2");
    assert_eq!(waiter.stats_map("stats\r\n")["job-timeouts"], "1");
    waiter.expect("delete 1\r\n", "DELETED\r\n");
}

#[test]
fn ttr_expiry_without_a_waiter() {
    let server = Server::start();
    let mut c = server.client();
    c.expect("put 0 0 1 1\r\nt\r\n", "INSERTED 1\r\n");
    c.expect("reserve\r\n", "RESERVED 1 1\r\nt\r\n");
    std::thread::sleep(Duration::from_millis(1300));
    let job = c.stats_map("stats-job 1\r\n");
    assert_eq!(job["state"], "ready");
    assert_eq!(job["timeouts"], "1");
    c.expect("peek-ready\r\n", "FOUND 1 1\r\nt\r\n");
}

#[test]
fn deadline_soon() {
    let server = Server::start();
    let mut c = server.client();
    // A 1-second TTR is inside the 1-second safety margin at once.
    c.expect("put 0 0 1 1\r\na\r\n", "INSERTED 1\r\n");
    c.expect("reserve\r\n", "RESERVED 1 1\r\na\r\n");
    c.expect("reserve\r\n", "DEADLINE_SOON\r\n");
    c.expect("reserve-with-timeout 5\r\n", "DEADLINE_SOON\r\n");
    c.expect("delete 1\r\n", "DELETED\r\n");
    // A 2-second TTR: a blocked reserve is told when the margin is reached.
    c.expect("put 0 0 2 1\r\nb\r\n", "INSERTED 2\r\n");
    // From before the reserve; no upper bound, which a loaded machine
    // would break (the reply arriving at all says the margin fired).
    let start = Instant::now();
    c.expect("reserve\r\n", "RESERVED 2 1\r\nb\r\n");
    c.expect("reserve-with-timeout 5\r\n", "DEADLINE_SOON\r\n");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(700),
        "DEADLINE_SOON after {waited:?}"
    );
    // DEADLINE_SOON does not hold back a ready job.
    c.expect("put 0 0 60 1\r\nc\r\n", "INSERTED 3\r\n");
    c.expect("reserve\r\n", "RESERVED 3 1\r\nc\r\n");
}

// ---------------------------------------------------------------------------
// reserve with timeout, blocking reserve

#[test]
fn reserve_with_timeout() {
    let server = Server::start();
    let mut c = server.client();
    c.expect("reserve-with-timeout 0\r\n", "TIMED_OUT\r\n");
    // A lower bound only: a loaded machine can stretch any wait.
    let start = Instant::now();
    c.expect("reserve-with-timeout 1\r\n", "TIMED_OUT\r\n");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(800),
        "a 1 s timeout took {waited:?}"
    );
    c.expect("put 0 0 60 1\r\na\r\n", "INSERTED 1\r\n");
    c.expect("reserve-with-timeout 0\r\n", "RESERVED 1 1\r\na\r\n");
    // strtol rules: no digits read as 0.
    c.expect("reserve-with-timeout x\r\n", "TIMED_OUT\r\n");
    c.expect("reserve-with-timeout\r\n", "BAD_FORMAT\r\n");
    c.expect("reserve \r\n", "BAD_FORMAT\r\n");
    let stats = c.stats_map("stats\r\n");
    assert_eq!(stats["cmd-reserve-with-timeout"], "4");
}

#[test]
fn blocked_reserve_completed_by_another_connections_put() {
    let server = Server::start();
    let mut worker = server.client();
    let mut producer = server.client();
    worker.send(b"reserve\r\n");
    worker.expect_no_reply(QUIET);
    producer.wait_for_stat("stats\r\n", "current-waiting", "1");
    assert_eq!(
        producer.stats_map("stats-tube default\r\n")["current-waiting"],
        "1"
    );
    producer.expect("put 0 0 60 2\r\nhi\r\n", "INSERTED 1\r\n");
    worker.expect_reply("RESERVED 1 2\r\nhi\r\n");
    producer.wait_for_stat("stats\r\n", "current-waiting", "0");
    let stats = producer.stats_map("stats\r\n");
    assert_eq!(stats["current-jobs-reserved"], "1");
    assert_eq!(stats["current-workers"], "1");
    assert_eq!(stats["current-producers"], "1");
}

#[test]
fn blocked_reserve_with_timeout_completed_by_put() {
    let server = Server::start();
    let mut worker = server.client();
    let mut producer = server.client();
    worker.send(b"reserve-with-timeout 4\r\n");
    worker.expect_no_reply(QUIET);
    producer.expect("put 0 0 60 2\r\nhi\r\n", "INSERTED 1\r\n");
    worker.expect_reply("RESERVED 1 2\r\nhi\r\n");
}

#[test]
fn commands_pipelined_behind_a_blocked_reserve_wait_for_it() {
    let server = Server::start();
    let mut worker = server.client();
    let mut producer = server.client();
    worker.send(b"reserve\r\nlist-tube-used\r\n");
    worker.expect_no_reply(QUIET);
    producer.expect("put 0 0 60 1\r\na\r\n", "INSERTED 1\r\n");
    worker.expect_reply("RESERVED 1 1\r\na\r\n");
    worker.expect_reply("USING default\r\n");
}

#[test]
fn closing_a_connection_releases_its_jobs_to_a_waiting_reserver() {
    let server = Server::start();
    let mut worker = server.client();
    let mut waiter = server.client();
    worker.expect("put 0 0 60 1\r\na\r\n", "INSERTED 1\r\n");
    worker.expect("reserve\r\n", "RESERVED 1 1\r\na\r\n");
    waiter.send(b"reserve\r\n");
    waiter.expect_no_reply(QUIET);
    drop(worker);
    waiter.expect_reply("RESERVED 1 1\r\na\r\n");
    let job = waiter.stats_map("stats-job 1\r\n");
    assert_eq!(job["reserves"], "2");
    assert_eq!(job["releases"], "0");
    assert_eq!(job["timeouts"], "0");
}

#[test]
fn quitting_a_connection_releases_its_jobs() {
    let server = Server::start();
    let mut worker = server.client();
    worker.expect("put 0 0 60 1\r\na\r\n", "INSERTED 1\r\n");
    worker.expect("reserve\r\n", "RESERVED 1 1\r\na\r\n");
    worker.send(b"quit\r\n");
    worker.expect_closed();
    let mut other = server.client();
    other.wait_for_stat("stats-job 1\r\n", "state", "ready");
    other.expect("reserve-with-timeout 0\r\n", "RESERVED 1 1\r\na\r\n");
}

#[test]
fn an_abandoned_blocked_reserve_takes_no_job() {
    let server = Server::start();
    let mut gone = server.client();
    let mut c = server.client();
    gone.send(b"reserve\r\n");
    c.wait_for_stat("stats\r\n", "current-waiting", "1");
    drop(gone);
    c.wait_for_stat("stats\r\n", "current-waiting", "0");
    c.expect("put 0 0 60 1\r\na\r\n", "INSERTED 1\r\n");
    c.expect("reserve-with-timeout 0\r\n", "RESERVED 1 1\r\na\r\n");
}

#[test]
fn half_closed_client_still_gets_its_replies() {
    let server = Server::start();
    let mut c = server.client();
    c.send(b"put 0 0 60 1\r\na\r\npeek-ready\r\n");
    c.shutdown_write();
    c.expect_reply("INSERTED 1\r\n");
    c.expect_reply("FOUND 1 1\r\na\r\n");
    c.expect_closed();
}

// ---------------------------------------------------------------------------
// tubes

#[test]
fn use_watch_ignore_and_lists() {
    let server = Server::start();
    let mut c = server.client();
    c.expect("list-tube-used\r\n", "USING default\r\n");
    c.expect("list-tubes-watched\r\n", "OK 14\r\n---\n- default\n\r\n");
    c.expect("list-tubes\r\n", "OK 14\r\n---\n- default\n\r\n");
    c.expect("use foo\r\n", "USING foo\r\n");
    c.expect("list-tube-used\r\n", "USING foo\r\n");
    c.expect("put 0 0 60 1\r\nf\r\n", "INSERTED 1\r\n");
    // The job went to foo, which this connection does not watch.
    c.expect("reserve-with-timeout 0\r\n", "TIMED_OUT\r\n");
    c.expect("list-tubes\r\n", "OK 20\r\n---\n- default\n- foo\n\r\n");
    c.expect("watch foo\r\n", "WATCHING 2\r\n");
    c.expect("watch foo\r\n", "WATCHING 2\r\n");
    c.expect(
        "list-tubes-watched\r\n",
        "OK 20\r\n---\n- default\n- foo\n\r\n",
    );
    c.expect("ignore default\r\n", "WATCHING 1\r\n");
    c.expect("ignore default\r\n", "WATCHING 1\r\n");
    c.expect("ignore foo\r\n", "NOT_IGNORED\r\n");
    c.expect("ignore nosuch\r\n", "WATCHING 1\r\n");
    c.expect("list-tubes-watched\r\n", "OK 10\r\n---\n- foo\n\r\n");
    c.expect("reserve\r\n", "RESERVED 1 1\r\nf\r\n");
    assert_eq!(c.stats_map("stats-job 1\r\n")["tube"], "foo");
    c.expect("delete 1\r\n", "DELETED\r\n");
    c.expect("list-tubes-watched \r\n", "BAD_FORMAT\r\n");
    c.expect("list-tube-used \r\n", "BAD_FORMAT\r\n");
    c.expect("list-tubes \r\n", "BAD_FORMAT\r\n");
    c.expect("use\r\n", "UNKNOWN_COMMAND\r\n");
    c.expect("use \r\n", "BAD_FORMAT\r\n");
    c.expect("watch \r\n", "BAD_FORMAT\r\n");
    c.expect("ignore \r\n", "BAD_FORMAT\r\n");
    let stats = c.stats_map("stats\r\n");
    assert_eq!(stats["cmd-use"], "1");
    assert_eq!(stats["cmd-watch"], "2");
    assert_eq!(stats["cmd-ignore"], "4");
}

#[test]
fn unused_tubes_disappear() {
    let server = Server::start();
    let mut c = server.client();
    let mut other = server.client();
    c.expect("use temp\r\n", "USING temp\r\n");
    other.expect("list-tubes\r\n", "OK 21\r\n---\n- default\n- temp\n\r\n");
    other.expect("stats-tube temp\r\n", &{
        let s = empty_tube_stats_yaml("temp", 1, 0);
        format!("OK {}\r\n{s}\r\n", s.len())
    });
    c.expect("use default\r\n", "USING default\r\n");
    other.expect("list-tubes\r\n", "OK 14\r\n---\n- default\n\r\n");
    other.expect("stats-tube temp\r\n", "NOT_FOUND\r\n");
    // A tube with a job lives while the job does.
    c.expect("use keep\r\n", "USING keep\r\n");
    c.expect("put 0 0 60 1\r\nk\r\n", "INSERTED 1\r\n");
    c.expect("use default\r\n", "USING default\r\n");
    other.expect("list-tubes\r\n", "OK 21\r\n---\n- default\n- keep\n\r\n");
    c.expect("delete 1\r\n", "DELETED\r\n");
    other.expect("list-tubes\r\n", "OK 14\r\n---\n- default\n\r\n");
    // A tube a closed connection used goes too.
    let mut gone = server.client();
    gone.expect("watch gone\r\n", "WATCHING 2\r\n");
    other.expect("list-tubes\r\n", "OK 21\r\n---\n- default\n- gone\n\r\n");
    drop(gone);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        other.send(b"list-tubes\r\n");
        let tubes = yaml_list(&other.reply());
        if tubes == ["default"] {
            break;
        }
        assert!(Instant::now() < deadline, "tubes still {tubes:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The YAML of `stats-tube` for an empty tube.
fn empty_tube_stats_yaml(name: &str, using: u32, watching: u32) -> String {
    format!(
        "---\nname: {name}\ncurrent-jobs-urgent: 0\ncurrent-jobs-ready: 0\n\
         current-jobs-reserved: 0\ncurrent-jobs-delayed: 0\ncurrent-jobs-buried: 0\n\
         total-jobs: 0\ncurrent-using: {using}\ncurrent-watching: {watching}\n\
         current-waiting: 0\ncmd-delete: 0\ncmd-pause-tube: 0\npause: 0\n\
         pause-time-left: 0\n"
    )
}

#[test]
fn tube_names_length_and_characters() {
    let server = Server::start();
    let mut c = server.client();
    let name200 = "a".repeat(200);
    let name201 = "a".repeat(201);
    c.expect(
        format!("use {name200}\r\n"),
        &format!("USING {name200}\r\n"),
    );
    c.expect(format!("use {name201}\r\n"), "BAD_FORMAT\r\n");
    c.expect(format!("watch {name200}\r\n"), "WATCHING 2\r\n");
    c.expect(format!("watch {name201}\r\n"), "BAD_FORMAT\r\n");
    c.expect(format!("ignore {name201}\r\n"), "BAD_FORMAT\r\n");
    c.expect(format!("stats-tube {name201}\r\n"), "BAD_FORMAT\r\n");
    let tube = c.stats_map(&format!("stats-tube {name200}\r\n"));
    assert_eq!(tube["name"], name200);
    c.expect(format!("pause-tube {name201} 1\r\n"), "BAD_FORMAT\r\n");
    c.expect("pause-tube -foo 1\r\n", "BAD_FORMAT\r\n");
    c.expect(
        "use a-b+c/d;e.f$g_h(i)j\r\n",
        "USING a-b+c/d;e.f$g_h(i)j\r\n",
    );
    c.expect("use 0123456789ABCZabcz\r\n", "USING 0123456789ABCZabcz\r\n");
    c.expect("use -foo\r\n", "BAD_FORMAT\r\n");
    c.expect("use foo bar\r\n", "BAD_FORMAT\r\n");
    c.expect("use a*b\r\n", "BAD_FORMAT\r\n");
    c.expect("use a:b\r\n", "BAD_FORMAT\r\n");
    c.expect("use caf\u{e9}\r\n", "BAD_FORMAT\r\n");
    c.expect("list-tube-used\r\n", "USING 0123456789ABCZabcz\r\n");
}

#[test]
fn pause_tube() {
    let server = Server::start();
    let mut c = server.client();
    c.expect("put 0 0 60 1\r\np\r\n", "INSERTED 1\r\n");
    // 2 s, so a stall of a second still leaves the checks inside the pause;
    // measured from before the command, as a stall only adds time.
    let paused_at = Instant::now();
    c.expect("pause-tube default 2\r\n", "PAUSED\r\n");
    c.expect("reserve-with-timeout 0\r\n", "TIMED_OUT\r\n");
    // Peeking is not affected.
    c.expect("peek-ready\r\n", "FOUND 1 1\r\np\r\n");
    let tube = c.stats_map("stats-tube default\r\n");
    assert_eq!(tube["pause"], "2");
    assert_eq!(tube["cmd-pause-tube"], "1");
    assert!(
        ["0", "1"].contains(&tube["pause-time-left"].as_str()),
        "pause-time-left: {}",
        tube["pause-time-left"]
    );
    // A blocked reserve gets the job once the pause ends.
    c.expect("reserve\r\n", "RESERVED 1 1\r\np\r\n");
    let waited = paused_at.elapsed();
    assert!(
        waited >= Duration::from_millis(1800),
        "a 2 s pause ended after {waited:?}"
    );
    let tube = c.stats_map("stats-tube default\r\n");
    assert_eq!(tube["pause-time-left"], "0");
    c.expect("pause-tube nosuch 1\r\n", "NOT_FOUND\r\n");
    c.expect("pause-tube default\r\n", "BAD_FORMAT\r\n");
    c.expect("pause-tube default x\r\n", "BAD_FORMAT\r\n");
    c.expect("pause-tube\r\n", "BAD_FORMAT\r\n");
    assert_eq!(c.stats_map("stats\r\n")["cmd-pause-tube"], "2");
}

// ---------------------------------------------------------------------------
// stats

const STATS_KEYS: &[&str] = &[
    "current-jobs-urgent",
    "current-jobs-ready",
    "current-jobs-reserved",
    "current-jobs-delayed",
    "current-jobs-buried",
    "cmd-put",
    "cmd-peek",
    "cmd-peek-ready",
    "cmd-peek-delayed",
    "cmd-peek-buried",
    "cmd-reserve",
    "cmd-reserve-with-timeout",
    "cmd-delete",
    "cmd-release",
    "cmd-use",
    "cmd-watch",
    "cmd-ignore",
    "cmd-bury",
    "cmd-kick",
    "cmd-touch",
    "cmd-stats",
    "cmd-stats-job",
    "cmd-stats-tube",
    "cmd-list-tubes",
    "cmd-list-tube-used",
    "cmd-list-tubes-watched",
    "cmd-pause-tube",
    "job-timeouts",
    "total-jobs",
    "max-job-size",
    "current-tubes",
    "current-connections",
    "current-producers",
    "current-workers",
    "current-waiting",
    "total-connections",
    "pid",
    "version",
    "rusage-utime",
    "rusage-stime",
    "uptime",
    "binlog-oldest-index",
    "binlog-current-index",
    "binlog-records-migrated",
    "binlog-records-written",
    "binlog-max-size",
    "draining",
    "id",
    "hostname",
    "os",
    "platform",
];

const STATS_TUBE_KEYS: &[&str] = &[
    "name",
    "current-jobs-urgent",
    "current-jobs-ready",
    "current-jobs-reserved",
    "current-jobs-delayed",
    "current-jobs-buried",
    "total-jobs",
    "current-using",
    "current-watching",
    "current-waiting",
    "cmd-delete",
    "cmd-pause-tube",
    "pause",
    "pause-time-left",
];

const STATS_JOB_KEYS: &[&str] = &[
    "id",
    "tube",
    "state",
    "pri",
    "age",
    "delay",
    "ttr",
    "time-left",
    "file",
    "reserves",
    "timeouts",
    "releases",
    "buries",
    "kicks",
];

#[test]
fn stats_fields_and_counters() {
    let server = Server::start();
    let mut c = server.client();
    assert_eq!(c.stats_keys("stats\r\n"), STATS_KEYS);
    c.expect("put 0 0 60 1\r\na\r\n", "INSERTED 1\r\n");
    c.expect("put 2000 0 60 1\r\nb\r\n", "INSERTED 2\r\n");
    c.expect("put 0 100 60 1\r\nc\r\n", "INSERTED 3\r\n");
    c.expect("put 0 0 60 1\r\nd\r\n", "INSERTED 4\r\n");
    c.expect("reserve\r\n", "RESERVED 1 1\r\na\r\n");
    c.expect("reserve\r\n", "RESERVED 4 1\r\nd\r\n");
    c.expect("bury 4 0\r\n", "BURIED\r\n");
    c.expect("peek 2\r\n", "FOUND 2 1\r\nb\r\n");
    c.expect("peek-ready\r\n", "FOUND 2 1\r\nb\r\n");
    c.expect("delete 999\r\n", "NOT_FOUND\r\n");
    let s = c.stats_map("stats\r\n");
    let expect = [
        ("current-jobs-urgent", "0"),
        ("current-jobs-ready", "1"),
        ("current-jobs-reserved", "1"),
        ("current-jobs-delayed", "1"),
        ("current-jobs-buried", "1"),
        ("cmd-put", "4"),
        ("cmd-peek", "1"),
        ("cmd-peek-ready", "1"),
        ("cmd-reserve", "2"),
        ("cmd-delete", "1"),
        ("cmd-bury", "1"),
        ("cmd-stats", "2"),
        ("total-jobs", "4"),
        ("max-job-size", "65535"),
        ("current-tubes", "1"),
        ("current-producers", "1"),
        ("current-workers", "1"),
        ("current-waiting", "0"),
        ("draining", "false"),
        ("binlog-oldest-index", "0"),
        ("binlog-current-index", "0"),
    ];
    for (key, value) in expect {
        assert_eq!(s[key], value, "stats {key}");
    }
    assert_eq!(s["pid"], server.pid().to_string());
    // Exactly beanstalkd 1.12's: clients parse it as a version number.
    assert_eq!(s["version"], "\"1.12\"");
    for key in ["uptime", "total-connections", "current-connections"] {
        s[key]
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("{key}: {}", s[key]));
    }
    for key in ["rusage-utime", "rusage-stime"] {
        let (secs, micros) = s[key].split_once('.').expect("seconds.micros");
        assert!(
            secs.parse::<u64>().is_ok() && micros.len() == 6 && micros.parse::<u64>().is_ok(),
            "{key}: {}",
            s[key]
        );
    }
    assert_eq!(s["id"].len(), 16, "id: {}", s["id"]);
    // The urgent count follows the priority threshold of 1024.
    c.expect("put 1023 0 60 1\r\nu\r\n", "INSERTED 5\r\n");
    c.expect("put 1024 0 60 1\r\nn\r\n", "INSERTED 6\r\n");
    let s = c.stats_map("stats\r\n");
    assert_eq!(s["current-jobs-urgent"], "1");
    assert_eq!(s["current-jobs-ready"], "3");
    c.expect("stats \r\n", "BAD_FORMAT\r\n");
    c.expect("statsx\r\n", "BAD_FORMAT\r\n");
}

#[test]
fn stats_connections_count_open_and_closed() {
    let server = Server::start();
    let mut c = server.client();
    // The server start-up probe is one connection of its own.
    c.wait_for_stat("stats\r\n", "current-connections", "1");
    let before: u64 = c.stats_map("stats\r\n")["total-connections"]
        .parse()
        .expect("total-connections");
    let others: Vec<Client> = (0..3).map(|_| server.client()).collect();
    c.wait_for_stat("stats\r\n", "current-connections", "4");
    let s = c.stats_map("stats\r\n");
    assert_eq!(s["total-connections"], (before + 3).to_string());
    drop(others);
    c.wait_for_stat("stats\r\n", "current-connections", "1");
}

#[test]
fn stats_tube_fields() {
    let server = Server::start();
    let mut c = server.client();
    let mut w = server.client();
    c.expect("use jobs\r\n", "USING jobs\r\n");
    c.expect("put 0 0 60 1\r\na\r\n", "INSERTED 1\r\n");
    c.expect("put 5000 0 60 1\r\nb\r\n", "INSERTED 2\r\n");
    c.expect("put 0 100 60 1\r\nc\r\n", "INSERTED 3\r\n");
    w.expect("watch jobs\r\n", "WATCHING 2\r\n");
    w.expect("reserve\r\n", "RESERVED 1 1\r\na\r\n");
    w.expect("delete 1\r\n", "DELETED\r\n");
    w.expect("reserve\r\n", "RESERVED 2 1\r\nb\r\n");
    assert_eq!(c.stats_keys("stats-tube jobs\r\n"), STATS_TUBE_KEYS);
    let t = c.stats_map("stats-tube jobs\r\n");
    let expect = [
        ("name", "jobs"),
        ("current-jobs-urgent", "0"),
        ("current-jobs-ready", "0"),
        ("current-jobs-reserved", "1"),
        ("current-jobs-delayed", "1"),
        ("current-jobs-buried", "0"),
        ("total-jobs", "3"),
        ("current-using", "1"),
        ("current-watching", "1"),
        ("current-waiting", "0"),
        ("cmd-delete", "1"),
        ("cmd-pause-tube", "0"),
        ("pause", "0"),
        ("pause-time-left", "0"),
    ];
    for (key, value) in expect {
        assert_eq!(t[key], value, "stats-tube {key}");
    }
    let d = c.stats_map("stats-tube default\r\n");
    assert_eq!(d["current-using"], "1");
    assert_eq!(d["current-watching"], "2");
    assert_eq!(d["total-jobs"], "0");
    c.expect("stats-tube nosuch\r\n", "NOT_FOUND\r\n");
    c.expect("stats-tube \r\n", "BAD_FORMAT\r\n");
    assert_eq!(c.stats_map("stats\r\n")["cmd-stats-tube"], "4");
}

#[test]
fn stats_job_fields() {
    let server = Server::start();
    let mut c = server.client();
    c.expect("use work\r\n", "USING work\r\n");
    c.expect("put 42 0 30 1\r\na\r\n", "INSERTED 1\r\n");
    assert_eq!(c.stats_keys("stats-job 1\r\n"), STATS_JOB_KEYS);
    c.expect("stats-job 1\r\n", &{
        let yaml = "---\nid: 1\ntube: work\nstate: ready\npri: 42\nage: 0\ndelay: 0\n\
                        ttr: 30\ntime-left: 0\nfile: 0\nreserves: 0\ntimeouts: 0\n\
                        releases: 0\nburies: 0\nkicks: 0\n";
        format!("OK {}\r\n{yaml}\r\n", yaml.len())
    });
    c.expect("watch work\r\n", "WATCHING 2\r\n");
    c.expect("reserve\r\n", "RESERVED 1 1\r\na\r\n");
    let j = c.stats_map("stats-job 1\r\n");
    assert_eq!(j["state"], "reserved");
    assert_eq!(j["reserves"], "1");
    // A fresh 30 s reservation shows 29 whole seconds left, as in beanstalkd.
    assert_eq!(j["time-left"], "29");
    c.expect("release 1 42 100\r\n", "RELEASED\r\n");
    let j = c.stats_map("stats-job 1\r\n");
    assert_eq!(j["state"], "delayed");
    assert_eq!(j["delay"], "100");
    assert_eq!(j["time-left"], "99");
    c.expect("stats-job 2\r\n", "NOT_FOUND\r\n");
    c.expect("stats-job x\r\n", "BAD_FORMAT\r\n");
}

// ---------------------------------------------------------------------------
// quit

#[test]
fn quit_closes_the_connection() {
    let server = Server::start();
    let mut c = server.client();
    c.send(b"quit\r\n");
    c.expect_closed();
}

#[test]
fn quit_does_not_run_later_pipelined_commands() {
    let server = Server::start();
    let mut c = server.client();
    c.send(b"put 0 0 60 1\r\na\r\nquit\r\nput 0 0 60 1\r\nb\r\n");
    c.expect_reply("INSERTED 1\r\n");
    c.expect_closed();
    let mut other = server.client();
    let s = other.stats_map("stats\r\n");
    assert_eq!(s["total-jobs"], "1");
    assert_eq!(s["cmd-put"], "1");
    other.expect("peek-ready\r\n", "FOUND 1 1\r\na\r\n");
}

#[test]
fn quit_matches_by_prefix() {
    let server = Server::start();
    let mut c = server.client();
    c.send(b"quitx\r\n");
    c.expect_closed();
}

// ---------------------------------------------------------------------------
// framing: pipelining, split lines, bad lines

#[test]
fn pipelined_thousand_puts_then_thousand_reserves() {
    let server = Server::start();
    let mut c = server.client();
    let mut puts = Vec::new();
    for i in 0..1000 {
        puts.extend_from_slice(&put_cmd(0, 0, 60, format!("job-{i}").as_bytes()));
    }
    c.send(&puts);
    for i in 1..=1000 {
        c.expect_reply(&format!("INSERTED {i}\r\n"));
    }
    c.send(b"reserve\r\n".repeat(1000));
    for i in 1..=1000 {
        let body = format!("job-{}", i - 1);
        c.expect_reply(&format!("RESERVED {i} {}\r\n{body}\r\n", body.len()));
    }
    let mut deletes = Vec::new();
    for i in 1..=1000 {
        deletes.extend_from_slice(format!("delete {i}\r\n").as_bytes());
    }
    c.send(&deletes);
    for _ in 0..1000 {
        c.expect_reply("DELETED\r\n");
    }
    let s = c.stats_map("stats\r\n");
    assert_eq!(s["cmd-put"], "1000");
    assert_eq!(s["cmd-reserve"], "1000");
    assert_eq!(s["cmd-delete"], "1000");
    assert_eq!(s["current-jobs-ready"], "0");
}

#[test]
fn pipelining_many_more_commands_than_one_read() {
    // Far more small commands in one write than the server takes in one
    // read or queues per connection: every one is answered, in order.
    let server = Server::start();
    let mut c = server.client();
    let n = 10_000;
    let mut cmds = Vec::new();
    for i in 0..n {
        if i % 2 == 0 {
            cmds.extend_from_slice(b"list-tube-used\r\n");
        } else {
            cmds.extend_from_slice(b"delete 999999\r\n");
        }
    }
    c.send(&cmds);
    for i in 0..n {
        let want = if i % 2 == 0 {
            "USING default\r\n"
        } else {
            "NOT_FOUND\r\n"
        };
        let got = c
            .reply_bytes_within(support::REPLY_TIMEOUT)
            .unwrap_or_else(|| panic!("only {i} of {n} pipelined commands were answered"));
        assert_eq!(show(&got), show(want.as_bytes()), "reply {i}");
    }
    c.expect("list-tube-used\r\n", "USING default\r\n");
}

#[test]
fn many_commands_pipelined_behind_a_blocked_reserve() {
    let server = Server::start();
    let mut worker = server.client();
    let mut producer = server.client();
    let n = 3000;
    let mut cmds = b"reserve\r\n".to_vec();
    cmds.extend_from_slice(&b"list-tube-used\r\n".repeat(n));
    worker.send(&cmds);
    worker.expect_no_reply(QUIET);
    producer.expect("put 0 0 60 1\r\na\r\n", "INSERTED 1\r\n");
    worker.expect_reply("RESERVED 1 1\r\na\r\n");
    for _ in 0..n {
        worker.expect_reply("USING default\r\n");
    }
}

#[test]
fn command_split_byte_by_byte() {
    let server = Server::start();
    let mut c = server.client();
    c.send_bytewise(b"put 0 0 60 5\r\nhello\r\n");
    c.expect_reply("INSERTED 1\r\n");
    c.send_bytewise(b"reserve\r\n");
    c.expect_reply("RESERVED 1 5\r\nhello\r\n");
    c.send_bytewise(b"delete 1\r\n");
    c.expect_reply("DELETED\r\n");
}

#[test]
fn unknown_commands() {
    let server = Server::start();
    let mut c = server.client();
    for cmd in [
        "foo\r\n",
        "\r\n",
        "PUT 0 0 60 1\r\n",
        "RESERVE\r\n",
        " reserve\r\n",
        "delete\r\n",
        "touch\r\n",
        "stat\r\n",
    ] {
        c.expect(cmd, "UNKNOWN_COMMAND\r\n");
    }
    c.expect("delete 1x\r\n", "BAD_FORMAT\r\n");
    c.expect("list-tube-used\r\n", "USING default\r\n");
}

#[test]
fn overlong_line_is_bad_format_and_the_next_line_is_read() {
    let server = Server::start();
    let mut c = server.client();
    // 224 bytes including \r\n is the longest line.
    let longest = format!("reserve-with-timeout {}\r\n", "0".repeat(201));
    assert_eq!(longest.len(), 224);
    c.expect(&longest, "TIMED_OUT\r\n");
    // Longer: BAD_FORMAT, and the whole line is dropped.
    let long = format!("reserve-with-timeout {}\r\n", "0".repeat(203));
    c.expect(&long, "BAD_FORMAT\r\n");
    c.expect("list-tube-used\r\n", "USING default\r\n");
    let mut line = "x".repeat(1000);
    line.push_str("\r\n");
    c.expect(&line, "BAD_FORMAT\r\n");
    c.expect("list-tube-used\r\n", "USING default\r\n");
    // A valid command after 224 junk bytes on the same line is dropped too.
    c.expect(
        format!(
            "{}stats-tube default\r\nlist-tube-used\r\n",
            "x".repeat(224)
        ),
        "BAD_FORMAT\r\n",
    );
    c.expect_reply("USING default\r\n");
    // Pipelined with other commands in one write.
    c.send(format!(
        "use a\r\n{}\r\nlist-tube-used\r\n",
        "y".repeat(500)
    ));
    c.expect_reply("USING a\r\n");
    c.expect_reply("BAD_FORMAT\r\n");
    c.expect_reply("USING a\r\n");
}

#[test]
fn overlong_line_without_end_gets_no_reply_until_it_ends() {
    let server = Server::start();
    let mut c = server.client();
    c.send("z".repeat(5000));
    c.expect_no_reply(QUIET);
    c.expect("\r\nlist-tube-used\r\n", "BAD_FORMAT\r\n");
    c.expect_reply("USING default\r\n");
}

#[test]
fn nul_byte_in_a_line_is_bad_format() {
    let server = Server::start();
    let mut c = server.client();
    c.expect(b"use fo\0o\r\n", "BAD_FORMAT\r\n");
    c.expect(b"list-tube-used\0\r\n", "BAD_FORMAT\r\n");
    c.expect(b"\0\r\n", "BAD_FORMAT\r\n");
    c.expect(b"put 0 0 60 1\0\r\n", "BAD_FORMAT\r\n");
    c.expect("list-tube-used\r\n", "USING default\r\n");
    // In a body a NUL is just a byte.
    c.expect(b"put 0 0 60 1\r\n\0\r\n", "INSERTED 1\r\n");
    c.expect("peek 1\r\n", "FOUND 1 1\r\n\0\r\n");
}

#[test]
fn lone_cr_and_lf_do_not_end_a_line() {
    let server = Server::start();
    let mut c = server.client();
    c.send(b"list-tube-used\n");
    c.expect_no_reply(QUIET);
    c.expect("\r\n", "BAD_FORMAT\r\n");
    c.expect("list-tube-used\r\n", "USING default\r\n");
}

// ---------------------------------------------------------------------------
// configuration seen over the wire

#[test]
fn max_job_size_flag() {
    let server = Server::start_with(&["-z", "10"]);
    let mut c = server.client();
    c.expect("put 0 0 60 10\r\n0123456789\r\n", "INSERTED 1\r\n");
    c.expect("put 0 0 60 11\r\n0123456789a\r\n", "JOB_TOO_BIG\r\n");
    c.expect("list-tube-used\r\n", "USING default\r\n");
    assert_eq!(c.stats_map("stats\r\n")["max-job-size"], "10");
    c.expect("reserve\r\n", "RESERVED 1 10\r\n0123456789\r\n");
}

#[test]
fn unix_socket_listener() {
    let server = Server::start_unix();
    let mut c = server.client();
    assert!(matches!(c.stream(), support::Stream::Unix(_)));
    c.expect("put 0 0 60 5\r\nhello\r\n", "INSERTED 1\r\n");
    c.expect("reserve\r\n", "RESERVED 1 5\r\nhello\r\n");
    c.expect("delete 1\r\n", "DELETED\r\n");
    let mut other = server.client();
    other.expect("stats-job 1\r\n", "NOT_FOUND\r\n");
    c.send(b"quit\r\n");
    c.expect_closed();
}

// ---------------------------------------------------------------------------
// robustness

/// put/reserve/delete on a fresh connection, in a tube of its own.
fn round_trip(server: &Server, tube: &str) {
    let mut c = server.client();
    c.expect(format!("use {tube}\r\n"), &format!("USING {tube}\r\n"));
    c.expect(format!("watch {tube}\r\n"), "WATCHING 2\r\n");
    c.expect("ignore default\r\n", "WATCHING 1\r\n");
    let id = c.put(0, 0, 60, b"ping");
    c.expect(
        "reserve-with-timeout 5\r\n",
        &format!("RESERVED {id} 4\r\nping\r\n"),
    );
    c.expect(format!("delete {id}\r\n"), "DELETED\r\n");
}

#[test]
fn ten_megabytes_of_garbage_does_not_hurt_the_server() {
    let mut server = Server::start();
    let mut flood = server.client();
    let writer = {
        let mut stream = match flood.stream() {
            support::Stream::Tcp(s) => s.try_clone().expect("clone"),
            support::Stream::Unix(_) => unreachable!(),
        };
        std::thread::spawn(move || {
            let chunk = vec![b'g'; 64 * 1024];
            for _ in 0..160 {
                stream.write_all(&chunk).expect("writing garbage");
            }
        })
    };
    // Others are served while the garbage streams in.
    let mut n = 0;
    while !writer.is_finished() || n == 0 {
        round_trip(&server, &format!("t{n}"));
        n += 1;
        assert!(n < 10_000);
    }
    writer.join().expect("garbage writer");
    flood.expect_no_reply(QUIET);
    // The flood ends its line: one BAD_FORMAT, and the connection works.
    flood.expect("\r\nlist-tube-used\r\n", "BAD_FORMAT\r\n");
    flood.expect_reply("USING default\r\n");
    server.assert_alive();
    round_trip(&server, "after");
}

#[test]
fn a_slow_body_and_a_disconnect_do_not_hurt_others() {
    let mut server = Server::start();
    let mut slow = server.client();
    slow.send(b"put 0 0 60 60000\r\n");
    for _ in 0..300 {
        slow.send(b"s");
        std::thread::sleep(Duration::from_millis(1));
    }
    round_trip(&server, "during");
    drop(slow);
    round_trip(&server, "after");
    let mut c = server.client();
    let s = c.stats_map("stats\r\n");
    assert_eq!(s["total-jobs"], "2");
    assert_eq!(s["current-jobs-ready"], "0");
    c.wait_for_stat("stats\r\n", "current-connections", "1");
    server.assert_alive();
}

#[test]
fn two_hundred_connections_at_once() {
    let server = Server::start();
    let n = 200;
    let barrier = Arc::new(Barrier::new(n));
    let addr = server.addr().clone();
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let barrier = barrier.clone();
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&addr);
                barrier.wait();
                let body = format!("job-{i}");
                let id = c.put(0, 0, 60, body.as_bytes());
                // Every client put a job first, so there is one for each.
                c.send(b"reserve-with-timeout 5\r\n");
                let (got, _) = parse_job(&c.reply_bytes(), "RESERVED");
                c.expect(format!("delete {got}\r\n"), "DELETED\r\n");
                (id, got)
            })
        })
        .collect();
    let mut inserted = HashSet::new();
    let mut reserved = HashSet::new();
    for t in threads {
        let (id, got) = t.join().expect("client thread");
        inserted.insert(id);
        reserved.insert(got);
    }
    assert_eq!(inserted.len(), n);
    assert_eq!(inserted, reserved, "every job reserved exactly once");
    let mut c = server.client();
    let s = c.stats_map("stats\r\n");
    assert_eq!(s["total-jobs"], n.to_string());
    assert_eq!(s["cmd-delete"], n.to_string());
    assert_eq!(s["current-jobs-ready"], "0");
    assert_eq!(s["current-jobs-reserved"], "0");
}

#[test]
fn a_client_that_never_reads_cannot_grow_the_server_without_bound() {
    let server = Server::start();
    peek_flood(server, 60_000);
}

#[test]
fn a_client_that_never_reads_peeks_of_a_big_job_cannot_grow_the_server_without_bound() {
    // The same with a 1 MB job: the bound must hold whatever the job size
    // (beanstalkd stays under 10 MB here).
    let server = Server::start_with(&["-z", "1048576"]);
    peek_flood(server, 1_000_000);
}

/// A client pipelines `peek`s of one `job_len`-byte job for 2 s without
/// reading a single reply. The server must stop taking its commands rather
/// than buffer the replies: its RSS stays under 200 MiB, and other clients
/// are still served.
fn peek_flood(mut server: Server, job_len: usize) {
    let mut setup = server.client();
    let body = body_of(job_len, 3);
    setup.send(put_cmd(0, 0, 60, &body));
    setup.expect_reply("INSERTED 1\r\n");
    drop(setup);
    let baseline = server.rss_bytes();

    let hog = server.client();
    let mut stream = match hog.stream() {
        support::Stream::Tcp(s) => s.try_clone().expect("clone"),
        support::Stream::Unix(_) => unreachable!(),
    };
    // Short write timeouts so the writer notices the server has stopped
    // reading instead of blocking.
    stream
        .set_write_timeout(Some(Duration::from_millis(100)))
        .expect("write timeout");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let peeks = b"peek 1\r\n".repeat(4096);
            let mut written: u64 = 0;
            while !stop.load(Ordering::SeqCst) {
                match stream.write(&peeks) {
                    Ok(n) => written += n as u64,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(written)
        })
    };
    let limit: u64 = 200 * 1024 * 1024;
    let mut peak = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) && peak < limit {
        peak = peak.max(server.rss_bytes());
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::SeqCst);
    let written = writer.join().expect("peek writer");
    assert!(
        peak < limit,
        "server RSS reached {} MiB (baseline {} MiB) while a client pipelined peeks of a \
         {job_len}-byte job without reading",
        peak >> 20,
        baseline >> 20
    );
    let written = written.expect("writing peeks");
    // The hog really did send more than the server could have answered
    // within the limit.
    assert!(
        written / 8 * job_len as u64 > limit,
        "the client wrote only {written} bytes of peeks"
    );
    // Others are still served, and the server is still up.
    round_trip(&server, "other");
    let mut c = server.client();
    c.expect("list-tube-used\r\n", "USING default\r\n");
    server.assert_alive();
    eprintln!(
        "peek flood ({job_len}-byte job): wrote {} KiB of peeks; server RSS baseline {} MiB, \
         peak {} MiB",
        written >> 10,
        baseline >> 20,
        peak >> 20
    );
    drop(hog);
    c.wait_for_stat("stats\r\n", "current-connections", "1");
}

// ---------------------------------------------------------------------------
// misc

#[test]
fn list_commands_reflect_the_connection() {
    let server = Server::start();
    let mut c = server.client();
    c.expect("watch b\r\n", "WATCHING 2\r\n");
    c.expect("watch a\r\n", "WATCHING 3\r\n");
    c.send(b"list-tubes-watched\r\n");
    let watched = yaml_list(&c.reply());
    let set: HashSet<_> = watched.iter().map(String::as_str).collect();
    assert_eq!(set, HashSet::from(["default", "a", "b"]));
    let mut other = server.client();
    other.expect("list-tubes-watched\r\n", "OK 14\r\n---\n- default\n\r\n");
    other.send(b"list-tubes\r\n");
    let tubes: HashSet<String> = yaml_list(&other.reply()).into_iter().collect();
    assert_eq!(tubes.len(), 3);
    let s = other.stats_map("stats\r\n");
    assert_eq!(s["current-tubes"], "3");
    assert_eq!(s["cmd-list-tubes"], "1");
    assert_eq!(s["cmd-list-tubes-watched"], "2");
}
