//! Which members to dial and when, and which of two connections to a peer survives: a sans-IO
//! state machine driven by `now` and an rng, stepped by the daemon's network driver and by the
//! simulator alike.
//!
//! - A member with addresses and no live connection is dialed when due. A failed dial backs
//!   off `base × 2^failures` (capped) plus random jitter; after
//!   [`DialerConfig::breaker_failures`] failures the circuit breaker opens and it is tried
//!   only every [`DialerConfig::breaker_retry`], until something says it is back
//!   ([`Dialer::learn`]: mDNS saw it, config named it) or it connects to us.
//! - One connection per pair: see [`Dialer::connected`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand_core::RngCore;

use crate::id::NodeId;

/// Tunables of the dialer.
#[derive(Debug, Clone)]
pub struct DialerConfig {
    /// Backoff after the first failure (and the pause before redialing a peer that left).
    pub base: Duration,
    pub max_backoff: Duration,
    /// Random extra delay, up to this, on every backoff.
    pub jitter: Duration,
    /// Failures after which the circuit breaker opens.
    pub breaker_failures: u32,
    /// How often a peer behind an open breaker is tried.
    pub breaker_retry: Duration,
    /// Connections younger than this are part of a simultaneous dial.
    pub simultaneous: Duration,
}

impl Default for DialerConfig {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(250),
            max_backoff: Duration::from_secs(30),
            jitter: Duration::from_millis(250),
            breaker_failures: 6,
            breaker_retry: Duration::from_secs(300),
            simultaneous: Duration::from_secs(2),
        }
    }
}

/// A connection's identity, chosen by the driver (unique per node).
pub type ConnId = u64;

/// What to do with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Keep it; close `replaces` (an older connection to the same peer) if any.
    Accept { replaces: Option<ConnId> },
    /// Close it: the existing connection wins.
    Refuse,
}

/// A dial to make now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dial {
    pub peer: NodeId,
    /// Try these in order.
    pub addrs: Vec<SocketAddr>,
}

/// How a peer looks to the dialer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialState {
    Connected,
    /// A dial is under way.
    Dialing,
    /// Not connected, no failed dial since we last heard of it: expect it soon.
    Connecting,
    /// Dials failed this many times in a row; the next one is scheduled.
    Backoff {
        failures: u32,
    },
    /// Too many failures: tried rarely until it shows up.
    BreakerOpen,
    /// No address to dial.
    NoAddress,
}

#[derive(Debug, Clone)]
struct Conn {
    id: ConnId,
    dialed: bool,
    since: Instant,
}

#[derive(Debug, Clone)]
struct Peer {
    addrs: Vec<SocketAddr>,
    failures: u32,
    next_attempt: Instant,
    dialing: bool,
    conn: Option<Conn>,
}

impl Peer {
    /// Schedules the next dial after an attempt that went well (failures forgotten, a short
    /// pause) or badly (one more failure, a longer wait).
    fn schedule(&mut self, cfg: &DialerConfig, ok: bool, now: Instant, rng: &mut impl RngCore) {
        self.failures = if ok {
            0
        } else {
            self.failures.saturating_add(1)
        };
        self.next_attempt = now + backoff(cfg, self.failures, rng);
    }
}

/// The dialer of one node.
#[derive(Debug, Clone)]
pub struct Dialer {
    me: NodeId,
    cfg: DialerConfig,
    peers: BTreeMap<NodeId, Peer>,
}

impl Dialer {
    pub fn new(me: NodeId, cfg: DialerConfig) -> Self {
        Self {
            me,
            cfg,
            peers: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &DialerConfig {
        &self.cfg
    }

    fn peer(&mut self, id: NodeId, now: Instant) -> &mut Peer {
        self.peers.entry(id).or_insert_with(|| Peer {
            addrs: Vec::new(),
            failures: 0,
            next_attempt: now,
            dialing: false,
            conn: None,
        })
    }

    /// Adds a member to dial (or more addresses for one), keeping its backoff.
    pub fn add(&mut self, id: NodeId, addrs: &[SocketAddr], now: Instant) {
        if id == self.me {
            return;
        }
        let p = self.peer(id, now);
        for a in addrs {
            if !p.addrs.contains(a) {
                p.addrs.push(*a);
            }
        }
    }

    /// The member was just reached at `addr` (it connected from there, or our dial to it
    /// answered): try it first from now on.
    pub fn prefer(&mut self, id: NodeId, addr: SocketAddr, now: Instant) {
        if id == self.me {
            return;
        }
        let p = self.peer(id, now);
        p.addrs.retain(|a| *a != addr);
        p.addrs.insert(0, addr);
    }

    /// Something says the member is at `addrs` now (mDNS, config, a join): add them, close the
    /// breaker and make it due at once.
    pub fn learn(&mut self, id: NodeId, addrs: &[SocketAddr], now: Instant) {
        if id == self.me {
            return;
        }
        self.add(id, addrs, now);
        let p = self.peer(id, now);
        p.failures = 0;
        p.next_attempt = now;
    }

    /// Stops dialing `id` (it is no longer a member); returns its live connection, to close.
    pub fn remove(&mut self, id: &NodeId) -> Option<ConnId> {
        self.peers.remove(id).and_then(|p| p.conn).map(|c| c.id)
    }

    /// Every peer the dialer knows.
    pub fn peers(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.peers.keys().copied()
    }

    /// The addresses known for `id`.
    pub fn addrs(&self, id: &NodeId) -> &[SocketAddr] {
        self.peers.get(id).map_or(&[], |p| &p.addrs)
    }

    /// The next dial due at `now`, if any; it counts as under way until
    /// [`Dialer::dial_failed`] or [`Dialer::connected`].
    pub fn poll_dial(&mut self, now: Instant) -> Option<Dial> {
        let (id, p) = self.peers.iter_mut().find(|(_, p)| {
            p.conn.is_none() && !p.dialing && !p.addrs.is_empty() && now >= p.next_attempt
        })?;
        p.dialing = true;
        Some(Dial {
            peer: *id,
            addrs: p.addrs.clone(),
        })
    }

    /// When the next dial falls due (for the driver's timer).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.peers
            .values()
            .filter(|p| p.conn.is_none() && !p.dialing && !p.addrs.is_empty())
            .map(|p| p.next_attempt)
            .min()
    }

    /// Every address of a dial failed.
    pub fn dial_failed(&mut self, id: &NodeId, now: Instant, rng: &mut impl RngCore) {
        if let Some(p) = self.peers.get_mut(id) {
            p.dialing = false;
            p.schedule(&self.cfg, false, now, rng);
        }
    }

    /// A connection to `id` is established (`dialed` by us or not). One connection per pair,
    /// and both sides decide alike: a node dials only while it holds no live connection, so
    /// if one exists,
    /// - both were dialed by the same node: it lost the old one (crash, restart, network
    ///   change); the newer wins;
    /// - the peer dialed while we hold an established one (older than
    ///   [`DialerConfig::simultaneous`]): the peer lost its side without a close frame (it was
    ///   killed, or slept); the newer wins, instead of waiting for the idle timeout;
    /// - otherwise both dialed at once: the connection dialed by the smaller NodeId wins.
    pub fn connected(&mut self, id: NodeId, conn: ConnId, dialed: bool, now: Instant) -> Admit {
        let me = self.me;
        let simultaneous = self.cfg.simultaneous;
        let p = self.peer(id, now);
        if dialed {
            p.dialing = false;
        }
        let replaces = match &p.conn {
            Some(old) => {
                let age = now.saturating_duration_since(old.since);
                if !keep_new(me, id, dialed, old.dialed, age, simultaneous) {
                    return Admit::Refuse;
                }
                Some(old.id)
            }
            None => None,
        };
        p.conn = Some(Conn {
            id: conn,
            dialed,
            since: now,
        });
        Admit::Accept { replaces }
    }

    /// A connection ended. `healthy`: its session worked and ended for an ordinary reason
    /// (the network, a restart): failures are forgotten and the peer is redialed after a
    /// short pause. Otherwise (the peer refused us, or the session broke) it counts as a
    /// failure: a handshake that succeeds only to fail again must not reset the backoff.
    pub fn disconnected(
        &mut self,
        id: &NodeId,
        conn: ConnId,
        healthy: bool,
        now: Instant,
        rng: &mut impl RngCore,
    ) {
        if let Some(p) = self.peers.get_mut(id)
            && p.conn.as_ref().is_some_and(|c| c.id == conn)
        {
            p.conn = None;
            p.schedule(&self.cfg, healthy, now, rng);
        }
    }

    /// The live connection to `id`, if any.
    pub fn connection(&self, id: &NodeId) -> Option<ConnId> {
        self.peers.get(id)?.conn.as_ref().map(|c| c.id)
    }

    /// How `id` looks from here.
    pub fn state(&self, id: &NodeId) -> DialState {
        let Some(p) = self.peers.get(id) else {
            return DialState::NoAddress;
        };
        if p.conn.is_some() {
            DialState::Connected
        } else if p.dialing && p.failures == 0 {
            DialState::Dialing
        } else if p.addrs.is_empty() {
            DialState::NoAddress
        } else if p.failures == 0 {
            DialState::Connecting
        } else if p.failures >= self.cfg.breaker_failures {
            DialState::BreakerOpen
        } else {
            DialState::Backoff {
                failures: p.failures,
            }
        }
    }
}

/// Of two connections, whether the new one replaces the old one. See [`Dialer::connected`].
fn keep_new(
    me: NodeId,
    peer: NodeId,
    dialed: bool,
    old_dialed: bool,
    old_age: Duration,
    simultaneous: Duration,
) -> bool {
    if dialed == old_dialed || (!dialed && old_age >= simultaneous) {
        return true;
    }
    let dialer_of = |d: bool| if d { me } else { peer };
    dialer_of(dialed) < dialer_of(old_dialed)
}

/// The wait before the next dial after `failures` failures in a row.
pub fn backoff(cfg: &DialerConfig, failures: u32, rng: &mut impl RngCore) -> Duration {
    if failures >= cfg.breaker_failures {
        return cfg.breaker_retry;
    }
    let base = cfg.base * 2u32.saturating_pow(failures.min(16));
    let jitter_ms = cfg.jitter.as_millis() as u64;
    let jitter = if jitter_ms == 0 {
        Duration::ZERO
    } else {
        Duration::from_millis(rng.next_u64() % jitter_ms)
    };
    base.min(cfg.max_backoff) + jitter
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A counter as the rng: every test replays exactly.
    struct Counter(u64);
    impl RngCore for Counter {
        fn next_u32(&mut self) -> u32 {
            self.next_u64() as u32
        }
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(97);
            self.0
        }
        fn fill_bytes(&mut self, dst: &mut [u8]) {
            for b in dst {
                *b = self.next_u64() as u8;
            }
        }
    }

    fn n(i: u8) -> NodeId {
        NodeId::from_bytes([i; 32])
    }

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    #[test]
    fn backoff_schedule_grows_with_jitter_then_the_breaker_opens_and_learning_closes_it() {
        let t0 = Instant::now();
        let mut rng = Counter(0);
        let mut d = Dialer::new(n(1), DialerConfig::default());
        d.add(n(2), &[addr(1)], t0);
        let cfg = d.config().clone();
        let mut now = t0;
        let mut waits = Vec::new();
        for failures in 1..=cfg.breaker_failures {
            let dial = d.poll_dial(now).expect("due");
            assert_eq!(dial.addrs, vec![addr(1)]);
            assert_eq!(d.poll_dial(now), None, "one dial at a time");
            d.dial_failed(&n(2), now, &mut rng);
            let next = d.poll_timeout().unwrap();
            let wait = next - now;
            waits.push(wait);
            let base = (cfg.base * 2u32.pow(failures.min(16))).min(cfg.max_backoff);
            if failures < cfg.breaker_failures {
                assert!(
                    wait >= base && wait < base + cfg.jitter,
                    "{failures}: {wait:?}"
                );
                assert_eq!(d.state(&n(2)), DialState::Backoff { failures });
            } else {
                assert_eq!(wait, cfg.breaker_retry);
                assert_eq!(d.state(&n(2)), DialState::BreakerOpen);
            }
            assert_eq!(
                d.poll_dial(next - Duration::from_millis(1)),
                None,
                "not yet"
            );
            now = next;
        }
        assert!(waits.windows(2).all(|w| w[1] + cfg.jitter >= w[0]));
        // mDNS sees it again: the breaker closes and it is due at once.
        d.learn(n(2), &[addr(2)], now);
        assert_eq!(d.state(&n(2)), DialState::Connecting);
        assert_eq!(d.poll_dial(now).unwrap().addrs, vec![addr(1), addr(2)]);
        // Jitter differs between draws.
        let a = backoff(&cfg, 2, &mut rng);
        let b = backoff(&cfg, 2, &mut rng);
        assert_ne!(a, b);
    }

    #[test]
    fn a_connection_resets_failures_and_a_drop_redials_soon() {
        let t0 = Instant::now();
        let mut rng = Counter(5);
        let mut d = Dialer::new(n(1), DialerConfig::default());
        d.add(n(2), &[addr(1)], t0);
        assert!(d.poll_dial(t0).is_some());
        d.dial_failed(&n(2), t0, &mut rng);
        let t1 = d.poll_timeout().unwrap();
        assert!(d.poll_dial(t1).is_some());
        assert_eq!(
            d.connected(n(2), 7, true, t1),
            Admit::Accept { replaces: None }
        );
        assert_eq!(d.state(&n(2)), DialState::Connected);
        assert_eq!(d.poll_timeout(), None, "nothing to dial while connected");
        d.disconnected(&n(2), 7, true, t1, &mut rng);
        let t2 = d.poll_timeout().unwrap();
        assert!(t2 - t1 < d.config().base + d.config().jitter);
        assert_eq!(d.state(&n(2)), DialState::Connecting);
        // A stale disconnect (of a connection already replaced) changes nothing.
        assert!(d.poll_dial(t2).is_some());
        d.connected(n(2), 8, true, t2);
        d.disconnected(&n(2), 7, true, t2, &mut rng);
        assert_eq!(d.connection(&n(2)), Some(8));
        assert_eq!(
            d.remove(&n(2)),
            Some(8),
            "removal hands back the connection to close"
        );
        assert_eq!(d.poll_dial(t2 + Duration::from_secs(999)), None);
    }

    #[test]
    fn a_peer_that_accepts_then_fails_backs_off_like_a_failed_dial() {
        let t0 = Instant::now();
        let mut rng = Counter(3);
        let mut d = Dialer::new(n(1), DialerConfig::default());
        d.add(n(2), &[addr(1)], t0);
        let mut now = t0;
        let mut waits = Vec::new();
        for conn in 1..=4 {
            assert!(d.poll_dial(now).is_some());
            d.connected(n(2), conn, true, now);
            // The handshake worked, then the peer refused us (or sent garbage).
            d.disconnected(&n(2), conn, false, now, &mut rng);
            let next = d.poll_timeout().unwrap();
            waits.push(next - now);
            now = next;
        }
        assert_eq!(d.state(&n(2)), DialState::Backoff { failures: 4 });
        assert!(waits.windows(2).all(|w| w[1] > w[0]), "growing: {waits:?}");
        // A session that works and then ends for an ordinary reason forgets the failures.
        assert!(d.poll_dial(now).is_some());
        d.connected(n(2), 9, true, now);
        d.disconnected(&n(2), 9, true, now, &mut rng);
        assert_eq!(d.state(&n(2)), DialState::Connecting);
    }

    #[test]
    fn simultaneous_dials_from_both_sides_keep_the_same_connection() {
        let t0 = Instant::now();
        let (small, big) = (n(1), n(2));
        let mut ds = Dialer::new(small, DialerConfig::default());
        let mut db = Dialer::new(big, DialerConfig::default());
        ds.add(big, &[addr(2)], t0);
        db.add(small, &[addr(1)], t0);
        assert!(ds.poll_dial(t0).is_some());
        assert!(db.poll_dial(t0).is_some());
        // Connection 10 is small's dial, 20 is big's; each side sees them in either order.
        // `arrive` feeds both to a dialer and returns what it said of the second.
        let arrive = |d: &Dialer, peer, first: (ConnId, bool), second: (ConnId, bool)| {
            let mut d = d.clone();
            let t = t0 + Duration::from_millis(5);
            assert_eq!(
                d.connected(peer, first.0, first.1, t),
                Admit::Accept { replaces: None }
            );
            let admit = d.connected(peer, second.0, second.1, t);
            (admit, d.connection(&peer))
        };
        // Small's side: its own dial (10) wins whichever came first.
        assert_eq!(
            arrive(&ds, big, (10, true), (20, false)),
            (Admit::Refuse, Some(10))
        );
        assert_eq!(
            arrive(&ds, big, (20, false), (10, true)),
            (Admit::Accept { replaces: Some(20) }, Some(10))
        );
        // Big's side: small's dial (10) wins too.
        assert_eq!(
            arrive(&db, small, (20, true), (10, false)),
            (Admit::Accept { replaces: Some(20) }, Some(10))
        );
        assert_eq!(
            arrive(&db, small, (10, false), (20, true)),
            (Admit::Refuse, Some(10))
        );
    }

    #[test]
    fn a_restarted_peer_replaces_its_stale_connection() {
        let t0 = Instant::now();
        let mut d = Dialer::new(n(2), DialerConfig::default());
        d.add(n(1), &[addr(1)], t0);
        assert!(d.poll_dial(t0).is_some());
        d.connected(n(1), 1, true, t0);
        // Long after, the peer dials us: it lost its side (killed). The new one wins.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(
            d.connected(n(1), 2, false, later),
            Admit::Accept { replaces: Some(1) }
        );
        // The same node dialed twice: the newer wins too.
        assert_eq!(
            d.connected(n(1), 3, false, later),
            Admit::Accept { replaces: Some(2) }
        );
    }

    #[test]
    fn which_of_two_connections_survives() {
        let (small, big) = (n(1), n(2));
        let sim = Duration::from_secs(2);
        let young = Duration::from_millis(100);
        let old = sim * 2;
        for age in [young, Duration::ZERO] {
            assert!(!keep_new(small, big, false, true, age, sim));
            assert!(keep_new(small, big, true, false, age, sim));
            assert!(keep_new(big, small, false, true, age, sim));
            assert!(!keep_new(big, small, true, false, age, sim));
        }
        for age in [young, old] {
            assert!(keep_new(small, big, true, true, age, sim));
            assert!(keep_new(big, small, false, false, age, sim));
        }
        assert!(keep_new(small, big, false, true, old, sim));
        assert!(keep_new(big, small, false, true, old, sim));
    }
}
