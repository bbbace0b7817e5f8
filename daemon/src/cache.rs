//! The document cache: loaded Automerge documents, bounded by an LRU so a node with 100k
//! documents holds only the recently used ones. An entry someone is still using (a write
//! waiting for its commit, a reader) is never evicted, so a reload can never miss a change
//! that is applied in memory but not yet committed. Received changes for a document nobody
//! has loaded are stored without loading it; while they are on their way to disk the entry
//! says so ([`DocEntry::try_land`]) and a load waits for them ([`DocEntry::before_load`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use automerge::{Automerge, ChangeHash};
use tandem_crdt::DocId;
use tokio::sync::{Notify, OnceCell};

/// A loaded document.
pub(crate) struct DocState {
    pub am: Automerge,
    pub deleted: bool,
}

/// One cache slot; loaded at most once, by whoever gets there first.
#[derive(Default)]
pub(crate) struct DocEntry {
    state: OnceCell<Mutex<DocState>>,
    /// Dropped from the cache because its in-memory state may differ from the store (a failed
    /// commit, damage found): a write still holding it must not commit what it built on it.
    stale: AtomicBool,
    /// Events of this document that wait for their commit (a local write's always does). While
    /// one does, a received change's event waits for its own commit too, so that subscribers
    /// get a document's events in the order its changes were applied (see
    /// [`DocEntry::event_now`]).
    events_at_commit: AtomicUsize,
    landing: Mutex<Landing>,
    landed: Notify,
}

/// Whether received changes are on their way to disk without the document being loaded, and
/// whether a load has begun (after which changes are applied in memory).
#[derive(Default)]
struct Landing {
    /// Batches of received changes queued for their commit without loading the document.
    landing: usize,
    loading: bool,
    /// The document's heads once the last queued batch lands: complete (no stored change waits
    /// for a dependency), so the next batch can derive its heads from them without loading the
    /// document, even before that batch is committed (the writer commits in order). Unknown
    /// while a batch works them out, after a failure, and after a restart.
    heads: Option<Vec<ChangeHash>>,
    /// Counts failed landings: a batch that derived its heads from an earlier batch's must not
    /// pass them on if that batch failed meanwhile.
    failures: u64,
}

/// Held while received changes for an unloaded document are on their way to disk; dropping
/// it (after the commit, or when the commit failed) lets waiting loads go on.
pub(crate) struct LandingGuard {
    entry: Arc<DocEntry>,
    /// The heads the batch before left (see [`Landing::heads`]).
    pub before: Option<Vec<ChangeHash>>,
    /// [`Landing::failures`] when this landing began.
    failures: u64,
    committed: bool,
}

impl LandingGuard {
    /// A handle to say, once this batch is queued for its commit, which heads it leaves.
    pub fn tip(&self) -> LandingTip {
        LandingTip {
            entry: self.entry.clone(),
            failures: self.failures,
        }
    }

    /// This batch is committed.
    pub fn committed(&mut self) {
        self.committed = true;
    }
}

/// See [`LandingGuard::tip`].
pub(crate) struct LandingTip {
    entry: Arc<DocEntry>,
    failures: u64,
}

impl LandingTip {
    /// The batch is queued for its commit and will leave the document at `heads`: the next
    /// batch may build on them at once (the writer commits in order). Call only once the write
    /// is queued, so no later batch can be queued before it.
    pub fn queued(self, heads: Vec<ChangeHash>) {
        let mut l = self.entry.landing.lock().unwrap_or_else(|p| p.into_inner());
        if l.failures == self.failures {
            l.heads = Some(heads);
        }
    }
}

impl Drop for LandingGuard {
    fn drop(&mut self) {
        let mut l = self.entry.landing.lock().unwrap_or_else(|p| p.into_inner());
        l.landing -= 1;
        if !self.committed {
            // Later batches built on heads that are not on disk: nobody builds on them again.
            l.failures += 1;
            l.heads = None;
        }
        let idle = l.landing == 0;
        drop(l);
        if idle {
            self.entry.landed.notify_waiters();
        }
    }
}

impl DocEntry {
    pub fn loaded(state: DocState) -> Self {
        Self {
            state: OnceCell::from(Mutex::new(state)),
            ..Self::default()
        }
    }

    /// Registers received changes on their way to disk, unless the document is loaded or
    /// being loaded, or another batch is landing whose heads are not known yet: then the
    /// caller applies them in memory, which loads the document after those landed. A batch
    /// may land while earlier ones wait for their commit, on the heads they leave
    /// ([`LandingTip::queued`]). While any guard lives, a load of the document waits, so it
    /// cannot read the store without them and keep that.
    pub fn try_land(self: &Arc<Self>) -> Option<LandingGuard> {
        let mut l = self.landing.lock().unwrap_or_else(|p| p.into_inner());
        if l.loading || (l.landing > 0 && l.heads.is_none()) || self.state.initialized() {
            return None;
        }
        l.landing += 1;
        Some(LandingGuard {
            entry: self.clone(),
            before: l.heads.take(),
            failures: l.failures,
            committed: false,
        })
    }

    /// Called by the loader before it reads the store: waits until no received change is on
    /// its way to disk, and from then on changes are applied in memory (see `try_land`).
    pub async fn before_load(&self) {
        loop {
            let landed = self.landed.notified();
            tokio::pin!(landed);
            // Registered before the check: a guard dropped in between still wakes us.
            landed.as_mut().enable();
            {
                let mut l = self.landing.lock().unwrap_or_else(|p| p.into_inner());
                if l.landing == 0 {
                    l.loading = true;
                    return;
                }
            }
            landed.await;
        }
    }

    /// Whether a change just applied (the caller holds the document's lock) may be announced
    /// at once: no event of this document waits for a commit. Otherwise the caller announces
    /// it after its commit and counts it with [`DocEntry::event_waits`] meanwhile.
    pub fn event_now(&self) -> bool {
        self.events_at_commit.load(Ordering::Acquire) == 0
    }

    /// An event of this document will be sent after a commit (call with the lock held, before
    /// the write is queued); [`DocEntry::event_sent`] once it has been.
    pub fn event_waits(&self) {
        self.events_at_commit.fetch_add(1, Ordering::AcqRel);
    }

    pub fn event_sent(&self) {
        self.events_at_commit.fetch_sub(1, Ordering::AcqRel);
    }

    /// Whether the entry was discarded (see [`DocCache::discard`]).
    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Acquire)
    }

    pub fn cell(&self) -> &OnceCell<Mutex<DocState>> {
        &self.state
    }

    /// Locks the loaded state. A poisoned lock (a panic in an app's closure) still holds a
    /// consistent document: Automerge rolls back an unfinished transaction when it is dropped.
    pub fn lock(&self) -> Option<MutexGuard<'_, DocState>> {
        self.state
            .get()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

pub(crate) struct DocCache {
    map: HashMap<DocId, (Arc<DocEntry>, u64)>,
    order: BTreeMap<u64, DocId>,
    tick: u64,
    cap: usize,
}

impl DocCache {
    pub fn new(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            cap: cap.max(1),
        }
    }

    /// The entry for `doc`, made empty if absent; marks it most recently used.
    pub fn get_or_insert(&mut self, doc: DocId) -> Arc<DocEntry> {
        self.upsert(doc, None)
    }

    /// Puts an already loaded document in the cache.
    pub fn insert_loaded(&mut self, doc: DocId, state: DocState) -> Arc<DocEntry> {
        self.upsert(doc, Some(Arc::new(DocEntry::loaded(state))))
    }

    fn upsert(&mut self, doc: DocId, fresh: Option<Arc<DocEntry>>) -> Arc<DocEntry> {
        self.tick += 1;
        let tick = self.tick;
        let entry = match self.map.get_mut(&doc) {
            Some((entry, old)) => {
                self.order.remove(old);
                *old = tick;
                if let Some(f) = fresh {
                    *entry = f;
                }
                entry.clone()
            }
            None => {
                let entry = fresh.unwrap_or_default();
                self.map.insert(doc, (entry.clone(), tick));
                entry
            }
        };
        self.order.insert(tick, doc);
        self.evict();
        entry
    }

    /// Drops least recently used entries nobody holds until the cache is within its bound.
    fn evict(&mut self) {
        if self.map.len() <= self.cap {
            return;
        }
        let mut excess = self.map.len() - self.cap;
        let victims: Vec<(u64, DocId)> = self
            .order
            .iter()
            .filter(|(_, doc)| {
                self.map
                    .get(doc)
                    .is_some_and(|(e, _)| Arc::strong_count(e) == 1)
            })
            .take(excess)
            .map(|(t, d)| (*t, *d))
            .collect();
        for (t, doc) in victims {
            self.order.remove(&t);
            self.map.remove(&doc);
            excess -= 1;
        }
        if excess > 0 {
            tracing::trace!(excess, "document cache over its bound: entries in use");
        }
    }

    /// Forgets an entry that turned out not to exist.
    pub fn forget_if_unloaded(&mut self, doc: DocId) {
        if let Some((entry, tick)) = self.map.get(&doc)
            && entry.cell().get().is_none()
        {
            let tick = *tick;
            self.order.remove(&tick);
            self.map.remove(&doc);
        }
    }

    /// Drops `doc` (or, for `None`, every document) from the cache and marks the entries stale:
    /// the next reader loads it again from the store.
    pub fn discard(&mut self, doc: Option<DocId>) {
        let victims: Vec<DocId> = match doc {
            Some(d) => vec![d],
            None => self.map.keys().copied().collect(),
        };
        for d in victims {
            if let Some((entry, tick)) = self.map.remove(&d) {
                entry.stale.store(true, Ordering::Release);
                self.order.remove(&tick);
            }
        }
    }

    /// Whether `doc` is in the cache and loaded.
    pub fn is_loaded(&self, doc: DocId) -> bool {
        self.map
            .get(&doc)
            .is_some_and(|(e, _)| e.cell().get().is_some())
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// How many documents are loaded in memory (entries may also be empty slots: a load that
    /// has not happened, changes landing without one).
    pub fn loaded(&self) -> usize {
        self.map
            .values()
            .filter(|(e, _)| e.cell().initialized())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(i: u8) -> DocId {
        DocId::from_bytes([i; 16])
    }

    fn state() -> DocState {
        DocState {
            am: Automerge::new(),
            deleted: false,
        }
    }

    #[test]
    fn evicts_least_recently_used_but_never_an_entry_in_use() {
        let mut c = DocCache::new(2);
        let held = c.insert_loaded(d(1), state());
        c.insert_loaded(d(2), state());
        c.get_or_insert(d(2));
        c.insert_loaded(d(3), state());
        // d(1) is oldest but held: d(2) goes instead.
        assert_eq!(c.len(), 2);
        assert!(c.map.contains_key(&d(1)));
        assert!(!c.map.contains_key(&d(2)));
        drop(held);
        c.insert_loaded(d(4), state());
        assert!(!c.map.contains_key(&d(1)));
        assert_eq!(c.len(), 2);
    }

    #[tokio::test]
    async fn a_load_waits_for_changes_landing_without_it() {
        let e = Arc::new(DocEntry::default());
        let first = e.try_land().expect("not loaded: may land");
        assert!(
            e.try_land().is_none(),
            "until the first batch knows the heads it leaves, no other lands"
        );
        let loader = {
            let e = e.clone();
            tokio::spawn(async move { e.before_load().await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        assert!(!loader.is_finished(), "the load waits while changes land");
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(5), loader)
            .await
            .expect("the load goes on once they landed")
            .unwrap();
        // From now on changes are applied in memory: none lands past the load.
        assert!(e.try_land().is_none());
        let loaded = Arc::new(DocEntry::loaded(state()));
        assert!(loaded.try_land().is_none());
    }

    fn h(i: u8) -> Vec<ChangeHash> {
        vec![ChangeHash([i; 32])]
    }

    #[tokio::test]
    async fn batches_land_on_the_heads_queued_before_them_until_one_fails() {
        let e = Arc::new(DocEntry::default());
        let mut first = e.try_land().expect("not loaded: may land");
        assert_eq!(first.before, None, "nothing landed in this process yet");
        first.tip().queued(h(1));
        // The first waits for its commit; the second builds on the heads it will leave.
        let mut second = e.try_land().expect("lands on the first's heads");
        assert_eq!(second.before, Some(h(1)));
        assert!(
            e.try_land().is_none(),
            "a third waits until the second knows its heads"
        );
        second.tip().queued(h(2));
        let loader = {
            let e = e.clone();
            tokio::spawn(async move { e.before_load().await })
        };
        first.committed();
        drop(first);
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        assert!(
            !loader.is_finished(),
            "a load waits for every batch landing"
        );
        second.committed();
        drop(second);
        tokio::time::timeout(std::time::Duration::from_secs(5), loader)
            .await
            .expect("the load goes on once all landed")
            .unwrap();

        // A failed batch: what was built on it is not passed on.
        let e = Arc::new(DocEntry::default());
        let first = e.try_land().unwrap();
        first.tip().queued(h(1));
        let mut second = e.try_land().unwrap();
        assert_eq!(second.before, Some(h(1)));
        drop(first); // its commit failed
        second.tip().queued(h(2));
        second.committed();
        drop(second);
        let next = e.try_land().expect("nothing lands: may land");
        assert_eq!(
            next.before, None,
            "heads built on a failed batch are forgotten (the store is asked again)"
        );
    }
}
