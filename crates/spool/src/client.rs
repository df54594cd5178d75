//! The CLI's HTTP client: one request at a time to the server's HTTP
//! listener, through `spool-client`'s transport (hyper's HTTP/1 client) on
//! a current-thread runtime (one request at a time needs nothing more).
//! Every request is bounded in time, so a hung server cannot hang the CLI,
//! and every failure is one clear line; an error answer of the server keeps
//! its code and message.

use std::fmt;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use hyper::{Method, StatusCode};
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

/// A blocking client of one server (`spool top`'s refreshes reuse its
/// kept-alive connection).
pub struct Client<'a> {
    runtime: tokio::runtime::Runtime,
    server: &'a ServerArgs,
    http: spool_client::Client,
}

impl<'a> Client<'a> {
    pub fn new(server: &'a ServerArgs) -> anyhow::Result<Client<'a>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let mut http = spool_client::Client::builder(server.http.as_str())
            .request_timeout(REQUEST_TIMEOUT)
            .response_max_bytes(RESPONSE_MAX_BYTES);
        if let Some(token) = &server.token {
            http = http.token(token.as_str());
        }
        let http = http.build()?;
        Ok(Client {
            runtime,
            server,
            http,
        })
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
        let answer = self
            .runtime
            .block_on(
                self.http
                    .request(method, path, body.map(Bytes::from), Duration::ZERO),
            )
            .map_err(|e| match e {
                spool_client::Error::Connect { message, .. } => anyhow!(
                    "cannot reach the spool HTTP listener at {addr} for {what}: {message} \
                     (is `spool serve` running? set --http or SPOOL_HTTP_LISTEN)"
                ),
                spool_client::Error::Timeout { .. } => anyhow!(
                    "the server at {addr} did not answer {what} within {} s",
                    REQUEST_TIMEOUT.as_secs()
                ),
                other => anyhow!("{what} to {addr}: {other}"),
            })?;
        let status = StatusCode::from_u16(answer.status)
            .with_context(|| format!("{what} to {addr}: a status of {}", answer.status))?;
        let bytes = answer.body;
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

pub use spool_client::escape;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_keeps_unreserved_and_encodes_the_rest() {
        assert_eq!(escape("orders-1.x_~"), "orders-1.x_~");
        assert_eq!(escape("a/b+c;$()"), "a%2Fb%2Bc%3B%24%28%29");
    }
}
