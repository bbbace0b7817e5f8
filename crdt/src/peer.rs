//! What one node knows a connected peer holds or was sent, and the filter that follows from
//! it: nothing goes to a peer twice. Pure state, kept by [`crate::Session`] (which judges
//! in-sync on what the peer *confirmed*, kept apart from this).

use crate::clock::VersionVector;
use crate::delta::Delta;

/// Sync state for one peer, from its Hello on.
#[derive(Debug, Clone)]
pub struct PeerSync {
    /// What the peer holds as far as we know: its Hello clock, plus every delta that crossed
    /// the connection either way since.
    known: VersionVector,
}

impl PeerSync {
    /// Starts from the clock the peer announced in its Hello.
    pub fn new(hello_clock: VersionVector) -> Self {
        Self { known: hello_clock }
    }

    pub fn known(&self) -> &VersionVector {
        &self.known
    }

    /// Keeps only the deltas the peer is not known to hold: a delta is never sent to a peer
    /// whose clock is known to cover it.
    pub fn unknown<'a>(&self, deltas: impl IntoIterator<Item = &'a Delta>) -> Vec<Delta> {
        deltas
            .into_iter()
            .filter(|d| !self.known.contains(d.id))
            .cloned()
            .collect()
    }

    /// The peer said it holds `clock`.
    pub fn join(&mut self, clock: &VersionVector) {
        self.known.join(clock);
    }

    /// Records deltas that crossed the connection (sent or received): the peer holds them.
    pub fn note<'a>(&mut self, deltas: impl IntoIterator<Item = &'a Delta>) {
        for d in deltas {
            self.known.insert(d.id);
        }
    }
}
