//! Durable storage through the real binary: what a restart keeps, where the
//! data lives by default, and that two servers cannot share a data
//! directory. Kill -9 under load is `crash.rs`.

mod support;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{clear_spool_env, spool_bin, wait_output, Addr, Client, Server, TempDir};

/// A `spool serve` child with a data directory, killed with SIGKILL on drop.
struct Durable {
    child: Child,
    addr: Addr,
}

impl Durable {
    fn start(dir: &Path, extra: &[&str]) -> Durable {
        Self::start_in(None, &["-b", dir.to_str().expect("utf-8 path")], extra)
    }

    /// Starts `spool serve ARGS EXTRA`, optionally in working directory `cwd`.
    fn start_in(cwd: Option<&Path>, args: &[&str], extra: &[&str]) -> Durable {
        Self::start_env(cwd, args, extra, &[])
    }

    /// [`Durable::start_in`] with extra environment variables.
    fn start_env(
        cwd: Option<&Path>,
        args: &[&str],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Durable {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("picking a port")
            .port();
        let mut cmd = Command::new(spool_bin());
        clear_spool_env(&mut cmd);
        cmd.arg("serve")
            .args(args)
            .args(["-l", "127.0.0.1", "-p", &port.to_string()])
            .args(["--http-listen", "127.0.0.1:0"])
            .args(extra)
            .env("SPOOL_LOG_LEVEL", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(cwd) = cwd {
            cmd.current_dir(cwd);
        }
        let mut child = cmd.spawn().expect("spawning spool");
        let addr = Addr::Tcp(SocketAddr::from(([127, 0, 0, 1], port)));
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("spool exited before listening: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "spool did not listen within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Durable { child, addr }
    }

    fn client(&self) -> Client {
        Client::connect(&self.addr)
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Durable {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stat(c: &mut Client, id: u64, key: &str) -> String {
    c.send(format!("stats-job {id}\r\n"));
    let reply = c.reply();
    reply
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}: ")).map(str::to_string))
        .unwrap_or_else(|| panic!("no {key} in {reply:?}"))
}

#[test]
fn a_restart_after_kill_9_keeps_every_acknowledged_change() {
    let dir = TempDir::new("durable");
    let server = Durable::start(dir.path(), &[]);
    let mut c = server.client();
    let ready = c.put(5, 0, 60, b"ready job");
    let delayed = c.put(1, 100, 60, b"delayed job");
    let buried = c.put(2, 0, 60, b"buried job");
    c.expect(
        format!("reserve-job {buried}\r\n"),
        &format!("RESERVED {buried} 10\r\nburied job\r\n"),
    );
    c.expect(format!("bury {buried} 9\r\n"), "BURIED\r\n");
    c.expect("use other\r\n", "USING other\r\n");
    let other = c.put(0, 0, 60, b"in other");
    let deleted = c.put(0, 0, 60, b"deleted");
    c.expect(format!("delete {deleted}\r\n"), "DELETED\r\n");
    let reserved = c.put(7, 0, 60, b"reserved");
    c.expect(
        format!("reserve-job {reserved}\r\n"),
        &format!("RESERVED {reserved} 8\r\nreserved\r\n"),
    );
    let released = c.put(0, 0, 60, b"released");
    c.expect(
        format!("reserve-job {released}\r\n"),
        &format!("RESERVED {released} 8\r\nreleased\r\n"),
    );
    c.expect(format!("release {released} 3 50\r\n"), "RELEASED\r\n");
    server.kill();

    let server = Durable::start(dir.path(), &[]);
    let mut c = server.client();
    c.expect(
        format!("peek {ready}\r\n"),
        &format!("FOUND {ready} 9\r\nready job\r\n"),
    );
    assert_eq!(stat(&mut c, ready, "state"), "ready");
    assert_eq!(stat(&mut c, ready, "pri"), "5");
    assert_eq!(stat(&mut c, delayed, "state"), "delayed");
    let left: u64 = stat(&mut c, delayed, "time-left").parse().expect("number");
    assert!((90..100).contains(&left), "delay kept its due time: {left}");
    assert_eq!(stat(&mut c, buried, "state"), "buried");
    assert_eq!(stat(&mut c, buried, "pri"), "9");
    assert_eq!(stat(&mut c, other, "tube"), "other");
    c.expect(format!("peek {deleted}\r\n"), "NOT_FOUND\r\n");
    // Reservations are not durable: the job is ready again.
    assert_eq!(stat(&mut c, reserved, "state"), "ready");
    assert_eq!(stat(&mut c, released, "state"), "delayed");
    assert_eq!(stat(&mut c, released, "pri"), "3");
    // Ids are never reused.
    let next = c.put(0, 0, 60, b"after restart");
    assert!(next > released, "id {next} after {released}");
    c.expect(format!("kick-job {buried}\r\n"), "KICKED\r\n");
    server.kill();

    // The kick survives a second restart too.
    let server = Durable::start(dir.path(), &[]);
    let mut c = server.client();
    assert_eq!(stat(&mut c, buried, "state"), "ready");
    assert_eq!(stat(&mut c, next, "state"), "ready");
}

#[test]
fn every_fsync_policy_survives_a_process_kill() {
    for policy in ["always", "interval:20", "never"] {
        let dir = TempDir::new("policy");
        let server = Durable::start(dir.path(), &["--fsync", policy]);
        let mut c = server.client();
        let ids: Vec<u64> = (0..50)
            .map(|i| c.put(0, 0, 60, format!("job {i}").as_bytes()))
            .collect();
        // The OS has every acknowledged write: a process kill loses none.
        server.kill();
        let server = Durable::start(dir.path(), &["--fsync", policy]);
        let mut c = server.client();
        for (i, id) in ids.iter().enumerate() {
            let body = format!("job {i}");
            c.expect(
                format!("peek {id}\r\n"),
                &format!("FOUND {id} {}\r\n{body}\r\n", body.len()),
            );
        }
    }
}

#[test]
fn the_default_data_dir_is_spool_data_in_the_working_directory() {
    let cwd = TempDir::new("cwd");
    let server = Durable::start_in(Some(cwd.path()), &[], &[]);
    let mut c = server.client();
    let id = c.put(0, 0, 60, b"kept");
    server.kill();
    assert!(
        cwd.path().join("spool-data").is_dir(),
        "spool-data was created in the working directory"
    );
    let server = Durable::start_in(Some(cwd.path()), &[], &[]);
    server.client().expect(
        format!("peek {id}\r\n"),
        &format!("FOUND {id} 4\r\nkept\r\n"),
    );
}

#[test]
fn two_servers_cannot_share_a_data_directory() {
    let dir = TempDir::new("locked");
    let _first = Durable::start(dir.path(), &[]);
    let mut cmd = Command::new(spool_bin());
    clear_spool_env(&mut cmd);
    cmd.args([
        "serve",
        "-b",
        dir.path().to_str().expect("utf-8"),
        "-p",
        "0",
        "--http-listen",
        "127.0.0.1:0",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let out = wait_output(cmd.spawn().expect("spawning"), Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(1), "second server exits 1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("lock"),
        "the error says the directory is locked: {stderr}"
    );
}

#[test]
fn an_unusable_data_dir_is_a_clear_error() {
    let dir = TempDir::new("file");
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").expect("writing a file");
    let mut cmd = Command::new(spool_bin());
    clear_spool_env(&mut cmd);
    cmd.args(["serve", "-b", file.to_str().expect("utf-8"), "-p", "0"])
        .args(["--http-listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = wait_output(cmd.spawn().expect("spawning"), Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not-a-dir"),
        "the error names the path: {stderr}"
    );
}

/// Bytes of the log's segment files (not the space reserve, which holds
/// room for future deletes on purpose).
fn log_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("reading the data dir")
        .map(|e| e.expect("dir entry"))
        .filter(|e| e.file_name().to_string_lossy().ends_with(".wal"))
        .map(|e| e.metadata().expect("metadata").len())
        .sum()
}

/// Puts `count` jobs in one pipelined write and returns their ids.
fn put_many(c: &mut Client, count: usize, body: &[u8]) -> Vec<u64> {
    let mut wire = Vec::new();
    for _ in 0..count {
        wire.extend_from_slice(format!("put 0 0 60 {}\r\n", body.len()).as_bytes());
        wire.extend_from_slice(body);
        wire.extend_from_slice(b"\r\n");
    }
    c.send(&wire);
    (0..count)
        .map(|_| {
            let line = c.reply();
            line.trim_end()
                .strip_prefix("INSERTED ")
                .and_then(|id| id.parse().ok())
                .unwrap_or_else(|| panic!("put answered {line:?}"))
        })
        .collect()
}

fn delete_many(c: &mut Client, ids: &[u64]) {
    let wire: String = ids.iter().map(|id| format!("delete {id}\r\n")).collect();
    c.send(wire.as_bytes());
    for id in ids {
        assert_eq!(c.reply(), "DELETED\r\n", "delete {id}");
    }
}

#[test]
fn compaction_keeps_disk_use_near_the_live_data_and_loses_nothing() {
    const SEGMENT: u64 = 1 << 20;
    const LIVE: usize = 500;
    let dir = TempDir::new("compact");
    let args = ["-s", "1048576", "--fsync", "never"];
    let server = Durable::start(dir.path(), &args);
    let mut c = server.client();
    let body = vec![b'x'; 2000];
    let mut live = put_many(&mut c, LIVE, &body);
    let live_bytes = LIVE as u64 * spool_engine::job_record_log_bytes("default".len(), body.len());
    // Churn ten times the live set through the log.
    for _ in 0..10 {
        let fresh = put_many(&mut c, LIVE, &body);
        delete_many(&mut c, &live);
        live = fresh;
    }
    // Compaction runs in the background; give it a moment to finish.
    let bound = 2 * live_bytes + SEGMENT;
    let deadline = Instant::now() + Duration::from_secs(60);
    while log_bytes(dir.path()) > bound && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let used = log_bytes(dir.path());
    eprintln!("disk use after 10x churn: {used} bytes for {live_bytes} bytes of live jobs");
    assert!(
        used <= bound,
        "{used} bytes on disk for {live_bytes} bytes of live jobs (bound {bound})"
    );
    server.kill();

    let server = Durable::start(dir.path(), &args);
    let mut c = server.client();
    c.send("stats\r\n");
    let stats = c.reply();
    assert!(
        stats.contains(&format!("current-jobs-ready: {LIVE}\n")),
        "exactly the live jobs came back: {stats}"
    );
    for id in live {
        c.send(format!("peek {id}\r\n"));
        assert!(c.reply().starts_with(&format!("FOUND {id} 2000\r\n")));
    }
}

/// A small tmpfs mounted for one test; unmounted on drop. Mounting needs
/// root, which the test command has (it installs packages too).
struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = TempDir::new("tmpfs");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "this test fills a small tmpfs and must be able to mount one (run as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn a_full_disk_refuses_puts_keeps_deletes_working_and_recovers() {
    let disk = Tmpfs::mount("6m");
    let data = disk.path().join("data");
    std::fs::create_dir(&data).expect("creating the data dir");
    let args = ["-s", "1048576"];
    // The support module's server: this test reads its HTTP side too.
    let server = Server::start_durable(&data, &args);
    let mut c = server.client();
    let body = vec![b'f'; 8000];
    let mut ids = Vec::new();
    let mut refused = false;
    for _ in 0..2000 {
        c.send(format!("put 0 0 60 {}\r\n", body.len()));
        c.send(&body);
        c.send("\r\n");
        let reply = c.reply();
        if reply == "OUT_OF_MEMORY\r\n" {
            refused = true;
            break;
        }
        let id = reply
            .trim_end()
            .strip_prefix("INSERTED ")
            .and_then(|id| id.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("put answered {reply:?}"));
        ids.push(id);
    }
    assert!(refused, "a 6 MB disk cannot take 16 MB of jobs");
    assert!(!ids.is_empty(), "some jobs fit");
    // Still ready (reserves and deletes work, and deletes free the space),
    // but the probe and the metrics say the disk is full.
    let ready = server.http("GET", "/readyz", "");
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert!(ready.body.contains("disk_full"), "{}", ready.body);
    assert!(
        server
            .http("GET", "/metrics", "")
            .body
            .lines()
            .any(|l| l == "spool_disk_full 1"),
        "spool_disk_full 1 in /metrics"
    );
    // Every acknowledged job is readable; deletes work on the full disk.
    for id in &ids {
        c.send(format!("peek {id}\r\n"));
        assert!(c.reply().starts_with(&format!("FOUND {id} ")));
    }
    delete_many(&mut c, &ids);
    // Compaction frees the deleted jobs' space; then puts work again.
    let deadline = Instant::now() + Duration::from_secs(15);
    let after = loop {
        c.send("put 0 0 60 5\r\nagain\r\n");
        let reply = c.reply();
        if let Some(id) = reply.trim_end().strip_prefix("INSERTED ") {
            break id.parse::<u64>().expect("id");
        }
        assert_eq!(reply, "OUT_OF_MEMORY\r\n");
        assert!(
            Instant::now() < deadline,
            "puts did not resume after space returned"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let ready = server.http("GET", "/readyz", "");
    assert!(!ready.body.contains("disk_full"), "{}", ready.body);
    drop(server);
    // Nothing was corrupted: the log opens and holds exactly the new job.
    let server = Durable::start(&data, &args);
    let mut c = server.client();
    c.send("stats\r\n");
    assert!(c.reply().contains("current-jobs-ready: 1\n"));
    c.expect(
        format!("peek {after}\r\n"),
        &format!("FOUND {after} 5\r\nagain\r\n"),
    );
    drop(c);
    drop(server);
}

/// `spool serve -b DIR` run to its exit (it must not start): its exit code
/// and stderr.
fn serve_must_fail(dir: &Path) -> (Option<i32>, String) {
    let mut cmd = Command::new(spool_bin());
    clear_spool_env(&mut cmd);
    cmd.args(["serve", "-b", dir.to_str().expect("utf-8"), "-p", "0"])
        .args(["--http-listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = wait_output(cmd.spawn().expect("spawning"), Duration::from_secs(60));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn segment_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("reading the data dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".wal"))
        .collect();
    names.sort();
    names
}

#[test]
fn a_missing_segment_file_stops_the_start_until_the_loss_is_accepted() {
    let dir = TempDir::new("missing");
    // 1 MiB segments and 60 kB bodies: the jobs span two segments.
    let args = ["-s", "1048576", "-z", "65535"];
    let server = Durable::start(dir.path(), &args);
    let mut c = server.client();
    let body = vec![b'j'; 60_000];
    let ids = put_many(&mut c, 20, &body);
    server.kill();
    let segments = segment_files(dir.path());
    assert!(segments.len() >= 2, "{segments:?}");
    let newest = segments.last().expect("a segment").clone();
    std::fs::remove_file(dir.path().join(&newest)).expect("removing the newest segment");

    // Refused, naming the file, and saying how to go on.
    let (code, stderr) = serve_must_fail(dir.path());
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&newest),
        "the error names {newest}: {stderr}"
    );
    assert!(stderr.contains("--accept-data-loss"), "{stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one line on stderr: {stderr}"
    );
    // Refusing changed nothing.
    let (code, _) = serve_must_fail(dir.path());
    assert_eq!(code, Some(1));

    // Accepted (the env twin): the jobs of the segments left are served.
    let server = Durable::start_env(
        None,
        &["-b", dir.path().to_str().expect("utf-8")],
        &args,
        &[("SPOOL_ACCEPT_DATA_LOSS", "true")],
    );
    let mut c = server.client();
    let ready: usize = c.stats_map("stats\r\n")["current-jobs-ready"]
        .parse()
        .expect("a number");
    assert!(
        ready > 0 && ready < ids.len(),
        "{ready} of {} jobs",
        ids.len()
    );
    c.expect(
        format!("peek {}\r\n", ids[0]),
        &format!("FOUND {} 60000\r\n{}\r\n", ids[0], "j".repeat(60_000)),
    );
    server.kill();
    // The loss was recorded: the next start needs no flag.
    let server = Durable::start(dir.path(), &args);
    let ready_again: usize = server.client().stats_map("stats\r\n")["current-jobs-ready"]
        .parse()
        .expect("a number");
    assert_eq!(ready_again, ready);
}

#[test]
fn a_data_directory_of_the_previous_format_starts_with_every_job() {
    // Written by spool 0.1.0 (segment format 1, no MANIFEST): jobs 1 ready,
    // 2 delayed for decades, 3 buried, 4 in tube "other", 5 deleted, 6
    // released at priority 3, 7 with a binary body; closed with SIGTERM.
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1_data_dir");
    let dir = TempDir::new("v1");
    for entry in std::fs::read_dir(&fixture).expect("the fixture") {
        let entry = entry.expect("dir entry");
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copying");
    }
    for round in 0..2 {
        let server = Durable::start(dir.path(), &[]);
        let mut c = server.client();
        c.expect("peek 1\r\n", "FOUND 1 9\r\nready job\r\n");
        assert_eq!(stat(&mut c, 1, "pri"), "5");
        assert_eq!(stat(&mut c, 2, "state"), "delayed");
        c.expect("peek 2\r\n", "FOUND 2 11\r\ndelayed job\r\n");
        assert_eq!(stat(&mut c, 3, "state"), "buried");
        assert_eq!(stat(&mut c, 3, "pri"), "9");
        assert_eq!(stat(&mut c, 4, "tube"), "other");
        c.expect("peek 5\r\n", "NOT_FOUND\r\n");
        assert_eq!(stat(&mut c, 6, "state"), "ready");
        assert_eq!(stat(&mut c, 6, "pri"), "3");
        assert_eq!(stat(&mut c, 7, "pri"), "4294967295");
        c.send("peek 7\r\n");
        assert_eq!(c.reply_bytes(), b"FOUND 7 5\r\n\x00\x01\r\n\xff\r\n");
        if round == 0 {
            // Ids go on after the old ones.
            assert_eq!(c.put(0, 0, 60, b"new"), 8);
        } else {
            c.expect("peek 8\r\n", "FOUND 8 3\r\nnew\r\n");
        }
        server.kill();
    }
    // Upgraded in place: the old segment is kept as it was, new records
    // went to a new segment, and the MANIFEST now guards them all.
    assert_eq!(
        std::fs::read(dir.path().join("0000000000000001.wal")).expect("segment 1"),
        std::fs::read(fixture.join("0000000000000001.wal")).expect("fixture")
    );
    assert!(dir.path().join("MANIFEST").exists());
    std::fs::remove_file(dir.path().join("0000000000000001.wal")).expect("removing");
    let (code, stderr) = serve_must_fail(dir.path());
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("0000000000000001.wal"), "{stderr}");
}

#[test]
fn a_data_directory_of_the_job_api_release_starts_with_every_field() {
    // Written by the release before schedules and workflows (commit
    // f08308b, record payload version 2) with make_v2_data_dir.py: a queue
    // policy; jobs 1 ready with headers and a key, 2 delayed with a binary
    // payload, 3 failed once and retrying, 4 completed with a result, 5
    // cancelled, 6 buried by hand, 7 put over beanstalkd. The expected file
    // is how that release showed them after a restart.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("v2_data_dir.expected.json")).expect("expected"),
    )
    .expect("expected JSON");
    let dir = TempDir::new("v2");
    for entry in std::fs::read_dir(fixtures.join("v2_data_dir")).expect("the fixture") {
        let entry = entry.expect("dir entry");
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copying");
    }
    for round in 0..2 {
        let server = Server::start_durable(dir.path(), &[]);
        for old in expected["jobs"].as_array().expect("jobs") {
            let id = old["id"].as_u64().expect("id");
            let reply = server.http("GET", &format!("/v1/jobs/{id}"), "");
            assert_eq!(reply.status, 200, "job {id}: {}", reply.body);
            let now = reply.json();
            // Every field the old release showed, with the same value
            // (versions and instants included); later releases may add some.
            for (field, value) in old.as_object().expect("a job object") {
                // A job put over beanstalkd logs no update time (it carries
                // no job-API fields); every release shows when it was
                // replayed.
                if old["queue"] == "legacy" && field == "updated_at" {
                    continue;
                }
                assert_eq!(&now[field], value, "job {id}, field {field}: {now}");
            }
        }
        let queue = server.http("GET", "/v1/queues/orders", "").json();
        assert_eq!(queue["policy"], expected["policy"], "{queue}");
        // The idempotency key still holds.
        let again = server.http(
            "POST",
            "/v1/queues/orders/jobs",
            r#"{"payload": {"order": 1}, "idempotency_key": "order-1"}"#,
        );
        assert_eq!(again.status, 200, "{}", again.body);
        assert_eq!(again.json()["id"], 1);
        if round == 0 {
            // Ids go on after the old ones.
            let new = server.http("POST", "/v1/queues/orders/jobs", r#"{"payload": 8}"#);
            assert_eq!(new.status, 201, "{}", new.body);
            assert_eq!(new.json()["id"], 8);
        } else {
            assert_eq!(server.http("GET", "/v1/jobs/8", "").json()["payload"], 8);
        }
    }
}

/// Size of the disk the full-disk scenario fills: the user's report.
const FULL_DISK_SIZE: &str = "64m";
/// Job body size in the full-disk scenario (the user's 5,000 bytes).
const FULL_DISK_BODY_BYTES: usize = 5000;
/// More puts than a 64 MiB disk can hold at 5,000 bytes each (about
/// 13,000), so the fill loop ends by the disk, not the bound.
const FULL_DISK_PUTS_MAX: usize = 20_000;
/// Puts pipelined per write while filling: fast, and few enough that the
/// replies after the first refusal are few.
const FULL_DISK_PUT_CHUNK: usize = 50;
/// Generous bound for each phase of the scenario on a loaded machine; the
/// test polls and never asserts on timing.
const FULL_DISK_PHASE_LIMIT: Duration = Duration::from_secs(240);
/// `/readyz` is checked once per this many deletes.
const FULL_DISK_READY_EVERY: usize = 500;

/// Puts `body` until the server refuses with `OUT_OF_MEMORY`; returns the
/// ids acknowledged. Bounded in count and time.
fn fill_disk(c: &mut Client, body: &[u8]) -> Vec<u64> {
    let deadline = Instant::now() + FULL_DISK_PHASE_LIMIT;
    let mut ids = Vec::new();
    let mut wire = Vec::new();
    for _ in 0..FULL_DISK_PUT_CHUNK {
        wire.extend_from_slice(format!("put 0 0 60 {}\r\n", body.len()).as_bytes());
        wire.extend_from_slice(body);
        wire.extend_from_slice(b"\r\n");
    }
    while ids.len() < FULL_DISK_PUTS_MAX {
        assert!(
            Instant::now() < deadline,
            "the disk did not fill within {FULL_DISK_PHASE_LIMIT:?}"
        );
        c.send(&wire);
        let mut refused = false;
        for _ in 0..FULL_DISK_PUT_CHUNK {
            let reply = c.reply();
            if reply == "OUT_OF_MEMORY\r\n" {
                refused = true;
                continue;
            }
            let id = reply
                .trim_end()
                .strip_prefix("INSERTED ")
                .and_then(|id| id.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("put answered {reply:?}"));
            ids.push(id);
        }
        if refused {
            return ids;
        }
    }
    panic!(
        "{} puts were all accepted on a {FULL_DISK_SIZE} disk",
        ids.len()
    );
}

/// `/readyz` answers 200: at most degraded by a full disk, never failed.
fn assert_ready(server: &Server, when: &str) {
    let ready = server.http("GET", "/readyz", "");
    assert_eq!(
        ready.status,
        200,
        "/readyz {when}: {}; server output: {}",
        ready.body,
        server.output_text()
    );
}

/// Deletes `ids` one request at a time, as the user did, asserting each
/// answers `DELETED` and that the server stays ready.
fn delete_one_by_one(server: &Server, c: &mut Client, ids: &[u64]) {
    for (n, id) in ids.iter().enumerate() {
        c.send(format!("delete {id}\r\n"));
        let reply = c.reply();
        assert_eq!(
            reply,
            "DELETED\r\n",
            "delete {id} (the {n}th) on a full disk; server output: {}",
            server.output_text()
        );
        if n % FULL_DISK_READY_EVERY == 0 {
            assert_ready(server, &format!("after {n} deletes"));
        }
    }
}

/// Puts until one is accepted (the space the deletes freed comes back in
/// the background), polling up to the phase limit; returns its id.
fn put_when_room(server: &Server, data: &Path, c: &mut Client, body: &[u8]) -> u64 {
    let deadline = Instant::now() + FULL_DISK_PHASE_LIMIT;
    loop {
        c.send(format!("put 0 0 60 {}\r\n", body.len()));
        c.send(body);
        c.send("\r\n");
        let reply = c.reply();
        if let Some(id) = reply.trim_end().strip_prefix("INSERTED ") {
            return id.parse().expect("id");
        }
        assert_eq!(reply, "OUT_OF_MEMORY\r\n", "{}", server.output_text());
        assert!(
            Instant::now() < deadline,
            "puts still refused {FULL_DISK_PHASE_LIMIT:?} after the deletes; \
             {} bytes of segments; server output: {}",
            log_bytes(data),
            server.output_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Which jobs a scenario deletes first.
#[derive(Debug, Clone, Copy)]
enum Order {
    /// Oldest first, as a queue's workers do: the oldest segments empty
    /// first.
    Oldest,
    /// Newest first: every old segment keeps a live job until the end, so
    /// only a compaction can give the space back.
    Newest,
}

/// The user's report: fill a 64 MiB disk with 5,000-byte jobs, delete them
/// all one by one, put again, fill again, delete some, and restart while
/// the disk is full.
fn full_disk_scenario(extra: &[&str], order: Order) {
    let disk = Tmpfs::mount(FULL_DISK_SIZE);
    let data = disk.path().join("data");
    std::fs::create_dir(&data).expect("creating the data dir");
    let server = Server::start_durable(&data, extra);
    let mut c = server.client();
    let body = vec![b'j'; FULL_DISK_BODY_BYTES];
    let mut ids = fill_disk(&mut c, &body);
    assert!(ids.len() > 1000, "only {} jobs fit", ids.len());
    assert_ready(&server, "on the full disk");
    if let Order::Newest = order {
        ids.reverse();
    }
    delete_one_by_one(&server, &mut c, &ids);
    assert_ready(&server, "after every job was deleted");
    // The deletes gave the space back without a restart.
    let first = put_when_room(&server, &data, &mut c, &body);
    assert_ready(&server, "after puts resumed");

    // Fill it again, delete the newest tenth (which frees no segment), and
    // fill what room that left: the restart finds the disk full.
    let mut jobs = vec![first];
    jobs.extend(fill_disk(&mut c, &body));
    assert!(jobs.len() > 1000, "only {} jobs fit again", jobs.len());
    let gone = jobs.split_off(jobs.len() - jobs.len() / 10);
    let newest_first: Vec<u64> = gone.iter().rev().copied().collect();
    delete_one_by_one(&server, &mut c, &newest_first);
    jobs.extend(fill_disk(&mut c, &body));
    let kept = jobs;
    drop(c);
    drop(server);

    let server = Server::start_durable(&data, extra);
    assert_ready(&server, "after the restart on the full disk");
    let mut c = server.client();
    let stats = c.stats_map("stats\r\n");
    assert_eq!(
        stats.get("current-jobs-ready").map(String::as_str),
        Some(kept.len().to_string().as_str()),
        "every job not deleted came back, and no other"
    );
    for id in &kept {
        c.send(format!("peek {id}\r\n"));
        let reply = c.reply();
        assert!(
            reply.starts_with(&format!("FOUND {id} {FULL_DISK_BODY_BYTES}\r\n")),
            "job {id} after the restart: {}",
            reply.lines().next().unwrap_or_default()
        );
    }
    for id in gone {
        c.expect(format!("peek {id}\r\n"), "NOT_FOUND\r\n");
    }
    // Deletes still work on the full disk after the restart.
    delete_one_by_one(&server, &mut c, &kept[..FULL_DISK_READY_EVERY]);
    assert_ready(&server, "after deletes following the restart");
}

#[test]
fn a_full_disk_with_small_segments_frees_space_as_jobs_are_deleted() {
    full_disk_scenario(&["--segment-size", "1048576"], Order::Oldest);
}

#[test]
fn a_full_disk_with_small_segments_frees_space_when_the_newest_jobs_go_first() {
    full_disk_scenario(&["--segment-size", "1048576"], Order::Newest);
}

#[test]
fn a_full_disk_with_default_segments_frees_space_as_jobs_are_deleted() {
    full_disk_scenario(&[], Order::Oldest);
}

/// Where a segment's records end: after its header and whole records, at
/// its zero-filled tail if it has one.
fn segment_records_end(bytes: &[u8]) -> usize {
    let mut at = 32;
    while at + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        if len == 0 && bytes[at + 4..at + 8] == [0; 4] {
            break;
        }
        at += 8 + len;
    }
    at
}

/// Most 64 KiB writes that fill what is left of the test's disk.
const FILLER_WRITES_MAX: usize = 2048;

#[test]
fn a_restart_on_a_full_disk_survives_a_segment_torn_while_created() {
    let disk = Tmpfs::mount(FULL_DISK_SIZE);
    let data = disk.path().join("data");
    std::fs::create_dir(&data).expect("creating the data dir");
    let args = ["--segment-size", "1048576"];
    let server = Server::start_durable(&data, &args);
    let mut c = server.client();
    let body = vec![b't'; FULL_DISK_BODY_BYTES];
    let ids = fill_disk(&mut c, &body);
    assert!(ids.len() > 1000, "only {} jobs fit", ids.len());
    drop(c);
    drop(server);
    // What a process killed while creating the next segment leaves (an
    // earlier release did this itself when the disk filled): the last
    // segment cut to its records, and a next one with no header yet.
    let last = std::fs::read_dir(&data)
        .expect("reading the data dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".wal"))
        .max()
        .expect("a segment");
    let path = data.join(&last);
    let end = segment_records_end(&std::fs::read(&path).expect("reading the segment"));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(end as u64))
        .expect("cutting the zero-filled tail");
    let seq = u64::from_str_radix(last.trim_end_matches(".wal"), 16).expect("segment number");
    let torn = data.join(format!("{:016x}.wal", seq + 1));
    std::fs::File::create(&torn).expect("creating the torn segment");
    // Not a block left, not even for a segment header.
    {
        use std::io::Write;
        let mut filler = std::fs::File::create(disk.path().join("filler")).expect("filler");
        let chunk = vec![0xf1u8; 64 << 10];
        let full = (0..FILLER_WRITES_MAX).any(|_| filler.write_all(&chunk).is_err());
        assert!(full, "the filler filled the disk");
    }

    let server = Server::start_durable(&data, &args);
    assert_ready(&server, "after a restart on a full disk");
    assert!(
        !torn.exists(),
        "the torn segment, which had no room for a header, was removed"
    );
    let mut c = server.client();
    let stats = c.stats_map("stats\r\n");
    assert_eq!(
        stats.get("current-jobs-ready").map(String::as_str),
        Some(ids.len().to_string().as_str()),
        "every acknowledged job came back"
    );
    for id in &ids {
        c.send(format!("peek {id}\r\n"));
        assert!(
            c.reply()
                .starts_with(&format!("FOUND {id} {FULL_DISK_BODY_BYTES}\r\n")),
            "job {id} survived"
        );
    }
    delete_one_by_one(&server, &mut c, &ids[..FULL_DISK_READY_EVERY]);
}
