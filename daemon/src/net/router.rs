//! The stream router of a member connection. Every stream opens with one stream-kind byte
//! (`StreamKind`); the router reads it and hands the stream to its layer: the sync stream and
//! the peer's push stream to the session, each Raft stream (one RPC) to the node's consensus.
//! Unknown kinds are refused stream by stream, so a newer peer's extra streams do not break
//! sync; a second sync or push stream is a protocol error. Nothing depends on the order
//! streams open.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_crdt::NodeId;
use tandem_crdt::proto::{RaftMsg, StreamKind};
use tokio::sync::oneshot;

use super::{NetHost, close, wire};

/// Stream-level error code for a refused stream.
const REFUSED: u32 = 1;

/// The streams the session waits for.
pub(crate) struct Routes {
    pub(crate) sync: oneshot::Receiver<(quinn::SendStream, quinn::RecvStream)>,
    pub(crate) push: oneshot::Receiver<quinn::RecvStream>,
}

#[derive(Default)]
struct Slots {
    sync: Option<oneshot::Sender<(quinn::SendStream, quinn::RecvStream)>>,
    push: Option<oneshot::Sender<quinn::RecvStream>>,
}

/// Starts routing the streams `peer` opens on `conn`; ends with the connection.
pub(crate) fn spawn(
    conn: quinn::Connection,
    peer: NodeId,
    host: Arc<dyn NetHost>,
    gossip: tokio::sync::mpsc::Sender<(NodeId, bytes::Bytes)>,
) -> Routes {
    let (sync_tx, sync) = oneshot::channel();
    let (push_tx, push) = oneshot::channel();
    let slots = Arc::new(Mutex::new(Slots {
        sync: Some(sync_tx),
        push: Some(push_tx),
    }));
    // Datagrams are gossip (the state machine checks the tag and the claimed identity); a full
    // queue drops them, as the network might.
    let (d, gossip) = (conn.clone(), gossip.clone());
    tokio::spawn(async move {
        while let Ok(data) = d.read_datagram().await {
            let _ = gossip.try_send((peer, data));
        }
    });
    let (c, s, h) = (conn.clone(), slots.clone(), host.clone());
    tokio::spawn(async move {
        while let Ok((send, recv)) = c.accept_bi().await {
            tokio::spawn(route(
                c.clone(),
                peer,
                Some(send),
                recv,
                s.clone(),
                h.clone(),
            ));
        }
    });
    tokio::spawn(async move {
        while let Ok(recv) = conn.accept_uni().await {
            tokio::spawn(route(
                conn.clone(),
                peer,
                None,
                recv,
                slots.clone(),
                host.clone(),
            ));
        }
    });
    Routes { sync, push }
}

async fn route(
    conn: quinn::Connection,
    peer: NodeId,
    send: Option<quinn::SendStream>,
    mut recv: quinn::RecvStream,
    slots: Arc<Mutex<Slots>>,
    host: Arc<dyn NetHost>,
) {
    let mut kind = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut kind)).await {
        Ok(Ok(())) => {}
        _ => {
            let _ = recv.stop(REFUSED.into());
            return;
        }
    }
    let kind = StreamKind::from_byte(kind[0]);
    tracing::trace!(peer = %peer.short(), ?kind, bi = send.is_some(), "stream opened");
    let send = match (kind, send) {
        (Some(StreamKind::Raft), Some(send)) => return serve_raft(peer, send, recv, host).await,
        (_, send) => send,
    };
    let mut slots = slots.lock().unwrap_or_else(|p| p.into_inner());
    match (kind, send) {
        (Some(StreamKind::Sync), Some(send)) => match slots.sync.take() {
            Some(tx) => {
                let _ = tx.send((send, recv));
            }
            None => conn.close(close::PROTOCOL.into(), b"a second sync stream"),
        },
        (Some(StreamKind::Push), None) => match slots.push.take() {
            Some(tx) => {
                let _ = tx.send(recv);
            }
            None => conn.close(close::PROTOCOL.into(), b"a second push stream"),
        },
        (kind, send) => {
            // On the wrong kind of stream, or unknown: refuse this stream only.
            tracing::debug!(peer = %peer.short(), ?kind, "stream refused");
            let _ = recv.stop(REFUSED.into());
            if let Some(mut send) = send {
                let _ = send.reset(REFUSED.into());
            }
        }
    }
}

/// One Raft RPC: the request, the consensus's answer, done. A request that does not arrive
/// within 10 s, or does not decode, ends this stream only.
async fn serve_raft(
    peer: NodeId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    host: Arc<dyn NetHost>,
) {
    let req = tokio::time::timeout(Duration::from_secs(10), wire::read::<RaftMsg>(&mut recv)).await;
    let Ok(Ok(Some((msg, _)))) = req else {
        tracing::debug!(peer = %peer.short(), "bad raft request");
        let _ = recv.stop(REFUSED.into());
        let _ = send.reset(REFUSED.into());
        return;
    };
    let reply = host.raft(peer, msg).await;
    if wire::write(&mut send, &reply).await.is_ok() {
        let _ = send.finish();
    }
}
