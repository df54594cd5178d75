//! [`CancelToken`]: a one-shot signal with a reason, shared by clones, that
//! any number of tasks can await (a Go context's `Done()` with its `Err()`).

use std::fmt;
use std::sync::{Arc, OnceLock};

use tokio::sync::Notify;

/// Why a job's token fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CancelReason {
    /// The job was cancelled on the server (a heartbeat answered
    /// `cancelled`): its result will not be taken.
    Cancelled,
    /// The lease is gone: its deadline passed without a heartbeat getting
    /// through, or the server answered `lease_expired`. Another worker may
    /// get the job.
    Deadline,
    /// The handler ran past the worker's handler timeout.
    TimedOut,
    /// The worker is shutting down and the handler's grace is over.
    Shutdown,
}

impl fmt::Display for CancelReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CancelReason::Cancelled => "the job was cancelled",
            CancelReason::Deadline => "the job's lease ended",
            CancelReason::TimedOut => "the handler timed out",
            CancelReason::Shutdown => "the worker is shutting down",
        })
    }
}

/// Fires once, with the first reason given; clones share it.
///
/// ```
/// use spool_client::{CancelReason, CancelToken};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let token = CancelToken::new();
/// let waiter = token.clone();
/// assert!(token.cancel(CancelReason::Cancelled));
/// assert!(!token.cancel(CancelReason::Shutdown)); // the first reason stays
/// assert_eq!(waiter.cancelled().await, CancelReason::Cancelled);
/// # });
/// ```
#[derive(Clone, Default)]
pub struct CancelToken {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    reason: OnceLock<CancelReason>,
    notify: Notify,
}

impl fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancelToken")
            .field("reason", &self.reason())
            .finish()
    }
}

impl CancelToken {
    pub fn new() -> CancelToken {
        CancelToken::default()
    }

    /// Fires the token; `false` if it had fired already (the first reason
    /// stays).
    pub fn cancel(&self, reason: CancelReason) -> bool {
        let first = self.inner.reason.set(reason).is_ok();
        if first {
            self.inner.notify.notify_waiters();
        }
        first
    }

    pub fn is_cancelled(&self) -> bool {
        self.inner.reason.get().is_some()
    }

    /// The reason, once fired.
    pub fn reason(&self) -> Option<CancelReason> {
        self.inner.reason.get().copied()
    }

    /// Resolves when the token fires (at once if it has).
    pub async fn cancelled(&self) -> CancelReason {
        loop {
            let notified = self.inner.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a cancel between the check
            // and the await still wakes this waiter.
            notified.as_mut().enable();
            if let Some(reason) = self.reason() {
                return reason;
            }
            notified.await;
        }
    }
}
