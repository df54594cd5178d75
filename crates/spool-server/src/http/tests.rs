//! The HTTP server in process, over real loopback TCP: a local broker, the
//! connection registry and `serve` on an ephemeral port, driven by a raw
//! HTTP/1.1 client so the tests see the server's exact answers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use spool_engine::{Engine, EngineConfig};
use spool_proto::{Put, PutBody, Request, TubeName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::*;
use crate::connections::Connections;
use crate::process::ProcessInfo;
use crate::{engine_clock, LocalBroker, Session};

/// Bound on any one exchange with the test server.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

struct TestServer {
    addr: SocketAddr,
    /// The filter behind the log filter getter and setter.
    log_filter: Arc<std::sync::Mutex<String>>,
    state: Arc<HttpState<LocalBroker>>,
    connections: Connections,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
}

impl TestServer {
    async fn start(token: Option<&str>, limits: HttpLimits) -> TestServer {
        TestServer::start_with(token, limits, 1 << 16).await
    }

    async fn start_with(token: Option<&str>, limits: HttpLimits, max_job_size: u32) -> TestServer {
        let connections = Connections::with_fd_limit(None, None);
        // The filter a binary backs with tracing-subscriber: here a string
        // that the setter changes to anything but the word "bogus".
        let log_filter = Arc::new(std::sync::Mutex::new("info".to_string()));
        let current = log_filter.clone();
        let setter: LogFilterSetter = Arc::new(move |directive: &str| {
            if directive.contains("bogus") {
                return Err(format!("{directive:?} is not a filter directive"));
            }
            *current.lock().unwrap() = directive.to_string();
            Ok(directive.to_string())
        });
        let current = log_filter.clone();
        let getter: LogFilterGetter = Arc::new(move || current.lock().unwrap().clone());
        let state = HttpState::new(HttpSettings {
            version: "test-version".to_string(),
            auth_token: token.map(str::to_string),
            log_filter: getter,
            set_log_filter: setter,
            connections: connections.clone(),
            limits,
            max_job_size,
        });
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, state.clone(), async {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            log_filter,
            state,
            connections,
            stop: Some(stop),
            server,
        }
    }

    fn attach_broker(&self) -> LocalBroker {
        let engine = Engine::new(EngineConfig {
            max_job_size: 1 << 16,
        });
        let broker = LocalBroker::start(engine, engine_clock(), None, ProcessInfo::new("test"));
        self.state.set_broker(broker.clone());
        broker
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        let raw = format!(
            "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n{}\r\n{body}",
            body.len(),
            headers
                .iter()
                .map(|(k, v)| format!("{k}: {v}\r\n"))
                .collect::<String>()
        );
        exchange(self.addr, raw.as_bytes()).await
    }

    async fn get(&self, path: &str) -> Reply {
        self.request("GET", path, &[], "").await
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(EXCHANGE_TIMEOUT, &mut self.server)
            .await
            .expect("serve returns after its shutdown future")
            .unwrap();
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// A header's value (names compared without case).
    fn header(&self, name: &str) -> Option<&str> {
        self.head.split("\r\n").skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends `raw`, reads until the server closes, parses status and body
/// (bodies here are never chunked: axum sets Content-Length on them).
async fn exchange(addr: SocketAddr, raw: &[u8]) -> Reply {
    tokio::time::timeout(EXCHANGE_TIMEOUT, async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(raw).await.unwrap();
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).await.unwrap();
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {text:?}"));
        Reply {
            status,
            head: head.to_string(),
            body: body.to_string(),
        }
    })
    .await
    .expect("an answer within the exchange timeout")
}

#[tokio::test]
async fn probes_follow_recovery_drain_and_shutdown() {
    let server = TestServer::start(None, HttpLimits::default()).await;
    for path in ["/livez", "/healthz"] {
        let reply = server.get(path).await;
        assert_eq!(reply.status, 200, "{path}");
        assert_eq!(reply.json()["status"], "ok");
    }
    let reply = server.get("/readyz").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json()["reason"], "recovering");
    assert_eq!(reply.json()["status"], "unavailable");
    // Admin answers need the engine: 503 while recovering, never a panic.
    assert_eq!(server.get("/admin/stats").await.status, 503);

    // Readiness follows the broker's own health: no flag of the HTTP state
    // has to be flipped beside it.
    let broker = server.attach_broker();
    assert_eq!(server.get("/readyz").await.status, 200);
    broker.set_draining(true);
    let reply = server.get("/readyz").await;
    assert_eq!(
        (reply.status, reply.json()["reason"].clone()),
        (503, "draining".into())
    );
    broker.set_draining(false);
    assert_eq!(server.get("/readyz").await.status, 200);
    // What SIGTERM handling does: the next probe already says so.
    broker.begin_shutdown();
    let reply = server.get("/readyz").await;
    assert_eq!(
        (reply.status, reply.json()["reason"].clone()),
        (503, "shutting_down".into())
    );
    assert_eq!(
        server
            .get("/metrics")
            .await
            .body
            .lines()
            .find(|l| l.starts_with("spool_ready ")),
        Some("spool_ready 0")
    );
    assert_eq!(server.get("/livez").await.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn bad_requests_get_json_4xx() {
    let server = TestServer::start(None, HttpLimits::default()).await;
    server.attach_broker();
    let reply = server.get("/nope").await;
    assert_eq!(
        (reply.status, reply.error_code()),
        (404, "not_found".to_string())
    );
    assert!(reply
        .head
        .to_ascii_lowercase()
        .contains("content-type: application/json"));
    let reply = server.request("POST", "/metrics", &[], "").await;
    assert_eq!(
        (reply.status, reply.error_code()),
        (405, "method_not_allowed".to_string())
    );
    let reply = server.request("DELETE", "/admin/log-level", &[], "").await;
    assert_eq!(reply.status, 405);
    let big = "x".repeat(REQUEST_BODY_MAX_BYTES + 1);
    let reply = server.request("PUT", "/admin/log-level", &[], &big).await;
    assert_eq!(
        (reply.status, reply.error_code()),
        (413, "body_too_large".to_string())
    );
    // Announced far over the limit: refused without reading the body.
    let reply = exchange(
        server.addr,
        b"PUT /admin/log-level HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 100000000\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status, 413);
    let reply = server
        .request(
            "PUT",
            "/admin/log-level",
            &[("Content-Type", "application/json")],
            "{",
        )
        .await;
    assert_eq!(
        (reply.status, reply.error_code()),
        (400, "bad_filter".to_string())
    );
    server.stop().await;
}

#[tokio::test]
async fn log_level_changes_through_the_setter() {
    let server = TestServer::start(None, HttpLimits::default()).await;
    assert_eq!(
        server.get("/admin/log-level").await.json()["filter"],
        "info"
    );
    let reply = server
        .request("PUT", "/admin/log-level", &[], "spool=debug")
        .await;
    assert_eq!(
        (reply.status, reply.json()["filter"].clone()),
        (200, "spool=debug".into())
    );
    let reply = server
        .request("PUT", "/admin/log-level", &[], r#"{"filter":"warn"}"#)
        .await;
    assert_eq!(reply.json()["filter"], "warn");
    let reply = server
        .request("PUT", "/admin/log-level", &[], "bogus")
        .await;
    assert_eq!(
        (reply.status, reply.error_code()),
        (400, "bad_filter".to_string())
    );
    assert_eq!(
        server.get("/admin/log-level").await.json()["filter"],
        "warn"
    );
    // Changed by someone else (another PUT racing this one): GET names
    // the filter in force, not the last one this server set.
    *server.log_filter.lock().unwrap() = "spool=trace".to_string();
    assert_eq!(
        server.get("/admin/log-level").await.json()["filter"],
        "spool=trace"
    );
    server.stop().await;
}

#[tokio::test]
async fn admin_connections_pages_through_every_connection() {
    let server = TestServer::start(None, HttpLimits::default()).await;
    server.attach_broker();
    let handles: Vec<_> = (0..5)
        .map(|_| {
            server
                .connections
                .try_admit(crate::connections::Protocol::Beanstalk)
                .unwrap()
        })
        .collect();
    let mut ids: Vec<u64> = handles.iter().map(|handle| handle.id()).collect();
    // Without paging parameters, a short list is the whole list (this
    // request's own HTTP connection among it), as before paging.
    let whole = server.get("/admin/connections").await.json();
    assert_eq!(whole["next"], serde_json::Value::Null);
    let listed = whole["connections"].as_array().unwrap();
    assert_eq!(listed.len(), ids.len() + 1, "{whole}");
    // Two at a time: each of them once, in order (each request adds its
    // own connection after them).
    let mut seen = Vec::new();
    let mut path = "/admin/connections?limit=2".to_string();
    for _ in 0..10 {
        let page = server.get(&path).await.json();
        let list = page["connections"].as_array().unwrap();
        assert!(list.len() <= 2, "{page}");
        seen.extend(list.iter().map(|c| c["id"].as_u64().unwrap()));
        match page["next"].as_u64() {
            Some(next) => path = format!("/admin/connections?limit=2&after={next}"),
            None => break,
        }
    }
    seen.retain(|id| ids.contains(id));
    ids.sort_unstable();
    assert_eq!(seen, ids);
    for bad in ["limit=0", "limit=10001", "limit=-1", "after=x", "page=2"] {
        let reply = server.get(&format!("/admin/connections?{bad}")).await;
        assert_eq!(reply.status, 400, "{bad}: {}", reply.body);
    }
    drop(handles);
    server.stop().await;
}

#[tokio::test]
async fn admin_needs_the_token_probes_and_metrics_do_not() {
    let server = TestServer::start(Some("s3cret"), HttpLimits::default()).await;
    server.attach_broker();
    for path in [
        "/admin/stats",
        "/admin/connections",
        "/admin/log-level",
        "/admin/nope",
        "/v1/jobs",
    ] {
        let reply = server.get(path).await;
        assert_eq!(
            (reply.status, reply.error_code()),
            (401, "unauthorized".to_string()),
            "{path}"
        );
    }
    for auth in [
        "Bearer wrong",
        "Bearer s3cret2",
        "Basic s3cret",
        "s3cret",
        "Bearer ",
    ] {
        let reply = server
            .request("GET", "/admin/stats", &[("Authorization", auth)], "")
            .await;
        assert_eq!(reply.status, 401, "{auth}");
    }
    let reply = server
        .request(
            "GET",
            "/admin/stats",
            &[("Authorization", "bearer s3cret")],
            "",
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    for path in ["/livez", "/healthz", "/readyz", "/metrics"] {
        assert_eq!(server.get(path).await.status, 200, "{path}");
    }
    server.stop().await;
}

#[test]
fn token_comparison() {
    assert!(token_matches(b"abc", b"abc"));
    assert!(!token_matches(b"abd", b"abc"));
    assert!(!token_matches(b"ab", b"abc"));
    assert!(!token_matches(b"abcd", b"abc"));
    assert!(!token_matches(b"", b"abc"));
    let mut headers = HeaderMap::new();
    headers.insert(header::AUTHORIZATION, "Bearer  tok ".parse().unwrap());
    assert!(authorized(&headers, "tok"));
    headers.insert(header::AUTHORIZATION, "Token tok".parse().unwrap());
    assert!(!authorized(&headers, "tok"));
    assert!(is_protected("/admin/stats"));
    assert!(is_protected("/v1"));
    assert!(!is_protected("/administrator"));
    assert!(!is_protected("/metrics"));
}

#[tokio::test]
async fn stats_metrics_and_connections_show_a_session() {
    let server = TestServer::start(None, HttpLimits::default()).await;
    let broker = server.attach_broker();
    server
        .state
        .set_data_runtime(tokio::runtime::Handle::current());
    // A beanstalkd-style session, registered as the listener would.
    let handle = server
        .connections
        .try_admit(crate::connections::Protocol::Beanstalk)
        .unwrap();
    let mut session = broker.open_session(crate::Peer::default()).unwrap();
    handle.set_peer("127.0.0.1:9".to_string());
    handle.set_session_id(session.id());
    session
        .submit(vec![
            Request::Use(TubeName::new(b"emails").unwrap()),
            Request::Put(Put {
                pri: 0,
                delay_secs: 0,
                ttr_secs: 60,
                body: PutBody::Complete(bytes::Bytes::from_static(b"hi")),
            }),
            Request::Watch(TubeName::new(b"emails").unwrap()),
            Request::ReserveWithTimeout {
                timeout_secs: Some(0),
            },
        ])
        .unwrap();
    // Wait for the four replies (bounded).
    let mut replies = Vec::new();
    tokio::time::timeout(EXCHANGE_TIMEOUT, async {
        while replies.len() < 4 {
            std::future::poll_fn(|cx| session.poll_recv(cx, &mut replies)).await;
        }
    })
    .await
    .expect("replies from the broker");

    let conns = server.get("/admin/connections").await.json();
    let list = conns["connections"].as_array().unwrap();
    let beanstalk = list
        .iter()
        .find(|c| c["protocol"] == "beanstalk")
        .expect("the beanstalk connection is listed");
    assert_eq!(beanstalk["peer"], "127.0.0.1:9");
    assert_eq!(beanstalk["session"]["tube_used"], "emails");
    assert_eq!(
        beanstalk["session"]["reserved_job_ids"],
        serde_json::json!([1])
    );
    assert!(list.iter().any(|c| c["protocol"] == "http"), "{conns}");

    let stats = server.get("/admin/stats").await.json();
    let emails = stats["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "emails")
        .expect("the emails queue");
    assert_eq!(emails["reserved"], 1);
    assert_eq!(emails["counters"]["put"], 1);
    assert_eq!(emails["counters"]["reserved"], 1);
    assert_eq!(stats["version"], "test-version");
    assert_eq!(stats["connections"]["active"]["beanstalk"], 1);
    assert!(stats["runtime"]["data"]["alive_tasks"].as_u64().unwrap() >= 1);

    let reply = server.get("/metrics").await;
    assert!(reply
        .head
        .to_ascii_lowercase()
        .contains("content-type: text/plain; version=0.0.4"));
    for line in [
        "spool_jobs_put_total{queue=\"emails\"} 1",
        "spool_queue_jobs{queue=\"emails\",state=\"reserved\"} 1",
        "spool_connections{protocol=\"beanstalk\"} 1",
        "spool_build_info{version=\"test-version\"} 1",
        "spool_ready 1",
        "spool_runtime_workers{runtime=\"data\"} 1",
        "spool_runtime_workers{runtime=\"http\"} 1",
    ] {
        assert!(
            reply.body.lines().any(|l| l == line),
            "{line} in:\n{}",
            reply.body
        );
    }
    drop(handle);
    server.stop().await;
}

#[tokio::test]
async fn retired_queues_keep_their_counters_not_their_histograms() {
    let server = TestServer::start(None, HttpLimits::default()).await;
    let broker = server.attach_broker();
    let mut session = broker.open_session(crate::Peer::default()).unwrap();
    let gone = TubeName::new(b"gone").unwrap();
    let default = TubeName::new(b"default").unwrap();
    // A job through the tube "gone", which is then freed: nothing uses or
    // watches it and it holds no job.
    let requests = vec![
        Request::Use(gone.clone()),
        Request::Put(Put {
            pri: 0,
            delay_secs: 0,
            ttr_secs: 60,
            body: PutBody::Complete(bytes::Bytes::from_static(b"hi")),
        }),
        Request::Watch(gone.clone()),
        Request::Ignore(default.clone()),
        Request::ReserveWithTimeout {
            timeout_secs: Some(0),
        },
        Request::Delete(1),
        Request::Watch(default.clone()),
        Request::Ignore(gone),
        Request::Use(default),
    ];
    let expected = requests.len();
    session.submit(requests).unwrap();
    let mut replies = Vec::new();
    tokio::time::timeout(EXCHANGE_TIMEOUT, async {
        while replies.len() < expected {
            std::future::poll_fn(|cx| session.poll_recv(cx, &mut replies)).await;
        }
    })
    .await
    .expect("replies from the broker");
    let snapshot = broker
        .snapshot(spool_engine::SnapshotScope::Queues)
        .await
        .unwrap();
    assert!(
        snapshot.retired_queues.iter().any(|q| q.name == "gone"),
        "{replies:?}"
    );

    let body = server.get("/metrics").await.body;
    for line in [
        "spool_jobs_put_total{queue=\"gone\"} 1",
        "spool_jobs_deleted_total{queue=\"gone\"} 1",
    ] {
        assert!(body.lines().any(|l| l == line), "{line} in:\n{body}");
    }
    assert!(
        !body.lines().any(|l| l.contains("queue=\"gone\"")
            && (l.starts_with("spool_job_") || l.starts_with("spool_schedule_skew_"))),
        "no histogram of a retired queue in:\n{body}"
    );
    // The live queue keeps its histograms.
    assert!(body
        .lines()
        .any(|l| l.starts_with("spool_job_wait_seconds_count{queue=\"default\"}")));
    server.stop().await;
}

#[tokio::test]
async fn a_stalled_request_head_is_closed_and_counted() {
    let limits = HttpLimits {
        header_read_timeout: Duration::from_millis(200),
        ..HttpLimits::default()
    };
    let server = TestServer::start(None, limits).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // The server closes the connection (after the timeout; bounded wait).
    let mut rest = Vec::new();
    tokio::time::timeout(EXCHANGE_TIMEOUT, stream.read_to_end(&mut rest))
        .await
        .expect("the server closes a stalled connection")
        .unwrap_or_default();
    wait_for_http_close(&server.connections, CloseReason::RequestTimeout).await;
    assert_eq!(
        http_closed(&server.connections, CloseReason::IdleTimeout),
        0
    );
    server.stop().await;
}

/// HTTP connections closed for `reason` so far.
fn http_closed(connections: &Connections, reason: CloseReason) -> u64 {
    connections
        .metrics()
        .protocol(crate::connections::Protocol::Http)
        .map(|p| p.closed(reason))
        .unwrap_or(0)
}

/// Waits (bounded) until an HTTP connection has closed for `reason`.
async fn wait_for_http_close(connections: &Connections, reason: CloseReason) {
    tokio::time::timeout(EXCHANGE_TIMEOUT, async {
        while http_closed(connections, reason) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("a close counted as {}", reason.as_str()));
}

#[tokio::test]
async fn idle_keep_alive_connections_close_as_idle_timeout() {
    let limits = HttpLimits {
        header_read_timeout: Duration::from_millis(200),
        ..HttpLimits::default()
    };
    let server = TestServer::start(None, limits).await;
    // A scraper's kept-alive connection: two requests, then silence.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    for _ in 0..2 {
        stream
            .write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(EXCHANGE_TIMEOUT, stream.read(&mut answer))
            .await
            .expect("an answer")
            .unwrap();
        assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"));
    }
    let mut rest = Vec::new();
    tokio::time::timeout(EXCHANGE_TIMEOUT, stream.read_to_end(&mut rest))
        .await
        .expect("the server closes the idle connection")
        .unwrap_or_default();
    wait_for_http_close(&server.connections, CloseReason::IdleTimeout).await;
    // A connection that never sends a byte is idle too.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    tokio::time::timeout(EXCHANGE_TIMEOUT, silent.read_to_end(&mut rest))
        .await
        .expect("the server closes the silent connection")
        .unwrap_or_default();
    tokio::time::timeout(EXCHANGE_TIMEOUT, async {
        while http_closed(&server.connections, CloseReason::IdleTimeout) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("both closes counted as idle_timeout");
    assert_eq!(
        http_closed(&server.connections, CloseReason::RequestTimeout),
        0
    );
    server.stop().await;
}

#[tokio::test]
async fn a_slow_body_gets_408() {
    let limits = HttpLimits {
        body_read_timeout: Duration::from_millis(200),
        ..HttpLimits::default()
    };
    let server = TestServer::start(None, limits).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"PUT /admin/log-level HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nde")
        .await
        .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(EXCHANGE_TIMEOUT, stream.read(&mut answer))
        .await
        .expect("an answer to the stalled body")
        .unwrap();
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("body_timeout"), "{text}");
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_idle_keep_alive_connections() {
    let server = TestServer::start(None, HttpLimits::default()).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    // One keep-alive request; the connection then idles.
    stream
        .write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(EXCHANGE_TIMEOUT, stream.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"));
    server.stop().await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(EXCHANGE_TIMEOUT, stream.read_to_end(&mut rest))
        .await
        .expect("the idle connection is closed at shutdown");
    assert!(read.is_ok() && rest.is_empty(), "{rest:?}");
}

#[tokio::test]
async fn connections_aborted_at_the_drain_timeout_count_as_shutdown() {
    let limits = HttpLimits {
        shutdown_drain_timeout: Duration::from_millis(200),
        ..HttpLimits::default()
    };
    let server = TestServer::start(None, limits).await;
    let connections = server.connections.clone();
    // A request whose body never comes: in flight until the (default, long)
    // body timeout, so the drain cannot finish it.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"PUT /admin/log-level HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nde")
        .await
        .unwrap();
    tokio::time::timeout(EXCHANGE_TIMEOUT, async {
        while !connections
            .list()
            .iter()
            .any(|c| c.command == Some("PUT /admin/log-level"))
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the request is in flight");
    server.stop().await;
    wait_for_http_close(&connections, CloseReason::Shutdown).await;
    assert_eq!(http_closed(&connections, CloseReason::Client), 0);
    drop(stream);
}

#[tokio::test]
async fn a_client_that_does_not_read_is_closed_by_the_write_stall_timeout() {
    let limits = HttpLimits {
        write_stall_timeout: Duration::from_millis(200),
        ..HttpLimits::default()
    };
    let server = TestServer::start(None, limits).await;
    let broker = server.attach_broker();
    // A session watching many tubes keeps them alive: /metrics then runs to
    // megabytes, more than the socket buffers of a client that reads nothing.
    let mut session = broker.open_session(crate::Peer::default()).unwrap();
    let tubes = 3000;
    let requests: Vec<Request> = (0..tubes)
        .map(|i| Request::Watch(TubeName::new(format!("tube-{i}").as_bytes()).unwrap()))
        .collect();
    session.submit(requests).unwrap();
    let mut replies = Vec::new();
    tokio::time::timeout(EXCHANGE_TIMEOUT, async {
        while replies.len() < tubes {
            std::future::poll_fn(|cx| session.poll_recv(cx, &mut replies)).await;
        }
    })
    .await
    .expect("the watches are answered");

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    // A small receive buffer, so the response cannot hide in it.
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let write_timeouts = || {
        server
            .connections
            .metrics()
            .protocol(crate::connections::Protocol::Http)
            .map(|p| p.closed(CloseReason::WriteTimeout))
            .unwrap_or(0)
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, async {
        while write_timeouts() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the stalled connection is closed as write_timeout");
    drop(stream);
    server.stop().await;
}

#[tokio::test]
async fn malformed_requests_get_4xx_from_hyper() {
    let server = TestServer::start(None, HttpLimits::default()).await;
    let reply = exchange(server.addr, b"NOT HTTP AT ALL\r\n\r\n").await;
    assert!((400..500).contains(&reply.status), "{reply:?}");
    let huge_header = format!(
        "GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(REQUEST_HEAD_MAX_BYTES + 1024)
    );
    let reply = exchange(server.addr, huge_header.as_bytes()).await;
    assert!((400..500).contains(&reply.status), "{reply:?}");
    // The server is unharmed.
    assert_eq!(server.get("/livez").await.status, 200);
    server.stop().await;
}

mod jobs;
mod openapi;
mod schedules;
mod workflows;

/// A hot route's request answered by its handler directly (as `answer`
/// does) and by the router: status, headers and body, for comparison.
async fn hot_and_routed(
    state: &Arc<HttpState<LocalBroker>>,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> [(u16, Vec<(String, String)>, Vec<u8>); 2] {
    let request = || {
        let mut builder = hyper::Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder
            .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
            .unwrap()
    };
    let (parts, _) = request().into_parts();
    let route = super::jobs::HotRoute::of(&parts.method, parts.uri.path())
        .unwrap_or_else(|| panic!("{method} {uri} is a hot route"));
    let hot = super::jobs::answer_hot(
        state.clone(),
        route,
        parts,
        Bytes::copy_from_slice(body.as_bytes()),
    )
    .await;
    let routed = hyper::service::Service::call(
        &hyper_util::service::TowerToHyperService::new(router(state.clone())),
        request(),
    )
    .await
    .unwrap();
    let mut answers = Vec::new();
    for response in [hot, routed] {
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        answers.push((status, headers, body.to_vec()));
    }
    answers.try_into().unwrap()
}

/// A hot route's request: path and query, headers, body.
type HotCase<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);

#[tokio::test]
async fn hot_routes_answer_as_the_router_does() {
    let server = TestServer::start(None, HttpLimits::default()).await;
    server.attach_broker();
    let state = server.state.clone();
    // Created by the first call, so that the comparisons below see the same
    // job (a duplicate of this key) both ways.
    let keyed = r#"{"payload":{"n":1},"idempotency_key":"k1","headers":{"a":"\"q\"\n"}}"#;
    let [created, duplicate] =
        hot_and_routed(&state, "POST", "/v1/queues/hq/jobs", &[], keyed).await;
    assert_eq!((created.0, duplicate.0), (201, 200), "{created:?}");
    let cases: &[HotCase] = &[
        // Enqueue: a duplicate (deterministic), and each kind of refusal.
        ("/v1/queues/hq/jobs", &[], keyed),
        ("/v1/queues/hq/jobs?wait_ms=0", &[], keyed),
        ("/v1/queues/hq/jobs", &[], r#"{"payload":1,"delay":5}"#),
        ("/v1/queues/hq/jobs", &[], r#"{"payload":1,"priority":-1}"#),
        ("/v1/queues/hq/jobs", &[], "{"),
        ("/v1/queues/hq/jobs", &[], ""),
        ("/v1/queues/hq/jobs", &[], r#"{"payload":1} x"#),
        ("/v1/queues/hq/jobs?wait=1", &[], r#"{"payload":1}"#),
        ("/v1/queues/hq/jobs?wait_ms=x", &[], r#"{"payload":1}"#),
        (
            "/v1/queues/hq/jobs?wait_ms=99999999",
            &[],
            r#"{"payload":1}"#,
        ),
        ("/v1/queues/hq/jobs?%zz", &[], r#"{"payload":1}"#),
        ("/v1/queues/-bad/jobs", &[], r#"{"payload":1}"#),
        // Reserve: nothing ready, and refusals.
        ("/v1/reserve", &[], r#"{"queues":["empty"],"timeout_ms":0}"#),
        ("/v1/reserve", &[], r#"{"queues":["-x"]}"#),
        (
            "/v1/reserve",
            &[],
            r#"{"queues":["q"],"timeout_ms":99999999}"#,
        ),
        ("/v1/reserve", &[], "[]"),
        // Complete: no such job, bad ids, leases and If-Match.
        ("/v1/jobs/999/complete", &[], r#"{"lease":"999-1"}"#),
        ("/v1/jobs/1/complete", &[], r#"{"lease":"2-1"}"#),
        ("/v1/jobs/1/complete", &[], r#"{"lease":"x"}"#),
        ("/v1/jobs/abc/complete", &[], r#"{"lease":"1-1"}"#),
        (
            "/v1/jobs/1/complete",
            &[("If-Match", "\"x")],
            r#"{"lease":"1-1"}"#,
        ),
        (
            "/v1/jobs/1/complete",
            &[("If-Match", "\"99\"")],
            r#"{"lease":"1-1"}"#,
        ),
        (
            "/v1/jobs/1/complete",
            &[],
            r#"{"lease":"1-1","result":1,"result_base64":"AA=="}"#,
        ),
        // Complete several: each refused on its own, and the whole refused.
        (
            "/v1/jobs/complete",
            &[],
            r#"{"jobs":[{"lease":"999-1"},{"lease":"x"},{"lease":"1-1","result":1,"result_base64":"AA=="}]}"#,
        ),
        ("/v1/jobs/complete", &[], r#"{"jobs":[]}"#),
        (
            "/v1/jobs/complete",
            &[],
            r#"{"jobs":[{"lease":"1-1","x":1}]}"#,
        ),
        ("/v1/jobs/complete", &[], "{"),
    ];
    for (uri, headers, body) in cases {
        let [hot, routed] = hot_and_routed(&state, "POST", uri, headers, body).await;
        assert_eq!(hot, routed, "POST {uri} {body}");
        assert!(hot.0 != 500, "POST {uri} {body}: {hot:?}");
    }
    server.stop().await;
}

#[test]
fn hot_routes_are_only_the_unambiguous_paths() {
    let post = Method::POST;
    let of = |method: &Method, path: &str| super::jobs::HotRoute::of(method, path);
    assert_eq!(
        of(&post, "/v1/reserve"),
        Some(super::jobs::HotRoute::Reserve)
    );
    for (path, route) in [
        ("/v1/reserve", "reserve"),
        ("/v1/queues/q/jobs", "queues/q/jobs"),
        ("/v1/jobs/1/complete", "jobs/1/complete"),
        ("/v1/jobs/complete", "jobs/complete"),
    ] {
        let hot = of(&post, path).unwrap();
        let segments: Vec<&str> = route.split('/').collect();
        assert_eq!(
            Some(hot.command_name()),
            super::jobs::command_name("POST", &segments),
            "{path}"
        );
    }
    assert_eq!(
        of(&post, "/v1/queues/q.1/jobs"),
        Some(super::jobs::HotRoute::Enqueue {
            queue: "q.1".to_string()
        })
    );
    assert_eq!(
        of(&post, "/v1/jobs/12/complete"),
        Some(super::jobs::HotRoute::Complete {
            id: "12".to_string()
        })
    );
    // Left to the router: other methods, percent-encoding, empty or
    // multi-segment parameters, trailing slashes, other routes.
    for (method, path) in [
        (Method::GET, "/v1/reserve"),
        (Method::GET, "/v1/queues/q/jobs"),
        (Method::DELETE, "/v1/queues/q/jobs"),
        (post.clone(), "/v1/queues/q%2e/jobs"),
        (post.clone(), "/v1/queues//jobs"),
        (post.clone(), "/v1/queues/a/b/jobs"),
        (post.clone(), "/v1/queues/q/jobs/"),
        (post.clone(), "/v1/queues/q/jobs/batch"),
        (post.clone(), "/v1/reserve/"),
        (post.clone(), "/v1/jobs//complete"),
        (post.clone(), "/v1/jobs/1%31/complete"),
        (post.clone(), "/v1/jobs/1/fail"),
        (Method::GET, "/v1/jobs/complete"),
        (post.clone(), "/v1/jobs/complete/"),
    ] {
        assert_eq!(of(&method, path), None, "{method} {path}");
    }
}

#[tokio::test]
async fn hot_routes_need_the_token() {
    let server = TestServer::start(Some("s3cret"), HttpLimits::default()).await;
    server.attach_broker();
    for path in [
        "/v1/reserve",
        "/v1/queues/q/jobs",
        "/v1/jobs/1/complete",
        "/v1/jobs/complete",
    ] {
        let reply = server.request("POST", path, &[], "{}").await;
        assert_eq!(
            (reply.status, reply.error_code()),
            (401, "unauthorized".to_string()),
            "{path}"
        );
        assert_eq!(reply.header("WWW-Authenticate"), Some("Bearer"), "{path}");
    }
    let reply = server
        .request(
            "POST",
            "/v1/queues/q/jobs",
            &[("Authorization", "Bearer s3cret")],
            r#"{"payload":7}"#,
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    assert_eq!(reply.json()["payload"], 7);
    server.stop().await;
}

// ---- the handler timer ------------------------------------------------------
// On tokio's paused clock, which moves only when every task waits: each
// deadline is checked to the nanosecond, without sleeping.

/// Runs work that finishes after `work_ms` (never, for `None`) within
/// `limit_ms` of `timer`: its answer (`None` when the limit ended it) and
/// how long it took on the paused clock.
async fn timed(
    timer: &HandlerTimer,
    limit_ms: u64,
    work_ms: Option<u64>,
) -> (Option<&'static str>, Duration) {
    let start = tokio::time::Instant::now();
    let work = async move {
        match work_ms {
            Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            None => std::future::pending().await,
        }
        "done"
    };
    let answer = timer.within(Duration::from_millis(limit_ms), work).await;
    (answer, start.elapsed())
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[tokio::test(start_paused = true)]
async fn the_handler_timer_ends_work_at_its_limit_and_serves_the_next_request() {
    let timer = HandlerTimer::default();
    assert_eq!(timed(&timer, 100, None).await, (None, ms(100)));
    // The same timer, fired once, times the next request afresh.
    assert_eq!(timed(&timer, 100, Some(60)).await, (Some("done"), ms(60)));
    assert_eq!(timed(&timer, 30, None).await, (None, ms(30)));
}

#[tokio::test(start_paused = true)]
async fn a_reused_handler_timer_keeps_no_earlier_deadline() {
    let timer = HandlerTimer::default();
    // Registers the timer at +100 ms, then finishes.
    assert_eq!(timed(&timer, 100, Some(10)).await, (Some("done"), ms(10)));
    // Moved later: the old deadline (+100 ms) passes without ending this.
    assert_eq!(timed(&timer, 500, Some(300)).await, (Some("done"), ms(300)));
    // Moved earlier (a long poll's limit, then an ordinary one).
    assert_eq!(timed(&timer, 50, None).await, (None, ms(50)));
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_request_leaves_the_handler_timer_working() {
    let timer = HandlerTimer::default();
    // The request's future is dropped mid-way (its client left).
    let cancelled = tokio::time::timeout(ms(20), timed(&timer, 100, None)).await;
    assert!(cancelled.is_err());
    assert_eq!(timed(&timer, 100, None).await, (None, ms(100)));
}
