//! Networking: one QUIC endpoint per node (client and server at once), the connection manager
//! (dialing members with backoff, one connection per peer pair, per-peer status), the join
//! handshake, and the sync sessions that run on each connection (`peer`).

pub mod discovery;
mod peer;
pub mod tls;
pub mod wire;

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;
use tandem_crdt::NodeId;
use tokio::sync::watch;

use crate::members::{Invite, InviteError};
use crate::node::{Inner, Node};
use crate::store::now_ms;
use crate::{Error, Identity};
use wire::Msg;

/// Networking options for [`crate::Config`].
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// UDP address to listen on; port 0 picks one.
    pub listen: SocketAddr,
    /// Peers to dial at fixed addresses (they must also be members).
    pub peers: Vec<(NodeId, SocketAddr)>,
    /// Advertise and browse on the LAN with mDNS.
    pub mdns: bool,
    /// Restrict mDNS to these interfaces (names or addresses); empty means all.
    pub interfaces: Vec<String>,
    /// When `listen` has port 0, try this port first (default 7373); `None` always lets the
    /// system pick.
    pub preferred_port: Option<u16>,
}

impl NetConfig {
    /// Loopback only, any free port, no mDNS: for tests, benchmarks and local experiments.
    pub fn loopback() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            peers: Vec::new(),
            mdns: false,
            interfaces: Vec::new(),
            preferred_port: None,
        }
    }
}

/// The default preferred port.
pub const PREFERRED_PORT: u16 = 7373;

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            peers: Vec::new(),
            mdns: true,
            interfaces: Vec::new(),
            preferred_port: Some(PREFERRED_PORT),
        }
    }
}

/// Errors of the network layer.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot reach {0}")]
    Unreachable(String),
    #[error(transparent)]
    Invite(#[from] InviteError),
    #[error("the inviter refused: {0}")]
    Refused(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("networking is not enabled on this node")]
    Disabled,
}

/// How a peer looks from here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PeerStatus {
    pub id: Option<NodeId>,
    pub connected: bool,
    /// Not connected, but being dialed with no failed attempt yet (just learned, or it went
    /// away politely): expect it to connect soon. After a failed dial it is simply offline.
    pub connecting: bool,
    /// Where it is (or was last) connected.
    pub addr: Option<SocketAddr>,
    /// Unix milliseconds of the last frame from it.
    pub last_seen: Option<i64>,
    pub deltas_sent: u64,
    pub deltas_received: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Our clocks are equal as far as we know (and ours has not moved since we last checked).
    pub in_sync: bool,
    /// How many deltas our clock held when `in_sync` was last computed.
    #[serde(skip)]
    pub(crate) in_sync_at: u64,
}

/// QUIC close codes.
pub(crate) mod close {
    pub const NORMAL: u32 = 0;
    pub const NOT_MEMBER: u32 = 1;
    pub const DUPLICATE: u32 = 2;
    pub const PROTOCOL: u32 = 3;
    pub const REMOVED: u32 = 4;
    pub const SHUTDOWN: u32 = 5;
}

pub(crate) struct PeerEntry {
    /// The connection, whether we dialed it, and when it was registered.
    pub(crate) conn: Option<(quinn::Connection, bool, Instant)>,
    pub(crate) status: PeerStatus,
    addrs: Vec<SocketAddr>,
    failures: u32,
    next_attempt: Instant,
}

impl PeerEntry {
    fn new(id: NodeId) -> Self {
        Self {
            conn: None,
            status: PeerStatus {
                id: Some(id),
                ..Default::default()
            },
            addrs: Vec::new(),
            failures: 0,
            next_attempt: Instant::now(),
        }
    }
}

/// Failures after which a peer is tried only rarely (the circuit breaker opens).
const BREAKER_FAILURES: u32 = 6;
const BREAKER_RETRY: Duration = Duration::from_secs(300);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The network side of a node.
pub(crate) struct Net {
    endpoint: quinn::Endpoint,
    sync_client: quinn::ClientConfig,
    join_client: quinn::ClientConfig,
    pub(crate) peers: Mutex<HashMap<NodeId, PeerEntry>>,
    /// Nodes seen on the LAN, members or not: addresses and when (unix ms).
    nearby: Mutex<HashMap<NodeId, (Vec<SocketAddr>, i64)>>,
    discovery: Mutex<Option<discovery::Discovery>>,
    shutdown: watch::Sender<bool>,
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.endpoint
            .close(close::SHUTDOWN.into(), b"shutting down");
    }
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
        30_000,
    ))));
    t.max_concurrent_uni_streams(8u32.into());
    t.max_concurrent_bidi_streams(8u32.into());
    Arc::new(t)
}

/// Starts networking for `node`.
pub(crate) fn start(node: &Node, identity: &Identity, cfg: &NetConfig) -> Result<Net, NetError> {
    let mut server = tls::server_config(identity)?;
    server.transport_config(transport());
    let mut sync_client = tls::client_config(identity, tls::ALPN_SYNC)?;
    sync_client.transport_config(transport());
    let mut join_client = tls::client_config(identity, tls::ALPN_JOIN)?;
    join_client.transport_config(transport());
    // Try the preferred port first so the node keeps its address across restarts.
    let preferred = cfg
        .preferred_port
        .filter(|_| cfg.listen.port() == 0)
        .map(|port| SocketAddr::new(cfg.listen.ip(), port));
    let endpoint = match preferred.map(|addr| quinn::Endpoint::server(server.clone(), addr)) {
        Some(Ok(e)) => e,
        _ => quinn::Endpoint::server(server, cfg.listen).map_err(|source| NetError::Bind {
            addr: cfg.listen,
            source,
        })?,
    };
    let (shutdown, _) = watch::channel(false);
    let net = Net {
        endpoint: endpoint.clone(),
        sync_client,
        join_client,
        peers: Mutex::new(HashMap::new()),
        nearby: Mutex::new(HashMap::new()),
        discovery: Mutex::new(None),
        shutdown,
    };
    if cfg.mdns {
        let port = endpoint.local_addr().map(|a| a.port()).unwrap_or(0);
        match discovery::start(node.weak(), node.id(), port, &cfg.interfaces) {
            Ok(d) => *net.discovery.lock().unwrap_or_else(|p| p.into_inner()) = Some(d),
            Err(e) => tracing::warn!(error = %e, "mDNS discovery unavailable; static peers only"),
        }
    }
    {
        let mut peers = net.peers();
        for (id, addr) in &cfg.peers {
            peers
                .entry(*id)
                .or_insert_with(|| PeerEntry::new(*id))
                .addrs
                .push(*addr);
        }
    }
    let weak = node.weak();
    tokio::spawn(accept_loop(
        weak.clone(),
        endpoint,
        net.shutdown.subscribe(),
    ));
    tokio::spawn(dial_loop(weak, net.shutdown.subscribe()));
    tracing::info!(addr = ?net.local_addr(), "listening (QUIC)");
    Ok(net)
}

impl Net {
    /// Stops accepting and dialing and closes every connection.
    pub(crate) fn stop(&self) {
        self.discovery
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let _ = self.shutdown.send(true);
        self.endpoint
            .close(close::SHUTDOWN.into(), b"shutting down");
    }

    /// Waits (at most `limit`) until every connection closed by [`Net::stop`] is drained.
    pub(crate) async fn wait_closed(&self, limit: Duration) {
        if tokio::time::timeout(limit, self.endpoint.wait_idle())
            .await
            .is_err()
        {
            tracing::debug!("connections still closing at shutdown");
        }
    }

    pub(crate) fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, PeerEntry>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// Addresses others can dial: the bound one, or for a wildcard bind, loopback and the
    /// address of the interface with the default route.
    pub(crate) fn advertised_addrs(&self) -> Vec<String> {
        let Some(local) = self.local_addr() else {
            return Vec::new();
        };
        if !local.ip().is_unspecified() {
            return vec![local.to_string()];
        }
        let mut out = vec![SocketAddr::from(([127, 0, 0, 1], local.port())).to_string()];
        // Connecting a UDP socket sends nothing; it only picks the outgoing interface.
        if let Ok(s) = UdpSocket::bind("0.0.0.0:0")
            && s.connect("192.0.2.1:9").is_ok()
            && let Ok(a) = s.local_addr()
            && !a.ip().is_loopback()
        {
            out.push(SocketAddr::new(a.ip(), local.port()).to_string());
        }
        out
    }

    /// Status of every known peer.
    pub(crate) fn statuses(&self) -> Vec<PeerStatus> {
        let mut v: Vec<PeerStatus> = self
            .peers()
            .values()
            .map(|e| PeerStatus {
                connecting: !e.status.connected && e.failures == 0 && !e.addrs.is_empty(),
                ..e.status.clone()
            })
            .collect();
        v.sort_by_key(|s| s.id);
        v
    }

    /// Learns addresses for a member (from an invite, a join, config or discovery) and makes
    /// it eligible for an immediate dial.
    pub(crate) fn learn(&self, id: NodeId, addrs: &[SocketAddr]) {
        let mut peers = self.peers();
        let e = peers.entry(id).or_insert_with(|| PeerEntry::new(id));
        for a in addrs {
            if !e.addrs.contains(a) {
                e.addrs.push(*a);
            }
        }
        e.failures = 0;
        e.next_attempt = Instant::now();
    }

    /// Records a node seen on the LAN.
    pub(crate) fn saw_nearby(&self, id: NodeId, addrs: &[SocketAddr]) {
        self.nearby
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (addrs.to_vec(), now_ms()));
    }

    /// Nodes seen on the LAN with their addresses and when.
    pub(crate) fn nearby(&self) -> Vec<(NodeId, Vec<SocketAddr>, i64)> {
        let mut v: Vec<_> = self
            .nearby
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, (a, t))| (*id, a.clone(), *t))
            .collect();
        v.sort_by_key(|x| x.0);
        v
    }

    /// Closes the connection to `id`, if any, with `code` and `reason`.
    pub(crate) fn disconnect(&self, id: &NodeId, code: u32, reason: &str) {
        if let Some(e) = self.peers().get_mut(id)
            && let Some((conn, _, _)) = e.conn.take()
        {
            conn.close(code.into(), reason.as_bytes());
            e.status.connected = false;
        }
    }

    /// Registers a new connection; returns false if an existing one wins (then this one is
    /// closed). See [`keep_new`] for the rule.
    fn register(&self, me: NodeId, id: NodeId, conn: &quinn::Connection, dialed: bool) -> bool {
        let mut peers = self.peers();
        let e = peers.entry(id).or_insert_with(|| PeerEntry::new(id));
        if let Some((old, old_dialed, since)) = &e.conn
            && old.close_reason().is_none()
        {
            if !keep_new(me, id, dialed, *old_dialed, since.elapsed()) {
                conn.close(close::DUPLICATE.into(), b"duplicate connection");
                return false;
            }
            tracing::debug!(peer = %id.short(), dialed, "a newer connection replaces the old one");
            old.close(close::DUPLICATE.into(), b"duplicate connection");
        }
        e.conn = Some((conn.clone(), dialed, Instant::now()));
        e.status.connected = true;
        e.status.addr = Some(conn.remote_address());
        e.status.last_seen = Some(now_ms());
        e.failures = 0;
        true
    }

    fn unregister(&self, id: &NodeId, conn: &quinn::Connection) {
        if let Some(e) = self.peers().get_mut(id)
            && e.conn
                .as_ref()
                .is_some_and(|(c, _, _)| c.stable_id() == conn.stable_id())
        {
            e.conn = None;
            e.status.connected = false;
            e.status.in_sync = false;
        }
    }

    /// Updates counters for a peer.
    pub(crate) fn count(&self, id: &NodeId, f: impl FnOnce(&mut PeerStatus)) {
        if let Some(e) = self.peers().get_mut(id) {
            f(&mut e.status);
        }
    }
}

async fn accept_loop(
    node: Weak<Inner>,
    endpoint: quinn::Endpoint,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = shutdown.changed() => None,
        };
        let Some(incoming) = incoming else { break };
        let node = node.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "incoming handshake failed");
                    return;
                }
            };
            let Some(node) = Node::upgrade(&node) else {
                return;
            };
            handle_incoming(node, conn).await;
        });
    }
    tracing::debug!("accept loop stopped");
}

async fn handle_incoming(node: Node, conn: quinn::Connection) {
    let Some(peer) = tls::peer_id(&conn) else {
        conn.close(close::PROTOCOL.into(), b"no peer identity");
        return;
    };
    let alpn = tls::alpn(&conn).unwrap_or_default();
    if alpn == tls::ALPN_JOIN {
        if let Err(e) = serve_join(&node, &conn, peer).await {
            tracing::info!(peer = %peer.short(), error = %e, "join refused");
        }
        return;
    }
    if !node.members_ref().is_member(&peer) {
        tracing::info!(peer = %peer.short(), addr = %conn.remote_address(), "refused: not a member");
        conn.close(close::NOT_MEMBER.into(), b"not a member");
        return;
    }
    run_connection(node, conn, peer, false).await;
}

/// Runs a sync session on an established connection until it ends.
/// Connections older than this are not part of a simultaneous dial.
const SIMULTANEOUS: Duration = Duration::from_secs(2);

/// Of two connections between `me` and `peer`, whether the new one replaces the old one (which
/// is `old_age` old and still looks alive here). A node dials only when it holds no live
/// connection, so:
/// - both dialed by the same node: that node lost the old one; the newer wins;
/// - the peer dialed the new one while we hold an established one (older than
///   [`SIMULTANEOUS`]): the peer lost it (it crashed or restarted; without a close frame our
///   side would otherwise wait for the idle timeout); the newer wins;
/// - otherwise both dialed at once: keep the one dialed by the smaller NodeId, which both
///   sides decide alike.
fn keep_new(me: NodeId, peer: NodeId, dialed: bool, old_dialed: bool, old_age: Duration) -> bool {
    if dialed == old_dialed || (!dialed && old_age >= SIMULTANEOUS) {
        return true;
    }
    let dialer_of = |d: bool| if d { me } else { peer };
    dialer_of(dialed) < dialer_of(old_dialed)
}

async fn run_connection(node: Node, conn: quinn::Connection, peer: NodeId, dialed: bool) {
    let Some(net) = node.net() else { return };
    if !net.register(node.id(), peer, &conn, dialed) {
        return;
    }
    tracing::debug!(peer = %peer.short(), addr = %conn.remote_address(), dialed, "peer connected");
    let result = peer::session(&node, &conn, peer, dialed).await;
    if let Err(e) = &result {
        tracing::info!(peer = %peer.short(), error = %e, "sync session ended");
        conn.close(close::PROTOCOL.into(), e.to_string().as_bytes());
    }
    if let Some(net) = node.net() {
        net.unregister(&peer, &conn);
    }
    tracing::debug!(peer = %peer.short(), "peer disconnected");
}

async fn dial_loop(node: Weak<Inner>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => break,
        }
        let Some(node) = Node::upgrade(&node) else {
            break;
        };
        let Some(net) = node.net() else { break };
        let members = node.members_ref().members();
        let now = Instant::now();
        let mut due = Vec::new();
        {
            let mut peers = net.peers();
            for m in members {
                let e = peers.entry(m.id).or_insert_with(|| PeerEntry::new(m.id));
                for a in m.addrs.iter().filter_map(|a| a.parse().ok()) {
                    if !e.addrs.contains(&a) {
                        e.addrs.push(a);
                    }
                }
                let live = e
                    .conn
                    .as_ref()
                    .is_some_and(|(c, _, _)| c.close_reason().is_none());
                if !live && now >= e.next_attempt && !e.addrs.is_empty() {
                    // Back off until the attempt resolves (success resets, failure extends).
                    e.next_attempt = now + MAX_BACKOFF;
                    due.push((m.id, e.addrs.clone()));
                }
            }
        }
        for (id, addrs) in due {
            let node = node.clone();
            tokio::spawn(async move { dial(node, id, addrs).await });
        }
    }
    tracing::debug!("dial loop stopped");
}

fn backoff(failures: u32) -> Duration {
    if failures >= BREAKER_FAILURES {
        return BREAKER_RETRY;
    }
    let base = Duration::from_millis(250) * 2u32.saturating_pow(failures.min(8));
    let jitter = Duration::from_millis(rand::random::<u64>() % 250);
    base.min(MAX_BACKOFF) + jitter
}

async fn dial(node: Node, id: NodeId, addrs: Vec<SocketAddr>) {
    let Some(net) = node.net() else { return };
    let mut last = String::new();
    for addr in addrs {
        match connect(&net.endpoint, &net.sync_client, id, addr).await {
            Ok(conn) => {
                run_connection(node.clone(), conn, id, true).await;
                if let Some(net) = node.net()
                    && let Some(e) = net.peers().get_mut(&id)
                {
                    e.next_attempt = Instant::now() + backoff(0);
                }
                return;
            }
            Err(e) => last = e.to_string(),
        }
    }
    if let Some(e) = net.peers().get_mut(&id) {
        e.failures += 1;
        e.next_attempt = Instant::now() + backoff(e.failures);
        if e.failures == BREAKER_FAILURES {
            tracing::info!(peer = %id.short(), "peer unreachable; trying rarely until it shows up");
        }
    }
    tracing::debug!(peer = %id.short(), error = %last, "dial failed");
}

async fn connect(
    endpoint: &quinn::Endpoint,
    cfg: &quinn::ClientConfig,
    id: NodeId,
    addr: SocketAddr,
) -> Result<quinn::Connection, NetError> {
    let connecting = endpoint
        .connect_with(cfg.clone(), addr, &tls::server_name(&id))
        .map_err(|e| NetError::Unreachable(format!("{addr}: {e}")))?;
    tokio::time::timeout(Duration::from_secs(5), connecting)
        .await
        .map_err(|_| NetError::Unreachable(format!("{addr}: timed out")))?
        .map_err(|e| NetError::Unreachable(format!("{addr}: {e}")))
}

/// Inviter side of the join handshake.
async fn serve_join(node: &Node, conn: &quinn::Connection, peer: NodeId) -> Result<(), NetError> {
    let (mut send, mut recv) = tokio::time::timeout(Duration::from_secs(10), conn.accept_bi())
        .await
        .map_err(|_| NetError::Protocol("join timed out".into()))?
        .map_err(|e| NetError::Protocol(e.to_string()))?;
    let msg = wire::read(&mut recv)
        .await
        .map_err(|e| NetError::Protocol(e.to_string()))?;
    let Some((Msg::JoinRequest { secret, addrs }, _)) = msg else {
        conn.close(close::PROTOCOL.into(), b"expected a join request");
        return Err(NetError::Protocol("expected a join request".into()));
    };
    let reply = match node
        .redeem_invite(&secret, peer, addrs, conn.remote_address())
        .await
    {
        Ok(members) => Msg::JoinAccepted { members },
        Err(e) => Msg::JoinRefused {
            reason: e.to_string(),
        },
    };
    let refused = matches!(reply, Msg::JoinRefused { .. });
    wire::write(&mut send, &reply)
        .await
        .map_err(|e| NetError::Protocol(e.to_string()))?;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    conn.close(close::NORMAL.into(), b"join done");
    if refused {
        return Err(NetError::Refused("invalid invite".into()));
    }
    tracing::info!(peer = %peer.short(), "new member joined");
    Ok(())
}

/// Joiner side: returns the inviter's member list. Tries the invite's addresses, then, if
/// those are stale, wherever mDNS sees the inviter.
pub(crate) async fn join(
    node: &Node,
    invite: &Invite,
) -> Result<Vec<(NodeId, Vec<String>)>, Error> {
    let net = node.net().ok_or(NetError::Disabled)?;
    if now_ms() > invite.expires_at {
        return Err(NetError::Invite(InviteError::Expired).into());
    }
    let mut last = NetError::Unreachable("the invite lists no addresses".into());
    let listed: Vec<SocketAddr> = invite.addrs.iter().filter_map(|a| a.parse().ok()).collect();
    for addr in &listed {
        match join_at(net, invite, *addr).await {
            Err(NetError::Unreachable(e)) => last = NetError::Unreachable(e),
            other => return Ok(other?),
        }
    }
    let mdns_on = net
        .discovery
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_some();
    if mdns_on {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let seen: Vec<SocketAddr> = net
                .nearby()
                .into_iter()
                .filter(|(id, _, _)| *id == invite.inviter)
                .flat_map(|(_, a, _)| a)
                .filter(|a| !listed.contains(a))
                .collect();
            if !seen.is_empty() || Instant::now() > deadline {
                for addr in seen {
                    match join_at(net, invite, addr).await {
                        Err(NetError::Unreachable(e)) => last = NetError::Unreachable(e),
                        other => return Ok(other?),
                    }
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Err(last.into())
}

/// One join attempt at one address. `Unreachable` means: try another address.
async fn join_at(
    net: &Net,
    invite: &Invite,
    addr: SocketAddr,
) -> Result<Vec<(NodeId, Vec<String>)>, NetError> {
    let conn = connect(&net.endpoint, &net.join_client, invite.inviter, addr).await?;
    let result = async {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| NetError::Protocol(e.to_string()))?;
        let req = Msg::JoinRequest {
            secret: invite.secret,
            addrs: net.advertised_addrs(),
        };
        wire::write(&mut send, &req)
            .await
            .map_err(|e| NetError::Protocol(e.to_string()))?;
        let _ = send.finish();
        match wire::read(&mut recv)
            .await
            .map_err(|e| NetError::Protocol(e.to_string()))?
        {
            Some((Msg::JoinAccepted { members }, _)) => Ok(members),
            Some((Msg::JoinRefused { reason }, _)) => Err(NetError::Refused(reason)),
            _ => Err(NetError::Protocol("unexpected reply to join".into())),
        }
    }
    .await;
    conn.close(close::NORMAL.into(), b"join done");
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_of_two_connections_survives() {
        let (small, big) = (NodeId::from_bytes([1; 32]), NodeId::from_bytes([2; 32]));
        let young = Duration::from_millis(100);
        let old = SIMULTANEOUS * 2;
        // Simultaneous dials: whichever arrives second, both sides keep small's dial.
        for age in [young, Duration::ZERO] {
            // On small's side: its own dial is `dialed`, big's is not.
            assert!(!keep_new(small, big, false, true, age));
            assert!(keep_new(small, big, true, false, age));
            // On big's side: small's dial is the peer's.
            assert!(keep_new(big, small, false, true, age));
            assert!(!keep_new(big, small, true, false, age));
        }
        // The same node dialed again: it lost the old one; the newer wins on both sides.
        for age in [young, old] {
            assert!(keep_new(small, big, true, true, age));
            assert!(keep_new(big, small, false, false, age));
        }
        // The peer dials while our established connection looks alive: it restarted.
        assert!(keep_new(small, big, false, true, old));
        assert!(keep_new(big, small, false, true, old));
    }

    #[test]
    fn backoff_grows_with_jitter_and_the_breaker_opens() {
        let mut prev = Duration::ZERO;
        for f in 0..BREAKER_FAILURES {
            let d = backoff(f);
            assert!(d <= MAX_BACKOFF + Duration::from_millis(250), "{f}: {d:?}");
            assert!(
                d + Duration::from_millis(250) >= prev,
                "non-decreasing up to jitter"
            );
            prev = d;
        }
        assert_eq!(backoff(BREAKER_FAILURES), BREAKER_RETRY);
        let samples: std::collections::BTreeSet<_> = (0..20).map(|_| backoff(2)).collect();
        assert!(samples.len() > 1, "jitter");
    }
}
