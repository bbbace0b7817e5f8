//! SWIM gossip among members ([foca]), sans IO: who is alive, suspect or down, and since when.
//!
//! [`Gossip`] wraps one foca instance in the style of [`crate::session::Session`]: datagrams and
//! timeouts go in with `now` ([`Gossip::handle_datagram`], [`Gossip::handle_timeout`]),
//! packets to send and health changes come out ([`Gossip::poll_output`]), and
//! [`Gossip::poll_timeout`] says when to call back. foca's timers run on the caller's clock, so
//! the simulator drives it on simulated time, and its randomness comes from a seed.
//!
//! foca authenticates nothing: a datagram is accepted only from a member (the replicated list,
//! [`Gossip::set_members`]), only when the identity it claims is the connection's pinned
//! NodeId, and only when it is addressed to this node; anything else is dropped and counted.
//! Packets carry a one-byte tag ([`DatagramKind::Gossip`]) so gossip bytes never mix with other
//! datagrams, and are at most [`GossipConfig::max_packet`] bytes with it.
//!
//! Identity is `(NodeId, incarnation)`: the node's incarnation counter, renewed on every start,
//! so a restarted member replaces its old identity at once instead of waiting out a suspicion.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::{Duration, Instant};

use foca::{Config, Foca, Member, NoCustomBroadcast, Notification, PostcardCodec, State, Timer};
use rand_pcg::Pcg32;
use serde::{Deserialize, Serialize};

use crate::id::NodeId;
use crate::proto::DatagramKind;

/// A member as gossip knows it: its NodeId and the incarnation of its current start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GossipId {
    pub node: NodeId,
    pub incarnation: u64,
}

impl foca::Identity for GossipId {
    type Addr = NodeId;

    /// Declared down while alive (a long pause, a partition): come back as the next
    /// incarnation.
    fn renew(&self) -> Option<Self> {
        Some(GossipId {
            node: self.node,
            incarnation: self.incarnation.checked_add(1)?,
        })
    }

    fn addr(&self) -> NodeId {
        self.node
    }

    /// The later start wins.
    fn win_addr_conflict(&self, other: &Self) -> bool {
        self.incarnation > other.incarnation
    }
}

/// A member's health as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Alive,
    /// Someone could not reach it; it is declared down unless it answers in time.
    Suspect,
    Down,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Alive => "alive",
            Health::Suspect => "suspect",
            Health::Down => "down",
        }
    }
}

/// A member's health and when it last changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberHealth {
    pub health: Health,
    pub since: Instant,
    pub incarnation: u64,
}

/// Timing and size of the gossip.
#[derive(Debug, Clone)]
pub struct GossipConfig {
    /// How often each node probes one member.
    pub probe_period: Duration,
    /// How long a probe waits for its answer before asking others to probe (must be less than
    /// the period).
    pub probe_rtt: Duration,
    /// Members asked to probe indirectly: one broken path does not make a member suspect.
    pub indirect_probes: usize,
    /// How long a suspect has to refute before it is declared down.
    pub suspect_to_down: Duration,
    /// Largest datagram sent, tag included (quinn's initial `max_datagram_size()` is about
    /// 1,100); the driver follows its paths' with [`Gossip::set_max_packet`]. Received ones may
    /// be up to [`crate::proto::MAX_DATAGRAM`].
    pub max_packet: usize,
    /// How often updates are pushed to a few members between probes.
    pub gossip_every: Duration,
    /// How often a member not heard from (never, or declared down) is asked to introduce
    /// itself again (an `Announce`), so one that comes back is found without a restart here.
    pub announce_every: Duration,
    /// After this long with every member alive and nothing to spread (no health change, no
    /// change of members, no update waiting), the cluster is calm: probes and the periodic
    /// gossip slow to [`GossipConfig::calm_period`]. Anything that happens ends it at once.
    pub calm_after: Duration,
    /// The probe period while calm: an idle cluster of laptops wakes its members less often,
    /// and a crash is still found (within about two periods more than when not calm).
    pub calm_period: Duration,
}

impl Default for GossipConfig {
    fn default() -> Self {
        Self {
            probe_period: Duration::from_secs(2),
            probe_rtt: Duration::from_millis(400),
            indirect_probes: 3,
            suspect_to_down: Duration::from_secs(10),
            max_packet: 1100,
            gossip_every: Duration::from_secs(1),
            announce_every: Duration::from_secs(5),
            calm_after: Duration::from_secs(30),
            calm_period: Duration::from_secs(4),
        }
    }
}

impl GossipConfig {
    fn foca(&self, members: usize) -> Config {
        let n =
            NonZeroU32::new(members.clamp(1, u32::MAX as usize) as u32).unwrap_or(NonZeroU32::MIN);
        let mut c = Config::new_lan(n);
        c.probe_period = self.probe_period;
        c.probe_rtt = self.probe_rtt;
        c.num_indirect_probes =
            NonZeroUsize::new(self.indirect_probes).unwrap_or(NonZeroUsize::MIN);
        c.suspect_to_down_after = self.suspect_to_down;
        // foca sends each update with this many messages, to whoever they go to; a suspect
        // learns it is suspected (and refutes) only if one of them reaches it. At 4 (memberlist's
        // figure for 10 nodes), 10% loss declared ~5 live members down per simulated hour; at
        // 12, none. It costs bytes only while updates are fresh.
        c.max_transmissions = c
            .max_transmissions
            .max(std::num::NonZeroU8::new(12).unwrap_or(std::num::NonZeroU8::MIN));
        c.max_packet_size = NonZeroUsize::new(self.max_packet.saturating_sub(1).max(64))
            .unwrap_or(NonZeroUsize::MIN);
        c.periodic_gossip = Some(foca::PeriodicParams {
            frequency: self.gossip_every,
            num_members: NonZeroUsize::new(3).unwrap_or(NonZeroUsize::MIN),
        });
        // Members come from the replicated list, not from announcements.
        c.periodic_announce = None;
        c
    }
}

/// What the gossip asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GossipOutput {
    /// Send this datagram (tag included) to member `to`.
    Send { to: NodeId, packet: Vec<u8> },
    /// A member's health changed.
    Health { node: NodeId, health: Health },
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dropped {
    /// Not tagged as gossip, empty, over the size limit, or not one whole foca packet.
    Malformed,
    /// From a node not in the member list.
    NotMember,
    /// Its claimed sender is not the connection's peer, or it is addressed to someone else.
    Forged,
    /// foca refused it although it decodes (a message about this node from itself, say).
    Refused,
}

impl Dropped {
    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::Malformed => "malformed",
            Dropped::NotMember => "not_member",
            Dropped::Forged => "forged",
            Dropped::Refused => "refused",
        }
    }
}

/// Collects what foca asks for during one call.
struct Collect<'a> {
    sends: &'a mut Vec<(NodeId, Vec<u8>)>,
    timers: &'a mut Vec<(Timer<GossipId>, Duration)>,
}

impl foca::Runtime<GossipId> for Collect<'_> {
    fn notify(&mut self, _n: Notification<'_, GossipId>) {
        // Health is read from foca's member states after every call (they carry suspicion,
        // which notifications do not).
    }

    fn send_to(&mut self, to: GossipId, data: &[u8]) {
        let mut packet = Vec::with_capacity(data.len() + 1);
        packet.push(DatagramKind::Gossip as u8);
        packet.extend_from_slice(data);
        self.sends.push((to.node, packet));
    }

    fn submit_after(&mut self, event: Timer<GossipId>, after: Duration) {
        self.timers.push((event, after));
    }
}

type FocaT = Foca<GossipId, PostcardCodec, Pcg32, NoCustomBroadcast>;

/// One node's SWIM gossip.
pub struct Gossip {
    me: GossipId,
    cfg: GossipConfig,
    foca: FocaT,
    members: BTreeSet<NodeId>,
    timers: BTreeMap<(Instant, u64), Timer<GossipId>>,
    timer_seq: u64,
    health: BTreeMap<NodeId, MemberHealth>,
    out: VecDeque<GossipOutput>,
    dropped: BTreeMap<Dropped, u64>,
    sends: Vec<(NodeId, Vec<u8>)>,
    new_timers: Vec<(Timer<GossipId>, Duration)>,
    next_announce: Instant,
    /// foca's own incarnation, as its packets carry it: it rises when this node refutes a
    /// suspicion.
    foca_incarnation: u16,
    /// When to tell every member directly that this node is alive (after a refutation).
    refute_at: Vec<Instant>,
    /// When something last happened (see [`GossipConfig::calm_after`]).
    stirred_at: Instant,
}

impl Gossip {
    /// Gossip for node `me`, started at `now`; `seed` drives its random choices.
    pub fn new(me: GossipId, cfg: GossipConfig, seed: u64, now: Instant) -> Self {
        let foca = Foca::new(
            me,
            cfg.foca(1),
            Pcg32::new(seed, 0x0a02_bdbf_7bb3_c0a7),
            PostcardCodec,
        );
        let mut g = Self {
            me,
            cfg,
            foca,
            members: BTreeSet::new(),
            timers: BTreeMap::new(),
            timer_seq: 0,
            health: BTreeMap::new(),
            out: VecDeque::new(),
            dropped: BTreeMap::new(),
            sends: Vec::new(),
            new_timers: Vec::new(),
            next_announce: now,
            foca_incarnation: 0,
            refute_at: Vec::new(),
            stirred_at: now,
        };
        // foca starts probing once it knows a member; nothing to schedule yet.
        g.after_call(now);
        g
    }

    pub fn id(&self) -> GossipId {
        self.me
    }

    /// The replicated member list (this node may be in it). New members are asked to introduce
    /// themselves (and count as down until they are heard from); removed ones are forgotten and
    /// their datagrams dropped.
    pub fn set_members(&mut self, now: Instant, members: impl IntoIterator<Item = NodeId>) {
        let members: BTreeSet<NodeId> =
            members.into_iter().filter(|m| *m != self.me.node).collect();
        if members == self.members {
            return;
        }
        let _ = self.foca.set_config(self.cfg.foca(members.len() + 1));
        self.stir(now);
        let added: Vec<NodeId> = members.difference(&self.members).copied().collect();
        let removed: Vec<NodeId> = self.members.difference(&members).copied().collect();
        self.members = members;
        for node in &added {
            self.health.insert(
                *node,
                MemberHealth {
                    health: Health::Down,
                    since: now,
                    incarnation: 0,
                },
            );
        }
        for node in removed {
            let known: Vec<Member<GossipId>> = self
                .foca
                .iter_membership_state()
                .filter(|m| m.id().node == node)
                .map(|m| Member::new(*m.id(), m.incarnation(), State::Down))
                .collect();
            self.call(now, |foca, rt| {
                let _ = foca.apply_many(known.into_iter(), true, rt);
            });
            self.health.remove(&node);
        }
        self.announce_to(now, added);
    }

    /// A connection to member `node` came up: it is announced to now. An announcement made
    /// before the connection existed was lost, and so is an answer sent while the other side
    /// had not yet taken the connection in; each side announcing once its own side is up makes
    /// the later one heard (the next periodic announcement is seconds away).
    pub fn linked(&mut self, now: Instant, node: NodeId) {
        if self.members.contains(&node) {
            self.announce_to(now, vec![node]);
        }
    }

    /// Sizes packets sent from now on to `max` bytes (tag included), the smallest
    /// `max_datagram_size()` of the member connections, kept within 576..=MAX_DATAGRAM.
    pub fn set_max_packet(&mut self, max: usize) {
        let max = max.clamp(576, crate::proto::MAX_DATAGRAM);
        if max != self.cfg.max_packet {
            self.cfg.max_packet = max;
            let _ = self.foca.set_config(self.cfg.foca(self.members.len() + 1));
        }
    }

    /// Whether `node` is in the member list this gossip follows (not this node itself).
    pub fn is_member(&self, node: &NodeId) -> bool {
        self.members.contains(node)
    }

    /// A datagram from `from` (the connection's pinned NodeId). Anything not gossip from a
    /// member, claiming to be `from`, addressed to this node, is dropped and counted.
    pub fn handle_datagram(&mut self, now: Instant, from: NodeId, packet: &[u8]) {
        let verdict = self.check(from, packet);
        if let Err(why) = verdict {
            *self.dropped.entry(why).or_default() += 1;
            return;
        }
        if self.call(now, |foca, rt| foca.handle_data(&packet[1..], rt).is_err()) {
            *self.dropped.entry(Dropped::Refused).or_default() += 1;
        } else if verdict == Ok(true) {
            self.acked(now, from);
        }
    }

    /// The member being probed answered: the check for its answer (foca's `SendIndirectProbe`
    /// timer, which finds the probe succeeded and does nothing) runs now instead of a probe's
    /// round trip later, which would cost an idle node a wake-up per probe. Should this answer
    /// belong to an earlier probe (it would have been delayed a whole probe period), foca still
    /// lacks one and the early check sends the indirect probes early: sooner, not wrong.
    fn acked(&mut self, now: Instant, from: NodeId) {
        self.move_timers(|at, t| {
            (at > now
                && matches!(t, Timer::SendIndirectProbe { probed_id, .. } if probed_id.node == from))
            .then_some(now)
        });
    }

    /// Moves each pending timer for which `to` names a new deadline (given its deadline).
    fn move_timers(&mut self, to: impl Fn(Instant, &Timer<GossipId>) -> Option<Instant>) {
        let moved: Vec<((Instant, u64), Instant)> = self
            .timers
            .iter()
            .filter_map(|(key, t)| to(key.0, t).map(|at| (*key, at)))
            .collect();
        for (key, at) in moved {
            if let Some(t) = self.timers.remove(&key) {
                self.timers.insert((at, key.1), t);
            }
        }
    }

    /// Checks a datagram before foca sees it; `Ok(true)`: it is an answer to a probe.
    fn check(&self, from: NodeId, packet: &[u8]) -> Result<bool, Dropped> {
        let mut rest = DatagramKind::Gossip
            .body(packet)
            .ok_or(Dropped::Malformed)?;
        if !self.members.contains(&from) {
            return Err(Dropped::NotMember);
        }
        let header: foca::Header<GossipId> =
            foca::Codec::decode_header(&mut PostcardCodec, &mut rest)
                .map_err(|_| Dropped::Malformed)?;
        if header.src.node != from || header.dst.node != self.me.node {
            return Err(Dropped::Forged);
        }
        // The whole packet must decode before foca sees it: foca applies what it read before a
        // decoding error, so a damaged packet could otherwise change state half-way. No custom
        // broadcasts are used, so nothing may follow the member updates.
        if matches!(header.message, foca::Message::Broadcast) {
            return Err(Dropped::Malformed);
        }
        if !rest.is_empty() {
            let [hi, lo, more @ ..] = rest else {
                return Err(Dropped::Malformed);
            };
            rest = more;
            for _ in 0..u16::from_be_bytes([*hi, *lo]) {
                let _: Member<GossipId> = foca::Codec::decode_member(&mut PostcardCodec, &mut rest)
                    .map_err(|_| Dropped::Malformed)?;
            }
            if !rest.is_empty() {
                return Err(Dropped::Malformed);
            }
        }
        Ok(matches!(header.message, foca::Message::Ack { .. }))
    }

    /// Runs the timers that are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.refute_at.first().is_some_and(|t| *t <= now) {
            self.refute_at.remove(0);
            self.announce_to(now, self.members.iter().copied().collect());
        }
        if now >= self.next_announce {
            self.next_announce = now + self.cfg.announce_every;
            let silent: Vec<NodeId> = self
                .health
                .iter()
                .filter(|(_, h)| h.health == Health::Down)
                .map(|(n, _)| *n)
                .collect();
            self.announce_to(now, silent);
        }
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let timer = entry.remove();
            self.call(now, |foca, rt| {
                let _ = foca.handle_timer(timer, rt);
            });
        }
    }

    /// Sends an `Announce` to each of `nodes`: accepted by any incarnation of its addressee,
    /// which learns this node's current identity and incarnation from it (and answers with
    /// what it knows).
    fn announce_to(&mut self, now: Instant, nodes: Vec<NodeId>) {
        self.call(now, |foca, rt| {
            for node in nodes {
                let _ = foca.announce(
                    GossipId {
                        node,
                        incarnation: 0,
                    },
                    &mut *rt,
                );
            }
        });
    }

    /// One call into foca, with what it asks for collected and then turned into outputs,
    /// timers and health changes ([`Gossip::after_call`]).
    fn call<R>(&mut self, now: Instant, f: impl FnOnce(&mut FocaT, &mut Collect<'_>) -> R) -> R {
        let mut rt = Collect {
            sends: &mut self.sends,
            timers: &mut self.new_timers,
        };
        let out = f(&mut self.foca, &mut rt);
        self.after_call(now);
        out
    }

    /// When to call [`Gossip::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let foca = self.timers.first_key_value().map(|((at, _), _)| *at);
        [
            foca,
            Some(self.next_announce),
            self.refute_at.first().copied(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The earliest deadline that should be kept to the runtime's fine step. While calm (see
    /// [`Gossip::is_calm`]) only an answer's check, a suspicion's course or a refutation is;
    /// probes, rounds of gossip and announcements may wait for a coarser grid (the runtime's
    /// choice, said in its docs); otherwise every deadline is.
    pub fn poll_urgent_timeout(&self, now: Instant) -> Option<Instant> {
        if !self.is_calm(now) {
            return self.poll_timeout();
        }
        // Periodic work; what follows from a probe or a suspicion is not.
        let periodic = |t: &Timer<GossipId>| {
            matches!(
                t,
                Timer::ProbeRandomMember(_)
                    | Timer::PeriodicGossip(_)
                    | Timer::PeriodicAnnounce(_)
                    | Timer::PeriodicAnnounceDown(_)
                    | Timer::RemoveDown(_)
            )
        };
        let foca = self
            .timers
            .iter()
            .find(|(_, t)| !periodic(t))
            .map(|((at, _), _)| *at);
        [foca, self.refute_at.first().copied()]
            .into_iter()
            .flatten()
            .min()
    }

    pub fn poll_output(&mut self) -> Option<GossipOutput> {
        self.out.pop_front()
    }

    /// Each member's health as this node sees it.
    pub fn health(&self) -> &BTreeMap<NodeId, MemberHealth> {
        &self.health
    }

    /// Datagrams dropped so far, by reason.
    pub fn dropped(&self) -> &BTreeMap<Dropped, u64> {
        &self.dropped
    }

    /// Whether the cluster is calm at `now` (see [`GossipConfig::calm_after`]).
    pub fn is_calm(&self, now: Instant) -> bool {
        now >= self.stirred_at + self.cfg.calm_after
            && self.foca.updates_backlog() == 0
            && self.refute_at.is_empty()
            && self.health.values().all(|h| h.health == Health::Alive)
    }

    /// Something happened: not calm from now on, and the probes and gossip a calm spell had
    /// put off are due at their normal pace again.
    fn stir(&mut self, now: Instant) {
        self.stirred_at = now;
        let (probe, gossip) = (self.cfg.probe_period, self.cfg.gossip_every);
        self.move_timers(|at, t| {
            let normal = match t {
                Timer::ProbeRandomMember(_) => now + probe,
                Timer::PeriodicGossip(_) => now + gossip,
                _ => return None,
            };
            (at > normal).then_some(normal)
        });
    }

    /// Moves what foca asked for into the outputs and timers, and turns its member states into
    /// health changes.
    fn after_call(&mut self, now: Instant) {
        let mut refuted = false;
        for (to, packet) in self.sends.drain(..) {
            // foca refutes a suspicion of this node by raising its incarnation, which only
            // the members it happens to message soon learn; under loss others may declare this
            // node down meanwhile. So a rise is also told to every member directly, now and
            // twice more.
            if let Ok(h) = foca::Codec::<GossipId>::decode_header(&mut PostcardCodec, &packet[1..])
                && h.src_incarnation > self.foca_incarnation
            {
                self.foca_incarnation = h.src_incarnation;
                refuted = true;
            }
            if self.members.contains(&to) {
                self.out.push_back(GossipOutput::Send { to, packet });
            }
        }
        if refuted {
            self.refute_at = vec![
                now,
                now + Duration::from_secs(1),
                now + Duration::from_secs(3),
            ];
        }
        let calm = self.is_calm(now);
        for (timer, after) in self.new_timers.drain(..) {
            self.timer_seq += 1;
            // While calm, the next probe and the next round of gossip wait longer.
            let after = match timer {
                Timer::ProbeRandomMember(_) | Timer::PeriodicGossip(_) if calm => {
                    after.max(self.cfg.calm_period)
                }
                _ => after,
            };
            self.timers.insert((now + after, self.timer_seq), timer);
        }
        let mut stirred = false;
        // The current identity of each member (the latest incarnation foca keeps).
        let mut states: BTreeMap<NodeId, (u64, Health)> = BTreeMap::new();
        for m in self.foca.iter_membership_state() {
            let id = m.id();
            if !self.members.contains(&id.node) {
                continue;
            }
            let health = match m.state() {
                State::Alive => Health::Alive,
                State::Suspect => Health::Suspect,
                State::Down => Health::Down,
            };
            let e = states.entry(id.node).or_insert((id.incarnation, health));
            if id.incarnation > e.0 {
                *e = (id.incarnation, health);
            }
        }
        for (node, (incarnation, health)) in states {
            let Some(h) = self.health.get_mut(&node) else {
                continue;
            };
            h.incarnation = incarnation;
            if h.health != health {
                h.health = health;
                h.since = now;
                self.out.push_back(GossipOutput::Health { node, health });
                stirred = true;
            }
        }
        if stirred || refuted || self.foca.updates_backlog() > 0 {
            self.stir(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u8) -> NodeId {
        NodeId::from_bytes([i; 32])
    }

    fn gossip(i: u8, now: Instant) -> Gossip {
        let mut g = Gossip::new(
            GossipId {
                node: id(i),
                incarnation: 1,
            },
            GossipConfig::default(),
            i as u64,
            now,
        );
        g.set_members(now, [id(1), id(2), id(3)]);
        g
    }

    /// Nodes 1 and 2, members of each other only (a third that never answers would keep them
    /// from ever being calm).
    fn pair(t: Instant) -> (Gossip, Gossip) {
        let (mut a, mut b) = (gossip(1, t), gossip(2, t));
        a.set_members(t, [id(1), id(2)]);
        b.set_members(t, [id(1), id(2)]);
        (a, b)
    }

    /// Runs two nodes' timers and delivers their packets to each other until `until`.
    fn run(a: &mut Gossip, b: &mut Gossip, from: Instant, until: Instant) -> Vec<Vec<u8>> {
        let mut now = from;
        let mut seen = Vec::new();
        fn step(x: &mut Gossip, y: &mut Gossip, now: Instant, seen: &mut Vec<Vec<u8>>) {
            x.handle_timeout(now);
            while let Some(o) = x.poll_output() {
                if let GossipOutput::Send { to, packet } = o
                    && to == y.id().node
                {
                    seen.push(packet.clone());
                    y.handle_datagram(now, x.id().node, &packet);
                }
            }
        }
        while now < until {
            now += Duration::from_millis(50);
            step(a, b, now, &mut seen);
            step(b, a, now, &mut seen);
        }
        seen
    }

    #[test]
    fn members_probe_each_other_and_a_silent_one_goes_down() {
        let t = Instant::now();
        let (mut a, mut b) = (gossip(1, t), gossip(2, t));
        let packets = run(&mut a, &mut b, t, t + Duration::from_secs(20));
        assert!(!packets.is_empty());
        assert!(
            packets
                .iter()
                .all(|p| p.len() <= 1100 && p[0] == DatagramKind::Gossip as u8)
        );
        assert_eq!(a.health()[&id(2)].health, Health::Alive);
        assert_eq!(b.health()[&id(1)].health, Health::Alive);
        // Node 3 never answers: suspect, then down.
        assert_eq!(a.health()[&id(3)].health, Health::Down);
        assert!(a.dropped().is_empty(), "{:?}", a.dropped());
    }

    #[test]
    fn a_calm_cluster_probes_half_as_often_and_a_change_ends_the_calm() {
        let t = Instant::now();
        let (mut a, mut b) = pair(t);
        let minute = Duration::from_secs(60);
        let busy = run(&mut a, &mut b, t, t + Duration::from_secs(20)).len();
        assert!(!a.is_calm(t + Duration::from_secs(20)));
        run(&mut a, &mut b, t + Duration::from_secs(20), t + minute);
        assert!(a.is_calm(t + minute) && b.is_calm(t + minute));
        let calm = run(
            &mut a,
            &mut b,
            t + minute,
            t + minute + Duration::from_secs(20),
        )
        .len();
        assert!(
            calm * 10 <= busy * 6,
            "calm: {calm} packets in 20 s, busy: {busy}"
        );
        // A new member stirs it: probes are at their normal pace again at once.
        let later = t + minute + Duration::from_secs(20);
        a.set_members(later, [id(1), id(2), id(3)]);
        assert!(!a.is_calm(later));
        let next_probe = a
            .timers
            .iter()
            .filter(|(_, t)| matches!(t, Timer::ProbeRandomMember(_)))
            .map(|(k, _)| k.0)
            .min()
            .unwrap_or(later);
        assert!(next_probe <= later + GossipConfig::default().probe_period);
    }

    #[test]
    fn an_answered_probe_is_checked_at_once_and_calm_leaves_only_that_urgent() {
        let t = Instant::now();
        let (mut a, mut b) = pair(t);
        let minute = t + Duration::from_secs(60);
        run(&mut a, &mut b, t, minute);
        assert!(a.is_calm(minute));
        // While calm, probes and rounds of gossip are not urgent; nothing else is due.
        assert!(a.poll_timeout().is_some());
        assert_eq!(a.poll_urgent_timeout(minute), None);
        // A's next probe goes out: the check for its answer is urgent ...
        let probe_at = a
            .timers
            .iter()
            .find(|(_, t)| matches!(t, Timer::ProbeRandomMember(_)))
            .map(|(k, _)| k.0)
            .unwrap();
        a.handle_timeout(probe_at);
        let check = |g: &Gossip| {
            g.timers
                .iter()
                .find(|(_, t)| matches!(t, Timer::SendIndirectProbe { .. }))
                .map(|(k, _)| k.0)
        };
        let due = check(&a).expect("a probe is followed by its check");
        assert!(due > probe_at);
        assert_eq!(a.poll_urgent_timeout(probe_at), Some(due));
        // ... and once B answers, it runs at once (finding the probe answered), so a calm node
        // does not wake up a round trip later for nothing.
        while let Some(GossipOutput::Send { packet, .. }) = a.poll_output() {
            b.handle_datagram(probe_at, id(1), &packet);
        }
        let mut answered = false;
        while let Some(o) = b.poll_output() {
            if let GossipOutput::Send { packet, .. } = o {
                a.handle_datagram(probe_at, id(2), &packet);
                answered = true;
            }
        }
        assert!(answered);
        assert_eq!(check(&a), Some(probe_at));
        a.handle_timeout(probe_at);
        assert_eq!(check(&a), None);
        assert_eq!(a.poll_urgent_timeout(probe_at), None);
        // Nothing was sent for it (no indirect probe), and B stays alive.
        assert!(a.poll_output().is_none());
        assert_eq!(a.health()[&id(2)].health, Health::Alive);
    }

    #[test]
    fn forged_foreign_garbage_and_oversized_datagrams_are_dropped_and_change_nothing() {
        let t = Instant::now();
        let (mut a, mut b) = (gossip(1, t), gossip(2, t));
        let packets = run(&mut a, &mut b, t, t + Duration::from_secs(3));
        let genuine = packets
            .iter()
            .find(|p| {
                let h: foca::Header<GossipId> =
                    foca::Codec::decode_header(&mut PostcardCodec, &p[1..]).unwrap();
                h.src.node == id(2)
            })
            .unwrap()
            .clone();
        let before = a.health().clone();
        let later = t + Duration::from_secs(3);
        // Node 2's packet on node 3's connection: another member's identity.
        a.handle_datagram(later, id(3), &genuine);
        // From a non-member.
        a.handle_datagram(later, id(9), &genuine);
        // Garbage, untagged, oversized.
        a.handle_datagram(
            later,
            id(2),
            &[DatagramKind::Gossip as u8, 0xff, 0xff, 0xff],
        );
        a.handle_datagram(later, id(2), &[0x00, 1, 2, 3]);
        let mut big = vec![DatagramKind::Gossip as u8];
        big.extend(std::iter::repeat_n(0u8, 2000));
        a.handle_datagram(later, id(2), &big);
        let d = a.dropped();
        assert_eq!(d.get(&Dropped::Forged), Some(&1));
        assert_eq!(d.get(&Dropped::NotMember), Some(&1));
        assert_eq!(d.get(&Dropped::Malformed), Some(&3));
        assert_eq!(a.health(), &before);
        assert!(a.poll_output().is_none(), "nothing answered");
    }

    #[test]
    fn packets_follow_a_smaller_path() {
        let t = Instant::now();
        let (mut a, mut b) = (gossip(1, t), gossip(2, t));
        a.set_max_packet(600);
        b.set_max_packet(600);
        let packets = run(&mut a, &mut b, t, t + Duration::from_secs(10));
        assert!(!packets.is_empty());
        assert!(packets.iter().all(|p| p.len() <= 600));
        assert_eq!(a.health()[&id(2)].health, Health::Alive);
    }

    #[test]
    fn a_restarted_member_replaces_its_old_identity() {
        let t = Instant::now();
        let (mut a, mut b) = (gossip(1, t), gossip(2, t));
        run(&mut a, &mut b, t, t + Duration::from_secs(3));
        let mut b2 = Gossip::new(
            GossipId {
                node: id(2),
                incarnation: 2,
            },
            GossipConfig::default(),
            7,
            t,
        );
        b2.set_members(t, [id(1), id(2), id(3)]);
        let later = t + Duration::from_secs(3);
        run(&mut a, &mut b2, later, later + Duration::from_secs(5));
        assert_eq!(a.health()[&id(2)].health, Health::Alive);
        assert_eq!(a.health()[&id(2)].incarnation, 2);
    }
}
