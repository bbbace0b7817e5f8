//! The compactor thread: folds a document's deltas into an Automerge snapshot, so opening the
//! document costs about one snapshot load however many deltas it has. It reads through the read
//! pool (a consistent WAL snapshot) and hands the result to the writer, which applies it only if
//! nothing newer was recorded meanwhile. Delta rows stay: peers may still need them.

use std::collections::BTreeSet;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use rusqlite::{OptionalExtension, params};
use tandem_crdt::DocId;
use tandem_crdt::delta::contain;

use super::writer::Request;
use super::{ReadPool, StoreError, Write};

/// How long no document may become due before compaction starts.
const QUIET: Duration = Duration::from_millis(200);
/// The longest compaction waits for a quiet moment. Long enough that a bulk catch-up (a long
/// history arriving for seconds on end) is not slowed by folding what is still arriving: on two
/// cores a fold forced after 2 s made one 262,961-change catch-up a third slower.
const MAX_DELAY: Duration = Duration::from_secs(10);

pub(super) struct Compactor {
    readers: Arc<ReadPool>,
    writer: mpsc::Sender<Request>,
}

impl Compactor {
    pub(super) fn new(readers: Arc<ReadPool>, writer: mpsc::Sender<Request>) -> Self {
        Self { readers, writer }
    }

    pub(super) fn run(self, rx: mpsc::Receiver<DocId>) {
        while let Ok(first) = rx.recv() {
            // Debounce: a burst of writes keeps making documents due; compacting in the middle
            // of it would redo the same work and steal CPU from the writers. Wait until writes
            // pause (or a bounded time passes), then fold each due document once.
            let mut docs = BTreeSet::from([first]);
            let started = Instant::now();
            while started.elapsed() < MAX_DELAY {
                match rx.recv_timeout(QUIET) {
                    Ok(doc) => {
                        docs.insert(doc);
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => break,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            for doc in docs {
                match self.readers.with(|conn| fold(conn, doc)) {
                    Ok(Some(write)) => {
                        let (reply, _ignored) = tokio::sync::oneshot::channel();
                        if self.writer.send(Request::Write { write, reply }).is_err() {
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(%doc, error = %e, "compaction failed; deltas stay as they are")
                    }
                }
            }
        }
    }
}

/// Builds the snapshot write for `doc`, or `None` if there is nothing to fold.
pub(super) fn fold(conn: &rusqlite::Connection, doc: DocId) -> Result<Option<Write>, StoreError> {
    // One WAL snapshot for the snapshot row and the deltas after it.
    let read = super::in_read_tx(conn, |conn| {
        let key = doc.as_bytes().as_slice();
        let row: Option<(Option<Vec<u8>>, i64)> = conn
            .prepare_cached(super::SNAPSHOT_ROW)?
            .query_row([key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((snapshot, upto)) = row else {
            return Ok(None);
        };
        let mut stmt = conn.prepare_cached(
            "SELECT rowid, change FROM deltas WHERE doc = ?1 AND rowid > ?2 ORDER BY rowid",
        )?;
        let mut rows = stmt.query(params![key, upto])?;
        let mut last = upto;
        let mut changes = Vec::new();
        while let Some(r) = rows.next()? {
            last = r.get(0)?;
            if let Some(bytes) = r.get::<_, Option<Vec<u8>>>(1)? {
                changes.push(bytes);
            }
        }
        Ok((last != upto).then_some((snapshot, changes, last)))
    })?;
    let Some((snapshot, changes, last)) = read else {
        return Ok(None);
    };
    let corrupt = |why: String| StoreError::Corrupt {
        table: "documents",
        why,
    };
    // Automerge on bytes from the disk is contained: a panic must not end this thread.
    let mut am = match &snapshot {
        Some(bytes) => contain(|| automerge::Automerge::load(bytes))
            .map_err(corrupt)?
            .map_err(|e| corrupt(e.to_string()))?,
        None => automerge::Automerge::new(),
    };
    // Each change is checked as it is parsed: damage folded into a snapshot could never be
    // found again; the next load of the document quarantines it instead.
    super::apply_stored(&mut am, changes.iter().map(Vec::as_slice)).map_err(corrupt)?;
    if !automerge::ReadDoc::get_missing_deps(&am, &[]).is_empty() {
        // Some change waits for a dependency not received yet; a snapshot would drop it.
        tracing::trace!(%doc, "not compacting: changes wait for missing dependencies");
        return Ok(None);
    }
    let snapshot = am.save();
    tracing::trace!(%doc, bytes = snapshot.len(), "compacted");
    Ok(Some(Write::Snapshot {
        doc,
        snapshot,
        heads: am.get_heads(),
        upto: last,
    }))
}
