//! The broker's clock. The database's `now()` is never used: every node
//! passes its own instant as a parameter, so tests can stop time (a manual
//! clock) and every rule reads the same `now` through one operation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch: the wall clock read once and advanced
/// monotonically, or a manual clock only [`Clock::advance`] moves.
#[derive(Debug, Clone)]
pub struct Clock {
    start: Instant,
    start_ns: u64,
    manual: Option<Arc<AtomicU64>>,
}

impl Clock {
    pub fn wall() -> Clock {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Clock {
            start: Instant::now(),
            start_ns: wall.as_nanos() as u64,
            manual: None,
        }
    }

    /// A clock standing still at `now_ns` until advanced.
    pub fn manual(now_ns: u64) -> Clock {
        Clock {
            start: Instant::now(),
            start_ns: now_ns,
            manual: Some(Arc::new(AtomicU64::new(now_ns))),
        }
    }

    pub fn is_manual(&self) -> bool {
        self.manual.is_some()
    }

    pub fn now_ns(&self) -> u64 {
        match &self.manual {
            Some(now) => now.load(Ordering::Acquire),
            None => self.start_ns + self.start.elapsed().as_nanos() as u64,
        }
    }

    /// Moves a manual clock forward (no-op on the wall clock).
    pub fn advance(&self, ns: u64) {
        if let Some(now) = &self.manual {
            now.fetch_add(ns, Ordering::AcqRel);
        }
    }
}
