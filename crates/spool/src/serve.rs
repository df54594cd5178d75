//! `spool serve`: configuration in two stages (what the user typed, then
//! the validated [`ServeConfig`] built from it) and the runtime wiring.
//!
//! Every flag has an environment twin, and beanstalkd's own short flags
//! (`-l -p -b -f -F -z -s -V -v`) mean what they mean to beanstalkd, so a
//! service definition only has to change the binary name.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use anyhow::Context;
use spool_engine::{Engine, EngineConfig};
use spool_proto::limits::{DEFAULT_MAX_JOB_SIZE_BYTES, MAX_JOB_SIZE_LIMIT_BYTES};
use spool_server::beanstalk::{self, BeanstalkConfig, BeanstalkListener};
use spool_server::process::ProcessInfo;
use spool_server::{Broker, Clock, LocalBroker};

/// What `stats` reports as `version`: the beanstalkd version spool speaks,
/// then spool's own.
const VERSION: &str = concat!("1.12 (spool ", env!("CARGO_PKG_VERSION"), ")");

#[derive(Debug, clap::Args)]
#[command(disable_version_flag = true)]
pub struct ServeArgs {
    /// Address to listen on for the beanstalkd protocol: an IP address,
    /// `IP:PORT`, or `unix:PATH` for a unix socket.
    #[arg(
        short = 'l',
        long = "listen",
        env = "SPOOL_LISTEN",
        default_value = "127.0.0.1"
    )]
    listen: String,

    /// TCP port, when --listen names no port.
    #[arg(
        short = 'p',
        long = "port",
        env = "SPOOL_PORT",
        default_value_t = 11300
    )]
    port: u16,

    /// Keep queues in memory only; they are lost when the process stops.
    #[arg(
        long = "in-memory",
        env = "SPOOL_IN_MEMORY",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    in_memory: bool,

    /// Directory for the write-ahead log (beanstalkd's -b).
    #[arg(short = 'b', long = "data-dir", env = "SPOOL_DATA_DIR")]
    data_dir: Option<PathBuf>,

    /// beanstalkd's -f MS: fsync at most every MS milliseconds.
    #[arg(short = 'f', value_name = "MS")]
    fsync_interval_ms: Option<u64>,

    /// beanstalkd's -F: never fsync.
    #[arg(short = 'F')]
    fsync_never: bool,

    /// Largest job body in bytes (beanstalkd's -z).
    #[arg(
        short = 'z',
        long = "max-job-size",
        env = "SPOOL_MAX_JOB_SIZE",
        default_value_t = DEFAULT_MAX_JOB_SIZE_BYTES
    )]
    max_job_size: u32,

    /// beanstalkd's -s BYTES: binlog file size. Accepted for compatibility.
    #[arg(short = 's', value_name = "BYTES")]
    binlog_size: Option<u64>,

    /// Log filter directive, e.g. `info` or `spool_server=debug`.
    #[arg(long = "log-level", env = "SPOOL_LOG_LEVEL", default_value = "info")]
    log_level: String,

    /// More log output (beanstalkd's -V); repeat for more.
    #[arg(short = 'V', action = clap::ArgAction::Count)]
    verbose: u8,

    /// Print the version and exit (beanstalkd's -v).
    #[arg(short = 'v', long = "version")]
    version: bool,
}

/// A setting that cannot be used; the binary exits with status 2.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// Validated settings of `spool serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: ListenAddr,
    pub max_job_size: u32,
    pub log_filter: String,
}

/// (variable, is the value valid, what is expected)
type EnvCheck = (&'static str, fn(&str) -> bool, &'static str);

/// Environment twins whose bad values clap would report naming only the
/// flag. After a parse error, [`env_error`] names the variable instead.
const ENV_CHECKS: &[EnvCheck] = &[
    (
        "SPOOL_PORT",
        |v| v.parse::<u16>().is_ok(),
        "a TCP port, 0 to 65535",
    ),
    (
        "SPOOL_MAX_JOB_SIZE",
        |v| v.parse::<u32>().is_ok(),
        "a number of bytes, 1 to 1073741824",
    ),
    (
        "SPOOL_IN_MEMORY",
        |v| {
            matches!(
                v.to_ascii_lowercase().as_str(),
                "1" | "0" | "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n" | "t" | "f"
            )
        },
        "true or false",
    ),
];

/// The first `SPOOL_*` variable with a value that cannot be parsed.
pub fn env_error() -> Option<ConfigError> {
    ENV_CHECKS.iter().find_map(|(name, valid, expected)| {
        let value = std::env::var(name).ok()?;
        (!valid(&value)).then(|| ConfigError(format!("{name}={value}: expected {expected}")))
    })
}

impl ServeArgs {
    fn validate(&self) -> Result<ServeConfig, ConfigError> {
        if let Some(dir) = &self.data_dir {
            return Err(ConfigError(format!(
                "--data-dir/-b/SPOOL_DATA_DIR={}: the write-ahead log is not available in this \
                 build yet; run with --in-memory",
                dir.display()
            )));
        }
        if !self.in_memory {
            return Err(ConfigError(
                "durable storage (the default) is not available in this build yet; pass \
                 --in-memory (or SPOOL_IN_MEMORY=true) to keep queues in memory"
                    .to_string(),
            ));
        }
        if self.max_job_size == 0 || self.max_job_size > MAX_JOB_SIZE_LIMIT_BYTES {
            return Err(ConfigError(format!(
                "--max-job-size/-z/SPOOL_MAX_JOB_SIZE={}: expected 1 to {MAX_JOB_SIZE_LIMIT_BYTES} bytes",
                self.max_job_size
            )));
        }
        let listen = parse_listen(&self.listen, self.port)?;
        let log_filter = match self.verbose {
            0 => self.log_level.clone(),
            1 => "debug".to_string(),
            _ => "trace".to_string(),
        };
        tracing_subscriber::EnvFilter::try_new(&log_filter).map_err(|e| {
            ConfigError(format!(
                "--log-level/SPOOL_LOG_LEVEL={log_filter}: expected a filter directive like `info` or `spool=debug` ({e})"
            ))
        })?;
        Ok(ServeConfig {
            listen,
            max_job_size: self.max_job_size,
            log_filter,
        })
    }
}

fn parse_listen(listen: &str, port: u16) -> Result<ListenAddr, ConfigError> {
    if let Some(path) = listen.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(ConfigError(
                "--listen/-l/SPOOL_LISTEN=unix: expected a socket path after `unix:`".to_string(),
            ));
        }
        return Ok(ListenAddr::Unix(PathBuf::from(path)));
    }
    if let Ok(addr) = listen.parse::<SocketAddr>() {
        return Ok(ListenAddr::Tcp(addr));
    }
    if let Ok(ip) = listen.parse::<IpAddr>() {
        return Ok(ListenAddr::Tcp(SocketAddr::new(ip, port)));
    }
    if listen == "localhost" {
        return Ok(ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], port))));
    }
    Err(ConfigError(format!(
        "--listen/-l/SPOOL_LISTEN={listen}: expected an IP address, IP:PORT or unix:PATH"
    )))
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    if args.version {
        println!("spool {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    let config = args.validate()?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&config.log_filter))
        .with_writer(std::io::stderr)
        .init();
    if args.fsync_interval_ms.is_some() || args.fsync_never || args.binlog_size.is_some() {
        tracing::warn!("-f, -F and -s only matter with a data directory; ignored with --in-memory");
    }
    // One thread, like beanstalkd: the engine task and every connection
    // share it, so handing a batch to the engine never crosses threads.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let listener = bind(&config.listen)?;
    let engine = Engine::new(EngineConfig {
        max_job_size: config.max_job_size,
    });
    let broker = LocalBroker::start(engine, Clock::start(), None, ProcessInfo::new(VERSION));
    tracing::info!(
        listen = %listener.local_addr(),
        storage = "in-memory",
        max_job_size = config.max_job_size,
        "spool is serving the beanstalkd protocol"
    );
    let drain_broker = broker.clone();
    tokio::spawn(async move {
        let Ok(mut usr1) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        else {
            return;
        };
        while usr1.recv().await.is_some() {
            tracing::info!("SIGUSR1: draining, new jobs are refused");
            drain_broker.set_draining(true);
        }
    });
    beanstalk::serve(
        listener,
        broker,
        BeanstalkConfig {
            max_job_size: config.max_job_size,
        },
        shutdown_signal(),
    )
    .await;
    tracing::info!("shutting down");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn bind(listen: &ListenAddr) -> anyhow::Result<BeanstalkListener> {
    match listen {
        ListenAddr::Tcp(addr) => {
            let socket = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()
            } else {
                tokio::net::TcpSocket::new_v6()
            }?;
            // A restarted server must not wait for old connections' TIME_WAIT.
            socket.set_reuseaddr(true)?;
            socket
                .bind(*addr)
                .with_context(|| format!("binding {addr}"))?;
            let listener = socket
                .listen(beanstalk::LISTEN_BACKLOG)
                .with_context(|| format!("listening on {addr}"))?;
            Ok(BeanstalkListener::Tcp(listener))
        }
        ListenAddr::Unix(path) => {
            // A socket file left by a previous run is replaced, as beanstalkd
            // does; any other file is not ours to remove.
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if meta.file_type().is_socket() {
                    std::fs::remove_file(path)
                        .with_context(|| format!("removing stale socket {}", path.display()))?;
                } else {
                    anyhow::bail!("{} exists and is not a socket", path.display());
                }
            }
            // tokio's unix listener uses the std backlog (128); beanstalkd's
            // 1024 matters for bursts of TCP clients, far less here.
            let listener = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("binding unix socket {}", path.display()))?;
            Ok(BeanstalkListener::Unix(listener, path.clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_forms() {
        assert_eq!(
            parse_listen("127.0.0.1", 11300).unwrap(),
            ListenAddr::Tcp("127.0.0.1:11300".parse().unwrap())
        );
        assert_eq!(
            parse_listen("0.0.0.0:9", 11300).unwrap(),
            ListenAddr::Tcp("0.0.0.0:9".parse().unwrap())
        );
        assert_eq!(
            parse_listen("unix:/tmp/s", 1).unwrap(),
            ListenAddr::Unix("/tmp/s".into())
        );
        assert!(parse_listen("nope", 1).is_err());
        assert!(parse_listen("unix:", 1).is_err());
    }
}
