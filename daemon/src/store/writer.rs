//! The writer thread: owns the write connection and does group commit. It takes every request
//! already queued (up to a bound), writes them in one transaction, commits once (one fsync), and
//! only then answers each caller. A failed commit (a full disk, an IO error) is rolled back;
//! the writer then refuses every write already queued (they may build on the failed one: the
//! next local seq, a change whose dependency was not stored) and lets the node roll its engine
//! back to what is committed (the failure hook), then carries on: writing resumes by itself
//! when the disk has room again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use tandem_crdt::{DeltaBody, DeltaId, DocId, NodeId, VersionVector};
use tokio::sync::oneshot;

use super::{StoreError, StoreStats, Write, heads_to_bytes, now_ms};

/// Called on the writer thread after a failed commit, with a function that refuses every write
/// still queued and returns the committed clock. The node takes its engine lock (so no local
/// write is queued meanwhile), calls it, rolls its engine back to that clock and drops its
/// in-memory documents, which may hold changes that were never stored.
pub type FailureHook = Box<dyn FnMut(&mut dyn FnMut() -> VersionVector) + Send>;

type Reply = oneshot::Sender<Result<(), StoreError>>;

pub(super) enum Request {
    Write {
        write: Write,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Shutdown,
}

/// Most requests folded into one transaction.
const MAX_GROUP: usize = 512;

/// Counters the writer keeps; read them through [`super::Store::writer_stats`].
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Transactions committed.
    pub commits: AtomicU64,
    /// Write requests answered by those commits.
    pub writes: AtomicU64,
    /// Total time spent committing (SQL and fsync), in microseconds.
    pub commit_micros: AtomicU64,
    /// Commit latencies: `commit_histogram[i]` counts commits that took at most
    /// [`COMMIT_BUCKETS_MICROS`]`[i]` and more than the bucket before; the last slot counts the
    /// rest.
    pub commit_histogram: [AtomicU64; COMMIT_BUCKETS_MICROS.len() + 1],
    /// Commits that failed.
    pub failures: AtomicU64,
    /// Whether the last commit failed because the disk is full.
    pub disk_full: AtomicBool,
}

/// Upper bounds of the commit latency histogram's buckets, in microseconds.
pub const COMMIT_BUCKETS_MICROS: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

impl WriterStats {
    fn record_commit(&self, writes: usize, micros: u64) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.writes.fetch_add(writes as u64, Ordering::Relaxed);
        self.commit_micros.fetch_add(micros, Ordering::Relaxed);
        let bucket = COMMIT_BUCKETS_MICROS.partition_point(|&b| b < micros);
        self.commit_histogram[bucket].fetch_add(1, Ordering::Relaxed);
    }
}

/// What the writer shares with the [`super::Store`] handle.
pub(super) struct Shared {
    pub(super) stats: Arc<WriterStats>,
    /// The clock of what is committed, shared with readers.
    pub(super) committed: Arc<std::sync::Mutex<VersionVector>>,
    pub(super) hook: Arc<std::sync::Mutex<Option<FailureHook>>>,
    /// Row counts, kept as commits change them (so status pages cost O(1), not a recount).
    pub(super) counts: Arc<std::sync::Mutex<StoreStats>>,
}

/// How one commit changed the row counts.
#[derive(Default)]
struct CountDelta {
    documents: i64,
    deltas: i64,
    snapshots: i64,
}

impl CountDelta {
    fn apply_to(&self, s: &mut StoreStats) {
        let add = |v: &mut u64, d: i64| *v = v.saturating_add_signed(d);
        add(&mut s.documents, self.documents);
        add(&mut s.deltas, self.deltas);
        add(&mut s.snapshots, self.snapshots);
    }
}

pub(super) struct Writer {
    stats: Arc<WriterStats>,
    committed: Arc<std::sync::Mutex<VersionVector>>,
    conn: Connection,
    /// The database's directory, probed for room when a commit fails.
    dir: std::path::PathBuf,
    clock: VersionVector,
    compact: mpsc::Sender<DocId>,
    compact_after: i64,
    hook: Arc<std::sync::Mutex<Option<FailureHook>>>,
    counts: Arc<std::sync::Mutex<StoreStats>>,
    /// Deltas in the `damaged` table: a good copy stored replaces them.
    damaged: BTreeSet<DeltaId>,
}

#[derive(Default)]
struct DocDelta {
    pending: i64,
    size: i64,
    deleted: bool,
    heads: Option<Vec<u8>>,
}

impl Writer {
    pub(super) fn new(
        conn: Connection,
        dir: std::path::PathBuf,
        clock: VersionVector,
        compact: mpsc::Sender<DocId>,
        compact_after: i64,
        shared: Shared,
        damaged: BTreeSet<DeltaId>,
    ) -> Self {
        let Shared {
            stats,
            committed,
            hook,
            counts,
        } = shared;
        Self {
            stats,
            committed,
            conn,
            dir,
            clock,
            compact,
            compact_after: compact_after.max(1),
            hook,
            counts,
            damaged,
        }
    }

    pub(super) fn run(mut self, rx: mpsc::Receiver<Request>) {
        let mut shutdown = false;
        while !shutdown {
            let Ok(first) = rx.recv() else { break };
            let mut group = Vec::new();
            match first {
                Request::Write { write, reply } => group.push((write, reply)),
                Request::Shutdown => break,
            }
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(Request::Write { write, reply }) => group.push((write, reply)),
                    Ok(Request::Shutdown) => {
                        shutdown = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            if let Err((e, replies)) = self.commit_group(group) {
                // Rolled back before anyone hears of the failure: a caller that retries at
                // once must find the node rolled back, not a document about to be dropped.
                shutdown |= self.recover(&rx, &e);
                for reply in replies {
                    let _ = reply.send(Err(e.clone_for_reply()));
                }
            }
        }
        tracing::debug!("writer stopped");
    }

    /// After a failed commit: refuses what is queued (with the same error) while the node rolls
    /// back. Returns whether a shutdown was among the refused requests.
    fn recover(&mut self, rx: &mpsc::Receiver<Request>, error: &StoreError) -> bool {
        let committed = self
            .committed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.clock = committed.clone();
        let mut shutdown = false;
        let mut refused = 0usize;
        let mut drain = || {
            while let Ok(req) = rx.try_recv() {
                match req {
                    Request::Write { reply, .. } => {
                        refused += 1;
                        let _ = reply.send(Err(error.clone_for_reply()));
                    }
                    Request::Shutdown => shutdown = true,
                }
            }
            committed.clone()
        };
        let mut hook = self.hook.lock().unwrap_or_else(|p| p.into_inner());
        match hook.as_mut() {
            Some(h) => h(&mut drain),
            None => {
                drain();
            }
        }
        drop(hook);
        tracing::debug!(
            refused,
            failures = self.stats.failures.load(Ordering::Relaxed),
            "writer rolled back after a failed commit"
        );
        shutdown
    }

    /// Commits a group and answers it; on failure returns the error and the replies, which
    /// the caller answers after rolling back.
    fn commit_group(&mut self, group: Vec<(Write, Reply)>) -> Result<(), (StoreError, Vec<Reply>)> {
        let (writes, replies): (Vec<_>, Vec<_>) = group.into_iter().unzip();
        let started = Instant::now();
        let result = self.apply(&writes);
        let n = replies.len();
        self.stats
            .record_commit(n, started.elapsed().as_micros() as u64);
        match result {
            Ok((to_compact, counted)) => {
                tracing::trace!(requests = n, "group committed");
                counted.apply_to(&mut self.counts.lock().unwrap_or_else(|p| p.into_inner()));
                if self.stats.disk_full.swap(false, Ordering::Relaxed) {
                    tracing::info!("the disk has room again; writing resumed");
                }
                // Published before anyone is told of the commit.
                *self.committed.lock().unwrap_or_else(|p| p.into_inner()) = self.clock.clone();
                for w in writes {
                    if let Write::Deltas {
                        after_commit: Some(f),
                        deltas,
                        ..
                    } = w
                    {
                        f(&deltas);
                    }
                }
                for doc in to_compact {
                    let _ = self.compact.send(doc);
                }
                for reply in replies {
                    let _ = reply.send(Ok(()));
                }
                Ok(())
            }
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                // SQLite says SQLITE_FULL on some paths and an I/O error on others: under
                // 1 MiB free is a full disk either way.
                let e = match e {
                    StoreError::DiskFull => StoreError::DiskFull,
                    _ if !super::has_room(&self.dir, 1 << 20) => StoreError::DiskFull,
                    other => StoreError::CommitFailed(other.to_string()),
                };
                self.stats
                    .disk_full
                    .store(matches!(e, StoreError::DiskFull), Ordering::Relaxed);
                if matches!(e, StoreError::DiskFull) {
                    tracing::error!(
                        "the disk is full: {n} writes refused; writing resumes when space is freed"
                    );
                } else {
                    tracing::error!(error = %e, "commit failed: {n} writes refused");
                }
                Err((e, replies))
            }
        }
    }

    /// Whether a document whose pending count just grew by `added` to `pending` should be
    /// compacted: once it passes `max(compact_after, folded / 2)` (so the total compaction work
    /// stays linear in the document's history and a load applies at most a third of it as
    /// changes),
    /// and again every `compact_after` deltas in case a compaction was skipped.
    fn due(compact_after: i64, pending: i64, folded: i64, added: i64) -> bool {
        let threshold = compact_after.max(folded / 2);
        pending >= threshold && (pending - threshold) % compact_after < added
    }

    /// Writes a group in one transaction; returns the documents now due for compaction and how
    /// the row counts changed.
    fn apply(&mut self, writes: &[Write]) -> Result<(Vec<DocId>, CountDelta), StoreError> {
        let now = now_ms();
        let compact_after = self.compact_after;
        let tx = self.conn.transaction()?;
        let mut docs: BTreeMap<DocId, DocDelta> = BTreeMap::new();
        let mut origins: BTreeSet<NodeId> = BTreeSet::new();
        let mut due = Vec::new();
        let mut healed = Vec::new();
        let mut quarantined = Vec::new();
        let mut counted = CountDelta::default();
        let mut saved = BTreeMap::new();
        for write in writes {
            match write {
                Write::Deltas {
                    deltas,
                    heads,
                    snapshot,
                    ..
                } => {
                    if let Some((doc, bytes)) = snapshot {
                        saved.insert(*doc, bytes);
                    }
                    let mut ins = tx.prepare_cached(
                        "INSERT OR IGNORE INTO deltas
                             (origin, seq, doc, kind, change, received_at, prev, sig)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    )?;
                    for d in deltas.iter() {
                        let seq = i64::try_from(d.id.seq).map_err(|_| StoreError::Corrupt {
                            table: "deltas",
                            why: format!("seq {} out of range", d.id.seq),
                        })?;
                        let (kind, change) = match &d.body {
                            DeltaBody::Change(b) => (0, Some(b.as_slice())),
                            DeltaBody::Tombstone => (1, None),
                        };
                        let inserted = ins.execute(params![
                            d.id.origin.as_bytes().as_slice(),
                            seq,
                            d.doc.as_bytes().as_slice(),
                            kind,
                            change,
                            now,
                            d.auth.prev.as_slice(),
                            d.auth.sig.0.as_slice()
                        ])?;
                        if inserted == 1 {
                            counted.deltas += 1;
                            if self.damaged.contains(&d.id) {
                                tx.prepare_cached(
                                    "DELETE FROM damaged WHERE origin = ?1 AND seq = ?2",
                                )?
                                .execute(params![d.id.origin.as_bytes().as_slice(), seq])?;
                                healed.push(d.id);
                            }
                            self.clock.insert(d.id);
                            origins.insert(d.id.origin);
                            let e = docs.entry(d.doc).or_default();
                            e.pending += 1;
                            e.size += change.map_or(0, |c| c.len() as i64);
                            e.deleted |= kind == 1;
                        }
                    }
                    for (doc, h) in heads {
                        docs.entry(*doc).or_default().heads = Some(heads_to_bytes(h));
                    }
                }
                Write::Exec { sql, params } => {
                    tx.prepare_cached(sql)?
                        .execute(rusqlite::params_from_iter(params.iter()))?;
                }
                Write::Batch(stmts) => {
                    for (sql, params) in stmts {
                        tx.prepare_cached(sql)?
                            .execute(rusqlite::params_from_iter(params.iter()))?;
                    }
                }
                Write::Snapshot {
                    doc,
                    snapshot,
                    heads,
                    upto,
                } => {
                    if write_snapshot(&tx, *doc, snapshot, &heads_to_bytes(heads), *upto)? {
                        counted.snapshots += 1;
                    }
                }
                Write::DropSnapshot { doc } => {
                    let key = doc.as_bytes().as_slice();
                    counted.snapshots -=
                        tx.execute("DELETE FROM snapshots WHERE doc = ?1", [key])? as i64;
                    tx.execute(
                        "UPDATE documents SET snapshot_upto = 0, folded = 0,
                             pending = (SELECT count(*) FROM deltas WHERE doc = ?1),
                             size = (SELECT coalesce(sum(length(change)), 0) FROM deltas WHERE doc = ?1)
                         WHERE doc = ?1",
                        [key],
                    )?;
                }
                Write::Quarantine { deltas } => {
                    for super::Damage { id, why, .. } in deltas {
                        let origin = id.origin.as_bytes().as_slice();
                        let seq = i64::try_from(id.seq).unwrap_or(i64::MAX);
                        let moved = tx.execute(
                            "INSERT OR REPLACE INTO damaged (origin, seq, doc, change, found_at, why)
                             SELECT origin, seq, doc, change, ?3, ?4 FROM deltas
                             WHERE origin = ?1 AND seq = ?2",
                            params![origin, seq, now, why],
                        )?;
                        counted.deltas -= tx.execute(
                            "DELETE FROM deltas WHERE origin = ?1 AND seq = ?2",
                            params![origin, seq],
                        )? as i64;
                        if moved == 1 {
                            self.clock.remove(*id);
                            origins.insert(id.origin);
                            quarantined.push(*id);
                        }
                    }
                }
            }
        }
        {
            let mut upsert = tx.prepare_cached(
                "INSERT INTO documents (doc, created_at, updated_at, pending, size, deleted, heads)
                 VALUES (?1, ?4, ?4, ?2, ?3, ?5, coalesce(?6, x''))
                 ON CONFLICT (doc) DO UPDATE SET pending = pending + ?2, size = size + ?3,
                     updated_at = ?4, deleted = max(deleted, ?5), heads = coalesce(?6, heads)
                 RETURNING pending, folded",
            )?;
            let mut was = tx.prepare_cached("SELECT deleted FROM documents WHERE doc = ?1")?;
            for (doc, d) in &docs {
                let key = doc.as_bytes().as_slice();
                let before: Option<bool> = was.query_row([key], |r| r.get(0)).optional()?;
                match before {
                    None if !d.deleted => counted.documents += 1,
                    Some(false) if d.deleted => counted.documents -= 1,
                    _ => {}
                }
                let (pending, folded): (i64, i64) = upsert.query_row(
                    params![key, d.pending, d.size, now, d.deleted, d.heads],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                if d.pending > 0 && Self::due(compact_after, pending, folded, d.pending) {
                    due.push(*doc);
                }
            }
        }
        // Documents due that came with their whole state: that is their snapshot.
        if !saved.is_empty() {
            let mut last =
                tx.prepare_cached("SELECT coalesce(max(rowid), 0) FROM deltas WHERE doc = ?1")?;
            let mut rest = Vec::with_capacity(due.len());
            for doc in due {
                let heads = docs.get(&doc).and_then(|d| d.heads.as_deref());
                let Some((bytes, heads)) = saved.get(&doc).zip(heads) else {
                    rest.push(doc);
                    continue;
                };
                let upto: i64 = last.query_row([doc.as_bytes().as_slice()], |r| r.get(0))?;
                if write_snapshot(&tx, doc, bytes, heads, upto)? {
                    counted.snapshots += 1;
                }
            }
            due = rest;
        }
        {
            let mut clock = tx.prepare_cached(
                "INSERT OR REPLACE INTO clock (origin, prefix, extra) VALUES (?1, ?2, ?3)",
            )?;
            for origin in &origins {
                let Some(set) = self.clock.origin(origin) else {
                    // Its only delta was quarantined.
                    tx.execute(
                        "DELETE FROM clock WHERE origin = ?1",
                        [origin.as_bytes().as_slice()],
                    )?;
                    continue;
                };
                {
                    let extra =
                        postcard::to_allocvec(set.extra()).map_err(|e| StoreError::Corrupt {
                            table: "clock",
                            why: e.to_string(),
                        })?;
                    clock.execute(params![
                        origin.as_bytes().as_slice(),
                        set.prefix() as i64,
                        extra
                    ])?;
                }
            }
        }
        tx.commit()?;
        for id in &healed {
            self.damaged.remove(id);
            tracing::info!(origin = %id.origin.short(), seq = id.seq, "damaged delta replaced by a good copy");
        }
        self.damaged.extend(quarantined);
        Ok((due, counted))
    }
}

fn write_snapshot(
    tx: &Transaction<'_>,
    doc: DocId,
    snapshot: &[u8],
    heads: &[u8],
    upto: i64,
) -> Result<bool, StoreError> {
    let key = doc.as_bytes().as_slice();
    // Only move forward: a slower compaction of an older state must not replace a newer one.
    // Statements cached: after a bulk sync the compactor folds thousands of small documents.
    let moved = tx
        .prepare_cached(
            "UPDATE documents SET snapshot_upto = ?2,
             pending = (SELECT count(*) FROM deltas WHERE doc = ?1 AND rowid > ?2),
             folded = (SELECT count(*) FROM deltas WHERE doc = ?1 AND rowid <= ?2),
             size = ?3 + (SELECT coalesce(sum(length(change)), 0) FROM deltas WHERE doc = ?1 AND rowid > ?2)
         WHERE doc = ?1 AND snapshot_upto < ?2",
        )?
        .execute(params![key, upto, snapshot.len() as i64])?;
    if moved == 0 {
        return Ok(false);
    }
    let existed = tx
        .prepare_cached("SELECT 1 FROM snapshots WHERE doc = ?1")?
        .query_row([key], |_| Ok(()))
        .optional()?
        .is_some();
    tx.prepare_cached(
        "INSERT OR REPLACE INTO snapshots (doc, snapshot, heads) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![key, snapshot, heads])?;
    Ok(!existed)
}
