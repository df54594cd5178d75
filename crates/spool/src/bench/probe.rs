//! `spool bench --mode probe` (hidden): watches one or more spool nodes
//! while other processes (`spool bench --mode idle`) open and hold many
//! connections to them, and reports whether the nodes kept answering.
//!
//! Before anything connects it opens one beanstalkd connection per node
//! (`--node BEANSTALKD,HTTP`, repeated) and reads each node's
//! `current-connections`; then it prints `probe ready` on stderr, the
//! signal for the script to start the clients. Each round it times, on
//! every node, `GET /livez`, `/readyz` and `/metrics` (each on a new
//! connection, as a probe or a scraper makes them), and a job round trip
//! on its connections opened before the crowd: `put` on node i, `reserve`
//! of that job on node i+1 (through the shared database when the nodes
//! share one; the same node when there is one), `delete` there. The sum
//! of the nodes' `current-connections` tells the phases apart: connecting
//! until it has grown by `--connections`, then held for `--hold-secs`,
//! then `/admin/connections` is timed once per node (a listing of every
//! connection, kept out of the other figures). Latencies are reported per
//! phase and kind (all nodes together), with the kernel's listen-queue
//! drop counters over the run. A probe that fails is counted and fails
//! the run after the report.
//!
//! Used by `scripts/bench-connections-pg.sh` (100,000 connections spread
//! over several nodes sharing PostgreSQL).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use serde::Serialize;
use spool_proto::{Put, PutBody, Request, Response, TubeName};
use spool_server::net::listen_queue_drops;

use super::conn::Conn;
use super::idle::current_connections;
use super::BenchArgs;

/// Pause between two rounds.
const ROUND_INTERVAL: Duration = Duration::from_millis(10);

/// An HTTP probe not answered in this long fails.
const HTTP_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the `reserve` of a round trip waits for the job put on the
/// node before (it is ready at once; this only bounds a lost job).
const RESERVE_TIMEOUT_SECS: u32 = 5;

/// Largest reply body the probe's beanstalkd connections accept (`stats`).
const REPLY_BODY_MAX_BYTES: u64 = 1 << 20;

/// What is timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Livez,
    Readyz,
    Metrics,
    Put,
    Reserve,
    Delete,
    Stats,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Livez => "livez",
            Kind::Readyz => "readyz",
            Kind::Metrics => "metrics",
            Kind::Put => "put",
            Kind::Reserve => "reserve_other_node",
            Kind::Delete => "delete",
            Kind::Stats => "stats",
        }
    }
}

const HTTP_PROBES: [(Kind, &str); 3] = [
    (Kind::Livez, "/livez"),
    (Kind::Readyz, "/readyz"),
    (Kind::Metrics, "/metrics"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Held,
}

/// One node: its beanstalkd connection (opened before the crowd) and its
/// HTTP listener.
struct Node {
    conn: Conn,
    http: SocketAddr,
}

#[derive(Debug, Serialize)]
struct Latency {
    count: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        Latency {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }
}

#[derive(Debug, Serialize)]
struct AdminListing {
    node: usize,
    ms: f64,
    bytes: usize,
}

#[derive(Debug, Serialize)]
struct ProbeReport {
    mode: &'static str,
    nodes: usize,
    /// Client connections expected on top of those open at the start.
    connections: usize,
    connections_at_start: u64,
    /// From `probe ready` until the nodes counted every connection.
    all_connected_secs: Option<f64>,
    /// Fewest connections (beyond the start's) counted while held.
    held_min_connections: Option<u64>,
    held_secs: f64,
    rounds_connecting: u64,
    rounds_held: u64,
    /// Jobs put on one node and reserved and deleted on another (on the
    /// same node when there is one).
    round_trip_jobs: u64,
    /// Growth of the kernel's counters (the whole network namespace)
    /// from `probe ready` to the end of the hold.
    listen_overflows: u64,
    listen_drops: u64,
    connecting: BTreeMap<&'static str, Latency>,
    held: BTreeMap<&'static str, Latency>,
    /// The slowest `/livez` of each node over both phases, in ms.
    livez_max_ms_per_node: Vec<f64>,
    admin_connections: Vec<AdminListing>,
    failures: u64,
    first_failure: Option<String>,
}

/// Latencies of one phase, per kind, in microseconds.
#[derive(Default)]
struct Timings(BTreeMap<Kind, Histogram<u64>>);

impl Timings {
    fn record(&mut self, kind: Kind, took: Duration) -> Result<()> {
        let h = match self.0.entry(kind) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => e.insert(
                Histogram::new_with_bounds(1, 60_000_000, 3)
                    .context("creating a latency histogram")?,
            ),
        };
        h.saturating_record(took.as_micros() as u64);
        Ok(())
    }

    fn report(&self) -> BTreeMap<&'static str, Latency> {
        self.0
            .iter()
            .map(|(kind, h)| (kind.name(), Latency::of(h)))
            .collect()
    }
}

/// The nodes of `--node BEANSTALKD,HTTP`.
fn parse_nodes(nodes: &[String]) -> Result<Vec<(SocketAddr, SocketAddr)>> {
    if nodes.is_empty() {
        bail!("--mode probe needs at least one --node BEANSTALKD_ADDR,HTTP_ADDR");
    }
    nodes
        .iter()
        .map(|node| {
            let parsed = node.split_once(',').and_then(|(beanstalkd, http)| {
                Some((beanstalkd.trim().parse().ok()?, http.trim().parse().ok()?))
            });
            parsed.with_context(|| {
                format!("--node {node}: expected BEANSTALKD_ADDR,HTTP_ADDR (host:port,host:port)")
            })
        })
        .collect()
}

pub(super) fn run(args: &BenchArgs, deadline: Instant) -> Result<()> {
    let nodes = parse_nodes(&args.nodes)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the probe's runtime")?;
    let report = rt.block_on(watch(args, &nodes, deadline))?;
    let text = if args.json {
        let json = serde_json::to_string(&report).context("serializing the report")?;
        format!("{json}\n")
    } else {
        human(&report)
    };
    super::emit(&text)?;
    if let Some(first) = &report.first_failure {
        bail!("{} probe(s) failed; the first: {first}", report.failures);
    }
    if report.all_connected_secs.is_none() {
        bail!("time limit reached before the nodes counted every connection");
    }
    Ok(())
}

fn human(r: &ProbeReport) -> String {
    let mut text = format!(
        "spool bench probe: {} node(s), {} connections; all counted after {} s; \
         fewest held {}; listen-queue overflows {}, drops {}; {} round-trip jobs\n",
        r.nodes,
        r.connections,
        r.all_connected_secs
            .map_or("-".to_string(), |s| format!("{s:.2}")),
        r.held_min_connections
            .map_or("-".to_string(), |n| n.to_string()),
        r.listen_overflows,
        r.listen_drops,
        r.round_trip_jobs,
    );
    for (phase, timings) in [("connecting", &r.connecting), ("held", &r.held)] {
        for (kind, l) in timings {
            text.push_str(&format!(
                "  {phase:<10} {kind:<18} {:>6} probes, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms\n",
                l.count, l.p50_ms, l.p99_ms, l.max_ms
            ));
        }
    }
    for listing in &r.admin_connections {
        text.push_str(&format!(
            "  /admin/connections of node {}: {} bytes in {:.1} ms\n",
            listing.node, listing.bytes, listing.ms
        ));
    }
    text
}

async fn watch(
    args: &BenchArgs,
    addrs: &[(SocketAddr, SocketAddr)],
    deadline: Instant,
) -> Result<ProbeReport> {
    // A tube of this run's own, so the round trip meets no other jobs.
    let tube = TubeName::new(format!("probe-{:08x}", super::random_u32()).as_bytes())
        .context("naming the probe's tube")?;
    let mut nodes = Vec::with_capacity(addrs.len());
    let mut at_start = 0;
    for &(beanstalkd, http) in addrs {
        let mut conn = Conn::connect(beanstalkd, REPLY_BODY_MAX_BYTES, deadline).await?;
        expect(&mut conn, Request::Use(tube.clone()), |r| {
            matches!(r, Response::Using(_))
        })
        .await?;
        expect(&mut conn, Request::Watch(tube.clone()), |r| {
            matches!(r, Response::Watching(_))
        })
        .await?;
        expect(&mut conn, Request::Ignore(default_tube()?), |r| {
            matches!(r, Response::Watching(_))
        })
        .await?;
        at_start += current_connections(&mut conn).await?;
        nodes.push(Node { conn, http });
    }
    let drops_at_start = listen_queue_drops().context("reading the listen-queue counters")?;
    eprintln!("probe ready");
    let started = Instant::now();

    let mut state = Watch {
        connecting: Timings::default(),
        held: Timings::default(),
        livez_max_us: vec![0; nodes.len()],
        failures: 0,
        first_failure: None,
        round_trip_jobs: 0,
    };
    let target = args.connections as u64;
    let mut phase = Phase::Connecting;
    let mut all_connected: Option<Instant> = None;
    let mut held_min: Option<u64> = None;
    let (mut rounds_connecting, mut rounds_held) = (0u64, 0u64);
    let mut round = 0u64;
    loop {
        round += 1;
        let counted = state.round(&mut nodes, phase, round).await?;
        let beyond_start = counted.saturating_sub(at_start);
        match phase {
            Phase::Connecting => {
                rounds_connecting += 1;
                if beyond_start >= target {
                    phase = Phase::Held;
                    all_connected = Some(Instant::now());
                }
            }
            Phase::Held => {
                rounds_held += 1;
                held_min = Some(held_min.map_or(beyond_start, |m| m.min(beyond_start)));
            }
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if let Some(at) = all_connected {
            if phase == Phase::Held
                && rounds_held > 0
                && now >= at + Duration::from_secs(args.hold_secs)
            {
                break;
            }
        }
        tokio::time::sleep(ROUND_INTERVAL).await;
    }
    let held_secs = all_connected.map_or(0.0, |at| at.elapsed().as_secs_f64());
    let drops_at_end = listen_queue_drops().context("reading the listen-queue counters")?;

    // Kept out of the phases' figures: one listing of every connection.
    let mut admin_connections = Vec::with_capacity(nodes.len());
    for (i, node) in nodes.iter().enumerate() {
        match http_get(node.http, "/admin/connections") {
            Ok((took, bytes)) => admin_connections.push(AdminListing {
                node: i,
                ms: round2(took.as_secs_f64() * 1000.0),
                bytes,
            }),
            Err(e) => state.failed(format!("node {i} /admin/connections: {e:#}")),
        }
    }

    Ok(ProbeReport {
        mode: "probe",
        nodes: nodes.len(),
        connections: args.connections,
        connections_at_start: at_start,
        all_connected_secs: all_connected
            .map(|at| round2(at.duration_since(started).as_secs_f64())),
        held_min_connections: held_min,
        held_secs: round2(held_secs),
        rounds_connecting,
        rounds_held,
        round_trip_jobs: state.round_trip_jobs,
        listen_overflows: drops_at_end
            .overflows
            .saturating_sub(drops_at_start.overflows),
        listen_drops: drops_at_end.drops.saturating_sub(drops_at_start.drops),
        connecting: state.connecting.report(),
        held: state.held.report(),
        livez_max_ms_per_node: state.livez_max_us.iter().map(|&us| ms(us)).collect(),
        admin_connections,
        failures: state.failures,
        first_failure: state.first_failure,
    })
}

/// What the rounds gathered.
struct Watch {
    connecting: Timings,
    held: Timings,
    livez_max_us: Vec<u64>,
    failures: u64,
    first_failure: Option<String>,
    round_trip_jobs: u64,
}

impl Watch {
    fn failed(&mut self, what: String) {
        self.failures += 1;
        if self.first_failure.is_none() {
            eprintln!("probe failed: {what}");
            self.first_failure = Some(what);
        }
    }

    fn timings(&mut self, phase: Phase) -> &mut Timings {
        match phase {
            Phase::Connecting => &mut self.connecting,
            Phase::Held => &mut self.held,
        }
    }

    /// One round over every node; returns the sum of the nodes'
    /// `current-connections`. A beanstalkd connection that fails ends the
    /// run (its replies could no longer be matched to requests); an HTTP
    /// probe that fails is counted.
    async fn round(&mut self, nodes: &mut [Node], phase: Phase, round: u64) -> Result<u64> {
        for (i, node) in nodes.iter().enumerate() {
            for (kind, path) in HTTP_PROBES {
                match http_get(node.http, path) {
                    Ok((took, _)) => {
                        self.timings(phase).record(kind, took)?;
                        if kind == Kind::Livez {
                            let us = took.as_micros() as u64;
                            self.livez_max_us[i] = self.livez_max_us[i].max(us);
                        }
                    }
                    Err(e) => self.failed(format!("node {i} {path}: {e:#}")),
                }
            }
        }
        for i in 0..nodes.len() {
            let other = (i + 1) % nodes.len();
            self.round_trip(nodes, i, other, phase, round).await?;
        }
        let mut counted = 0;
        for node in nodes.iter_mut() {
            let sent = Instant::now();
            counted += current_connections(&mut node.conn).await?;
            self.timings(phase).record(Kind::Stats, sent.elapsed())?;
        }
        Ok(counted)
    }

    /// `put` on node `from`, `reserve` on node `to`, `delete` there.
    async fn round_trip(
        &mut self,
        nodes: &mut [Node],
        from: usize,
        to: usize,
        phase: Phase,
        round: u64,
    ) -> Result<()> {
        let body = Bytes::from(format!("probe round {round} from node {from}"));
        let sent = Instant::now();
        let put = nodes[from]
            .conn
            .call(&Request::Put(Put {
                pri: 0,
                delay_secs: 0,
                ttr_secs: 60,
                body: PutBody::Complete(body.clone()),
            }))
            .await?;
        self.timings(phase).record(Kind::Put, sent.elapsed())?;
        let Response::Inserted(put_id) = put else {
            bail!("node {from}: `put` answered {put:?}");
        };
        let sent = Instant::now();
        let reserved = nodes[to]
            .conn
            .call(&Request::ReserveWithTimeout {
                timeout_secs: Some(RESERVE_TIMEOUT_SECS),
            })
            .await?;
        self.timings(phase).record(Kind::Reserve, sent.elapsed())?;
        let id = match reserved {
            Response::Reserved { id, body: got } if id == put_id && got == body => id,
            other => bail!("node {to}: reserving job {put_id} put on node {from} got {other:?}"),
        };
        let sent = Instant::now();
        let deleted = nodes[to].conn.call(&Request::Delete(id)).await?;
        self.timings(phase).record(Kind::Delete, sent.elapsed())?;
        if deleted != Response::Deleted {
            bail!("node {to}: deleting job {id} answered {deleted:?}");
        }
        self.round_trip_jobs += 1;
        Ok(())
    }
}

async fn expect(conn: &mut Conn, request: Request, ok: impl Fn(&Response) -> bool) -> Result<()> {
    let reply = conn.call(&request).await?;
    if !ok(&reply) {
        bail!("{request:?} answered {reply:?}");
    }
    Ok(())
}

fn default_tube() -> Result<TubeName> {
    TubeName::new(b"default").context("naming the default tube")
}

/// `GET path` on a new connection, answered 200 and read to its end: how
/// long it took and how many bytes came back. Blocking: the probe's own
/// thread does nothing else meanwhile.
pub(super) fn http_get(http: SocketAddr, path: &str) -> Result<(Duration, usize)> {
    let started = Instant::now();
    let mut stream = std::net::TcpStream::connect_timeout(&http, HTTP_PROBE_TIMEOUT)
        .with_context(|| format!("connecting to {http}"))?;
    stream.set_read_timeout(Some(HTTP_PROBE_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_PROBE_TIMEOUT))?;
    stream.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: spool\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .context("reading the answer")?;
    let took = started.elapsed();
    if !reply.starts_with(b"HTTP/1.1 200") {
        bail!(
            "answered {:?}",
            String::from_utf8_lossy(&reply[..reply.len().min(96)])
        );
    }
    Ok((took, reply.len()))
}

fn ms(us: u64) -> f64 {
    (us as f64 / 10.0).round() / 100.0
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_two_addresses_each() {
        let parsed = parse_nodes(&["127.0.0.1:1,127.0.0.1:2".to_string()]).expect("parses");
        assert_eq!(
            parsed,
            vec![(
                "127.0.0.1:1".parse().expect("addr"),
                "127.0.0.1:2".parse().expect("addr")
            )]
        );
        for bad in ["127.0.0.1:1", "127.0.0.1:1,x", "a,b"] {
            let err = parse_nodes(&[bad.to_string()]).expect_err(bad);
            assert!(
                err.to_string().contains("BEANSTALKD_ADDR,HTTP_ADDR"),
                "{err}"
            );
        }
        assert!(parse_nodes(&[]).is_err());
    }
}
