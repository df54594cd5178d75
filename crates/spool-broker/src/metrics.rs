//! Fixed-bucket histograms for the operating surface (DESIGN.md §4).
//!
//! The engine observes how long jobs wait, run and are late; the log
//! observes fsync latency and commit batch sizes. Each [`Histogram`] counts
//! observations into a fixed set of buckets chosen for what it measures, so
//! an observation costs a short scan and no allocation, and the Prometheus
//! adapter can print them as they are. Quantiles are approximate: they interpolate inside the
//! bucket where the rank falls, as Prometheus' `histogram_quantile` does.

const NS_PER_SEC: f64 = 1e9;

/// Upper bounds, in seconds, of the buckets of job latencies (wait, run,
/// schedule skew): from 1 ms, below which a queue's latency does not matter
/// to anyone, to 1 h, beyond which "very late" is all an operator needs to
/// know. Roughly 1-2.5-5 per decade so that p99 is read to within a factor
/// of 2.5.
pub const QUEUE_LATENCY_BUCKETS_SECONDS: [f64; 20] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// Upper bounds, in seconds, of the buckets of timer lateness (a delayed
/// job's due → ready, a schedule's due → fired): the job-latency buckets
/// with four more below 1 ms, where a timer that keeps its promise lands
/// (a superset, so a series of an older release keeps its `le` values).
pub const SKEW_BUCKETS_SECONDS: [f64; 24] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// Upper bounds, in seconds, of the buckets of disk latencies (fsync): an
/// fsync on a fast SSD takes tens of microseconds, a stalled disk seconds.
pub const IO_LATENCY_BUCKETS_SECONDS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// Upper bounds of the buckets of log commit sizes, in records: powers of
/// two up to a few rounds' worth of a busy server (a round handles at most
/// 4096 messages, each of which may carry many requests).
pub const COMMIT_BATCH_BUCKETS_RECORDS: [f64; 15] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
    16384.0,
];

/// What a histogram measures, which decides its buckets and its unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Buckets {
    /// Job latencies; observed in nanoseconds, reported in seconds.
    QueueLatency,
    /// Timer lateness; observed in nanoseconds, reported in seconds.
    Skew,
    /// Disk latencies; observed in nanoseconds, reported in seconds.
    IoLatency,
    /// Counts of records; observed and reported in records.
    CommitBatch,
}

impl Buckets {
    /// Upper bounds of the finite buckets, ascending, in the reported unit.
    /// A last bucket above them (`+Inf`) is implied.
    pub fn bounds(self) -> &'static [f64] {
        match self {
            Buckets::QueueLatency => &QUEUE_LATENCY_BUCKETS_SECONDS,
            Buckets::Skew => &SKEW_BUCKETS_SECONDS,
            Buckets::IoLatency => &IO_LATENCY_BUCKETS_SECONDS,
            Buckets::CommitBatch => &COMMIT_BATCH_BUCKETS_RECORDS,
        }
    }

    /// Observed units per reported unit: nanoseconds per second for the
    /// latencies, 1 for counts.
    fn observed_per_reported(self) -> f64 {
        match self {
            Buckets::QueueLatency | Buckets::Skew | Buckets::IoLatency => NS_PER_SEC,
            Buckets::CommitBatch => 1.0,
        }
    }
}

/// A fixed-bucket histogram. See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Histogram {
    buckets: Buckets,
    /// Observations per bucket (not cumulative); one more than the bounds:
    /// the last counts what exceeded every bound.
    counts: Vec<u64>,
    count: u64,
    /// Sum of the observations in the observed unit (nanoseconds for the
    /// latencies), saturating.
    sum_observed: u64,
    /// The largest observation, in the observed unit (0 before any): the
    /// tail the buckets cannot show.
    max_observed: u64,
}

impl Histogram {
    pub fn new(buckets: Buckets) -> Histogram {
        Histogram {
            buckets,
            counts: vec![0; buckets.bounds().len() + 1],
            count: 0,
            sum_observed: 0,
            max_observed: 0,
        }
    }

    /// A histogram of job latencies ([`QUEUE_LATENCY_BUCKETS_SECONDS`]).
    pub fn queue_latency() -> Histogram {
        Histogram::new(Buckets::QueueLatency)
    }

    /// A histogram of timer lateness ([`SKEW_BUCKETS_SECONDS`]).
    pub fn skew() -> Histogram {
        Histogram::new(Buckets::Skew)
    }

    /// Counts one duration, for the latency kinds.
    pub fn observe_ns(&mut self, ns: u64) {
        self.observe(ns);
    }

    /// Counts one count, for [`Buckets::CommitBatch`].
    pub fn observe_records(&mut self, records: u64) {
        self.observe(records);
    }

    fn observe(&mut self, observed: u64) {
        let value = observed as f64 / self.buckets.observed_per_reported();
        // Prometheus buckets are upper-inclusive (`le`).
        let bucket = self
            .buckets
            .bounds()
            .iter()
            .position(|&bound| value <= bound)
            .unwrap_or(self.buckets.bounds().len());
        self.counts[bucket] += 1;
        self.count += 1;
        self.sum_observed = self.sum_observed.saturating_add(observed);
        self.max_observed = self.max_observed.max(observed);
    }

    /// The largest observation in the reported unit; `None` before any.
    pub fn max(&self) -> Option<f64> {
        (self.count > 0).then(|| self.max_observed as f64 / self.buckets.observed_per_reported())
    }

    /// Upper bounds of the finite buckets, in the reported unit.
    pub fn bounds(&self) -> &'static [f64] {
        self.buckets.bounds()
    }

    /// Observations per bucket (not cumulative), one more than
    /// [`Histogram::bounds`]: the last is the `+Inf` bucket.
    pub fn bucket_counts(&self) -> &[u64] {
        &self.counts
    }

    /// `(upper bound, observations at or below it)` for every finite
    /// bucket, as Prometheus' `_bucket{le}` lines want them; the `+Inf`
    /// line is [`Histogram::count`].
    pub fn cumulative(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        let mut below = 0;
        self.bounds()
            .iter()
            .zip(&self.counts)
            .map(move |(&bound, &count)| {
                below += count;
                (bound, below)
            })
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sum of the observations in the observed unit: nanoseconds for the
    /// latencies, records for batch sizes.
    pub fn sum_observed(&self) -> u64 {
        self.sum_observed
    }

    /// Sum of the observations in the reported unit (seconds or records),
    /// as Prometheus' `_sum` wants it.
    pub fn sum(&self) -> f64 {
        self.sum_observed as f64 / self.buckets.observed_per_reported()
    }

    /// Approximate `q`-quantile (0 ≤ q ≤ 1) in the reported unit (seconds
    /// for latencies): the rank's position is interpolated linearly within
    /// its bucket. A rank in the `+Inf` bucket gets the largest finite
    /// bound, as Prometheus answers. `None` without observations or for a
    /// `q` outside [0, 1].
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let bounds = self.bounds();
        let rank = q * self.count as f64;
        let mut below = 0u64;
        for (index, &count) in self.counts.iter().enumerate() {
            let through = below + count;
            if count > 0 && through as f64 >= rank {
                let Some(&upper) = bounds.get(index) else {
                    return bounds.last().copied();
                };
                let lower = if index == 0 { 0.0 } else { bounds[index - 1] };
                let into_bucket = (rank - below as f64) / count as f64;
                return Some(lower + (upper - lower) * into_bucket.clamp(0.0, 1.0));
            }
            below = through;
        }
        bounds.last().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn bounds_ascend() {
        for kind in [
            Buckets::QueueLatency,
            Buckets::IoLatency,
            Buckets::CommitBatch,
        ] {
            let bounds = kind.bounds();
            assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{kind:?}");
        }
        assert_eq!(QUEUE_LATENCY_BUCKETS_SECONDS[0], 0.001);
        assert_eq!(QUEUE_LATENCY_BUCKETS_SECONDS[19], 3600.0);
    }

    #[test]
    fn observations_land_in_upper_inclusive_buckets() {
        let mut h = Histogram::queue_latency();
        h.observe_ns(0); // bucket 0 (≤ 1 ms)
        h.observe_ns(MS); // exactly 1 ms: still bucket 0
        h.observe_ns(MS + 1); // bucket 1 (≤ 2.5 ms)
        h.observe_ns(7_200 * 1_000 * MS); // 2 h: +Inf
        let counts = h.bucket_counts();
        assert_eq!(counts.len(), QUEUE_LATENCY_BUCKETS_SECONDS.len() + 1);
        assert_eq!(counts[0], 2);
        assert_eq!(counts[1], 1);
        assert_eq!(counts[QUEUE_LATENCY_BUCKETS_SECONDS.len()], 1);
        assert_eq!(counts.iter().sum::<u64>(), 4);
        assert_eq!(h.count(), 4);
        assert_eq!(h.sum_observed(), 2 * MS + 1 + 7_200 * 1_000 * MS);
        assert!((h.sum() - (0.002_000_001 + 7_200.0)).abs() < 1e-6);
        let cumulative: Vec<(f64, u64)> = h.cumulative().collect();
        assert_eq!(cumulative.len(), QUEUE_LATENCY_BUCKETS_SECONDS.len());
        assert_eq!(cumulative[0], (0.001, 2));
        assert_eq!(cumulative[1], (0.0025, 3));
        assert_eq!(cumulative.last(), Some(&(3600.0, 3)));
    }

    #[test]
    fn skew_buckets_resolve_below_a_millisecond_and_keep_the_max() {
        let mut h = Histogram::skew();
        assert_eq!(h.max(), None);
        h.observe_ns(40_000); // 40 µs
        h.observe_ns(300_000); // 300 µs
        h.observe_ns(7 * MS);
        let counts = h.bucket_counts();
        assert_eq!((counts[0], counts[3]), (1, 1), "{counts:?}");
        assert_eq!(h.max(), Some(0.007));
        assert!(h.quantile(0.5).unwrap() < 0.001);
        // A superset of the job-latency bounds: old series keep their `le`.
        for bound in QUEUE_LATENCY_BUCKETS_SECONDS {
            assert!(SKEW_BUCKETS_SECONDS.contains(&bound), "{bound}");
        }
    }

    #[test]
    fn quantile_interpolates_within_the_bucket() {
        let mut h = Histogram::queue_latency();
        assert_eq!(h.quantile(0.5), None);
        // 100 observations in (1 s, 2.5 s].
        for _ in 0..100 {
            h.observe_ns(2_000 * MS);
        }
        assert_eq!(h.quantile(0.0), Some(1.0));
        assert_eq!(h.quantile(1.0), Some(2.5));
        let p50 = h.quantile(0.5).unwrap();
        assert!((p50 - 1.75).abs() < 1e-9, "{p50}");
        assert_eq!(h.quantile(1.5), None);
        assert_eq!(h.quantile(-0.1), None);
    }

    #[test]
    fn quantile_finds_the_bucket_of_the_rank() {
        let mut h = Histogram::queue_latency();
        for _ in 0..99 {
            h.observe_ns(MS / 2); // ≤ 1 ms
        }
        h.observe_ns(45_000 * MS); // (30 s, 60 s]
        let p50 = h.quantile(0.5).unwrap();
        assert!(p50 <= 0.001, "{p50}");
        // The rank 99.5 of 100 falls in the slow observation's bucket.
        let p995 = h.quantile(0.995).unwrap();
        assert!((30.0..=60.0).contains(&p995), "{p995}");
    }

    #[test]
    fn quantile_in_the_overflow_bucket_is_the_largest_bound() {
        let mut h = Histogram::new(Buckets::CommitBatch);
        h.observe_records(1_000_000);
        assert_eq!(h.quantile(0.99), Some(16384.0));
    }

    #[test]
    fn batch_sizes_are_counted_in_records() {
        let mut h = Histogram::new(Buckets::CommitBatch);
        h.observe_records(1);
        h.observe_records(3);
        h.observe_records(4);
        assert_eq!(&h.bucket_counts()[..4], &[1, 0, 2, 0]);
        assert_eq!(h.sum(), 8.0);
        assert_eq!(h.sum_observed(), 8);
    }
}
