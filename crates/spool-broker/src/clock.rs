//! The clock brokers read `now` from: one type for the local broker (engine
//! time, counted from its fixed epoch) and the PostgreSQL broker (Unix
//! time), so both keep the same rules: the wall clock is read once and
//! advanced monotonically after that (a wall-clock step never moves a timer
//! or a deadline), and tests stop time with a manual clock they advance
//! (no sleeps for TTRs, backoffs or retention).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Nanoseconds since an epoch: the wall clock read once and advanced by a
/// monotonic clock, or a manual clock only [`Clock::advance`] moves.
/// Clones share a manual clock's time.
#[derive(Debug, Clone)]
pub struct Clock {
    /// The epoch, in wall-clock nanoseconds since the Unix epoch.
    epoch_wall_ns: u64,
    start: Instant,
    start_ns: u64,
    manual: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// The wall clock in nanoseconds since the Unix epoch.
    pub fn wall() -> Clock {
        Clock::wall_since(0)
    }

    /// The wall clock in nanoseconds since `epoch_wall_ns` (itself
    /// nanoseconds since the Unix epoch); 0 before it.
    pub fn wall_since(epoch_wall_ns: u64) -> Clock {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Clock {
            epoch_wall_ns,
            start: Instant::now(),
            start_ns: (wall.as_nanos() as u64).saturating_sub(epoch_wall_ns),
            manual: None,
        }
    }

    /// A clock standing still at `now_ns` (since the Unix epoch) until
    /// advanced.
    pub fn manual(now_ns: u64) -> Clock {
        Clock::manual_since(0, now_ns)
    }

    /// A clock standing still at `now_ns` since `epoch_wall_ns` until
    /// advanced.
    pub fn manual_since(epoch_wall_ns: u64, now_ns: u64) -> Clock {
        Clock {
            epoch_wall_ns,
            start: Instant::now(),
            start_ns: now_ns,
            manual: Some(Arc::new(AtomicU64::new(now_ns))),
        }
    }

    pub fn is_manual(&self) -> bool {
        self.manual.is_some()
    }

    /// Wall-clock nanoseconds since the Unix epoch at this clock's 0.
    pub fn epoch_ns(&self) -> u64 {
        self.epoch_wall_ns
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

    /// When time `ns` comes on the monotonic clock, to sleep until; `None`
    /// on a manual clock (its timers run when it is advanced) or past any
    /// representable instant.
    pub fn instant_at(&self, ns: u64) -> Option<Instant> {
        if self.manual.is_some() {
            return None;
        }
        self.start
            .checked_add(Duration::from_nanos(ns.saturating_sub(self.start_ns)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced_and_clones_share_it() {
        let clock = Clock::manual_since(7, 1_000);
        let copy = clock.clone();
        assert_eq!(clock.now_ns(), 1_000);
        clock.advance(500);
        assert_eq!(copy.now_ns(), 1_500);
        assert!(copy.is_manual());
        assert_eq!(copy.epoch_ns(), 7);
        assert_eq!(copy.instant_at(2_000), None);
    }

    #[test]
    fn wall_clock_counts_from_its_epoch_and_never_goes_back() {
        let unix = Clock::wall();
        let later_epoch = Clock::wall_since(1_000_000_000);
        let (a, b) = (unix.now_ns(), later_epoch.now_ns());
        // The epochs are a second apart; each clock read the wall once.
        let apart_ns = i128::from(a) - i128::from(b);
        assert!(
            (apart_ns - 1_000_000_000).abs() < 1_000_000_000,
            "{a} vs {b}"
        );
        assert!(!unix.is_manual());
        assert_eq!(unix.epoch_ns(), 0);
        unix.advance(1 << 60);
        assert!(unix.now_ns() >= a && unix.now_ns() < a + (1 << 59));
        let due = unix.now_ns() + 1_000_000;
        assert!(unix.instant_at(due).is_some_and(|at| at > Instant::now()));
    }
}
