//! A one-line progress bar on stderr, drawn only when stderr is a terminal: piped output stays
//! quiet.

use std::io::{IsTerminal as _, Write as _};

pub struct Progress {
    on: bool,
    total: u64,
    label: String,
}

impl Progress {
    pub fn new(total: u64, label: &str) -> Progress {
        Progress {
            on: std::io::stderr().is_terminal(),
            total,
            label: label.to_string(),
        }
    }

    pub fn set_total(&mut self, total: u64) {
        self.total = total;
    }

    /// Redraws the bar at `done` of the total, with a note after it.
    pub fn draw(&self, done: u64, note: &str) {
        if !self.on {
            return;
        }
        let width = 30u64;
        let filled = (done.min(self.total) * width)
            .checked_div(self.total)
            .unwrap_or(width);
        let bar: String = (0..width)
            .map(|i| if i < filled { '#' } else { '-' })
            .collect();
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2K{} [{bar}] {done}/{} {note}",
            self.label, self.total
        );
        let _ = err.flush();
    }

    /// Clears the bar's line.
    pub fn finish(&self) {
        if self.on {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}
