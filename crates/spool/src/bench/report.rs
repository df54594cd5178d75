//! What a load run prints: one JSON object (`--json`) or a short summary.
//! The JSON field names are relied on by `scripts/bench-vs-beanstalkd.sh`.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latency percentiles of one kind of request, in microseconds.
#[derive(Debug, Serialize)]
pub(super) struct Latency {
    pub(super) count: u64,
    pub(super) mean: f64,
    pub(super) p50: f64,
    pub(super) p99: f64,
    pub(super) p999: f64,
    pub(super) max: f64,
}

impl Latency {
    /// `None` when nothing was recorded, so JSON shows `null` rather than
    /// zeros that look like measurements.
    pub(super) fn from_ns(hist: &Histogram<u64>) -> Option<Latency> {
        if hist.is_empty() {
            return None;
        }
        // Tenths of a microsecond: finer than loopback jitter.
        let us = |ns: f64| (ns / 100.0).round() / 10.0;
        Some(Latency {
            count: hist.len(),
            mean: us(hist.mean()),
            p50: us(hist.value_at_quantile(0.5) as f64),
            p99: us(hist.value_at_quantile(0.99) as f64),
            p999: us(hist.value_at_quantile(0.999) as f64),
            max: us(hist.max() as f64),
        })
    }
}

#[derive(Debug, Serialize)]
pub(super) struct Report {
    pub(super) mode: &'static str,
    pub(super) addr: String,
    pub(super) tube: String,
    pub(super) producers: usize,
    pub(super) consumers: usize,
    pub(super) pipeline: usize,
    pub(super) body_size: usize,
    pub(super) jobs: u64,
    pub(super) threads: usize,
    pub(super) elapsed_secs: f64,
    /// Jobs completed per second: acknowledged puts in put mode, deleted
    /// jobs in drain and mixed modes.
    pub(super) ops_per_sec: f64,
    pub(super) jobs_done: u64,
    pub(super) puts_acked: u64,
    pub(super) reserved: u64,
    pub(super) deleted: u64,
    pub(super) put_latency_us: Option<Latency>,
    pub(super) reserve_latency_us: Option<Latency>,
    pub(super) delete_latency_us: Option<Latency>,
    /// Put sent to job reserved (mixed mode only).
    pub(super) end_to_end_latency_us: Option<Latency>,
    /// Mixed: jobs answered INSERTED that no consumer reserved. Drain: jobs
    /// 0..jobs that no consumer reserved. `null` in put mode, and when the
    /// time limit was hit (those jobs may simply still be queued; see
    /// `not_reserved`).
    pub(super) lost: Option<u64>,
    /// The same count as `lost`, also when the time limit was hit.
    pub(super) not_reserved: Option<u64>,
    /// Jobs reserved more than once (`null` in put mode).
    pub(super) duplicated: Option<u64>,
    /// Jobs reserved and deleted that this run did not put.
    pub(super) foreign: u64,
    pub(super) reserve_timeouts: u64,
    pub(super) delete_not_found: u64,
    /// Every job done, no time limit hit, no connection failed.
    pub(super) complete: bool,
    pub(super) time_limit_hit: bool,
    pub(super) errors: Vec<String>,
    /// CPU seconds the bench process used during the run (all threads).
    pub(super) client_cpu_secs: Option<f64>,
}

impl Report {
    /// The summary printed without `--json`.
    pub(super) fn human(&self) -> String {
        let mut out = String::new();
        self.write_human(&mut out)
            .expect("formatting into a String cannot fail");
        out
    }

    fn write_human(&self, out: &mut String) -> std::fmt::Result {
        writeln!(
            out,
            "spool bench: {} against {} (tube {}): {} producers, {} consumers, pipeline {}, \
             {}-byte bodies, {} jobs, {} client threads",
            self.mode,
            self.addr,
            self.tube,
            self.producers,
            self.consumers,
            self.pipeline,
            self.body_size,
            self.jobs,
            self.threads
        )?;
        write!(
            out,
            "  {} jobs in {:.3} s: {:.0} jobs/s",
            self.jobs_done, self.elapsed_secs, self.ops_per_sec
        )?;
        match self.client_cpu_secs {
            Some(cpu) => writeln!(out, " (client used {cpu:.2} s of CPU)")?,
            None => writeln!(out)?,
        }
        let rows = [
            ("put", &self.put_latency_us),
            ("reserve", &self.reserve_latency_us),
            ("delete", &self.delete_latency_us),
            ("put->reserved", &self.end_to_end_latency_us),
        ];
        for (name, latency) in rows {
            if let Some(l) = latency {
                writeln!(
            out,
                    "  {name:<14} latency us: p50 {:>9.1}  p99 {:>9.1}  p99.9 {:>9.1}  max {:>10.1}  ({} requests)",
                    l.p50, l.p99, l.p999, l.max, l.count
                )?;
            }
        }
        if let (Some(not_reserved), Some(duplicated)) = (self.not_reserved, self.duplicated) {
            let lost = match self.lost {
                Some(lost) => format!("lost {lost}"),
                None => format!("not reserved by the time limit {not_reserved}"),
            };
            writeln!(
                out,
                "  exactly-once: {lost}, duplicated {duplicated}, foreign {}, delete NOT_FOUND {}",
                self.foreign, self.delete_not_found
            )?;
        }
        if !self.complete {
            let why = if self.time_limit_hit {
                "time limit hit"
            } else if !self.errors.is_empty() {
                "errors"
            } else {
                "not every job was done"
            };
            writeln!(out, "  INCOMPLETE ({why})")?;
        }
        for e in &self.errors {
            writeln!(out, "  error: {e}")?;
        }
        Ok(())
    }
}
