//! `spool serve`: configuration in two stages (what the user typed, then
//! the validated [`ServeConfig`] built from it) and the runtime wiring.
//!
//! Every flag has an environment twin, and beanstalkd's own short flags
//! (`-l -p -b -f -F -z -s -V -v`) mean what they mean to beanstalkd, so a
//! service definition only has to change the binary name.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::cpu;
use crate::logging::{self, LogFormat};

use anyhow::Context;
use spool_engine::{Engine, EngineConfig};
use spool_pg::{PgBroker, PgConfig, PoolStats};
use spool_proto::limits::{DEFAULT_MAX_JOB_SIZE_BYTES, MAX_JOB_SIZE_LIMIT_BYTES};
use spool_server::beanstalk::{self, BeanstalkConfig, BeanstalkListener};
use spool_server::connections::{Connections, Protocol};
use spool_server::durable::{self, FsyncPolicy, InlineLog};
use spool_server::http::exposition::{Exposition, HistogramSample, MetricKind};
use spool_server::http::{self, HttpLimits, HttpSettings, HttpState};
use spool_server::process::ProcessInfo;
use spool_server::{engine_clock, process, Broker, LocalBroker, LogSink};
use spool_wal::{WalError, WalOptions, SEGMENT_MAX_BYTES_DEFAULT};

/// What the beanstalkd `stats` reports as `version`: exactly beanstalkd
/// 1.12's, because clients parse it (fivebeans appends `.0` and reads a
/// semantic version). spool's own version is in `/admin/stats`,
/// `spool_build_info` and `spool stats`.
const BEANSTALKD_VERSION: &str = "1.12";

/// spool's own version, for the HTTP side.
const VERSION: &str = env!("CARGO_PKG_VERSION");

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

    /// Keep jobs in this PostgreSQL database, shared with the other spool
    /// nodes that name it (a libpq URL or key=value string); the schema is
    /// created or migrated at start.
    #[arg(
        long = "database-url",
        env = "SPOOL_DATABASE_URL",
        hide_env_values = true
    )]
    database_url: Option<String>,

    /// This node's name on the shared database: its leases carry it, and a
    /// node restarting under the same name hands back the jobs its previous
    /// life held at once (others wait for their leases to expire). Give
    /// each node its own [default: the host name and --listen address]
    #[arg(long = "node-id", env = "SPOOL_NODE_ID")]
    node_id: Option<String>,

    /// Directory of the write-ahead log (beanstalkd's -b) [default: ./spool-data]
    #[arg(short = 'b', long = "data-dir", env = "SPOOL_DATA_DIR")]
    data_dir: Option<PathBuf>,

    /// When an acknowledged write is on disk: `always` (acknowledged only
    /// after its fsync, group-committed), `interval:<ms>` (fsync by a timer
    /// every <ms>), or `never` (left to the OS) [default: always]
    #[arg(long = "fsync", env = "SPOOL_FSYNC")]
    fsync: Option<String>,

    /// beanstalkd's -f MS: the same as --fsync interval:MS.
    #[arg(short = 'f', value_name = "MS")]
    fsync_interval_ms: Option<u64>,

    /// beanstalkd's -F: the same as --fsync never.
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

    /// Start even though part of the log is missing (a segment file the
    /// log's MANIFEST names, records cut from the end of the newest segment,
    /// or the MANIFEST itself), with what is left; what was lost is logged.
    /// Without it such a log stops the start. For one start after a loss was
    /// investigated: remove it afterwards.
    #[arg(
        long = "accept-data-loss",
        env = "SPOOL_ACCEPT_DATA_LOSS",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    accept_data_loss: bool,

    /// Size at which the log starts a new segment file (beanstalkd's -s).
    #[arg(
        short = 's',
        long = "segment-size",
        value_name = "BYTES",
        env = "SPOOL_SEGMENT_SIZE"
    )]
    segment_size: Option<u64>,

    /// Log filter directive, e.g. `info` or `spool_server=debug`; changeable
    /// at runtime through `PUT /admin/log-level`.
    #[arg(long = "log-level", env = "SPOOL_LOG_LEVEL", default_value = "info")]
    log_level: String,

    /// Log format on stdout: `json` or `text` [default: json when stdout is
    /// not a terminal, text when it is]
    #[arg(long = "log-format", env = "SPOOL_LOG_FORMAT")]
    log_format: Option<String>,

    /// Address of the HTTP listener (probes, /metrics, /admin), IP:PORT.
    #[arg(
        long = "http-listen",
        env = "SPOOL_HTTP_LISTEN",
        default_value = http::DEFAULT_HTTP_LISTEN
    )]
    http_listen: String,

    /// Most beanstalkd client connections open at once (HTTP has its own
    /// small cap, so probes get through a full server) [default: as many as
    /// the fd limit allows, keeping headroom]
    #[arg(long = "max-connections", env = "SPOOL_MAX_CONNECTIONS")]
    max_connections: Option<String>,

    /// A command line must arrive within this long of its first byte, and a
    /// body within this long plus its size at 1 KiB/s, or the connection is
    /// closed (e.g. `30s`, `500ms`); idle connections between commands are
    /// not.
    #[arg(
        long = "request-timeout",
        env = "SPOOL_REQUEST_TIMEOUT",
        default_value = "30s"
    )]
    request_timeout: String,

    /// A connection whose replies stay unread for this long is closed.
    #[arg(
        long = "write-timeout",
        env = "SPOOL_WRITE_TIMEOUT",
        default_value = "30s"
    )]
    write_timeout: String,

    /// On SIGTERM/SIGINT, how long reserved jobs may take to finish before
    /// they are released and the process exits.
    #[arg(
        long = "shutdown-grace",
        env = "SPOOL_SHUTDOWN_GRACE",
        default_value = "25s"
    )]
    shutdown_grace: String,

    /// Bearer token that `/admin/*` (and the job API) require when set.
    #[arg(long = "auth-token", env = "SPOOL_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,

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
/// Where the queues live.
#[derive(Debug, Clone)]
pub enum StorageConfig {
    InMemory,
    Wal {
        dir: PathBuf,
        fsync: FsyncPolicy,
        segment_max_bytes: u64,
        /// Start with what is left of a log missing data.
        accept_data_loss: bool,
    },
    /// A PostgreSQL database several nodes share.
    Postgres {
        url: String,
        /// None: derived from the host name and the listen address.
        node_id: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: ListenAddr,
    pub http_listen: SocketAddr,
    pub max_job_size: u32,
    pub log_filter: String,
    pub log_format: LogFormat,
    pub storage: StorageConfig,
    /// None: limited by the fd limit only.
    pub max_connections: Option<u32>,
    pub request_timeout: Duration,
    pub write_timeout: Duration,
    pub shutdown_grace: Duration,
    pub auth_token: Option<String>,
}

/// Longest timeout or grace period accepted: a day. Anything longer is
/// almost certainly a unit mistake (ms given as s).
const DURATION_SETTING_MAX: Duration = Duration::from_secs(24 * 3600);

/// Parses `30s`, `500ms`, `2m`, `1h` or a bare number of seconds.
fn parse_duration(value: &str) -> Option<Duration> {
    parse_span(value).filter(|d| *d <= DURATION_SETTING_MAX)
}

/// [`parse_duration`] without its bound: a job's delay or a queue's pause
/// may well last longer than a day.
pub(crate) fn parse_span(value: &str) -> Option<Duration> {
    let value = value.trim();
    let (digits, unit_ms) = if let Some(v) = value.strip_suffix("ms") {
        (v, 1)
    } else if let Some(v) = value.strip_suffix('s') {
        (v, 1000)
    } else if let Some(v) = value.strip_suffix('m') {
        (v, 60_000)
    } else if let Some(v) = value.strip_suffix('h') {
        (v, 3_600_000)
    } else {
        (value, 1000)
    };
    let count: u64 = digits.trim().parse().ok()?;
    Some(Duration::from_millis(count.checked_mul(unit_ms)?))
}

/// Validates a duration setting named by its flag and variable.
fn duration_setting(names: &str, value: &str, min: Duration) -> Result<Duration, ConfigError> {
    match parse_duration(value) {
        Some(d) if d >= min => Ok(d),
        _ => Err(ConfigError(format!(
            "{names}={value}: expected a duration like 30s or 500ms, from {}ms to 24h",
            min.as_millis()
        ))),
    }
}

/// Where the log lives when no directory is given.
const DEFAULT_DATA_DIR: &str = "./spool-data";

/// The longest `--node-id`: it is stored with every lease, so it stays a
/// name, not a document.
const NODE_ID_MAX_BYTES: usize = 200;

/// Smallest segment size: a segment must hold a maximum-size record plus
/// framing without rotating on every write.
const SEGMENT_MIN_BYTES: u64 = 1 << 20;

fn parse_fsync(value: &str) -> Option<FsyncPolicy> {
    match value {
        "always" => Some(FsyncPolicy::Always),
        "never" => Some(FsyncPolicy::Never),
        _ => {
            let ms: u64 = value.strip_prefix("interval:")?.parse().ok()?;
            (ms > 0).then(|| FsyncPolicy::Interval(std::time::Duration::from_millis(ms)))
        }
    }
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
    ("SPOOL_IN_MEMORY", is_boolish, "true or false"),
    ("SPOOL_ACCEPT_DATA_LOSS", is_boolish, "true or false"),
];

/// What clap's `BoolishValueParser` accepts.
fn is_boolish(v: &str) -> bool {
    matches!(
        v.to_ascii_lowercase().as_str(),
        "1" | "0" | "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n" | "t" | "f"
    )
}

/// The first `SPOOL_*` variable with a value that cannot be parsed.
pub fn env_error() -> Option<ConfigError> {
    ENV_CHECKS.iter().find_map(|(name, valid, expected)| {
        let value = std::env::var(name).ok()?;
        (!valid(&value)).then(|| ConfigError(format!("{name}={value}: expected {expected}")))
    })
}

impl ServeArgs {
    fn validate(&self) -> Result<ServeConfig, ConfigError> {
        let storage = self.storage()?;
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
        let log_format = match self.log_format.as_deref() {
            None => LogFormat::for_stdout(),
            Some(value) => LogFormat::parse(value).ok_or_else(|| {
                ConfigError(format!(
                    "--log-format/SPOOL_LOG_FORMAT={value}: expected json or text"
                ))
            })?,
        };
        let http_listen = self.http_listen.parse::<SocketAddr>().map_err(|_| {
            ConfigError(format!(
                "--http-listen/SPOOL_HTTP_LISTEN={}: expected IP:PORT, e.g. 127.0.0.1:11301",
                self.http_listen
            ))
        })?;
        let max_connections = match &self.max_connections {
            None => None,
            Some(value) => match value.parse::<u32>() {
                Ok(n) if n >= 1 => Some(n),
                _ => {
                    return Err(ConfigError(format!(
                        "--max-connections/SPOOL_MAX_CONNECTIONS={value}: expected a number of connections, 1 to {}",
                        u32::MAX
                    )))
                }
            },
        };
        let request_timeout = duration_setting(
            "--request-timeout/SPOOL_REQUEST_TIMEOUT",
            &self.request_timeout,
            Duration::from_millis(1),
        )?;
        let write_timeout = duration_setting(
            "--write-timeout/SPOOL_WRITE_TIMEOUT",
            &self.write_timeout,
            Duration::from_millis(1),
        )?;
        let shutdown_grace = duration_setting(
            "--shutdown-grace/SPOOL_SHUTDOWN_GRACE",
            &self.shutdown_grace,
            Duration::ZERO,
        )?;
        let auth_token = match &self.auth_token {
            None => None,
            Some(token) if token.is_empty() || token.chars().any(|c| !c.is_ascii_graphic()) => {
                // The value is a secret: never echo it.
                return Err(ConfigError(
                    "--auth-token/SPOOL_AUTH_TOKEN=<hidden>: expected a non-empty token of printable ASCII without spaces"
                        .to_string(),
                ));
            }
            Some(token) => Some(token.clone()),
        };
        Ok(ServeConfig {
            listen,
            http_listen,
            max_job_size: self.max_job_size,
            log_filter,
            log_format,
            storage,
            max_connections,
            request_timeout,
            write_timeout,
            shutdown_grace,
            auth_token,
        })
    }

    fn storage(&self) -> Result<StorageConfig, ConfigError> {
        let fsync_flags = [
            self.fsync.is_some(),
            self.fsync_interval_ms.is_some(),
            self.fsync_never,
        ];
        if fsync_flags.iter().filter(|&&given| given).count() > 1 {
            return Err(ConfigError(
                "--fsync/SPOOL_FSYNC, -f and -F all set the fsync policy: give one".to_string(),
            ));
        }
        if let Some(url) = &self.database_url {
            let local = [
                (self.in_memory, "--in-memory/SPOOL_IN_MEMORY"),
                (self.data_dir.is_some(), "--data-dir/-b/SPOOL_DATA_DIR"),
                (
                    fsync_flags.iter().any(|&given| given),
                    "--fsync/SPOOL_FSYNC (or -f, -F)",
                ),
                (
                    self.segment_size.is_some(),
                    "--segment-size/-s/SPOOL_SEGMENT_SIZE",
                ),
                (
                    self.accept_data_loss,
                    "--accept-data-loss/SPOOL_ACCEPT_DATA_LOSS",
                ),
            ];
            if let Some((_, flag)) = local.iter().find(|(given, _)| *given) {
                // The URL may hold a password: never echo it.
                return Err(ConfigError(format!(
                    "--database-url/SPOOL_DATABASE_URL=<hidden> and {flag} conflict: \
                     jobs live in the database or in this process, not both"
                )));
            }
            if url.trim().is_empty() {
                return Err(ConfigError(
                    "--database-url/SPOOL_DATABASE_URL=: expected a PostgreSQL URL, \
                     e.g. postgres://user@host/db"
                        .to_string(),
                ));
            }
            if let Some(node) = &self.node_id {
                if node.is_empty() || node.len() > NODE_ID_MAX_BYTES {
                    return Err(ConfigError(format!(
                        "--node-id/SPOOL_NODE_ID={node}: expected 1 to {NODE_ID_MAX_BYTES} bytes"
                    )));
                }
            }
            return Ok(StorageConfig::Postgres {
                url: url.clone(),
                node_id: self.node_id.clone(),
            });
        }
        if let Some(node) = &self.node_id {
            return Err(ConfigError(format!(
                "--node-id/SPOOL_NODE_ID={node} names a node on a shared database: \
                 it needs --database-url/SPOOL_DATABASE_URL"
            )));
        }
        if self.in_memory {
            if let Some(dir) = &self.data_dir {
                return Err(ConfigError(format!(
                    "--data-dir/-b/SPOOL_DATA_DIR={} and --in-memory/SPOOL_IN_MEMORY conflict: \
                     choose durable storage or memory",
                    dir.display()
                )));
            }
            if self.accept_data_loss {
                return Err(ConfigError(
                    "--accept-data-loss/SPOOL_ACCEPT_DATA_LOSS and --in-memory/SPOOL_IN_MEMORY conflict: \
                     there is no log to accept a loss of"
                        .to_string(),
                ));
            }
            return Ok(StorageConfig::InMemory);
        }
        let fsync = match (&self.fsync, self.fsync_interval_ms, self.fsync_never) {
            (Some(value), _, _) => parse_fsync(value).ok_or_else(|| {
                ConfigError(format!(
                    "--fsync/SPOOL_FSYNC={value}: expected always, never or interval:<ms> with ms > 0"
                ))
            })?,
            (None, Some(0), _) => {
                return Err(ConfigError(
                    "-f 0: expected an fsync interval in milliseconds above 0".to_string(),
                ))
            }
            (None, Some(ms), _) => FsyncPolicy::Interval(std::time::Duration::from_millis(ms)),
            (None, None, true) => FsyncPolicy::Never,
            (None, None, false) => FsyncPolicy::Always,
        };
        let segment_max_bytes = self.segment_size.unwrap_or(SEGMENT_MAX_BYTES_DEFAULT);
        if segment_max_bytes < SEGMENT_MIN_BYTES {
            return Err(ConfigError(format!(
                "--segment-size/-s/SPOOL_SEGMENT_SIZE={segment_max_bytes}: expected at least {SEGMENT_MIN_BYTES} bytes"
            )));
        }
        Ok(StorageConfig::Wal {
            dir: self
                .data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            fsync,
            segment_max_bytes,
            accept_data_loss: self.accept_data_loss,
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

/// Most worker threads of the HTTP runtime: probes and scrapes are light,
/// and every thread beyond the CPU budget is only contention.
const HTTP_WORKER_THREADS_MAX: usize = 4;

/// After the grace period, how long connection tasks get to notice that
/// they are closed and drop their sessions.
const CLOSE_ALL_WAIT: Duration = Duration::from_secs(2);

/// How long the HTTP server gets to finish requests in flight at exit.
const HTTP_STOP_WAIT: Duration = Duration::from_secs(2);

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    if args.version {
        println!("spool {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    let config = args.validate()?;
    let log_control =
        logging::init(config.log_format, &config.log_filter).context("starting the logger")?;
    let cpu = cpu::detect();
    let http_workers = cpu.cpus.min(HTTP_WORKER_THREADS_MAX);
    tracing::info!(
        cpus = cpu.cpus,
        quota_cpus = cpu.quota_cpus,
        source = %cpu.source,
        data_path_threads = 1,
        http_threads = http_workers,
        "CPU budget"
    );
    match process::raise_fd_limit() {
        Ok((soft, hard)) => tracing::info!(soft, hard, "fd limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the fd limit"),
    }
    // Before the runtimes start threads: the table grows without the RCU
    // grace periods that stall fd allocation in a threaded process.
    if let Err(e) = process::presize_fd_table(spool_server::limits::FD_TABLE_PRESIZE_MAX) {
        tracing::warn!(error = %e, "could not presize the fd table");
    }
    let connections = Connections::new(config.max_connections);

    // One thread serves the data path, like beanstalkd: the engine task and
    // every connection share it, so handing a batch to the engine never
    // crosses threads (measured: two workers on two cores ran the mixed
    // load at 0.6-0.7x of one). The CPU budget sizes the pools around it.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(cpu.cpus)
        .build()
        .context("starting the async runtime")?;
    // Probes, metrics and admin run on their own threads: /livez answers
    // while the data path is busy or still replaying the log.
    let http_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(http_workers)
        .max_blocking_threads(cpu.cpus)
        .thread_name("spool-http")
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;

    match config.storage {
        StorageConfig::Postgres { .. } => run_with::<PgBroker, _, _>(
            config,
            runtime,
            http_runtime,
            log_control,
            connections,
            serve_postgres,
        ),
        _ => run_with::<LocalBroker, _, _>(
            config,
            runtime,
            http_runtime,
            log_control,
            connections,
            serve,
        ),
    }
}

/// The HTTP side and the data path on broker `B`: `serve` builds the
/// broker, hands it to the HTTP state and serves until a signal.
fn run_with<B, F, Fut>(
    config: ServeConfig,
    runtime: tokio::runtime::Runtime,
    http_runtime: tokio::runtime::Runtime,
    log_control: logging::LogControl,
    connections: Connections,
    serve: F,
) -> anyhow::Result<()>
where
    B: Broker,
    F: FnOnce(ServeConfig, Arc<HttpState<B>>, Connections) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Served>>,
{
    let log_reader = log_control.clone();
    let http_state = HttpState::<B>::new(HttpSettings {
        version: VERSION.to_string(),
        auth_token: config.auth_token.clone(),
        log_filter: Arc::new(move || log_reader.current()),
        set_log_filter: Arc::new(move |directive: &str| log_control.set(directive)),
        connections: connections.clone(),
        limits: HttpLimits::default(),
        max_job_size: config.max_job_size,
    });
    http_state.set_data_runtime(runtime.handle().clone());
    let http_listener = http_runtime
        .block_on(async { http::bind(config.http_listen) })
        .with_context(|| format!("binding the HTTP listener {}", config.http_listen))?;
    let http_addr = http_listener
        .local_addr()
        .context("reading the HTTP listener's address")?;
    let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http_server = {
        let state = http_state.clone();
        http_runtime.spawn(http::serve(http_listener, state, async {
            let _ = http_stopped.await;
        }))
    };
    tracing::info!(http = %http_addr, "serving probes, /metrics and /admin over HTTP");

    let served = runtime.block_on(serve(config, http_state, connections));
    let log_thread = match served {
        Ok(Served::StoppedDuringRecovery) => {
            runtime.shutdown_background();
            None
        }
        other => {
            // Dropping the runtime drops the engine task and with it the
            // log link; the log thread then makes a last sync and ends.
            drop(runtime);
            match other? {
                Served::Finished(log_thread) => log_thread,
                Served::StoppedDuringRecovery => None,
            }
        }
    };
    let mut result = Ok(());
    if let Some(thread) = log_thread {
        if thread.join().is_err() {
            result = Err(anyhow::anyhow!("the log thread panicked"));
        }
    }
    let _ = http_stop.send(());
    http_runtime.block_on(async {
        let _ = tokio::time::timeout(HTTP_STOP_WAIT, http_server).await;
    });
    http_runtime.shutdown_timeout(HTTP_STOP_WAIT);
    tracing::info!("stopped");
    result
}

async fn serve(
    config: ServeConfig,
    http_state: Arc<HttpState<LocalBroker>>,
    connections: Connections,
) -> anyhow::Result<Served> {
    // Handlers first: a SIGTERM during replay is then served right after
    // it instead of killing the process.
    let mut signals = Signals::install().context("installing signal handlers")?;
    let mut terminated = std::pin::pin!(signals.terminated());
    let clock = engine_clock();
    let mut engine = Engine::new(EngineConfig {
        max_job_size: config.max_job_size,
    });
    let (log, log_thread, storage) = match &config.storage {
        StorageConfig::InMemory => (None, None, "in-memory".to_string()),
        StorageConfig::Postgres { .. } => {
            anyhow::bail!("the local broker was asked to serve a database")
        }
        StorageConfig::Wal {
            dir,
            fsync,
            segment_max_bytes,
            accept_data_loss,
        } => {
            let started = std::time::Instant::now();
            let mut options = WalOptions::default()
                .segment_max_bytes(*segment_max_bytes)
                .accept_data_loss(*accept_data_loss);
            if *fsync != FsyncPolicy::Always {
                // Zero-filling ahead only pays when every commit fsyncs;
                // otherwise it just doubles the bytes written.
                options = options.zero_fill_ahead_bytes(0);
            }
            let recover_dir = dir.clone();
            let replay_clock = clock.clone();
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let replay_stop = stop.clone();
            tracing::info!(dir = %dir.display(), "replaying the log");
            // Replay runs off the runtime so that the runtime stays free.
            let mut replay = tokio::task::spawn_blocking(move || {
                let (wal, report) = durable::recover_unless_stopped(
                    &recover_dir,
                    options,
                    &mut engine,
                    &replay_clock,
                    &replay_stop,
                )?;
                Ok::<_, durable::RecoverError>((wal, report, engine))
            });
            // A signal during a long replay stops it and the process: nothing
            // was acknowledged yet, and the replay changes nothing before it
            // ends. It is waited for (it stops within a few thousand
            // records), so the process never exits around a replaying thread.
            let replayed = tokio::select! {
                replayed = &mut replay => replayed,
                _ = &mut terminated => {
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    let _ = replay.await;
                    tracing::info!("stopped during log replay");
                    return Ok(Served::StoppedDuringRecovery);
                }
            };
            let (wal, report, recovered) = replayed
                .context("recovery panicked")?
                .map_err(|e| match e {
                    durable::RecoverError::Wal(WalError::Missing { .. }) => anyhow::anyhow!(
                        "{e}. Nothing was changed; to start with what is left, accepting the loss, \
                         pass --accept-data-loss (or SPOOL_ACCEPT_DATA_LOSS=true) once"
                    ),
                    e => anyhow::Error::new(e),
                })
                .with_context(|| format!("recovering the log in {}", dir.display()))?;
            engine = recovered;
            for lost in &report.lost {
                tracing::error!(
                    %lost,
                    "DATA LOSS accepted (--accept-data-loss): started without this part of the log; \
                     the jobs and changes it held are gone"
                );
            }
            if let Some(tail) = &report.torn_tail {
                tracing::warn!(%tail, "the end of the newest log segment was damaged; cut it off");
            }
            if report.upgraded {
                tracing::info!(
                    "the log predates its MANIFEST (segment format 1): created it; from now on a \
                     missing segment file is detected (one missing before this start could not be)"
                );
            }
            let previous_close = match report.previous_close_clean {
                Some(true) => "clean",
                Some(false) => "unclean (crash, kill or I/O error)",
                None => "unknown (no MANIFEST)",
            };
            tracing::info!(
                dir = %dir.display(),
                records = report.records,
                segments = report.segments,
                jobs = engine.job_count(),
                previous_close,
                compaction_leftovers_removed = report.compaction_leftovers_removed,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "recovered the log"
            );
            let description = format!("{} (fsync {fsync:?})", dir.display());
            if *fsync == FsyncPolicy::Always {
                // Replies wait for fsyncs: a thread group-commits them.
                let (link, thread) = durable::spawn_log_thread(
                    wal,
                    dir,
                    *fsync,
                    clock.epoch_ns(),
                    *segment_max_bytes,
                    Default::default(),
                )
                .context("starting the log thread")?;
                (Some(LogSink::Thread(link)), Some(thread), description)
            } else {
                let log = InlineLog::new(
                    wal,
                    dir,
                    *fsync,
                    clock.epoch_ns(),
                    *segment_max_bytes,
                    Default::default(),
                )
                .context("opening the space reserve")?;
                (Some(LogSink::Inline(Box::new(log))), None, description)
            }
        }
    };
    let listener = bind(&config.listen)?;
    let broker = LocalBroker::start(engine, clock, log, ProcessInfo::new(BEANSTALKD_VERSION));
    if let Some(stats) = broker.storage_stats() {
        http_state.set_storage_stats(stats);
    }
    // Readiness turns true with the broker: recovery is over.
    http_state.set_broker(broker.clone());
    tracing::info!(
        listen = %listener.local_addr(),
        storage = %storage,
        max_job_size = config.max_job_size,
        max_connections = ?config.max_connections,
        "spool is serving the beanstalkd protocol"
    );
    serve_until_signal(
        &config,
        listener,
        broker,
        signals.usr1.take(),
        connections,
        terminated,
    )
    .await;
    Ok(Served::Finished(log_thread))
}

/// `spool serve --database-url`: both front doors on a PostgreSQL broker
/// this node shares with the others on the same database.
async fn serve_postgres(
    config: ServeConfig,
    http_state: Arc<HttpState<PgBroker>>,
    connections: Connections,
) -> anyhow::Result<Served> {
    let StorageConfig::Postgres { url, node_id } = &config.storage else {
        anyhow::bail!("the PostgreSQL broker was asked to serve local storage");
    };
    let mut signals = Signals::install().context("installing signal handlers")?;
    let terminated = std::pin::pin!(signals.terminated());
    let node_id = node_id
        .clone()
        .unwrap_or_else(|| default_node_id(&config.listen));
    let mut pg = PgConfig::new(url.clone(), node_id.clone());
    pg.max_job_size = config.max_job_size;
    let process = ProcessInfo::new(BEANSTALKD_VERSION);
    pg.process_stats = Some(spool_pg::ProcessStatsSource::new(move || {
        process.snapshot()
    }));
    tracing::info!(node_id = %node_id, "connecting to the database");
    let broker = PgBroker::connect(pg, spool_pg::Clock::wall())
        .await
        .context("starting on the database (--database-url/SPOOL_DATABASE_URL)")?;
    let listener = bind(&config.listen)?;
    let pool = broker.clone();
    http_state.set_extra_metrics(Arc::new(move || {
        pool_metrics(&pool.pool_stats(), &pool.pool_acquire_wait())
    }));
    http_state.set_broker(broker.clone());
    tracing::info!(
        listen = %listener.local_addr(),
        storage = "postgres",
        node_id = %node_id,
        schema_version = spool_pg::SCHEMA_VERSION,
        max_job_size = config.max_job_size,
        max_connections = ?config.max_connections,
        "spool is serving the beanstalkd protocol"
    );
    serve_until_signal(
        &config,
        listener,
        broker,
        signals.usr1.take(),
        connections,
        terminated,
    )
    .await;
    Ok(Served::Finished(None))
}

/// A node's default name: the host and the beanstalkd address, so that
/// nodes on one machine differ and a restarted one is itself again.
fn default_node_id(listen: &ListenAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string());
    match listen {
        ListenAddr::Tcp(addr) => format!("{host}:{addr}"),
        ListenAddr::Unix(path) => format!("{host}:{}", path.display()),
    }
}

/// The database pool's figures in Prometheus text.
fn pool_metrics(stats: &PoolStats, acquire_wait: &spool_server::Histogram) -> String {
    let mut text = format!(
        "# HELP spool_db_pool_connections Database connections of this node's pool by state.\n\
         # TYPE spool_db_pool_connections gauge\n\
         spool_db_pool_connections{{state=\"busy\"}} {busy}\n\
         spool_db_pool_connections{{state=\"idle\"}} {idle}\n\
         # HELP spool_db_pool_max_connections Database connections the pool may open.\n\
         # TYPE spool_db_pool_max_connections gauge\n\
         spool_db_pool_max_connections {max}\n\
         # HELP spool_db_pool_waiting Operations waiting for a database connection now.\n\
         # TYPE spool_db_pool_waiting gauge\n\
         spool_db_pool_waiting {waiting}\n\
         # HELP spool_db_pool_acquire_timeouts_total Operations refused because no connection was free in time.\n\
         # TYPE spool_db_pool_acquire_timeouts_total counter\n\
         spool_db_pool_acquire_timeouts_total {timeouts}\n\
         # HELP spool_db_connect_errors_total Database connection attempts that failed.\n\
         # TYPE spool_db_connect_errors_total counter\n\
         spool_db_connect_errors_total {connect_errors}\n\
         # HELP spool_db_query_errors_total Operations that failed in the database.\n\
         # TYPE spool_db_query_errors_total counter\n\
         spool_db_query_errors_total {query_errors}\n",
        busy = stats.busy,
        idle = stats.idle,
        max = stats.max,
        waiting = stats.waiting,
        timeouts = stats.acquire_timeouts,
        connect_errors = stats.connect_errors,
        query_errors = stats.query_errors,
    );
    let mut histogram = Exposition::new();
    histogram.family(
        "spool_db_pool_acquire_seconds",
        MetricKind::Histogram,
        "How long operations waited for a database connection (those that gave up included).",
    );
    histogram.histogram(
        "spool_db_pool_acquire_seconds",
        &[],
        HistogramSample {
            upper_bounds: acquire_wait.bounds(),
            bucket_counts: acquire_wait.bucket_counts(),
            sum: acquire_wait.sum(),
            count: acquire_wait.count(),
        },
    );
    text.push_str(&histogram.finish());
    text
}

/// Serves beanstalkd connections on `broker` until SIGTERM or SIGINT, then
/// shuts down: readiness goes false, puts are refused, blocked reserves
/// are answered, idle sessions close, and workers holding jobs get the
/// grace period to finish them.
async fn serve_until_signal<B: Broker>(
    config: &ServeConfig,
    listener: BeanstalkListener,
    broker: B,
    usr1: Option<tokio::signal::unix::Signal>,
    connections: Connections,
    terminated: impl std::future::Future<Output = ()>,
) {
    if let Some(mut usr1) = usr1 {
        // /readyz reads the drain from the broker's health.
        let broker = broker.clone();
        tokio::spawn(async move {
            while usr1.recv().await.is_some() {
                tracing::info!("SIGUSR1: draining, new jobs are refused");
                broker.set_draining(true);
            }
        });
    }
    beanstalk::serve(
        listener,
        broker.clone(),
        BeanstalkConfig {
            max_job_size: config.max_job_size,
            request_timeout: config.request_timeout,
            write_timeout: config.write_timeout,
        },
        connections.clone(),
        terminated,
    )
    .await;

    // SIGTERM or SIGINT: the listener is closed. Readiness goes false, puts
    // are refused, blocked reserves are answered, idle sessions close, and
    // workers holding jobs get the grace period to finish them. /readyz
    // says shutting_down from broker.begin_shutdown() on (its health flag
    // is set at once; nothing here awaits before it).
    connections.begin_shutdown();
    broker.begin_shutdown();
    // Each session polled again: an idle one closes now (see
    // `Broker::begin_shutdown`).
    connections.wake_all();
    let holding = connections.active(Protocol::Beanstalk);
    tracing::info!(
        connections = holding,
        grace_ms = config.shutdown_grace.as_millis() as u64,
        "shutting down: refusing new jobs, waiting for reserved jobs to finish"
    );
    let finished = tokio::time::timeout(
        config.shutdown_grace,
        connections.wait_until_none(Protocol::Beanstalk),
    )
    .await
    .is_ok();
    if !finished {
        let remaining = broker
            .snapshot(spool_server::SnapshotScope::Full)
            .await
            .map(|s| {
                s.sessions
                    .iter()
                    .map(|session| session.reserved_count)
                    .sum::<u64>()
            });
        tracing::warn!(
            connections = connections.active(Protocol::Beanstalk),
            reserved_jobs = ?remaining.ok(),
            "grace period over: closing the remaining connections; their jobs go back to ready"
        );
        connections.close_all();
        let _ = tokio::time::timeout(
            CLOSE_ALL_WAIT,
            connections.wait_until_none(Protocol::Beanstalk),
        )
        .await;
    }
    tracing::info!("connections closed; syncing the log");
}

/// How `serve` ended.
enum Served {
    /// Served until a signal; the log thread (if any) syncs and ends once
    /// the runtime is dropped.
    Finished(Option<std::thread::JoinHandle<()>>),
    /// A signal arrived while the log was replayed; the replay was stopped
    /// (and has ended) with nothing changed.
    StoppedDuringRecovery,
}

/// The signals `spool serve` acts on, installed before recovery.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
    usr1: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: Some(signal(SignalKind::terminate())?),
            int: Some(signal(SignalKind::interrupt())?),
            usr1: Some(signal(SignalKind::user_defined1())?),
        })
    }

    /// Completes at the first SIGTERM or SIGINT.
    fn terminated(&mut self) -> impl std::future::Future<Output = ()> {
        let term = self.term.take();
        let int = self.int.take();
        async move {
            let (Some(mut term), Some(mut int)) = (term, int) else {
                return std::future::pending().await;
            };
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = int.recv() => tracing::info!("SIGINT"),
            }
        }
    }
}

fn bind(listen: &ListenAddr) -> anyhow::Result<BeanstalkListener> {
    match listen {
        ListenAddr::Tcp(addr) => {
            // The kernel caps the backlog silently; say what it is, since
            // a burst of reconnecting clients larger than it is dropped.
            let (backlog, somaxconn) =
                spool_server::net::effective_backlog(beanstalk::LISTEN_BACKLOG);
            let listener = spool_server::net::bind_tcp(*addr, backlog)
                .with_context(|| format!("binding {addr}"))?;
            let somaxconn = somaxconn.map_or_else(|| "unknown".to_string(), |v| v.to_string());
            if backlog < beanstalk::LISTEN_BACKLOG {
                tracing::warn!(
                    "listen backlog {backlog} (asked for {}, capped by net.core.somaxconn = {somaxconn}): \
                     raise the sysctl so bursts of connections are not dropped",
                    beanstalk::LISTEN_BACKLOG
                );
            } else {
                tracing::info!("listen backlog {backlog} (net.core.somaxconn = {somaxconn})");
            }
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
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("24h"), Some(DURATION_SETTING_MAX));
        for bad in ["25h", "", "s", "1.5s", "-1s", "1d", "18446744073709551615h"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

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
