//! Change events: what subscribers see of every commit, local or remote, in commit order, and
//! the subscriptions that deliver them (never skipping silently).

use std::sync::Arc;

use automerge::{Automerge, ChangeHash, Patch, PatchLog};
use tandem_crdt::{DocId, Source};
use tokio::sync::broadcast;

use super::Node;
use crate::Error;

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
    /// `patches` says everything that changed. False when changes were stored without
    /// loading the document (a catch-up batch for a document nobody had open): re-read it.
    pub patched: bool,
    /// The document was deleted.
    pub deleted: bool,
    /// Damage was found in the stored document (why): it is unreadable until members send a
    /// good copy. `heads` and `patches` are empty then.
    pub damaged: Option<String>,
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
    /// Only from [`crate::client::Daemon`]: the daemon restarted, and the events made before
    /// the restart that this stream had not received are gone; re-read the documents.
    #[error("the daemon restarted; events from before the restart are gone")]
    Restarted,
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

impl Node {
    /// Subscribes to changes of one document (`Some`) or all (`None`).
    pub fn subscribe(&self, doc: Option<DocId>) -> Result<Subscription, Error> {
        let ev = self.inner.events.lock().map_err(|_| Error::Closed)?;
        let tx = ev.as_ref().ok_or(Error::Closed)?;
        Ok(Subscription {
            rx: tx.subscribe(),
            doc,
        })
    }

    pub(super) fn event_sender(&self) -> Option<broadcast::Sender<Arc<Event>>> {
        self.inner
            .events
            .lock()
            .ok()
            .and_then(|e| e.as_ref().filter(|tx| tx.receiver_count() > 0).cloned())
    }

    /// A patch log for applying changes: recording only if `wanted` (someone listens).
    pub(super) fn patch_log(wanted: bool) -> PatchLog {
        if wanted {
            PatchLog::active()
        } else {
            PatchLog::inactive()
        }
    }

    /// Whether anyone listens for events (then local changes log their patches as they are
    /// made: a diff afterwards would walk the whole document).
    pub(super) fn listening(&self) -> bool {
        self.event_sender().is_some()
    }

    /// The event for a local change that left the document at its current heads, if anyone
    /// listens; `patches` are asked for only then.
    pub(super) fn local_event(
        &self,
        doc: DocId,
        am: &Automerge,
        deleted: bool,
        patches: impl FnOnce() -> Vec<Patch>,
    ) -> Option<Event> {
        self.event_sender().map(|_| Event {
            doc,
            source: Source::Local,
            patches: if deleted { Vec::new() } else { patches() },
            patched: true,
            heads: am.get_heads(),
            deleted,
            damaged: None,
        })
    }
}
