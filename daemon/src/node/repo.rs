//! Automerge's sync protocol between this node and a local app (automerge-repo, through the
//! API's `/v1/automerge-repo` endpoint): sync messages applied to and generated from this
//! node's documents. Changes an app sends become this node's deltas, durable before the call
//! returns, and travel to every member like any local write.

use automerge::sync::{Message, State, SyncDoc};
use automerge::{Automerge, AutomergeError, Change, PatchLog};
use tandem_crdt::DocId;
use tandem_crdt::delta::contain;

use super::Node;
use super::docs::change_bodies;
use crate::Error;
use crate::error::DocError;

/// An app's sync conversation about one document: Automerge's sync state, and while this node
/// does not have the document, an empty stand-in for it. The app's changes create it here.
#[derive(Default)]
pub struct AppSync {
    state: State,
    stand_in: Option<Automerge>,
}

fn bad(e: impl std::fmt::Display) -> Error {
    Error::Doc(DocError::BadSyncMessage(e.to_string()))
}

impl AppSync {
    /// Whether this conversation already holds a document the node does not have yet.
    pub fn waiting_for_changes(&self) -> bool {
        self.stand_in.is_some()
    }
}

impl Node {
    /// Whether this node has `doc` (not deleted).
    pub async fn has(&self, doc: DocId) -> Result<bool, Error> {
        match self.heads(doc).await {
            Ok(_) => Ok(true),
            Err(Error::Doc(DocError::NotFound(_))) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Applies an app's sync message for `doc`; returns whether this node has the document
    /// now. A document this node lacks is created, under the app's id, from the first message
    /// that carries changes; until then the conversation runs on an empty stand-in.
    pub async fn receive_app_sync(
        &self,
        doc: DocId,
        sync: &mut AppSync,
        message: &[u8],
    ) -> Result<bool, Error> {
        let message = Message::decode(message).map_err(bad)?;
        if sync.stand_in.is_none() && self.has(doc).await? {
            self.apply_sync(doc, &mut sync.state, message).await?;
            return Ok(true);
        }
        let stand_in = sync.stand_in.get_or_insert_with(Automerge::new);
        contain(|| stand_in.receive_sync_message(&mut sync.state, message))
            .map_err(bad)?
            .map_err(bad)?;
        let changes: Vec<Change> = stand_in.get_changes(&[]);
        if changes.is_empty() {
            return Ok(false);
        }
        sync.stand_in = None;
        self.merge_changes(doc, changes).await?;
        Ok(true)
    }

    /// The next sync message for an app about `doc`, if it lacks anything or has not heard
    /// this node's heads.
    pub async fn app_sync_message(
        &self,
        doc: DocId,
        sync: &mut AppSync,
    ) -> Result<Option<Vec<u8>>, Error> {
        let msg = match &sync.stand_in {
            Some(am) => am.generate_sync_message(&mut sync.state),
            None => {
                self.read(doc, |am| Ok(am.generate_sync_message(&mut sync.state)))
                    .await?
            }
        };
        Ok(msg.map(Message::encode))
    }

    /// Receives a sync message into the loaded document; the changes it added become this
    /// node's deltas.
    async fn apply_sync(
        &self,
        doc: DocId,
        state: &mut State,
        message: Message,
    ) -> Result<(), Error> {
        self.absorb(doc, |am, log| {
            am.receive_sync_message_log_patches(state, message, log)
        })
        .await
    }

    /// Adds changes made elsewhere to `doc`, creating it under that id if this node lacks it.
    async fn merge_changes(&self, doc: DocId, changes: Vec<Change>) -> Result<(), Error> {
        if self.has(doc).await? {
            return self
                .absorb(doc, |am, log| am.apply_changes_log_patches(changes, log))
                .await;
        }
        let bodies = change_bodies(&changes);
        let mut am = Automerge::new();
        contain(|| am.apply_changes(changes))
            .map_err(bad)?
            .map_err(bad)?;
        am.set_actor(self.inner.actor.clone());
        self.commit_new(doc, am, bodies, None).await
    }

    /// Runs `f` on the loaded document (changes from elsewhere going in) and commits what it
    /// added as this node's deltas. If `f` fails or panics the document is dropped from memory
    /// (reloaded from the store on its next read, not served half-changed).
    async fn absorb(
        &self,
        doc: DocId,
        f: impl FnOnce(&mut Automerge, &mut PatchLog) -> Result<(), AutomergeError>,
    ) -> Result<(), Error> {
        let entry = self.entry(doc).await?;
        let pending = {
            let mut st = entry.lock().ok_or(Error::Doc(DocError::NotFound(doc)))?;
            if st.deleted {
                return Err(Error::Doc(DocError::Deleted(doc)));
            }
            let before = st.am.get_heads();
            let mut log = Self::patch_log(self.listening());
            let applied = contain(|| f(&mut st.am, &mut log));
            if let Err(e) = applied.map_err(bad).and_then(|r| r.map_err(bad)) {
                drop(st);
                self.cache().discard(Some(doc));
                return Err(e);
            }
            if st.am.get_heads() == before {
                return Ok(());
            }
            let bodies = change_bodies(&st.am.get_changes(&before));
            let event = self.local_event(doc, &st.am, false, || st.am.make_patches(&mut log));
            self.commit_local(doc, bodies, st.am.get_heads(), event, entry.clone(), None)
        };
        pending.wait().await
    }
}
