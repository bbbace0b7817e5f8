//! The SQLite store: deltas, documents (with compacted snapshots) and the node clock.
//!
//! One writer thread owns the only write connection and does group commit: requests that
//! arrive while it is busy are written together in one transaction with one fsync, and each
//! caller is answered only after that commit. Readers use a small pool of read-only
//! connections; WAL lets them run while the writer commits. A background compactor folds a
//! document's deltas into an Automerge snapshot so that opening it costs about one load.

mod checkpoint;
mod compact;
mod schema;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tandem_crdt::delta::check_change_bytes;
use tandem_crdt::sign::{self, Auth, Signature, Signer};
use tandem_crdt::{Delta, DeltaBody, DeltaId, DeltaStore, DocId, NodeId, VersionVector};
use tokio::sync::oneshot;

pub use schema::SCHEMA_VERSION;
use writer::Request;
pub use writer::{COMMIT_BUCKETS_MICROS, FailureHook, WriterStats};

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(rusqlite::Error),
    #[error(
        "the database has schema version {found}, newer than this build supports ({supported}); upgrade tandem"
    )]
    TooNew { found: i64, supported: i64 },
    #[error("the database belongs to node {stored}, but the identity key is {key}")]
    IdentityMismatch { stored: String, key: String },
    #[error("a commit failed ({0}); the write was not made")]
    CommitFailed(String),
    #[error("the store is closed")]
    Closed,
    #[error("corrupt row in {table}: {why}")]
    Corrupt { table: &'static str, why: String },
    #[error("the disk holding the data dir is full; free some space (writes resume by themselves)")]
    DiskFull,
    /// Stored deltas failed their checksum; they are to be quarantined and fetched again.
    #[error("{} stored delta(s) are damaged: {}", .0.len(), .0.first().map_or("", |d| d.why.as_str()))]
    Damaged(Vec<Damage>),
}

impl StoreError {
    /// The same failure, for each writer whose write it refused.
    pub(crate) fn clone_for_reply(&self) -> StoreError {
        match self {
            StoreError::DiskFull => StoreError::DiskFull,
            StoreError::CommitFailed(why) => StoreError::CommitFailed(why.clone()),
            other => StoreError::CommitFailed(other.to_string()),
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    /// A full disk is its own error: the user can fix it, and writing resumes when they do.
    fn from(e: rusqlite::Error) -> Self {
        if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
            StoreError::DiskFull
        } else {
            StoreError::Sqlite(e)
        }
    }
}

/// How hard a commit pushes data to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// `synchronous=FULL`: every commit is fsynced before it is acknowledged (the default).
    #[default]
    Full,
    /// `synchronous=NORMAL`: a power loss may drop the last commits; a process crash cannot.
    Normal,
}

/// Options for [`Store::open`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub durability: Durability,
    /// Fold a document into a snapshot once it has this many deltas outside one (and then once
    /// they pass half of those folded). Small by default (8), so that the many small documents
    /// of a bulk sync load from a snapshot too (half the work of applying their changes).
    pub compact_after: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            durability: Durability::Full,
            compact_after: 8,
        }
    }
}

/// What the store remembered from earlier runs.
#[derive(Debug, Clone)]
pub struct Recovered {
    /// This run's incarnation, one more than the last run's.
    pub incarnation: u64,
    /// The node clock: exactly the deltas stored.
    pub clock: VersionVector,
    /// The highest of this node's own seqs found damaged (0 if none): never to be reused, even
    /// when the delta is gone from the clock.
    pub own_damaged_max: u64,
    /// The chain hash of this node's latest stored delta (zeros if none): the next links to it.
    pub chain: [u8; 32],
}

/// What runs right after a commit, on the writer thread, given the deltas it committed.
pub type AfterCommit = Box<dyn FnOnce(&Arc<Vec<Delta>>) + Send>;

/// A write for the writer thread.
pub enum Write {
    /// Store deltas (idempotently) and advance the clock; `heads` sets the current heads of
    /// documents whose state the caller knows.
    Deltas {
        /// Shared, so the feed of commits hands them on without a copy.
        deltas: Arc<Vec<Delta>>,
        heads: Vec<(DocId, Vec<automerge::ChangeHash>)>,
        /// The whole state of one of the documents once these deltas are in, saved (a file
        /// just imported holds it already): recorded as its snapshot in the same transaction
        /// if the document is then due for compaction, instead of the compactor rebuilding
        /// that state from every delta.
        snapshot: Option<(DocId, Vec<u8>)>,
        /// Runs on the writer thread right after the commit succeeds (before the reply), with
        /// the deltas just committed.
        after_commit: Option<AfterCommit>,
    },
    /// Run one statement (membership and other small tables).
    Exec {
        sql: &'static str,
        params: Vec<rusqlite::types::Value>,
    },
    /// Run several statements in one transaction (the Raft log and state machine).
    Batch(Vec<(&'static str, Vec<rusqlite::types::Value>)>),
    /// Move deltas found damaged out of `deltas` and the clock into `damaged`, with why; a good
    /// copy stored later replaces them (healing the document).
    Quarantine { deltas: Vec<Damage> },
    /// Forget `doc`'s snapshot (found damaged): it loads from its deltas, which stay.
    DropSnapshot { doc: DocId },
    /// Record a compacted snapshot of `doc` (with its heads) covering every delta with rowid
    /// `<= upto`.
    Snapshot {
        doc: DocId,
        snapshot: Vec<u8>,
        heads: Vec<automerge::ChangeHash>,
        upto: i64,
    },
}

impl std::fmt::Debug for Write {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Write::Deltas { deltas, heads, .. } => f
                .debug_struct("Deltas")
                .field("deltas", &deltas.len())
                .field("heads", &heads.len())
                .finish_non_exhaustive(),
            Write::Exec { sql, .. } => f
                .debug_struct("Exec")
                .field("sql", sql)
                .finish_non_exhaustive(),
            Write::Batch(stmts) => f.debug_tuple("Batch").field(&stmts.len()).finish(),
            Write::Quarantine { deltas } => f
                .debug_struct("Quarantine")
                .field("deltas", &deltas.len())
                .finish(),
            Write::DropSnapshot { doc } => {
                f.debug_struct("DropSnapshot").field("doc", doc).finish()
            }
            Write::Snapshot { doc, upto, .. } => f
                .debug_struct("Snapshot")
                .field("doc", doc)
                .field("upto", upto)
                .finish_non_exhaustive(),
        }
    }
}

/// A document as stored: what [`Store::load_doc`] returns.
#[derive(Debug, Default)]
pub struct StoredDoc {
    pub snapshot: Option<Vec<u8>>,
    /// Changes not in the snapshot, in arrival order, with the deltas that carried them.
    pub changes: Vec<(DeltaId, Vec<u8>)>,
    pub deleted: bool,
    /// Deltas of this document found damaged and not yet replaced.
    pub damaged: u64,
}

/// A stored delta that failed its check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub id: DeltaId,
    pub doc: DocId,
    pub why: String,
}

/// A delta found damaged and not yet replaced by a good copy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DamagedDelta {
    pub id: DeltaId,
    pub doc: DocId,
    /// Unix milliseconds.
    pub found_at: i64,
    pub why: String,
}

/// A row of the document list.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DocInfo {
    pub id: DocId,
    pub heads: Vec<automerge::ChangeHash>,
    /// Bytes needed to load it: snapshot plus changes not yet folded in.
    pub size: u64,
    /// Unix milliseconds of the last delta.
    pub updated_at: i64,
    pub deleted: bool,
}

/// Counts for status pages and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreStats {
    pub documents: u64,
    pub deltas: u64,
    pub snapshots: u64,
}

struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

const MAX_IDLE_READERS: usize = 4;

impl ReadPool {
    fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = self.idle.lock().ok().and_then(|mut v| v.pop());
        let conn = match conn {
            Some(c) => c,
            None => open_reader(&self.path)?,
        };
        let out = f(&conn);
        // A connection left inside a transaction (a failed rollback) is not reused.
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < MAX_IDLE_READERS
            && conn.is_autocommit()
        {
            idle.push(conn);
        }
        out
    }
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    cached_statements(&conn)?;
    Ok(conn)
}

/// How a connection caches statements. Each keeps its plan whatever values are bound to it. Without this the
/// bundled SQLite re-prepared (re-parsed and re-planned) a statement each time a value
/// compared to an indexed column changed: every cached query, on every use (measured: every
/// document load parsed its queries again). tandem's queries have one good plan each. The
/// statement cache holds them all (rusqlite's default of 16 is fewer than the writer's and the
/// readers' distinct statements, and a full cache drops the least recently used).
fn cached_statements(conn: &Connection) -> Result<(), StoreError> {
    conn.set_prepared_statement_cache_capacity(64);
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(())
}

/// The store: a handle to the writer thread plus the read pool.
/// Submits writes to a store's writer thread: see [`Store::writer`].
#[derive(Clone)]
pub struct Writer {
    requests: mpsc::Sender<Request>,
}

impl Writer {
    /// Submits and waits for the commit (fsynced with `Durability::Full`).
    pub async fn write(&self, write: Write) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        let _ = self.requests.send(Request::Write { write, reply });
        rx.await.unwrap_or(Err(StoreError::Closed))
    }
}

pub struct Store {
    requests: mpsc::Sender<Request>,
    readers: Arc<ReadPool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stats: Arc<WriterStats>,
    committed: Arc<Mutex<VersionVector>>,
    hook: Arc<Mutex<Option<FailureHook>>>,
    counts: Arc<Mutex<StoreStats>>,
}

/// Whether `bytes` can be written in `dir` now (a probe file, written, synced and removed).
/// SQLite reports a full disk as `SQLITE_FULL` on some paths and as an I/O error on others;
/// this tells them apart.
pub fn has_room(dir: &Path, bytes: usize) -> bool {
    let path = dir.join(".room-probe");
    let probe = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&path)?;
        f.write_all(&vec![0u8; bytes])?;
        f.sync_all()
    };
    let ok = probe().is_ok();
    let _ = std::fs::remove_file(&path);
    ok
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Store {
    /// Opens (creating if needed) the database at `path` for node `node`, migrates it, bumps
    /// the incarnation and starts the writer and compactor threads.
    pub fn open(
        path: &Path,
        signer: &Signer,
        opts: StoreOptions,
    ) -> Result<(Store, Recovered), StoreError> {
        let node = signer.id();
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        cached_statements(&conn)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        let synchronous = match opts.durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", synchronous)?;
        schema::migrate(&mut conn)?;

        let tx = conn.transaction()?;
        let stored: Option<Vec<u8>> = tx
            .query_row("SELECT value FROM meta WHERE key = 'node_id'", [], |r| {
                r.get(0)
            })
            .optional()?;
        match stored {
            Some(bytes) if bytes != node.as_bytes() => {
                return Err(StoreError::IdentityMismatch {
                    stored: node_id_from(&bytes, "meta")
                        .map_or_else(|e| e.to_string(), |n| n.to_string()),
                    key: node.to_string(),
                });
            }
            Some(_) => {}
            None => {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('node_id', ?1)",
                    [node.as_bytes().as_slice()],
                )?;
            }
        }
        let last: Option<i64> = tx
            .query_row(
                "SELECT value FROM meta WHERE key = 'incarnation'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        let incarnation = last.unwrap_or(0) as u64 + 1;
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('incarnation', ?1)",
            [incarnation as i64],
        )?;
        let chain = sign_own_deltas(&tx, signer)?;
        tx.commit()?;
        let clock = load_clock(&conn)?;
        let damaged_ids = damaged(&conn)?;
        let own_damaged_max = damaged_ids
            .iter()
            .filter(|d| d.id.origin == node)
            .map(|d| d.id.seq)
            .max()
            .unwrap_or(0);
        if !damaged_ids.is_empty() {
            tracing::warn!(
                deltas = damaged_ids.len(),
                "damaged deltas from an earlier run wait for a good copy from a member"
            );
        }
        tracing::debug!(%node, incarnation, deltas = clock.count(), "store opened");

        let readers = Arc::new(ReadPool {
            path: path.to_path_buf(),
            idle: Mutex::new(Vec::new()),
        });
        let (requests, rx) = mpsc::channel();
        let stats = Arc::new(WriterStats::default());
        let committed = Arc::new(Mutex::new(clock.clone()));
        let hook = Arc::new(Mutex::new(None));
        // Counted once here; the writer keeps them up to date.
        let counts = Arc::new(Mutex::new(self::stats(&conn)?));
        let checkpointer = checkpoint::start(&mut conn, path, synchronous)?;
        let (compact_tx, compact_rx) = mpsc::channel();
        let writer = writer::Writer::new(
            conn,
            path.parent().map(Path::to_path_buf).unwrap_or_default(),
            clock.clone(),
            compact_tx,
            i64::from(opts.compact_after),
            writer::Shared {
                stats: stats.clone(),
                committed: committed.clone(),
                hook: hook.clone(),
                counts: counts.clone(),
            },
            damaged_ids.iter().map(|d| d.id).collect(),
        );
        let w = std::thread::Builder::new()
            .name("tandem-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::CommitFailed(format!("cannot start writer thread: {e}")))?;
        let compactor = compact::Compactor::new(readers.clone(), requests.clone());
        let c = std::thread::Builder::new()
            .name("tandem-compact".into())
            .spawn(move || compactor.run(compact_rx))
            .map_err(|e| StoreError::CommitFailed(format!("cannot start compactor thread: {e}")))?;
        Ok((
            Store {
                requests,
                readers,
                // The checkpointer ends once the writer (and its connection) has.
                threads: Mutex::new(vec![w, c, checkpointer]),
                stats,
                committed,
                hook,
                counts,
            },
            Recovered {
                incarnation,
                clock,
                own_damaged_max,
                chain,
            },
        ))
    }

    /// Queues a write; the receiver answers after its commit. Writes are committed in the order
    /// they are submitted.
    pub fn submit(&self, write: Write) -> oneshot::Receiver<Result<(), StoreError>> {
        let (reply, rx) = oneshot::channel();
        // A send error means the writer is gone; the dropped reply then reads as Closed.
        let _ = self.requests.send(Request::Write { write, reply });
        rx
    }

    /// A handle that submits writes without borrowing the store (for tasks that outlive a
    /// borrow, like the Raft core's storage).
    pub fn writer(&self) -> Writer {
        Writer {
            requests: self.requests.clone(),
        }
    }

    /// Row counts as of the last commit: O(1), kept by the writer.
    pub fn counts(&self) -> StoreStats {
        *self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets what runs after a failed commit (see [`FailureHook`]).
    pub fn set_failure_hook(&self, hook: FailureHook) {
        *self.hook.lock().unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }

    /// The clock of exactly the deltas committed so far.
    pub fn committed_clock(&self) -> VersionVector {
        self.committed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The writer's counters: commits, writes, time spent committing.
    pub fn writer_stats(&self) -> &WriterStats {
        &self.stats
    }

    /// Submits and waits for the commit.
    pub async fn write(&self, write: Write) -> Result<(), StoreError> {
        self.submit(write).await.unwrap_or(Err(StoreError::Closed))
    }

    /// Runs `f` on a read connection, on a blocking thread.
    pub async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let pool = self.readers.clone();
        tokio::task::spawn_blocking(move || pool.with(f))
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` on a read connection on this thread: for callers already off the runtime, and
    /// for short indexed reads whose hop to the blocking pool would cost more than they do.
    pub fn read_blocking<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.readers.with(f)
    }

    /// Finishes every queued write, then stops the threads. Idempotent.
    pub fn close(&self) {
        let _ = self.requests.send(Request::Shutdown);
        let threads = self
            .threads
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

/// Reads a document: its snapshot and the changes after it, in one read transaction so the
/// two agree. `None` if the store has never seen the document. `may_be_new`: the caller
/// expects documents new here (a bulk sync's loads mostly are): they are then found missing
/// with one cached lookup and no transaction; a read of a listed document skips that lookup.
/// A document's snapshot (if any), the rowid of the last delta in it, and whether it is deleted:
/// where a load (and a fold) starts.
pub(super) const SNAPSHOT_ROW: &str =
    "SELECT s.snapshot, d.snapshot_upto, d.deleted FROM documents d
     LEFT JOIN snapshots s ON s.doc = d.doc WHERE d.doc = ?1";

pub fn load_doc(
    conn: &Connection,
    doc: DocId,
    may_be_new: bool,
) -> Result<Option<StoredDoc>, StoreError> {
    if may_be_new {
        let known = conn
            .prepare_cached("SELECT 1 FROM documents WHERE doc = ?1")?
            .query_row([doc.as_bytes().as_slice()], |_| Ok(()))
            .optional()?;
        if known.is_none() {
            return Ok(None);
        }
    }
    // One WAL snapshot for the snapshot row and the changes after it (the compactor may move
    // the watermark between two statements otherwise).
    in_read_tx(conn, |conn| {
        let row: Option<(Option<Vec<u8>>, i64, bool)> = conn
            .prepare_cached(SNAPSHOT_ROW)?
            .query_row([doc.as_bytes().as_slice()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        let Some((snapshot, upto, deleted)) = row else {
            return Ok(None);
        };
        let mut stmt = conn.prepare_cached(
            "SELECT origin, seq, change FROM deltas
             WHERE doc = ?1 AND rowid > ?2 AND kind = 0 ORDER BY rowid",
        )?;
        let rows = stmt.query_map(params![doc.as_bytes().as_slice(), upto], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?;
        let mut changes = Vec::new();
        for row in rows {
            let (origin, seq, change) = row?;
            let id = DeltaId {
                origin: node_id_from(&origin, "deltas")?,
                seq: seq.max(0) as u64,
            };
            changes.push((id, change));
        }
        let damaged: i64 = conn
            .prepare_cached("SELECT count(*) FROM damaged WHERE doc = ?1")?
            .query_row([doc.as_bytes().as_slice()], |r| r.get(0))?;
        Ok(Some(StoredDoc {
            snapshot,
            changes,
            deleted,
            damaged: damaged.max(0) as u64,
        }))
    })
}

/// Runs `f` in one read transaction (one WAL snapshot) with cached `BEGIN` and `COMMIT`: a
/// cold load is on the hot path of reads, and the compactor folds thousands of documents after
/// a bulk sync; neither should parse SQL.
pub(super) fn in_read_tx<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    conn.prepare_cached("BEGIN")?.execute([])?;
    let out = f(conn);
    let end = conn
        .prepare_cached(if out.is_ok() { "COMMIT" } else { "ROLLBACK" })?
        .execute([]);
    let out = out?;
    end?;
    Ok(out)
}

/// Every delta found damaged and not yet replaced, oldest first.
pub fn damaged(conn: &Connection) -> Result<Vec<DamagedDelta>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT origin, seq, doc, found_at, why FROM damaged ORDER BY found_at, origin, seq",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, Vec<u8>>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, Vec<u8>>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, String>(4)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (origin, seq, doc, found_at, why) = row?;
        out.push(DamagedDelta {
            id: DeltaId {
                origin: node_id_from(&origin, "damaged")?,
                seq: seq.max(0) as u64,
            },
            doc: doc_id_from(&doc)?,
            found_at,
            why,
        });
    }
    Ok(out)
}

/// Whether each of `docs` is stored here.
pub fn stored_docs(conn: &Connection, docs: &[DocId]) -> Result<Vec<bool>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT 1 FROM documents WHERE doc = ?1")?;
    docs.iter()
        .map(|doc| {
            Ok(stmt
                .query_row([doc.as_bytes().as_slice()], |_| Ok(()))
                .optional()?
                .is_some())
        })
        .collect()
}

/// Lists documents, most recently updated first.
pub fn list_docs(conn: &Connection, include_deleted: bool) -> Result<Vec<DocInfo>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT doc, heads, size, updated_at, deleted FROM documents
         WHERE deleted = 0 OR ?1 ORDER BY updated_at DESC, doc",
    )?;
    let rows = stmt.query_map([include_deleted], |r| {
        Ok((
            r.get::<_, Vec<u8>>(0)?,
            r.get::<_, Vec<u8>>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, bool>(4)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (doc, heads, size, updated_at, deleted) = row?;
        out.push(DocInfo {
            id: doc_id_from(&doc)?,
            heads: heads_from(&heads)?,
            size: size.max(0) as u64,
            updated_at,
            deleted,
        });
    }
    Ok(out)
}

/// Row counts, counted (O(rows)): at open, and by tests that check the kept counts.
pub fn stats(conn: &Connection) -> Result<StoreStats, StoreError> {
    let q = |sql: &str| {
        conn.query_row(sql, [], |r| r.get::<_, i64>(0))
            .map(|n| n.max(0) as u64)
    };
    Ok(StoreStats {
        documents: q("SELECT count(*) FROM documents WHERE deleted = 0")?,
        deltas: q("SELECT count(*) FROM deltas")?,
        snapshots: q("SELECT count(*) FROM snapshots")?,
    })
}

fn load_clock(conn: &Connection) -> Result<VersionVector, StoreError> {
    let mut stmt = conn.prepare("SELECT origin, prefix, extra FROM clock")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, Vec<u8>>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, Vec<u8>>(2)?,
        ))
    })?;
    let mut parts = Vec::new();
    for row in rows {
        let (origin, prefix, extra) = row?;
        let extra: Vec<(u64, u64)> =
            postcard::from_bytes(&extra).map_err(|e| StoreError::Corrupt {
                table: "clock",
                why: e.to_string(),
            })?;
        parts.push((node_id_from(&origin, "clock")?, prefix.max(0) as u64, extra));
    }
    Ok(VersionVector::from_parts(parts))
}

fn node_id_from(bytes: &[u8], table: &'static str) -> Result<NodeId, StoreError> {
    let arr: [u8; 32] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        table,
        why: format!("node id of {} bytes", bytes.len()),
    })?;
    Ok(NodeId::from_bytes(arr))
}

fn doc_id_from(bytes: &[u8]) -> Result<DocId, StoreError> {
    let arr: [u8; 16] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        table: "documents",
        why: format!("doc id of {} bytes", bytes.len()),
    })?;
    Ok(DocId::from_bytes(arr))
}

/// Changes applied at a time when a document is rebuilt from its stored changes. One
/// `apply_changes` of a whole long history holds every parsed change at once (262,961 changes
/// of one text peaked at 500 MB in Automerge alone); steps of this size take as long and a
/// fraction of the memory.
const APPLY_STEP: usize = 20_000;

/// Applies stored change bytes to `am` in order, parsing a step at a time, each change checked
/// against its checksum as it is parsed (once). Damaged bytes, and what Automerge refuses or
/// panics on, are the document's damage, returned as text (the caller finds which change).
pub(crate) fn apply_stored<'a>(
    am: &mut automerge::Automerge,
    changes: impl Iterator<Item = &'a [u8]>,
) -> Result<(), String> {
    let mut changes = changes.peekable();
    while changes.peek().is_some() {
        let step = changes.by_ref().take(APPLY_STEP);
        tandem_crdt::delta::contain(|| {
            let parsed = step
                .map(tandem_crdt::delta::parse_checked_change)
                .collect::<Result<Vec<_>, _>>()?;
            am.apply_changes(parsed).map_err(|e| e.to_string())
        })
        .map_err(|panic| format!("automerge panicked: {panic}"))??;
    }
    Ok(())
}

pub(crate) fn heads_to_bytes(heads: &[automerge::ChangeHash]) -> Vec<u8> {
    heads.iter().flat_map(|h| h.0).collect()
}

fn heads_from(bytes: &[u8]) -> Result<Vec<automerge::ChangeHash>, StoreError> {
    if !bytes.len().is_multiple_of(32) {
        return Err(StoreError::Corrupt {
            table: "documents",
            why: "heads not a multiple of 32 bytes".into(),
        });
    }
    Ok(bytes
        .chunks_exact(32)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            automerge::ChangeHash(h)
        })
        .collect())
}

fn delta_from_row(r: &rusqlite::Row<'_>) -> Result<Delta, StoreError> {
    let origin: Vec<u8> = r.get(0)?;
    let seq: i64 = r.get(1)?;
    let doc: Vec<u8> = r.get(2)?;
    let kind: i64 = r.get(3)?;
    let change: Option<Vec<u8>> = r.get(4)?;
    let prev: Option<Vec<u8>> = r.get(5)?;
    let sig: Option<Vec<u8>> = r.get(6)?;
    let auth = match (prev, sig) {
        (Some(prev), Some(sig)) => Auth {
            prev: prev.try_into().map_err(|_| StoreError::Corrupt {
                table: "deltas",
                why: "prev is not 32 bytes".into(),
            })?,
            sig: Signature(sig.try_into().map_err(|_| StoreError::Corrupt {
                table: "deltas",
                why: "sig is not 64 bytes".into(),
            })?),
        },
        // Stored before deltas were signed.
        _ => Auth::default(),
    };
    let body = match (kind, change) {
        (0, Some(bytes)) => DeltaBody::Change(bytes),
        (1, _) => DeltaBody::Tombstone,
        (k, _) => {
            return Err(StoreError::Corrupt {
                table: "deltas",
                why: format!("kind {k} without a change"),
            });
        }
    };
    Ok(Delta {
        id: DeltaId {
            origin: node_id_from(&origin, "deltas")?,
            seq: seq.max(0) as u64,
        },
        doc: doc_id_from(&doc)?,
        body,
        auth,
    })
}

/// Signs this node's own deltas stored before deltas were signed (once, after the upgrade to
/// schema 5), and returns the chain hash of its latest delta.
fn sign_own_deltas(
    tx: &rusqlite::Transaction<'_>,
    signer: &Signer,
) -> Result<[u8; 32], StoreError> {
    let me = signer.id();
    let done: Option<i64> = tx
        .query_row("SELECT value FROM meta WHERE key = 'own_signed'", [], |r| {
            r.get(0)
        })
        .optional()?;
    let mut chain = [0u8; 32];
    if done.is_none() {
        let deltas: Vec<Delta> = {
            let mut stmt = tx.prepare(
                "SELECT origin, seq, doc, kind, change, prev, sig FROM deltas
                 WHERE origin = ?1 ORDER BY seq",
            )?;
            let mut rows = stmt.query([me.as_bytes().as_slice()])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push(delta_from_row(row)?);
            }
            out
        };
        let mut update =
            tx.prepare("UPDATE deltas SET prev = ?3, sig = ?4 WHERE origin = ?1 AND seq = ?2")?;
        let mut signed = 0usize;
        for mut d in deltas {
            if d.auth.is_unsigned() {
                chain = signer.sign(&mut d, chain);
                update.execute(params![
                    me.as_bytes().as_slice(),
                    d.id.seq as i64,
                    d.auth.prev.as_slice(),
                    d.auth.sig.0.as_slice()
                ])?;
                signed += 1;
            } else {
                chain = sign::chain_hash(&d);
            }
        }
        if signed > 0 {
            tracing::info!(
                deltas = signed,
                "signed this node's deltas stored before signing"
            );
        }
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('own_signed', 1)",
            [],
        )?;
        return Ok(chain);
    }
    let last = tx
        .query_row(
            "SELECT origin, seq, doc, kind, change, prev, sig FROM deltas
             WHERE origin = ?1 ORDER BY seq DESC LIMIT 1",
            [me.as_bytes().as_slice()],
            |r| Ok(delta_from_row(r)),
        )
        .optional()?
        .transpose()?;
    if let Some(d) = last {
        chain = sign::chain_hash(&d);
    }
    Ok(chain)
}

/// The SQLite store answers the engine's catch-up questions. Blocking: call it off the async
/// runtime.
impl DeltaStore for Store {
    type Error = StoreError;

    fn load_range(
        &self,
        origin: &NodeId,
        seqs: std::ops::RangeInclusive<u64>,
        max_bytes: usize,
    ) -> Result<Vec<Delta>, StoreError> {
        self.read_blocking(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT origin, seq, doc, kind, change, prev, sig FROM deltas
                 WHERE origin = ?1 AND seq BETWEEN ?2 AND ?3 ORDER BY seq",
            )?;
            let lo = i64::try_from(*seqs.start()).unwrap_or(i64::MAX);
            let hi = i64::try_from(*seqs.end()).unwrap_or(i64::MAX);
            let mut rows = stmt.query(params![origin.as_bytes().as_slice(), lo, hi])?;
            let mut out = Vec::new();
            let mut used = 0;
            let mut damaged = Vec::new();
            while let Some(row) = rows.next()? {
                let d = delta_from_row(row)?;
                // Stored before deltas were signed, from another origin: kept and readable
                // here, but not relayed (receivers refuse what is not signed).
                if d.auth.is_unsigned() {
                    continue;
                }
                // Never serve damage: a peer would refuse it, and the session would restart
                // forever. The caller quarantines it and members send a good copy.
                if let Some(Err(why)) = d.change_bytes().map(check_change_bytes) {
                    damaged.push(Damage {
                        id: d.id,
                        doc: d.doc,
                        why,
                    });
                    continue;
                }
                used += d.encoded_len();
                if !out.is_empty() && used > max_bytes {
                    break;
                }
                out.push(d);
            }
            if !damaged.is_empty() {
                return Err(StoreError::Damaged(damaged));
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The log is copied into the database by the checkpointer, not left to grow until the
    /// writer's backstop (64 MiB): 10 MB written in 100 commits leave a log of a few MB.
    #[test]
    fn the_checkpointer_keeps_the_log_small() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let signer = Signer::from_seed([1; 32]);
        let (store, _) = Store::open(&path, &signer, StoreOptions::default()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for i in 0..100 {
            rt.block_on(store.write(Write::Exec {
                sql: "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
                params: vec![
                    format!("filler {i}").into(),
                    rusqlite::types::Value::Blob(vec![i as u8; 100_000]),
                ],
            }))
            .unwrap();
            // As a steady writer would: the checkpointer gets a moment now and then.
            if i % 10 == 9 {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        let wal = std::fs::metadata(dir.path().join("t.db-wal"))
            .unwrap()
            .len();
        assert!(wal < 8 << 20, "the log grew to {wal} bytes");
        let db = std::fs::metadata(&path).unwrap().len();
        assert!(db > 5 << 20, "the database holds {db} bytes");
        store.close();
    }

    /// Cached statements keep their plan: running one with other values does not parse it
    /// again (it did for every document load before `cached_statements`).
    #[test]
    fn cached_statements_are_not_prepared_again_for_new_values() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::from_seed([1; 32]);
        let (store, _) =
            Store::open(&dir.path().join("t.db"), &signer, StoreOptions::default()).unwrap();
        let docs: Vec<DocId> = (0..5u8).map(|i| DocId::from_bytes([i; 16])).collect();
        let mut prev = [0; 32];
        let deltas: Vec<Delta> = docs
            .iter()
            .enumerate()
            .map(|(i, doc)| {
                let mut d = Delta {
                    id: DeltaId {
                        origin: signer.id(),
                        seq: i as u64 + 1,
                    },
                    doc: *doc,
                    body: DeltaBody::Tombstone,
                    auth: Auth::default(),
                };
                prev = signer.sign(&mut d, prev);
                d
            })
            .collect();
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(store.write(Write::Deltas {
                deltas: Arc::new(deltas),
                heads: Vec::new(),
                snapshot: None,
                after_commit: None,
            }))
            .unwrap();
        store
            .read_blocking(|conn| {
                for (i, doc) in docs.iter().enumerate() {
                    load_doc(conn, *doc, i % 2 == 0)?;
                    // Queries of the shapes a load runs, with other values each time.
                    let mut a = conn.prepare_cached(
                        "SELECT s.snapshot, d.deleted FROM documents d
                         LEFT JOIN snapshots s ON s.doc = d.doc WHERE d.doc = ?1",
                    )?;
                    a.query_row([doc.as_bytes().as_slice()], |_| Ok(()))?;
                    let mut b = conn.prepare_cached(
                        "SELECT change FROM deltas WHERE doc = ?1 AND rowid > ?2 ORDER BY rowid",
                    )?;
                    b.query_map(params![doc.as_bytes().as_slice(), i as i64], |_| Ok(()))?
                        .for_each(drop);
                    for st in [&a, &b] {
                        assert_eq!(st.get_status(rusqlite::StatementStatus::RePrepare), 0);
                    }
                }
                Ok(())
            })
            .unwrap();
    }
}
