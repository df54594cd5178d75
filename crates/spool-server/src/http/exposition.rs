//! A writer of the Prometheus text exposition format, version 0.0.4.
//!
//! The format is small enough that a crate would add more than it saves:
//! `# HELP` and `# TYPE` lines per family, then one `name{labels} value`
//! line per sample. The only subtle parts are escaping (label values escape
//! `\`, `"` and newline; help text escapes `\` and newline) and histograms,
//! whose buckets are cumulative, carry an `le` label and end with `+Inf`,
//! followed by `_sum` and `_count`. This writer does both so callers cannot
//! get them wrong.

use std::fmt::Write;

/// The `Content-Type` of the text format this writer produces.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The kind of a metric family, as its `# TYPE` line names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl MetricKind {
    fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

/// A histogram's observations in the shape the text format needs.
#[derive(Debug, Clone, Copy)]
pub struct HistogramSample<'a> {
    /// Upper bounds of the finite buckets, ascending.
    pub upper_bounds: &'a [f64],
    /// Observations per finite bucket (not cumulative), as many as
    /// `upper_bounds`; observations above the last bound count only in
    /// `count`.
    pub bucket_counts: &'a [u64],
    /// Sum of all observations, in the metric's unit.
    pub sum: f64,
    /// Number of observations, the `+Inf` bucket included.
    pub count: u64,
}

/// Builds one exposition text.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines. Samples of the
    /// family must follow before the next family starts.
    pub fn family(&mut self, name: &str, kind: MetricKind, help: &str) {
        self.out.push_str("# HELP ");
        self.out.push_str(name);
        self.out.push(' ');
        escape_into(&mut self.out, help, false);
        self.out.push_str("\n# TYPE ");
        self.out.push_str(name);
        self.out.push(' ');
        self.out.push_str(kind.as_str());
        self.out.push('\n');
    }

    /// One sample line.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.sample_with_le(name, labels, None, value);
    }

    /// One sample of an integer value (counters and most gauges).
    pub fn sample_u64(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.line_head(name, labels, None);
        let _ = writeln!(self.out, " {value}");
    }

    /// A whole family holding one sample: the common case of a process-wide
    /// figure.
    pub fn single(&mut self, name: &str, kind: MetricKind, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// The `_bucket`, `_sum` and `_count` lines of one histogram series.
    /// Buckets are written cumulative, ending with `le="+Inf"` equal to the
    /// count.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], histogram: HistogramSample) {
        let bucket_name = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (bound, count) in histogram
            .upper_bounds
            .iter()
            .zip(histogram.bucket_counts.iter())
        {
            cumulative = cumulative.saturating_add(*count);
            // Callers pass copies (snapshots), never figures that change
            // while this runs; but should bucket counts add up to more than
            // `count`, the format would be broken (a finite bucket above
            // `+Inf`). Clamping keeps every bucket at or below `+Inf`, and
            // the buckets still never decrease.
            let shown = cumulative.min(histogram.count);
            self.line_head(&bucket_name, labels, Some(&format_value(*bound)));
            let _ = writeln!(self.out, " {shown}");
        }
        self.line_head(&bucket_name, labels, Some("+Inf"));
        let _ = writeln!(self.out, " {}", histogram.count);
        self.sample(&format!("{name}_sum"), labels, histogram.sum);
        self.sample_u64(&format!("{name}_count"), labels, histogram.count);
    }

    /// The text, ready to serve.
    pub fn finish(self) -> String {
        self.out
    }

    fn sample_with_le(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        le: Option<&str>,
        value: f64,
    ) {
        self.line_head(name, labels, le);
        self.out.push(' ');
        self.out.push_str(&format_value(value));
        self.out.push('\n');
    }

    fn line_head(&mut self, name: &str, labels: &[(&str, &str)], le: Option<&str>) {
        self.out.push_str(name);
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.out.push('{');
        let mut first = true;
        let le_pair = le.map(|value| ("le", value));
        for (key, value) in labels.iter().copied().chain(le_pair) {
            if !first {
                self.out.push(',');
            }
            first = false;
            self.out.push_str(key);
            self.out.push_str("=\"");
            escape_into(&mut self.out, value, true);
            self.out.push('"');
        }
        self.out.push('}');
    }
}

/// Appends `text` escaped for a label value (`quotes`) or help text.
fn escape_into(out: &mut String, text: &str, quotes: bool) {
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quotes => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// A sample value or bucket bound as the format spells it: Go float
/// syntax, with `+Inf`, `-Inf` and `NaN` for the special values.
pub fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_string()
    } else if value == f64::INFINITY {
        "+Inf".to_string()
    } else if value == f64::NEG_INFINITY {
        "-Inf".to_string()
    } else {
        // Rust's `Display` writes the shortest digits that round-trip, in
        // plain decimal and never with an exponent ("0.005", "3600",
        // "0.0000001" for 1e-7). Prometheus (Go's ParseFloat) reads that
        // back to the same float; very large or small values are merely
        // long.
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_lines_and_plain_samples() {
        let mut e = Exposition::new();
        e.family("spool_jobs_put_total", MetricKind::Counter, "Jobs put.");
        e.sample_u64("spool_jobs_put_total", &[("queue", "default")], 3);
        e.single("spool_uptime_seconds", MetricKind::Gauge, "Uptime.", 1.5);
        assert_eq!(
            e.finish(),
            "# HELP spool_jobs_put_total Jobs put.\n\
             # TYPE spool_jobs_put_total counter\n\
             spool_jobs_put_total{queue=\"default\"} 3\n\
             # HELP spool_uptime_seconds Uptime.\n\
             # TYPE spool_uptime_seconds gauge\n\
             spool_uptime_seconds 1.5\n"
        );
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut e = Exposition::new();
        e.family("m", MetricKind::Gauge, "a \\ b\nc \"q\"");
        e.sample_u64("m", &[("queue", "x\"y\\z\nw"), ("state", "ready")], 1);
        assert_eq!(
            e.finish(),
            "# HELP m a \\\\ b\\nc \"q\"\n\
             # TYPE m gauge\n\
             m{queue=\"x\\\"y\\\\z\\nw\",state=\"ready\"} 1\n"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_inf() {
        let mut e = Exposition::new();
        e.histogram(
            "h_seconds",
            &[("queue", "q")],
            HistogramSample {
                upper_bounds: &[0.005, 0.5, 10.0],
                bucket_counts: &[1, 0, 2],
                sum: 12.25,
                count: 4,
            },
        );
        assert_eq!(
            e.finish(),
            "h_seconds_bucket{queue=\"q\",le=\"0.005\"} 1\n\
             h_seconds_bucket{queue=\"q\",le=\"0.5\"} 1\n\
             h_seconds_bucket{queue=\"q\",le=\"10\"} 3\n\
             h_seconds_bucket{queue=\"q\",le=\"+Inf\"} 4\n\
             h_seconds_sum{queue=\"q\"} 12.25\n\
             h_seconds_count{queue=\"q\"} 4\n"
        );
    }

    #[test]
    fn histogram_without_labels_and_clamped_buckets() {
        let mut e = Exposition::new();
        // Bucket counts that add up to more than the count (a caller's
        // inconsistent figures): no bucket is shown above it.
        e.histogram(
            "h",
            &[],
            HistogramSample {
                upper_bounds: &[1.0, 2.0],
                bucket_counts: &[2, 3],
                sum: 4.0,
                count: 3,
            },
        );
        assert_eq!(
            e.finish(),
            "h_bucket{le=\"1\"} 2\nh_bucket{le=\"2\"} 3\nh_bucket{le=\"+Inf\"} 3\nh_sum 4\nh_count 3\n"
        );
    }

    #[test]
    fn special_values() {
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(0.001), "0.001");
        assert_eq!(format_value(3600.0), "3600");
        assert_eq!(format_value(1e-7), "0.0000001");
        assert_eq!(format_value(1e-7).parse::<f64>(), Ok(1e-7));
    }
}
