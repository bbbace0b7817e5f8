//! Deadlines that suit tokio's timer wheel, so an idle daemon wakes up once per timer, not
//! twice or three times.
//!
//! Tokio files a timer in a hierarchical wheel counted in milliseconds from the moment the
//! runtime was built: up to 64 ms away in 1 ms slots, up to 4.096 s in 64 ms slots, further in
//! 4.096 s slots. A timer in a coarse slot is moved to a finer level when its slot comes due,
//! and that costs the runtime a wake-up of its own: a timer 1 s away woke the daemon at the
//! start of its 64 ms slot and again at its deadline. A deadline on a slot boundary of its level
//! fires when the slot comes due, at once. [`align`] rounds a deadline up to the boundary of
//! the level it will be filed in, counted from [`origin`]: the runtime's start when the
//! binary said when that was ([`set_origin`], tandemd does), else the first use (the deadlines
//! are then as coarse as before, only not on the wheel's boundaries).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

static ORIGIN: OnceLock<Instant> = OnceLock::new();

/// Says when the runtime's timer wheel started: call with an `Instant` taken just before the
/// tokio runtime is built (tokio counts whole milliseconds from its build, rounding deadlines
/// up, so an instant up to a millisecond early is exact). Only the first call counts.
pub fn set_origin(at: Instant) {
    let _ = ORIGIN.set(at);
}

/// The instant the wheel counts from (see [`set_origin`]).
pub fn origin() -> Instant {
    *ORIGIN.get_or_init(Instant::now)
}

/// Slots of the wheel's second level: timers up to 4.096 s away.
const LEVEL1: u64 = 64;
/// Slots of the third level (timers up to 262 s away), in milliseconds: waking on their
/// boundaries costs one wake-up, whatever else is due there.
pub const LEVEL2: u64 = 64 * 64;

/// `at`, rounded up to the slot boundary of the wheel level a timer set at `now` is filed in:
/// at most 64 ms later for timers up to 4 s away, 4.096 s for timers further; timers less than
/// 64 ms away are left alone (they are filed to the millisecond).
pub fn align(now: Instant, at: Instant) -> Instant {
    let ahead = at.saturating_duration_since(now).as_millis() as u64;
    let step = if ahead < LEVEL1 {
        return at;
    } else if ahead < LEVEL1 * 64 {
        LEVEL1
    } else {
        LEVEL2
    };
    round_up(origin(), at, step)
}

/// `at` rounded up to `from` plus a whole number of `step` milliseconds.
pub fn round_up(from: Instant, at: Instant, step: u64) -> Instant {
    let ms = at
        .saturating_duration_since(from)
        .as_nanos()
        .div_ceil(1_000_000);
    let ms = (ms as u64).div_ceil(step.max(1)) * step.max(1);
    (from + Duration::from_millis(ms)).max(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_round_up_to_the_boundary_of_their_level() {
        let o = Instant::now();
        let ms = |n: u64| o + Duration::from_millis(n);
        assert_eq!(round_up(o, ms(1000), 64), ms(1024));
        assert_eq!(round_up(o, ms(1024), 64), ms(1024));
        assert_eq!(round_up(o, ms(5000), 4096), ms(8192));
        // Part of a millisecond counts as a whole one, as in tokio.
        assert_eq!(
            round_up(o, ms(1024) + Duration::from_micros(1), 64),
            ms(1088)
        );
        let now = origin();
        let at = now + Duration::from_millis(30);
        assert_eq!(align(now, at), at, "near timers stay exact");
        let at = now + Duration::from_millis(1000);
        let got = align(now, at);
        assert!(got >= at && got < at + Duration::from_millis(64));
        assert_eq!(got.duration_since(origin()).as_millis() % 64, 0);
        let at = now + Duration::from_secs(5);
        let got = align(now, at);
        assert!(got >= at && got < at + Duration::from_millis(4096));
        assert_eq!(got.duration_since(origin()).as_millis() % 4096, 0);
    }
}
