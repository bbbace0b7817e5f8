//! [`Node`]: the embeddable API. It owns a data dir (identity, SQLite store, lock), the sync
//! engine and the document cache, and turns each document call into Automerge edits, deltas and
//! commits. Every method is async, `Send`, and safe to call from many tasks at once.
//!
//! One job per file: `mod.rs` the node's state and lifecycle (open, close), `datadir` the data
//! dir (lock, permissions, host name), `docs` the document methods and loading, `commit` the
//! local and remote commit paths and the feed of commits, `events` change events and
//! subscriptions, `membership` invites, members and peers, and the [`crate::net::NetHost`]
//! door through which the network layer sees the node.

mod commit;
mod damage;
mod datadir;
mod docs;
mod events;
mod membership;
mod repo;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tandem_crdt::{Engine, NodeId, VersionVector, actor_id};
use tokio::sync::broadcast;

pub use docs::HistoryEntry;
pub use events::{Event, Subscription, SubscriptionError};
pub use repo::AppSync;

use crate::cache::DocCache;
use crate::clock::Clock;
use crate::members::Membership;
use crate::net::{self, Commit, Net, NetConfig};
use crate::raft::Consensus;
use crate::store::{self, Durability, Store, StoreOptions, StoreStats};
use crate::{Error, Identity};
use datadir::{DB_FILE, create_private_dir, host_name, lock_data_dir};

/// How a node is opened.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the identity, the database and the lock live. Created if missing.
    pub data_dir: PathBuf,
    /// `Full` (the default) fsyncs every commit before acknowledging it.
    pub durability: Durability,
    /// Most documents kept loaded in memory.
    pub cache_docs: usize,
    /// A document is compacted into a snapshot once it has this many deltas outside one (see
    /// [`StoreOptions::compact_after`]).
    pub compact_after: u32,
    /// Events buffered per subscriber before it is told it fell behind.
    pub event_buffer: usize,
    /// Networking: `None` keeps the node offline (no sockets at all).
    pub net: Option<NetConfig>,
    /// What this node calls itself to its peers (shown in their member lists). Default: the
    /// host name.
    pub name: String,
    /// Ask to be a voter of the member list whenever possible (`voter = "prefer"`: a home
    /// server that is always on). Said when joining; the founder says it when founding.
    pub prefer_voter: bool,
    /// Where time comes from (tests may control it).
    pub clock: Arc<dyn Clock>,
}

impl Config {
    /// Defaults for `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            durability: Durability::Full,
            cache_docs: 1024,
            compact_after: StoreOptions::default().compact_after,
            event_buffer: 4096,
            net: None,
            name: host_name(),
            prefer_voter: false,
            clock: crate::clock::system(),
        }
    }

    /// The default data dir: `$XDG_DATA_HOME/tandem` (e.g. `~/.local/share/tandem`).
    pub fn default_data_dir() -> PathBuf {
        dirs::data_dir()
            .unwrap_or_else(|| PathBuf::from("."))
            .join("tandem")
    }
}

pub(crate) struct Inner {
    // Field order is drop order: the network goes first, then the store (and its threads),
    // and the lock is released last.
    net: OnceLock<Net>,
    store: Store,
    identity: Identity,
    members: Membership,
    /// Newly committed deltas, for the sync sessions to push and relay.
    commits: broadcast::Sender<Commit>,
    clock: Arc<dyn Clock>,
    id: NodeId,
    incarnation: u64,
    name: String,
    actor: automerge::ActorId,
    data_dir: PathBuf,
    /// Shared with the store's failure hook, which rolls it back after a failed commit.
    engine: Arc<Mutex<Engine>>,
    cache: Arc<Mutex<DocCache>>,
    /// Damaged deltas found since start.
    damage_found: std::sync::atomic::AtomicU64,
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

impl Node {
    /// Opens the node in `config.data_dir`: creates the dir and identity on first start, refuses
    /// a data dir another process holds, and recovers everything committed before.
    pub async fn open(config: Config) -> Result<Node, Error> {
        let net_cfg = config.net.clone();
        let prefer_voter = config.prefer_voter;
        let (node, raft_state) = tokio::task::spawn_blocking(move || {
            let node = Self::open_blocking(config)?;
            let state = node.inner.store.read_blocking(Consensus::load)?;
            Ok::<_, Error>((node, state))
        })
        .await
        .map_err(|_| Error::Closed)??;
        let consensus = Consensus::start(
            raft_state,
            node.id(),
            node.name().to_string(),
            prefer_voter,
            node.inner.clock.clone(),
            node.inner.store.writer(),
        )
        .await?;
        node.inner.members.attach(consensus);
        if let Some(cfg) = net_cfg {
            let host = Arc::new(membership::NodeLink::new(&node, prefer_voter));
            let clock = node.inner.clock.clone();
            let net = net::start(host, clock, &node.inner.identity, &cfg)?;
            if let Some(c) = node.inner.members.consensus() {
                c.set_link(net.raft_link());
                c.set_addrs(net.advertised_addrs());
            }
            let _ = node.inner.net.set(net);
        }
        node.follow_member_list();
        Ok(node)
    }

    pub(super) fn open_blocking(config: Config) -> Result<Node, Error> {
        let dir = config.data_dir.clone();
        create_private_dir(&dir)?;
        let lock = lock_data_dir(&dir)?;
        datadir::check_database_present(&dir)?;
        let identity = Identity::load_or_create(&dir)?;
        let id = identity.id();
        datadir::private_db_files(&dir)?;
        // A node stopped on a full disk starts on the space kept in reserve.
        // A start needs a little room for the database and the files it writes.
        if store::has_room(&dir, 256 << 10) {
            datadir::keep_reserve(&dir);
        } else {
            datadir::release_reserve(&dir);
        }
        let signer = identity.signer();
        let (store, recovered) = Store::open(
            &dir.join(DB_FILE),
            &signer,
            StoreOptions {
                durability: config.durability,
                compact_after: config.compact_after,
            },
        )?;
        let members = store.read_blocking(|c| Membership::load(id, c))?;
        let (events, _) = broadcast::channel(config.event_buffer.max(1));
        let (commits, _) = broadcast::channel(1024);
        tracing::info!(node = %id, incarnation = recovered.incarnation, dir = %dir.display(), "node open");
        let engine = Arc::new(Mutex::new(
            Engine::new(signer, recovered.clock)
                .with_chain(recovered.chain)
                .with_own_floor(recovered.own_damaged_max),
        ));
        let cache = Arc::new(Mutex::new(DocCache::new(config.cache_docs)));
        store.set_failure_hook(damage::rollback_hook(engine.clone(), cache.clone()));
        Ok(Node {
            inner: Arc::new(Inner {
                net: OnceLock::new(),
                store,
                identity,
                members,
                commits,
                clock: config.clock.clone(),
                id,
                incarnation: recovered.incarnation,
                name: crate::members::clean_name(&config.name),
                actor: actor_id(&id, recovered.incarnation),
                data_dir: dir,
                engine,
                cache,
                damage_found: Default::default(),
                events: Mutex::new(Some(events)),
                lock: Mutex::new(Some(lock)),
            }),
        })
    }

    /// Finishes in-flight commits and stops the store's threads. Further calls fail with
    /// [`Error::Closed`] or a store error; subscriptions end.
    pub async fn close(&self) -> Result<(), Error> {
        if let Some(c) = self.inner.members.consensus() {
            c.shutdown().await;
        }
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

    /// Row counts from the store (kept as commits change them: O(1)), plus loaded documents.
    pub async fn stats(&self) -> Result<(StoreStats, usize), Error> {
        Ok((self.inner.store.counts(), self.cache().loaded()))
    }

    /// The store's group-commit counters.
    /// Now, by the node's clock (monotonic).
    pub fn time(&self) -> std::time::Instant {
        self.inner.clock.now()
    }

    pub fn writer_stats(&self) -> &crate::store::WriterStats {
        self.inner.store.writer_stats()
    }

    pub(super) fn engine(&self) -> std::sync::MutexGuard<'_, Engine> {
        self.inner.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn cache(&self) -> std::sync::MutexGuard<'_, DocCache> {
        self.inner.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}
