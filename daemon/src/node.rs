//! [`Node`]: the embeddable API. It owns a data dir (identity, SQLite store, lock), the sync
//! engine and the document cache, and turns each document call into Automerge edits, deltas and
//! commits. Every method is async, `Send`, and safe to call from many tasks at once.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use automerge::transaction::Transaction;
use automerge::{Automerge, ChangeHash, Patch};
use serde_json::Value as Json;
use tandem_crdt::{
    Action, DeltaBody, DocId, Engine, Input, NodeId, Pointer, Source, VersionVector, actor_id,
    pointer,
};
use tokio::sync::{broadcast, oneshot};

use crate::cache::{DocCache, DocEntry, DocState};
use crate::store::{self, DocInfo, Durability, Store, StoreError, StoreOptions, StoreStats, Write};
use crate::{Error, Identity};

/// How a node is opened.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the identity, the database and the lock live. Created if missing.
    pub data_dir: PathBuf,
    /// `Full` (the default) fsyncs every commit before acknowledging it.
    pub durability: Durability,
    /// Most documents kept loaded in memory.
    pub cache_docs: usize,
    /// A document is compacted into a snapshot once it has this many deltas outside one.
    pub compact_after: u32,
    /// Events buffered per subscriber before it is told it fell behind.
    pub event_buffer: usize,
}

impl Config {
    /// Defaults for `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            durability: Durability::Full,
            cache_docs: 1024,
            compact_after: 64,
            event_buffer: 4096,
        }
    }

    /// The default data dir: `$XDG_DATA_HOME/tandem` (e.g. `~/.local/share/tandem`).
    pub fn default_data_dir() -> PathBuf {
        dirs::data_dir()
            .unwrap_or_else(|| PathBuf::from("."))
            .join("tandem")
    }
}

/// One change to one document, as subscribers see it.
#[derive(Debug, Clone)]
pub struct Event {
    pub doc: DocId,
    /// Made here, or received from a peer.
    pub source: Source,
    /// The document's heads after the change.
    pub heads: Vec<ChangeHash>,
    /// What changed, as Automerge patches (empty for a deletion).
    pub patches: Vec<Patch>,
    /// The document was deleted.
    pub deleted: bool,
}

/// Why a subscription yielded no event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionError {
    /// The subscriber fell behind and `0` events were dropped; re-read the documents.
    #[error("subscriber fell behind; {0} events were skipped")]
    Lagged(u64),
    /// The node closed.
    #[error("the node is closed")]
    Closed,
}

/// A stream of change events, for one document or all.
pub struct Subscription {
    rx: broadcast::Receiver<Arc<Event>>,
    doc: Option<DocId>,
}

impl Subscription {
    /// The same events as a [`futures_core::Stream`], for `StreamExt` combinators.
    pub fn into_stream(
        self,
    ) -> impl futures_core::Stream<Item = Result<Arc<Event>, SubscriptionError>> + Send + Unpin
    {
        use tokio_stream::StreamExt as _;
        use tokio_stream::wrappers::BroadcastStream;
        use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
        let doc = self.doc;
        BroadcastStream::new(self.rx).filter_map(move |item| match item {
            Ok(e) if doc.is_none_or(|d| d == e.doc) => Some(Ok(e)),
            Ok(_) => None,
            Err(BroadcastStreamRecvError::Lagged(n)) => Some(Err(SubscriptionError::Lagged(n))),
        })
    }

    /// The next event, in commit order. Never skips silently: a subscriber that fell behind gets
    /// [`SubscriptionError::Lagged`] with the number of events it missed.
    pub async fn recv(&mut self) -> Result<Arc<Event>, SubscriptionError> {
        loop {
            match self.rx.recv().await {
                Ok(e) if self.doc.is_none_or(|d| d == e.doc) => return Ok(e),
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    return Err(SubscriptionError::Lagged(n));
                }
                Err(broadcast::error::RecvError::Closed) => return Err(SubscriptionError::Closed),
            }
        }
    }
}

struct Inner {
    // Field order is drop order: the store (and its threads) go before the lock is released.
    store: Store,
    id: NodeId,
    incarnation: u64,
    actor: automerge::ActorId,
    data_dir: PathBuf,
    engine: Mutex<Engine>,
    cache: Mutex<DocCache>,
    events: Mutex<Option<broadcast::Sender<Arc<Event>>>>,
    _lock: fs::File,
}

/// A tandem node: documents on this machine, kept in sync with peers.
///
/// Cheap to clone; clones share one node.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.inner.id)
            .field("data_dir", &self.inner.data_dir)
            .finish_non_exhaustive()
    }
}

const LOCK_FILE: &str = "LOCK";
const DB_FILE: &str = "tandem.db";

fn lock_data_dir(dir: &Path) -> Result<fs::File, Error> {
    use std::io::{Read, Seek, Write};
    let path = dir.join(LOCK_FILE);
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(Error::Locked {
                dir: dir.to_path_buf(),
                holder: if holder.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {holder})")
                },
            });
        }
        Err(fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
    }
    f.set_len(0).map_err(|e| Error::io(&path, e))?;
    f.rewind().map_err(|e| Error::io(&path, e))?;
    write!(f, "{}", std::process::id()).map_err(|e| Error::io(&path, e))?;
    Ok(f)
}

fn create_private_dir(dir: &Path) -> Result<(), Error> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).map_err(|e| Error::io(dir, e))
}

/// What a committed local write still has to do.
struct Pending {
    rx: oneshot::Receiver<Result<(), StoreError>>,
}

impl Pending {
    async fn wait(self) -> Result<(), Error> {
        self.rx
            .await
            .unwrap_or(Err(StoreError::Closed))
            .map_err(Error::from)
    }
}

impl Node {
    /// Opens the node in `config.data_dir`: creates the dir and identity on first start, refuses
    /// a data dir another process holds, and recovers everything committed before.
    pub async fn open(config: Config) -> Result<Node, Error> {
        tokio::task::spawn_blocking(move || Self::open_blocking(config))
            .await
            .map_err(|_| Error::Closed)?
    }

    fn open_blocking(config: Config) -> Result<Node, Error> {
        let dir = config.data_dir.clone();
        create_private_dir(&dir)?;
        let lock = lock_data_dir(&dir)?;
        let identity = Identity::load_or_create(&dir)?;
        let id = identity.id();
        let (store, recovered) = Store::open(
            &dir.join(DB_FILE),
            id,
            StoreOptions {
                durability: config.durability,
                compact_after: config.compact_after,
            },
        )?;
        let (events, _) = broadcast::channel(config.event_buffer.max(1));
        tracing::info!(node = %id, incarnation = recovered.incarnation, dir = %dir.display(), "node open");
        Ok(Node {
            inner: Arc::new(Inner {
                store,
                id,
                incarnation: recovered.incarnation,
                actor: actor_id(&id, recovered.incarnation),
                data_dir: dir,
                engine: Mutex::new(Engine::new(id, recovered.clock)),
                cache: Mutex::new(DocCache::new(config.cache_docs)),
                events: Mutex::new(Some(events)),
                _lock: lock,
            }),
        })
    }

    /// Finishes in-flight commits and stops the store's threads. Further calls fail with
    /// [`Error::Closed`] or a store error; subscriptions end.
    pub async fn close(&self) -> Result<(), Error> {
        if let Ok(mut ev) = self.inner.events.lock() {
            ev.take();
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.store.close())
            .await
            .map_err(|_| Error::Closed)
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// This run's incarnation (bumped on every open).
    pub fn incarnation(&self) -> u64 {
        self.inner.incarnation
    }

    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// The node clock: every delta this node holds.
    pub fn clock(&self) -> VersionVector {
        self.engine().clock().clone()
    }

    /// Row counts from the store, plus loaded documents.
    pub async fn stats(&self) -> Result<(StoreStats, usize), Error> {
        let s = self.inner.store.read(store::stats).await?;
        Ok((s, self.cache().len()))
    }

    /// The store's group-commit counters.
    pub fn writer_stats(&self) -> &crate::store::WriterStats {
        self.inner.store.writer_stats()
    }

    fn engine(&self) -> std::sync::MutexGuard<'_, Engine> {
        self.inner.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, DocCache> {
        self.inner.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes to changes of one document (`Some`) or all (`None`).
    pub fn subscribe(&self, doc: Option<DocId>) -> Result<Subscription, Error> {
        let ev = self.inner.events.lock().map_err(|_| Error::Closed)?;
        let tx = ev.as_ref().ok_or(Error::Closed)?;
        Ok(Subscription {
            rx: tx.subscribe(),
            doc,
        })
    }

    fn event_sender(&self) -> Option<broadcast::Sender<Arc<Event>>> {
        self.inner
            .events
            .lock()
            .ok()
            .and_then(|e| e.as_ref().filter(|tx| tx.receiver_count() > 0).cloned())
    }

    /// Loads (or finds) a document.
    async fn entry(&self, doc: DocId) -> Result<Arc<DocEntry>, Error> {
        let entry = self.cache().get_or_insert(doc);
        let store = &self.inner.store;
        let actor = self.inner.actor.clone();
        let loaded = entry
            .cell()
            .get_or_try_init(|| async move {
                let stored = store.read(move |c| store::load_doc(c, doc)).await?;
                let Some(stored) = stored else {
                    return Err(Error::DocNotFound(doc));
                };
                let corrupt = |e: automerge::AutomergeError| Error::CorruptDoc {
                    doc,
                    why: e.to_string(),
                };
                let mut am = match &stored.snapshot {
                    Some(bytes) => Automerge::load(bytes).map_err(corrupt)?,
                    None => Automerge::new(),
                };
                let changes = stored
                    .changes
                    .iter()
                    .map(|b| automerge::Change::try_from(b.as_slice()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| Error::CorruptDoc {
                        doc,
                        why: e.to_string(),
                    })?;
                am.apply_changes(changes).map_err(corrupt)?;
                am.set_actor(actor);
                tracing::trace!(%doc, "document loaded");
                Ok(Mutex::new(DocState {
                    am,
                    deleted: stored.deleted,
                }))
            })
            .await;
        match loaded {
            Ok(_) => Ok(entry),
            Err(e) => {
                drop(entry);
                self.cache().forget_if_unloaded(doc);
                Err(e)
            }
        }
    }

    /// Turns bodies into this node's next deltas and queues them in one commit. Holding the
    /// engine lock while queueing keeps seq order equal to commit order. `keep` stays alive until
    /// the commit (so the cache cannot evict and reload a document that lacks it), and the event
    /// is sent right after the commit, even if the caller has gone.
    fn commit_local(
        &self,
        doc: DocId,
        bodies: Vec<DeltaBody>,
        heads: Vec<ChangeHash>,
        event: Option<Event>,
        keep: Arc<DocEntry>,
    ) -> Pending {
        let sender = if event.is_some() {
            self.event_sender()
        } else {
            None
        };
        let mut engine = self.engine();
        let mut deltas = Vec::with_capacity(bodies.len());
        for body in bodies {
            for action in engine.handle(Input::LocalChange { doc, body }) {
                if let Action::Persist { deltas: d, .. } = action {
                    deltas.extend(d);
                }
            }
        }
        let after_commit: Box<dyn FnOnce() + Send> = Box::new(move || {
            if let (Some(tx), Some(ev)) = (sender, event) {
                let _ = tx.send(Arc::new(ev));
            }
            drop(keep);
        });
        let rx = self.inner.store.submit(Write::Deltas {
            deltas,
            heads: vec![(doc, heads)],
            after_commit: Some(after_commit),
        });
        Pending { rx }
    }

    /// The event for a local change from `before` to the document's current heads, if anyone
    /// listens (patches cost a diff, so they are computed only then).
    fn local_event(
        &self,
        doc: DocId,
        am: &Automerge,
        before: &[ChangeHash],
        deleted: bool,
    ) -> Option<Event> {
        self.event_sender().map(|_| {
            let heads = am.get_heads();
            Event {
                doc,
                source: Source::Local,
                patches: if deleted {
                    Vec::new()
                } else {
                    am.diff(before, &heads)
                },
                heads,
                deleted,
            }
        })
    }

    /// Caches a new document and commits the deltas that make it.
    async fn commit_new(
        &self,
        doc: DocId,
        am: Automerge,
        bodies: Vec<DeltaBody>,
    ) -> Result<(), Error> {
        let heads = am.get_heads();
        let event = self.local_event(doc, &am, &[], false);
        let entry = self
            .cache()
            .insert_loaded(doc, DocState { am, deleted: false });
        self.commit_local(doc, bodies, heads, event, entry)
            .wait()
            .await
    }

    /// Changes a document through a closure on an Automerge transaction, and returns after the
    /// change is durable. If the closure fails, nothing is written. A closure that changes
    /// nothing writes nothing.
    pub async fn change<T, F>(&self, doc: DocId, f: F) -> Result<T, Error>
    where
        F: FnOnce(&mut Transaction<'_>) -> Result<T, Error>,
    {
        let entry = self.entry(doc).await?;
        let (out, pending) = {
            let mut st = entry.lock().ok_or(Error::DocNotFound(doc))?;
            if st.deleted {
                return Err(Error::DocDeleted(doc));
            }
            let before = st.am.get_heads();
            let out = st.am.transact(f).map_err(|fail| fail.error)?.result;
            let after = st.am.get_heads();
            if after == before {
                return Ok(out);
            }
            let change = st
                .am
                .get_last_local_change()
                .ok_or_else(|| Error::CorruptDoc {
                    doc,
                    why: "commit made no local change".into(),
                })?;
            let event = self.local_event(doc, &st.am, &before, false);
            let body = DeltaBody::Change(change.raw_bytes().to_vec());
            (
                out,
                self.commit_local(doc, vec![body], after, event, entry.clone()),
            )
        };
        pending.wait().await?;
        Ok(out)
    }

    /// Creates a document, empty or from a JSON object, and returns its id once durable.
    pub async fn create(&self, initial: Option<Json>) -> Result<DocId, Error> {
        if let Some(v) = &initial
            && !v.is_object()
        {
            return Err(Error::NotAnObject(tandem_crdt::json::json_type(v)));
        }
        let doc = DocId::from_bytes(rand::random());
        let mut am = Automerge::new().with_actor(self.inner.actor.clone());
        match &initial {
            Some(value) => {
                am.transact(|tx| pointer::put(tx, &Pointer::root(), value))
                    .map_err(|f| f.error)?;
            }
            None => {
                am.empty_commit(Default::default());
            }
        }
        let change = am
            .get_last_local_change()
            .ok_or_else(|| Error::CorruptDoc {
                doc,
                why: "no initial change".into(),
            })?;
        let body = DeltaBody::Change(change.raw_bytes().to_vec());
        self.commit_new(doc, am, vec![body]).await?;
        Ok(doc)
    }

    /// Lists the documents this node holds (not deleted), most recently updated first.
    pub async fn list(&self) -> Result<Vec<DocInfo>, Error> {
        Ok(self
            .inner
            .store
            .read(|c| store::list_docs(c, false))
            .await?)
    }

    /// Deletes a document: a tombstone that replicates. Deleting twice is not an error.
    pub async fn delete(&self, doc: DocId) -> Result<(), Error> {
        let entry = self.entry(doc).await?;
        let pending = {
            let mut st = entry.lock().ok_or(Error::DocNotFound(doc))?;
            if st.deleted {
                return Ok(());
            }
            st.deleted = true;
            let heads = st.am.get_heads();
            let event = self.local_event(doc, &st.am, &heads, true);
            self.commit_local(doc, vec![DeltaBody::Tombstone], heads, event, entry.clone())
        };
        pending.wait().await
    }

    /// Reads the document, or the value at a JSON Pointer `path` in it (`""` is the whole
    /// document), as JSON.
    pub async fn get(&self, doc: DocId, path: &str) -> Result<Json, Error> {
        let ptr = Pointer::parse(path)?;
        self.read(doc, |am| Ok(pointer::get(am, &ptr)?)).await
    }

    /// Runs `f` on the current state of a document.
    pub async fn read<T>(
        &self,
        doc: DocId,
        f: impl FnOnce(&Automerge) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let entry = self.entry(doc).await?;
        let st = entry.lock().ok_or(Error::DocNotFound(doc))?;
        if st.deleted {
            return Err(Error::DocDeleted(doc));
        }
        f(&st.am)
    }

    /// The document's current heads.
    pub async fn heads(&self, doc: DocId) -> Result<Vec<ChangeHash>, Error> {
        self.read(doc, |am| Ok(am.get_heads())).await
    }

    /// Sets the value at `path`: creates or replaces a key, replaces an array element, or
    /// appends with `-`. Strings become collaborative text.
    pub async fn put(&self, doc: DocId, path: &str, value: Json) -> Result<(), Error> {
        let ptr = Pointer::parse(path)?;
        self.change(doc, |tx| Ok(pointer::put(tx, &ptr, &value)?))
            .await
    }

    /// Deletes the key or array element at `path`.
    pub async fn delete_at(&self, doc: DocId, path: &str) -> Result<(), Error> {
        let ptr = Pointer::parse(path)?;
        self.change(doc, |tx| Ok(pointer::delete(tx, &ptr)?)).await
    }

    /// Inserts into an array before the index at the end of `path` (`-` appends).
    pub async fn insert(&self, doc: DocId, path: &str, value: Json) -> Result<(), Error> {
        let ptr = Pointer::parse(path)?;
        self.change(doc, |tx| Ok(pointer::insert(tx, &ptr, &value)?))
            .await
    }

    /// Splices the text at `path`: removes `delete` characters at `pos` and inserts `text`.
    /// Positions count Unicode code points.
    pub async fn splice_text(
        &self,
        doc: DocId,
        path: &str,
        pos: usize,
        delete: usize,
        text: &str,
    ) -> Result<(), Error> {
        let ptr = Pointer::parse(path)?;
        self.change(doc, |tx| {
            Ok(pointer::splice_text(tx, &ptr, pos, delete, text)?)
        })
        .await
    }

    /// Replaces the text at `path` with `text` as a minimal diff, so concurrent edits to other
    /// parts of the text survive.
    pub async fn update_text(&self, doc: DocId, path: &str, text: &str) -> Result<(), Error> {
        let ptr = Pointer::parse(path)?;
        self.change(doc, |tx| Ok(pointer::update_text(tx, &ptr, text)?))
            .await
    }

    /// The whole document as standard `.automerge` bytes (what automerge-js `load` reads).
    pub async fn export(&self, doc: DocId) -> Result<Vec<u8>, Error> {
        self.read(doc, |am| Ok(am.save())).await
    }

    /// Imports `.automerge` bytes as a new document and returns its id. Corrupt or truncated
    /// bytes are refused and nothing is written.
    pub async fn import(&self, bytes: &[u8]) -> Result<DocId, Error> {
        let mut am = Automerge::load(bytes).map_err(|e| Error::CorruptImport(e.to_string()))?;
        let changes = am.get_changes(&[]);
        if changes.is_empty() {
            return Err(Error::CorruptImport("the file holds no changes".into()));
        }
        if !automerge::ReadDoc::get_missing_deps(&am, &[]).is_empty() {
            return Err(Error::CorruptImport(
                "the file lacks changes that others depend on".into(),
            ));
        }
        let bodies: Vec<DeltaBody> = changes
            .iter()
            .map(|c| DeltaBody::Change(c.raw_bytes().to_vec()))
            .collect();
        am.set_actor(self.inner.actor.clone());
        let doc = DocId::from_bytes(rand::random());
        self.commit_new(doc, am, bodies).await?;
        Ok(doc)
    }
}
