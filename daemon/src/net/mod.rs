//! Networking: carries out what the protocol's state machines (`tandem_crdt::session`,
//! `tandem_crdt::dialer`) ask for, over one QUIC endpoint per node (client and server at once).
//!
//! - `host`: the narrow traits through which `net` sees the node ([`NetHost`]): a replica
//!   (clock, loads, applying remote deltas, the feed of commits) and a read-only membership
//!   view. Nothing here imports the node.
//! - `driver`: the one network task. It owns the [`tandem_crdt::Dialer`], the registry of
//!   connections and the per-peer status, and decides which connections live.
//! - `router`: every stream on a member connection opens with a stream-kind byte; the router
//!   hands each to the layer it belongs to.
//! - `session`: runs a [`tandem_crdt::Session`] on one connection.
//! - `gossip`: SWIM health among members on QUIC datagrams.
//! - `join`: the invite handshake, both sides. `wire`: frames on QUIC streams. `tls`: pinned
//!   raw-key TLS. `discovery`: mDNS.

pub mod discovery;
mod driver;
pub(crate) mod gossip;
mod host;
mod join;
mod router;
mod runtime;
mod session;
pub mod tls;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tandem_crdt::members::MemberList;
use tandem_crdt::proto::RaftMsg;
use tandem_crdt::{NodeId, VersionVector};
use tokio::sync::{mpsc, watch};

use crate::Identity;
use crate::clock::Clock;
pub use crate::members::{Invite, InviteError};
pub(crate) use host::{BoxFuture, Commit, NetHost, RaftLink, Redeem};

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
#[non_exhaustive]
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
    /// It holds exactly what we hold, as it confirmed (its Hello, what it sent, what it
    /// acknowledged storing); what was merely sent to it does not count.
    pub in_sync: bool,
    /// How many of our deltas it has not confirmed holding: what was written since it left
    /// counts too. `None` if it has not connected since this node started.
    pub lacks: Option<u64>,
    /// Why the last connection ended or the last dial failed (cleared when it connects).
    pub error: Option<String>,
    /// Its health as the members' gossip (SWIM) sees it: `alive`, `suspect` (someone could not
    /// reach it; down unless it answers in time) or `down`; `None` for a non-member.
    pub health: Option<&'static str>,
    /// Unix milliseconds since when it has had that health.
    pub health_since: Option<i64>,
    /// What it confirmed holding, kept after it disconnects.
    #[serde(skip)]
    pub(crate) held: Option<VersionVector>,
    /// A catch-up or repair is under way with it (anti-entropy prefers an idle holder).
    #[serde(skip)]
    pub(crate) busy: bool,
}

/// QUIC close codes.
pub(crate) mod close {
    pub const NORMAL: u32 = 0;
    pub const NOT_MEMBER: u32 = 1;
    pub const DUPLICATE: u32 = 2;
    pub const PROTOCOL: u32 = 3;
    pub const REMOVED: u32 = 4;
    pub const SHUTDOWN: u32 = 5;
    pub const TIMEOUT: u32 = 6;
    pub const LOCAL: u32 = 7;
    /// This side dropped damaged deltas from its clock: start again with fresh clocks.
    pub const RESYNC: u32 = 8;
}

/// Per-peer status, written by the driver (connection state) and the sessions (traffic, in
/// sync), read by the node.
pub(crate) type Statuses = Arc<Mutex<BTreeMap<NodeId, PeerStatus>>>;

/// Updates the status of a known peer. Only the driver adds peers (and removes them), so a
/// session's last word about a removed member does not bring it back.
pub(crate) fn with_status(statuses: &Statuses, id: &NodeId, f: impl FnOnce(&mut PeerStatus)) {
    let mut map = statuses.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(s) = map.get_mut(id) {
        f(s);
    }
}

/// The status of `id`, added if new.
fn status_entry(map: &mut BTreeMap<NodeId, PeerStatus>, id: NodeId) -> &mut PeerStatus {
    map.entry(id).or_insert_with(|| PeerStatus {
        id: Some(id),
        ..PeerStatus::default()
    })
}

/// What a session and the driver share about this node's endpoint.
pub(crate) struct Shared {
    pub(crate) host: Arc<dyn NetHost>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) sync_client: quinn::ClientConfig,
    pub(crate) join_client: quinn::ClientConfig,
    pub(crate) statuses: Statuses,
    /// The live connection to each member (kept by the driver), for Raft RPCs.
    pub(crate) links: Mutex<HashMap<NodeId, quinn::Connection>>,
    pub(crate) cmds: mpsc::UnboundedSender<driver::Cmd>,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Datagrams for the gossip task, with the connection's peer.
    pub(crate) gossip_in: mpsc::Sender<(NodeId, bytes::Bytes)>,
    /// Members' health as gossip sees it.
    pub(crate) gossip_view: gossip::SharedView,
    /// Every health change, for whoever listens.
    pub(crate) health_tx: tokio::sync::broadcast::Sender<gossip::HealthChange>,
    /// This node's key: it signs the address entry gossip relays.
    pub(crate) signer: Arc<tandem_crdt::Signer>,
    /// What anti-entropy tells the session with a member.
    pub(crate) session_ctl: tokio::sync::broadcast::Sender<(NodeId, SessionCtl)>,
    /// The member list or the connections changed: the gossip task follows them now rather
    /// than at its next upkeep.
    pub(crate) upkeep_now: tokio::sync::Notify,
}

/// What anti-entropy asks of the session with one member.
#[derive(Debug, Clone)]
pub(crate) enum SessionCtl {
    /// Send it our clock: a gap stayed open ([`tandem_crdt::session::Session::resync`]).
    Resync,
    /// Its digest equals ours: it holds this clock.
    Holds(VersionVector),
}

impl Shared {
    /// Addresses others can dial: the bound one, or for a wildcard bind, loopback and the
    /// address of the interface with the default route.
    pub(crate) fn advertised_addrs(&self) -> Vec<String> {
        let Ok(local) = self.endpoint.local_addr() else {
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
}

/// Nodes seen on the LAN, members or not: addresses and when (unix ms).
type Nearby = Arc<Mutex<BTreeMap<NodeId, (Vec<SocketAddr>, i64)>>>;

/// The network side of a node.
pub(crate) struct Net {
    shared: Arc<Shared>,
    nearby: Nearby,
    discovery: Mutex<Option<discovery::Discovery>>,
    stop: watch::Sender<bool>,
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop();
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
    // Acknowledge at once (with the ACK frequency extension, when the peer has it) rather than
    // after quinn's 25 ms delay. On a LAN the round trip is far below the delay, so a delayed
    // ACK costs each gossip datagram a timer wake-up on the receiver and races the sender's
    // probe timeout (26 ms there): an idle cluster woke up for little but ACKs. Bulk sync
    // sends at most twice as many ACKs (quinn's default acknowledges every other packet).
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(0u32.into());
    t.ack_frequency_config(Some(ack));
    Arc::new(t)
}

/// A QUIC endpoint on a UDP socket bound to `addr`, on [`runtime::QuicRuntime`].
fn endpoint(server: quinn::ServerConfig, addr: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(addr)?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        Arc::new(runtime::QuicRuntime),
    )
}

/// Starts networking for the node behind `host`.
pub(crate) fn start(
    host: Arc<dyn NetHost>,
    clock: Arc<dyn Clock>,
    identity: &Identity,
    cfg: &NetConfig,
) -> Result<Net, NetError> {
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
    let endpoint = match preferred.map(|addr| endpoint(server.clone(), addr)) {
        Some(Ok(e)) => e,
        _ => endpoint(server, cfg.listen).map_err(|source| NetError::Bind {
            addr: cfg.listen,
            source,
        })?,
    };
    let (stop, shutdown) = watch::channel(false);
    let (cmds, rx) = mpsc::unbounded_channel();
    let (gossip_in, gossip_rx) = mpsc::channel(gossip::QUEUE);
    let shared = Arc::new(Shared {
        host,
        clock,
        endpoint,
        sync_client,
        join_client,
        statuses: Arc::new(Mutex::new(BTreeMap::new())),
        links: Mutex::new(HashMap::new()),
        cmds,
        shutdown,
        gossip_in,
        gossip_view: Default::default(),
        health_tx: tokio::sync::broadcast::channel(256).0,
        session_ctl: tokio::sync::broadcast::channel(256).0,
        signer: identity.signer(),
        upkeep_now: tokio::sync::Notify::new(),
    });
    let nearby: Nearby = Arc::new(Mutex::new(BTreeMap::new()));
    let net = Net {
        shared: shared.clone(),
        nearby: nearby.clone(),
        discovery: Mutex::new(None),
        stop,
    };
    if cfg.mdns {
        let port = shared.endpoint.local_addr().map(|a| a.port()).unwrap_or(0);
        let tx = shared.cmds.clone();
        let clock = shared.clock.clone();
        let found = move |id: NodeId, addrs: Vec<SocketAddr>| {
            nearby
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, (addrs.clone(), clock.wall_ms()));
            tx.send(driver::Cmd::Discovered { id, addrs }).is_ok()
        };
        match discovery::start(Box::new(found), shared.host.id(), port, &cfg.interfaces) {
            Ok(d) => *net.discovery.lock().unwrap_or_else(|p| p.into_inner()) = Some(d),
            Err(e) => tracing::warn!(error = %e, "mDNS discovery unavailable; static peers only"),
        }
    }
    tokio::spawn(driver::run(shared.clone(), rx, cfg.peers.clone()));
    tokio::spawn(driver::accept_loop(shared.clone()));
    tokio::spawn(gossip::run(
        shared.clone(),
        gossip_rx,
        shared.gossip_view.clone(),
    ));
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
        let _ = self.stop.send(true);
        self.shared
            .endpoint
            .close(close::SHUTDOWN.into(), b"shutting down");
    }

    /// Waits (at most `limit`) until every connection closed by [`Net::stop`] is drained.
    pub(crate) async fn wait_closed(&self, limit: Duration) {
        if tokio::time::timeout(limit, self.shared.endpoint.wait_idle())
            .await
            .is_err()
        {
            tracing::debug!("connections still closing at shutdown");
        }
    }

    pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
        self.shared.endpoint.local_addr().ok()
    }

    pub(crate) fn advertised_addrs(&self) -> Vec<String> {
        self.shared.advertised_addrs()
    }

    /// Status of every known peer.
    pub(crate) fn statuses(&self) -> Vec<PeerStatus> {
        let map = self
            .shared
            .statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }

    /// Each member's health as gossip sees it, and since when (unix ms).
    pub(crate) fn health(&self) -> BTreeMap<NodeId, (&'static str, i64)> {
        gossip::read_view(&self.shared.gossip_view, |v| {
            v.health
                .iter()
                .map(|(id, h)| (*id, (h.health.as_str(), h.since)))
                .collect()
        })
    }

    /// Every later change of a member's health.
    pub(crate) fn subscribe_health(
        &self,
    ) -> tokio::sync::broadcast::Receiver<gossip::HealthChange> {
        self.shared.health_tx.subscribe()
    }

    /// Anti-entropy exchanges asked for so far.
    pub(crate) fn entropy_exchanges(&self) -> u64 {
        gossip::read_view(&self.shared.gossip_view, |v| v.exchanges)
    }

    /// Gossip datagrams dropped so far, by reason (forged, not a member, malformed, refused).
    pub(crate) fn gossip_dropped(&self) -> Vec<(&'static str, u64)> {
        gossip::read_view(&self.shared.gossip_view, |v| {
            v.dropped
                .iter()
                .map(|(why, n)| (why.as_str(), *n))
                .collect()
        })
    }

    /// Learns addresses for a member (from an invite, a join, config or discovery) and makes
    /// it eligible for an immediate dial.
    pub(crate) fn learn(&self, id: NodeId, addrs: &[SocketAddr]) {
        let _ = self.shared.cmds.send(driver::Cmd::Learn {
            id,
            addrs: addrs.to_vec(),
        });
    }

    /// Restarts every session, so each begins again from the clocks both sides hold now (this
    /// node dropped damaged deltas; its peers believe it holds them).
    pub(crate) fn resync(&self) {
        let _ = self.shared.cmds.send(driver::Cmd::Resync);
    }

    /// Fault injection for tests: cuts the links to `peers` (replacing any earlier cut).
    pub(crate) fn cut(&self, peers: std::collections::HashSet<NodeId>) {
        let _ = self.shared.cmds.send(driver::Cmd::Cut { peers });
    }

    /// This node was removed from the cluster: close every connection, dial no one.
    pub(crate) fn leave(&self) {
        let _ = self.shared.cmds.send(driver::Cmd::Leave);
    }

    /// The member list changed (gossip follows it at once).
    pub(crate) fn members_changed(&self) {
        self.shared.upkeep_now.notify_one();
    }

    /// A member was removed: close its connection and stop dialing it.
    pub(crate) fn remove(&self, id: NodeId) {
        let _ = self.shared.cmds.send(driver::Cmd::Remove { id });
    }

    /// Nodes seen on the LAN with their addresses and when.
    pub(crate) fn nearby(&self) -> Vec<(NodeId, Vec<SocketAddr>, i64)> {
        self.nearby
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, (a, t))| (*id, a.clone(), *t))
            .collect()
    }

    fn mdns_on(&self) -> bool {
        self.discovery
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Joiner side of an invite: proves the secret to the inviter; returns this node's Raft
    /// id and the member list.
    pub(crate) async fn join(
        &self,
        invite: &Invite,
    ) -> Result<(u64, MemberList, SocketAddr), JoinError> {
        join::join(&self.shared, invite, self.mdns_on().then_some(self)).await
    }

    /// Raft's way to members: RPCs on the live connections.
    pub(crate) fn raft_link(&self) -> Arc<dyn RaftLink> {
        Arc::new(RaftStreams {
            shared: Arc::downgrade(&self.shared),
        })
    }
}

/// Raft RPCs as bi streams of kind `Raft` on member connections.
struct RaftStreams {
    shared: std::sync::Weak<Shared>,
}

impl RaftStreams {
    fn link(&self, to: &NodeId) -> Option<quinn::Connection> {
        let shared = self.shared.upgrade()?;
        let links = shared.links.lock().unwrap_or_else(|p| p.into_inner());
        links.get(to).cloned()
    }
}

impl RaftLink for RaftStreams {
    fn call(&self, to: NodeId, msg: RaftMsg) -> BoxFuture<Result<RaftMsg, String>> {
        let conn = self.link(&to);
        Box::pin(async move {
            let conn = conn.ok_or_else(|| format!("not connected to {}", to.short()))?;
            let rpc = async {
                let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
                wire::announce(&mut send, wire::StreamKind::Raft)
                    .await
                    .map_err(|e| e.to_string())?;
                wire::write(&mut send, &msg)
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = send.finish();
                match wire::read::<RaftMsg>(&mut recv).await {
                    Ok(Some((reply, _))) => Ok(reply),
                    Ok(None) => Err("no reply".to_string()),
                    Err(e) => Err(e.to_string()),
                }
            };
            tokio::time::timeout(Duration::from_secs(10), rpc)
                .await
                .map_err(|_| "raft RPC timed out".to_string())?
        })
    }

    fn connected(&self, to: &NodeId) -> bool {
        self.link(to).is_some()
    }

    fn alive(&self, to: &NodeId) -> bool {
        let Some(shared) = self.shared.upgrade() else {
            return false;
        };
        // Only a fresh suspicion counts against a connected member: `down` outlives a partition
        // (it is renewed a while after the heal), and one really gone loses its connection
        // to the idle timeout (30 s).
        self.connected(to)
            && gossip::read_view(&shared.gossip_view, |v| {
                v.health
                    .get(to)
                    .is_none_or(|p| p.health != tandem_crdt::gossip::Health::Suspect)
            })
    }
}

/// Why joining failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Invite(#[from] InviteError),
    #[error(transparent)]
    Net(#[from] NetError),
}
