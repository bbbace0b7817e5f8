//! Anti-entropy by clock digests, and addresses that follow a device, sans IO.
//!
//! Every round ([`EntropyConfig::every`]) a node sends one datagram ([`DatagramKind::Digest`])
//! to a few connected members: the digest of its committed clock, per origin the top of the
//! contiguous prefix it holds (a page of origins per round when there are many), and a few
//! entries of its address book. A receiver compares the page with its own clock:
//!
//! - equal digests: in agreement, nothing to do;
//! - the member holds a delta this node lacks (its prefix top is above ours), or lacks one this
//!   node holds: the gap is remembered with the time it was first seen. A gap that live sync
//!   fills (pushes in flight) disappears by itself. One still open after
//!   [`EntropyConfig::grace`] means no sync will fill it (a push lost to a bug, a half-dead
//!   path): the node asks for an exchange ([`EntropyOutput::Exchange`]: send our clock on the
//!   sync stream, the peer sends what we lack and answers with its clock if it lacks ours).
//!   What this node lacks it pulls from the holder with the lowest round-trip time that is not
//!   busy with a sync already (load balancing); a gap on the member's side waits twice as long,
//!   so the member's own pull goes first.
//!
//! Addresses: each node announces where it can be reached, stamped by itself (a stamp that only
//! grows: its incarnation, then a count of changes), plus what members observe it connect from; entries
//! are relayed to everyone round by round, newest stamp winning, so a laptop that moved to
//! another network is dialed at its new address through what others heard.
//!
//! Every datagram is checked before use: a non-member's, one that does not decode whole, or one
//! with out-of-order or oversized contents is dropped and counted.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use sha2::{Digest, Sha256};

use crate::clock::VersionVector;
use crate::gossip::Dropped;
use crate::id::{DeltaId, NodeId};
use crate::proto::DatagramKind;
use crate::rng::Rng;
use crate::sign::{Signature, Signer, verify};

/// Timing and size of the anti-entropy rounds.
#[derive(Debug, Clone)]
pub struct EntropyConfig {
    /// How often a digest goes out.
    pub every: Duration,
    /// Members sent a digest per round.
    pub fanout: usize,
    /// How long a gap may stay open before an exchange repairs it.
    pub grace: Duration,
    /// Largest datagram sent, tag included (the driver follows its paths' with
    /// [`Entropy::set_max_packet`]); received ones may be up to [`crate::proto::MAX_DATAGRAM`].
    pub max_packet: usize,
}

impl Default for EntropyConfig {
    fn default() -> Self {
        Self {
            every: Duration::from_secs(1),
            fanout: 1,
            grace: Duration::from_secs(3),
            max_packet: 1100,
        }
    }
}

/// Addresses kept per node in the book.
pub const MAX_ADDRS: usize = 8;
/// Book entries per datagram.
const BOOK_PER_ROUND: usize = 3;
/// Rounds that carry a new or changed address entry first (and are not slowed while any
/// does), so a member that moved is known everywhere within seconds.
const HOT_ROUNDS: u32 = 6;
/// Origins listed per datagram at most (fewer if the packet would be too big).
const TOPS_PER_ROUND: usize = 24;

/// Where a node can be reached, as its owner announced and signed it (`stamp`: the owner's, only
/// grows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddrEntry {
    pub node: NodeId,
    pub stamp: u64,
    pub addrs: Vec<SocketAddr>,
    /// `node`'s signature over [`AddrEntry::hash`].
    pub sig: Signature,
}

impl AddrEntry {
    /// An entry for `signer`'s own node, signed.
    pub fn signed(signer: &Signer, stamp: u64, addrs: Vec<SocketAddr>) -> Self {
        let mut e = AddrEntry {
            node: signer.id(),
            stamp,
            addrs,
            sig: Signature::default(),
        };
        e.sig = signer.sign_hash(&e.hash());
        e
    }

    /// What the owner signs: SHA-256 over a domain tag, the node, the stamp and the addresses.
    pub fn hash(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"tandem/addrs/1");
        h.update(self.node.as_bytes());
        h.update(self.stamp.to_be_bytes());
        h.update((self.addrs.len() as u64).to_be_bytes());
        for a in &self.addrs {
            let a = a.to_string();
            h.update((a.len() as u64).to_be_bytes());
            h.update(a.as_bytes());
        }
        h.finalize().into()
    }

    /// Whether its owner signed it as it is.
    pub fn is_authentic(&self) -> bool {
        verify(&self.node, &self.hash(), &self.sig)
    }
}

/// One digest datagram's contents (after the tag byte).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DigestFrame {
    V1(DigestMsg),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestMsg {
    /// [`VersionVector::digest`] of the sender's committed clock.
    pub digest: [u8; 16],
    /// Origins in the sender's clock; `tops` lists those from index `first` on, sorted.
    pub origins: u32,
    pub first: u32,
    /// Per listed origin, the top of the contiguous prefix the sender holds.
    pub tops: Vec<(NodeId, u64)>,
    /// A few entries of the sender's address book.
    pub book: Vec<AddrEntry>,
    /// The sender is not in sync with the receiver: answer with your digest now.
    pub ask: bool,
}

/// A connected member, as the driver sees its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub rtt: Duration,
    /// A catch-up or repair is under way on it.
    pub busy: bool,
    /// Its session says it holds everything we hold.
    pub in_sync: bool,
}

/// What the anti-entropy asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntropyOutput {
    /// Send this datagram (tag included) to member `to`.
    Send { to: NodeId, packet: Vec<u8> },
    /// Start an exchange with `with`: send it our committed clock (`Session::resync`).
    Exchange { with: NodeId },
    /// `with` holds exactly `clock` (our clock; its digest says so): a session with it that
    /// missed acknowledgements learns it is in sync (`Session::handle_peer_clock`).
    Agrees { with: NodeId, clock: VersionVector },
    /// Newer addresses of `node` were heard: dial it there if it is not connected.
    Addresses {
        node: NodeId,
        addrs: Vec<SocketAddr>,
    },
}

/// A gap: which delta, and since when it has been seen open.
type Gap = Option<(Instant, DeltaId)>;

#[derive(Debug, Default)]
struct PeerView {
    digest: Option<[u8; 16]>,
    /// When its last digest arrived.
    heard: Option<Instant>,
    /// Its prefix tops as last heard, across pages.
    tops: BTreeMap<NodeId, u64>,
    /// A delta it holds that we lack.
    lacking: Gap,
    /// A delta we hold that it lacks.
    behind: Gap,
    /// When we last asked it for an exchange.
    exchanged: Option<Instant>,
    /// When we last answered its digest with ours.
    answered: Option<Instant>,
}

/// One node's anti-entropy and address book.
pub struct Entropy {
    me: NodeId,
    cfg: EntropyConfig,
    /// Picks whom to tell; replayable from a seed.
    rng: Rng,
    members: BTreeSet<NodeId>,
    clock: VersionVector,
    digest: [u8; 16],
    /// The clock changed since the gaps were last derived from it.
    clock_moved: bool,
    peers: BTreeMap<NodeId, PeerView>,
    links: BTreeMap<NodeId, Link>,
    /// Owner-signed entries (relayed).
    book: BTreeMap<NodeId, AddrEntry>,
    /// Where members were seen connecting from (local hints, never relayed).
    seen: BTreeMap<NodeId, Vec<SocketAddr>>,
    next_round: Instant,
    next_page: u32,
    book_cursor: usize,
    /// Book entries new or changed here, and how many more rounds carry them first.
    hot: BTreeMap<NodeId, u32>,
    out: VecDeque<EntropyOutput>,
    dropped: BTreeMap<Dropped, u64>,
    exchanges: u64,
}

impl Entropy {
    pub fn new(me: NodeId, cfg: EntropyConfig, seed: u64, now: Instant) -> Self {
        let clock = VersionVector::new();
        Self {
            me,
            cfg,
            rng: Rng(seed),
            members: BTreeSet::new(),
            digest: clock.digest(),
            clock,
            clock_moved: false,
            peers: BTreeMap::new(),
            links: BTreeMap::new(),
            book: BTreeMap::new(),
            seen: BTreeMap::new(),
            next_round: now,
            next_page: 0,
            book_cursor: 0,
            hot: BTreeMap::new(),
            out: VecDeque::new(),
            dropped: BTreeMap::new(),
            exchanges: 0,
        }
    }

    /// The replicated member list: only members are told or heard, and only their addresses
    /// are kept.
    pub fn set_members(&mut self, members: impl IntoIterator<Item = NodeId>) {
        self.members = members.into_iter().filter(|m| *m != self.me).collect();
        let keep = |n: &NodeId| self.members.contains(n);
        self.peers.retain(|n, _| keep(n));
        self.links.retain(|n, _| keep(n));
        let me = self.me;
        self.book
            .retain(|n, _| *n == me || self.members.contains(n));
    }

    /// This node's committed clock.
    pub fn set_clock(&mut self, clock: &VersionVector) {
        if *clock != self.clock {
            self.clock = clock.clone();
            self.digest = clock.digest();
            self.clock_moved = true;
        }
    }

    /// The members connected now, with their round-trip time and whether they are busy.
    pub fn set_links(&mut self, links: impl IntoIterator<Item = (NodeId, Link)>) {
        self.links = links
            .into_iter()
            .filter(|(n, _)| self.members.contains(n))
            .collect();
    }

    /// Where this node can be reached now, signed by `signer` (this node's key; any other is
    /// ignored) and stamped `stamp`: a later start must pass a larger one (the daemon uses its
    /// incarnation, which every start raises, shifted left 24 bits); a change within one start
    /// raises the stamp by one.
    pub fn set_own_addrs(&mut self, signer: &Signer, stamp: u64, mut addrs: Vec<SocketAddr>) {
        if signer.id() != self.me {
            return;
        }
        addrs.truncate(MAX_ADDRS);
        let stamp = match self.book.get(&self.me) {
            Some(e) if e.addrs == addrs => return,
            Some(e) => stamp.max(e.stamp + 1),
            None => stamp,
        };
        self.book
            .insert(self.me, AddrEntry::signed(signer, stamp, addrs));
        self.hot.insert(self.me, HOT_ROUNDS);
    }

    /// `node` was seen connecting from `addr`: a local hint beside what it announced (a device
    /// behind NAT knows its own addresses less well than its peers do), never relayed.
    pub fn observed(&mut self, node: NodeId, addr: SocketAddr) {
        if node == self.me || !self.members.contains(&node) {
            return;
        }
        let seen = self.seen.entry(node).or_default();
        if !seen.contains(&addr) {
            seen.insert(0, addr);
            seen.truncate(MAX_ADDRS);
        }
    }

    /// The addresses known for `node`: what it announced (newest first), then where it was
    /// seen.
    pub fn addrs(&self, node: &NodeId) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = self.book.get(node).map_or(Vec::new(), |e| e.addrs.clone());
        for a in self.seen.get(node).into_iter().flatten() {
            if !out.contains(a) {
                out.push(*a);
            }
        }
        out
    }

    /// Sizes digests sent from now on to `max` bytes (tag included), kept within
    /// 576..=MAX_DATAGRAM.
    pub fn set_max_packet(&mut self, max: usize) {
        self.cfg.max_packet = max.clamp(576, crate::proto::MAX_DATAGRAM);
    }

    /// Digest datagrams dropped so far, by reason.
    pub fn dropped(&self) -> &BTreeMap<Dropped, u64> {
        &self.dropped
    }

    /// Exchanges asked for so far.
    pub fn exchanges(&self) -> u64 {
        self.exchanges
    }

    /// Whether `node`'s last digest equals our clock's.
    pub fn agrees(&self, node: &NodeId) -> bool {
        self.peers
            .get(node)
            .is_some_and(|p| p.digest == Some(self.digest))
    }

    /// Whether `node`'s last digest (if any) differs from our clock's.
    fn disagrees(&self, node: &NodeId) -> bool {
        self.peers
            .get(node)
            .and_then(|p| p.digest)
            .is_some_and(|d| d != self.digest)
    }

    pub fn poll_output(&mut self) -> Option<EntropyOutput> {
        self.out.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        Some(self.next_round)
    }

    /// Connected members not in sync with us, or whose last digest differed.
    fn unsure(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.links
            .iter()
            .filter(|(n, l)| !l.in_sync || self.disagrees(n))
            .map(|(n, _)| *n)
    }

    /// Whether every connected member agrees with us and no address entry is waiting to be
    /// spread: rounds are then four times rarer, and not urgent to the millisecond.
    pub fn is_quiet(&self) -> bool {
        self.hot.is_empty() && self.unsure().next().is_none()
    }

    /// Sends this round's digests, and asks for the exchanges that are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.decide(now);
        if now < self.next_round {
            return;
        }
        // Members not in sync with us, or whose last digest differed, come first (and are asked
        // to answer at once); while there are none, rounds are four times rarer: an idle cluster
        // costs little, and any write makes digests differ again.
        let unsure: Vec<NodeId> = self.unsure().collect();
        let quiet = unsure.is_empty() && self.hot.is_empty();
        self.next_round = now
            + if quiet {
                self.cfg.every * 4
            } else {
                self.cfg.every
            };
        let (mut targets, ask) = if unsure.is_empty() {
            (self.links.keys().copied().collect::<Vec<_>>(), false)
        } else {
            (unsure, true)
        };
        if targets.is_empty() {
            return;
        }
        let packet = self.packet(ask, !quiet);
        for _ in 0..self.cfg.fanout.min(targets.len()) {
            let i = self.rng.below(targets.len() as u64) as usize;
            let to = targets.swap_remove(i);
            self.out.push_back(EntropyOutput::Send {
                to,
                packet: packet.clone(),
            });
        }
    }

    /// This round's datagram: the digest, the next page of prefix tops, the next few book
    /// entries, cut to the size limit. Not `full` (everyone agrees): the digest and one book
    /// entry only; a receiver that finds the digest differs asks for the rest.
    fn packet(&mut self, ask: bool, full: bool) -> Vec<u8> {
        let origins: Vec<(NodeId, u64)> = self
            .clock
            .iter()
            .map(|(o, set)| (*o, set.prefix()))
            .collect();
        if self.next_page as usize >= origins.len() {
            self.next_page = 0;
        }
        let first = self.next_page as usize;
        let mut tops: Vec<(NodeId, u64)> = origins
            .iter()
            .skip(first)
            .take(if full { TOPS_PER_ROUND } else { 0 })
            .copied()
            .collect();
        // Hot entries first, then the rest in turn.
        let per_round = if full || !self.hot.is_empty() {
            BOOK_PER_ROUND
        } else {
            1
        };
        let mut book: Vec<AddrEntry> = Vec::new();
        let hot: Vec<NodeId> = self.hot.keys().copied().take(per_round).collect();
        for node in hot {
            if let Some(e) = self.book.get(&node) {
                book.push(e.clone());
            }
            match self.hot.get_mut(&node) {
                Some(n) if *n > 1 => *n -= 1,
                _ => {
                    self.hot.remove(&node);
                }
            }
        }
        let rest: Vec<&AddrEntry> = self
            .book
            .values()
            .filter(|e| !book.iter().any(|b| b.node == e.node))
            .collect();
        let room = per_round.saturating_sub(book.len()).min(rest.len());
        let picked: Vec<AddrEntry> = (0..room)
            .map(|k| rest[(self.book_cursor + k) % rest.len()].clone())
            .collect();
        self.book_cursor = self.book_cursor.wrapping_add(picked.len());
        book.extend(picked);
        loop {
            let msg = DigestFrame::V1(DigestMsg {
                digest: self.digest,
                origins: origins.len() as u32,
                first: first as u32,
                tops: tops.clone(),
                book: book.clone(),
                ask,
            });
            let mut packet = vec![DatagramKind::Digest as u8];
            if let Ok(body) = postcard::to_stdvec(&msg) {
                packet.extend(body);
            }
            if packet.len() <= self.cfg.max_packet || (tops.len() <= 1 && book.is_empty()) {
                self.next_page = (first + tops.len()) as u32;
                return packet;
            }
            if book.pop().is_none() {
                tops.pop();
            }
        }
    }

    /// A digest datagram from `from` (the connection's pinned NodeId).
    pub fn handle_datagram(&mut self, now: Instant, from: NodeId, packet: &[u8]) {
        match self.check(from, packet) {
            Ok(msg) => self.heard(now, from, msg),
            Err(why) => *self.dropped.entry(why).or_default() += 1,
        }
    }

    fn check(&self, from: NodeId, packet: &[u8]) -> Result<DigestMsg, Dropped> {
        let body = DatagramKind::Digest
            .body(packet)
            .ok_or(Dropped::Malformed)?;
        if !self.members.contains(&from) {
            return Err(Dropped::NotMember);
        }
        let (DigestFrame::V1(msg), rest) =
            postcard::take_from_bytes::<DigestFrame>(body).map_err(|_| Dropped::Malformed)?;
        let sorted = msg.tops.windows(2).all(|w| w[0].0 < w[1].0);
        let fits = (msg.first as u64 + msg.tops.len() as u64) <= msg.origins as u64;
        let book_ok =
            msg.book.len() <= BOOK_PER_ROUND && msg.book.iter().all(|e| e.addrs.len() <= MAX_ADDRS);
        if !rest.is_empty() || !sorted || !fits || !book_ok {
            return Err(Dropped::Malformed);
        }
        // An entry that would replace ours must be its owner's word: one forged, the datagram
        // is dropped whole (its sender lies). Entries no newer than ours are not checked.
        let forged = msg.book.iter().any(|e| {
            let newer = self
                .book
                .get(&e.node)
                .is_none_or(|ours| e.stamp > ours.stamp);
            newer && self.members.contains(&e.node) && !e.is_authentic()
        });
        if forged {
            return Err(Dropped::Forged);
        }
        Ok(msg)
    }

    fn heard(&mut self, now: Instant, from: NodeId, msg: DigestMsg) {
        for entry in msg.book {
            self.learn(entry);
        }
        let view = self.peers.entry(from).or_default();
        // Answer an ask, at most twice a round per member (a member cannot make us flood).
        if msg.ask && view.answered.is_none_or(|t| now >= t + self.cfg.every / 2) {
            view.answered = Some(now);
            let packet = self.packet(false, true);
            self.out.push_back(EntropyOutput::Send { to: from, packet });
        }
        let view = self.peers.entry(from).or_default();
        view.digest = Some(msg.digest);
        view.heard = Some(now);
        if msg.digest == self.digest {
            view.lacking = None;
            view.behind = None;
            self.out.push_back(EntropyOutput::Agrees {
                with: from,
                clock: self.clock.clone(),
            });
            return;
        }
        // The span of origins this page speaks for: ours in it that it does not list, it holds
        // nothing of.
        let lo = (msg.first > 0)
            .then(|| msg.tops.first().map(|t| t.0))
            .flatten();
        let last = msg.first as u64 + msg.tops.len() as u64 == msg.origins as u64;
        let hi = (!last).then(|| msg.tops.last().map(|t| t.0)).flatten();
        if msg.tops.is_empty() && msg.origins > 0 {
            return;
        }
        let mut page: BTreeMap<NodeId, u64> = msg.tops.into_iter().collect();
        for (o, _) in self.clock.iter() {
            let inside = lo.is_none_or(|l| *o >= l) && hi.is_none_or(|h| *o <= h);
            if inside {
                page.entry(*o).or_insert(0);
            }
        }
        for (o, top) in page {
            view.tops.insert(o, top);
        }
        self.gaps(now, from);
    }

    /// Re-derives the gaps with `peer` from its last tops: a gap already open stays open (with
    /// its first-seen time) while the same delta is missing; progress restarts it.
    fn gaps(&mut self, now: Instant, peer: NodeId) {
        let Some(view) = self.peers.get_mut(&peer) else {
            return;
        };
        let mut lacking = None;
        let mut behind = None;
        for (o, top) in &view.tops {
            let ours = self.clock.origin(o).map_or(0, |s| s.prefix());
            if *top > ours && lacking.is_none() {
                lacking = Some(DeltaId {
                    origin: *o,
                    seq: ours + 1,
                });
            }
            if ours > *top && behind.is_none() {
                behind = Some(DeltaId {
                    origin: *o,
                    seq: top + 1,
                });
            }
        }
        let keep = |old: Gap, new: Option<DeltaId>| match (old, new) {
            (Some((t, id)), Some(n)) if id == n => Some((t, id)),
            (_, Some(n)) => Some((now, n)),
            (_, None) => None,
        };
        view.lacking = keep(view.lacking, lacking);
        view.behind = keep(view.behind, behind);
    }

    /// Asks for the exchanges that are due: pulls what we lack from the best holder, and
    /// (later) pushes to a member that still lacks what we hold.
    fn decide(&mut self, now: Instant) {
        let grace = self.cfg.grace;
        let peers: Vec<NodeId> = self.peers.keys().copied().collect();
        // Gaps follow from a member's tops (re-derived when heard) and our clock: re-derive
        // them all only when our clock moved.
        if std::mem::take(&mut self.clock_moved) {
            for p in &peers {
                self.gaps(now, *p);
            }
        }
        let cooled = |v: &PeerView| v.exchanged.is_none_or(|t| now >= t + grace);
        let mut pulled: BTreeSet<DeltaId> = BTreeSet::new();
        for p in &peers {
            let Some(view) = self.peers.get(p) else {
                continue;
            };
            if let Some((since, id)) = view.lacking
                && now >= since + grace
                && !pulled.contains(&id)
            {
                // Every connected holder of it, idle first, then by round-trip time.
                let best = self
                    .peers
                    .iter()
                    .filter(|(_, v)| {
                        v.tops.get(&id.origin).is_some_and(|t| *t >= id.seq) && cooled(v)
                    })
                    .filter_map(|(n, _)| self.links.get(n).map(|l| (l.busy, l.rtt, *n)))
                    .min();
                if let Some((_, _, with)) = best {
                    pulled.insert(id);
                    self.exchange(now, with);
                    // The same gap seen with other holders waits a grace again for this pull.
                    for v in self.peers.values_mut() {
                        if v.lacking.is_some_and(|(_, l)| l == id) {
                            v.lacking = Some((now, id));
                        }
                    }
                }
            }
        }
        for p in &peers {
            let Some(view) = self.peers.get(p) else {
                continue;
            };
            // Its tops may be old: only a digest heard after the grace confirms the gap.
            if let Some((since, _)) = view.behind
                && now >= since + grace * 2
                && view.heard.is_some_and(|h| h >= since + grace)
                && cooled(view)
                && self.links.contains_key(p)
            {
                self.exchange(now, *p);
            }
        }
    }

    fn exchange(&mut self, now: Instant, with: NodeId) {
        if let Some(v) = self.peers.get_mut(&with) {
            v.exchanged = Some(now);
            // Judged afresh from its next digest.
            v.lacking = None;
            v.behind = None;
        }
        self.exchanges += 1;
        self.out.push_back(EntropyOutput::Exchange { with });
    }

    /// An address entry heard from a member (authentic, checked with the datagram): kept if
    /// newer than ours.
    fn learn(&mut self, entry: AddrEntry) {
        if entry.node == self.me || !self.members.contains(&entry.node) {
            return;
        }
        let node = entry.node;
        if self.book.get(&node).is_some_and(|e| entry.stamp <= e.stamp) {
            return;
        }
        let moved = self.book.get(&node).is_none_or(|e| e.addrs != entry.addrs);
        self.book.insert(node, entry);
        self.hot.insert(node, HOT_ROUNDS);
        if moved && !self.links.contains_key(&node) {
            self.out.push_back(EntropyOutput::Addresses {
                node,
                addrs: self.addrs(&node),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A digest datagram made by hand (what a lying or broken member could send).
    fn raw(origins: u32, tops: Vec<(NodeId, u64)>, book: Vec<AddrEntry>) -> Vec<u8> {
        let msg = DigestFrame::V1(DigestMsg {
            digest: [0; 16],
            origins,
            first: 0,
            tops,
            book,
            ask: false,
        });
        let mut p = vec![DatagramKind::Digest as u8];
        p.extend(postcard::to_stdvec(&msg).unwrap());
        p
    }

    fn key(i: u8) -> Signer {
        Signer::from_seed([i; 32])
    }

    fn id(i: u8) -> NodeId {
        key(i).id()
    }

    fn vv(parts: &[(u8, u64)]) -> VersionVector {
        let mut v = VersionVector::new();
        for (o, top) in parts {
            v.insert_range(id(*o), 1, *top);
        }
        v
    }

    fn node(i: u8, now: Instant, clock: &VersionVector) -> Entropy {
        let mut e = Entropy::new(id(i), EntropyConfig::default(), i as u64, now);
        e.set_members([id(1), id(2), id(3)]);
        e.set_clock(clock);
        let links = [1, 2, 3].into_iter().filter(|j| *j != i).map(|j| {
            (
                id(j),
                Link {
                    rtt: Duration::from_millis(j as u64),
                    busy: false,
                    in_sync: false,
                },
            )
        });
        e.set_links(links);
        e
    }

    /// Runs `from`'s rounds until `until`, delivering what it sends to `to`, and returns what
    /// `to` asked for.
    fn rounds(
        from: &mut Entropy,
        to: &mut Entropy,
        t: Instant,
        until: Instant,
    ) -> Vec<EntropyOutput> {
        let mut now = t;
        let mut asked = Vec::new();
        while now <= until {
            from.handle_timeout(now);
            while let Some(o) = from.poll_output() {
                if let EntropyOutput::Send { to: dst, packet } = o
                    && dst == to.me
                {
                    assert!(packet.len() <= 1100);
                    to.handle_datagram(now, from.me, &packet);
                }
            }
            to.handle_timeout(now);
            while let Some(o) = to.poll_output() {
                if !matches!(o, EntropyOutput::Send { .. } | EntropyOutput::Agrees { .. }) {
                    asked.push(o);
                }
            }
            now += Duration::from_millis(100);
        }
        asked
    }

    #[test]
    fn equal_clocks_agree_and_ask_nothing() {
        let t = Instant::now();
        let c = vv(&[(1, 5), (2, 3)]);
        let (mut a, mut b) = (node(1, t, &c), node(2, t, &c));
        let asked = rounds(&mut a, &mut b, t, t + Duration::from_secs(20));
        assert!(asked.is_empty(), "{asked:?}");
        assert!(b.agrees(&id(1)));
        assert!(b.dropped().is_empty());
    }

    #[test]
    fn a_gap_that_stays_open_is_pulled_after_the_grace_and_one_filled_in_time_is_not() {
        let t = Instant::now();
        let (mut a, mut b) = (node(1, t, &vv(&[(1, 5)])), node(2, t, &vv(&[(1, 3)])));
        // Filled (a push arrived) within the grace: nothing asked.
        let asked = rounds(&mut a, &mut b, t, t + Duration::from_secs(2));
        assert!(asked.is_empty());
        b.set_clock(&vv(&[(1, 5)]));
        let later = t + Duration::from_secs(2);
        assert!(rounds(&mut a, &mut b, later, later + Duration::from_secs(10)).is_empty());
        // A delta lost for good: asked for once, after the grace, from the holder.
        a.set_clock(&vv(&[(1, 6)]));
        let later = t + Duration::from_secs(13);
        let asked = rounds(&mut a, &mut b, later, later + Duration::from_millis(2_500));
        assert!(asked.is_empty(), "not before the grace: {asked:?}");
        let asked = rounds(
            &mut a,
            &mut b,
            later + Duration::from_secs(3),
            later + Duration::from_secs(5),
        );
        assert_eq!(asked, vec![EntropyOutput::Exchange { with: id(1) }]);
        // The exchange filled it: nothing more.
        b.set_clock(&vv(&[(1, 6)]));
        let later = later + Duration::from_secs(5);
        assert!(rounds(&mut a, &mut b, later, later + Duration::from_secs(10)).is_empty());
    }

    #[test]
    fn what_we_lack_is_pulled_from_the_nearest_idle_holder() {
        let t = Instant::now();
        let full = vv(&[(1, 9)]);
        let (mut a, mut c) = (node(1, t, &full), node(3, t, &full));
        let mut b = node(2, t, &vv(&[(1, 4)]));
        // Node 1 is 1 ms away, node 3 is 3 ms away; node 1 is busy.
        b.set_links([
            (
                id(1),
                Link {
                    rtt: Duration::from_millis(1),
                    busy: true,
                    in_sync: false,
                },
            ),
            (
                id(3),
                Link {
                    rtt: Duration::from_millis(3),
                    busy: false,
                    in_sync: false,
                },
            ),
        ]);
        let mut asked = Vec::new();
        let mut now = t;
        while now < t + Duration::from_millis(5_500) {
            for x in [&mut a, &mut c] {
                x.handle_timeout(now);
                while let Some(o) = x.poll_output() {
                    if let EntropyOutput::Send { to, packet } = o
                        && to == id(2)
                    {
                        b.handle_datagram(now, x.me, &packet);
                    }
                }
            }
            b.handle_timeout(now);
            while let Some(o) = b.poll_output() {
                if let EntropyOutput::Exchange { with } = o {
                    asked.push(with);
                }
            }
            now += Duration::from_millis(100);
        }
        assert_eq!(asked, vec![id(3)], "one pull, from the idle holder");
    }

    #[test]
    fn many_origins_go_in_pages_that_fit_and_cover_them_all() {
        let t = Instant::now();
        let mut big = VersionVector::new();
        for i in 0..200u32 {
            let mut b = [0u8; 32];
            b[..4].copy_from_slice(&i.to_be_bytes());
            big.insert_range(NodeId::from_bytes(b), 1, 1_000_000 + i as u64);
        }
        let mut a = node(1, t, &big);
        a.set_links([(
            id(2),
            Link {
                rtt: Duration::ZERO,
                busy: false,
                in_sync: false,
            },
        )]);
        let mut b = node(2, t, &VersionVector::new());
        let mut seen = BTreeSet::new();
        let mut now = t;
        for _ in 0..40 {
            a.handle_timeout(now);
            while let Some(o) = a.poll_output() {
                if let EntropyOutput::Send { packet, to } = o {
                    assert!(packet.len() <= 1100, "{}", packet.len());
                    if to == id(2) {
                        let Ok((DigestFrame::V1(m), _)) =
                            postcard::take_from_bytes::<DigestFrame>(&packet[1..])
                        else {
                            panic!("undecodable");
                        };
                        seen.extend(m.tops.iter().map(|t| t.0));
                        b.handle_datagram(now, id(1), &packet);
                    }
                }
            }
            b.handle_timeout(now);
            now += Duration::from_secs(1);
        }
        assert_eq!(seen.len(), 200);
        assert!(b.dropped().is_empty());
        assert!(b.exchanges() >= 1, "the empty node pulled");
    }

    #[test]
    fn bad_datagrams_are_dropped_and_counted() {
        let t = Instant::now();
        let c = vv(&[(1, 5)]);
        let (mut a, mut b) = (node(1, t, &c), node(2, t, &c));
        a.handle_timeout(t);
        let Some(EntropyOutput::Send { packet, .. }) = a.poll_output() else {
            panic!("no digest");
        };
        b.handle_datagram(t, id(9), &packet); // not a member
        b.handle_datagram(t, id(1), &[DatagramKind::Digest as u8, 0xff, 0xff]); // garbage
        let mut trailing = packet.clone();
        trailing.push(0);
        b.handle_datagram(t, id(1), &trailing);
        let mut big = vec![DatagramKind::Digest as u8];
        big.resize(2_000, 0);
        b.handle_datagram(t, id(1), &big);
        // Unsorted tops.
        let tops = vec![(id(1).max(id(2)), 1), (id(1).min(id(2)), 1)];
        b.handle_datagram(t, id(1), &raw(2, tops, vec![]));
        assert_eq!(b.dropped().get(&Dropped::NotMember), Some(&1));
        assert_eq!(b.dropped().get(&Dropped::Malformed), Some(&4));
        assert!(!b.agrees(&id(1)), "nothing was taken from them");
    }

    #[test]
    fn addresses_travel_through_a_member_and_the_newest_stamp_wins() {
        let t = Instant::now();
        let c = VersionVector::new();
        let (mut a, mut b, mut z) = (node(1, t, &c), node(2, t, &c), node(3, t, &c));
        let old: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        let new: SocketAddr = "10.9.9.9:5000".parse().unwrap();
        a.set_own_addrs(&key(1), 100, vec![old]);
        a.set_own_addrs(&key(1), 100, vec![new]);
        // Node 3 is not connected to node 1: it hears of it only through node 2.
        z.set_links([(
            id(2),
            Link {
                rtt: Duration::ZERO,
                busy: false,
                in_sync: false,
            },
        )]);
        b.learn(AddrEntry::signed(&key(1), 100, vec![old]));
        rounds(&mut a, &mut b, t, t + Duration::from_secs(3));
        assert_eq!(
            b.addrs(&id(1)).first(),
            Some(&new),
            "the change raised the stamp"
        );
        let asked = rounds(&mut b, &mut z, t, t + Duration::from_secs(10));
        assert!(
            asked.iter().any(|o| matches!(o, EntropyOutput::Addresses { node, addrs } if *node == id(1) && addrs[0] == new)),
            "{asked:?}"
        );
        // An older stamp changes nothing.
        z.learn(AddrEntry::signed(&key(1), 50, vec![old]));
        assert_eq!(z.addrs(&id(1)).first(), Some(&new));
        // Observed addresses stay local: behind the announced ones here, never relayed.
        let seen: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        b.observed(id(1), seen);
        assert_eq!(b.addrs(&id(1)), vec![new, seen]);
    }

    #[test]
    fn a_member_cannot_forge_or_alter_another_members_addresses() {
        let t = Instant::now();
        let c = VersionVector::new();
        let mut b = node(2, t, &c);
        let real: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        let evil: SocketAddr = "203.0.113.66:1".parse().unwrap();
        b.learn(AddrEntry::signed(&key(1), 100, vec![real]));
        // Node 3 relays an entry for node 1 it made up (signed by itself), and one it altered.
        let mut made_up = AddrEntry::signed(&key(3), u64::MAX, vec![evil]);
        made_up.node = id(1);
        let mut altered = AddrEntry::signed(&key(1), 100, vec![real]);
        altered.stamp = u64::MAX;
        altered.addrs = vec![evil];
        for bad in [made_up, altered] {
            b.handle_datagram(t, id(3), &raw(0, vec![], vec![bad]));
        }
        assert_eq!(b.dropped().get(&Dropped::Forged), Some(&2));
        assert_eq!(b.addrs(&id(1)), vec![real]);
    }

    #[test]
    fn digests_follow_a_smaller_path() {
        let t = Instant::now();
        let mut big = VersionVector::new();
        for i in 0..100u32 {
            let mut b = [0u8; 32];
            b[..4].copy_from_slice(&i.to_be_bytes());
            big.insert_range(NodeId::from_bytes(b), 1, 5);
        }
        let mut a = node(1, t, &big);
        a.set_max_packet(600);
        let mut now = t;
        let mut sent = 0;
        for _ in 0..10 {
            a.handle_timeout(now);
            while let Some(o) = a.poll_output() {
                if let EntropyOutput::Send { packet, .. } = o {
                    assert!(packet.len() <= 600, "{}", packet.len());
                    sent += 1;
                }
            }
            now += Duration::from_secs(1);
        }
        assert!(sent >= 5);
    }
}
