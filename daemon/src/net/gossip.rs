//! The gossip task: runs this node's [`tandem_crdt::gossip::Gossip`] (SWIM over foca) and its
//! [`tandem_crdt::entropy::Entropy`] (clock digests, addresses) on QUIC datagrams of the member
//! connections. Every connection's datagrams come here with the connection's pinned NodeId
//! (the state machines drop what claims another identity) and go to one or the other by their
//! tag; packets go out on the connection to their member, if there is one (both expect loss).
//! The member list is followed from the host; each member's health is published for status
//! pages; an exchange anti-entropy asks for goes to that member's session; addresses heard
//! of a member not connected go to the dialer.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_crdt::NodeId;
use tandem_crdt::entropy::{Entropy, EntropyConfig, EntropyOutput, Link};
use tandem_crdt::gossip::{Dropped, Gossip, GossipConfig, GossipId, GossipOutput, Health};
use tandem_crdt::proto::DatagramKind;
use tokio::sync::mpsc;

use super::{SessionCtl, Shared};

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
    /// Anti-entropy exchanges asked for (a gap no live sync filled).
    pub exchanges: u64,
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

/// How often the member list is compared with the host's, and anti-entropy told our clock and
/// connections (and at once when the member list or a connection changes).
const UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// The upkeep's pace while the cluster is calm (see [`CALM_GRID_MS`]).
const CALM_UPKEEP_EVERY: Duration = Duration::from_secs(4);

/// How often our own addresses are looked at again (a laptop changes networks).
const OWN_ADDRS_EVERY: Duration = Duration::from_secs(10);

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
    let mut entropy = Entropy::new(
        me.node,
        EntropyConfig::default(),
        rand::random(),
        clock.now(),
    );
    let mut shutdown = shared.shutdown.clone();
    let (mut upkeep_at, mut own_at) = (clock.now(), clock.now());
    let grid_from = crate::wheel::origin();
    // Published when something shown changed (a health, the members, a drop), not on every
    // datagram.
    let mut stale = true;
    let mut seen = (0usize, 0u64);
    // Members connected at the last upkeep.
    let mut linked = std::collections::BTreeSet::new();
    loop {
        let now = clock.now();
        let calm = gossip.is_calm(now) && entropy.is_quiet();
        if now >= upkeep_at {
            upkeep_at = now
                + if calm {
                    CALM_UPKEEP_EVERY
                } else {
                    UPKEEP_EVERY
                };
            follow_members(&shared, now, &mut gossip, &mut entropy);
            let (max, now_linked) = tell_entropy(&shared, &mut entropy);
            if let Some(max) = max {
                // Packets sized to the smallest path, so none is too big for its connection.
                gossip.set_max_packet(max);
                entropy.set_max_packet(max);
            }
            for node in now_linked.difference(&linked) {
                gossip.linked(now, *node);
            }
            linked = now_linked;
        }
        if now >= own_at {
            own_at = now + OWN_ADDRS_EVERY;
            let addrs = shared
                .advertised_addrs()
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect();
            entropy.set_own_addrs(&shared.signer, me.incarnation << 24, addrs);
        }
        gossip.handle_timeout(now);
        entropy.handle_timeout(now);
        while let Some(out) = entropy.poll_output() {
            match out {
                EntropyOutput::Send { to, packet } => send(&shared, to, packet),
                EntropyOutput::Exchange { with } => {
                    tracing::debug!(peer = %with.short(), "anti-entropy: a gap stayed open; exchanging clocks");
                    let _ = shared.session_ctl.send((with, SessionCtl::Resync));
                }
                EntropyOutput::Agrees { with, clock } => {
                    let _ = shared.session_ctl.send((with, SessionCtl::Holds(clock)));
                }
                EntropyOutput::Addresses { node, addrs } => {
                    tracing::debug!(peer = %node.short(), ?addrs, "addresses heard through gossip");
                    let _ = shared
                        .cmds
                        .send(super::driver::Cmd::Heard { id: node, addrs });
                }
            }
        }
        while let Some(out) = gossip.poll_output() {
            match out {
                GossipOutput::Send { to, packet } => send(&shared, to, packet),
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
            gossip.dropped().values().sum::<u64>()
                + entropy.dropped().values().sum::<u64>()
                + entropy.exchanges(),
        );
        if stale || shown != seen {
            publish(&gossip, &entropy, &view, clock.wall_ms(), now);
            (stale, seen) = (false, shown);
        }
        let next = [gossip.poll_timeout(), entropy.poll_timeout()]
            .into_iter()
            .flatten()
            .fold(upkeep_at, |a, t| a.min(t));
        // Timers are coalesced on a grid fixed on the runtime's timer wheel (the state
        // machines' deadlines are not urgent to the millisecond): all due within one step cost
        // one wake-up, which is most of what an idle daemon spends. While calm, probes, rounds
        // and the upkeep share a coarser grid; only what is urgent keeps the fine one.
        let now = clock.now();
        let wait = if calm {
            let urgent = gossip.poll_urgent_timeout(now);
            let relaxed = coalesce(grid_from, now, next, CALM_GRID_MS);
            urgent.map_or(relaxed, |u| {
                relaxed.min(coalesce(grid_from, now, u, GRID_MS))
            })
        } else {
            coalesce(grid_from, now, next, GRID_MS)
        };
        tokio::select! {
            got = rx.recv() => match got {
                Some((from, data)) => {
                    let now = clock.now();
                    if !gossip.is_member(&from) && shared.host.is_member(&from) {
                        // Admitted since the last upkeep (a joiner's first datagrams): follow
                        // the member list now rather than drop them as a non-member's.
                        follow_members(&shared, now, &mut gossip, &mut entropy);
                    }
                    if data.first() == Some(&(DatagramKind::Digest as u8)) {
                        entropy.handle_datagram(now, from, &data)
                    } else {
                        gossip.handle_datagram(now, from, &data)
                    }
                }
                None => return,
            },
            _ = tokio::time::sleep(wait) => {}
            _ = shared.upkeep_now.notified() => upkeep_at = clock.now(),
            _ = shutdown.changed() => return,
        }
    }
}

/// Timer grid of the gossip task, in milliseconds: four slots of tokio's timer wheel, so a
/// wake-up on the grid is also one on the wheel's boundaries ([`crate::wheel`]).
const GRID_MS: u64 = 256;

/// The grid of what is not urgent while the cluster is calm (every member alive, nothing to
/// spread, every connected member's clock digest equal to ours): one slot of the wheel's third
/// level, so the probe, the gossip round, the digest round, the upkeep, Raft's steady upkeep
/// and QUIC's keep-alives all fall due on the same wake-up, about every 4 s.
const CALM_GRID_MS: u64 = crate::wheel::LEVEL2;

/// How long to wait from `now` for the first point of the grid (every `grid` ms from `from`)
/// at or after `next`.
fn coalesce(
    from: std::time::Instant,
    now: std::time::Instant,
    next: std::time::Instant,
    grid: u64,
) -> Duration {
    crate::wheel::round_up(from, next, grid).saturating_duration_since(now)
}

/// Gives both state machines the host's member list.
fn follow_members(
    shared: &Shared,
    now: std::time::Instant,
    gossip: &mut Gossip,
    entropy: &mut Entropy,
) {
    let members: Vec<NodeId> = shared.host.members().into_iter().map(|m| m.id).collect();
    gossip.set_members(now, members.iter().copied());
    entropy.set_members(members);
}

/// Sends a datagram to member `to` on its connection, if there is one. Too big for this path,
/// or datagrams off: lost, like any datagram.
fn send(shared: &Shared, to: NodeId, packet: Vec<u8>) {
    let conn = shared
        .links
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&to)
        .cloned();
    if let Some(conn) = conn {
        let _ = conn.send_datagram(packet.into());
    }
}

/// Tells anti-entropy our committed clock and each connected member's round-trip time, whether
/// its session is busy or in sync, and the address it connected from. Returns the smallest
/// datagram size the connections allow (`None` without connections) and the members connected.
fn tell_entropy(
    shared: &Shared,
    entropy: &mut Entropy,
) -> (Option<usize>, std::collections::BTreeSet<NodeId>) {
    let ours = shared.host.clock();
    let conns: Vec<(NodeId, quinn::Connection)> = shared
        .links
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(id, c)| (*id, c.clone()))
        .collect();
    let statuses = shared.statuses.lock().unwrap_or_else(|p| p.into_inner());
    let links: Vec<(NodeId, Link)> = conns
        .iter()
        .map(|(id, c)| {
            let s = statuses.get(id);
            let in_sync = s
                .and_then(|s| s.held.as_ref())
                .is_some_and(|h| h.missing_count(&ours) == 0);
            let busy = s.is_some_and(|s| s.busy);
            (
                *id,
                Link {
                    rtt: c.rtt(),
                    busy,
                    in_sync,
                },
            )
        })
        .collect();
    drop(statuses);
    entropy.set_clock(&ours);
    entropy.set_links(links);
    for (id, c) in &conns {
        entropy.observed(*id, c.remote_address());
    }
    let max = conns
        .iter()
        .filter_map(|(_, c)| c.max_datagram_size())
        .min();
    (max, conns.iter().map(|(id, _)| *id).collect())
}

fn publish(
    gossip: &Gossip,
    entropy: &Entropy,
    view: &SharedView,
    wall_ms: i64,
    now: std::time::Instant,
) {
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
    for (why, n) in entropy.dropped() {
        *v.dropped.entry(*why).or_default() += n;
    }
    v.exchanges = entropy.exchanges();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_wake_on_one_grid_fixed_from_the_start() {
        let from = std::time::Instant::now();
        let ms = |n: u64| from + Duration::from_millis(n);
        // (now, next, grid) -> wait, in ms. Deadlines within one step share its end, whenever
        // they are asked for; on a grid point: no extra step; overdue: at once.
        for (now, next, grid, wait) in [
            (10, 260, 256, 502),
            (300, 499, 256, 212),
            (300, 512, 256, 212),
            (300, 4000, 4096, 3796),
            (0, 0, 256, 0),
            (900, 100, 256, 0),
        ] {
            assert_eq!(
                coalesce(from, ms(now), ms(next), grid),
                Duration::from_millis(wait),
                "now {now} ms, next {next} ms, grid {grid} ms"
            );
        }
    }
}
