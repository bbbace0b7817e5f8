//! The network driver: one task that owns the [`Dialer`] (which member to dial when, which of
//! two connections lives), the registry of live connections, and the connection part of each
//! peer's status. Everything that changes them arrives as a [`Cmd`]: connections established
//! by the accept loop or a dial, connections ended, failed dials, members learned or removed,
//! nodes seen by mDNS. Time comes from the node's [`crate::clock::Clock`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tandem_crdt::NodeId;
use tandem_crdt::dialer::{Admit, ConnId, DialState, Dialer, DialerConfig};
use tokio::sync::{mpsc, oneshot};

use super::{NetError, Shared, close, router, session, status_entry, tls, with_status};

/// What the driver is told.
pub(crate) enum Cmd {
    /// A member's addresses (config, invite, join, an added member): dial it now.
    Learn { id: NodeId, addrs: Vec<SocketAddr> },
    /// A member was removed: close its connection, stop dialing it.
    Remove { id: NodeId },
    /// Members' gossip says member `id` is now at `addrs` (newest first): try them first and
    /// dial it now if it is not connected.
    Heard { id: NodeId, addrs: Vec<SocketAddr> },
    /// mDNS saw `id` at `addrs` (untrusted: only a hint where to dial a member).
    Discovered { id: NodeId, addrs: Vec<SocketAddr> },
    /// A connection to a member is up; the driver answers whether it lives.
    Connected {
        peer: NodeId,
        conn: quinn::Connection,
        dialed: bool,
        reply: oneshot::Sender<bool>,
    },
    /// A connection ended; `failed` says why if it ended badly (the peer refused us, or one
    /// side broke the protocol): that counts as a failed dial for the backoff.
    Ended {
        peer: NodeId,
        conn: ConnId,
        failed: Option<String>,
    },
    /// Every address of a dial failed.
    DialFailed { peer: NodeId, error: String },
    /// Close every connection politely; they are redialed at once (see `Net::resync`).
    Resync,
    /// This node was removed from the cluster: close every connection and dial no one.
    Leave,
    /// Fault injection for tests: links to these peers are cut (no connection either way)
    /// until the next `Cut`; an empty set heals every link.
    Cut {
        peers: std::collections::HashSet<NodeId>,
    },
}

/// Runs the driver until shutdown.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    peers: Vec<(NodeId, SocketAddr)>,
) {
    let me = shared.host.id();
    let mut dialer = Dialer::new(me, DialerConfig::default());
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_os_rng();
    let mut conns: HashMap<ConnId, (NodeId, quinn::Connection)> = HashMap::new();
    let mut cut: std::collections::HashSet<NodeId> = Default::default();
    let mut shutdown = shared.shutdown.clone();
    let now = shared.clock.now();
    for m in shared.host.members() {
        dialer.add(m.id, &parse(&m.addrs), now);
    }
    for (id, addr) in peers {
        dialer.add(id, &[addr], now);
    }
    loop {
        let now = shared.clock.now();
        while let Some(dial) = dialer.poll_dial(now) {
            if cut.contains(&dial.peer) {
                let _ = shared.cmds.send(Cmd::DialFailed {
                    peer: dial.peer,
                    error: "link cut (test)".into(),
                });
                continue;
            }
            tracing::trace!(peer = %dial.peer.short(), addrs = ?dial.addrs, "dialing");
            tokio::spawn(dial_member(shared.clone(), dial.peer, dial.addrs));
        }
        publish(&shared, &dialer);
        let next = dialer.poll_timeout();
        let cmd = tokio::select! {
            c = rx.recv() => match c {
                Some(c) => c,
                None => break,
            },
            () = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            } => continue,
            _ = shutdown.changed() => break,
        };
        let now = shared.clock.now();
        match cmd {
            Cmd::Learn { id, addrs } => dialer.learn(id, &addrs, now),
            Cmd::Heard { id, addrs } => {
                if shared.host.is_member(&id) {
                    for a in addrs.iter().rev() {
                        dialer.prefer(id, *a, now);
                    }
                    dialer.learn(id, &[], now);
                }
            }
            Cmd::Discovered { id, addrs } => {
                if shared.host.is_member(&id) {
                    tracing::debug!(peer = %id.short(), ?addrs, "member discovered on the LAN");
                    dialer.learn(id, &addrs, now);
                } else {
                    tracing::trace!(peer = %id.short(), "non-member seen nearby");
                }
            }
            Cmd::Remove { id } => {
                if let Some(c) = dialer.remove(&id)
                    && let Some((_, conn)) = conns.remove(&c)
                {
                    conn.close(close::REMOVED.into(), b"removed from the cluster");
                }
                links(&shared).remove(&id);
                shared
                    .statuses
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            }
            Cmd::Connected {
                peer,
                conn,
                dialed,
                reply,
            } => {
                if !shared.host.is_member(&peer) {
                    conn.close(close::NOT_MEMBER.into(), b"not a member");
                    let _ = reply.send(false);
                    continue;
                }
                if cut.contains(&peer) {
                    conn.close(close::LOCAL.into(), b"link cut (test)");
                    let _ = reply.send(false);
                    continue;
                }
                // A QUIC endpoint dials from the port it listens on: where a member connected
                // from (or where our dial reached it) is where to dial it next, even if both
                // restarted on new ports since.
                let addr = conn.remote_address();
                dialer.prefer(peer, addr, now);
                tokio::spawn(shared.host.peer_seen_at(peer, addr));
                let id = conn.stable_id() as ConnId;
                match dialer.connected(peer, id, dialed, now) {
                    Admit::Refuse => {
                        tracing::debug!(peer = %peer.short(), dialed, "a simultaneous dial lost the tie; closed");
                        conn.close(close::DUPLICATE.into(), b"duplicate connection");
                        let _ = reply.send(false);
                    }
                    Admit::Accept { replaces } => {
                        if let Some(old) = replaces.and_then(|o| conns.remove(&o)) {
                            tracing::debug!(peer = %peer.short(), dialed, "a newer connection replaces the old one");
                            old.1
                                .close(close::DUPLICATE.into(), b"duplicate connection");
                        }
                        let mut map = shared.statuses.lock().unwrap_or_else(|p| p.into_inner());
                        let s = status_entry(&mut map, peer);
                        s.connected = true;
                        s.error = None;
                        s.addr = Some(conn.remote_address());
                        s.last_seen = Some(shared.clock.wall_ms());
                        drop(map);
                        links(&shared).insert(peer, conn.clone());
                        shared.upkeep_now.notify_one();
                        conns.insert(id, (peer, conn));
                        let _ = reply.send(true);
                    }
                }
            }
            Cmd::Ended { peer, conn, failed } => {
                {
                    let mut l = links(&shared);
                    if l.get(&peer)
                        .is_some_and(|c| c.stable_id() as ConnId == conn)
                    {
                        l.remove(&peer);
                        shared.upkeep_now.notify_one();
                    }
                }
                if conns.remove(&conn).is_some() {
                    // (In-sync is derived from this and what the peer confirmed.)
                    with_status(&shared.statuses, &peer, |s| s.connected = false);
                }
                // A refusal or a broken session is a failure: back off, and after a few open
                // the breaker, instead of redialing twice a second a peer that will refuse
                // again or send the same bad data again.
                dialer.disconnected(&peer, conn, failed.is_none(), now, &mut rng);
                if let Some(why) = failed {
                    with_status(&shared.statuses, &peer, |s| s.error = Some(why));
                }
            }
            Cmd::Cut { peers } => {
                let healed: Vec<NodeId> = cut.difference(&peers).copied().collect();
                conns.retain(|_, (peer, conn)| {
                    let keep = !peers.contains(peer);
                    if !keep {
                        conn.close(close::LOCAL.into(), b"link cut (test)");
                    }
                    keep
                });
                cut = peers;
                for id in healed {
                    let addrs = shared
                        .host
                        .members()
                        .into_iter()
                        .find(|m| m.id == id)
                        .map(|m| parse(&m.addrs))
                        .unwrap_or_default();
                    dialer.learn(id, &addrs, now);
                }
            }
            Cmd::Leave => {
                for id in dialer.peers().collect::<Vec<_>>() {
                    dialer.remove(&id);
                }
                for (_, (_, conn)) in conns.drain() {
                    // Not REMOVED: that code tells the peer *it* was removed.
                    conn.close(
                        close::NOT_MEMBER.into(),
                        b"this node was removed from the cluster",
                    );
                }
                links(&shared).clear();
                shared
                    .statuses
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear();
            }
            Cmd::Resync => {
                for (peer, conn) in conns.values() {
                    tracing::debug!(peer = %peer.short(), "restarting the session to resync");
                    conn.close(close::RESYNC.into(), b"resyncing");
                }
            }
            Cmd::DialFailed { peer, error } => {
                dialer.dial_failed(&peer, now, &mut rng);
                with_status(&shared.statuses, &peer, |s| s.error = Some(error.clone()));
                if dialer.state(&peer) == DialState::BreakerOpen {
                    tracing::debug!(peer = %peer.short(), %error, "peer unreachable; trying rarely until it shows up");
                } else {
                    tracing::debug!(peer = %peer.short(), %error, "dial failed");
                }
            }
        }
    }
    for (_, (_, c)) in conns {
        c.close(close::SHUTDOWN.into(), b"shutting down");
    }
    tracing::debug!("network driver stopped");
}

fn links(shared: &Shared) -> std::sync::MutexGuard<'_, HashMap<NodeId, quinn::Connection>> {
    shared.links.lock().unwrap_or_else(|p| p.into_inner())
}

/// Publishes the dialer's view (connecting or not) into the statuses.
fn publish(shared: &Shared, dialer: &Dialer) {
    let mut map = shared.statuses.lock().unwrap_or_else(|p| p.into_inner());
    for id in dialer.peers() {
        let connecting = matches!(
            dialer.state(&id),
            DialState::Connecting | DialState::Dialing
        );
        let s = status_entry(&mut map, id);
        s.connecting = connecting && !s.connected;
    }
}

fn parse(addrs: &[String]) -> Vec<SocketAddr> {
    addrs.iter().filter_map(|a| a.parse().ok()).collect()
}

/// Accepts incoming connections until shutdown.
pub(crate) async fn accept_loop(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let incoming = tokio::select! {
            i = shared.endpoint.accept() => i,
            _ = shutdown.changed() => None,
        };
        let Some(incoming) = incoming else { break };
        let shared = shared.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "incoming handshake failed");
                    return;
                }
            };
            let Some(peer) = tls::peer_id(&conn) else {
                conn.close(close::PROTOCOL.into(), b"no peer identity");
                return;
            };
            if tls::alpn(&conn).unwrap_or_default() == tls::ALPN_JOIN {
                if let Err(e) = super::join::serve(&shared, &conn, peer).await {
                    tracing::info!(peer = %peer.short(), error = %e, "join refused");
                }
                return;
            }
            if !shared.host.is_member(&peer) {
                tracing::info!(peer = %peer.short(), addr = %conn.remote_address(), "refused: not a member");
                conn.close(close::NOT_MEMBER.into(), b"not a member");
                return;
            }
            run_connection(shared, conn, peer, false).await;
        });
    }
    tracing::debug!("accept loop stopped");
}

/// Asks the driver whether `conn` lives, then runs its session until it ends.
async fn run_connection(shared: Arc<Shared>, conn: quinn::Connection, peer: NodeId, dialed: bool) {
    let (reply, admitted) = oneshot::channel();
    let cmd = Cmd::Connected {
        peer,
        conn: conn.clone(),
        dialed,
        reply,
    };
    if shared.cmds.send(cmd).is_err() || !admitted.await.unwrap_or(false) {
        return;
    }
    tracing::debug!(peer = %peer.short(), addr = %conn.remote_address(), dialed, "peer connected");
    let routes = router::spawn(
        conn.clone(),
        peer,
        shared.host.clone(),
        shared.gossip_in.clone(),
    );
    let result = session::run(&shared, &conn, peer, dialed, routes).await;
    if told_removed(&conn) {
        shared.host.told_removed(peer).await;
    }
    let failed = match (&result, how_closed(&conn)) {
        (_, Closed::Refused(why)) => {
            tracing::info!(peer = %peer.short(), reason = %why, "the peer refused us; backing off");
            Some(why)
        }
        (Ok(()), _) => {
            conn.close(close::NORMAL.into(), b"session over");
            None
        }
        (Err(e), _) if e.is_breakage() => {
            // The session broke (bad data, a timeout, our store): back off.
            tracing::info!(peer = %peer.short(), error = %e, "sync session broke; backing off");
            conn.close(close::PROTOCOL.into(), e.to_string().as_bytes());
            Some(e.to_string())
        }
        (Err(e), Closed::Polite) => {
            // Either side shutting down or leaving politely is expected, not news.
            tracing::debug!(peer = %peer.short(), error = %e, "sync session ended");
            None
        }
        (Err(e), Closed::Other) => {
            // A stream failed or the connection dropped (a network change, a killed peer):
            // end it with the reason, and redial soon.
            tracing::info!(peer = %peer.short(), error = %e, "sync session ended");
            conn.close(close::PROTOCOL.into(), e.to_string().as_bytes());
            None
        }
    };
    let _ = shared.cmds.send(Cmd::Ended {
        peer,
        conn: conn.stable_id() as ConnId,
        failed,
    });
    tracing::debug!(peer = %peer.short(), "peer disconnected");
}

/// Whether the peer closed the connection saying this node was removed from the cluster.
fn told_removed(conn: &quinn::Connection) -> bool {
    matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == close::REMOVED.into()
    )
}

/// How a connection was closed, as its close frame (or our own close) tells.
enum Closed {
    /// On purpose: shutting down, a normal close, a duplicate replaced, or closed here.
    Polite,
    /// By the peer, saying we are not (or no longer) a member or that we broke the protocol:
    /// we would only meet the same again.
    Refused(String),
    /// Not closed yet, or lost (a timeout, a reset).
    Other,
}

fn how_closed(conn: &quinn::Connection) -> Closed {
    let c = match conn.close_reason() {
        Some(quinn::ConnectionError::LocallyClosed) => return Closed::Polite,
        Some(quinn::ConnectionError::ApplicationClosed(c)) => c,
        _ => return Closed::Other,
    };
    let code = |k: u32| c.error_code == k.into();
    let reason: String = String::from_utf8_lossy(&c.reason)
        .chars()
        .take(200)
        .collect();
    if code(close::NORMAL) || code(close::SHUTDOWN) || code(close::DUPLICATE) || code(close::RESYNC)
    {
        Closed::Polite
    } else if code(close::NOT_MEMBER) || code(close::REMOVED) {
        Closed::Refused(format!("refused: {reason}"))
    } else if code(close::PROTOCOL) || code(close::TIMEOUT) {
        Closed::Refused(format!("the peer closed the session: {reason}"))
    } else {
        Closed::Other
    }
}

/// Dials `peer` at each address in turn; the first that answers runs the session.
async fn dial_member(shared: Arc<Shared>, peer: NodeId, addrs: Vec<SocketAddr>) {
    let mut last = String::from("no address");
    for addr in addrs {
        match connect(&shared, &shared.sync_client, peer, addr).await {
            Ok(conn) => return run_connection(shared.clone(), conn, peer, true).await,
            Err(e) => last = e.to_string(),
        }
    }
    let _ = shared.cmds.send(Cmd::DialFailed { peer, error: last });
}

/// Connects to `id` at `addr`, pinning its key; gives up after 5 s.
pub(crate) async fn connect(
    shared: &Shared,
    cfg: &quinn::ClientConfig,
    id: NodeId,
    addr: SocketAddr,
) -> Result<quinn::Connection, NetError> {
    let connecting = shared
        .endpoint
        .connect_with(cfg.clone(), addr, &tls::server_name(&id))
        .map_err(|e| NetError::Unreachable(format!("{addr}: {e}")))?;
    tokio::time::timeout(Duration::from_secs(5), connecting)
        .await
        .map_err(|_| NetError::Unreachable(format!("{addr}: timed out")))?
        .map_err(|e| NetError::Unreachable(format!("{addr}: {e}")))
}
