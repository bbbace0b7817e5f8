//! [`Node`]: the embeddable API. It owns a data dir (identity, SQLite store, lock), the sync
//! engine and the document cache, and turns each document call into Automerge edits, deltas and
//! commits. Every method is async, `Send`, and safe to call from many tasks at once.

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use automerge::transaction::Transaction;
use automerge::{Automerge, ChangeHash, Patch};
use serde_json::Value as Json;
use tandem_crdt::{
    Action, CatchUp, Delta, DeltaBody, DocId, Engine, Input, NodeId, Pointer, Source,
    VersionVector, actor_id, pointer,
};
use tokio::sync::{broadcast, oneshot};

use crate::cache::{DocCache, DocEntry, DocState};
use crate::members::{Invite, Member, Membership};
use crate::net::{self, Net, NetConfig, NetError, PeerStatus};
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
    /// Networking: `None` keeps the node offline (no sockets at all).
    pub net: Option<NetConfig>,
    /// What this node calls itself to its peers (shown in their member lists). Default: the
    /// host name.
    pub name: String,
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
            net: None,
            name: host_name(),
        }
    }

    /// The default data dir: `$XDG_DATA_HOME/tandem` (e.g. `~/.local/share/tandem`).
    pub fn default_data_dir() -> PathBuf {
        dirs::data_dir()
            .unwrap_or_else(|| PathBuf::from("."))
            .join("tandem")
    }
}

/// The host name: from the kernel on Linux, else `$HOSTNAME`, else empty.
fn host_name() -> String {
    let raw = fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| fs::read_to_string("/etc/hostname"))
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default();
    crate::members::clean_name(&raw)
}

/// One change to one document, as subscribers see it.
#[derive(Debug, Clone)]
pub struct Event {
    pub doc: DocId,
    /// Made here, or received: then the NodeId of the node that made it (its origin, even when
    /// a third node relayed it; for a batch mixing origins, the origin of the last delta).
    pub source: Source,
    /// The document's heads after the change.
    pub heads: Vec<ChangeHash>,
    /// What changed, as Automerge patches (empty for a deletion).
    pub patches: Vec<Patch>,
    /// The document was deleted.
    pub deleted: bool,
}

/// One change in a document's history.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HistoryEntry {
    /// The change's hash; the document's heads are the hashes no later change depends on.
    pub hash: ChangeHash,
    /// The Automerge actor that made it, in hex.
    pub actor: String,
    /// The node that made it, when the actor is a tandem actor (NodeId + incarnation); `None`
    /// for changes imported from elsewhere.
    pub origin: Option<NodeId>,
    /// The actor's sequence number for it.
    pub seq: u64,
    /// Wall-clock time of the change on the node that made it, in Unix seconds (0 if unknown).
    pub time: i64,
    pub message: Option<String>,
    /// The changes it came after.
    pub deps: Vec<ChangeHash>,
}

/// Commit options for a local change: stamped with the wall-clock time in Unix seconds, as
/// automerge-js does.
fn commit_options() -> automerge::transaction::CommitOptions {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    automerge::transaction::CommitOptions::default().with_time(now)
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

/// Remote batches touching at most this many documents count as live pushes (see
/// `apply_remote`).
const LIVE_DOCS: usize = 4;

/// Newly committed deltas, fanned out to sync sessions.
type PushFeed = broadcast::Sender<Arc<Vec<Delta>>>;

pub(crate) struct Inner {
    // Field order is drop order: the network goes first, then the store (and its threads),
    // and the lock is released last.
    net: OnceLock<Net>,
    store: Store,
    identity: Identity,
    members: Membership,
    /// Newly committed deltas, for the sync sessions to push and relay.
    pushes: PushFeed,
    id: NodeId,
    incarnation: u64,
    name: String,
    actor: automerge::ActorId,
    data_dir: PathBuf,
    engine: Mutex<Engine>,
    cache: Mutex<DocCache>,
    events: Mutex<Option<broadcast::Sender<Arc<Event>>>>,
    /// The data-dir lock; released by `close` (or on drop).
    lock: Mutex<Option<fs::File>>,
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
        let net_cfg = config.net.clone();
        let node = tokio::task::spawn_blocking(move || Self::open_blocking(config))
            .await
            .map_err(|_| Error::Closed)??;
        if let Some(cfg) = net_cfg {
            let net = net::start(&node, &node.inner.identity, &cfg)?;
            let _ = node.inner.net.set(net);
        }
        Ok(node)
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
        let members = store.read_blocking(|c| Membership::load(id, c))?;
        let (events, _) = broadcast::channel(config.event_buffer.max(1));
        let (pushes, _) = broadcast::channel(1024);
        tracing::info!(node = %id, incarnation = recovered.incarnation, dir = %dir.display(), "node open");
        Ok(Node {
            inner: Arc::new(Inner {
                net: OnceLock::new(),
                store,
                identity,
                members,
                pushes,
                id,
                incarnation: recovered.incarnation,
                name: crate::members::clean_name(&config.name),
                actor: actor_id(&id, recovered.incarnation),
                data_dir: dir,
                engine: Mutex::new(Engine::new(id, recovered.clock)),
                cache: Mutex::new(DocCache::new(config.cache_docs)),
                events: Mutex::new(Some(events)),
                lock: Mutex::new(Some(lock)),
            }),
        })
    }

    /// Finishes in-flight commits and stops the store's threads. Further calls fail with
    /// [`Error::Closed`] or a store error; subscriptions end.
    pub async fn close(&self) -> Result<(), Error> {
        if let Some(net) = self.net() {
            net.stop();
            // Let the close frames reach the peers, so they drop their side now instead of
            // at their idle timeout; a peer that does not answer costs at most this long.
            net.wait_closed(Duration::from_secs(1)).await;
        }
        if let Ok(mut ev) = self.inner.events.lock() {
            ev.take();
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            inner.store.close();
            // Background tasks may still hold the node for a moment; the data dir is free now.
            inner.lock.lock().unwrap_or_else(|p| p.into_inner()).take();
        })
        .await
        .map_err(|_| Error::Closed)
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// What this node calls itself to its peers.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// This run's incarnation number (bumped on every open).
    pub fn incarnation(&self) -> u64 {
        self.inner.incarnation
    }

    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// The node clock: exactly the deltas this node has committed to disk.
    pub fn clock(&self) -> VersionVector {
        self.inner.store.committed_clock()
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
        let relay = self.push_feed(&deltas);
        let after_commit: Box<dyn FnOnce() + Send> = Box::new(move || {
            if let (Some(tx), Some(ev)) = (sender, event) {
                let _ = tx.send(Arc::new(ev));
            }
            if let Some((tx, deltas)) = relay {
                let _ = tx.send(deltas);
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

    /// Commits `change`, just made to `am` (whose heads were `before`), as this node's next
    /// delta, with its event.
    fn commit_change(
        &self,
        doc: DocId,
        am: &Automerge,
        before: &[ChangeHash],
        change: &automerge::Change,
        keep: Arc<DocEntry>,
    ) -> Pending {
        let event = self.local_event(doc, am, before, false);
        let body = DeltaBody::Change(change.raw_bytes().to_vec());
        self.commit_local(doc, vec![body], am.get_heads(), event, keep)
    }

    /// The push feed and a copy of `deltas` for it, if any sync session listens.
    fn push_feed(&self, deltas: &[Delta]) -> Option<(PushFeed, Arc<Vec<Delta>>)> {
        let tx = &self.inner.pushes;
        (tx.receiver_count() > 0).then(|| (tx.clone(), Arc::new(deltas.to_vec())))
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
            let out = st
                .am
                .transact_with(|_| commit_options(), f)
                .map_err(|fail| fail.error)?
                .result;
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
            (
                out,
                self.commit_change(doc, &st.am, &before, &change, entry.clone()),
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
        if let Some(value) = &initial {
            am.transact_with(
                |_| commit_options(),
                |tx| pointer::put(tx, &Pointer::root(), value),
            )
            .map_err(|f| f.error)?;
        }
        if am.get_heads().is_empty() {
            // Empty (`None` or `{}`): the document still needs a first change to exist.
            am.empty_commit(commit_options());
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

    /// Replaces the text at `path` with `text`, where `text` was edited from the text as it
    /// stood at `base` (the document's heads when the editing began). The edit is made against
    /// that old state and merged, so whatever others changed in the text since then survives
    /// alongside it: a three-way merge, as `tandem doc edit` does while an editor is open. If the
    /// text object itself was replaced or removed since `base`, nothing is written and the
    /// error is [`Error::TextReplaced`].
    pub async fn update_text_from(
        &self,
        doc: DocId,
        path: &str,
        base: &[ChangeHash],
        text: &str,
    ) -> Result<(), Error> {
        let ptr = Pointer::parse(path)?;
        let entry = self.entry(doc).await?;
        let pending = {
            let mut st = entry.lock().ok_or(Error::DocNotFound(doc))?;
            if st.deleted {
                return Err(Error::DocDeleted(doc));
            }
            let mut fork = st
                .am
                .fork_at(base)
                .map_err(|e| Error::BadBase(e.to_string()))?;
            // The edit lands on the text object the editing began with; if the path now holds
            // another object (or nothing), the edit would vanish in the merge: refuse it.
            let then = pointer::text_at(&fork, &ptr)?;
            if pointer::text_at(&st.am, &ptr).ok() != Some(then) {
                return Err(Error::TextReplaced(ptr.to_string()));
            }
            // A fresh actor: this node's own actor may have moved on since `base`, and two
            // changes with one actor and one sequence number cannot both exist.
            fork.set_actor(actor_id(&self.inner.identity.id(), rand::random()));
            fork.transact_with(
                |_| commit_options(),
                |tx| pointer::update_text(tx, &ptr, text),
            )
            .map_err(|f| f.error)?;
            let Some(change) = fork.get_last_local_change() else {
                return Ok(()); // the text is what it was at `base`
            };
            let before = st.am.get_heads();
            st.am.apply_changes([change.clone()])?;
            self.commit_change(doc, &st.am, &before, &change, entry.clone())
        };
        pending.wait().await
    }

    /// Every change in the document's history, oldest first (in causal order).
    pub async fn history(&self, doc: DocId) -> Result<Vec<HistoryEntry>, Error> {
        self.read(doc, |am| {
            Ok(am
                .get_changes_meta(&[])
                .into_iter()
                .map(|c| {
                    let bytes = c.actor.to_bytes();
                    let origin = <[u8; 32]>::try_from(bytes.get(..32).unwrap_or_default())
                        .ok()
                        .map(NodeId::from_bytes);
                    HistoryEntry {
                        hash: c.hash,
                        actor: c.actor.to_hex_string(),
                        origin,
                        seq: c.seq,
                        time: c.timestamp,
                        message: c.message.map(|m| m.into_owned()),
                        deps: c.deps,
                    }
                })
                .collect())
        })
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

/// Networking and membership.
impl Node {
    pub(crate) fn weak(&self) -> Weak<Inner> {
        Arc::downgrade(&self.inner)
    }

    pub(crate) fn upgrade(weak: &Weak<Inner>) -> Option<Node> {
        weak.upgrade().map(|inner| Node { inner })
    }

    pub(crate) fn net(&self) -> Option<&Net> {
        self.inner.net.get()
    }

    pub(crate) fn members_ref(&self) -> &Membership {
        &self.inner.members
    }

    pub(crate) fn subscribe_pushes(&self) -> broadcast::Receiver<Arc<Vec<Delta>>> {
        self.inner.pushes.subscribe()
    }

    /// A copy of the engine (its clock), for planning a catch-up without holding the lock.
    pub(crate) fn engine_snapshot(&self) -> Engine {
        self.engine().clone()
    }

    /// The next catch-up batch from the store. Blocking.
    pub(crate) fn load_batch(
        &self,
        plan: &mut CatchUp,
        max_bytes: usize,
    ) -> Result<Option<Vec<Delta>>, StoreError> {
        plan.next_batch(&self.inner.store, max_bytes)
    }

    /// Stores deltas received from `from`: validated and deduplicated by the engine, committed
    /// in one transaction, relayed to other peers, applied to loaded documents, and announced
    /// to subscribers. An invalid delta is an error after the valid ones are kept.
    pub(crate) async fn apply_remote(&self, from: NodeId, deltas: Vec<Delta>) -> Result<(), Error> {
        let mut fresh = Vec::new();
        let mut rejected = None;
        for action in self.engine().handle(Input::RemoteDeltas { from, deltas }) {
            match action {
                Action::Persist { deltas, .. } => fresh = deltas,
                Action::Reject { error, .. } => {
                    rejected.get_or_insert(error);
                }
            }
        }
        if !fresh.is_empty() {
            let relay = self.push_feed(&fresh);
            let after_commit: Box<dyn FnOnce() + Send> = Box::new(move || {
                if let Some((tx, deltas)) = relay {
                    let _ = tx.send(deltas);
                }
            });
            self.inner
                .store
                .write(Write::Deltas {
                    deltas: fresh.clone(),
                    heads: Vec::new(),
                    after_commit: Some(after_commit),
                })
                .await?;
            self.refresh_docs(from, fresh).await?;
        }
        match rejected {
            Some(e) => Err(Error::BadDelta(e.to_string())),
            None => Ok(()),
        }
    }

    /// Brings documents touched by committed remote deltas up to date in memory, records their
    /// heads, and emits the events.
    async fn refresh_docs(&self, from: NodeId, deltas: Vec<Delta>) -> Result<(), Error> {
        // Per document: its changes, whether it was deleted, and the origin of its last delta.
        let mut by_doc: BTreeMap<DocId, (Vec<automerge::Change>, bool, NodeId)> = BTreeMap::new();
        for d in deltas {
            let e = by_doc
                .entry(d.doc)
                .or_insert_with(|| (Vec::new(), false, from));
            e.2 = d.id.origin;
            match &d.body {
                DeltaBody::Change(bytes) => {
                    if let Ok(c) = automerge::Change::try_from(bytes.as_slice()) {
                        e.0.push(c);
                    }
                }
                DeltaBody::Tombstone => e.1 = true,
            }
        }
        let sender = self.event_sender();
        // A live push touches a document or two; a catch-up batch touches many, mostly new
        // here. Diffing a whole new document costs about as much as storing it (it doubled a
        // bulk sync's time), so only small batches pay for it.
        let live = by_doc.len() <= LIVE_DOCS;
        let mut heads = Vec::new();
        let mut events = Vec::new();
        for (doc, (changes, tombstone, origin)) in by_doc {
            let was_loaded = self.cache().is_loaded(doc);
            let entry = match self.entry(doc).await {
                Ok(e) => e,
                Err(Error::DocNotFound(_)) => {
                    tracing::warn!(%doc, "document of a committed delta not found");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut st = entry.lock().ok_or(Error::DocNotFound(doc))?;
            let before = st.am.get_heads();
            let received = changes.len();
            st.am.apply_changes(changes)?;
            st.deleted |= tombstone;
            let after = st.am.get_heads();
            // Every touched document gets an event: these deltas were new to this node. A
            // document loaded just now already holds them, so its patches are known only when
            // these deltas are all of it (a new document, diffed in live batches only);
            // otherwise they are empty.
            if sender.is_some() {
                let patches = if was_loaded {
                    st.am.diff(&before, &after)
                } else if live && st.am.get_changes_meta(&[]).len() == received {
                    st.am.diff(&[], &after)
                } else {
                    Vec::new()
                };
                events.push(Event {
                    doc,
                    source: Source::Remote(origin),
                    patches,
                    heads: after.clone(),
                    deleted: st.deleted,
                });
            }
            heads.push((doc, after));
        }
        let after_commit: Box<dyn FnOnce() + Send> = Box::new(move || {
            if let Some(tx) = sender {
                for e in events {
                    let _ = tx.send(Arc::new(e));
                }
            }
        });
        self.inner
            .store
            .write(Write::Deltas {
                deltas: Vec::new(),
                heads,
                after_commit: Some(after_commit),
            })
            .await?;
        Ok(())
    }

    /// Deltas this node holds that a node with clock `clock` lacks, in `(origin, seq)` order:
    /// what to carry to it by other means (a file, a USB stick), to be fed to [`Node::ingest`].
    pub async fn deltas_missing_from(&self, clock: &VersionVector) -> Result<Vec<Delta>, Error> {
        let node = self.clone();
        let mut plan = self.engine_snapshot().catch_up(clock);
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            while let Some(batch) = node.load_batch(&mut plan, 1 << 20)? {
                out.extend(batch);
            }
            Ok::<_, Error>(out)
        })
        .await
        .map_err(|_| Error::Closed)?
    }

    /// Stores deltas that came from elsewhere (from `from`): what a sync session does with a
    /// received batch, without a network. Invalid deltas are refused with an error; the valid
    /// ones are kept.
    pub async fn ingest(&self, from: NodeId, deltas: Vec<Delta>) -> Result<(), Error> {
        self.apply_remote(from, deltas).await
    }

    /// The addresses peers can dial this node at (what an invite carries); empty offline.
    pub fn addrs(&self) -> Vec<String> {
        self.net().map(Net::advertised_addrs).unwrap_or_default()
    }

    /// The QUIC address this node listens on, if networking is on.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.net().and_then(Net::local_addr)
    }

    /// Makes a one-time invite token valid for `ttl`.
    pub async fn invite(&self, ttl: Duration) -> Result<String, Error> {
        let net = self.net().ok_or(NetError::Disabled)?;
        let expires_at =
            crate::store::now_ms().saturating_add(ttl.as_millis().min(i64::MAX as u128) as i64);
        let (invite, write) = self
            .members_ref()
            .new_invite(net.advertised_addrs(), expires_at);
        self.inner.store.write(write).await?;
        Ok(invite.to_token())
    }

    /// Joins the cluster of whoever made `token`: proves the secret to the inviter, and records
    /// the inviter and its members as members here.
    pub async fn join(&self, token: &str) -> Result<(), Error> {
        let invite = Invite::parse(token).map_err(NetError::from)?;
        let members = net::join(self, &invite).await?;
        let all = std::iter::once((invite.inviter, invite.addrs.clone())).chain(members);
        for (id, addrs) in all {
            if id == self.id() {
                continue;
            }
            self.add_member(id, addrs).await?;
        }
        Ok(())
    }

    async fn add_member(&self, id: NodeId, addrs: Vec<String>) -> Result<(), Error> {
        let parsed: Vec<SocketAddr> = addrs.iter().filter_map(|a| a.parse().ok()).collect();
        if let Some(w) = self.members_ref().add(id, addrs) {
            self.inner.store.write(w).await?;
        }
        if let Some(net) = self.net() {
            net.learn(id, &parsed);
        }
        Ok(())
    }

    /// Inviter side of a join: checks the secret and records the new member. Returns our
    /// member list (with us first) for the joiner.
    pub(crate) async fn redeem_invite(
        &self,
        secret: &[u8; 32],
        by: NodeId,
        mut addrs: Vec<String>,
        observed: SocketAddr,
    ) -> Result<Vec<(NodeId, Vec<String>)>, Error> {
        let write = self
            .members_ref()
            .redeem(secret, by, crate::store::now_ms())
            .map_err(NetError::from)?;
        self.inner.store.write(write).await?;
        if !addrs.contains(&observed.to_string()) {
            addrs.push(observed.to_string());
        }
        self.add_member(by, addrs).await?;
        Ok(self
            .members()
            .into_iter()
            .filter(|m| m.id != by)
            .map(|m| (m.id, m.addrs))
            .collect())
    }

    /// mDNS saw `id` at `addrs`: remember it as nearby, and if it is a member, dial it now
    /// (this also closes its circuit breaker).
    pub(crate) fn discovered(&self, id: NodeId, addrs: Vec<SocketAddr>) {
        let Some(net) = self.net() else { return };
        net.saw_nearby(id, &addrs);
        if self.members_ref().is_member(&id) {
            tracing::debug!(peer = %id.short(), ?addrs, "member discovered on the LAN");
            net.learn(id, &addrs);
        } else {
            tracing::trace!(peer = %id.short(), "non-member seen nearby");
        }
    }

    /// Nodes seen on the LAN (members or not): id, addresses, when (unix ms).
    pub fn nearby(&self) -> Vec<(NodeId, Vec<SocketAddr>, i64)> {
        self.net().map(Net::nearby).unwrap_or_default()
    }

    /// The nodes this node syncs with.
    pub fn members(&self) -> Vec<Member> {
        self.members_ref().members()
    }

    /// Records the name a member gave in its Hello (a failed write only loses the name).
    pub(crate) async fn note_member_name(&self, id: NodeId, name: &str) {
        if let Some(write) = self.members_ref().set_name(&id, name)
            && let Err(e) = self.inner.store.write(write).await
        {
            tracing::warn!(peer = %id.short(), error = %e, "could not record a member's name");
        }
    }

    /// Removes a member: it is disconnected at once and refused from then on. Returns whether
    /// it was a member.
    pub async fn remove_member(&self, id: NodeId) -> Result<bool, Error> {
        let Some(write) = self.members_ref().remove(&id) else {
            return Ok(false);
        };
        self.inner.store.write(write).await?;
        if let Some(net) = self.net() {
            net.disconnect(&id, net::close::REMOVED, "removed from the cluster");
        }
        tracing::info!(peer = %id.short(), "member removed");
        Ok(true)
    }

    /// Every known peer: connected or not, traffic, and whether we are in sync.
    pub fn peers(&self) -> Vec<PeerStatus> {
        let mut peers = self.net().map(Net::statuses).unwrap_or_default();
        // A commit since a session last checked (not yet pushed) means not in sync yet.
        let now = self.clock().count();
        for p in &mut peers {
            p.in_sync &= p.in_sync_at == now;
        }
        peers
    }
}
