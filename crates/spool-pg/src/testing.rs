//! A private PostgreSQL cluster for tests: `initdb` into a temporary
//! directory, reachable only through a unix socket in that directory (no
//! TCP port at all), started once per test process and stopped, with its
//! directory removed, when that process exits. Each test takes a fresh
//! database of its own, so tests run in parallel.
//!
//! It never uses a server someone left running. When PostgreSQL's
//! binaries are missing it panics naming the package to install: a test
//! that cannot run fails and says why.

// Test support shipped as a library: a failed setup is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// The socket's port number: only names the socket file in our private
/// directory, so any fixed number will do.
const SOCKET_PORT: u16 = 5432;

/// Readiness checks before giving up on a starting server, one every
/// [`START_CHECK_INTERVAL`]: a minute in all.
const START_CHECKS_MAX: u32 = 600;
const START_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Connections the test server accepts: every test of a binary at once,
/// each with a small pool, a listener and a migration connection.
const MAX_CONNECTIONS: u32 = 400;

/// The cluster of this test process.
#[derive(Debug)]
pub struct TestCluster {
    bin: PathBuf,
    dir: PathBuf,
    /// Runs the server; its stdin is the tie to this process: when it
    /// closes (we exit, however), the watchdog stops the server.
    _watchdog: Mutex<Child>,
    run_as: Option<&'static str>,
    next_db: AtomicU64,
    /// The server's command-line options, for starting it again.
    options: String,
}

/// Where PostgreSQL's server binaries are: the newest version installed.
fn find_bin() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): \
             install the Debian package `postgresql` (apt-get install postgresql); \
             scripts/test.sh does this"
        ),
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A command for a PostgreSQL binary, run as `user` when given (the server
/// refuses to run as root).
fn pg_command(bin: &Path, program: &str, user: Option<&str>) -> Command {
    match user {
        Some(user) => {
            let mut command = Command::new("runuser");
            command.args(["-u", user, "--"]).arg(bin.join(program));
            command
        }
        None => Command::new(bin.join(program)),
    }
}

fn run(mut command: Command, what: &str) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestCluster {
    /// The cluster of this process, started on first use.
    pub fn shared() -> &'static TestCluster {
        static CLUSTER: OnceLock<TestCluster> = OnceLock::new();
        CLUSTER.get_or_init(|| TestCluster::start(""))
    }

    /// A cluster of the caller's own, for a test that stops and starts
    /// the server (the shared one serves every other test meanwhile).
    /// Stopped, with its directory removed, when dropped or when the
    /// process exits.
    pub fn private() -> TestCluster {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        TestCluster::start(&format!("private{}", NEXT.fetch_add(1, Ordering::Relaxed)))
    }

    fn start(name: &str) -> TestCluster {
        let bin = find_bin();
        let run_as = is_root().then_some("postgres");
        let dir = std::env::temp_dir().join(format!("spool-pg-test-{}{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("socket")).unwrap();
        if let Some(user) = run_as {
            run(
                {
                    let mut c = Command::new("chown");
                    c.args(["-R", user]).arg(&dir);
                    c
                },
                "chown the test cluster's directory",
            );
        }
        let data = dir.join("data");
        let mut initdb = pg_command(&bin, "initdb", run_as);
        initdb.arg("-D").arg(&data).args([
            "-U",
            "spool",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        run(initdb, "initdb");
        // The watchdog: starts the server, waits for its stdin to close,
        // then stops the server and removes the directory.
        let postgres = bin.join("postgres");
        let pg_ctl = bin.join("pg_ctl");
        let as_user = run_as.map_or(String::new(), |u| format!("runuser -u {u} -- "));
        let options = format!(
            "-k {socket} -p {SOCKET_PORT} -c listen_addresses= \
             -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
             -c max_connections={MAX_CONNECTIONS}",
            socket = dir.join("socket").display(),
        );
        let script = format!(
            "{as_user}{postgres} -D {data} {options} >{log} 2>&1 &\n\
             cat >/dev/null\n\
             {as_user}{pg_ctl} -D {data} stop -m immediate >/dev/null 2>&1\n\
             wait\n\
             rm -rf {dir}\n",
            postgres = postgres.display(),
            pg_ctl = pg_ctl.display(),
            data = data.display(),
            log = dir.join("server.log").display(),
            dir = dir.display(),
        );
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the test cluster's watchdog: {e}"));
        // Keep the pipe open for the life of the process: `Child` is never
        // dropped (it lives in a static), and its stdin closes at exit.
        if let Some(stdin) = watchdog.stdin.as_mut() {
            let _ = stdin.flush();
        }
        let cluster = TestCluster {
            bin,
            dir,
            _watchdog: Mutex::new(watchdog),
            run_as,
            next_db: AtomicU64::new(0),
            options,
        };
        cluster.wait_ready();
        cluster
    }

    fn socket_dir(&self) -> PathBuf {
        self.dir.join("socket")
    }

    fn wait_ready(&self) {
        for _ in 0..START_CHECKS_MAX {
            let ready = Command::new(self.bin.join("pg_isready"))
                .arg("-h")
                .arg(self.socket_dir())
                .args(["-p", &SOCKET_PORT.to_string(), "-U", "spool", "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            std::thread::sleep(START_CHECK_INTERVAL);
        }
        let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        panic!("the test PostgreSQL did not start:\n{log}");
    }

    /// Stops the server (`pg_ctl stop -m fast`: sessions are ended, open
    /// transactions roll back), waiting until it is down.
    pub fn stop(&self) {
        let mut stop = pg_command(&self.bin, "pg_ctl", self.run_as);
        stop.arg("-D")
            .arg(self.dir.join("data"))
            .args(["stop", "-m", "fast", "-w"]);
        run(stop, "pg_ctl stop");
    }

    /// Starts the stopped server again, with the options it first had,
    /// and waits until it accepts connections.
    pub fn start_again(&self) {
        let mut start = pg_command(&self.bin, "pg_ctl", self.run_as);
        start
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("server-again.log"))
            .args(["-w", "-o", &self.options, "start"]);
        run(start, "pg_ctl start");
        self.wait_ready();
    }

    /// The connection string of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!(
            "host={} port={SOCKET_PORT} user=spool dbname={name}",
            self.socket_dir().display()
        )
    }

    /// Runs `sql` in database `name` with `psql`, as the cluster's owner.
    pub fn psql(&self, name: &str, sql: &str) {
        let mut psql = pg_command(&self.bin, "psql", self.run_as);
        psql.arg("-h")
            .arg(self.socket_dir())
            .args(["-p", &SOCKET_PORT.to_string(), "-U", "spool", "-d", name])
            .args(["-v", "ON_ERROR_STOP=1", "-c", sql]);
        run(psql, "psql");
    }

    /// A fresh, empty database; returns its connection string.
    pub fn create_database(&self) -> String {
        let name = format!("t{}", self.next_db.fetch_add(1, Ordering::Relaxed));
        let mut createdb = pg_command(&self.bin, "createdb", self.run_as);
        createdb.arg("-h").arg(self.socket_dir()).args([
            "-p",
            &SOCKET_PORT.to_string(),
            "-U",
            "spool",
            &name,
        ]);
        run(createdb, "createdb");
        self.url(&name)
    }
}
