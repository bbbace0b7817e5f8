//! The gossip task: runs this node's [`tandem_crdt::gossip::Gossip`] (SWIM over foca) on QUIC
//! datagrams of the member connections. Every connection's datagrams come here with the
//! connection's pinned NodeId (the state machine drops what claims another identity); its
//! packets go out on the connection to their member, if there is one (SWIM expects loss). The
//! member list is followed from the host; each member's health is published for status pages.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_crdt::NodeId;
use tandem_crdt::gossip::{Dropped, Gossip, GossipConfig, GossipId, GossipOutput, Health};
use tokio::sync::mpsc;

use super::Shared;

/// A member's health as published: its state and since when (unix ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Published {
    pub health: Health,
    pub since: i64,
}

/// Health by member, and datagrams dropped by reason, for status pages and metrics.
#[derive(Default)]
pub(crate) struct GossipView {
    pub health: BTreeMap<NodeId, Published>,
    pub dropped: BTreeMap<Dropped, u64>,
}

/// A member's health changed (for the event stream: `member_up`, `member_suspect`,
/// `member_down`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthChange {
    pub member: NodeId,
    pub health: Health,
    /// Unix milliseconds.
    pub at: i64,
}

pub(crate) type SharedView = Arc<Mutex<GossipView>>;

/// Reads the published view.
pub(crate) fn read_view<R>(view: &SharedView, f: impl FnOnce(&GossipView) -> R) -> R {
    f(&view.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Datagrams waiting for the gossip task; more are dropped (SWIM tolerates loss).
pub(crate) const QUEUE: usize = 1024;

/// How often the member list is compared with the host's.
const MEMBERS_EVERY: Duration = Duration::from_secs(1);

/// Runs until the node stops.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<(NodeId, bytes::Bytes)>,
    view: SharedView,
) {
    let clock = shared.clock.clone();
    let me = GossipId {
        node: shared.host.id(),
        incarnation: shared.host.incarnation(),
    };
    let mut gossip = Gossip::new(me, GossipConfig::default(), rand::random(), clock.now());
    let mut shutdown = shared.shutdown.clone();
    let mut members_at = clock.now();
    // Published when something shown changed (a health, the members, a drop), not on every
    // datagram.
    let mut stale = true;
    let mut seen = (0usize, 0u64);
    loop {
        let now = clock.now();
        if now >= members_at {
            members_at = now + MEMBERS_EVERY;
            gossip.set_members(now, shared.host.members().into_iter().map(|m| m.id));
        }
        gossip.handle_timeout(now);
        while let Some(out) = gossip.poll_output() {
            match out {
                GossipOutput::Send { to, packet } => {
                    let conn = shared
                        .links
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&to)
                        .cloned();
                    if let Some(conn) = conn {
                        // Too big for this path, or datagrams off: lost, like any datagram.
                        let _ = conn.send_datagram(packet.into());
                    }
                }
                GossipOutput::Health { node, health } => {
                    stale = true;
                    tracing::debug!(peer = %node.short(), health = health.as_str(), "member health");
                    let _ = shared.health_tx.send(HealthChange {
                        member: node,
                        health,
                        at: clock.wall_ms(),
                    });
                    let connected = shared
                        .links
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .contains_key(&node);
                    if health == Health::Alive && !connected {
                        // Others hear from it: dial it now (the dialer may be backing off).
                        let _ = shared.cmds.send(super::driver::Cmd::Learn {
                            id: node,
                            addrs: Vec::new(),
                        });
                    }
                }
            }
        }
        let shown = (
            gossip.health().len(),
            gossip.dropped().values().sum::<u64>(),
        );
        if stale || shown != seen {
            publish(&gossip, &view, clock.wall_ms(), now);
            (stale, seen) = (false, shown);
        }
        let next = gossip
            .poll_timeout()
            .map_or(members_at, |t| t.min(members_at));
        let wait = next.saturating_duration_since(clock.now());
        tokio::select! {
            got = rx.recv() => match got {
                Some((from, data)) => gossip.handle_datagram(clock.now(), from, &data),
                None => return,
            },
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}

fn publish(gossip: &Gossip, view: &SharedView, wall_ms: i64, now: std::time::Instant) {
    let mut v = view.lock().unwrap_or_else(|p| p.into_inner());
    v.health = gossip
        .health()
        .iter()
        .map(|(id, h)| {
            let ago = now.saturating_duration_since(h.since).as_millis() as i64;
            (
                *id,
                Published {
                    health: h.health,
                    since: wall_ms - ago,
                },
            )
        })
        .collect();
    v.dropped = gossip.dropped().clone();
}
