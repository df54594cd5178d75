//! Schedules' semantics, sans I/O, shared by every broker (the engine and
//! the PostgreSQL broker) so that a rule fires at the same instants with
//! the same misfire handling everywhere.
//!
//! - [`check_spec`] validates a [`ScheduleSpec`] and returns its [`Rule`];
//! - [`Rule::next_after`] is the next due instant strictly after a time;
//! - [`plan`] decides, at `now`, which due instants to fire, how many the
//!   misfire policy drops, and the next due instant;
//! - [`jitter_ms`] and [`firing_job`] make the job of one firing.
//!
//! Times are wall-clock milliseconds since the Unix epoch. Cron rules have
//! second precision and are evaluated in the spec's IANA time zone (the tz
//! database is compiled in). Daylight saving, as croner implements it: a
//! fixed local time that does not exist (spring forward) fires at the first
//! instant after the gap on that day; an ambiguous one (fall back) fires
//! once, at its first occurrence; rules with a wildcard or step in the
//! second, minute or hour field follow real time (no firing inside a gap,
//! each real occurrence inside an overlap).

use std::collections::VecDeque;
use std::fmt;

use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};
use spool_broker::schedule::{firing_key, HEADER_SCHEDULE, HEADER_SCHEDULED_AT};
use spool_broker::{BrokerError, Misfire, NewJob, RunAt, ScheduleSpec};

use crate::{limits, validate};

/// A due instant this much (or less) in the past is on time: it fires
/// under every misfire policy. Older ones are misfires (the server was
/// down or stalled).
pub const MISFIRE_GRACE_MS: u64 = 1_000;
/// The most instants `catch_up_max` may ask for at once.
pub const CATCH_UP_MAX_LIMIT: u32 = 10_000;
/// The default of `catch_up_max` (API.md).
pub const CATCH_UP_MAX_DEFAULT: u32 = 100;
/// The longest `jitter_ms`: a day.
pub const JITTER_MS_MAX: u64 = 86_400_000;
/// The shortest `@every` period. Cron rules have second precision too.
pub const EVERY_MS_MIN: u64 = 1_000;
/// The longest `@every` period: about a year and a bit.
pub const EVERY_MS_MAX: u64 = 400 * 86_400_000;
/// Missed cron instants counted one by one in one plan; past this many the
/// rest are not counted (a rule firing every second, down for a month,
/// would take seconds to count). `@every` rules are counted exactly.
pub const MISSED_SCAN_MAX: u64 = 100_000;

/// The longest cron text and time zone name accepted (the log stores
/// them with a 16-bit length).
pub const CRON_MAX_BYTES: usize = 256;

/// A validated rule: when a schedule falls due.
#[derive(Clone)]
pub struct Rule {
    kind: RuleKind,
}

#[derive(Clone)]
enum RuleKind {
    /// Instants at whole multiples of the period since the Unix epoch, so
    /// they do not depend on when the schedule was created or replaced.
    Every {
        period_ms: u64,
    },
    Cron {
        cron: Box<Cron>,
        zone: TimeZone,
    },
}

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            RuleKind::Every { period_ms } => write!(f, "Rule(@every {period_ms}ms)"),
            RuleKind::Cron { cron, zone } => write!(
                f,
                "Rule({} in {})",
                cron.pattern,
                zone.iana_name().unwrap_or("?")
            ),
        }
    }
}

impl Rule {
    /// Parses `cron` (5 fields, 6 with seconds first, `@every 1m30s`,
    /// `@yearly`/`@annually`, `@monthly`, `@weekly`, `@daily`, `@hourly`)
    /// in the IANA zone `timezone`.
    pub fn parse(cron: &str, timezone: &str) -> Result<Rule, BrokerError> {
        if cron.len() > CRON_MAX_BYTES {
            return Err(BrokerError::invalid(
                "cron",
                format!("at most {CRON_MAX_BYTES} bytes"),
            ));
        }
        if timezone.len() > CRON_MAX_BYTES {
            return Err(BrokerError::invalid("timezone", "unknown IANA time zone"));
        }
        let zone = TimeZone::get(timezone).map_err(|_| {
            BrokerError::invalid("timezone", format!("unknown IANA time zone {timezone:?}"))
        })?;
        let trimmed = cron.trim();
        if let Some(every) = strip_prefix_ignore_case(trimmed, "@every") {
            let period_ms = parse_duration_ms(every.trim()).ok_or_else(|| {
                BrokerError::invalid(
                    "cron",
                    "@every takes a duration such as 10s, 1m30s, 2h, 1d (units d, h, m, s, ms)",
                )
            })?;
            if !(EVERY_MS_MIN..=EVERY_MS_MAX).contains(&period_ms) || period_ms % 1_000 != 0 {
                return Err(BrokerError::invalid(
                    "cron",
                    format!(
                        "@every takes whole seconds from {} s to {} days",
                        EVERY_MS_MIN / 1_000,
                        EVERY_MS_MAX / 86_400_000
                    ),
                ));
            }
            return Ok(Rule {
                kind: RuleKind::Every { period_ms },
            });
        }
        let fields = trimmed.split_whitespace().count();
        if !trimmed.starts_with('@') && !(5..=6).contains(&fields) {
            return Err(BrokerError::invalid(
                "cron",
                format!("5 or 6 fields (seconds first), or @every/@hourly/…; got {fields}"),
            ));
        }
        let parser = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build();
        let parsed = parser
            .parse(trimmed)
            .map_err(|e| BrokerError::invalid("cron", e.to_string()))?;
        Ok(Rule {
            kind: RuleKind::Cron {
                cron: Box::new(parsed),
                zone,
            },
        })
    }

    /// The first due instant strictly after `after_ms`; `None` when the
    /// rule has none (a day that never comes, such as 30 February).
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        match &self.kind {
            RuleKind::Every { period_ms } => (after_ms / period_ms + 1).checked_mul(*period_ms),
            RuleKind::Cron { cron, zone } => {
                // Instants are whole seconds: searching strictly after the
                // second `after_ms` falls in finds the first one after it.
                let start = zoned_at(after_ms - after_ms % 1_000, zone)?;
                let next = cron.find_next_occurrence(&start, false).ok()?;
                to_ms(&next)
            }
        }
    }

    /// The last due instant at or before `at_ms`.
    fn last_at_or_before(&self, at_ms: u64) -> Option<u64> {
        match &self.kind {
            RuleKind::Every { period_ms } => Some(at_ms - at_ms % period_ms),
            RuleKind::Cron { cron, zone } => {
                let start = zoned_at(at_ms - at_ms % 1_000, zone)?;
                let previous = cron.find_previous_occurrence(&start, true).ok()?;
                to_ms(&previous)
            }
        }
    }

    /// The due instants in `[first_ms, now_ms]` (`first_ms` is one of
    /// them): their count (cron rules: at most [`MISSED_SCAN_MAX`]) and
    /// the latest `keep` of them, ascending.
    fn due_between(&self, first_ms: u64, now_ms: u64, keep: usize) -> (u64, Vec<u64>) {
        if first_ms > now_ms || keep == 0 {
            return (0, Vec::new());
        }
        match &self.kind {
            RuleKind::Every { period_ms } => {
                let count = (now_ms - first_ms) / period_ms + 1;
                let latest = now_ms - (now_ms - first_ms) % period_ms;
                let kept = count.min(keep as u64);
                let instants = (0..kept).rev().map(|i| latest - i * period_ms).collect();
                (count, instants)
            }
            RuleKind::Cron { .. } => {
                let mut latest = VecDeque::with_capacity(keep.min(1_024));
                let mut count = 0;
                let mut instant = Some(first_ms);
                while let Some(due) = instant.filter(|&due| due <= now_ms) {
                    count += 1;
                    if latest.len() == keep {
                        latest.pop_front();
                    }
                    latest.push_back(due);
                    if count == MISSED_SCAN_MAX {
                        return (count, self.latest_before(now_ms, keep));
                    }
                    instant = self.next_after(due);
                }
                (count, latest.into())
            }
        }
    }

    /// The latest `keep` due instants at or before `now_ms`, ascending.
    fn latest_before(&self, now_ms: u64, keep: usize) -> Vec<u64> {
        let mut instants = Vec::new();
        let mut at = Some(now_ms);
        while let Some(due) = at.and_then(|at| self.last_at_or_before(at)) {
            if instants.len() == keep {
                break;
            }
            instants.push(due);
            at = due.checked_sub(1);
        }
        instants.reverse();
        instants
    }
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

/// `1d2h3m4s5ms`-style durations (each unit at most once, in that order,
/// at least one).
fn parse_duration_ms(text: &str) -> Option<u64> {
    const UNITS: [(&str, u64); 5] = [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("ms", 1),
        ("m", 60_000),
        ("s", 1_000),
    ];
    let mut rest = text;
    let mut total: u64 = 0;
    let mut last_rank = None;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 12 {
            return None;
        }
        let value: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (rank, unit, scale) = UNITS
            .iter()
            .enumerate()
            .find(|(_, (unit, _))| rest.starts_with(unit))
            .map(|(rank, (unit, scale))| (rank_of(rank), unit, *scale))?;
        if last_rank.is_some_and(|last| rank <= last) {
            return None;
        }
        last_rank = Some(rank);
        rest = &rest[unit.len()..];
        total = total.checked_add(value.checked_mul(scale)?)?;
    }
    (last_rank.is_some()).then_some(total)
}

/// Orders the units largest first ("ms" is listed before "m" only so that
/// it is matched first).
fn rank_of(index: usize) -> u8 {
    match index {
        0 => 0, // d
        1 => 1, // h
        3 => 2, // m
        4 => 3, // s
        _ => 4, // ms
    }
}

fn zoned_at(ms: u64, zone: &TimeZone) -> Option<Zoned> {
    let ms = i64::try_from(ms).ok()?;
    Some(Timestamp::from_millisecond(ms).ok()?.to_zoned(zone.clone()))
}

fn to_ms(zoned: &Zoned) -> Option<u64> {
    u64::try_from(zoned.timestamp().as_millisecond()).ok()
}

/// Checks a spec, naming the bad field, and returns its rule.
pub fn check_spec(spec: &ScheduleSpec) -> Result<Rule, BrokerError> {
    let rule = Rule::parse(&spec.cron, &spec.timezone)?;
    if spec.catch_up_max == 0 || spec.catch_up_max > CATCH_UP_MAX_LIMIT {
        return Err(BrokerError::invalid(
            "catch_up_max",
            format!("1 to {CATCH_UP_MAX_LIMIT}"),
        ));
    }
    if spec.jitter_ms > JITTER_MS_MAX {
        return Err(BrokerError::invalid(
            "jitter_ms",
            format!("at most {JITTER_MS_MAX} (a day)"),
        ));
    }
    if spec.max_backlog == Some(0) {
        return Err(BrokerError::invalid("max_backlog", "at least 1"));
    }
    match spec.job.run_at {
        RunAt::AtMs(_) => {
            return Err(BrokerError::invalid(
                "job.run_at",
                "a schedule's job cannot run at a fixed instant; use delay_ms",
            ))
        }
        RunAt::DelayMs(delay_ms) if delay_ms > limits::DELAY_MS_MAX => {
            return Err(BrokerError::invalid(
                "job.delay_ms",
                format!("at most {}", limits::DELAY_MS_MAX),
            ))
        }
        _ => {}
    }
    if !spec.job.parents.is_empty() {
        return Err(BrokerError::invalid(
            "job.parents",
            "only workflow steps have parents",
        ));
    }
    validate::check_backoff(spec.job.backoff.as_ref())?;
    // The firing adds two headers: the template must leave room for them.
    let probe = firing_job("x", spec, 0, 0);
    validate::check_headers(&probe.headers)?;
    Ok(rule)
}

/// The first due instant of a schedule that is created, replaced or
/// resumed at `now_ms`.
///
/// A replaced schedule keeps `last_fire_at_ms`; if it was due and not yet
/// fired (`previous_next_ms` at or before `now_ms`) that instant, or the
/// new rule's next after it, is due at once (and goes through the misfire
/// policy like any late instant); otherwise the next instant after now.
/// Never an instant at or before `last_fire_at_ms`: it fired.
pub fn first_due(
    rule: &Rule,
    last_fire_at_ms: Option<u64>,
    previous_next_ms: Option<u64>,
    now_ms: u64,
) -> Option<u64> {
    let from = match previous_next_ms {
        Some(due) if due <= now_ms => due.saturating_sub(1),
        _ => now_ms,
    };
    rule.next_after(from.max(last_fire_at_ms.unwrap_or(0)))
}

/// What a schedule does at one instant: see [`plan`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Due instants to fire now, ascending.
    pub fire: Vec<u64>,
    /// Instants the misfire policy dropped.
    pub skipped: u64,
    /// The next due instant after these.
    pub next_fire_at_ms: Option<u64>,
}

/// At `now_ms`, for a schedule whose next due instant is `next_fire_at_ms`
/// (`None`: it has none, or it is paused), which due instants fire: every
/// instant in `[next_fire_at_ms, now_ms]` is due; the latest of them is on
/// time if at most [`MISFIRE_GRACE_MS`] old, the rest are misfires.
/// - `skip`: only an on-time instant fires;
/// - `once`: the latest fires (one job for all that were missed);
/// - `all`: the latest `catch_up_max` fire.
///
/// The others are counted in `skipped`. Nothing is due before
/// `next_fire_at_ms`, and then the plan is empty with the same next.
pub fn plan(rule: &Rule, spec: &ScheduleSpec, next_fire_at_ms: Option<u64>, now_ms: u64) -> Plan {
    let Some(first) = next_fire_at_ms.filter(|&due| due <= now_ms) else {
        return Plan {
            fire: Vec::new(),
            skipped: 0,
            next_fire_at_ms,
        };
    };
    let keep = match spec.misfire {
        Misfire::Skip | Misfire::Once => 1,
        Misfire::All => spec.catch_up_max.max(1) as usize,
    };
    let (count, mut fire) = rule.due_between(first, now_ms, keep);
    if spec.misfire == Misfire::Skip {
        fire.retain(|&due| now_ms - due <= MISFIRE_GRACE_MS);
    }
    Plan {
        skipped: count.saturating_sub(fire.len() as u64),
        fire,
        next_fire_at_ms: rule.next_after(now_ms),
    }
}

/// How long after `due_ms` its job becomes ready, in `0..=jitter_ms`:
/// spread by a hash of the schedule's name and the instant, so a replay or
/// another node computes the same.
pub fn jitter_ms(name: &str, due_ms: u64, jitter_ms: u64) -> u64 {
    if jitter_ms == 0 {
        return 0;
    }
    // FNV-1a over the name, then a splitmix64 finish with the instant.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut z = hash ^ due_ms.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    z % (jitter_ms + 1)
}

/// The job a firing of `name` at `due_ms` enqueues: the template with the
/// idempotency key `schedule:<name>:<due_ms>`, the headers
/// `spool-schedule` and `spool-scheduled-at`, ready at the due instant
/// plus the template's delay plus `jitter` (at once if that has passed).
pub fn firing_job(name: &str, spec: &ScheduleSpec, due_ms: u64, jitter: u64) -> NewJob {
    let mut job = spec.job.clone();
    let delay_ms = match job.run_at {
        RunAt::DelayMs(delay_ms) => delay_ms,
        RunAt::Now | RunAt::AtMs(_) => 0,
    };
    let ready_at_ms = due_ms.saturating_add(delay_ms).saturating_add(jitter);
    job.run_at = if ready_at_ms == due_ms {
        RunAt::Now
    } else {
        RunAt::AtMs(ready_at_ms)
    };
    job.idempotency_key = Some(firing_key(name, due_ms));
    job.headers
        .insert(HEADER_SCHEDULE.to_owned(), name.to_owned());
    job.headers
        .insert(HEADER_SCHEDULED_AT.to_owned(), rfc3339_ms(due_ms));
    job
}

/// `2026-03-08T07:00:00Z`, with `.mmm` before the `Z` when the instant
/// has milliseconds (as the HTTP API writes instants).
pub fn rfc3339_ms(ms: u64) -> String {
    let at = i64::try_from(ms)
        .ok()
        .and_then(|ms| Timestamp::from_millisecond(ms).ok())
        .unwrap_or(Timestamp::MAX);
    let mut text = at.strftime("%Y-%m-%dT%H:%M:%S").to_string();
    if !ms.is_multiple_of(1_000) {
        text.push_str(&format!(".{:03}", ms % 1_000));
    }
    text.push('Z');
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use spool_broker::QueueName;

    fn ms(text: &str) -> u64 {
        let at: Timestamp = text.parse().unwrap();
        at.as_millisecond() as u64
    }

    fn show(ms: u64, zone: &str) -> String {
        Timestamp::from_millisecond(ms as i64)
            .unwrap()
            .to_zoned(TimeZone::get(zone).unwrap())
            .strftime("%Y-%m-%dT%H:%M:%S%:z")
            .to_string()
    }

    /// The first `n` instants after `from` (an RFC 3339 instant), shown in
    /// the zone.
    fn next_n(cron: &str, zone: &str, from: &str, n: usize) -> Vec<String> {
        let rule = Rule::parse(cron, zone).unwrap();
        let mut at = ms(from);
        let mut out = Vec::new();
        for _ in 0..n {
            at = rule.next_after(at).unwrap();
            out.push(show(at, zone));
        }
        out
    }

    fn spec(cron: &str, misfire: Misfire) -> ScheduleSpec {
        ScheduleSpec {
            cron: cron.into(),
            timezone: "UTC".into(),
            queue: QueueName::try_from("q").unwrap(),
            job: NewJob::default(),
            misfire,
            catch_up_max: 3,
            jitter_ms: 0,
            max_backlog: None,
            paused: false,
        }
    }

    #[test]
    fn new_york_spring_forward_fires_after_the_gap_once() {
        // 2026-03-08: 02:00 EST jumps to 03:00 EDT; 02:30 does not exist.
        assert_eq!(
            next_n("30 2 * * *", "America/New_York", "2026-03-07T12:00:00Z", 3),
            [
                "2026-03-08T03:00:00-04:00",
                "2026-03-09T02:30:00-04:00",
                "2026-03-10T02:30:00-04:00"
            ]
        );
    }

    #[test]
    fn new_york_fall_back_fires_an_ambiguous_time_once() {
        // 2026-11-01: 02:00 EDT falls back to 01:00 EST; 01:30 happens twice.
        assert_eq!(
            next_n("30 1 * * *", "America/New_York", "2026-10-31T12:00:00Z", 3),
            [
                "2026-11-01T01:30:00-04:00",
                "2026-11-02T01:30:00-05:00",
                "2026-11-03T01:30:00-05:00"
            ]
        );
    }

    #[test]
    fn berlin_both_transitions() {
        // 2026-03-29: 02:00 CET jumps to 03:00 CEST.
        assert_eq!(
            next_n("0 15 2 * * *", "Europe/Berlin", "2026-03-28T12:00:00Z", 2),
            ["2026-03-29T03:00:00+02:00", "2026-03-30T02:15:00+02:00"]
        );
        // 2026-10-25: 03:00 CEST falls back to 02:00 CET; 02:15 twice.
        assert_eq!(
            next_n("0 15 2 * * *", "Europe/Berlin", "2026-10-24T12:00:00Z", 2),
            ["2026-10-25T02:15:00+02:00", "2026-10-26T02:15:00+01:00"]
        );
    }

    #[test]
    fn sydney_both_transitions() {
        // 2026-10-04: 02:00 AEST jumps to 03:00 AEDT.
        assert_eq!(
            next_n("30 2 * * *", "Australia/Sydney", "2026-10-03T00:00:00Z", 2),
            ["2026-10-04T03:00:00+11:00", "2026-10-05T02:30:00+11:00"]
        );
        // 2026-04-05: 03:00 AEDT falls back to 02:00 AEST; 02:30 twice.
        assert_eq!(
            next_n("30 2 * * *", "Australia/Sydney", "2026-04-04T00:00:00Z", 2),
            ["2026-04-05T02:30:00+11:00", "2026-04-06T02:30:00+10:00"]
        );
    }

    #[test]
    fn hourly_follows_real_time_across_an_overlap() {
        // Every real hour fires, the repeated 01:00 included.
        assert_eq!(
            next_n("@hourly", "America/New_York", "2026-11-01T04:30:00Z", 3),
            [
                "2026-11-01T01:00:00-04:00",
                "2026-11-01T01:00:00-05:00",
                "2026-11-01T02:00:00-05:00"
            ]
        );
    }

    #[test]
    fn leap_days_and_month_ends() {
        assert_eq!(
            next_n("0 12 29 2 *", "UTC", "2026-01-01T00:00:00Z", 2),
            ["2028-02-29T12:00:00+00:00", "2032-02-29T12:00:00+00:00"]
        );
        assert_eq!(
            next_n("0 0 31 * *", "UTC", "2026-01-31T00:00:00Z", 3),
            [
                "2026-03-31T00:00:00+00:00",
                "2026-05-31T00:00:00+00:00",
                "2026-07-31T00:00:00+00:00"
            ]
        );
        // A day that never comes has no instant.
        let never = Rule::parse("0 0 30 2 *", "UTC").unwrap();
        assert_eq!(never.next_after(ms("2026-01-01T00:00:00Z")), None);
    }

    #[test]
    fn six_fields_and_every() {
        assert_eq!(
            next_n("*/20 * * * * *", "UTC", "2026-01-01T00:00:05.500Z", 3),
            [
                "2026-01-01T00:00:20+00:00",
                "2026-01-01T00:00:40+00:00",
                "2026-01-01T00:01:00+00:00"
            ]
        );
        let every = Rule::parse("@every 1s", "UTC").unwrap();
        assert_eq!(every.next_after(1_500), Some(2_000));
        assert_eq!(every.next_after(2_000), Some(3_000));
        let every = Rule::parse("@EVERY 1m30s", "Europe/Berlin").unwrap();
        assert_eq!(every.next_after(0), Some(90_000));
        assert_eq!(parse_duration_ms("1d2h3m4s5ms"), Some(93_784_005));
        for bad in ["", "s", "10", "1s1m", "1x", "1s1s", "-1s"] {
            assert_eq!(parse_duration_ms(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn bad_rules_name_their_field() {
        for (cron, zone, field) in [
            ("* * * *", "UTC", "cron"),
            ("* * * * * * 2030", "UTC", "cron"),
            ("61 * * * *", "UTC", "cron"),
            ("@every 500ms", "UTC", "cron"),
            ("@every", "UTC", "cron"),
            ("@sometimes", "UTC", "cron"),
            ("* * * * *", "Mars/Olympus", "timezone"),
        ] {
            match Rule::parse(cron, zone) {
                Err(BrokerError::Invalid { field: f, .. }) => assert_eq!(f, field, "{cron:?}"),
                other => panic!("{cron:?} in {zone}: {other:?}"),
            }
        }
        let mut bad = spec("@daily", Misfire::Once);
        bad.catch_up_max = 0;
        assert!(
            matches!(check_spec(&bad), Err(BrokerError::Invalid { field, .. }) if field == "catch_up_max")
        );
        let mut bad = spec("@daily", Misfire::Once);
        bad.job.run_at = RunAt::AtMs(5);
        assert!(
            matches!(check_spec(&bad), Err(BrokerError::Invalid { field, .. }) if field == "job.run_at")
        );
        let mut bad = spec("@daily", Misfire::Once);
        bad.max_backlog = Some(0);
        assert!(
            matches!(check_spec(&bad), Err(BrokerError::Invalid { field, .. }) if field == "max_backlog")
        );
        assert!(check_spec(&spec("@daily", Misfire::Once)).is_ok());
    }

    #[test]
    fn plan_on_time_fires_under_every_policy() {
        for misfire in [Misfire::Skip, Misfire::Once, Misfire::All] {
            let spec = spec("@every 10s", misfire);
            let rule = check_spec(&spec).unwrap();
            assert_eq!(
                plan(&rule, &spec, Some(10_000), 10_004),
                Plan {
                    fire: vec![10_000],
                    skipped: 0,
                    next_fire_at_ms: Some(20_000)
                }
            );
            // Not yet due: nothing changes.
            assert_eq!(
                plan(&rule, &spec, Some(10_000), 9_999),
                Plan {
                    fire: vec![],
                    skipped: 0,
                    next_fire_at_ms: Some(10_000)
                }
            );
        }
    }

    #[test]
    fn plan_after_downtime_per_policy() {
        // Due at 10 s, now 65 s: instants 10..=60 s (6) were missed.
        let expect = [
            (Misfire::Skip, vec![], 6),
            (Misfire::Once, vec![60_000], 5),
            (Misfire::All, vec![40_000, 50_000, 60_000], 3),
        ];
        for (misfire, fire, skipped) in expect {
            for cron in ["@every 10s", "*/10 * * * * *"] {
                let spec = spec(cron, misfire);
                let rule = check_spec(&spec).unwrap();
                assert_eq!(
                    plan(&rule, &spec, Some(10_000), 65_000),
                    Plan {
                        fire: fire.clone(),
                        skipped,
                        next_fire_at_ms: Some(70_000)
                    },
                    "{cron} {misfire:?}"
                );
            }
        }
        // `skip` still fires an instant that is late by no more than the grace.
        let spec = spec("@every 10s", Misfire::Skip);
        let rule = check_spec(&spec).unwrap();
        let plan = plan(&rule, &spec, Some(10_000), 60_000 + MISFIRE_GRACE_MS);
        assert_eq!((plan.fire, plan.skipped), (vec![60_000], 5));
    }

    #[test]
    fn plan_counts_a_long_cron_downtime_without_scanning_it_all() {
        let spec = spec("* * * * * *", Misfire::All);
        let rule = check_spec(&spec).unwrap();
        let now = 30 * 86_400_000;
        let plan = plan(&rule, &spec, Some(1_000), now);
        assert_eq!(plan.fire, vec![now - 2_000, now - 1_000, now]);
        assert_eq!(plan.skipped, MISSED_SCAN_MAX - 3);
    }

    #[test]
    fn first_due_keeps_a_due_instant_and_never_refires() {
        let rule = Rule::parse("@every 10s", "UTC").unwrap();
        // New: the next instant after now.
        assert_eq!(first_due(&rule, None, None, 12_000), Some(20_000));
        // Replaced while due at 10 s, not yet fired: still due.
        assert_eq!(
            first_due(&rule, Some(0), Some(10_000), 12_000),
            Some(10_000)
        );
        // Already fired at 10 s: never again.
        assert_eq!(
            first_due(&rule, Some(10_000), Some(10_000), 10_000),
            Some(20_000)
        );
    }

    #[test]
    fn firing_job_has_key_headers_and_jitter() {
        let mut spec = spec("@every 10s", Misfire::Once);
        spec.job.idempotency_key = Some("ignored".into());
        let job = firing_job("nightly", &spec, ms("2026-03-08T07:00:00Z"), 0);
        assert_eq!(
            job.idempotency_key.as_deref(),
            Some("schedule:nightly:1772953200000")
        );
        assert_eq!(job.headers[HEADER_SCHEDULE], "nightly");
        assert_eq!(job.headers[HEADER_SCHEDULED_AT], "2026-03-08T07:00:00Z");
        assert_eq!(job.run_at, RunAt::Now);
        assert_eq!(rfc3339_ms(1_772_953_200_045), "2026-03-08T07:00:00.045Z");
        spec.job.run_at = RunAt::DelayMs(100);
        assert_eq!(firing_job("n", &spec, 1_000, 7).run_at, RunAt::AtMs(1_107));
        for due in 0..200 {
            let jitter = jitter_ms("nightly", due * 1_000, 250);
            assert!(jitter <= 250);
            assert_eq!(jitter, jitter_ms("nightly", due * 1_000, 250));
        }
        // Spread, not constant.
        let distinct: std::collections::BTreeSet<u64> = (0..50)
            .map(|due| jitter_ms("nightly", due * 1_000, 1_000))
            .collect();
        assert!(distinct.len() > 10);
    }
}
