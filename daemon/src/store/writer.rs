//! The writer thread: owns the write connection and does group commit. It takes every request
//! already queued (up to a bound), writes them in one transaction, commits once (one fsync), and
//! only then answers each caller. After a failed commit it refuses all later writes: its view of
//! the clock can no longer be trusted, and reopening recovers from what is on disk.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use rusqlite::{Connection, Transaction, params};
use tandem_crdt::{DeltaBody, DocId, NodeId, VersionVector};
use tokio::sync::oneshot;

use super::{StoreError, Write, heads_to_bytes, now_ms};

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

pub(super) struct Writer {
    stats: Arc<WriterStats>,
    /// The clock of what is committed, shared with readers.
    committed: Arc<std::sync::Mutex<VersionVector>>,
    conn: Connection,
    clock: VersionVector,
    compact: mpsc::Sender<DocId>,
    compact_after: i64,
    failed: Option<String>,
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
        clock: VersionVector,
        compact: mpsc::Sender<DocId>,
        compact_after: i64,
        stats: Arc<WriterStats>,
        committed: Arc<std::sync::Mutex<VersionVector>>,
    ) -> Self {
        Self {
            stats,
            committed,
            conn,
            clock,
            compact,
            compact_after: compact_after.max(1),
            failed: None,
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
            self.commit_group(group);
        }
        tracing::debug!("writer stopped");
    }

    fn commit_group(&mut self, group: Vec<(Write, oneshot::Sender<Result<(), StoreError>>)>) {
        if let Some(why) = &self.failed {
            for (_, reply) in group {
                let _ = reply.send(Err(StoreError::CommitFailed(why.clone())));
            }
            return;
        }
        let (writes, replies): (Vec<_>, Vec<_>) = group.into_iter().unzip();
        let started = Instant::now();
        let result = self.apply(&writes);
        let n = replies.len();
        self.stats
            .record_commit(n, started.elapsed().as_micros() as u64);
        match result {
            Ok(to_compact) => {
                tracing::trace!(requests = n, "group committed");
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
            }
            Err(e) => {
                let why = e.to_string();
                tracing::error!(error = %why, "commit failed; refusing further writes");
                self.clock = self
                    .committed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                self.failed = Some(why.clone());
                for reply in replies {
                    let _ = reply.send(Err(StoreError::CommitFailed(why.clone())));
                }
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

    /// Writes a group in one transaction; returns the documents now due for compaction.
    fn apply(&mut self, writes: &[Write]) -> Result<Vec<DocId>, StoreError> {
        let now = now_ms();
        let compact_after = self.compact_after;
        let tx = self.conn.transaction()?;
        let mut docs: BTreeMap<DocId, DocDelta> = BTreeMap::new();
        let mut origins: BTreeSet<NodeId> = BTreeSet::new();
        let mut due = Vec::new();
        for write in writes {
            match write {
                Write::Deltas { deltas, heads, .. } => {
                    let mut ins = tx.prepare_cached(
                        "INSERT OR IGNORE INTO deltas (origin, seq, doc, kind, change, received_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
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
                            now
                        ])?;
                        if inserted == 1 {
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
                Write::Snapshot {
                    doc,
                    snapshot,
                    heads,
                    upto,
                } => write_snapshot(&tx, *doc, snapshot, heads, *upto)?,
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
            for (doc, d) in &docs {
                let key = doc.as_bytes().as_slice();
                let (pending, folded): (i64, i64) = upsert.query_row(
                    params![key, d.pending, d.size, now, d.deleted, d.heads],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                if d.pending > 0 && Self::due(compact_after, pending, folded, d.pending) {
                    due.push(*doc);
                }
            }
            let mut clock = tx.prepare_cached(
                "INSERT OR REPLACE INTO clock (origin, prefix, extra) VALUES (?1, ?2, ?3)",
            )?;
            for origin in &origins {
                if let Some(set) = self.clock.origin(origin) {
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
        Ok(due)
    }
}

fn write_snapshot(
    tx: &Transaction<'_>,
    doc: DocId,
    snapshot: &[u8],
    heads: &[automerge::ChangeHash],
    upto: i64,
) -> Result<(), StoreError> {
    let heads = heads_to_bytes(heads);
    let key = doc.as_bytes().as_slice();
    // Only move forward: a slower compaction of an older state must not replace a newer one.
    let moved = tx.execute(
        "UPDATE documents SET snapshot_upto = ?2,
             pending = (SELECT count(*) FROM deltas WHERE doc = ?1 AND rowid > ?2),
             folded = (SELECT count(*) FROM deltas WHERE doc = ?1 AND rowid <= ?2),
             size = ?3 + (SELECT coalesce(sum(length(change)), 0) FROM deltas WHERE doc = ?1 AND rowid > ?2)
         WHERE doc = ?1 AND snapshot_upto < ?2",
        params![key, upto, snapshot.len() as i64],
    )?;
    if moved == 1 {
        tx.execute(
            "INSERT OR REPLACE INTO snapshots (doc, snapshot, heads) VALUES (?1, ?2, ?3)",
            params![key, snapshot, heads],
        )?;
    }
    Ok(())
}
