//! Damage on this node's disk, found and healed: a stored delta that fails its checksum is
//! quarantined (out of the clock, so members send a good copy, which replaces it), a damaged
//! snapshot is dropped (the document reloads from its deltas), and people are told (an ERROR
//! log, `damaged` in the status, a counter in `/metrics`, a `damaged` event). Also the rollback
//! after a failed commit, which leaves memory ahead of the disk in the same way.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tandem_crdt::{DocId, Engine, Source};

use super::Node;
use super::events::Event;
use crate::Error;
use crate::cache::DocCache;
use crate::store::{self, Damage, DamagedDelta, FailureHook, StoreError, Write};

/// After a failed commit: with the engine locked (no local write is queued meanwhile), refuse
/// what is queued, roll the engine's clock back to the store's, and drop every cached document
/// (they may hold changes that were never stored).
pub(super) fn rollback_hook(
    engine: Arc<Mutex<Engine>>,
    cache: Arc<Mutex<DocCache>>,
) -> FailureHook {
    Box::new(move |drain| {
        let mut engine = engine.lock().unwrap_or_else(|p| p.into_inner());
        let committed = drain();
        engine.reset_clock(committed);
        cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .discard(None);
    })
}

impl Node {
    /// Quarantines damaged deltas and tells people; restarts the sync sessions so members,
    /// who believe this node holds them, send them again.
    pub(crate) async fn quarantine(&self, damage: Vec<Damage>) -> Result<(), Error> {
        if damage.is_empty() {
            return Ok(());
        }
        for d in &damage {
            tracing::error!(
                doc = %d.doc,
                origin = %d.id.origin.short(),
                seq = d.id.seq,
                why = %d.why,
                "a stored delta is damaged; dropped from the clock to be fetched again from members"
            );
        }
        self.inner
            .store
            .write(Write::Quarantine {
                deltas: damage.clone(),
            })
            .await?;
        {
            let mut engine = self.engine();
            for d in &damage {
                engine.forget(d.id);
            }
        }
        self.inner
            .damage_found
            .fetch_add(damage.len() as u64, Ordering::Relaxed);
        let mut docs: Vec<DocId> = damage.iter().map(|d| d.doc).collect();
        docs.dedup();
        let sender = self.event_sender();
        for doc in docs {
            self.cache().discard(Some(doc));
            if let Some(tx) = &sender {
                let why = damage
                    .iter()
                    .filter(|d| d.doc == doc)
                    .map(|d| d.why.as_str())
                    .next()
                    .unwrap_or_default();
                let _ = tx.send(Arc::new(Event {
                    doc,
                    source: Source::Local,
                    heads: Vec::new(),
                    patches: Vec::new(),
                    patched: false,
                    deleted: false,
                    damaged: Some(why.to_string()),
                }));
            }
        }
        if let Some(net) = self.inner.net.get() {
            net.resync();
        }
        Ok(())
    }

    /// A store read that met damage (serving a peer, an export of deltas) quarantines it in the
    /// background; the read itself still fails.
    pub(crate) fn noticed(&self, e: &StoreError) {
        if let StoreError::Damaged(damage) = e {
            let node = self.clone();
            let damage = damage.clone();
            tokio::spawn(async move {
                if let Err(e) = node.quarantine(damage).await {
                    tracing::error!(error = %e, "cannot quarantine damaged deltas");
                }
            });
        }
    }

    /// Forgets a damaged snapshot of `doc`: it loads from its deltas, which stay.
    pub(super) async fn drop_snapshot(&self, doc: DocId, why: &str) -> Result<(), Error> {
        tracing::error!(%doc, %why, "a stored snapshot is damaged; the document is rebuilt from its deltas");
        self.inner.damage_found.fetch_add(1, Ordering::Relaxed);
        self.inner
            .store
            .write(Write::DropSnapshot { doc })
            .await
            .map_err(Error::from)
    }

    /// Deltas found damaged and not yet replaced by a good copy from a member.
    pub async fn damaged(&self) -> Result<Vec<DamagedDelta>, Error> {
        Ok(self.inner.store.read(store::damaged).await?)
    }

    /// Whether the last commit failed because the disk is full (writes resume by themselves
    /// once there is room).
    pub fn disk_full(&self) -> bool {
        self.writer_stats().disk_full.load(Ordering::Relaxed)
    }

    /// How many damaged deltas and snapshots were found since start.
    pub fn damage_found(&self) -> u64 {
        self.inner.damage_found.load(Ordering::Relaxed)
    }
}
