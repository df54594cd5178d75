//! `spool work -- CMD ARGS...`: any command as a worker, one process per
//! job, on the `spool-client` [`Worker`] (which heartbeats, bounds the
//! processes in flight, drains and reconnects).
//!
//! A job's process gets the payload on stdin and `SPOOL_JOB_ID`,
//! `SPOOL_ATTEMPT` (1 for the first run) and `SPOOL_QUEUE` in its environment. Exit 0 completes
//! the job with stdout as the result (stored as JSON when it parses, else
//! as bytes); any other end fails the attempt with the exit status and the
//! last bytes of stderr (up to the server's 4 KiB error bound). When the
//! job is cancelled, its lease ends, `--timeout` passes or the shutdown
//! grace ends, the process's whole group gets SIGTERM, then SIGKILL after
//! `--kill-grace`. SIGTERM or SIGINT to `spool work` drains: no new jobs,
//! running ones get `--shutdown-grace`, the rest are released; exit 0. A
//! second signal ends the grace at once.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use spool_client::{Body, Client, HandlerError, Job, JobContext, Worker};
use spool_engine::limits::ERROR_MAX_BYTES;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::client::ServerArgs;
use crate::serve::ConfigError;

/// Most stdout kept as a job's result: far above what the server takes as a
/// result, so a larger one fails with the server's reason, while a command
/// that writes without end cannot exhaust memory.
const STDOUT_MAX_BYTES: usize = 256 << 20;

/// What the worker allows a handler beyond `--kill-grace` after its token
/// fired: the process group has been SIGKILLed by then, and reaping it and
/// closing its pipes takes well under a second.
const REAP_MARGIN: Duration = Duration::from_secs(1);

/// Most processes at once: each holds three pipes and a pid; past a few
/// thousand, a machine runs out of those before the queue runs dry.
const CONCURRENCY_MAX: u32 = 4_096;

#[derive(Debug, clap::Args)]
pub struct WorkArgs {
    #[command(flatten)]
    server: ServerArgs,

    /// A queue to take jobs from; repeatable (a job comes from the first
    /// queue that has one).
    #[arg(long = "queue", short = 'q', required = true, value_name = "QUEUE")]
    queues: Vec<String>,

    /// Most commands running at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=CONCURRENCY_MAX as i64))]
    concurrency: u32,

    /// Fail a job whose command runs longer than this (500ms, 30s, 2m, 1h) [default: no limit]
    #[arg(long, value_parser = duration)]
    timeout: Option<Duration>,

    /// Heartbeat each running job this often; also how late a command learns its job was cancelled [default: a third of the job's TTR]
    #[arg(long, value_parser = duration)]
    heartbeat: Option<Duration>,

    /// How long a stopped command's process group has between SIGTERM and SIGKILL.
    #[arg(long, value_parser = duration, default_value = "5s")]
    kill_grace: Duration,

    /// On SIGTERM, how long running commands may finish before they are stopped and their jobs released.
    #[arg(long, value_parser = duration, default_value = "30s")]
    shutdown_grace: Duration,

    /// The command to run for each job, and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

fn duration(text: &str) -> Result<Duration, String> {
    crate::serve::parse_span(text)
        .ok_or_else(|| format!("{text:?} is not a duration: 500ms, 30s, 2m, 1h or seconds"))
}

/// Whether `program` names an executable file, as `execvp` would find it:
/// a path as given, a bare name along `PATH`.
fn executable(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |path: &Path| {
        path.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        return runnable(Path::new(program));
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| runnable(&dir.join(program))))
}

/// `spool work`.
pub fn run(args: WorkArgs) -> anyhow::Result<()> {
    // Checked once here: a command that cannot start would otherwise fail
    // every job it is given, using up their attempts.
    if let Some(program) = args.command.first() {
        if !executable(program) {
            return Err(ConfigError(format!(
                "{program:?} is not an executable file (give a path, or a name on PATH)"
            ))
            .into());
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: WorkArgs) -> anyhow::Result<()> {
    let mut client = Client::builder(args.server.http());
    if let Some(token) = args.server.token() {
        client = client.token(token);
    }
    let client = client.build()?;
    let command: Arc<[String]> = args.command.into();
    let kill_grace = args.kill_grace;
    let mut worker = Worker::builder(client)
        .concurrency(args.concurrency as usize)
        .shutdown_grace(args.shutdown_grace)
        .cancel_grace(kill_grace.saturating_add(REAP_MARGIN));
    for queue in &args.queues {
        worker = worker.queue(queue.clone());
    }
    if let Some(timeout) = args.timeout {
        worker = worker.handler_timeout(timeout);
    }
    if let Some(interval) = args.heartbeat {
        worker = worker.heartbeat_interval(interval);
    }
    let worker = worker
        .build(move |job: Job, ctx: JobContext| run_job(command.clone(), kill_grace, job, ctx));
    let stop = worker.shutdown_handle();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")?;
    tokio::spawn(async move {
        // The first signal drains; a second one stops the commands now
        // (their jobs are released all the same).
        for second in [false, true] {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            if second {
                eprintln!("spool work: stopping the running commands now");
                stop.shutdown_now();
            } else {
                eprintln!(
                    "spool work: draining (a second SIGTERM or SIGINT stops the commands now)"
                );
                stop.shutdown();
            }
        }
    });
    eprintln!(
        "spool work: serving {} with up to {} processes",
        args.queues.join(", "),
        args.concurrency
    );
    let totals = worker.run().await?;
    eprintln!(
        "spool work: done: {} completed, {} failed, {} timed out, {} cancelled, {} released, {} lost leases",
        totals.processed,
        totals.failed,
        totals.timed_out,
        totals.cancelled,
        totals.released,
        totals.lease_lost
    );
    Ok(())
}

/// One job: its process, fed the payload, its output collected, stopped
/// (group-wide) when the job's token fires.
async fn run_job(
    command: Arc<[String]>,
    kill_grace: Duration,
    job: Job,
    ctx: JobContext,
) -> Result<Body, HandlerError> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| HandlerError::new("no command given"))?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env("SPOOL_JOB_ID", job.id.to_string())
        // The attempt this run is, from 1: `attempts` counts the ended ones.
        .env("SPOOL_ATTEMPT", (job.attempts + 1).to_string())
        .env("SPOOL_QUEUE", &job.queue)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so a stop reaches whatever it started too.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| HandlerError::new(format!("cannot start {program:?}: {e}")))?;
    let mut group = child.id().map(group::Group::new);
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let payload = job.payload.clone();
    let feed = async move {
        if let Some(mut stdin) = stdin {
            // A command that does not read its stdin closes the pipe:
            // not an error of the job.
            let _ = stdin.write_all(&payload).await;
        }
    };
    let finished = async {
        let ((), out, err, status) = tokio::join!(
            feed,
            read_bounded(stdout, STDOUT_MAX_BYTES),
            read_tail(stderr, ERROR_MAX_BYTES),
            child.wait()
        );
        (status, out, err)
    };
    tokio::pin!(finished);
    tokio::select! {
        (status, out, err) = &mut finished => {
            // Ended by itself: what it left running is its own business,
            // as with any process that exits.
            if let Some(group) = group.take() {
                group.disarm();
            }
            let status = status.map_err(|e| HandlerError::new(format!("waiting for the command: {e}")))?;
            let out = out.map_err(|e| HandlerError::new(format!("reading its stdout: {e}")))?;
            if status.success() {
                return Ok(Body::detect(out));
            }
            Err(HandlerError::new(failure_text(status, &err)))
        }
        reason = ctx.cancelled() => {
            if let Some(group) = &group {
                group.terminate();
            }
            tokio::select! {
                _ = &mut finished => {}
                _ = tokio::time::sleep(kill_grace) => {
                    if let Some(group) = &group {
                        group.kill();
                    }
                    let _ = tokio::time::timeout(REAP_MARGIN, &mut finished).await;
                }
            }
            Err(HandlerError::new(format!("{reason}: the command was stopped")))
        }
    }
}

/// Everything `reader` gives, up to `max` bytes (more is an error).
async fn read_bounded(
    reader: Option<impl AsyncRead + Unpin>,
    max: usize,
) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    if let Some(reader) = reader {
        let read = reader.take(max as u64 + 1).read_to_end(&mut out).await?;
        if read > max {
            return Err(std::io::Error::other(format!(
                "more than {max} bytes of output"
            )));
        }
    }
    Ok(out)
}

/// The last `keep` bytes `reader` gives (read to the end).
async fn read_tail(reader: Option<impl AsyncRead + Unpin>, keep: usize) -> Vec<u8> {
    let mut tail = Vec::new();
    let Some(mut reader) = reader else {
        return tail;
    };
    let mut chunk = vec![0u8; 8192];
    loop {
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                tail.extend_from_slice(&chunk[..n]);
                if tail.len() > 2 * keep {
                    tail.drain(..tail.len() - keep);
                }
            }
        }
    }
    if tail.len() > keep {
        tail.drain(..tail.len() - keep);
    }
    tail
}

/// "exit status 3: <stderr's tail>", within the server's error bound.
fn failure_text(status: ExitStatus, stderr: &[u8]) -> String {
    use std::os::unix::process::ExitStatusExt;
    let head = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    };
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim_end();
    if text.is_empty() {
        return head;
    }
    let room = ERROR_MAX_BYTES.saturating_sub(head.len() + 2);
    let mut start = text.len().saturating_sub(room);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("{head}: {}", &text[start..])
}

/// Signals to a job's process group. One of the two places `spool` calls
/// libc (the other: `spool bench --sched-batch`): `kill(2)` on a group (a
/// negative pid) has no safe std equivalent, and
/// `Child::kill` reaches only the leader, not what it started.
mod group {
    #![allow(unsafe_code)]

    /// A process group, SIGKILLed when dropped so an abandoned job's
    /// processes never outlive it.
    #[derive(Debug)]
    pub struct Group {
        id: libc::pid_t,
    }

    impl Group {
        /// The group led by the process `leader` (spawned with
        /// `process_group(0)`, so its group id is its pid).
        pub fn new(leader: u32) -> Group {
            Group {
                id: libc::pid_t::try_from(leader).unwrap_or(0),
            }
        }

        /// Forgets the group: nothing is sent when dropped.
        pub fn disarm(mut self) {
            self.id = 0;
        }

        pub fn terminate(&self) {
            self.send(libc::SIGTERM);
        }

        pub fn kill(&self) {
            self.send(libc::SIGKILL);
        }

        fn send(&self, signal: libc::c_int) {
            // Never 0 or 1: -0 and -1 would signal this process's own
            // group or every process.
            if self.id > 1 {
                // SAFETY: kill(2) takes plain integers and touches no
                // memory of ours; a group that is gone gives ESRCH.
                unsafe {
                    libc::kill(-self.id, signal);
                }
            }
        }
    }

    impl Drop for Group {
        fn drop(&mut self) {
            self.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn failure_text_names_the_status_and_keeps_the_tail_within_the_bound() {
        let status = ExitStatus::from_raw(3 << 8);
        assert_eq!(failure_text(status, b""), "exit status 3");
        assert_eq!(failure_text(status, b"oops\n"), "exit status 3: oops");
        let long = "é".repeat(5_000);
        let text = failure_text(status, long.as_bytes());
        assert!(text.len() <= ERROR_MAX_BYTES, "{}", text.len());
        assert!(text.starts_with("exit status 3: é"));
        let killed = ExitStatus::from_raw(9);
        assert_eq!(failure_text(killed, b""), "killed by signal 9");
    }

    #[tokio::test]
    async fn the_tail_is_the_last_bytes() {
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let tail = read_tail(Some(&data[..]), 4096).await;
        assert_eq!(tail, &data[data.len() - 4096..]);
        let short = read_tail(Some(&b"abc"[..]), 4096).await;
        assert_eq!(short, b"abc");
    }
}
