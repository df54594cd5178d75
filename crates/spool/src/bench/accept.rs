//! `spool bench --mode accept`: a burst of connections opened at once, as
//! a fleet of workers reconnecting after a deploy would. Opens
//! `--connections` connections with at most `--connect-concurrency`
//! `connect` calls in flight, sends one command on each (`list-tube-used`)
//! and waits for every reply while holding them all; reports how long until
//! the last one was served, and how many connection attempts the kernel
//! dropped from the server's listen queue meanwhile (`ListenOverflows` and
//! `ListenDrops` of `/proc/net/netstat`: counters of the whole network
//! namespace, so run it on a machine otherwise quiet on loopback). A
//! dropped attempt costs its client a SYN retry, a second or more, so
//! connects or replies later than [`SLOW_AFTER`] are counted too.
//!
//! Used by `scripts/bench-accept.sh` to compare spool with beanstalkd.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use spool_server::net::listen_queue_drops;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::BenchArgs;

/// A connect or a reply that takes this long was held up by something other
/// than the server's work: Linux's first SYN retransmission comes after 1 s,
/// so 500 ms separates a retried attempt from a slow but served one.
const SLOW_AFTER: Duration = Duration::from_millis(500);

/// The command each connection sends, and the reply any beanstalkd-speaking
/// server gives a fresh connection.
const COMMAND: &[u8] = b"list-tube-used\r\n";
const REPLY: &[u8] = b"USING default\r\n";

#[derive(Debug, Serialize)]
struct AcceptReport {
    mode: &'static str,
    addr: String,
    connections: usize,
    connect_concurrency: usize,
    /// From the first `connect` to the last reply.
    accept_secs: f64,
    /// Slowest single `connect`, and slowest connect-to-reply.
    connect_max_ms: f64,
    reply_max_ms: f64,
    /// Connects, and replies after connecting, slower than [`SLOW_AFTER`].
    slow_connects: usize,
    slow_replies: usize,
    /// Increase of the kernel's counters during the burst.
    listen_overflows: u64,
    listen_drops: u64,
}

/// One served connection and how long its steps took.
struct Served {
    /// Held, not read: the connection stays open until the report.
    _stream: TcpStream,
    connect: Duration,
    reply: Duration,
}

pub(super) fn run(args: &BenchArgs, addr: SocketAddr, deadline: Instant) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the client runtime")?;
    let report = rt.block_on(burst(args, addr, deadline))?;
    let text = if args.json {
        let json = serde_json::to_string(&report).context("serializing the report")?;
        format!("{json}\n")
    } else {
        format!(
            "spool bench accept: {} connections to {}, {} connects at a time, all served in {:.3} s\n  \
             slowest connect {:.1} ms, slowest reply {:.1} ms; {} slow connects, {} slow replies (> {} ms)\n  \
             kernel listen-queue overflows {}, drops {}\n",
            report.connections,
            report.addr,
            report.connect_concurrency,
            report.accept_secs,
            report.connect_max_ms,
            report.reply_max_ms,
            report.slow_connects,
            report.slow_replies,
            SLOW_AFTER.as_millis(),
            report.listen_overflows,
            report.listen_drops,
        )
    };
    super::emit(&text)
}

async fn burst(args: &BenchArgs, addr: SocketAddr, deadline: Instant) -> Result<AcceptReport> {
    let n = args.connections;
    let concurrency = args.connect_concurrency as usize;
    let before = listen_queue_drops().context("reading the kernel's listen-queue counters")?;
    let permits = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let permits = permits.clone();
        let source = super::idle::source_address(addr, i, &args.source_addresses)?;
        tasks.spawn(async move {
            let permit = permits.acquire_owned().await?;
            let connect_started = Instant::now();
            let mut stream = super::idle::open(addr, source)
                .await
                .with_context(|| format!("connection {} (is `ulimit -n` high enough?)", i + 1))?;
            let connected = Instant::now();
            drop(permit);
            stream.write_all(COMMAND).await?;
            let mut reply = [0u8; REPLY.len()];
            stream
                .read_exact(&mut reply)
                .await
                .with_context(|| format!("reading connection {}'s reply", i + 1))?;
            if reply != REPLY {
                bail!(
                    "connection {} got {:?} to list-tube-used",
                    i + 1,
                    String::from_utf8_lossy(&reply)
                );
            }
            anyhow::Ok(Served {
                _stream: stream,
                connect: connected - connect_started,
                reply: connected.elapsed(),
            })
        });
    }
    // Every connection stays open until the last is served: the server
    // holds them all at once, as it would a reconnecting fleet.
    let mut held = Vec::with_capacity(n);
    let mut last_reply = started;
    loop {
        let joined = tokio::time::timeout_at(deadline.into(), tasks.join_next())
            .await
            .with_context(|| {
                format!(
                    "time limit reached with {} of {n} connections served",
                    held.len()
                )
            })?;
        let Some(joined) = joined else { break };
        let served = joined.context("a connection task failed")??;
        last_reply = Instant::now();
        held.push(served);
    }
    let accept_secs = last_reply.duration_since(started).as_secs_f64();
    let after = listen_queue_drops().context("reading the kernel's listen-queue counters")?;
    let ms = |d: Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
    let report = AcceptReport {
        mode: "accept",
        addr: args.addr.clone(),
        connections: n,
        connect_concurrency: concurrency,
        accept_secs: (accept_secs * 1e4).round() / 1e4,
        connect_max_ms: ms(held.iter().map(|s| s.connect).max().unwrap_or_default()),
        reply_max_ms: ms(held.iter().map(|s| s.reply).max().unwrap_or_default()),
        slow_connects: held.iter().filter(|s| s.connect > SLOW_AFTER).count(),
        slow_replies: held.iter().filter(|s| s.reply > SLOW_AFTER).count(),
        listen_overflows: after.overflows.saturating_sub(before.overflows),
        listen_drops: after.drops.saturating_sub(before.drops),
    };
    drop(held);
    Ok(report)
}
