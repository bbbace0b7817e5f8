//! The commit paths. Local: a change becomes this node's next delta, queued to the writer
//! while the engine lock is held (seq order equals commit order), acknowledged after the group
//! commit. Remote: deltas from a peer are deduplicated and validated by the engine, committed
//! with the clock, then applied to loaded documents and announced. Every commit is fed to the
//! sync sessions (push and relay) right after it is durable.

use std::collections::BTreeMap;
use std::sync::Arc;

use automerge::{Automerge, ChangeHash};
use foldhash::{HashSet, HashSetExt};
use tandem_crdt::delta::DeltaError;
use tandem_crdt::{Action, Delta, DeltaBody, DocId, Input, NodeId, Source, VersionVector};
use tokio::sync::{broadcast, oneshot};

use super::Node;
use super::events::Event;
use crate::Error;
use crate::cache::{DocEntry, DocState, LandingGuard};
use crate::error::DocError;
use crate::net::Commit;
use crate::store::{self, AfterCommit, StoreError, Write};

/// A push touching at most this many documents is applied in memory for its patches (see
/// `commit_remote`); a bigger one, and every catch-up batch, is stored without loading what
/// nobody has loaded.
const LIVE_DOCS: usize = 4;

/// Feeds deltas just committed to the sync sessions, if any listens. Called on the writer
/// thread after the commit is durable and the committed clock published, and decided there
/// (not when the write was queued): a session that subscribed meanwhile must not miss it.
fn feed_commit(feed: &broadcast::Sender<Commit>, deltas: &Arc<Vec<Delta>>, source: Source) {
    if feed.receiver_count() > 0 {
        let _ = feed.send(Commit {
            deltas: deltas.clone(),
            source,
        });
    }
}

/// The heads of a document whose complete heads were `base` (empty: a new document) once
/// `changes` are added, if every dependency of them is another of them or one of `base`.
/// (Then the heads are those of `base` and `changes` that no change depends on, sorted as
/// Automerge sorts them.) Otherwise `None`: a dependency is an older change, or missing, and
/// only loading the document can tell.
fn derive_heads(
    base: &[ChangeHash],
    changes: &[Box<automerge::Change>],
) -> Option<Vec<ChangeHash>> {
    // Hash sets: a long history lands a few thousand changes per batch, and ordered sets of
    // 32-byte keys showed in its profile (and then SipHash).
    let all: HashSet<ChangeHash> = changes.iter().map(|c| c.hash()).collect();
    let mut deps = HashSet::with_capacity(changes.len());
    for c in changes {
        for d in c.deps() {
            if !all.contains(d) && !base.contains(d) {
                return None;
            }
            deps.insert(*d);
        }
    }
    let mut heads: Vec<ChangeHash> = all
        .into_iter()
        .chain(base.iter().copied())
        .filter(|h| !deps.contains(h))
        .collect();
    heads.sort_unstable();
    heads.dedup();
    Some(heads)
}

/// A batch of received deltas by document: its changes (boxed: a parsed change is over 500
/// bytes, and moving them between the batch's vectors showed in profiles), whether one of them
/// deletes it, and the origin of its last delta.
#[allow(clippy::vec_box)]
type ByDoc = BTreeMap<DocId, (Vec<Box<automerge::Change>>, bool, NodeId)>;

/// What a committed local write still has to do.
pub(super) struct Pending {
    rx: oneshot::Receiver<Result<(), StoreError>>,
}

impl Pending {
    /// A write refused before it was queued.
    fn refused(e: StoreError) -> Self {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Err(e));
        Pending { rx }
    }

    pub(super) async fn wait(self) -> Result<(), Error> {
        self.rx
            .await
            .unwrap_or(Err(StoreError::Closed))
            .map_err(Error::from)
    }
}

/// Received deltas queued for their commit (see [`Node::queue_remote`]).
pub(crate) struct Received {
    pending: Option<Pending>,
    rejected: Option<DeltaError>,
}

impl Received {
    /// Waits for the commit; then an invalid delta among them is the error.
    pub(crate) async fn wait(self) -> Result<(), Error> {
        if let Some(p) = self.pending {
            p.wait().await?;
        }
        match self.rejected {
            Some(e) => Err(Error::Doc(DocError::InvalidDelta(e.to_string()))),
            None => Ok(()),
        }
    }
}

impl Node {
    /// Turns bodies into this node's next deltas and queues them in one commit. Holding the
    /// engine lock while queueing keeps seq order equal to commit order. `keep` stays alive until
    /// the commit (so the cache cannot evict and reload a document that lacks it), and the event
    /// is sent right after the commit, even if the caller has gone. `snapshot`: the document's
    /// whole state once these are in, if the caller has it saved (see [`Write::Deltas`]).
    pub(super) fn commit_local(
        &self,
        doc: DocId,
        bodies: Vec<DeltaBody>,
        heads: Vec<ChangeHash>,
        event: Option<Event>,
        keep: Arc<DocEntry>,
        snapshot: Option<Vec<u8>>,
    ) -> Pending {
        let sender = if event.is_some() {
            self.event_sender()
        } else {
            None
        };
        let mut engine = self.engine();
        if keep.is_stale() {
            // A failed commit rolled memory back while this change was made: it may build on
            // a change that never reached the disk. Refused with the reason that one failed.
            return Pending::refused(if self.disk_full() {
                StoreError::DiskFull
            } else {
                StoreError::CommitFailed(
                    "an earlier write failed while this one was made; try again".into(),
                )
            });
        }
        let mut deltas = Vec::with_capacity(bodies.len());
        for body in bodies {
            for action in engine.handle(Input::LocalChange { doc, body }) {
                if let Action::Persist { deltas: d, .. } = action {
                    deltas.extend(d);
                }
            }
        }
        let feed = self.inner.commits.clone();
        let announce = sender.zip(event);
        if announce.is_some() {
            keep.event_waits();
        }
        let after_commit: AfterCommit = Box::new(move |deltas| {
            if let Some((tx, ev)) = announce {
                let _ = tx.send(Arc::new(ev));
                keep.event_sent();
            }
            feed_commit(&feed, deltas, Source::Local);
            drop(keep);
        });
        let rx = self.inner.store.submit(Write::Deltas {
            deltas: Arc::new(deltas),
            heads: vec![(doc, heads)],
            snapshot: snapshot.map(|s| (doc, s)),
            after_commit: Some(after_commit),
        });
        Pending { rx }
    }

    /// Commits `change`, just made to `am`, as this node's next delta, with its event (and its
    /// patches, logged while it was made, if anyone listens).
    pub(super) fn commit_change(
        &self,
        doc: DocId,
        am: &Automerge,
        patches: Vec<automerge::Patch>,
        change: &automerge::Change,
        keep: Arc<DocEntry>,
    ) -> Pending {
        let event = self.local_event(doc, am, false, || patches);
        let body = DeltaBody::Change(change.raw_bytes().to_vec());
        self.commit_local(doc, vec![body], am.get_heads(), event, keep, None)
    }

    /// Every commit from now on (made here or received), for the sync sessions.
    pub(crate) fn subscribe_commits(&self) -> broadcast::Receiver<Commit> {
        self.inner.commits.subscribe()
    }

    /// Caches a new document and commits the deltas that make it (with `snapshot`, its saved
    /// state, if the caller has it).
    pub(super) async fn commit_new(
        &self,
        doc: DocId,
        am: Automerge,
        bodies: Vec<DeltaBody>,
        snapshot: Option<Vec<u8>>,
    ) -> Result<(), Error> {
        let heads = am.get_heads();
        let event = self.local_event(doc, &am, false, || am.current_state());
        let entry = self
            .cache()
            .insert_loaded(doc, DocState { am, deleted: false });
        self.commit_local(doc, bodies, heads, event, entry, snapshot)
            .wait()
            .await
    }

    /// Stores deltas received from `from`: validated and deduplicated by the engine, applied to
    /// their documents, committed in one transaction with the clock and the documents' new
    /// heads, then relayed to other peers and announced to subscribers. An invalid delta is an
    /// error after the valid ones are kept. [`Node::queue_remote`] and its wait, in one.
    pub(crate) async fn apply_remote(
        &self,
        from: NodeId,
        deltas: Vec<Delta>,
        parsed: Vec<Option<Box<automerge::Change>>>,
        live: bool,
    ) -> Result<(), Error> {
        self.queue_remote(from, deltas, parsed, live)
            .await
            .wait()
            .await
    }

    /// The first half of [`Node::apply_remote`]: validates the deltas, applies them and queues
    /// their commit; the returned [`Received`] waits for it. A receiver queues its next batch
    /// while this one commits, and the writer commits them in the order they were queued, so
    /// a batch may build on the one before it (see `LandingTip`).
    ///
    /// `live`: they came as a push, not a catch-up batch. A small push is applied to its
    /// documents in memory before the commit, as for a local write: one commit (one fsync)
    /// instead of two, so it reaches subscribers sooner; documents nobody has loaded in a
    /// catch-up batch are stored without loading (see `commit_remote`). The write is queued
    /// while the documents are locked, so each document's heads are recorded in the order its
    /// changes were applied. Run it to its end (in a task of its own): the engine takes the
    /// deltas before the documents load, and a future dropped between the two would leave
    /// them in the engine's clock but not on disk. `parsed`: changes parsed on arrival, by
    /// position (checked against the deltas: see [`Input::RemoteParsed`]); may be empty.
    pub(crate) async fn queue_remote(
        &self,
        from: NodeId,
        deltas: Vec<Delta>,
        parsed: Vec<Option<Box<automerge::Change>>>,
        live: bool,
    ) -> Received {
        let mut fresh = Vec::new();
        let mut changes = Vec::new();
        let mut rejected = None;
        let input = Input::RemoteParsed {
            from,
            deltas,
            parsed,
        };
        for action in self.engine().handle(input) {
            match action {
                Action::Persist {
                    deltas, changes: c, ..
                } => (fresh, changes) = (deltas, c),
                Action::Reject { error, .. } => {
                    rejected.get_or_insert(error);
                }
            }
        }
        let pending = if fresh.is_empty() {
            None
        } else {
            Some(self.commit_remote(from, fresh, changes, live).await)
        };
        Received { pending, rejected }
    }

    /// Applies validated remote deltas (with their changes as validation parsed them) to their
    /// documents and queues their commit.
    async fn commit_remote(
        &self,
        from: NodeId,
        deltas: Vec<Delta>,
        parsed: Vec<Option<Box<automerge::Change>>>,
        live: bool,
    ) -> Pending {
        let mut by_doc = ByDoc::new();
        for (d, change) in deltas.iter().zip(parsed) {
            let e = by_doc
                .entry(d.doc)
                .or_insert_with(|| (Vec::new(), false, from));
            e.2 = d.id.origin;
            match (&d.body, change) {
                (DeltaBody::Change(_), Some(c)) => e.0.push(c),
                (DeltaBody::Change(_), None) => {}
                (DeltaBody::Tombstone, _) => e.1 = true,
            }
        }
        let sender = self.event_sender();
        // A live push touches a document or two, and its events should carry patches. A
        // catch-up batch touches many documents mostly new here, or one long history in
        // slices; loading and diffing them costs more than storing them (it doubled a bulk
        // sync's time, and made one long document's quadratic), so what nobody has loaded is
        // stored without loading it.
        let live = live && by_doc.len() <= LIVE_DOCS;
        let mut heads = Vec::new();
        let mut events = Vec::new();
        // A catch-up batch does not load what nobody has loaded: those documents' changes are
        // stored, their heads derived from the stored heads and the changes, and they load
        // when someone reads them (after these land: see `DocEntry::try_land`).
        let mut landing = Vec::new();
        let mut tips = Vec::new();
        // Events of documents applied in memory that wait for this commit, with their entries.
        let mut waiting = Vec::new();
        if !live {
            for (doc, guard, new_heads) in self.land_unloaded(&by_doc).await {
                let Some((_, tombstone, origin)) = by_doc.remove(&doc) else {
                    continue;
                };
                if sender.is_some() {
                    events.push(Event {
                        doc,
                        source: Source::Remote(origin),
                        patches: Vec::new(),
                        patched: false,
                        heads: new_heads.clone(),
                        deleted: tombstone,
                        damaged: None,
                    });
                }
                tips.push((guard.tip(), new_heads.clone()));
                heads.push((doc, new_heads));
                landing.push(guard);
            }
        }
        // Load (or start) every other touched document; lock them only once all are here.
        let mut entries = Vec::with_capacity(by_doc.len());
        for doc in by_doc.keys() {
            let was_loaded = self.cache().is_loaded(*doc);
            tracing::trace!(%doc, was_loaded, live, "received changes apply in memory");
            match self.entry_or_new(*doc).await {
                Ok(e) => entries.push(Some((e, was_loaded))),
                Err(e) => {
                    // The deltas are still committed (durability first); the document is
                    // rebuilt from the store on its next load. A damaged one is expected
                    // here: these may be the good copies that heal it.
                    if matches!(e, Error::Doc(DocError::Damaged { .. })) {
                        tracing::debug!(%doc, "received changes for a damaged document; stored");
                    } else {
                        tracing::warn!(%doc, error = %e, "cannot load a document to apply received changes");
                    }
                    entries.push(None);
                }
            }
        }
        // In DocId order, as every batch does: two batches never wait on each other's locks.
        let mut guards = Vec::with_capacity(entries.len());
        for ((doc, (changes, tombstone, origin)), entry) in by_doc.into_iter().zip(&entries) {
            let Some((entry, was_loaded)) = entry else {
                continue;
            };
            let Some(mut st) = entry.lock() else {
                continue;
            };
            // Patches for whoever listens, logged while applying (a diff of the heads before and
            // after would walk the whole document for every batch).
            let want_patches = sender.is_some() && (*was_loaded || live);
            let mut log = Self::patch_log(want_patches);
            match tandem_crdt::delta::contain(|| {
                st.am
                    .apply_changes_log_patches(changes.into_iter().map(|c| *c), &mut log)
            }) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(%doc, error = %e, "received changes do not apply; stored anyway");
                    // Reloaded from the store on the next read, not served half-applied.
                    self.cache().discard(Some(doc));
                    continue;
                }
                Err(panic) => {
                    tracing::error!(%doc, %panic, "automerge panicked applying received changes; stored anyway");
                    self.cache().discard(Some(doc));
                    continue;
                }
            }
            st.deleted |= tombstone;
            let after = st.am.get_heads();
            if let Some(tx) = &sender {
                let patches = if want_patches {
                    st.am.make_patches(&mut log)
                } else {
                    Vec::new()
                };
                let event = Event {
                    doc,
                    source: Source::Remote(origin),
                    patches,
                    patched: want_patches || st.deleted,
                    heads: after.clone(),
                    deleted: st.deleted,
                    damaged: None,
                };
                // Announced as soon as it is applied, unless an event of this document waits
                // for a commit (see `DocEntry::event_now`). These changes are durable at their
                // origin, and readers here see them already; waiting for this node's commit
                // (an fsync) only delayed the news.
                if entry.event_now() {
                    let _ = tx.send(Arc::new(event));
                } else {
                    entry.event_waits();
                    waiting.push((entry.clone(), event));
                }
            }
            heads.push((doc, after));
            guards.push(st);
        }
        let feed = self.inner.commits.clone();
        let keep: Vec<Arc<DocEntry>> = entries.iter().flatten().map(|(e, _)| e.clone()).collect();
        let after_commit: AfterCommit = Box::new(move |deltas| {
            feed_commit(&feed, deltas, Source::Remote(from));
            if let Some(tx) = sender {
                for e in events {
                    let _ = tx.send(Arc::new(e));
                }
                for (entry, e) in waiting {
                    let _ = tx.send(Arc::new(e));
                    entry.event_sent();
                }
            }
            // The entries stay cached until the commit: a reload cannot miss these changes.
            drop(keep);
            // Loads of the documents stored without loading may go on now.
            for mut guard in landing {
                guard.committed();
            }
        });
        let rx = self.inner.store.submit(Write::Deltas {
            deltas: Arc::new(deltas),
            heads,
            snapshot: None,
            after_commit: Some(after_commit),
        });
        // Queued: the next batch of these documents may land on the heads this one leaves.
        for (tip, heads) in tips {
            tip.queued(heads);
        }
        drop(guards);
        Pending { rx }
    }

    /// The documents of a catch-up batch that can be stored without loading them: not loaded
    /// nor loading, and either new here or last landed by a batch of this process (whose
    /// heads are complete), with every dependency of their changes another change of the
    /// batch or one of those heads. Returns each with its landing guard and heads; the others
    /// are applied in memory as usual.
    async fn land_unloaded(&self, by_doc: &ByDoc) -> Vec<(DocId, LandingGuard, Vec<ChangeHash>)> {
        let candidates: Vec<(DocId, LandingGuard)> = by_doc
            .keys()
            .filter_map(|doc| Some((*doc, self.cache().get_or_insert(*doc).try_land()?)))
            .collect();
        if candidates.is_empty() {
            return Vec::new();
        }
        // A document a landing of this process left heads for is stored: only the others are
        // looked up (a long history arriving in slices asks nothing).
        let ids: Vec<DocId> = candidates
            .iter()
            .filter(|(_, g)| g.before.is_none())
            .map(|(d, _)| *d)
            .collect();
        let stored = if ids.is_empty() {
            Vec::new()
        } else {
            match self
                .inner
                .store
                .read(move |c| store::stored_docs(c, &ids))
                .await
            {
                Ok(stored) => stored,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read which documents are stored; applying in memory");
                    return Vec::new();
                }
            }
        };
        // The answers, in the order of the candidates without heads.
        let mut stored = stored.into_iter();
        let mut out = Vec::with_capacity(candidates.len());
        for (doc, guard) in candidates {
            // A stored document's heads as the store has them may not cover changes that wait
            // for a dependency (Automerge holds them back), so heads derived from them could be
            // wrong: only the heads a landing left are known complete. Other stored documents
            // load and apply in memory.
            let base = match &guard.before {
                Some(heads) => heads.as_slice(),
                None if stored.next() == Some(false) => &[][..],
                None => continue,
            };
            let Some((changes, _, _)) = by_doc.get(&doc) else {
                continue;
            };
            if let Some(heads) = derive_heads(base, changes) {
                out.push((doc, guard, heads));
            }
        }
        out
    }

    /// For tests: whether `doc` is loaded in memory (received changes should not load it).
    #[doc(hidden)]
    pub fn is_loaded_for_tests(&self, doc: DocId) -> bool {
        self.cache().is_loaded(doc)
    }

    /// Deltas this node holds that a node with clock `clock` lacks, in `(origin, seq)` order:
    /// what to carry to it by other means (a file, a USB stick), to be fed to [`Node::ingest`].
    pub async fn deltas_missing_from(&self, clock: &VersionVector) -> Result<Vec<Delta>, Error> {
        let node = self.clone();
        let mut plan = self.engine().catch_up(clock);
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            loop {
                match plan.next_batch(&node.inner.store, 1 << 20) {
                    Ok(Some(batch)) => out.extend(batch),
                    Ok(None) => return Ok::<_, Error>(out),
                    Err(e) => {
                        node.noticed(&e);
                        return Err(e.into());
                    }
                }
            }
        })
        .await
        .map_err(|_| Error::Closed)?
    }

    /// Stores deltas that came from elsewhere (from `from`): what a sync session does with a
    /// received batch, without a network. Invalid deltas are refused with an error; the valid
    /// ones are kept.
    pub async fn ingest(&self, from: NodeId, deltas: Vec<Delta>) -> Result<(), Error> {
        // In a task of its own: a caller that gives up (a timeout) must not stop it half-way.
        let node = self.clone();
        tokio::spawn(async move { node.apply_remote(from, deltas, Vec::new(), false).await })
            .await
            .map_err(|_| Error::Closed)?
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::node::Config;

    /// Holds the writer thread busy for a while (a slow statement queued ahead of everything
    /// after it), so what is queued next waits for its commit.
    fn stall_writer(node: &Node) -> oneshot::Receiver<Result<(), StoreError>> {
        node.inner.store.submit(Write::Exec {
            sql: "INSERT OR REPLACE INTO meta (key, value)
                  SELECT 'stall', max(x) FROM (WITH RECURSIVE c(x) AS
                      (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) SELECT x FROM c)",
            params: Vec::new(),
        })
    }

    /// Heads derived from changes alone are the ones Automerge reports once it applies them;
    /// a dependency outside the batch and the base heads means "load to know".
    #[test]
    fn derived_heads_agree_with_automerge() {
        use automerge::transaction::Transactable;
        let mut a = automerge::Automerge::new();
        let mut changes = Vec::new();
        let commit = |am: &mut automerge::Automerge, key: &str| {
            let mut tx = am.transaction();
            tx.put(automerge::ROOT, key, 1).unwrap();
            tx.commit();
            Box::new(am.get_last_local_change().unwrap().clone())
        };
        changes.push(commit(&mut a, "x"));
        let mut b = a.fork();
        changes.push(commit(&mut a, "a"));
        changes.push(commit(&mut b, "b"));
        a.merge(&mut b).unwrap();
        // Two branches: both are heads.
        assert_eq!(derive_heads(&[], &changes), Some(a.get_heads()));
        // A batch on top of known heads.
        let base = a.get_heads();
        let next = commit(&mut a, "c");
        assert_eq!(
            derive_heads(&base, std::slice::from_ref(&next)),
            Some(a.get_heads())
        );
        // Its dependencies neither in the batch nor the base: unknown.
        assert_eq!(derive_heads(&[], &[next]), None);
    }

    /// A received change is announced as soon as it is applied, before this node's commit of
    /// it; but never ahead of a local write's event still waiting for its commit: a document's
    /// events come in the order its changes were applied.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn received_changes_are_announced_at_once_but_in_order() {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let a = Node::open(Config::new(dirs[0].path())).await.unwrap();
        let b = Node::open(Config::new(dirs[1].path())).await.unwrap();
        let doc = a.create(Some(json!({"n": 0}))).await.unwrap();
        let from_a = a.deltas_missing_from(&b.clock()).await.unwrap();
        b.ingest(a.id(), from_a).await.unwrap();
        let mut events = a.subscribe(Some(doc)).unwrap();

        // Nothing of the document waits: the event comes while the commit is still held up.
        let before = a.clock();
        b.put(doc, "/b", json!(1)).await.unwrap();
        let r = b.deltas_missing_from(&before).await.unwrap();
        let mut stall = stall_writer(&a);
        let node = a.clone();
        let from = b.id();
        let ingest = tokio::spawn(async move { node.ingest(from, r).await });
        let ev = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ev.source, Source::Remote(b.id()));
        // The statement queued ahead of this commit is still running.
        assert!(
            matches!(stall.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
            "announced only after the commit"
        );
        ingest.await.unwrap().unwrap();
        stall.await.unwrap().unwrap();

        // A local write waits for its commit: a change received meanwhile is announced after it.
        let stall = stall_writer(&a);
        let node = a.clone();
        let local = tokio::spawn(async move { node.put(doc, "/a", json!(1)).await });
        // The local change is applied (and its commit queued) before the remote one arrives.
        while a.get(doc, "/a").await.is_err() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let before = a.clock();
        b.put(doc, "/b", json!(3)).await.unwrap();
        let r = b.deltas_missing_from(&before).await.unwrap();
        a.ingest(b.id(), r).await.unwrap();
        local.await.unwrap().unwrap();
        stall.await.unwrap().unwrap();
        let first = events.recv().await.unwrap();
        let second = events.recv().await.unwrap();
        assert_eq!(first.source, Source::Local);
        assert_eq!(second.source, Source::Remote(b.id()));
        assert_eq!(second.heads, a.heads(doc).await.unwrap());
    }
}
