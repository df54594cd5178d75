//! `spool cron add|ls|rm|pause|resume|trigger`: clients of
//! `/v1/schedules` (API.md, "schedules"). Each prints a short line or a
//! table, or the server's JSON with `--json`.

use std::collections::BTreeMap;

use anyhow::bail;
use hyper::Method;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;
use spool_server::http::encoding::base64_encode;

use crate::admin::{num, render_table, Align};
use crate::client::{escape, Client};
use crate::jobs::{body, key_value, millis, print_json, Common};

#[derive(Debug, clap::Args)]
pub struct CronArgs {
    #[command(subcommand)]
    verb: CronVerb,
}

// Parsed once at start: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, clap::Subcommand)]
enum CronVerb {
    /// Create or replace a schedule.
    Add(AddArgs),
    /// List the schedules with their next and last firing.
    Ls(ListArgs),
    /// Delete a schedule (the jobs it fired stay).
    Rm(NameArgs),
    /// Stop firing until resumed.
    Pause(NameArgs),
    /// Fire again, from the next instant after now.
    Resume(NameArgs),
    /// Fire once now, outside the rule.
    Trigger(NameArgs),
}

#[derive(Debug, clap::Args)]
pub struct AddArgs {
    #[command(flatten)]
    common: Common,

    /// The schedule's name.
    name: String,

    /// The rule: 5 fields, 6 with seconds first, `@every 10s`, `@hourly` …
    cron: String,

    /// The job's payload. Valid JSON is sent as JSON, anything else as
    /// bytes [default: null]
    payload: Option<String>,

    /// The queue fired jobs go to.
    #[arg(long, short, default_value = "default")]
    queue: String,

    /// The IANA time zone the rule is read in.
    #[arg(long, default_value = "UTC")]
    timezone: String,

    /// Missed instants: skip, once (one job for them all) or all (one each,
    /// at most --catch-up-max).
    #[arg(long, default_value = "once", value_parser = ["skip", "once", "all"])]
    misfire: String,

    /// With --misfire all: the most missed instants fired at once.
    #[arg(long)]
    catch_up_max: Option<u32>,

    /// Spread each job up to this long after its instant (500ms, 30s …).
    #[arg(long, value_parser = millis)]
    jitter: Option<u64>,

    /// Skip a firing while this many jobs it fired wait in the queue.
    #[arg(long)]
    max_backlog: Option<u64>,

    /// The jobs' priority, lower first.
    #[arg(long)]
    priority: Option<u32>,

    /// The jobs' time to run.
    #[arg(long, value_parser = millis)]
    ttr: Option<u64>,

    /// A header of the jobs, KEY=VALUE; repeatable.
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = key_value)]
    headers: Vec<(String, String)>,

    /// Create it paused.
    #[arg(long)]
    paused: bool,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
pub struct NameArgs {
    #[command(flatten)]
    common: Common,

    /// The schedule's name.
    name: String,
}

#[derive(Serialize)]
struct Template<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttr_ms: Option<u64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    headers: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct ScheduleBody<'a> {
    cron: &'a str,
    timezone: &'a str,
    queue: &'a str,
    job: Template<'a>,
    misfire: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    catch_up_max: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    jitter_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_backlog: Option<u64>,
    paused: bool,
}

/// `spool cron …`.
pub fn run(args: CronArgs) -> anyhow::Result<()> {
    match args.verb {
        CronVerb::Add(args) => add(args),
        CronVerb::Ls(args) => list(args),
        CronVerb::Rm(args) => {
            let client = Client::new(&args.common.server)?;
            client.send(Method::DELETE, &path(&args.name, ""), None)?;
            if !args.common.json {
                println!("schedule {} deleted", args.name);
            }
            Ok(())
        }
        CronVerb::Pause(args) => action(args, "/pause"),
        CronVerb::Resume(args) => action(args, "/resume"),
        CronVerb::Trigger(args) => action(args, "/trigger"),
    }
}

fn path(name: &str, action: &str) -> String {
    format!("/v1/schedules/{}{action}", escape(name))
}

fn add(args: AddArgs) -> anyhow::Result<()> {
    let text = args.payload.unwrap_or_else(|| "null".to_owned());
    let json = serde_json::from_str::<&RawValue>(&text).ok();
    let spec = ScheduleBody {
        cron: &args.cron,
        timezone: &args.timezone,
        queue: &args.queue,
        job: Template {
            payload: json,
            payload_base64: json.is_none().then(|| base64_encode(text.as_bytes())),
            priority: args.priority,
            ttr_ms: args.ttr,
            headers: args.headers.into_iter().collect(),
        },
        misfire: &args.misfire,
        catch_up_max: args.catch_up_max,
        jitter_ms: args.jitter,
        max_backlog: args.max_backlog,
        paused: args.paused,
    };
    let client = Client::new(&args.common.server)?;
    let schedule = client.send(Method::PUT, &path(&args.name, ""), body(&spec)?)?;
    if args.common.json {
        return print_json(&schedule);
    }
    println!(
        "schedule {} next fires at {}",
        args.name,
        num(&schedule, "/next_fire_at")
    );
    Ok(())
}

fn action(args: NameArgs, action: &str) -> anyhow::Result<()> {
    let client = Client::new(&args.common.server)?;
    let schedule = client.send(Method::POST, &path(&args.name, action), None)?;
    if args.common.json {
        return print_json(&schedule);
    }
    match action {
        "/trigger" => println!(
            "schedule {} fired job {}",
            args.name,
            num(&schedule, "/last_job")
        ),
        _ => println!(
            "schedule {} {}; next fires at {}",
            args.name,
            if schedule.get("paused").and_then(Value::as_bool) == Some(true) {
                "paused"
            } else {
                "active"
            },
            num(&schedule, "/next_fire_at")
        ),
    }
    Ok(())
}

fn list(args: ListArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.common.server)?;
    let answer = client.get("/v1/schedules")?;
    if args.common.json {
        return print_json(&answer);
    }
    let Some(list) = answer.get("schedules").and_then(Value::as_array) else {
        bail!("the server's answer has no schedules");
    };
    print!("{}", schedule_table(list));
    Ok(())
}

/// The table `spool cron ls` and `spool top` show.
pub fn schedule_table(list: &[Value]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                num(s, "/name"),
                num(s, "/cron"),
                num(s, "/timezone"),
                num(s, "/queue"),
                num(s, "/next_fire_at"),
                num(s, "/last_fire_at"),
                num(s, "/last_skew_ms"),
                num(s, "/fires"),
                num(s, "/misfires_skipped"),
                num(s, "/backlog_skips"),
                if s.get("paused").and_then(Value::as_bool) == Some(true) {
                    "yes".to_owned()
                } else {
                    "no".to_owned()
                },
            ]
        })
        .collect();
    render_table(
        &[
            ("SCHEDULE", Align::Left),
            ("CRON", Align::Left),
            ("TZ", Align::Left),
            ("QUEUE", Align::Left),
            ("NEXT", Align::Left),
            ("LAST", Align::Left),
            ("SKEW_MS", Align::Right),
            ("FIRES", Align::Right),
            ("MISFIRES", Align::Right),
            ("BACKLOG", Align::Right),
            ("PAUSED", Align::Left),
        ],
        &rows,
    )
}
