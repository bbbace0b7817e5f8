//! Time, from one place: every reading of the clock in the daemon goes through [`Clock`], so
//! tests can control it (tokio's paused time drives [`SystemClock`]'s monotonic side).

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Instant;

/// A source of time.
pub trait Clock: Send + Sync + Debug + 'static {
    /// Monotonic time, for timeouts, backoff and the state machines' `now`.
    fn now(&self) -> Instant;
    /// Wall-clock time in Unix milliseconds, for what people read and what other nodes compare
    /// (invite expiry, last seen, change timestamps).
    fn wall_ms(&self) -> i64;
}

/// The real clock: tokio's (pausable) monotonic clock and the system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn wall_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    }
}

/// The default clock.
pub fn system() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}
