//! The `spool` binary: `spool serve` runs the server, the other verbs are
//! clients of its front doors. Only this crate uses `anyhow`; it maps errors
//! to exit codes (2 for bad configuration, 1 for everything else).

mod admin;
mod bench;
mod client;
mod cpu;
mod cron;
mod jobs;
mod logging;
mod serve;
mod work;
mod workflows;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// jemalloc instead of glibc's malloc, measured in the same runs
/// (`scripts/bench-connections.sh`, 8,000 connections; beanstalkd 896 B):
/// an idle beanstalkd connection costs about 840 bytes of RSS instead of
/// 876, because tokio's 128-aligned 256-byte socket registration takes 256
/// bytes instead of the ~455 of glibc's `memalign`; 864 instead of 916 after
/// one command each, because a burst leaves less fragmentation. Memory per
/// queued job stays the same (`scripts/bench-memory.sh`: 491.5 B against
/// 492.7 in memory), and a job put over HTTP costs less (630 B against 656
/// at 300k, `scripts/bench-http-memory.sh`) since its `JobExtra` fits a
/// 128-byte size class (at 168 bytes jemalloc took 192: 692 B). mimalloc was tried too and rejected: 659 B per queued
/// job. musl builds keep musl's allocator (jemalloc's C build would need a
/// musl C compiler there). jemalloc's background threads (the
/// `background_threads` feature) hand freed pages back to the kernel as
/// they age (10 s): without them that happened only as the process
/// allocated, so RSS after a burst (100k PostgreSQL sessions whose tasks
/// parked: 1.1-1.2 KiB a connection with them, up to 5.6 KiB without, 15 s
/// later) stayed at its peak on a quiet node. Memory per queued job and
/// recovery were the same with and without (`scripts/bench-memory.sh`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "spool",
    version,
    about = "A durable, beanstalkd-compatible task queue"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Serve(serve::ServeArgs),
    /// Generate load against a beanstalkd-protocol server and report throughput and latency.
    Bench(bench::BenchArgs),
    /// Show a running server's figures: process, connections, queues, log.
    Stats(admin::StatsArgs),
    /// List a running server's client connections and their sessions.
    Conns(admin::StatsArgs),
    /// A live view of a running server: per-queue rates and counts,
    /// refreshed every second.
    Top(admin::TopArgs),
    /// Enqueue a job (payload from the argument or stdin).
    Put(jobs::PutArgs),
    /// Show a job's payload (or the whole job with --json).
    Get(jobs::GetArgs),
    /// Cancel a job: it never runs (again).
    Cancel(jobs::IdArgs),
    /// Move a buried or delayed job to ready.
    Kick(jobs::IdArgs),
    /// List a queue's jobs in one state.
    Jobs(jobs::JobsArgs),
    /// List the queues with their counts by state.
    Queues(jobs::QueuesArgs),
    /// Delete a queue's jobs in one state.
    Purge(jobs::PurgeArgs),
    /// Show a queue's policy, or change keys of it with --set.
    Policy(jobs::PolicyArgs),
    /// Stop handing out a queue's jobs, for a while or until resumed.
    Pause(jobs::PauseArgs),
    /// Hand out a paused queue's jobs again.
    Resume(jobs::QueueArgs),
    /// Cron schedules: add, ls, rm, pause, resume, trigger.
    Cron(cron::CronArgs),
    /// Run a command for each job of some queues: payload on stdin, stdout
    /// as the result, a non-zero exit as a failed attempt.
    Work(work::WorkArgs),
    /// List workflows with their state and progress.
    Workflows(workflows::WorkflowsArgs),
    /// Show a workflow as a tree of its steps (or cancel it with --cancel).
    Workflow(workflows::WorkflowArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            if !e.use_stderr() {
                // --help and --version
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // clap names the flag; a bad environment value should be named
            // as the variable the user actually set.
            match serve::env_error() {
                Some(env) => eprintln!("spool: {env}"),
                None => {
                    let _ = e.print();
                }
            }
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Stats(args) => admin::stats(args),
        Command::Conns(args) => admin::conns(args),
        Command::Top(args) => admin::top(args),
        Command::Put(args) => jobs::put(args),
        Command::Get(args) => jobs::get(args),
        Command::Cancel(args) => jobs::cancel(args),
        Command::Kick(args) => jobs::kick(args),
        Command::Jobs(args) => jobs::jobs(args),
        Command::Queues(args) => jobs::queues(args),
        Command::Purge(args) => jobs::purge(args),
        Command::Policy(args) => jobs::policy(args),
        Command::Pause(args) => jobs::pause(args),
        Command::Resume(args) => jobs::resume(args),
        Command::Cron(args) => cron::run(args),
        Command::Work(args) => work::run(args),
        Command::Workflows(args) => workflows::list(args),
        Command::Workflow(args) => workflows::show(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spool: {e:#}");
            match e.downcast_ref::<serve::ConfigError>() {
                Some(_) => ExitCode::from(2),
                None => ExitCode::FAILURE,
            }
        }
    }
}
