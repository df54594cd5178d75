//! `spool bench --mode idle` (hidden): opens many connections that send
//! nothing, waits until the server counts them (`current-connections` in
//! `stats`), and reports how much the server's resident memory grew per
//! connection, read from `/proc/PID/status` when `--server-pid` is given;
//! then sends one command on each (`use`, as a worker's first command
//! would be), waits for every reply and reports the growth again, since a
//! connection that has served a request may keep what it allocated for it.
//! Used by `scripts/bench-vs-beanstalkd.sh` to compare memory per idle
//! connection. With `--probe-livez`, a thread of its own times `GET
//! /livez` on the server's HTTP listener every [`LIVEZ_PROBE_INTERVAL`]
//! while the connections open (`scripts/bench-connections.sh`: the
//! probe must stay fast while 100,000 clients connect).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
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

/// Pause between two `/livez` probes (each waits for the last's answer).
const LIVEZ_PROBE_INTERVAL: Duration = Duration::from_millis(10);

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
    /// `--idle-after-command-secs` later, against the same baseline.
    rss_idle_after_command_bytes: Option<u64>,
    rss_per_connection_idle_after_command_bytes: Option<f64>,
    /// `--probe-livez`: probes answered while the connections opened, and
    /// their latency percentiles in milliseconds.
    livez_probes: Option<u64>,
    livez_p50_ms: Option<f64>,
    livez_p99_ms: Option<f64>,
    livez_max_ms: Option<f64>,
}

/// The command each idle connection sends once, and its reply.
const COMMAND: &[u8] = b"use bench-idle\r\n";
const REPLY: &[u8] = b"USING bench-idle\r\n";

pub(super) fn run(args: &BenchArgs, addr: SocketAddr, deadline: Instant) -> Result<()> {
    // The client's own fd table, grown while its connections open, would
    // stall the prober's `socket()` for an RCU grace period per doubling
    // (as the server's would its accepts): grown once, before the prober's
    // thread starts, the probes time the server alone.
    let slots = u64::try_from(args.connections).unwrap_or(u64::MAX);
    if let Err(e) = spool_server::process::presize_fd_table(slots.saturating_add(64)) {
        eprintln!("could not presize the fd table: {e}");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the client runtime")?;
    let (report, held) = rt.block_on(hold(args, addr, deadline))?;
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
        if let (Some(n), Some(p50), Some(p99), Some(max)) = (
            report.livez_probes,
            report.livez_p50_ms,
            report.livez_p99_ms,
            report.livez_max_ms,
        ) {
            text.push_str(&format!(
                "  /livez while connecting: {n} probes, p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms\n"
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
    super::emit(&text)?;
    // Held after the report is out, so a script watching the connections
    // from elsewhere (`--mode probe`) can read it and end the hold early.
    let hold_until = Instant::now() + Duration::from_secs(args.hold_secs);
    rt.block_on(async { tokio::time::sleep_until(hold_until.min(deadline).into()).await });
    drop(held);
    Ok(())
}

/// Opens and measures the connections; returns them, still open, with the
/// report.
async fn hold(
    args: &BenchArgs,
    addr: SocketAddr,
    deadline: Instant,
) -> Result<(IdleReport, Vec<TcpStream>)> {
    let n = args.connections;
    let mut control = Conn::connect(addr, 1 << 20, deadline).await?;
    let before = current_connections(&mut control).await?;
    let rss_before = args.server_pid.map(rss_bytes).transpose()?;

    let prober = if args.probe_livez {
        let http: SocketAddr = args
            .http
            .parse()
            .with_context(|| format!("--http {}: expected host:port", args.http))?;
        Some(LivezProber::start(http, deadline))
    } else {
        None
    };
    let started = Instant::now();
    let mut held: Vec<TcpStream> = Vec::with_capacity(n);
    for i in 0..n {
        let source = source_address(addr, i, &args.source_addresses)?;
        let stream = tokio::time::timeout_at(deadline.into(), open(addr, source))
            .await
            .with_context(|| format!("time limit reached after opening {i} connections"))?
            .with_context(|| {
                format!(
                    "opening connection {} of {n} (is `ulimit -n` high enough?)",
                    i + 1
                )
            })?;
        // Closed with a reset, not a FIN, when this process ends (the
        // script kills it): its ports are then not left in TIME_WAIT, where
        // a run started within the minute found ~100,000 of them and each
        // `bind` scanned past them (connecting took 13-56 s, not 2-4 s).
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .context("setting SO_LINGER")?;
        held.push(stream);
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let livez = prober.map(LivezProber::finish).transpose()?;

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
    let rss_idle_after_command = if args.idle_after_command_secs > 0 {
        let until = Instant::now() + Duration::from_secs(args.idle_after_command_secs);
        tokio::time::sleep_until(until.min(deadline).into()).await;
        args.server_pid.map(rss_bytes).transpose()?
    } else {
        None
    };

    let report = IdleReport {
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
        rss_idle_after_command_bytes: rss_idle_after_command,
        rss_per_connection_idle_after_command_bytes: per_connection(rss_idle_after_command),
        livez_probes: livez.as_ref().map(|h| h.len()),
        livez_p50_ms: livez.as_ref().map(|h| ms(h.value_at_quantile(0.5))),
        livez_p99_ms: livez.as_ref().map(|h| ms(h.value_at_quantile(0.99))),
        livez_max_ms: livez.as_ref().map(|h| ms(h.max())),
    };
    Ok((report, held))
}

fn ms(us: u64) -> f64 {
    (us as f64 / 10.0).round() / 100.0
}

/// Times `GET /livez` in a loop on an OS thread of its own (so the
/// client's busy event loop does not add to the figures) until finished.
struct LivezProber {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<Histogram<u64>>>,
}

impl LivezProber {
    fn start(http: SocketAddr, deadline: Instant) -> LivezProber {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            // Microseconds, up to the probe timeout.
            let mut latencies = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .context("creating the latency histogram")?;
            // At least one probe, and the loop ends by the run's deadline.
            loop {
                let took = probe_livez(http)?;
                latencies.saturating_record(took.as_micros() as u64);
                if stopped.load(Ordering::Acquire) || Instant::now() >= deadline {
                    return Ok(latencies);
                }
                std::thread::sleep(LIVEZ_PROBE_INTERVAL);
            }
        });
        LivezProber { stop, thread }
    }

    fn finish(self) -> Result<Histogram<u64>> {
        self.stop.store(true, Ordering::Release);
        match self.thread.join() {
            Ok(result) => result,
            Err(_) => bail!("the /livez prober panicked"),
        }
    }
}

/// One `GET /livez` on a new connection, answered 200; how long it took.
fn probe_livez(http: SocketAddr) -> Result<Duration> {
    let (took, _bytes) = super::probe::http_get(http, "/livez").context("/livez")?;
    Ok(took)
}

/// The source address of connection `i`: round-robin over `sources` when
/// given (IPv4 servers only); otherwise a further loopback address every
/// [`CONNECTIONS_PER_SOURCE_ADDR`] connections when the server is on IPv4
/// loopback, so ephemeral ports do not run out; `None`: the kernel picks.
pub(super) fn source_address(
    addr: SocketAddr,
    i: usize,
    sources: &[Ipv4Addr],
) -> Result<Option<Ipv4Addr>> {
    let IpAddr::V4(ip) = addr.ip() else {
        if sources.is_empty() {
            return Ok(None);
        }
        bail!("--source-addresses are IPv4; the server {addr} is not");
    };
    if !sources.is_empty() {
        return Ok(Some(sources[i % sources.len()]));
    }
    let extra = i / CONNECTIONS_PER_SOURCE_ADDR;
    if !ip.is_loopback() || extra == 0 {
        return Ok(None);
    }
    let host = u8::try_from(1 + extra).context("too many idle connections")?;
    Ok(Some(Ipv4Addr::new(127, 0, 0, host)))
}

/// Connects to `addr`, from `source` when given (its port chosen by the
/// kernel).
pub(super) async fn open(addr: SocketAddr, source: Option<Ipv4Addr>) -> Result<TcpStream> {
    let socket = match addr.ip() {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(source) = source {
        socket
            .bind(SocketAddr::new(source.into(), 0))
            .with_context(|| format!("binding source address {source}"))?;
    }
    Ok(socket.connect(addr).await?)
}

/// `current-connections` from the server's `stats`.
pub(super) async fn current_connections(control: &mut Conn) -> Result<u64> {
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
