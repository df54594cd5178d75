//! The job and queue verbs (`spool put`, `get`, `cancel`, `kick`, `jobs`,
//! `queues`, `purge`, `policy`, `pause`, `resume`): clients of the `/v1`
//! job API (API.md). Each prints a short line or table, or the server's
//! JSON with `--json`; a refusal of the server is an error (exit 1) that
//! carries its code and message.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use hyper::Method;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use spool_server::http::encoding::{base64_decode, base64_encode};

use crate::admin::{num, render_table, Align};
use crate::client::{escape, Client, ServerArgs};

/// The longest wait `spool get --wait` asks the server for in one request
/// (`?wait_ms`): below the client's request timeout (the server's handler
/// timeout plus a margin), so a long `--timeout` is a few long-polls.
const WAIT_SLICE: Duration = Duration::from_secs(10);

/// How long `spool get --wait` waits by default: long enough for a short
/// job, short enough that a forgotten one does not hang a script.
const WAIT_TIMEOUT_DEFAULT: &str = "60s";

/// The states `get --wait` stops at: a job in them moves no further by
/// itself.
const SETTLED_STATES: [&str; 3] = ["completed", "cancelled", "buried"];

/// The flags every verb has.
#[derive(Debug, clap::Args)]
pub struct Common {
    #[command(flatten)]
    pub(crate) server: ServerArgs,

    /// Print the server's JSON instead of a line or table.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, clap::Args)]
pub struct PutArgs {
    #[command(flatten)]
    common: Common,

    /// The payload; read from stdin when absent. Valid JSON is sent as
    /// JSON (`payload`), anything else as bytes (`payload_base64`).
    payload: Option<String>,

    /// The queue.
    #[arg(long, short, default_value = "default")]
    queue: String,

    /// Priority, lower first [default: the queue's, else 1024]
    #[arg(long)]
    priority: Option<u32>,

    /// Run no sooner than this from now (500ms, 30s, 2m, 1h, or seconds).
    #[arg(long, value_parser = millis)]
    delay: Option<u64>,

    /// Time a worker has to finish once it reserves the job [default: the queue's, else 60s]
    #[arg(long, value_parser = millis)]
    ttr: Option<u64>,

    /// Attempts before the job is buried [default: the queue's, else 25]
    #[arg(long)]
    max_attempts: Option<u32>,

    /// Idempotency key: a second put with the same key makes no new job.
    #[arg(long)]
    key: Option<String>,

    /// A header, KEY=VALUE; repeatable.
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = key_value)]
    headers: Vec<(String, String)>,
}

#[derive(Debug, clap::Args)]
pub struct GetArgs {
    #[command(flatten)]
    common: Common,

    /// The job id.
    id: u64,

    /// Wait until the job is completed, cancelled or buried.
    #[arg(long)]
    wait: bool,

    /// How long --wait waits before giving up (exit 1).
    #[arg(long, value_parser = duration, default_value = WAIT_TIMEOUT_DEFAULT, requires = "wait")]
    timeout: Duration,
}

#[derive(Debug, clap::Args)]
pub struct IdArgs {
    #[command(flatten)]
    common: Common,

    /// The job id.
    id: u64,
}

#[derive(Debug, clap::Args)]
pub struct JobsArgs {
    #[command(flatten)]
    common: Common,

    /// The queue.
    queue: String,

    /// Which jobs: ready, reserved, delayed, buried, completed, cancelled.
    #[arg(long, default_value = "ready")]
    state: String,

    /// At most this many jobs [default: the server's]
    #[arg(long)]
    limit: Option<u32>,

    /// Only jobs with a higher id (the `next` of the previous page).
    #[arg(long)]
    after: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub struct QueuesArgs {
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    common: Common,

    /// The queue.
    queue: String,

    /// Which jobs to delete: buried, ready or delayed.
    #[arg(long)]
    state: String,
}

#[derive(Debug, clap::Args)]
pub struct PolicyArgs {
    #[command(flatten)]
    common: Common,

    /// The queue.
    queue: String,

    /// Change one key, KEY=VALUE (VALUE as JSON, else as a string), keeping
    /// the others; repeatable. `KEY=null` returns it to the default.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = key_value)]
    set: Vec<(String, String)>,
}

#[derive(Debug, clap::Args)]
pub struct PauseArgs {
    #[command(flatten)]
    common: Common,

    /// The queue.
    queue: String,

    /// Resume by itself after this long [default: until `spool resume`]
    #[arg(long, value_parser = millis)]
    duration: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub struct QueueArgs {
    #[command(flatten)]
    common: Common,

    /// The queue.
    queue: String,
}

fn duration(text: &str) -> Result<Duration, String> {
    crate::serve::parse_span(text)
        .ok_or_else(|| format!("{text:?} is not a duration: 500ms, 30s, 2m, 1h or seconds"))
}

pub(crate) fn millis(text: &str) -> Result<u64, String> {
    u64::try_from(duration(text)?.as_millis()).map_err(|_| format!("{text:?} is too long"))
}

pub(crate) fn key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

/// Prints the server's JSON, pretty, as `spool stats --json` does.
pub(crate) fn print_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub(crate) fn body(value: &impl Serialize) -> anyhow::Result<Option<Vec<u8>>> {
    Ok(Some(serde_json::to_vec(value)?))
}

/// An enqueue body; absent fields take the queue's or the server's defaults.
#[derive(Serialize)]
struct Enqueue<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delay_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttr_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_attempts: Option<u32>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    headers: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idempotency_key: Option<String>,
}

/// `spool put`.
pub fn put(args: PutArgs) -> anyhow::Result<()> {
    let bytes = match args.payload {
        Some(text) => text.into_bytes(),
        None => {
            let mut stdin = std::io::stdin();
            if stdin.is_terminal() {
                bail!("give the payload as an argument or on stdin");
            }
            let mut bytes = Vec::new();
            stdin.read_to_end(&mut bytes).context("reading stdin")?;
            bytes
        }
    };
    // The JSON text is sent as given (the server stores it byte for byte),
    // not re-encoded from a parsed value.
    let json = std::str::from_utf8(&bytes)
        .ok()
        .and_then(|text| serde_json::from_str::<&RawValue>(text).ok());
    let enqueue = Enqueue {
        payload: json,
        payload_base64: json.is_none().then(|| base64_encode(&bytes)),
        priority: args.priority,
        delay_ms: args.delay,
        ttr_ms: args.ttr,
        max_attempts: args.max_attempts,
        headers: args.headers.into_iter().collect(),
        idempotency_key: args.key,
    };
    let client = Client::new(&args.common.server)?;
    let job = client.send(
        Method::POST,
        &format!("/v1/queues/{}/jobs", escape(&args.queue)),
        body(&enqueue)?,
    )?;
    if args.common.json {
        return print_json(&job);
    }
    let duplicate = if job.get("duplicate").and_then(Value::as_bool) == Some(true) {
        " (duplicate: the key names an existing job)"
    } else {
        ""
    };
    println!(
        "job {} {} in {}{duplicate}",
        num(&job, "/id"),
        num(&job, "/state"),
        num(&job, "/queue")
    );
    Ok(())
}

/// `spool get`: the payload as JSON text or as its bytes, or the whole job
/// with `--json`.
pub fn get(args: GetArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.common.server)?;
    let deadline = Instant::now() + args.timeout;
    let (job, raw) = loop {
        // The server answers a long-poll when the job settles or the wait
        // ends, holding nothing while it waits.
        let path = if args.wait {
            let slice = WAIT_SLICE.min(deadline.saturating_duration_since(Instant::now()));
            format!("/v1/jobs/{}?wait_ms={}", args.id, slice.as_millis())
        } else {
            format!("/v1/jobs/{}", args.id)
        };
        let raw = client
            .send_raw(Method::GET, &path, None)
            .with_context(|| format!("job {}", args.id))?;
        let job: Value = serde_json::from_slice(&raw).context("the server's job is not JSON")?;
        let state = job.get("state").and_then(Value::as_str).unwrap_or("");
        if !args.wait || SETTLED_STATES.contains(&state) {
            break (job, raw);
        }
        if Instant::now() >= deadline {
            bail!(
                "job {} is still {state} after {:?} (--timeout)",
                args.id,
                args.timeout
            );
        }
    };
    if args.common.json {
        return print_json(&job);
    }
    // The payload's JSON text as stored, not re-encoded from a `Value`
    // (which would sort its keys).
    let payload: Payload = serde_json::from_slice(&raw).context("the server's job")?;
    let mut out = std::io::stdout().lock();
    match (payload.payload, payload.payload_base64) {
        (Some(payload), _) => writeln!(out, "{}", payload.get())?,
        (None, Some(encoded)) => {
            let bytes = base64_decode(&encoded)
                .ok_or_else(|| anyhow!("the server sent payload_base64 that is not base64"))?;
            out.write_all(&bytes)?;
        }
        _ => bail!("the server's job has no payload"),
    }
    out.flush()?;
    Ok(())
}

/// The payload fields of a job answer.
#[derive(Deserialize)]
struct Payload {
    #[serde(default, deserialize_with = "present_raw")]
    payload: Option<Box<RawValue>>,
    payload_base64: Option<String>,
}

/// A `payload` of JSON `null` is still a payload (plain `Option` would
/// read it as absent).
fn present_raw<'de, D: Deserializer<'de>>(de: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(de).map(Some)
}

/// `spool cancel` and `spool kick`: one action on one job.
fn job_action(args: IdArgs, action: &str, done: &str) -> anyhow::Result<()> {
    let client = Client::new(&args.common.server)?;
    let job = client
        .send(
            Method::POST,
            &format!("/v1/jobs/{}/{action}", args.id),
            None,
        )
        .with_context(|| format!("job {}", args.id))?;
    if args.common.json {
        return print_json(&job);
    }
    println!("job {} {done}: {}", args.id, num(&job, "/state"));
    Ok(())
}

/// `spool cancel`.
pub fn cancel(args: IdArgs) -> anyhow::Result<()> {
    job_action(args, "cancel", "cancelled")
}

/// `spool kick`.
pub fn kick(args: IdArgs) -> anyhow::Result<()> {
    job_action(args, "kick", "kicked")
}

/// A payload shortened for a table cell.
fn payload_preview(job: &Value) -> String {
    const MAX_CHARS: usize = 40;
    let text = match (job.get("payload"), job.get("payload_base64")) {
        (Some(payload), _) => payload.to_string(),
        (None, Some(Value::String(encoded))) => {
            let size = base64_decode(encoded).map_or(0, |b| b.len());
            format!("<{size} bytes>")
        }
        _ => "-".to_string(),
    };
    if text.chars().count() > MAX_CHARS {
        let cut: String = text.chars().take(MAX_CHARS - 1).collect();
        format!("{cut}…")
    } else {
        text
    }
}

/// `spool jobs`.
pub fn jobs(args: JobsArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.common.server)?;
    let mut path = format!(
        "/v1/queues/{}/jobs?state={}",
        escape(&args.queue),
        escape(&args.state)
    );
    if let Some(limit) = args.limit {
        path.push_str(&format!("&limit={limit}"));
    }
    if let Some(after) = args.after {
        path.push_str(&format!("&after={after}"));
    }
    let page = client.get(&path)?;
    if args.common.json {
        return print_json(&page);
    }
    let jobs = page
        .get("jobs")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|job| {
            vec![
                num(job, "/id"),
                num(job, "/state"),
                num(job, "/priority"),
                format!("{}/{}", num(job, "/attempts"), num(job, "/max_attempts")),
                num(job, "/created_at"),
                payload_preview(job),
            ]
        })
        .collect();
    print!(
        "{}",
        render_table(
            &[
                ("ID", Align::Right),
                ("STATE", Align::Left),
                ("PRI", Align::Right),
                ("ATTEMPTS", Align::Right),
                ("CREATED", Align::Left),
                ("PAYLOAD", Align::Left),
            ],
            &rows,
        )
    );
    if let Some(next) = page.get("next").and_then(Value::as_u64) {
        println!("more: --after {next}");
    }
    Ok(())
}

/// `spool queues`.
pub fn queues(args: QueuesArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.common.server)?;
    let queues = client.get("/v1/queues")?;
    if args.common.json {
        return print_json(&queues);
    }
    let list = queues
        .get("queues")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|q| {
            let mut row = vec![num(q, "/name")];
            for state in [
                "ready",
                "reserved",
                "delayed",
                "buried",
                "completed",
                "cancelled",
            ] {
                row.push(num(q, &format!("/counts/{state}")));
            }
            row.push(paused_text(q));
            row
        })
        .collect();
    print!(
        "{}",
        render_table(
            &[
                ("QUEUE", Align::Left),
                ("READY", Align::Right),
                ("RESERVED", Align::Right),
                ("DELAYED", Align::Right),
                ("BURIED", Align::Right),
                ("COMPLETED", Align::Right),
                ("CANCELLED", Align::Right),
                ("PAUSED", Align::Left),
            ],
            &rows,
        )
    );
    Ok(())
}

/// "no", "yes" or "until <instant>".
fn paused_text(queue: &Value) -> String {
    match (
        queue.get("paused").and_then(Value::as_bool),
        queue.get("paused_until").and_then(Value::as_str),
    ) {
        (Some(true), Some(until)) => format!("until {until}"),
        (Some(true), None) => "yes".to_string(),
        (Some(false), _) => "no".to_string(),
        (None, _) => "-".to_string(),
    }
}

/// `spool purge`.
pub fn purge(args: PurgeArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.common.server)?;
    let answer = client.send(
        Method::DELETE,
        &format!(
            "/v1/queues/{}/jobs?state={}",
            escape(&args.queue),
            escape(&args.state)
        ),
        None,
    )?;
    if args.common.json {
        return print_json(&answer);
    }
    println!(
        "deleted {} {} jobs from {}",
        num(&answer, "/deleted"),
        args.state,
        args.queue
    );
    Ok(())
}

/// `spool policy`: shows the queue's policy; with `--set`, merges the keys
/// into it and PUTs the result (the PUT replaces the whole policy).
pub fn policy(args: PolicyArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.common.server)?;
    let path = format!("/v1/queues/{}", escape(&args.queue));
    let mut queue = client.get(&path)?;
    if !args.set.is_empty() {
        let mut policy = match queue.get("policy") {
            Some(Value::Object(policy)) => policy.clone(),
            _ => Map::new(),
        };
        for (key, text) in args.set {
            // `max_jobs=100` is the number 100; `foo=bar` the string "bar".
            let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
            policy.insert(key, value);
        }
        // Unset keys are left out rather than sent as null: the server
        // takes a key that is there at all as given.
        policy.retain(|_, v| !v.is_null());
        queue = client.send(
            Method::PUT,
            &format!("{path}/policy"),
            body(&Value::Object(policy))?,
        )?;
    }
    if args.common.json {
        return print_json(&queue);
    }
    let rows: Vec<Vec<String>> = match queue.get("policy") {
        Some(Value::Object(policy)) => policy
            .iter()
            .map(|(key, value)| {
                let text = match value {
                    Value::Null => "default".to_string(),
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                vec![key.clone(), text]
            })
            .collect(),
        _ => Vec::new(),
    };
    print!(
        "{}",
        render_table(&[("KEY", Align::Left), ("VALUE", Align::Left)], &rows)
    );
    Ok(())
}

/// `spool pause`.
pub fn pause(args: PauseArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.common.server)?;
    let mut fields = Map::new();
    if let Some(ms) = args.duration {
        fields.insert("duration_ms".to_string(), ms.into());
    }
    let queue = client.send(
        Method::POST,
        &format!("/v1/queues/{}/pause", escape(&args.queue)),
        body(&Value::Object(fields))?,
    )?;
    if args.common.json {
        return print_json(&queue);
    }
    println!("queue {} paused: {}", args.queue, paused_text(&queue));
    Ok(())
}

/// `spool resume`.
pub fn resume(args: QueueArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.common.server)?;
    let queue = client.send(
        Method::POST,
        &format!("/v1/queues/{}/resume", escape(&args.queue)),
        None,
    )?;
    if args.common.json {
        return print_json(&queue);
    }
    println!("queue {} paused: {}", args.queue, paused_text(&queue));
    Ok(())
}
