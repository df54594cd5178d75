//! `spool bench --mode idle` (hidden): opens many connections that send
//! nothing, waits until the server counts them (`current-connections` in
//! `stats`), and reports how much the server's resident memory grew per
//! connection, read from `/proc/PID/status` when `--server-pid` is given;
//! then sends one command on each (`use`, as a worker's first command
//! would be), waits for every reply and reports the growth again, since a
//! connection that has served a request may keep what it allocated for it.
//! Used by `scripts/bench-vs-beanstalkd.sh` to compare memory per idle
//! connection.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use spool_proto::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::conn::Conn;
use super::BenchArgs;

/// Connections per loopback source address. One address has about 28,000
/// ephemeral ports (Linux's default 32768-60999), so beyond this many
/// connections to one server port we bind to further 127.0.0.x addresses.
const CONNECTIONS_PER_SOURCE_ADDR: usize = 20_000;

/// How long the server gets, after counting every connection, to finish
/// whatever it allocates for them before the memory is sampled.
const SETTLE: Duration = Duration::from_millis(500);

#[derive(Debug, Serialize)]
struct IdleReport {
    mode: &'static str,
    addr: String,
    connections: usize,
    server_pid: Option<u32>,
    server_connections_before: u64,
    server_connections_after: u64,
    connect_secs: f64,
    rss_before_bytes: Option<u64>,
    rss_after_bytes: Option<u64>,
    rss_per_connection_bytes: Option<f64>,
    /// After one command on each connection, against the same baseline.
    rss_after_command_bytes: Option<u64>,
    rss_per_connection_after_command_bytes: Option<f64>,
}

/// The command each idle connection sends once, and its reply.
const COMMAND: &[u8] = b"use bench-idle\r\n";
const REPLY: &[u8] = b"USING bench-idle\r\n";

pub(super) fn run(args: &BenchArgs, addr: SocketAddr, deadline: Instant) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the client runtime")?;
    let report = rt.block_on(hold(args, addr, deadline))?;
    let text = if args.json {
        let json = serde_json::to_string(&report).context("serializing the report")?;
        format!("{json}\n")
    } else {
        let mut text = format!(
            "spool bench idle: {} connections to {} opened in {:.2} s; server counts {} -> {}\n",
            report.connections,
            report.addr,
            report.connect_secs,
            report.server_connections_before,
            report.server_connections_after
        );
        if let (Some(before), Some(after), Some(per)) = (
            report.rss_before_bytes,
            report.rss_after_bytes,
            report.rss_per_connection_bytes,
        ) {
            text.push_str(&format!(
                "  server RSS {before} -> {after} bytes: {per:.0} bytes per connection\n"
            ));
        }
        if let (Some(after), Some(per)) = (
            report.rss_after_command_bytes,
            report.rss_per_connection_after_command_bytes,
        ) {
            text.push_str(&format!(
                "  after one command each: {after} bytes, {per:.0} bytes per connection\n"
            ));
        }
        text
    };
    super::emit(&text)
}

async fn hold(args: &BenchArgs, addr: SocketAddr, deadline: Instant) -> Result<IdleReport> {
    let n = args.connections;
    let mut control = Conn::connect(addr, 1 << 20, deadline).await?;
    let before = current_connections(&mut control).await?;
    let rss_before = args.server_pid.map(rss_bytes).transpose()?;

    let started = Instant::now();
    let mut held: Vec<TcpStream> = Vec::with_capacity(n);
    for i in 0..n {
        let stream = tokio::time::timeout_at(deadline.into(), open(addr, i))
            .await
            .with_context(|| format!("time limit reached after opening {i} connections"))?
            .with_context(|| {
                format!(
                    "opening connection {} of {n} (is `ulimit -n` high enough?)",
                    i + 1
                )
            })?;
        held.push(stream);
    }
    let connect_secs = started.elapsed().as_secs_f64();

    // The server accepts asynchronously; wait until it has them all.
    let after = loop {
        let now = current_connections(&mut control).await?;
        if now >= before + n as u64 {
            break now;
        }
        if Instant::now() >= deadline {
            bail!(
                "time limit reached: the server counts {} of {n} idle connections",
                now.saturating_sub(before)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(SETTLE).await;
    let rss_after = args.server_pid.map(rss_bytes).transpose()?;
    let per_connection = |after: Option<u64>| match (rss_before, after) {
        (Some(b), Some(a)) => Some(((a as f64 - b as f64) / n.max(1) as f64).round()),
        _ => None,
    };

    for (i, stream) in held.iter_mut().enumerate() {
        tokio::time::timeout_at(deadline.into(), stream.write_all(COMMAND))
            .await
            .context("time limit reached sending one command each")?
            .with_context(|| format!("sending a command on connection {}", i + 1))?;
    }
    for (i, stream) in held.iter_mut().enumerate() {
        let mut reply = [0u8; REPLY.len()];
        tokio::time::timeout_at(deadline.into(), stream.read_exact(&mut reply))
            .await
            .context("time limit reached waiting for one reply each")?
            .with_context(|| format!("reading the reply on connection {}", i + 1))?;
        if reply != REPLY {
            bail!(
                "connection {} got {:?} to `use`",
                i + 1,
                String::from_utf8_lossy(&reply)
            );
        }
    }
    tokio::time::sleep(SETTLE).await;
    let rss_after_command = args.server_pid.map(rss_bytes).transpose()?;

    let hold_until = Instant::now() + Duration::from_secs(args.hold_secs);
    tokio::time::sleep_until(hold_until.min(deadline).into()).await;
    drop(held);
    Ok(IdleReport {
        mode: "idle",
        addr: args.addr.clone(),
        connections: n,
        server_pid: args.server_pid,
        server_connections_before: before,
        server_connections_after: after,
        connect_secs: (connect_secs * 1000.0).round() / 1000.0,
        rss_before_bytes: rss_before,
        rss_after_bytes: rss_after,
        rss_per_connection_bytes: per_connection(rss_after),
        rss_after_command_bytes: rss_after_command,
        rss_per_connection_after_command_bytes: per_connection(rss_after_command),
    })
}

/// Connection `i`, from a further loopback source address every
/// [`CONNECTIONS_PER_SOURCE_ADDR`] connections when the server is on IPv4
/// loopback, so ephemeral ports do not run out.
pub(super) async fn open(addr: SocketAddr, i: usize) -> Result<TcpStream> {
    let socket = match addr.ip() {
        IpAddr::V4(ip) => {
            let socket = TcpSocket::new_v4()?;
            let extra = i / CONNECTIONS_PER_SOURCE_ADDR;
            if ip.is_loopback() && extra > 0 {
                let host = u8::try_from(1 + extra).context("too many idle connections")?;
                socket
                    .bind(SocketAddr::new(Ipv4Addr::new(127, 0, 0, host).into(), 0))
                    .context("binding a loopback source address")?;
            }
            socket
        }
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    Ok(socket.connect(addr).await?)
}

/// `current-connections` from the server's `stats`.
async fn current_connections(control: &mut Conn) -> Result<u64> {
    let yaml = match control.call(&Request::Stats).await? {
        Response::Ok(yaml) => yaml,
        other => bail!("`stats` answered {other:?}"),
    };
    let text = String::from_utf8_lossy(&yaml);
    text.lines()
        .find_map(|line| line.strip_prefix("current-connections:"))
        .and_then(|v| v.trim().parse().ok())
        .context("`stats` has no current-connections")
}

/// Resident set size of a process, from `/proc/PID/status` (`VmRSS`, kB).
pub(super) fn rss_bytes(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kb: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{path} has no VmRSS"))?;
    Ok(kb * 1024)
}
