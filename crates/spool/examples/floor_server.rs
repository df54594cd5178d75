//! The floor under any beanstalkd server's CPU per job: a measuring
//! instrument for `scripts/bench-cpu-counts.sh` (`FLOOR=1`), not a server.
//!
//! It answers the handful of commands `spool bench --mode mixed` sends
//! (`use`, `watch`, `ignore`, `put`, `reserve-with-timeout`, `delete`) with
//! the bytes beanstalkd would, from one thread and one level-triggered
//! `epoll`, with the fewest system calls the protocol allows: one `recv` a
//! wake-up, one `send` a connection's replies, a job handed to a waiting
//! reserve as the `put` arrives. It keeps no job state beyond a FIFO of
//! bodies: no priorities, no TTR, no delete bookkeeping, no log, no
//! metrics. What it costs a job is what the kernel's TCP path and the
//! event loop cost, which any server speaking the protocol over loopback
//! pays; the script compares spool and beanstalkd with it.
//!
//! Usage: `floor_server 127.0.0.1:PORT`.
#![allow(unsafe_code)] // epoll through libc: std has no readiness API.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

const LISTENER_KEY: u64 = 0;
const READ_CHUNK_BYTES: usize = 64 * 1024;

struct Conn {
    stream: TcpStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// A reserve is waiting for a job: later requests wait behind it, as
    /// in beanstalkd.
    waiting: bool,
    /// EPOLLOUT is registered (a reply the socket did not take).
    want_write: bool,
}

struct Floor {
    epoll: RawFd,
    conns: HashMap<u64, Conn>,
    jobs: VecDeque<(u64, Vec<u8>)>,
    /// Reserves waiting for a job, oldest first (all waits are of one
    /// length in the bench, so this is also deadline order).
    waiters: VecDeque<(u64, Instant)>,
    next_job_id: u64,
    /// Every read lands here first (zeroed once, not per read).
    scratch: Vec<u8>,
}

fn epoll_set(epoll: RawFd, op: libc::c_int, fd: RawFd, key: u64, write: bool) -> io::Result<()> {
    let mut event = libc::epoll_event {
        events: (libc::EPOLLIN | if write { libc::EPOLLOUT } else { 0 }) as u32,
        u64: key,
    };
    // SAFETY: `event` outlives the call; the kernel copies it.
    if unsafe { libc::epoll_ctl(epoll, op, fd, &mut event) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn find_line(bytes: &[u8]) -> Option<usize> {
    bytes.windows(2).position(|w| w == b"\r\n")
}

fn push_reserved(out: &mut Vec<u8>, id: u64, body: &[u8]) {
    out.extend_from_slice(format!("RESERVED {id} {}\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(b"\r\n");
}

impl Floor {
    /// Answers what `key`'s input holds, up to a reserve that must wait.
    fn run_requests(&mut self, key: u64, now: Instant) {
        let Some(mut conn) = self.conns.remove(&key) else {
            return;
        };
        let mut used = 0;
        while !conn.waiting {
            let rest = &conn.input[used..];
            let Some(end) = find_line(rest) else { break };
            let line = &rest[..end];
            if let Some(args) = line.strip_prefix(b"put ") {
                let size = args
                    .rsplit(|&b| b == b' ')
                    .next()
                    .and_then(|n| std::str::from_utf8(n).ok()?.parse::<usize>().ok())
                    .unwrap_or(0);
                if rest.len() < end + 2 + size + 2 {
                    break;
                }
                let body = rest[end + 2..end + 2 + size].to_vec();
                used += end + 2 + size + 2;
                self.next_job_id += 1;
                let id = self.next_job_id;
                conn.output
                    .extend_from_slice(format!("INSERTED {id}\r\n").as_bytes());
                self.hand_out(id, body);
                continue;
            }
            used += end + 2;
            if line.starts_with(b"reserve") {
                match self.jobs.pop_front() {
                    Some((id, body)) => push_reserved(&mut conn.output, id, &body),
                    None => {
                        let secs = line
                            .strip_prefix(b"reserve-with-timeout ")
                            .and_then(|n| std::str::from_utf8(n).ok()?.parse::<u64>().ok())
                            .unwrap_or(3600);
                        conn.waiting = true;
                        self.waiters
                            .push_back((key, now + Duration::from_secs(secs)));
                    }
                }
            } else if line.starts_with(b"delete ") {
                conn.output.extend_from_slice(b"DELETED\r\n");
            } else if let Some(tube) = line.strip_prefix(b"use ") {
                conn.output.extend_from_slice(b"USING ");
                conn.output.extend_from_slice(tube);
                conn.output.extend_from_slice(b"\r\n");
            } else if line.starts_with(b"watch ") {
                conn.output.extend_from_slice(b"WATCHING 2\r\n");
            } else if line.starts_with(b"ignore ") {
                conn.output.extend_from_slice(b"WATCHING 1\r\n");
            } else {
                conn.output.extend_from_slice(b"UNKNOWN_COMMAND\r\n");
            }
        }
        conn.input.drain(..used);
        self.flush(key, conn);
    }

    /// Gives a new job to the oldest waiting reserve, or queues it.
    fn hand_out(&mut self, id: u64, body: Vec<u8>) {
        while let Some((key, _)) = self.waiters.pop_front() {
            let Some(mut waiter) = self.conns.remove(&key) else {
                continue;
            };
            push_reserved(&mut waiter.output, id, &body);
            waiter.waiting = false;
            self.conns.insert(key, waiter);
            // Its requests behind the reserve, then its replies.
            self.run_requests(key, Instant::now());
            return;
        }
        self.jobs.push_back((id, body));
    }

    fn flush(&mut self, key: u64, mut conn: Conn) {
        while !conn.output.is_empty() {
            match conn.stream.write(&conn.output) {
                Ok(n) => {
                    conn.output.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return, // dropped: the peer is gone
            }
        }
        let want_write = !conn.output.is_empty();
        if want_write != conn.want_write {
            let fd = conn.stream.as_raw_fd();
            if epoll_set(self.epoll, libc::EPOLL_CTL_MOD, fd, key, want_write).is_err() {
                return;
            }
            conn.want_write = want_write;
        }
        self.conns.insert(key, conn);
    }

    fn on_readable(&mut self, key: u64) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        match conn.stream.read(&mut self.scratch) {
            Ok(0) => {
                self.conns.remove(&key);
            }
            Ok(n) => {
                conn.input.extend_from_slice(&self.scratch[..n]);
                self.run_requests(key, Instant::now());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => {
                self.conns.remove(&key);
            }
        }
    }

    fn expire_waiters(&mut self, now: Instant) {
        while let Some(&(key, deadline)) = self.waiters.front() {
            if deadline > now {
                break;
            }
            self.waiters.pop_front();
            let Some(mut conn) = self.conns.remove(&key) else {
                continue;
            };
            conn.waiting = false;
            conn.output.extend_from_slice(b"TIMED_OUT\r\n");
            self.conns.insert(key, conn);
            self.run_requests(key, now);
        }
    }
}

fn main() -> io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .ok_or_else(|| io::Error::other("usage: floor_server HOST:PORT"))?;
    let listener = TcpListener::bind(&addr)?;
    listener.set_nonblocking(true)?;
    // SAFETY: plain system call; the result is checked.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epoll < 0 {
        return Err(io::Error::last_os_error());
    }
    epoll_set(
        epoll,
        libc::EPOLL_CTL_ADD,
        listener.as_raw_fd(),
        LISTENER_KEY,
        false,
    )?;
    let mut floor = Floor {
        epoll,
        conns: HashMap::new(),
        jobs: VecDeque::new(),
        waiters: VecDeque::new(),
        next_job_id: 0,
        scratch: vec![0; READ_CHUNK_BYTES],
    };
    let mut next_key = LISTENER_KEY + 1;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    loop {
        let timeout_ms = floor.waiters.front().map_or(-1, |&(_, deadline)| {
            let left = deadline.saturating_duration_since(Instant::now());
            i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1)
        });
        // SAFETY: `events` is a valid buffer of the length passed.
        let ready = unsafe {
            libc::epoll_wait(
                epoll,
                events.as_mut_ptr(),
                i32::try_from(events.len()).unwrap_or(i32::MAX),
                timeout_ms,
            )
        };
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        for event in &events[..usize::try_from(ready).unwrap_or(0)] {
            let (key, flags) = (event.u64, event.events);
            if key == LISTENER_KEY {
                while let Ok((stream, _)) = listener.accept() {
                    stream.set_nonblocking(true)?;
                    stream.set_nodelay(true)?;
                    let fd = stream.as_raw_fd();
                    epoll_set(epoll, libc::EPOLL_CTL_ADD, fd, next_key, false)?;
                    let conn = Conn {
                        stream,
                        input: Vec::new(),
                        output: Vec::new(),
                        waiting: false,
                        want_write: false,
                    };
                    floor.conns.insert(next_key, conn);
                    next_key += 1;
                }
                continue;
            }
            if flags & libc::EPOLLOUT as u32 != 0 {
                if let Some(conn) = floor.conns.remove(&key) {
                    floor.flush(key, conn);
                }
            }
            if flags & (libc::EPOLLIN | libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
                floor.on_readable(key);
            }
        }
        if !floor.waiters.is_empty() {
            floor.expire_waiters(Instant::now());
        }
    }
}
