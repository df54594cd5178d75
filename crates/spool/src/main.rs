//! The `spool` binary: `spool serve` runs the server, the other verbs are
//! clients of its front doors. Only this crate uses `anyhow`; it maps errors
//! to exit codes (2 for bad configuration, 1 for everything else).

mod bench;
mod cpu;
mod logging;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Serve(serve::ServeArgs),
    /// Generate load against a beanstalkd-protocol server and report throughput and latency.
    Bench(bench::BenchArgs),
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
