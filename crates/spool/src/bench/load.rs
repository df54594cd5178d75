//! The measured loops: producers that `put`, consumers that
//! `reserve-with-timeout` and `delete`, and the state they share.
//!
//! Work is handed out by tickets so that no loop can run past `--jobs`:
//! a producer takes a sequence number per job, a consumer takes a ticket per
//! `reserve` it sends. Handing out exactly as many reserve tickets as jobs
//! means that when the last job arrives no consumer is left blocked in a
//! `reserve` with a `delete` queued behind it, so the end of the run is not
//! stretched by the one-second reserve timeout. A ticket is given back (to
//! the consumer that held it) when its reserve timed out while producers
//! were still working or when it returned a job that is not ours.
//!
//! Each job body carries the run's tag, the job's sequence number and the
//! time it was sent, so consumers can check exactly-once delivery and
//! measure put-to-reserve latency.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use spool_proto::{encode_request, Put, PutBody, Request, Response, TubeName};

use super::conn::Conn;
use super::Mode;

/// Bytes at the start of every job body: run tag (u32), sequence number
/// (u64) and send time in nanoseconds since [`Shared::epoch`] (u64), all
/// little-endian. The rest is padding.
pub(super) const BODY_HEADER_BYTES: usize = 20;

/// Highest latency the histograms resolve, in nanoseconds (ten minutes);
/// larger values are recorded as this.
const LATENCY_MAX_NS: u64 = 600_000_000_000;

/// State shared by every connection of a run, across threads.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) mode: Mode,
    pub(super) jobs: u64,
    pub(super) pipeline: usize,
    pub(super) tube: TubeName,
    /// Distinguishes this run's jobs from leftovers of earlier runs in the
    /// same tube (mixed mode only; drain mode takes jobs put by another run).
    pub(super) run_tag: u32,
    /// Origin of the send times written into bodies.
    pub(super) epoch: Instant,
    /// Hard end of the run: every wait gives up here.
    pub(super) deadline: Instant,
    /// Consumers send a reserve only once their last delete was answered.
    wait_for_delete: bool,
    put_template: PutTemplate,
    reserve_request: Vec<u8>,
    next_seq: AtomicU64,
    reserve_tickets: AtomicU64,
    producers_left: AtomicUsize,
    /// Set when a connection fails, so the others stop issuing work.
    pub(super) abort: AtomicBool,
    /// `acked[seq]`: the put of `seq` was answered INSERTED (mixed mode).
    pub(super) acked: Vec<AtomicBool>,
    /// `seen[seq]`: a consumer reserved `seq` (mixed and drain modes).
    pub(super) seen: Vec<AtomicBool>,
}

/// The kinds of connection a run opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Producer,
    Consumer,
}

impl Shared {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        mode: Mode,
        jobs: u64,
        pipeline: usize,
        body_size: usize,
        ttr_secs: u32,
        tube: TubeName,
        producers: usize,
        run_tag: u32,
        deadline: Instant,
        wait_for_delete: bool,
    ) -> Result<Shared> {
        let len = usize::try_from(jobs).context("--jobs does not fit in memory")?;
        let flags = |wanted: bool| -> Vec<AtomicBool> {
            if wanted {
                (0..len).map(|_| AtomicBool::new(false)).collect()
            } else {
                Vec::new()
            }
        };
        let mut reserve_request = Vec::new();
        encode_request(
            &Request::ReserveWithTimeout {
                timeout_secs: Some(1),
            },
            &mut reserve_request,
        );
        Ok(Shared {
            mode,
            jobs,
            pipeline,
            wait_for_delete,
            tube,
            run_tag,
            epoch: Instant::now(),
            deadline,
            put_template: PutTemplate::new(body_size, ttr_secs),
            reserve_request,
            next_seq: AtomicU64::new(0),
            reserve_tickets: AtomicU64::new(0),
            producers_left: AtomicUsize::new(producers),
            abort: AtomicBool::new(false),
            acked: flags(mode == Mode::Mixed),
            seen: flags(mode != Mode::Put),
        })
    }
}

/// The wire form of a `put`, encoded once; each job copies it and patches
/// the body header in place, so a put costs no allocation or formatting.
#[derive(Debug)]
struct PutTemplate {
    bytes: Vec<u8>,
    body_offset: usize,
}

impl PutTemplate {
    fn new(body_size: usize, ttr_secs: u32) -> PutTemplate {
        let body = Bytes::from(vec![b'.'; body_size]);
        let mut bytes = Vec::new();
        encode_request(
            &Request::Put(Put {
                pri: 1024,
                delay_secs: 0,
                ttr_secs,
                body: PutBody::Complete(body),
            }),
            &mut bytes,
        );
        // The encoding ends with the body and "\r\n".
        let body_offset = bytes.len() - body_size - 2;
        PutTemplate { bytes, body_offset }
    }

    fn append(&self, out: &mut Vec<u8>, tag: u32, seq: u64, sent_ns: u64) {
        let start = out.len() + self.body_offset;
        out.extend_from_slice(&self.bytes);
        let header = &mut out[start..start + BODY_HEADER_BYTES];
        header[0..4].copy_from_slice(&tag.to_le_bytes());
        header[4..12].copy_from_slice(&seq.to_le_bytes());
        header[12..20].copy_from_slice(&sent_ns.to_le_bytes());
    }
}

/// Reads the header [`PutTemplate::append`] wrote: (tag, seq, sent_ns).
fn decode_body(body: &[u8]) -> Option<(u32, u64, u64)> {
    let header = body.get(..BODY_HEADER_BYTES)?;
    let tag = u32::from_le_bytes(header[0..4].try_into().ok()?);
    let seq = u64::from_le_bytes(header[4..12].try_into().ok()?);
    let sent_ns = u64::from_le_bytes(header[12..20].try_into().ok()?);
    Some((tag, seq, sent_ns))
}

/// What one connection measured.
#[derive(Debug)]
pub(super) struct WorkerStats {
    pub(super) put_ns: Histogram<u64>,
    pub(super) reserve_ns: Histogram<u64>,
    pub(super) delete_ns: Histogram<u64>,
    pub(super) end_to_end_ns: Histogram<u64>,
    pub(super) puts_acked: u64,
    /// Jobs of this run reserved (duplicates included).
    pub(super) reserved: u64,
    /// Jobs of this run deleted.
    pub(super) deleted: u64,
    pub(super) duplicated: u64,
    /// Jobs reserved that this run did not put (deleted all the same).
    pub(super) foreign: u64,
    pub(super) reserve_timeouts: u64,
    /// `delete` answered NOT_FOUND: the reservation was lost.
    pub(super) delete_not_found: u64,
    /// When the last job was acknowledged or deleted.
    pub(super) last_progress: Option<Instant>,
    pub(super) time_limit_hit: bool,
}

impl WorkerStats {
    pub(super) fn new() -> WorkerStats {
        let hist = || {
            Histogram::new_with_bounds(1, LATENCY_MAX_NS, 3)
                .expect("constant histogram bounds are valid")
        };
        WorkerStats {
            put_ns: hist(),
            reserve_ns: hist(),
            delete_ns: hist(),
            end_to_end_ns: hist(),
            puts_acked: 0,
            reserved: 0,
            deleted: 0,
            duplicated: 0,
            foreign: 0,
            reserve_timeouts: 0,
            delete_not_found: 0,
            last_progress: None,
            time_limit_hit: false,
        }
    }

    pub(super) fn merge(&mut self, other: &WorkerStats) -> Result<()> {
        self.put_ns
            .add(&other.put_ns)
            .context("merging histograms")?;
        self.reserve_ns
            .add(&other.reserve_ns)
            .context("merging histograms")?;
        self.delete_ns
            .add(&other.delete_ns)
            .context("merging histograms")?;
        self.end_to_end_ns
            .add(&other.end_to_end_ns)
            .context("merging histograms")?;
        self.puts_acked += other.puts_acked;
        self.reserved += other.reserved;
        self.deleted += other.deleted;
        self.duplicated += other.duplicated;
        self.foreign += other.foreign;
        self.reserve_timeouts += other.reserve_timeouts;
        self.delete_not_found += other.delete_not_found;
        self.last_progress = self.last_progress.max(other.last_progress);
        self.time_limit_hit |= other.time_limit_hit;
        Ok(())
    }
}

/// Opens a connection and points it at the tube.
pub(super) async fn connect(
    role: Role,
    addr: std::net::SocketAddr,
    shared: &Shared,
) -> Result<Conn> {
    // Consumers may meet foreign jobs of any size the protocol allows.
    let max_body = u64::from(spool_proto::limits::MAX_JOB_SIZE_LIMIT_BYTES);
    let mut conn = Conn::connect(addr, max_body, shared.deadline).await?;
    let tube = shared.tube.clone();
    match role {
        Role::Producer => match conn.call(&Request::Use(tube)).await? {
            Response::Using(_) => {}
            other => bail!("`use {}` answered {other:?}", shared.tube),
        },
        Role::Consumer => {
            match conn.call(&Request::Watch(tube)).await? {
                Response::Watching(_) => {}
                other => bail!("`watch {}` answered {other:?}", shared.tube),
            }
            if shared.tube != TubeName::default_tube() {
                match conn
                    .call(&Request::Ignore(TubeName::default_tube()))
                    .await?
                {
                    Response::Watching(1) => {}
                    other => bail!("`ignore default` answered {other:?}"),
                }
            }
        }
    }
    Ok(conn)
}

/// Decrements the count of working producers however a producer ends, so
/// consumers never wait for a producer that failed.
struct ProducerDone<'a>(&'a Shared);

impl Drop for ProducerDone<'_> {
    fn drop(&mut self) {
        self.0.producers_left.fetch_sub(1, Relaxed);
    }
}

fn nanos_between(earlier: Instant, later: Instant) -> u64 {
    u64::try_from(later.saturating_duration_since(earlier).as_nanos()).unwrap_or(u64::MAX)
}

/// Puts jobs until the sequence numbers run out, keeping up to
/// `pipeline` puts in flight.
pub(super) async fn producer(mut conn: Conn, shared: Arc<Shared>) -> (WorkerStats, Result<()>) {
    let _done = ProducerDone(&shared);
    let mut stats = WorkerStats::new();
    let result = produce(&mut conn, &shared, &mut stats).await;
    (stats, result)
}

async fn produce(conn: &mut Conn, shared: &Shared, stats: &mut WorkerStats) -> Result<()> {
    // (seq, sent) of each put in flight, oldest first.
    let mut inflight: VecDeque<(u64, Instant)> = VecDeque::with_capacity(shared.pipeline);
    let mut exhausted = false;
    loop {
        let now = Instant::now();
        if shared.abort.load(Relaxed) {
            break;
        }
        if now >= shared.deadline {
            stats.time_limit_hit = true;
            break;
        }
        let sent_ns = nanos_between(shared.epoch, now);
        while !exhausted && inflight.len() < shared.pipeline {
            let seq = shared.next_seq.fetch_add(1, Relaxed);
            if seq >= shared.jobs {
                exhausted = true;
                break;
            }
            shared
                .put_template
                .append(&mut conn.wbuf, shared.run_tag, seq, sent_ns);
            inflight.push_back((seq, now));
        }
        if inflight.is_empty() {
            break;
        }
        let Some((mut reply, received)) = reply_before(conn, shared.deadline).await? else {
            stats.time_limit_hit = true;
            break;
        };
        loop {
            let (seq, sent) = inflight
                .pop_front()
                .context("the server sent a reply nobody asked for")?;
            match reply {
                Response::Inserted(_) => {
                    stats
                        .put_ns
                        .saturating_record(nanos_between(sent, received));
                    stats.puts_acked += 1;
                    if let Some(flag) = shared.acked.get(seq as usize) {
                        flag.store(true, Relaxed);
                    }
                }
                other => bail!("put of job {seq} answered {other:?}"),
            }
            match conn.buffered_reply()? {
                Some(next) => reply = next,
                None => break,
            }
        }
        stats.last_progress = Some(received);
    }
    Ok(())
}

/// A request a consumer is waiting on.
#[derive(Debug, Clone, Copy)]
enum Waiting {
    Reserve,
    /// `ours`: the job was put by this run (counted in `deleted`).
    Delete {
        ours: bool,
    },
}

/// Reserves and deletes jobs until its reserve tickets run out or the tube
/// stays empty after the producers finished, keeping up to `pipeline`
/// reserves in flight and sending each delete with the next batch.
pub(super) async fn consumer(mut conn: Conn, shared: Arc<Shared>) -> (WorkerStats, Result<()>) {
    let mut stats = WorkerStats::new();
    let result = consume(&mut conn, &shared, &mut stats).await;
    (stats, result)
}

async fn consume(conn: &mut Conn, shared: &Shared, stats: &mut WorkerStats) -> Result<()> {
    let mut inflight: VecDeque<(Waiting, Instant)> =
        VecDeque::with_capacity(2 * shared.pipeline + 1);
    // The newest `unsent` entries of `inflight` are queued but not written
    // yet; their send time is stamped when they are.
    let mut unsent = 0usize;
    let mut reserves_in_flight = 0usize;
    // Tickets given back to this consumer, spent before taking new ones.
    let mut own_tickets = 0u64;
    let mut stop_reserving = false;
    loop {
        let now = Instant::now();
        if shared.abort.load(Relaxed) {
            break;
        }
        if now >= shared.deadline {
            stats.time_limit_hit = true;
            break;
        }
        // Deletes queued while handling the last replies go out now.
        let len = inflight.len();
        for entry in inflight.range_mut(len - unsent..) {
            entry.1 = now;
        }
        unsent = 0;
        // `inflight` holds reserves and deletes; the rest are deletes.
        let deletes_in_flight = inflight.len() - reserves_in_flight;
        while !stop_reserving
            && reserves_in_flight < shared.pipeline
            && !(shared.wait_for_delete && deletes_in_flight > 0)
        {
            if own_tickets > 0 {
                own_tickets -= 1;
            } else if shared.reserve_tickets.fetch_add(1, Relaxed) >= shared.jobs {
                stop_reserving = true;
                break;
            }
            conn.wbuf.extend_from_slice(&shared.reserve_request);
            inflight.push_back((Waiting::Reserve, now));
            reserves_in_flight += 1;
        }
        if inflight.is_empty() {
            break;
        }
        let Some((mut reply, received)) = reply_before(conn, shared.deadline).await? else {
            stats.time_limit_hit = true;
            break;
        };
        loop {
            let (waiting, sent) = inflight
                .pop_front()
                .context("the server sent a reply nobody asked for")?;
            match (waiting, reply) {
                (Waiting::Reserve, Response::Reserved { id, body }) => {
                    reserves_in_flight -= 1;
                    stats
                        .reserve_ns
                        .saturating_record(nanos_between(sent, received));
                    let ours = match decode_body(&body) {
                        Some((tag, seq, sent_ns))
                            if seq < shared.jobs
                                && (shared.mode == Mode::Drain || tag == shared.run_tag) =>
                        {
                            stats.reserved += 1;
                            if shared.seen[seq as usize].swap(true, Relaxed) {
                                stats.duplicated += 1;
                            }
                            if shared.mode == Mode::Mixed {
                                let now_ns = nanos_between(shared.epoch, received);
                                stats
                                    .end_to_end_ns
                                    .saturating_record(now_ns.saturating_sub(sent_ns));
                            }
                            true
                        }
                        _ => {
                            // Not one of the jobs we count: its ticket buys
                            // another reserve.
                            stats.foreign += 1;
                            own_tickets += 1;
                            false
                        }
                    };
                    conn.push(&Request::Delete(id));
                    inflight.push_back((Waiting::Delete { ours }, received));
                    unsent += 1;
                }
                (Waiting::Reserve, Response::TimedOut) => {
                    reserves_in_flight -= 1;
                    stats.reserve_timeouts += 1;
                    if shared.producers_left.load(Relaxed) == 0 {
                        // All puts were answered before this reserve gave
                        // up, so no ready job is left for this ticket.
                        stop_reserving = true;
                    } else {
                        own_tickets += 1;
                    }
                }
                (Waiting::Reserve, Response::DeadlineSoon) => {
                    reserves_in_flight -= 1;
                    own_tickets += 1;
                }
                (Waiting::Delete { ours }, Response::Deleted) => {
                    stats
                        .delete_ns
                        .saturating_record(nanos_between(sent, received));
                    if ours {
                        stats.deleted += 1;
                        stats.last_progress = Some(received);
                    }
                }
                (Waiting::Delete { .. }, Response::NotFound) => stats.delete_not_found += 1,
                (waiting, other) => bail!("{waiting:?} answered {other:?}"),
            }
            match conn.buffered_reply()? {
                Some(next) => reply = next,
                None => break,
            }
        }
    }
    Ok(())
}

/// Sends what is buffered and waits for the next reply with the time it
/// arrived. `None` when the time limit ended the run, including a reply that
/// arrived after the deadline: only work finished before it counts. That
/// also keeps the exactly-once check honest: a consumer that stopped at the
/// deadline had its reserved jobs released by the server, and another
/// consumer may receive one again, but only after the deadline.
async fn reply_before(conn: &mut Conn, deadline: Instant) -> Result<Option<(Response, Instant)>> {
    if !conn.flush().await? {
        return Ok(None);
    }
    let Some(reply) = conn.next_reply().await? else {
        return Ok(None);
    };
    let received = Instant::now();
    Ok((received < deadline).then_some((reply, received)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_template_round_trips_through_the_decoder() {
        let template = PutTemplate::new(32, 120);
        let mut wire = Vec::new();
        template.append(&mut wire, 7, 42, 99);
        let mut buf = bytes::BytesMut::from(&wire[..]);
        let mut decoder = spool_proto::RequestDecoder::new(1024);
        let Some(Ok(Request::Put(put))) = decoder.decode(&mut buf) else {
            panic!("not a put: {wire:?}");
        };
        assert_eq!(put.ttr_secs, 120);
        let PutBody::Complete(body) = put.body else {
            panic!("incomplete body");
        };
        assert_eq!(body.len(), 32);
        assert_eq!(decode_body(&body), Some((7, 42, 99)));
        assert!(buf.is_empty());
    }

    #[test]
    fn short_bodies_are_not_ours() {
        assert_eq!(decode_body(b"hello"), None);
    }
}
