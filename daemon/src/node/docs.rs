//! The document methods: loading (snapshot plus later changes, behind the cache), reading and
//! editing by JSON Pointer or Automerge transaction, history, export and import.

use std::sync::{Arc, Mutex};

use automerge::transaction::Transaction;
use automerge::{Automerge, ChangeHash};
use serde_json::Value as Json;
use tandem_crdt::delta::{check_change_bytes, contain};
use tandem_crdt::{DeltaBody, DocId, NodeId, Pointer, actor_id, pointer};

use super::Node;
use crate::Error;
use crate::cache::{DocEntry, DocState};
use crate::error::DocError;
use crate::store::{self, Damage, DocInfo};

/// One change in a document's history.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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

/// Changes as the bodies of this node's deltas.
pub(super) fn change_bodies<'a>(
    changes: impl IntoIterator<Item = &'a automerge::Change>,
) -> Vec<DeltaBody> {
    changes
        .into_iter()
        .map(|c| DeltaBody::Change(c.raw_bytes().to_vec()))
        .collect()
}

/// The changes of `doc` whose bytes are damaged, with why.
fn damage_in(doc: DocId, changes: &[(tandem_crdt::DeltaId, Vec<u8>)]) -> Vec<Damage> {
    changes
        .iter()
        .filter_map(|(id, bytes)| {
            check_change_bytes(bytes)
                .err()
                .map(|why| Damage { id: *id, doc, why })
        })
        .collect()
}

impl Node {
    /// Commit options for a local change: stamped with the wall-clock time in Unix seconds, as
    /// automerge-js does.
    fn commit_options(&self) -> automerge::transaction::CommitOptions {
        let secs = self.inner.clock.wall_ms().div_euclid(1000);
        automerge::transaction::CommitOptions::default().with_time(secs)
    }

    /// Loads (or finds) a document.
    pub(super) async fn entry(&self, doc: DocId) -> Result<Arc<DocEntry>, Error> {
        self.load_entry(doc, false).await
    }

    /// Loads (or finds) a document, or starts it empty if the store has none: for changes
    /// received for a document new here.
    pub(super) async fn entry_or_new(&self, doc: DocId) -> Result<Arc<DocEntry>, Error> {
        self.load_entry(doc, true).await
    }

    async fn load_entry(&self, doc: DocId, create: bool) -> Result<Arc<DocEntry>, Error> {
        let entry = self.cache().get_or_insert(doc);
        let waiting = entry.clone();
        let loaded = entry
            .cell()
            .get_or_try_init(|| async move {
                // Received changes on their way to disk without a load land first.
                waiting.before_load().await;
                match self.load_state(doc, create).await? {
                    Some(state) => Ok(Mutex::new(state)),
                    None if create => Ok(Mutex::new(DocState {
                        am: Automerge::new().with_actor(self.inner.actor.clone()),
                        deleted: false,
                    })),
                    None => Err(Error::Doc(DocError::NotFound(doc))),
                }
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

    /// Reads a document from the store: its snapshot, then the changes after it, each checked
    /// against its checksum as it is parsed. Damage is this document's, reported and healed,
    /// never the node's end and never served: a damaged change is quarantined (members send a
    /// good copy) and the document refused until then; a damaged snapshot is dropped and the
    /// document rebuilt from its deltas. `None` if the store has never seen it.
    async fn load_state(&self, doc: DocId, may_be_new: bool) -> Result<Option<DocState>, Error> {
        let store = &self.inner.store;
        let mut dropped_snapshot = false;
        loop {
            // On this thread, as the Automerge load after it: a few indexed rows, where the hop
            // to the blocking pool and back cost more than the read (reading every document
            // after a 10k sync, once compacted: 0.28 -> 0.23 ms each, CPU 0.24 -> 0.17 ms).
            let Some(stored) = store.read_blocking(move |c| store::load_doc(c, doc, may_be_new))?
            else {
                return Ok(None);
            };
            if stored.damaged > 0 {
                let bad = damage_in(doc, &stored.changes);
                let deltas = stored.damaged + bad.len() as u64;
                self.quarantine(bad).await?;
                return Err(Error::Doc(DocError::Damaged { doc, deltas }));
            }
            let corrupt = |why: String| {
                tracing::error!(%doc, %why, "stored document cannot be loaded");
                Error::Doc(DocError::Corrupt { doc, why })
            };
            // Automerge on bytes from the disk: an error or even a panic is this document's
            // damage, never the node's end.
            let mut am = match &stored.snapshot {
                None => Automerge::new(),
                Some(bytes) => match contain(|| Automerge::load(bytes)) {
                    Ok(Ok(am)) => am,
                    Ok(Err(e)) if !dropped_snapshot => {
                        self.drop_snapshot(doc, &e.to_string()).await?;
                        dropped_snapshot = true;
                        continue;
                    }
                    Err(panic) if !dropped_snapshot => {
                        self.drop_snapshot(doc, &format!("automerge panicked: {panic}"))
                            .await?;
                        dropped_snapshot = true;
                        continue;
                    }
                    Ok(Err(e)) => return Err(corrupt(e.to_string())),
                    Err(panic) => return Err(corrupt(format!("automerge panicked: {panic}"))),
                },
            };
            if let Err(why) =
                store::apply_stored(&mut am, stored.changes.iter().map(|(_, b)| b.as_slice()))
            {
                // Which changes are damaged (their bytes, not Automerge's view of them)?
                let bad = damage_in(doc, &stored.changes);
                if bad.is_empty() {
                    return Err(corrupt(why));
                }
                let deltas = bad.len() as u64;
                self.quarantine(bad).await?;
                return Err(Error::Doc(DocError::Damaged { doc, deltas }));
            }
            am.set_actor(self.inner.actor.clone());
            tracing::trace!(%doc, "document loaded");
            return Ok(Some(DocState {
                am,
                deleted: stored.deleted,
            }));
        }
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
            let mut st = entry.lock().ok_or(Error::Doc(DocError::NotFound(doc)))?;
            if st.deleted {
                return Err(Error::Doc(DocError::Deleted(doc)));
            }
            let before = st.am.get_heads();
            let listening = self.listening();
            let mut done = if listening {
                st.am
                    .transact_and_log_patches_with(|_| self.commit_options(), f)
            } else {
                st.am.transact_with(|_| self.commit_options(), f)
            }
            .map_err(|fail| fail.error)?;
            let out = done.result;
            if st.am.get_heads() == before {
                return Ok(out);
            }
            let patches = if listening {
                st.am.make_patches(&mut done.patch_log)
            } else {
                Vec::new()
            };
            let change = st.am.get_last_local_change().ok_or_else(|| {
                Error::Doc(DocError::Corrupt {
                    doc,
                    why: "commit made no local change".into(),
                })
            })?;
            (
                out,
                self.commit_change(doc, &st.am, patches, &change, entry.clone()),
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
            return Err(Error::Doc(DocError::NotAnObject(
                tandem_crdt::json::json_type(v),
            )));
        }
        let doc = DocId::from_bytes(rand::random());
        let mut am = Automerge::new().with_actor(self.inner.actor.clone());
        if let Some(value) = &initial {
            am.transact_with(
                |_| self.commit_options(),
                |tx| pointer::put(tx, &Pointer::root(), value),
            )
            .map_err(|f| f.error)?;
        }
        if am.get_heads().is_empty() {
            // Empty (`None` or `{}`): the document still needs a first change to exist.
            am.empty_commit(self.commit_options());
        }
        let change = am.get_last_local_change().ok_or_else(|| {
            Error::Doc(DocError::Corrupt {
                doc,
                why: "no initial change".into(),
            })
        })?;
        let body = DeltaBody::Change(change.raw_bytes().to_vec());
        self.commit_new(doc, am, vec![body], None).await?;
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
            let mut st = entry.lock().ok_or(Error::Doc(DocError::NotFound(doc)))?;
            if st.deleted {
                return Ok(());
            }
            st.deleted = true;
            let heads = st.am.get_heads();
            let event = self.local_event(doc, &st.am, true, Vec::new);
            self.commit_local(
                doc,
                vec![DeltaBody::Tombstone],
                heads,
                event,
                entry.clone(),
                None,
            )
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
        let st = entry.lock().ok_or(Error::Doc(DocError::NotFound(doc)))?;
        if st.deleted {
            return Err(Error::Doc(DocError::Deleted(doc)));
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
    /// error is [`Error::Doc(DocError::TextReplaced)`].
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
            let mut st = entry.lock().ok_or(Error::Doc(DocError::NotFound(doc)))?;
            if st.deleted {
                return Err(Error::Doc(DocError::Deleted(doc)));
            }
            let mut fork = st
                .am
                .fork_at(base)
                .map_err(|e| Error::Doc(DocError::BadBase(e.to_string())))?;
            // The edit lands on the text object the editing began with; if the path now holds
            // another object (or nothing), the edit would vanish in the merge: refuse it.
            let then = pointer::text_at(&fork, &ptr)?;
            if pointer::text_at(&st.am, &ptr).ok() != Some(then) {
                return Err(Error::Doc(DocError::TextReplaced(ptr.to_string())));
            }
            // A fresh actor: this node's own actor may have moved on since `base`, and two
            // changes with one actor and one sequence number cannot both exist.
            fork.set_actor(actor_id(&self.inner.identity.id(), rand::random()));
            fork.transact_with(
                |_| self.commit_options(),
                |tx| pointer::update_text(tx, &ptr, text),
            )
            .map_err(|f| f.error)?;
            let Some(change) = fork.get_last_local_change() else {
                return Ok(()); // the text is what it was at `base`
            };
            let mut log = Self::patch_log(self.listening());
            st.am
                .apply_changes_log_patches([change.clone()], &mut log)?;
            let patches = st.am.make_patches(&mut log);
            self.commit_change(doc, &st.am, patches, &change, entry.clone())
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
        let mut am = contain(|| Automerge::load(bytes))
            .map_err(|p| Error::Doc(DocError::CorruptImport(format!("automerge panicked: {p}"))))?
            .map_err(|e| Error::Doc(DocError::CorruptImport(e.to_string())))?;
        let changes = am.get_changes(&[]);
        if changes.is_empty() {
            return Err(Error::Doc(DocError::CorruptImport(
                "the file holds no changes".into(),
            )));
        }
        if !automerge::ReadDoc::get_missing_deps(&am, &[]).is_empty() {
            return Err(Error::Doc(DocError::CorruptImport(
                "the file lacks changes that others depend on".into(),
            )));
        }
        let bodies = change_bodies(&changes);
        am.set_actor(self.inner.actor.clone());
        let doc = DocId::from_bytes(rand::random());
        // The file is the document's whole state: its snapshot, so a long history is not
        // rebuilt change by change to compact it.
        self.commit_new(doc, am, bodies, Some(bytes.to_vec()))
            .await?;
        Ok(doc)
    }
}
