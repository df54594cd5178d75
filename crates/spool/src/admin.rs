//! `spool stats`, `spool conns` and `spool top`: clients of the server's
//! HTTP admin endpoints, the way gops is for Go processes.
//!
//! Each verb fetches `/admin/stats` or `/admin/connections` (see
//! `client.rs`) and prints aligned tables, or the server's JSON as is with
//! `--json` for scripts. The tables here serve the job verbs too.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::client::{Client, ServerArgs};
use spool_server::limits::ADMIN_CONNECTIONS_PAGE_MAX;

/// How often `spool top` refreshes.
const TOP_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// Clears a terminal and moves the cursor home (ANSI).
const CLEAR_SCREEN: &str = "\x1b[2J\x1b[H";

#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    #[command(flatten)]
    server: ServerArgs,

    /// Print the server's JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct TopArgs {
    #[command(flatten)]
    server: ServerArgs,

    /// Stop after this many refreshes [default: until interrupted]
    #[arg(long, value_name = "N")]
    iterations: Option<u64>,
}

/// `spool stats`.
pub fn stats(args: StatsArgs) -> anyhow::Result<()> {
    let stats = Client::new(&args.server)?.get("/admin/stats")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
    } else {
        print!("{}", render_stats(&stats));
    }
    Ok(())
}

/// `spool conns`.
pub fn conns(args: StatsArgs) -> anyhow::Result<()> {
    let conns = all_connections(&Client::new(&args.server)?)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&conns)?);
    } else {
        print!("{}", render_connections(&conns));
    }
    Ok(())
}

/// Every page of `/admin/connections`, as one list: the server answers a
/// page at a time (`next`: the `after` of the next page; a server from
/// before paging answers all at once, without it).
fn all_connections(client: &Client) -> anyhow::Result<Value> {
    let mut all = Vec::new();
    let mut path = format!("/admin/connections?limit={ADMIN_CONNECTIONS_PAGE_MAX}");
    loop {
        let mut page = client.get(&path)?;
        if let Some(Value::Array(list)) = page.get_mut("connections").map(Value::take) {
            all.extend(list);
        }
        // Ids only grow, so following `next` ends.
        match page.get("next").and_then(Value::as_u64) {
            Some(next) => {
                path =
                    format!("/admin/connections?limit={ADMIN_CONNECTIONS_PAGE_MAX}&after={next}");
            }
            None => return Ok(serde_json::json!({ "connections": all })),
        }
    }
}

/// `spool top`.
pub fn top(args: TopArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.server)?;
    let clear = std::io::stdout().is_terminal();
    let mut previous: Option<(Instant, Value)> = None;
    let mut done = 0u64;
    while args.iterations.is_none_or(|n| done < n) {
        if done > 0 {
            std::thread::sleep(TOP_REFRESH_INTERVAL);
        }
        let stats = client.get("/admin/stats")?;
        let now = Instant::now();
        let rates = previous
            .as_ref()
            .map(|(then, old)| (now.duration_since(*then).as_secs_f64(), old));
        let screen = render_top(&stats, rates);
        let mut out = std::io::stdout().lock();
        if clear {
            out.write_all(CLEAR_SCREEN.as_bytes())?;
        }
        out.write_all(screen.as_bytes())?;
        out.flush()?;
        previous = Some((now, stats));
        done += 1;
    }
    Ok(())
}

/// How a column lines up: text to the left, numbers to the right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Align {
    Left,
    Right,
}

/// Aligned columns two spaces apart, under a header row.
pub(crate) fn render_table(columns: &[(&str, Align)], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = columns.iter().map(|(h, _)| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = columns.iter().map(|(h, _)| h.to_string()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, ((cell, width), (_, align))) in row.iter().zip(&widths).zip(columns).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = " ".repeat(width.saturating_sub(cell.chars().count()));
            match align {
                Align::Left => {
                    line.push_str(cell);
                    line.push_str(&pad);
                }
                Align::Right => {
                    line.push_str(&pad);
                    line.push_str(cell);
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub(crate) fn num(value: &Value, pointer: &str) -> String {
    match value.pointer(pointer) {
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::String(s)) => s.clone(),
        _ => "-".to_string(),
    }
}

fn as_f64(value: &Value, pointer: &str) -> Option<f64> {
    value.pointer(pointer).and_then(Value::as_f64)
}

/// 1536 → "1.5 KiB".
fn bytes_text(bytes: Option<f64>) -> String {
    let Some(mut value) = bytes else {
        return "-".to_string();
    };
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if value < 1024.0 {
            return if unit == "B" {
                format!("{value:.0} {unit}")
            } else {
                format!("{value:.1} {unit}")
            };
        }
        value /= 1024.0;
    }
    format!("{value:.1} TiB")
}

/// Seconds as "45ms", "12.3s", "4m05s", "2h03m", "3d04h".
fn duration_text(seconds: Option<f64>) -> String {
    let Some(seconds) = seconds else {
        return "-".to_string();
    };
    if seconds < 1.0 {
        return format!("{:.0}ms", seconds * 1000.0);
    }
    if seconds < 60.0 {
        return format!("{seconds:.1}s");
    }
    let whole = seconds as u64;
    match whole {
        0..3600 => format!("{}m{:02}s", whole / 60, whole % 60),
        3600..86400 => format!("{}h{:02}m", whole / 3600, (whole % 3600) / 60),
        _ => format!("{}d{:02}h", whole / 86400, (whole % 86400) / 3600),
    }
}

/// "beanstalk 3, http 1" from a `{protocol: count}` object.
fn per_protocol(value: Option<&Value>) -> String {
    let Some(Value::Object(map)) = value else {
        return "-".to_string();
    };
    let parts: Vec<String> = map.iter().map(|(k, v)| format!("{k} {v}")).collect();
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join(", ")
    }
}

fn header_lines(stats: &Value) -> String {
    let ready = match stats.get("not_ready_reason").and_then(Value::as_str) {
        Some(reason) => format!("not ready ({reason})"),
        None => "ready".to_string(),
    };
    let mut out = format!(
        "spool {}  pid {}  up {}  {}\n",
        num(stats, "/version"),
        num(stats, "/pid"),
        duration_text(as_f64(stats, "/uptime_seconds")),
        ready
    );
    out.push_str(&format!(
        "process     fds {}/{}  threads {}  tasks {}  rss {}  cpu {}\n",
        num(stats, "/process/open_fds"),
        num(stats, "/process/max_fds"),
        num(stats, "/process/threads"),
        // The data path's tasks (connections, the engine) when known.
        match stats.pointer("/runtime/data/alive_tasks") {
            Some(_) => num(stats, "/runtime/data/alive_tasks"),
            None => num(stats, "/runtime/http/alive_tasks"),
        },
        bytes_text(as_f64(stats, "/process/resident_memory_bytes")),
        duration_text(as_f64(stats, "/process/cpu_seconds")),
    ));
    out.push_str(&format!(
        "connections {}\n",
        per_protocol(stats.pointer("/connections/active"))
    ));
    match stats.get("wal") {
        Some(wal) if !wal.is_null() => out.push_str(&format!(
            "wal         {} in {} segments  {} commits  {} fsyncs  {} compactions{}\n",
            bytes_text(as_f64(wal, "/log_bytes")),
            num(wal, "/segments"),
            num(wal, "/commits"),
            num(wal, "/fsyncs"),
            num(wal, "/compactions"),
            match wal.get("failed").and_then(Value::as_str) {
                Some(error) => format!("  FAILED: {error}"),
                None => String::new(),
            }
        )),
        _ => out.push_str("wal         none (in memory)\n"),
    }
    out.push_str(&format!("jobs        {}\n", num(stats, "/jobs")));
    out
}

fn queues(stats: &Value) -> &[Value] {
    stats
        .get("queues")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn render_stats(stats: &Value) -> String {
    let mut out = header_lines(stats);
    out.push('\n');
    let rows: Vec<Vec<String>> = queues(stats)
        .iter()
        .map(|q| {
            vec![
                num(q, "/name"),
                num(q, "/ready"),
                num(q, "/reserved"),
                num(q, "/delayed"),
                num(q, "/buried"),
                num(q, "/waiting_reservers"),
                num(q, "/counters/put"),
                num(q, "/counters/reserved"),
                num(q, "/counters/deleted"),
                num(q, "/counters/timed_out"),
                duration_text(as_f64(q, "/wait_p99_seconds")),
                duration_text(as_f64(q, "/skew_p99_seconds")),
                num(q, "/policy/max_jobs"),
                num(q, "/policy/concurrency"),
                num(q, "/policy/rate_per_s"),
                num(q, "/policy/max_attempts"),
                duration_text(as_f64(q, "/policy/ttr_ms").map(|ms| ms / 1000.0)),
                retention_text(q),
            ]
        })
        .collect();
    // Policy columns show "-" where the queue keeps the default.
    out.push_str(&render_table(
        &[
            ("QUEUE", Align::Left),
            ("READY", Align::Right),
            ("RESERVED", Align::Right),
            ("DELAYED", Align::Right),
            ("BURIED", Align::Right),
            ("WAITING", Align::Right),
            ("PUTS", Align::Right),
            ("RESERVES", Align::Right),
            ("DELETES", Align::Right),
            ("TIMEOUTS", Align::Right),
            ("WAIT P99", Align::Right),
            ("SKEW P99", Align::Right),
            ("MAX JOBS", Align::Right),
            ("CONCURRENCY", Align::Right),
            ("RATE/S", Align::Right),
            ("ATTEMPTS", Align::Right),
            ("TTR", Align::Right),
            ("RETENTION", Align::Right),
        ],
        &rows,
    ));
    out.push_str(&schedules_section(stats));
    out
}

/// The schedules of `/admin/stats` as a table under the queues; nothing
/// when there are none.
fn schedules_section(stats: &Value) -> String {
    let Some(list) = stats
        .get("schedules")
        .and_then(Value::as_array)
        .filter(|l| !l.is_empty())
    else {
        return String::new();
    };
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                num(s, "/name"),
                num(s, "/queue"),
                num(s, "/next_fire_at"),
                num(s, "/last_fire_at"),
                duration_text(as_f64(s, "/last_skew_ms").map(|ms| ms / 1000.0)),
                duration_text(as_f64(s, "/fire_skew_p99_seconds")),
                num(s, "/fires"),
                num(s, "/misfires_skipped"),
                num(s, "/backlog_skips"),
                num(s, "/paused"),
            ]
        })
        .collect();
    let mut out = String::from("\n");
    out.push_str(&render_table(
        &[
            ("SCHEDULE", Align::Left),
            ("QUEUE", Align::Left),
            ("NEXT FIRE", Align::Left),
            ("LAST FIRE", Align::Left),
            ("LAST SKEW", Align::Right),
            ("SKEW P99", Align::Right),
            ("FIRES", Align::Right),
            ("MISFIRES", Align::Right),
            ("BACKLOG SKIPS", Align::Right),
            ("PAUSED", Align::Left),
        ],
        &rows,
    ));
    out
}

/// A queue's retention as "age/count" ("1h00m/500"), "-" for a default.
fn retention_text(queue: &Value) -> String {
    let age = duration_text(as_f64(queue, "/policy/retention_ms").map(|ms| ms / 1000.0));
    let count = num(queue, "/policy/retention_max_jobs");
    if age == "-" && count == "-" {
        "-".to_string()
    } else {
        format!("{age}/{count}")
    }
}

fn render_connections(conns: &Value) -> String {
    let list = conns
        .get("connections")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|c| {
            let session = c.get("session").filter(|s| !s.is_null());
            let watched = session
                .and_then(|s| s.get("watched"))
                .and_then(Value::as_array)
                .map(|tubes| {
                    tubes
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_else(|| "-".to_string());
            let reserved = session
                .and_then(|s| s.get("reserved_job_ids"))
                .and_then(Value::as_array)
                .map(|ids| {
                    let shown: Vec<String> = ids.iter().map(Value::to_string).collect();
                    let total = session
                        .and_then(|s| s.get("reserved_count"))
                        .and_then(Value::as_u64)
                        .unwrap_or(ids.len() as u64);
                    match (shown.is_empty(), total as usize > shown.len()) {
                        (true, _) => "-".to_string(),
                        (false, false) => shown.join(","),
                        (false, true) => {
                            format!("{} (+{})", shown.join(","), total as usize - shown.len())
                        }
                    }
                })
                .unwrap_or_else(|| "-".to_string());
            vec![
                num(c, "/id"),
                num(c, "/protocol"),
                num(c, "/peer"),
                duration_text(as_f64(c, "/age_seconds")),
                num(c, "/state"),
                num(c, "/command"),
                bytes_text(as_f64(c, "/bytes_in")),
                bytes_text(as_f64(c, "/bytes_out")),
                session.map_or("-".to_string(), |s| num(s, "/tube_used")),
                watched,
                reserved,
                duration_text(session.and_then(|s| as_f64(s, "/blocked_in_reserve_seconds"))),
            ]
        })
        .collect();
    render_table(
        &[
            ("ID", Align::Left),
            ("PROTO", Align::Left),
            ("PEER", Align::Left),
            ("AGE", Align::Right),
            ("STATE", Align::Left),
            ("COMMAND", Align::Left),
            ("IN", Align::Right),
            ("OUT", Align::Right),
            ("TUBE", Align::Left),
            ("WATCHED", Align::Left),
            ("RESERVED", Align::Left),
            ("BLOCKED", Align::Right),
        ],
        &rows,
    )
}

/// Counter values per queue name, for rates between two polls.
fn counters_by_queue(stats: &Value, counter: &str) -> HashMap<String, f64> {
    queues(stats)
        .iter()
        .filter_map(|q| {
            let name = q.get("name")?.as_str()?.to_string();
            let value = q.pointer(&format!("/counters/{counter}"))?.as_f64()?;
            Some((name, value))
        })
        .collect()
}

/// Per-second rates of one counter between two polls.
#[derive(Debug)]
struct CounterRate {
    now: HashMap<String, f64>,
    then: HashMap<String, f64>,
    seconds: f64,
}

impl CounterRate {
    /// The rate of `queue`, or `-` when either poll lacks it: a queue new
    /// since the last poll may be a freed tube come back, whose counters
    /// the server retained, and counting them from zero would show a
    /// spike that never happened.
    fn text(&self, queue: &str) -> String {
        let (Some(now), Some(then)) = (self.now.get(queue), self.then.get(queue)) else {
            return "-".to_string();
        };
        // A counter cannot fall; a restarted server can.
        format!("{:.1}", (now - then).max(0.0) / self.seconds)
    }
}

/// One `spool top` screen; `previous` is (seconds since, stats then).
fn render_top(stats: &Value, previous: Option<(f64, &Value)>) -> String {
    let mut out = header_lines(stats);
    out.push('\n');
    let rates: Vec<Option<CounterRate>> = ["put", "reserved", "deleted"]
        .iter()
        .map(|counter| {
            let (seconds, old) = previous?;
            (seconds > 0.0).then(|| CounterRate {
                now: counters_by_queue(stats, counter),
                then: counters_by_queue(old, counter),
                seconds,
            })
        })
        .collect();
    let rows: Vec<Vec<String>> = queues(stats)
        .iter()
        .map(|q| {
            let name = num(q, "/name");
            let mut row = vec![name.clone()];
            for rate in &rates {
                row.push(match rate {
                    Some(rate) => rate.text(&name),
                    None => "-".to_string(),
                });
            }
            row.extend([
                num(q, "/ready"),
                num(q, "/reserved"),
                num(q, "/delayed"),
                num(q, "/buried"),
                duration_text(as_f64(q, "/wait_p99_seconds")),
            ]);
            row
        })
        .collect();
    out.push_str(&render_table(
        &[
            ("QUEUE", Align::Left),
            ("PUT/S", Align::Right),
            ("RESERVE/S", Align::Right),
            ("DELETE/S", Align::Right),
            ("READY", Align::Right),
            ("RESERVED", Align::Right),
            ("DELAYED", Align::Right),
            ("BURIED", Align::Right),
            ("WAIT P99", Align::Right),
        ],
        &rows,
    ));
    out.push_str(&schedules_section(stats));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn table_columns_align() {
        let table = render_table(
            &[("QUEUE", Align::Left), ("READY", Align::Right)],
            &[
                vec!["default".to_string(), "3".to_string()],
                vec!["q".to_string(), "12345".to_string()],
            ],
        );
        assert_eq!(table, "QUEUE    READY\ndefault      3\nq        12345\n");
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(duration_text(Some(0.0123)), "12ms");
        assert_eq!(duration_text(Some(12.34)), "12.3s");
        assert_eq!(duration_text(Some(245.0)), "4m05s");
        assert_eq!(duration_text(Some(7380.0)), "2h03m");
        assert_eq!(duration_text(None), "-");
        assert_eq!(bytes_text(Some(512.0)), "512 B");
        assert_eq!(bytes_text(Some(1536.0)), "1.5 KiB");
    }

    #[test]
    fn stats_and_top_show_schedules() {
        let stats = json!({"queues": [], "schedules": [
            {"name": "nightly", "queue": "reports", "paused": false,
             "next_fire_at": "2026-12-05T01:30:00Z", "last_fire_at": "2026-12-04T01:30:00Z",
             "last_skew_ms": 12, "fires": 3, "misfires_skipped": 1, "backlog_skips": 0,
             "fire_skew_p99_seconds": 0.0123},
        ]});
        for screen in [render_stats(&stats), render_top(&stats, None)] {
            let row = screen
                .lines()
                .find(|l| l.starts_with("nightly "))
                .unwrap_or_else(|| panic!("a row for the schedule in {screen}"));
            let cells: Vec<&str> = row.split_whitespace().collect();
            assert_eq!(
                cells,
                [
                    "nightly",
                    "reports",
                    "2026-12-05T01:30:00Z",
                    "2026-12-04T01:30:00Z",
                    "12ms",
                    "12ms",
                    "3",
                    "1",
                    "0",
                    "false"
                ]
            );
        }
        assert!(!render_stats(&json!({"queues": []})).contains("SCHEDULE"));
    }

    #[test]
    fn stats_show_each_queues_policy() {
        let stats = json!({"queues": [
            {"name": "limited", "ready": 2, "policy": {
                "max_jobs": 100, "concurrency": 4, "rate_per_s": 2.5, "max_attempts": 3,
                "ttr_ms": 30000, "retention_ms": 3600000, "retention_max_jobs": 500,
                "backoff": null}},
            {"name": "plain", "ready": 0, "policy": {
                "max_jobs": null, "concurrency": null, "rate_per_s": null,
                "max_attempts": null, "ttr_ms": null, "retention_ms": null,
                "retention_max_jobs": null, "backoff": null}},
        ]});
        let screen = render_stats(&stats);
        let header = screen
            .lines()
            .find(|l| l.starts_with("QUEUE"))
            .expect("a header");
        for column in [
            "MAX JOBS",
            "CONCURRENCY",
            "RATE/S",
            "ATTEMPTS",
            "TTR",
            "RETENTION",
        ] {
            assert!(header.contains(column), "{header}");
        }
        let cells = |queue: &str| -> Vec<String> {
            let row = screen
                .lines()
                .find(|l| l.starts_with(&format!("{queue} ")))
                .unwrap_or_else(|| panic!("a row for {queue} in {screen}"));
            row.split_whitespace().map(str::to_string).collect()
        };
        assert_eq!(
            cells("limited")[12..],
            ["100", "4", "2.5", "3", "30.0s", "1h00m/500"]
        );
        assert_eq!(cells("plain")[12..], ["-", "-", "-", "-", "-", "-"]);
    }

    #[test]
    fn top_rates_from_counter_deltas() {
        let old = json!({"queues": [{"name": "q", "counters": {"put": 10, "reserved": 0, "deleted": 0}}]});
        let new = json!({"queues": [{"name": "q", "ready": 5, "counters": {"put": 30, "reserved": 4, "deleted": 2}}]});
        let screen = render_top(&new, Some((2.0, &old)));
        let row = screen
            .lines()
            .find(|l| l.starts_with("q "))
            .expect("a row for q");
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(&cells[..5], ["q", "10.0", "2.0", "1.0", "5"]);
        let first = render_top(&new, None);
        assert!(first
            .lines()
            .any(|l| l.starts_with("q ") && l.contains(" - ")));
    }

    #[test]
    fn top_shows_no_rate_for_a_queue_absent_from_the_previous_poll() {
        let old = json!({"queues": [{"name": "q", "counters": {"put": 10, "reserved": 0, "deleted": 0}}]});
        // "back" reappears with the counters the server retained for it.
        let new = json!({"queues": [
            {"name": "q", "counters": {"put": 12, "reserved": 0, "deleted": 0}},
            {"name": "back", "ready": 1, "counters": {"put": 5000, "reserved": 4000, "deleted": 3000}},
        ]});
        let screen = render_top(&new, Some((1.0, &old)));
        let cells = |queue: &str| -> Vec<String> {
            let row = screen
                .lines()
                .find(|l| l.starts_with(&format!("{queue} ")))
                .unwrap_or_else(|| panic!("a row for {queue} in {screen}"));
            row.split_whitespace().map(str::to_string).collect()
        };
        assert_eq!(cells("back")[..5], ["back", "-", "-", "-", "1"]);
        assert_eq!(cells("q")[1], "2.0");
    }
}
