//! The CLI's HTTP client: one request at a time to the server's HTTP
//! listener, with hyper's HTTP/1 client on a current-thread runtime (one
//! request at a time needs nothing more). Every request is bounded in time,
//! so a hung server cannot hang the CLI, and every failure is one clear
//! line; an error answer of the server keeps its code and message.

use std::fmt;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{header, Method, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use spool_server::limits::{DEFAULT_HTTP_LISTEN, HANDLER_TIMEOUT};

/// What the CLI allows beyond the server's own handler timeout: connecting,
/// sending the request and reading the answer (tens of MiB at most) take
/// well under this on any link an operator would use.
const REQUEST_TIMEOUT_MARGIN: Duration = Duration::from_secs(5);

/// Bound on connecting plus one whole request and response. Longer than the
/// server's handler timeout, so that a slow server's 503 (which says why)
/// arrives before the CLI gives up; a server silent past this is stuck.
const REQUEST_TIMEOUT: Duration = HANDLER_TIMEOUT.saturating_add(REQUEST_TIMEOUT_MARGIN);

// Checked at compile time: a margin of zero (or a saturated sum) would let
// the CLI give up in the same instant the server answers 503.
const _: () = assert!(REQUEST_TIMEOUT.as_millis() > HANDLER_TIMEOUT.as_millis());

/// Largest answer read: `/admin/connections` of a server with a hundred
/// thousand connections is tens of MiB.
const RESPONSE_MAX_BYTES: usize = 256 << 20;

#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// The server's HTTP listener, HOST:PORT.
    #[arg(long = "http", env = "SPOOL_HTTP_LISTEN", default_value = DEFAULT_HTTP_LISTEN)]
    http: String,

    /// Bearer token, when the server has SPOOL_AUTH_TOKEN set.
    #[arg(long = "token", env = "SPOOL_AUTH_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl ServerArgs {
    /// The server's HTTP listener, HOST:PORT.
    pub fn http(&self) -> &str {
        &self.http
    }

    /// The bearer token, if one is set.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }
}

/// The server refused a request: its status and `{"error": {...}}`.
#[derive(Debug)]
pub struct ServerError {
    pub code: String,
    pub message: String,
    pub field: Option<String>,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)?;
        if let Some(field) = &self.field {
            write!(f, " (field {field})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerError {}

/// A connection-less client of one server: each request opens its own.
pub struct Client<'a> {
    runtime: tokio::runtime::Runtime,
    server: &'a ServerArgs,
}

impl<'a> Client<'a> {
    pub fn new(server: &'a ServerArgs) -> anyhow::Result<Client<'a>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        Ok(Client { runtime, server })
    }

    /// GETs `path` and parses the JSON answer.
    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(Method::GET, path, None)
    }

    /// Sends `body` (JSON) to `path` and parses the JSON answer (`null`
    /// for an empty one). A non-2xx answer is an error: a [`ServerError`]
    /// when the server explained itself.
    pub fn send(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> anyhow::Result<Value> {
        let what = format!("{method} {path}");
        let bytes = self.send_raw(method, path, body)?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "the server at {} answered {what} with a body that is not JSON",
                self.server.http
            )
        })
    }

    /// [`Client::send`], answering the body of a success as it came.
    pub fn send_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Bytes> {
        let addr = self.server.http.as_str();
        let what = format!("{method} {path}");
        let (status, bytes) = self.runtime.block_on(async {
            tokio::time::timeout(
                REQUEST_TIMEOUT,
                request(addr, self.server.token.as_deref(), method, path, body),
            )
            .await
            .map_err(|_| {
                anyhow!(
                    "the server at {addr} did not answer {what} within {} s",
                    REQUEST_TIMEOUT.as_secs()
                )
            })?
        })?;
        if status == StatusCode::UNAUTHORIZED {
            bail!("the server needs a token: set SPOOL_AUTH_TOKEN or --token");
        }
        if status.is_success() {
            return Ok(bytes);
        }
        let value: Value = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "the server at {addr} answered {what} with {status} and a body that is not JSON"
            )
        })?;
        let text = |key: &str| {
            value
                .pointer(&format!("/error/{key}"))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        Err(ServerError {
            code: text("code").unwrap_or_else(|| "error".to_string()),
            message: text("message").unwrap_or_else(|| "no reason given".to_string()),
            field: text("field"),
        }
        .into())
    }
}

async fn request(
    addr: &str,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| {
        anyhow!(
            "cannot reach the spool HTTP listener at {addr}: {e} (is `spool serve` running? \
             set --http or SPOOL_HTTP_LISTEN)"
        )
    })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("HTTP handshake with {addr}"))?;
    // The connection future drives the socket; it ends with the request.
    tokio::spawn(connection);
    let what = format!("{method} {path}");
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, addr)
        .header(header::ACCEPT, "application/json");
    if body.is_some() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .context("building the request")?;
    let response = sender
        .send_request(request)
        .await
        .with_context(|| format!("{what} to {addr}"))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), RESPONSE_MAX_BYTES)
        .collect()
        .await
        .map_err(|e| anyhow!("reading the answer to {what} from {addr}: {e}"))?
        .to_bytes();
    Ok((status, body))
}

/// `text` percent-encoded for one path segment or query value: a queue
/// name may hold `/`, `+`, `;`, `$` and parentheses.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_keeps_unreserved_and_encodes_the_rest() {
        assert_eq!(escape("orders-1.x_~"), "orders-1.x_~");
        assert_eq!(escape("a/b+c;$()"), "a%2Fb%2Bc%3B%24%28%29");
    }
}
