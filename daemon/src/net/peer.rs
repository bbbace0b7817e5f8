//! One sync session on one connection. Both sides send Hello (version, id, clock) on a bi
//! stream, then each streams what the other lacks in `(origin, seq)` order in bounded batches,
//! at most [`WINDOW`] unacknowledged, and the receiver stores each batch in one transaction
//! before acknowledging it. Live deltas go on a separate uni stream per direction, filtered by
//! what the peer is known to hold, so steady state sends nothing twice. A slow peer only fills
//! its own bounded queues; falling behind the push feed turns into a catch-up from the store.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_crdt::{CatchUp, Delta, NodeId, PeerSync};
use tokio::sync::{Semaphore, broadcast, mpsc};

use super::wire::{self, BATCH_BYTES, Msg, PROTOCOL_VERSION};
use crate::node::Node;
use crate::store::now_ms;

/// Unacknowledged catch-up batches allowed in flight.
const WINDOW: usize = 4;

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("frame: {0}")]
    Wire(#[from] wire::WireError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("node: {0}")]
    Node(String),
}

struct Shared {
    node: Node,
    peer: NodeId,
    /// What the peer holds, as far as we know, and the decisions that follow.
    sync: Mutex<PeerSync>,
}

impl Shared {
    fn sync(&self) -> std::sync::MutexGuard<'_, PeerSync> {
        self.sync.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records deltas that crossed the connection either way: the peer holds them now.
    fn note(&self, deltas: &[Delta], bytes: usize, sent: bool) {
        self.sync().note(deltas);
        if let Some(net) = self.node.net() {
            net.count(&self.peer, |s| {
                let (n, b) = if sent {
                    (&mut s.deltas_sent, &mut s.bytes_sent)
                } else {
                    s.last_seen = Some(now_ms());
                    (&mut s.deltas_received, &mut s.bytes_received)
                };
                *n += deltas.len() as u64;
                *b += bytes as u64;
            });
        }
        if sent {
            self.update_in_sync();
        }
    }

    fn note_sent(&self, deltas: &[Delta], bytes: usize) {
        self.note(deltas, bytes, true);
    }

    fn note_received(&self, deltas: &[Delta], bytes: usize) {
        self.note(deltas, bytes, false);
    }

    /// The next batch of `plan` from the store (on a blocking thread).
    async fn next_batch(
        &self,
        plan: &mut Option<CatchUp>,
    ) -> Result<Option<Vec<Delta>>, SessionError> {
        let Some(mut p) = plan.take() else {
            return Ok(None);
        };
        let node = self.node.clone();
        let (p, batch) = tokio::task::spawn_blocking(move || {
            let r = node.load_batch(&mut p, BATCH_BYTES);
            (p, r)
        })
        .await
        .map_err(|e| SessionError::Node(e.to_string()))?;
        *plan = Some(p);
        batch.map_err(|e| SessionError::Node(e.to_string()))
    }

    fn update_in_sync(&self) {
        let clock = self.node.clock();
        let in_sync = self.sync().in_sync(&clock);
        if let Some(net) = self.node.net() {
            net.count(&self.peer, |s| {
                s.in_sync = in_sync;
                s.in_sync_at = clock.count();
            });
        }
    }

    async fn receive(&self, deltas: Vec<Delta>, bytes: usize) -> Result<(), SessionError> {
        self.note_received(&deltas, bytes);
        // In its own task: if this session is torn down meanwhile, the deltas still get
        // committed *and* applied to loaded documents and announced, never half of it.
        let node = self.node.clone();
        let peer = self.peer;
        tokio::spawn(async move { node.apply_remote(peer, deltas).await })
            .await
            .map_err(|e| SessionError::Node(e.to_string()))?
            .map_err(|e| SessionError::Node(e.to_string()))?;
        self.update_in_sync();
        Ok(())
    }
}

/// Runs the session until the connection ends or the peer breaks the protocol.
pub(crate) async fn session(
    node: &Node,
    conn: &quinn::Connection,
    peer: NodeId,
    dialed: bool,
) -> Result<(), SessionError> {
    let (mut send, mut recv) = if dialed {
        conn.open_bi().await?
    } else {
        tokio::time::timeout(Duration::from_secs(10), conn.accept_bi())
            .await
            .map_err(|_| SessionError::Protocol("no sync stream within 10 s".into()))??
    };
    // Subscribe before reading our clock: whatever commits after this is pushed, whatever
    // committed before is in the clock and goes by catch-up.
    let pushes = node.subscribe_pushes();
    let hello = Msg::Hello {
        version: PROTOCOL_VERSION,
        node: node.id(),
        name: node.name().to_string(),
        clock: node.clock(),
    };
    let sent = wire::write(&mut send, &hello).await?;
    let their_clock =
        match tokio::time::timeout(Duration::from_secs(10), wire::read(&mut recv)).await {
            Err(_) => return Err(SessionError::Protocol("no Hello within 10 s".into())),
            Ok(r) => match r? {
                Some((
                    Msg::Hello {
                        version,
                        node: id,
                        name,
                        clock,
                    },
                    n,
                )) => {
                    if version != PROTOCOL_VERSION {
                        return Err(SessionError::Protocol(format!(
                            "unsupported protocol version {version}"
                        )));
                    }
                    if id != peer {
                        return Err(SessionError::Protocol("Hello names another node".into()));
                    }
                    node.note_member_name(peer, &name).await;
                    if let Some(net) = node.net() {
                        net.count(&peer, |s| {
                            s.bytes_received += n as u64;
                            s.bytes_sent += sent as u64;
                        });
                    }
                    clock
                }
                _ => return Err(SessionError::Protocol("expected Hello".into())),
            },
        };
    tracing::debug!(peer = %peer.short(), lacks = their_clock.missing_count(&node.clock()), "hello exchanged");
    let shared = Arc::new(Shared {
        node: node.clone(),
        peer,
        sync: Mutex::new(PeerSync::new(their_clock)),
    });
    shared.update_in_sync();

    // Unbounded by type, bounded by the protocol: at most WINDOW of our batches and WINDOW acks
    // for the peer's are ever queued. A bounded queue here could deadlock both readers (each
    // blocked queueing an ack while its writer waits on the other's flow control).
    let (out_tx, out_rx) = mpsc::unbounded_channel::<Msg>();
    let window = Arc::new(Semaphore::new(WINDOW));
    tokio::try_join!(
        write_loop(shared.clone(), send, out_rx),
        catch_up(shared.clone(), out_tx.clone(), window.clone()),
        read_loop(shared.clone(), recv, out_tx, window),
        push_out(shared.clone(), conn.clone(), pushes),
        push_in(shared.clone(), conn.clone()),
    )?;
    Ok(())
}

async fn write_loop(
    shared: Arc<Shared>,
    mut send: quinn::SendStream,
    mut rx: mpsc::UnboundedReceiver<Msg>,
) -> Result<(), SessionError> {
    while let Some(msg) = rx.recv().await {
        let bytes = wire::write(&mut send, &msg).await?;
        match &msg {
            Msg::Batch { deltas, .. } => shared.note_sent(deltas, bytes),
            _ => shared.note_sent(&[], bytes),
        }
    }
    Ok(())
}

/// Streams what the peer lacks (as far as we know) from the store, in bounded batches.
async fn catch_up(
    shared: Arc<Shared>,
    out: mpsc::UnboundedSender<Msg>,
    window: Arc<Semaphore>,
) -> Result<(), SessionError> {
    let mut plan = Some(shared.sync().plan(&shared.node.engine_snapshot()));
    let mut seq = 0u64;
    while let Some(batch) = shared.next_batch(&mut plan).await? {
        // Skip what the peer received meanwhile (by push or from others).
        let batch = shared.sync().unknown(&batch);
        if batch.is_empty() {
            continue;
        }
        let permit = window
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| SessionError::Protocol("window closed".into()))?;
        permit.forget(); // returned by the Ack
        seq += 1;
        if out.send(Msg::Batch { seq, deltas: batch }).is_err() {
            return Ok(());
        }
    }
    let _ = out.send(Msg::CaughtUp);
    tracing::debug!(peer = %shared.peer.short(), batches = seq, "catch-up sent");
    Ok(())
}

async fn read_loop(
    shared: Arc<Shared>,
    mut recv: quinn::RecvStream,
    out: mpsc::UnboundedSender<Msg>,
    window: Arc<Semaphore>,
) -> Result<(), SessionError> {
    while let Some((msg, bytes)) = wire::read(&mut recv).await? {
        match msg {
            Msg::Batch { seq, deltas } => {
                shared.receive(deltas, bytes).await?;
                if out.send(Msg::Ack { seq }).is_err() {
                    return Ok(());
                }
            }
            Msg::Ack { .. } => {
                shared.note_received(&[], bytes);
                window.add_permits(1);
            }
            Msg::CaughtUp => {
                shared.note_received(&[], bytes);
                tracing::debug!(peer = %shared.peer.short(), "caught up from peer");
            }
            other => {
                return Err(SessionError::Protocol(format!(
                    "unexpected {} on the sync stream",
                    msg_name(&other)
                )));
            }
        }
    }
    Ok(())
}

/// Sends newly committed deltas the peer lacks on our push stream.
async fn push_out(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    mut pushes: broadcast::Receiver<Arc<Vec<Delta>>>,
) -> Result<(), SessionError> {
    let mut send = conn.open_uni().await?;
    loop {
        let deltas: Vec<Delta> = match pushes.recv().await {
            Ok(batch) => shared.sync().unknown(batch.iter()),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                // We fell behind the feed: send what the peer lacks from the store instead.
                tracing::debug!(peer = %shared.peer.short(), skipped = n, "push feed lagged; catching up");
                let mut plan = Some(shared.sync().plan(&shared.node.engine_snapshot()));
                while let Some(batch) = shared.next_batch(&mut plan).await? {
                    let bytes = wire::write(
                        &mut send,
                        &Msg::Push {
                            deltas: batch.clone(),
                        },
                    )
                    .await?;
                    shared.note_sent(&batch, bytes);
                }
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        };
        if deltas.is_empty() {
            continue;
        }
        let bytes = wire::write(
            &mut send,
            &Msg::Push {
                deltas: deltas.clone(),
            },
        )
        .await?;
        shared.note_sent(&deltas, bytes);
    }
}

/// Receives the peer's push stream.
async fn push_in(shared: Arc<Shared>, conn: quinn::Connection) -> Result<(), SessionError> {
    let mut recv = conn.accept_uni().await?;
    while let Some((msg, bytes)) = wire::read(&mut recv).await? {
        match msg {
            Msg::Push { deltas } => shared.receive(deltas, bytes).await?,
            other => {
                return Err(SessionError::Protocol(format!(
                    "unexpected {} on the push stream",
                    msg_name(&other)
                )));
            }
        }
    }
    Ok(())
}

fn msg_name(m: &Msg) -> &'static str {
    match m {
        Msg::Hello { .. } => "Hello",
        Msg::Batch { .. } => "Batch",
        Msg::Ack { .. } => "Ack",
        Msg::CaughtUp => "CaughtUp",
        Msg::Push { .. } => "Push",
        Msg::JoinRequest { .. } => "JoinRequest",
        Msg::JoinAccepted { .. } => "JoinAccepted",
        Msg::JoinRefused { .. } => "JoinRefused",
    }
}
