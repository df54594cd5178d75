//! Logs: `tracing` events on stdout, JSON lines by default when stdout is
//! not a terminal (a log collector reads them) and text when it is (a person
//! does). The filter sits behind a reload handle so `PUT /admin/log-level`
//! changes it without a restart.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

impl LogFormat {
    pub fn parse(value: &str) -> Option<LogFormat> {
        match value {
            "json" => Some(LogFormat::Json),
            "text" => Some(LogFormat::Text),
            _ => None,
        }
    }

    /// JSON for machines, text for a terminal.
    pub fn for_stdout() -> LogFormat {
        if std::io::stdout().is_terminal() {
            LogFormat::Text
        } else {
            LogFormat::Json
        }
    }
}

/// Changes the log filter of the running process.
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Arc<Mutex<String>>,
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl")
            .field("current", &self.current())
            .finish()
    }
}

impl LogControl {
    /// The filter directive in force.
    pub fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the filter; a directive that does not parse changes nothing.
    pub fn set(&self, directive: &str) -> Result<String, String> {
        let directive = directive.trim();
        let filter = EnvFilter::try_new(directive)
            .map_err(|e| format!("{directive:?} is not a filter directive: {e}"))?;
        // Held across the reload, so concurrent changes apply in the order
        // they record themselves and `current` names the filter in force.
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        self.handle
            .reload(filter)
            .map_err(|e| format!("could not change the filter: {e}"))?;
        *current = directive.to_string();
        drop(current);
        tracing::info!(filter = %directive, "log filter changed");
        Ok(directive.to_string())
    }
}

/// Installs the process-wide subscriber. `filter` was validated with the
/// rest of the configuration.
pub fn init(format: LogFormat, filter: &str) -> anyhow::Result<LogControl> {
    let env_filter = EnvFilter::try_new(filter)?;
    let (filter_layer, handle) = reload::Layer::new(env_filter);
    let json = (format == LogFormat::Json).then(|| {
        fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stdout)
    });
    let text = (format == LogFormat::Text).then(|| {
        fmt::layer()
            .with_ansi(std::io::stdout().is_terminal())
            .with_writer(std::io::stdout)
    });
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(json)
        .with(text)
        .try_init()?;
    Ok(LogControl {
        handle,
        current: Arc::new(Mutex::new(filter.to_string())),
    })
}
