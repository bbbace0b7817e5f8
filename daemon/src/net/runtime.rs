//! The async runtime quinn runs on: tokio's, with connection timers that leave the timer
//! wheel when they move later.
//!
//! A QUIC connection keeps one timer for the earliest of its deadlines (loss detection, keep-
//! alive, idle). After each packet it sends, the deadline is the probe timeout (tens of
//! milliseconds); the acknowledgement moves it seconds later. Tokio's `Sleep::reset` to a later
//! instant leaves the entry in its old slot of the wheel and only re-files it when that slot
//! comes due, so every packet of an idle cluster cost a wake-up for nothing one probe timeout
//! later: about half of what an idle daemon woke up for. Here a later deadline gets a fresh
//! `Sleep` (dropping the old one takes its entry out of the wheel); an earlier one is reset in
//! place, which tokio files at once. Deadlines at least 64 ms away are put on the wheel's
//! slot boundaries ([`crate::wheel::align`]): a keep-alive or idle timer may fire up to a slot
//! late (64 ms, or 4 s for those further than 4 s), which such timers allow, and saves the
//! runtime a wake-up each.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, TokioRuntime};
use tokio::time::Sleep;

/// Tokio, with [`Timer`] for quinn's timers.
#[derive(Debug)]
pub(crate) struct QuicRuntime;

impl Runtime for QuicRuntime {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(Timer::new(at))
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        TokioRuntime.spawn(future)
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        TokioRuntime.wrap_udp_socket(socket)
    }
}

/// A timer whose wheel entry is always at its current deadline.
struct Timer {
    sleep: Pin<Box<Sleep>>,
    at: Instant,
}

impl Timer {
    fn new(at: Instant) -> Timer {
        Timer::at_aligned(crate::wheel::align(Instant::now(), at))
    }

    /// A timer at `at`, already on the wheel's boundaries.
    fn at_aligned(at: Instant) -> Timer {
        Timer {
            sleep: Box::pin(tokio::time::sleep_until(at.into())),
            at,
        }
    }
}

impl fmt::Debug for Timer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Timer").field("at", &self.at).finish()
    }
}

impl AsyncTimer for Timer {
    fn reset(mut self: Pin<&mut Self>, at: Instant) {
        let at = crate::wheel::align(Instant::now(), at);
        if at > self.at {
            // Later: a new entry; the old one leaves the wheel as it drops.
            *self = Timer::at_aligned(at);
        } else if at < self.at {
            self.at = at;
            self.sleep.as_mut().reset(at.into());
        }
    }

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Future::poll(self.sleep.as_mut(), cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_timer_fires_at_its_last_deadline_moved_either_way() {
        let start = Instant::now();
        let ms = |n| start + Duration::from_millis(n);
        let mut t = Box::pin(Timer::new(ms(10)));
        t.as_mut().reset(ms(400));
        t.as_mut().reset(ms(150));
        t.as_mut().reset(ms(200));
        std::future::poll_fn(|cx| t.as_mut().poll(cx)).await;
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(200), "{took:?}");
        // (Rounded up to the wheel's 64 ms slots at most.)
        assert!(took < Duration::from_millis(390), "{took:?}");
    }
}
