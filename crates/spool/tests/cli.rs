//! `spool` command-line handling: flags and their environment twins, exit
//! codes (2 for a bad setting, with a message naming it), and the listener
//! forms. Every process run here is bounded in time.

mod support;

use std::os::unix::net::UnixListener;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::{clear_spool_env, run_spool, spool_bin, wait_output, Addr, Client, Server, TempDir};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts `out` exited with `code` and its stderr mentions every one of
/// `needles`.
fn assert_exit(out: &Output, code: i32, needles: &[&str]) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "exit status; stdout: {:?} stderr: {:?}",
        stdout(out),
        stderr(out)
    );
    for needle in needles {
        assert!(
            stderr(out).contains(needle),
            "stderr should mention {needle:?}: {:?}",
            stderr(out)
        );
    }
}

#[test]
fn data_dir_and_in_memory_conflict() {
    let out = run_spool(&["serve", "--in-memory", "-b", "/nonexistent/spool"], &[]);
    assert_exit(&out, 2, &["-b", "/nonexistent/spool", "--in-memory"]);
    let out = run_spool(
        &["serve", "--in-memory"],
        &[("SPOOL_DATA_DIR", "/nonexistent/spool")],
    );
    assert_exit(&out, 2, &["SPOOL_DATA_DIR", "/nonexistent/spool"]);
}

#[test]
fn bad_fsync_policies_exit_2() {
    for value in ["sometimes", "interval:0", "interval:x", "interval:"] {
        let out = run_spool(&["serve", "--fsync", value], &[]);
        assert_exit(&out, 2, &["SPOOL_FSYNC", value, "interval:<ms>"]);
    }
    let out = run_spool(&["serve"], &[("SPOOL_FSYNC", "often")]);
    assert_exit(&out, 2, &["SPOOL_FSYNC", "often"]);
    let out = run_spool(&["serve", "--fsync", "always", "-F"], &[]);
    assert_exit(&out, 2, &["-F", "--fsync"]);
    let out = run_spool(&["serve", "-f", "0"], &[]);
    assert_exit(&out, 2, &["-f 0"]);
    let out = run_spool(&["serve", "-s", "1000"], &[]);
    assert_exit(&out, 2, &["SPOOL_SEGMENT_SIZE", "1000"]);
}

#[test]
fn max_job_size_out_of_range_exits_2() {
    for value in ["0", "2000000000", "1073741825"] {
        let out = run_spool(&["serve", "--in-memory", "-z", value], &[]);
        assert_exit(&out, 2, &["SPOOL_MAX_JOB_SIZE", "-z", value, "1073741824"]);
    }
    let out = run_spool(&["serve", "--in-memory"], &[("SPOOL_MAX_JOB_SIZE", "0")]);
    assert_exit(&out, 2, &["SPOOL_MAX_JOB_SIZE"]);
}

#[test]
fn max_job_size_env_not_a_number_exits_2() {
    let out = run_spool(&["serve", "--in-memory"], &[("SPOOL_MAX_JOB_SIZE", "abc")]);
    assert_exit(&out, 2, &["abc"]);
}

#[test]
fn bad_env_values_name_the_variable() {
    // DESIGN §5: a bad env value gets a message naming the variable, the
    // value and what is expected, not only the flag it stands in for.
    let out = run_spool(&["serve", "--in-memory"], &[("SPOOL_MAX_JOB_SIZE", "abc")]);
    assert_exit(&out, 2, &["SPOOL_MAX_JOB_SIZE", "abc"]);
    let out = run_spool(&["serve"], &[("SPOOL_IN_MEMORY", "maybe")]);
    assert_exit(&out, 2, &["SPOOL_IN_MEMORY", "maybe"]);
    let out = run_spool(&["serve"], &[("SPOOL_ACCEPT_DATA_LOSS", "maybe")]);
    assert_exit(
        &out,
        2,
        &["SPOOL_ACCEPT_DATA_LOSS", "maybe", "true or false"],
    );
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
}

#[test]
fn accept_data_loss_and_in_memory_conflict() {
    let out = run_spool(&["serve", "--in-memory", "--accept-data-loss"], &[]);
    assert_exit(&out, 2, &["--accept-data-loss", "--in-memory"]);
}

#[test]
fn bad_listen_and_port_exit_2() {
    let out = run_spool(&["serve", "--in-memory", "-l", "nope"], &[]);
    assert_exit(&out, 2, &["SPOOL_LISTEN", "nope"]);
    let out = run_spool(&["serve", "--in-memory", "-l", "unix:"], &[]);
    assert_exit(&out, 2, &["unix:"]);
    let out = run_spool(&["serve", "--in-memory"], &[("SPOOL_LISTEN", "bogus")]);
    assert_exit(&out, 2, &["SPOOL_LISTEN", "bogus"]);
    let out = run_spool(&["serve", "--in-memory", "-p", "70000"], &[]);
    assert_exit(&out, 2, &["70000"]);
    let out = run_spool(&["serve", "--in-memory", "--no-such-flag"], &[]);
    assert_exit(&out, 2, &["--no-such-flag"]);
}

#[test]
fn version_flag() {
    let want = format!("spool {}", env!("CARGO_PKG_VERSION"));
    let out = run_spool(&["serve", "-v"], &[]);
    assert_exit(&out, 0, &[]);
    assert_eq!(stdout(&out).trim(), want);
    let out = run_spool(&["--version"], &[]);
    assert_exit(&out, 0, &[]);
    assert_eq!(stdout(&out).trim(), want);
}

#[test]
fn help_exits_0() {
    let out = run_spool(&["--help"], &[]);
    assert_exit(&out, 0, &[]);
    assert!(stdout(&out).contains("serve"), "{}", stdout(&out));
    let out = run_spool(&["serve", "--help"], &[]);
    assert_exit(&out, 0, &[]);
    for flag in ["--listen", "--port", "--in-memory", "--max-job-size"] {
        assert!(stdout(&out).contains(flag), "serve --help lacks {flag}");
    }
    // No verb at all is a usage error.
    let out = run_spool(&[], &[]);
    assert_exit(&out, 2, &[]);
}

#[test]
fn listen_on_a_unix_socket() {
    let server = Server::start_unix();
    let Addr::Unix(path) = server.addr().clone() else {
        unreachable!()
    };
    assert!(path.exists());
    let mut c = server.client();
    c.expect("put 0 0 60 2\r\nhi\r\n", "INSERTED 1\r\n");
    c.expect("reserve\r\n", "RESERVED 1 2\r\nhi\r\n");
    c.expect("delete 1\r\n", "DELETED\r\n");
}

/// Starts `spool serve` with `args` and `env`, waits until `path` accepts.
/// A server on a unix socket. Its output (logs and errors) goes to a file
/// beside the socket and is printed if the test fails, so a server that
/// closed a connection or exited says why.
struct UnixServer {
    child: Option<std::process::Child>,
    output_path: std::path::PathBuf,
}

impl UnixServer {
    /// Hands the process over, e.g. to wait for its exit.
    fn take(&mut self) -> std::process::Child {
        self.child.take().expect("the server process")
    }
}

impl Drop for UnixServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let output = std::fs::read_to_string(&self.output_path).unwrap_or_default();
            eprintln!("spool's output:\n{output}");
        }
    }
}

fn start_on_unix(args: &[&str], env: &[(&str, &str)], path: &std::path::Path) -> UnixServer {
    let output_path = path.with_extension("output");
    let output = std::fs::File::create(&output_path).expect("creating the output file");
    let output_too = output.try_clone().expect("cloning the output file");
    let mut cmd = Command::new(spool_bin());
    clear_spool_env(&mut cmd);
    cmd.args(args)
        .env("SPOOL_HTTP_LISTEN", "127.0.0.1:0")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(output)
        .stderr(output_too);
    let child = cmd.spawn().expect("spawning spool");
    let mut server = UnixServer {
        child: Some(child),
        output_path,
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return server;
        }
        let child = server.child.as_mut().expect("the server process");
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("spool exited early: {status}");
        }
        if std::time::Instant::now() >= deadline {
            panic!("spool did not listen on {} within 10 s", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn env_twins_configure_the_server() {
    let dir = TempDir::new("cli-env");
    let path = dir.path().join("env.sock");
    let listen = format!("unix:{}", path.display());
    let _server = start_on_unix(
        &["serve"],
        &[
            ("SPOOL_IN_MEMORY", "true"),
            ("SPOOL_LISTEN", &listen),
            ("SPOOL_MAX_JOB_SIZE", "10"),
        ],
        &path,
    );
    let mut c = Client::connect(&Addr::Unix(path.clone()));
    c.expect("put 0 0 60 11\r\n0123456789a\r\n", "JOB_TOO_BIG\r\n");
    c.expect("put 0 0 60 10\r\n0123456789\r\n", "INSERTED 1\r\n");
    assert_eq!(c.stats_map("stats\r\n")["max-job-size"], "10");
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let dir = TempDir::new("cli-stale");
    let path = dir.path().join("s.sock");
    // A socket file left behind by a listener that is gone.
    drop(UnixListener::bind(&path).expect("binding a socket"));
    assert!(path.exists());
    let listen = format!("unix:{}", path.display());
    let _server = start_on_unix(&["serve", "--in-memory", "-l", &listen], &[], &path);
    let mut c = Client::connect(&Addr::Unix(path.clone()));
    c.expect("list-tube-used\r\n", "USING default\r\n");
}

#[test]
fn a_regular_file_at_the_socket_path_is_left_alone() {
    let dir = TempDir::new("cli-file");
    let path = dir.path().join("not-a-socket");
    std::fs::write(&path, b"precious").expect("writing a file");
    let listen = format!("unix:{}", path.display());
    let out = run_spool(&["serve", "--in-memory", "-l", &listen], &[]);
    assert!(!out.status.success(), "spool started on a regular file");
    assert!(
        stderr(&out).contains("not a socket"),
        "stderr: {:?}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(&path).expect("file still there"), b"precious");
}

#[test]
fn a_port_in_use_is_an_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("binding");
    let port = taken.local_addr().expect("addr").port().to_string();
    let out = run_spool(
        &["serve", "--in-memory", "-l", "127.0.0.1", "-p", &port],
        &[],
    );
    assert_exit(&out, 1, &[&port]);
}

#[test]
fn sigterm_stops_the_server_and_removes_its_socket() {
    let dir = TempDir::new("cli-term");
    let path = dir.path().join("s.sock");
    let listen = format!("unix:{}", path.display());
    let mut server = start_on_unix(&["serve", "--in-memory", "-l", &listen], &[], &path);
    let child = server.take();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -TERM failed");
    let out = wait_output(child, Duration::from_secs(60));
    assert!(out.status.success(), "exit after SIGTERM: {}", out.status);
    assert!(!path.exists(), "the socket file is still there");
}

#[test]
fn bad_operating_settings_exit_2_naming_the_variable() {
    // (variable, bad value, what the message must also mention)
    let cases: &[(&str, &str, &str)] = &[
        ("SPOOL_HTTP_LISTEN", "localhost", "IP:PORT"),
        ("SPOOL_HTTP_LISTEN", "127.0.0.1:99999", "IP:PORT"),
        ("SPOOL_LOG_FORMAT", "xml", "json or text"),
        ("SPOOL_LOG_LEVEL", "[[[", "filter directive"),
        ("SPOOL_MAX_CONNECTIONS", "0", "number of connections"),
        ("SPOOL_MAX_CONNECTIONS", "lots", "number of connections"),
        ("SPOOL_REQUEST_TIMEOUT", "soon", "duration"),
        ("SPOOL_REQUEST_TIMEOUT", "0s", "duration"),
        ("SPOOL_WRITE_TIMEOUT", "-1s", "duration"),
        ("SPOOL_SHUTDOWN_GRACE", "25 minutes", "duration"),
        ("SPOOL_SHUTDOWN_GRACE", "100000h", "duration"),
    ];
    for (variable, value, expected) in cases {
        let out = run_spool(&["serve", "--in-memory"], &[(variable, value)]);
        assert_exit(&out, 2, &[variable, value, expected]);
        assert_eq!(
            stderr(&out).lines().count(),
            1,
            "one line for {variable}={value}: {:?}",
            stderr(&out)
        );
    }
    // The flags are named too.
    let out = run_spool(&["serve", "--in-memory", "--shutdown-grace", "x"], &[]);
    assert_exit(&out, 2, &["--shutdown-grace", "SPOOL_SHUTDOWN_GRACE", "x"]);
}

#[test]
fn a_bad_auth_token_is_refused_without_echoing_it() {
    let out = run_spool(
        &["serve", "--in-memory"],
        &[("SPOOL_AUTH_TOKEN", "secret with spaces")],
    );
    assert_exit(&out, 2, &["SPOOL_AUTH_TOKEN"]);
    assert!(!stderr(&out).contains("secret"), "{}", stderr(&out));
}

#[test]
fn good_operating_settings_start_the_server() {
    let server = Server::start_with(&[
        "--shutdown-grace",
        "1500ms",
        "--request-timeout",
        "2m",
        "--write-timeout",
        "10",
        "--max-connections",
        "100",
        "--log-format",
        "json",
    ]);
    let mut c = server.client();
    c.expect("list-tube-used\r\n", "USING default\r\n");
}

#[test]
fn an_http_port_in_use_is_an_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("binding");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = run_spool(
        &["serve", "--in-memory", "-p", "0", "--http-listen", &addr],
        &[],
    );
    assert_exit(&out, 1, &["HTTP", &addr]);
}
