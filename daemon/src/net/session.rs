//! Runs one [`Session`] on one member connection: the IO half of the sync protocol. The state
//! machine decides everything; this task only moves bytes and requests:
//! - one writer task per outgoing stream (sync, our push stream) fed by a queue, so a peer
//!   that stops reading blocks only its own streams, never this task or the node;
//! - one reader task per incoming stream (sync, the peer's push stream) into a small bounded
//!   queue; the peer's push stream is read only while the session [`Session::wants_push`], so
//!   a fast sender meets QUIC flow control rather than filling memory;
//! - loads on blocking threads, stores in tasks of their own (a session torn down mid-way
//!   never leaves a delta committed but unapplied);
//! - the node's feed of commits, and the session's timer.

use std::sync::Arc;

use foldhash::HashMap;
use tandem_crdt::NodeId;
use tandem_crdt::proto::{PushMsg, StreamKind, SyncMsg};
use tandem_crdt::session::{
    CloseCode, Lane, LoadRequest, Output, Session, SessionConfig, StoreFailure, StoreId,
};
use tandem_crdt::{CatchUp, Delta, DeltaId};
use tokio::sync::{broadcast, mpsc};

use super::host::BoxFuture;
use super::router::Routes;
use super::wire::{self, WireError};
use super::{SessionCtl, Shared, close, with_status};

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("{0}")]
    Closed(String),
    #[error("frame: {0}")]
    Wire(#[from] WireError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
}

impl SessionError {
    /// Whether the session broke (the protocol, a timeout, bad data, our store) rather than
    /// its connection going away.
    pub(crate) fn is_breakage(&self) -> bool {
        match self {
            SessionError::Closed(_) => true,
            SessionError::Wire(WireError::Frame(_) | WireError::Unexpected(_)) => true,
            SessionError::Wire(WireError::Read(_) | WireError::Write(_)) => false,
            SessionError::Connection(_) => false,
        }
    }
}

/// What the helper tasks report to the session task.
enum Ev {
    Loaded(Lane, Result<(CatchUp, Option<Vec<Delta>>), String>),
    Stored(StoreId, Result<(), StoreFailure>),
    PushWritten,
    /// A writer stopped (the connection is going away).
    StreamEnded(Result<(), SessionError>),
}

/// What a reader delivers, in stream order: frames, then how the stream ended.
enum In<M> {
    /// A message, with the changes of the deltas it carries as parsed on arrival (see
    /// [`parse_ahead`]).
    Frame(M, Vec<(DeltaId, Box<automerge::Change>)>),
    End(Result<(), SessionError>),
}

/// At most this many changes parsed on arrival wait for their store (a window of four
/// 256 KiB catch-up batches holds at most ~6,500 deltas, each at least ~160 bytes on the
/// wire); past it, the engine parses the rest itself. Bounds what a peer can make this side
/// hold parsed to a few MB.
const MAX_PARSED_AHEAD: usize = 8192;

/// Validates a received batch's deltas as they arrive, in the stream's reader task: their
/// parse (most of the receive path's CPU for small changes) then runs while the batch before
/// them is being committed, instead of after it, under the engine's lock. Only what validates
/// is kept; the engine validates anything else again and rejects it there. What the engine
/// gets is checked against the delta's bytes ([`Delta::validate_with`]).
fn parse_ahead(deltas: &[Delta]) -> Vec<(DeltaId, Box<automerge::Change>)> {
    deltas
        .iter()
        .filter_map(|d| Some((d.id, Box::new(d.validate().ok()??))))
        .collect()
}

/// Runs the session until the connection ends or the peer breaks the protocol.
pub(crate) async fn run(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    peer: NodeId,
    dialed: bool,
    routes: Routes,
) -> Result<(), SessionError> {
    let host = &shared.host;
    let clock = &shared.clock;
    let cfg = SessionConfig {
        name: host.name(),
        ..SessionConfig::default()
    };
    let hello_timeout = cfg.hello_timeout;
    // Subscribe before reading our clock: whatever commits after this is fed to the session,
    // whatever committed before is in the clock and goes by catch-up.
    let mut commits = host.subscribe_commits();
    let mut ctl = shared.session_ctl.subscribe();
    let mut session = Session::new(cfg, host.id(), peer, host.clock(), clock.now());

    let (sync_send, sync_recv) = if dialed {
        let (mut send, recv) = conn.open_bi().await?;
        wire::announce(&mut send, StreamKind::Sync).await?;
        (send, recv)
    } else {
        match tokio::time::timeout(hello_timeout, routes.sync).await {
            Ok(Ok(streams)) => streams,
            Ok(Err(_)) => return Err(SessionError::Closed("connection ended".into())),
            Err(_) => {
                return Err(SessionError::Closed(format!(
                    "no sync stream within {hello_timeout:?}"
                )));
            }
        }
    };

    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Ev>();
    // Unbounded by type, bounded by the protocol: the session queues at most a window of
    // batches and acks, and stops pushing past its push buffer.
    let (sync_tx, sync_out) = mpsc::unbounded_channel::<SyncMsg>();
    let (push_tx, push_out) = mpsc::unbounded_channel::<PushMsg>();
    let (sync_in_tx, mut sync_in) = mpsc::channel::<In<SyncMsg>>(16);
    let (push_in_tx, mut push_in) = mpsc::channel::<In<PushMsg>>(1);
    let tasks = [
        tokio::spawn(write_sync(
            shared.clone(),
            peer,
            sync_send,
            sync_out,
            ev_tx.clone(),
        )),
        tokio::spawn(write_push(
            shared.clone(),
            peer,
            conn.clone(),
            push_out,
            ev_tx.clone(),
        )),
        tokio::spawn(read_stream(
            shared.clone(),
            peer,
            Some(sync_recv),
            None,
            sync_in_tx,
        )),
        tokio::spawn(read_stream(
            shared.clone(),
            peer,
            None,
            Some(routes.push),
            push_in_tx,
        )),
    ];
    let aborter = AbortOnDrop(tasks.iter().map(|t| t.abort_handle()).collect());
    let store_tx = spawn_stores(ev_tx.clone());

    // Changes parsed as their batch arrived, until the batch is stored.
    let mut ahead: HashMap<DeltaId, Box<automerge::Change>> = HashMap::default();
    let mut feed_open = true;
    let mut ctl_open = true;
    let result = loop {
        // Carry out everything the session asked for.
        let mut closed = None;
        while let Some(out) = session.poll_output() {
            match out {
                Output::Send(m) => {
                    let _ = sync_tx.send(m);
                }
                Output::Push(m) => {
                    let _ = push_tx.send(m);
                }
                Output::Load(req) => load(shared, req, &ev_tx),
                Output::Store { id, deltas, live } => {
                    let parsed = deltas.iter().map(|d| ahead.remove(&d.id)).collect();
                    let _ = store_tx.send((id, host.apply_remote(peer, deltas, parsed, live)));
                }
                Output::Hello { name } => {
                    tracing::debug!(peer = %peer.short(), %name, lacks = session.known().map_or(0, |k| k.missing_count(session.ours())), "hello exchanged");
                }
                Output::InSync(now) => {
                    tracing::debug!(peer = %peer.short(), in_sync = now, "sync state");
                }
                Output::PeerCaughtUp => {
                    tracing::debug!(peer = %peer.short(), "caught up from peer")
                }
                Output::Close { code, reason } => {
                    let code = match code {
                        CloseCode::Protocol => close::PROTOCOL,
                        CloseCode::Timeout => close::TIMEOUT,
                        CloseCode::Local => close::LOCAL,
                    };
                    conn.close(code.into(), reason.as_bytes());
                    closed = Some(reason);
                }
            }
        }
        if session.is_open() {
            let held = session.held();
            let busy = session.is_busy();
            let changed = |s: &super::PeerStatus| s.held.as_ref() != Some(held) || s.busy != busy;
            with_status(&shared.statuses, &peer, |s| {
                if changed(s) {
                    s.held = Some(held.clone());
                    s.busy = busy;
                }
            });
        }
        if let Some(reason) = closed {
            break Err(SessionError::Closed(reason));
        }
        let timeout = session.poll_timeout();
        let wants_push = session.wants_push();
        tokio::select! {
            Some(ev) = ev_rx.recv() => {
                let now = clock.now();
                match ev {
                    Ev::Loaded(lane, Ok((plan, batch))) => session.handle_loaded(now, lane, plan, batch),
                    Ev::Loaded(_, Err(e)) => {
                        conn.close(close::LOCAL.into(), b"store error");
                        break Err(SessionError::Closed(format!("cannot read the store: {e}")));
                    }
                    Ev::Stored(id, r) => session.handle_stored(now, id, r),
                    Ev::PushWritten => session.handle_push_written(now),
                    Ev::StreamEnded(r) => {
                        session.handle_closed();
                        break r;
                    }
                }
            }
            Some(i) = sync_in.recv() => match i {
                In::Frame(msg, parsed) => {
                    if ahead.len() + parsed.len() <= MAX_PARSED_AHEAD {
                        ahead.extend(parsed);
                    }
                    session.handle_sync(clock.now(), msg)
                }
                In::End(r) => break r,
            },
            Some(i) = push_in.recv(), if wants_push => match i {
                In::Frame(msg, _) => session.handle_push(clock.now(), msg),
                In::End(r) => break r,
            },
            c = commits.recv(), if feed_open => {
                let now = clock.now();
                match c {
                    Ok(c) => session.handle_committed(now, &c.deltas, c.source),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(peer = %peer.short(), skipped = n, "commit feed lagged; sending from the store");
                        session.handle_feed_lagged(now, host.clock());
                    }
                    Err(broadcast::error::RecvError::Closed) => feed_open = false,
                }
            }
            () = sleep_until(timeout) => session.handle_timeout(clock.now()),
            c = ctl.recv(), if ctl_open => match c {
                Ok((to, SessionCtl::Resync)) if to == peer => {
                    tracing::debug!(peer = %peer.short(), "anti-entropy: exchanging clocks");
                    session.resync(clock.now(), &host.clock());
                }
                Ok((to, SessionCtl::Holds(held))) if to == peer => {
                    session.handle_peer_clock(clock.now(), &held);
                }
                // Someone else's, or missed (the next round asks again).
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => ctl_open = false,
            },
        }
    };
    drop(aborter);
    result
}

async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Aborts the helper tasks when the session ends (a writer blocked on a stalled peer would
/// otherwise live on).
struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// A store: validating, applying and queueing the commit, resolving to the wait for it.
type StoreFuture = BoxFuture<BoxFuture<Result<(), StoreFailure>>>;

/// Carries out a session's stores in a task of its own, never aborted (a session torn down
/// meanwhile must not leave deltas applied in memory but not committed; it ends once the
/// session has gone and its stores are done). Each is validated, applied and queued in the
/// order the session asked (a batch may build on the one before), and its commit waited for
/// in a task of its own, so the next batch is prepared while this one commits.
fn spawn_stores(ev: mpsc::UnboundedSender<Ev>) -> mpsc::UnboundedSender<(StoreId, StoreFuture)> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(StoreId, StoreFuture)>();
    tokio::spawn(async move {
        while let Some((id, queue)) = rx.recv().await {
            let wait = queue.await;
            let ev = ev.clone();
            tokio::spawn(async move {
                let _ = ev.send(Ev::Stored(id, wait.await));
            });
        }
    });
    tx
}

fn load(shared: &Arc<Shared>, req: LoadRequest, ev: &mpsc::UnboundedSender<Ev>) {
    let host = shared.host.clone();
    let ev = ev.clone();
    let lane = req.lane;
    tokio::task::spawn_blocking(move || {
        let _ = ev.send(Ev::Loaded(lane, host.load(req)));
    });
}

async fn write_sync(
    shared: Arc<Shared>,
    peer: NodeId,
    mut send: quinn::SendStream,
    mut rx: mpsc::UnboundedReceiver<SyncMsg>,
    ev: mpsc::UnboundedSender<Ev>,
) {
    let r = async {
        while let Some(msg) = rx.recv().await {
            let bytes = wire::write(&mut send, &msg).await?;
            let deltas = match &msg {
                SyncMsg::Batch { deltas, .. } => deltas.len() as u64,
                _ => 0,
            };
            with_status(&shared.statuses, &peer, |s| {
                s.bytes_sent += bytes as u64;
                s.deltas_sent += deltas;
            });
        }
        Ok(())
    }
    .await;
    let _ = ev.send(Ev::StreamEnded(r));
}

async fn write_push(
    shared: Arc<Shared>,
    peer: NodeId,
    conn: quinn::Connection,
    mut rx: mpsc::UnboundedReceiver<PushMsg>,
    ev: mpsc::UnboundedSender<Ev>,
) {
    let r = async {
        let mut send = conn.open_uni().await?;
        wire::announce(&mut send, StreamKind::Push).await?;
        while let Some(msg) = rx.recv().await {
            let bytes = wire::write(&mut send, &msg).await?;
            let PushMsg::Push { deltas } = &msg;
            with_status(&shared.statuses, &peer, |s| {
                s.bytes_sent += bytes as u64;
                s.deltas_sent += deltas.len() as u64;
            });
            if ev.send(Ev::PushWritten).is_err() {
                break;
            }
        }
        Ok::<_, SessionError>(())
    }
    .await;
    let _ = ev.send(Ev::StreamEnded(r));
}

/// Reads frames of one stream into `out` (the sync stream, or the push stream once the router
/// hands it over), then how it ended.
async fn read_stream<M: wire::Message + DeltasOf>(
    shared: Arc<Shared>,
    peer: NodeId,
    stream: Option<quinn::RecvStream>,
    routed: Option<tokio::sync::oneshot::Receiver<quinn::RecvStream>>,
    out: mpsc::Sender<In<M>>,
) {
    let r = async {
        let mut recv = match (stream, routed) {
            (Some(s), _) => s,
            (None, Some(rx)) => match rx.await {
                Ok(s) => s,
                Err(_) => return Ok(()), // the connection ended before the peer opened it
            },
            (None, None) => return Ok(()),
        };
        while let Some((msg, bytes)) = wire::read::<M>(&mut recv).await? {
            let now = shared.clock.wall_ms();
            let deltas = msg.deltas();
            with_status(&shared.statuses, &peer, |s| {
                s.bytes_received += bytes as u64;
                s.deltas_received += deltas;
                s.last_seen = Some(now);
            });
            let parsed = msg.parse_ahead();
            if out.send(In::Frame(msg, parsed)).await.is_err() {
                break;
            }
        }
        Ok(())
    }
    .await;
    let _ = out.send(In::End(r)).await;
}

/// How many deltas a message carries (for the traffic counters), and their changes parsed
/// ahead of their store.
trait DeltasOf {
    fn deltas(&self) -> u64;
    fn parse_ahead(&self) -> Vec<(DeltaId, Box<automerge::Change>)>;
}

impl DeltasOf for SyncMsg {
    fn deltas(&self) -> u64 {
        match self {
            SyncMsg::Batch { deltas, .. } => deltas.len() as u64,
            _ => 0,
        }
    }

    /// A catch-up batch waits behind the one being stored: parsed now, in parallel.
    fn parse_ahead(&self) -> Vec<(DeltaId, Box<automerge::Change>)> {
        match self {
            SyncMsg::Batch { deltas, .. } => parse_ahead(deltas),
            _ => Vec::new(),
        }
    }
}

impl DeltasOf for PushMsg {
    fn deltas(&self) -> u64 {
        let PushMsg::Push { deltas } = self;
        deltas.len() as u64
    }

    /// A push is stored at once (and a delay there is latency): parsed by the engine.
    fn parse_ahead(&self) -> Vec<(DeltaId, Box<automerge::Change>)> {
        Vec::new()
    }
}
