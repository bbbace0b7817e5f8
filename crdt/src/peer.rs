//! What one node knows about one connected peer, and the sync decisions that follow from it:
//! what to send in catch-up, which new deltas to push, whether the two are in sync. Pure state;
//! the daemon's sessions and the simulator both drive it.

use crate::clock::{Causality, VersionVector};
use crate::delta::Delta;
use crate::engine::{CatchUp, Engine};
use crate::id::DeltaId;

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

    /// What the peer lacks of what `engine` holds, in `(origin, seq)` order.
    pub fn plan(&self, engine: &Engine) -> CatchUp {
        engine.catch_up(&self.known)
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

    /// Whether the peer is known to hold `id`.
    pub fn holds(&self, id: DeltaId) -> bool {
        self.known.contains(id)
    }

    /// Records deltas that crossed the connection (sent or received): the peer holds them.
    pub fn note<'a>(&mut self, deltas: impl IntoIterator<Item = &'a Delta>) {
        for d in deltas {
            self.known.insert(d.id);
        }
    }

    /// Whether our clock `ours` equals what the peer is known to hold.
    pub fn in_sync(&self, ours: &VersionVector) -> bool {
        ours.compare(&self.known) == Causality::Equal
    }
}
