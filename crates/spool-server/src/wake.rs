//! Waking the engine task at a due instant, to well under a millisecond.
//!
//! tokio's timer wheel ticks in whole milliseconds and rounds a deadline up
//! to the next tick, so an idle engine woke about 1.2 ms after a delayed
//! job was due (p50), which alone spends the 1 ms skew target. On Linux a
//! `timerfd` armed at the deadline on `CLOCK_MONOTONIC` (the clock
//! `std::time::Instant` reads there) wakes the reactor when it expires,
//! with the kernel's hrtimer precision and no spinning. Elsewhere, or
//! when a timerfd cannot be made (no reactor, out of fds), tokio's sleep.

use std::time::Instant;

/// One engine task's sleeper: re-armed only when the deadline comes
/// earlier. A deadline that moves later (a lease deleted before its TTR,
/// the usual case under load) keeps the earlier one armed: one early
/// wake-up, after which the engine asks again, costs less than a
/// `timerfd_settime` per change (a quarter of a syscall per job at
/// pipeline 1).
#[derive(Debug)]
pub(crate) struct Sleeper {
    #[cfg(target_os = "linux")]
    timer: Option<linux::Timer>,
}

impl Sleeper {
    /// Must be called inside a tokio runtime with I/O enabled for the
    /// precise timer (otherwise it falls back).
    pub(crate) fn new() -> Sleeper {
        Sleeper {
            #[cfg(target_os = "linux")]
            timer: linux::Timer::new(),
        }
    }

    /// Whether wake-ups are precise (a timerfd), for logs and tests.
    pub(crate) fn is_precise(&self) -> bool {
        #[cfg(target_os = "linux")]
        {
            self.timer.is_some()
        }
        #[cfg(not(target_os = "linux"))]
        {
            false
        }
    }

    /// Returns at `until` (never, for `None`), or earlier at a deadline an
    /// earlier call armed; the caller looks at its timers and asks again.
    /// Cancel-safe: dropped before it returns, it leaves the timer armed
    /// for the next call.
    pub(crate) async fn sleep_until(&mut self, until: Option<Instant>) {
        let Some(at) = until else {
            return std::future::pending().await;
        };
        #[cfg(target_os = "linux")]
        if let Some(timer) = &mut self.timer {
            if timer.sleep_until(at).await.is_ok() {
                return;
            }
            // A timerfd that failed once is not trusted again.
            tracing::warn!("the precise engine timer failed; using tokio's millisecond timer");
            self.timer = None;
        }
        tokio::time::sleep_until(at.into()).await;
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io;
    use std::os::fd::{AsFd, AsRawFd, RawFd};
    use std::time::Instant;

    use nix::sys::time::TimeSpec;
    use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
    use tokio::io::unix::AsyncFd;

    /// `TimerFd` as tokio's `AsyncFd` takes it.
    #[derive(Debug)]
    struct Fd(TimerFd);

    impl AsRawFd for Fd {
        fn as_raw_fd(&self) -> RawFd {
            self.0.as_fd().as_raw_fd()
        }
    }

    #[derive(Debug)]
    pub(super) struct Timer {
        fd: AsyncFd<Fd>,
        /// The deadline the timerfd is armed at and has not reported.
        armed: Option<Instant>,
    }

    impl Timer {
        pub(super) fn new() -> Option<Timer> {
            let flags = TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC;
            let timer = TimerFd::new(ClockId::CLOCK_MONOTONIC, flags).ok()?;
            // `AsyncFd::new` is deprecated because an `AsRawFd` may hand
            // out an fd it does not own; `Fd` owns its timerfd, open and
            // unchanged until the `AsyncFd` drops it, which is what the
            // `unsafe` replacement asks its caller to promise.
            #[allow(deprecated)]
            let fd = AsyncFd::new(Fd(timer)).ok()?;
            Some(Timer { fd, armed: None })
        }

        pub(super) async fn sleep_until(&mut self, at: Instant) -> io::Result<()> {
            if self.armed.is_none_or(|armed| armed > at) {
                // `Instant` is opaque: the deadline on CLOCK_MONOTONIC is
                // that clock now plus what is left until `at`.
                let now = Instant::now();
                let clock_now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
                let deadline = clock_now + TimeSpec::from(at.saturating_duration_since(now));
                self.fd
                    .get_ref()
                    .0
                    .set(
                        Expiration::OneShot(deadline),
                        TimerSetTimeFlags::TFD_TIMER_ABSTIME,
                    )
                    .map_err(io::Error::from)?;
                self.armed = Some(at);
            }
            loop {
                let mut ready = self.fd.readable().await?;
                // Reading the expiration count disarms the readiness; a
                // read that would block means it was stale.
                match ready.try_io(|fd| fd.get_ref().0.wait().map_err(io::Error::from)) {
                    Ok(result) => {
                        self.armed = None;
                        return result;
                    }
                    Err(_would_block) => continue,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Real time is unavoidable here (the point is the OS timer), but
    /// nothing is asserted about how long anything took: only that the
    /// sleeper does not return before its deadline, and does return.
    #[tokio::test]
    async fn wakes_at_its_deadline_and_not_before() {
        let mut sleeper = Sleeper::new();
        #[cfg(target_os = "linux")]
        assert!(sleeper.is_precise(), "a timerfd on Linux");
        for delay_us in [0, 300, 2_000] {
            let at = Instant::now() + Duration::from_micros(delay_us);
            sleeper.sleep_until(Some(at)).await;
            assert!(Instant::now() >= at, "woke before {delay_us} µs");
        }
        // A deadline that comes earlier (the engine's next timer changed)
        // while a later one was armed: the new one counts.
        let first = Instant::now() + Duration::from_secs(3_600);
        let pending =
            tokio::time::timeout(Duration::from_millis(1), sleeper.sleep_until(Some(first)));
        assert!(pending.await.is_err(), "an hour away");
        let at = Instant::now() + Duration::from_micros(500);
        sleeper.sleep_until(Some(at)).await;
        assert!(Instant::now() >= at);
    }

    /// A deadline that moves later keeps the earlier one armed: the
    /// sleeper returns at the earlier one, and the next call sleeps to
    /// the later.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_later_deadline_keeps_the_earlier_one_armed() {
        let mut sleeper = Sleeper::new();
        // Far enough that a loaded machine cannot let it pass before the
        // first poll arms it (2 ms did: the sleep then ended at once).
        let early = Instant::now() + Duration::from_secs(1);
        let pending =
            tokio::time::timeout(Duration::from_micros(1), sleeper.sleep_until(Some(early)));
        assert!(pending.await.is_err(), "cancelled while armed");
        let later = Instant::now() + Duration::from_secs(3_600);
        // Returns at the early deadline, an hour before the later one
        // (the generous bound only catches a sleeper that slept on).
        tokio::time::timeout(Duration::from_secs(60), sleeper.sleep_until(Some(later)))
            .await
            .expect("woke at the earlier deadline still armed");
        assert!(Instant::now() >= early);
        // Nothing is armed now: the later deadline is.
        let pending =
            tokio::time::timeout(Duration::from_millis(1), sleeper.sleep_until(Some(later)));
        assert!(pending.await.is_err(), "an hour away");
    }
}
