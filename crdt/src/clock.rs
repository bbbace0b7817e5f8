//! Clocks: the [`VersionVector`] that summarises which deltas a node holds, and the
//! [`LamportClock`] that orders gossip and membership events. Pure data structures.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::id::{DeltaId, NodeId};

/// How two version vectors relate in the causal partial order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Causality {
    /// Both hold exactly the same deltas.
    Equal,
    /// `self` holds a strict subset of `other`.
    Before,
    /// `self` holds a strict superset of `other`.
    After,
    /// Each holds something the other lacks.
    Concurrent,
}

/// The deltas held from one origin: `1..=prefix` plus sorted, disjoint, non-adjacent `extra`
/// ranges that all start above `prefix + 1` (the gaps are what lies between).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct OriginSet {
    prefix: u64,
    extra: Vec<(u64, u64)>,
}

impl OriginSet {
    /// Every seq in `1..=prefix` is held.
    pub fn prefix(&self) -> u64 {
        self.prefix
    }

    /// Ranges held above the prefix, inclusive, sorted.
    pub fn extra(&self) -> &[(u64, u64)] {
        &self.extra
    }

    /// The highest seq held (0 when empty).
    pub fn max(&self) -> u64 {
        self.extra.last().map_or(self.prefix, |r| r.1)
    }

    /// Number of seqs held.
    pub fn count(&self) -> u64 {
        self.prefix + self.extra.iter().map(|(lo, hi)| hi - lo + 1).sum::<u64>()
    }

    fn is_empty(&self) -> bool {
        self.prefix == 0 && self.extra.is_empty()
    }

    pub fn contains(&self, seq: u64) -> bool {
        (seq >= 1 && seq <= self.prefix)
            || self
                .extra
                .binary_search_by(|&(lo, hi)| {
                    if hi < seq {
                        std::cmp::Ordering::Less
                    } else if lo > seq {
                        std::cmp::Ordering::Greater
                    } else {
                        std::cmp::Ordering::Equal
                    }
                })
                .is_ok()
    }

    /// All held seqs as sorted disjoint inclusive intervals.
    fn intervals(&self) -> Vec<(u64, u64)> {
        let mut v = Vec::with_capacity(self.extra.len() + 1);
        if self.prefix > 0 {
            v.push((1, self.prefix));
        }
        v.extend_from_slice(&self.extra);
        v
    }

    /// Builds from sorted, disjoint intervals (adjacent ones are merged here).
    fn from_intervals(intervals: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (lo, hi) in intervals {
            match merged.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        let mut set = OriginSet::default();
        let mut it = merged.into_iter().peekable();
        if let Some(&(1, hi)) = it.peek() {
            set.prefix = hi;
            it.next();
        }
        set.extra = it.collect();
        set
    }

    /// Removes one seq; returns whether it was held. Rare (a damaged delta dropped to be
    /// fetched again), so it rebuilds the intervals.
    pub fn remove(&mut self, seq: u64) -> bool {
        if !self.contains(seq) {
            return false;
        }
        let mut out = Vec::with_capacity(self.extra.len() + 2);
        for (lo, hi) in self.intervals() {
            if seq < lo || seq > hi {
                out.push((lo, hi));
                continue;
            }
            if lo < seq {
                out.push((lo, seq - 1));
            }
            if seq < hi {
                out.push((seq + 1, hi));
            }
        }
        *self = Self::from_intervals(out);
        true
    }

    /// Adds `lo..=hi`; returns whether anything was new. O(log n) to find the place, plus
    /// the ranges it merges.
    pub fn insert_range(&mut self, lo: u64, hi: u64) -> bool {
        // Seqs up to the prefix are held already.
        let lo = lo.max(1).max(self.prefix.saturating_add(1));
        if lo > hi {
            return false;
        }
        // Hot path: the next delta in order.
        if lo == self.prefix + 1
            && self
                .extra
                .first()
                .is_none_or(|r| r.0 > hi.saturating_add(1))
        {
            self.prefix = hi;
            return true;
        }
        // First range that ends at or after lo - 1 (touching or overlapping).
        let i = self.extra.partition_point(|r| r.1.saturating_add(1) < lo);
        if let Some(&(a, b)) = self.extra.get(i)
            && a <= lo
            && hi <= b
        {
            return false;
        }
        let (mut new_lo, mut new_hi) = (lo, hi);
        let mut j = i;
        while let Some(&(a, b)) = self.extra.get(j) {
            if a > hi.saturating_add(1) {
                break;
            }
            new_lo = new_lo.min(a);
            new_hi = new_hi.max(b);
            j += 1;
        }
        if new_lo <= self.prefix.saturating_add(1) {
            self.prefix = new_hi;
            self.extra.drain(i..j);
        } else {
            self.extra.splice(i..j, [(new_lo, new_hi)]);
        }
        true
    }

    fn union(&self, other: &Self) -> Self {
        let a = self.intervals();
        let b = other.intervals();
        let mut all = Vec::with_capacity(a.len() + b.len());
        let (mut i, mut j) = (0, 0);
        while i < a.len() || j < b.len() {
            if j == b.len() || (i < a.len() && a[i].0 <= b[j].0) {
                all.push(a[i]);
                i += 1;
            } else {
                all.push(b[j]);
                j += 1;
            }
        }
        Self::from_intervals(all)
    }

    /// Intervals in `other` that are not in `self`.
    fn missing_from(&self, other: &Self) -> Vec<(u64, u64)> {
        let mine = self.intervals();
        let mut out = Vec::new();
        let mut k = 0;
        for (lo, hi) in other.intervals() {
            let mut cur = lo;
            while k < mine.len() && mine[k].1 < cur {
                k += 1;
            }
            let mut m = k;
            while cur <= hi {
                match mine.get(m) {
                    Some(&(mlo, mhi)) if mlo <= hi => {
                        if mlo > cur {
                            out.push((cur, mlo - 1));
                        }
                        cur = mhi.saturating_add(1).max(cur);
                        if mhi == u64::MAX {
                            break;
                        }
                        m += 1;
                    }
                    _ => {
                        out.push((cur, hi));
                        break;
                    }
                }
            }
        }
        out
    }
}

/// The node clock: for each origin, which of its deltas are held.
///
/// Kept as a contiguous prefix plus gap ranges per origin, so it stays a few bytes per origin
/// whatever the number of documents or deltas.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct VersionVector {
    origins: BTreeMap<NodeId, OriginSet>,
}

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one delta id; returns whether it was new.
    pub fn insert(&mut self, id: DeltaId) -> bool {
        self.insert_range(id.origin, id.seq, id.seq)
    }

    /// Adds `lo..=hi` from `origin`; returns whether anything was new.
    pub fn insert_range(&mut self, origin: NodeId, lo: u64, hi: u64) -> bool {
        if lo.max(1) > hi {
            return false;
        }
        self.origins.entry(origin).or_default().insert_range(lo, hi)
    }

    /// Removes one delta id; returns whether it was held.
    pub fn remove(&mut self, id: DeltaId) -> bool {
        let Some(set) = self.origins.get_mut(&id.origin) else {
            return false;
        };
        let removed = set.remove(id.seq);
        if set.is_empty() {
            self.origins.remove(&id.origin);
        }
        removed
    }

    pub fn contains(&self, id: DeltaId) -> bool {
        self.origins
            .get(&id.origin)
            .is_some_and(|s| s.contains(id.seq))
    }

    /// The held set for one origin, if any.
    pub fn origin(&self, origin: &NodeId) -> Option<&OriginSet> {
        self.origins.get(origin)
    }

    /// The highest seq held from `origin` (0 when none).
    pub fn max_seq(&self, origin: &NodeId) -> u64 {
        self.origins.get(origin).map_or(0, OriginSet::max)
    }

    /// Iterates origins in order.
    pub fn iter(&self) -> impl Iterator<Item = (&NodeId, &OriginSet)> {
        self.origins.iter()
    }

    /// Total number of deltas held.
    pub fn count(&self) -> u64 {
        self.origins.values().map(OriginSet::count).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.origins.is_empty()
    }

    /// Makes `self` hold everything either held (the least upper bound).
    pub fn join(&mut self, other: &VersionVector) {
        for (origin, theirs) in &other.origins {
            match self.origins.get_mut(origin) {
                Some(mine) => *mine = mine.union(theirs),
                None => {
                    self.origins.insert(*origin, theirs.clone());
                }
            }
        }
    }

    /// The deltas `other` holds that `self` lacks, as inclusive seq ranges in `(origin, seq)`
    /// order. `peer_clock.missing(&my_clock)` is what to send that peer.
    pub fn missing(&self, other: &VersionVector) -> Vec<(NodeId, RangeInclusive<u64>)> {
        let empty = OriginSet::default();
        let mut out = Vec::new();
        for (origin, theirs) in &other.origins {
            let mine = self.origins.get(origin).unwrap_or(&empty);
            for (lo, hi) in mine.missing_from(theirs) {
                out.push((*origin, lo..=hi));
            }
        }
        out
    }

    /// Number of deltas `other` holds that `self` lacks.
    pub fn missing_count(&self, other: &VersionVector) -> u64 {
        self.missing(other)
            .iter()
            .map(|(_, r)| r.end() - r.start() + 1)
            .sum()
    }

    /// Where `self` stands relative to `other` in the causal partial order.
    pub fn compare(&self, other: &VersionVector) -> Causality {
        let self_lacks = !self.missing(other).is_empty();
        let other_lacks = !other.missing(self).is_empty();
        match (self_lacks, other_lacks) {
            (false, false) => Causality::Equal,
            (true, false) => Causality::Before,
            (false, true) => Causality::After,
            (true, true) => Causality::Concurrent,
        }
    }

    /// A stable 16-byte digest: equal clocks have equal digests on every node and version.
    pub fn digest(&self) -> [u8; 16] {
        let mut h = Sha256::new();
        h.update(b"tandem-vv-v1");
        for (origin, set) in &self.origins {
            h.update(origin.as_bytes());
            h.update(set.prefix.to_le_bytes());
            h.update((set.extra.len() as u64).to_le_bytes());
            for (lo, hi) in &set.extra {
                h.update(lo.to_le_bytes());
                h.update(hi.to_le_bytes());
            }
        }
        let full = h.finalize();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        out
    }

    /// Restores from parts, validating nothing beyond what `insert_range` normalises; used by
    /// stores that keep prefix and gaps in columns.
    pub fn from_parts(parts: impl IntoIterator<Item = (NodeId, u64, Vec<(u64, u64)>)>) -> Self {
        let mut vv = VersionVector::new();
        for (origin, prefix, extra) in parts {
            vv.insert_range(origin, 1, prefix);
            for (lo, hi) in extra {
                vv.insert_range(origin, lo, hi);
            }
        }
        vv
    }
}

/// Wire form: `[(origin, prefix, [(start, len - 1)...])...]`; postcard makes every number a
/// varint, so a typical origin costs 32 bytes plus a few.
#[derive(Serialize, Deserialize)]
struct WireEntry(NodeId, u64, Vec<(u64, u64)>);

/// Upper bound on ranges accepted per decoded clock, so a hostile length cannot make us loop.
const MAX_WIRE_RANGES: usize = 1 << 20;

impl Serialize for VersionVector {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let entries: Vec<WireEntry> = self
            .origins
            .iter()
            .filter(|(_, set)| !set.is_empty())
            .map(|(origin, set)| {
                // Delta-encode ranges: gap since the previous end, then length - 1.
                let mut prev = set.prefix;
                let ranges = set
                    .extra
                    .iter()
                    .map(|&(lo, hi)| {
                        let r = (lo - prev, hi - lo);
                        prev = hi;
                        r
                    })
                    .collect();
                WireEntry(*origin, set.prefix, ranges)
            })
            .collect();
        entries.serialize(s)
    }
}

impl<'de> Deserialize<'de> for VersionVector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let entries = Vec::<WireEntry>::deserialize(d)?;
        let total: usize = entries.iter().map(|e| e.2.len()).sum();
        if total > MAX_WIRE_RANGES {
            return Err(D::Error::custom("version vector has too many ranges"));
        }
        let mut vv = VersionVector::new();
        for WireEntry(origin, prefix, ranges) in entries {
            vv.insert_range(origin, 1, prefix);
            let mut prev = prefix;
            for (gap, len) in ranges {
                let lo = prev
                    .checked_add(gap)
                    .ok_or_else(|| D::Error::custom("version vector range overflows"))?;
                let hi = lo
                    .checked_add(len)
                    .ok_or_else(|| D::Error::custom("version vector range overflows"))?;
                vv.insert_range(origin, lo, hi);
                prev = hi;
            }
        }
        Ok(vv)
    }
}

/// A Lamport clock: a counter that is bumped on every local event and moved past every
/// timestamp seen from others, so causally later events get larger stamps.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct LamportClock(u64);

impl LamportClock {
    pub fn new() -> Self {
        Self(0)
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0
    }

    /// Stamps a local event: bumps and returns the new value.
    pub fn tick(&mut self) -> u64 {
        self.0 = self.0.saturating_add(1);
        self.0
    }

    /// Records a stamp seen from elsewhere: afterwards every local stamp is larger.
    pub fn observe(&mut self, seen: u64) {
        self.0 = self.0.max(seen);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(i: u8) -> NodeId {
        NodeId::from_bytes([i; 32])
    }

    fn id(o: u8, seq: u64) -> DeltaId {
        DeltaId { origin: n(o), seq }
    }

    #[test]
    fn prefix_and_gaps() {
        let mut vv = VersionVector::new();
        assert!(vv.insert(id(1, 1)));
        assert!(vv.insert(id(1, 2)));
        assert!(vv.insert(id(1, 5)));
        assert!(!vv.insert(id(1, 5)));
        assert!(vv.insert(id(1, 7)));
        let set = vv.origin(&n(1)).unwrap();
        assert_eq!(set.prefix(), 2);
        assert_eq!(set.extra(), &[(5, 5), (7, 7)]);
        assert!(vv.contains(id(1, 5)));
        assert!(!vv.contains(id(1, 4)));
        assert!(!vv.contains(id(1, 0)));
        vv.insert(id(1, 3));
        vv.insert(id(1, 4));
        vv.insert(id(1, 6));
        let set = vv.origin(&n(1)).unwrap();
        assert_eq!((set.prefix(), set.extra()), (7, &[][..]));
        assert_eq!(vv.count(), 7);
    }

    #[test]
    fn missing_lists_ranges_in_order() {
        let mut a = VersionVector::new();
        a.insert_range(n(1), 1, 3);
        let mut b = VersionVector::new();
        b.insert_range(n(1), 1, 10);
        b.insert_range(n(2), 4, 6);
        assert_eq!(a.missing(&b), vec![(n(1), 4..=10), (n(2), 4..=6)]);
        assert!(b.missing(&a).is_empty());
        assert_eq!(a.compare(&b), Causality::Before);
        assert_eq!(b.compare(&a), Causality::After);
        a.insert(id(3, 1));
        assert_eq!(a.compare(&b), Causality::Concurrent);
    }

    #[test]
    fn encoding_is_compact() {
        let mut vv = VersionVector::new();
        vv.insert_range(n(1), 1, 1_000_000);
        vv.insert_range(n(1), 1_000_005, 1_000_010);
        let bytes = postcard::to_allocvec(&vv).unwrap();
        assert!(bytes.len() < 48, "{} bytes", bytes.len());
        assert_eq!(postcard::from_bytes::<VersionVector>(&bytes).unwrap(), vv);
    }

    #[test]
    fn hostile_encoding_is_an_error() {
        let bytes = postcard::to_allocvec(&vec![WireEntry(n(1), u64::MAX, vec![(1, 1)])]).unwrap();
        assert!(postcard::from_bytes::<VersionVector>(&bytes).is_err());
        assert!(postcard::from_bytes::<VersionVector>(&[0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn lamport_orders_events() {
        let mut a = LamportClock::new();
        let mut b = LamportClock::new();
        let t1 = a.tick();
        b.observe(t1);
        assert!(b.tick() > t1);
    }

    fn arb_vv() -> impl Strategy<Value = VersionVector> {
        proptest::collection::vec((0u8..3, 1u64..40, 0u64..6), 0..12).prop_map(|ranges| {
            let mut vv = VersionVector::new();
            for (o, lo, len) in ranges {
                vv.insert_range(n(o), lo, lo + len);
            }
            vv
        })
    }

    fn members(vv: &VersionVector) -> std::collections::BTreeSet<DeltaId> {
        let mut s = std::collections::BTreeSet::new();
        for o in 0..3 {
            for seq in 1..60 {
                if vv.contains(id(o, seq)) {
                    s.insert(id(o, seq));
                }
            }
        }
        s
    }

    fn joined(a: &VersionVector, b: &VersionVector) -> VersionVector {
        let mut j = a.clone();
        j.join(b);
        j
    }

    proptest! {
        #[test]
        fn insert_range_matches_a_set_model(ops in proptest::collection::vec((0u64..50, 0u64..8), 0..40)) {
            let mut set = OriginSet::default();
            let mut model = std::collections::BTreeSet::new();
            for (lo, len) in ops {
                let hi = lo + len;
                let expect_new = (lo.max(1)..=hi).any(|s| !model.contains(&s));
                prop_assert_eq!(set.insert_range(lo, hi), expect_new);
                model.extend(lo.max(1)..=hi);
                let got: std::collections::BTreeSet<u64> = (1..=60).filter(|s| set.contains(*s)).collect();
                prop_assert_eq!(&got, &model);
                prop_assert_eq!(set.count(), model.len() as u64);
                // Canonical: ranges sorted, disjoint, not adjacent, above prefix + 1.
                let mut prev = set.prefix();
                for &(a, b) in set.extra() {
                    prop_assert!(a > prev + 1 && a <= b);
                    prev = b;
                }
            }
        }

        #[test]
        fn join_is_commutative(a in arb_vv(), b in arb_vv()) {
            prop_assert_eq!(joined(&a, &b), joined(&b, &a));
        }

        #[test]
        fn join_is_associative(a in arb_vv(), b in arb_vv(), c in arb_vv()) {
            prop_assert_eq!(joined(&joined(&a, &b), &c), joined(&a, &joined(&b, &c)));
        }

        #[test]
        fn join_is_idempotent(a in arb_vv()) {
            prop_assert_eq!(joined(&a, &a), a);
        }

        #[test]
        fn join_is_set_union(a in arb_vv(), b in arb_vv()) {
            let expect: std::collections::BTreeSet<_> = members(&a).union(&members(&b)).copied().collect();
            prop_assert_eq!(members(&joined(&a, &b)), expect);
        }

        #[test]
        fn compare_agrees_with_join(a in arb_vv(), b in arb_vv()) {
            let j = joined(&a, &b);
            let expect = match (j == b, j == a) {
                (true, true) => Causality::Equal,
                (true, false) => Causality::Before,
                (false, true) => Causality::After,
                (false, false) => Causality::Concurrent,
            };
            prop_assert_eq!(a.compare(&b), expect);
        }

        #[test]
        fn missing_is_set_difference(a in arb_vv(), b in arb_vv()) {
            let mut got = std::collections::BTreeSet::new();
            for (o, r) in a.missing(&b) {
                for seq in r { got.insert(DeltaId { origin: o, seq }); }
            }
            let expect: std::collections::BTreeSet<_> = members(&b).difference(&members(&a)).copied().collect();
            prop_assert_eq!(got, expect);
            // Joining what is missing closes the gap.
            let mut a2 = a.clone();
            for (o, r) in a.missing(&b) { a2.insert_range(o, *r.start(), *r.end()); }
            prop_assert_eq!(a2, joined(&a, &b));
        }

        #[test]
        fn digest_and_encoding_are_canonical(a in arb_vv(), b in arb_vv()) {
            let ab = joined(&a, &b);
            let ba = joined(&b, &a);
            prop_assert_eq!(ab.digest(), ba.digest());
            let bytes = postcard::to_allocvec(&ab).unwrap();
            prop_assert_eq!(&postcard::from_bytes::<VersionVector>(&bytes).unwrap(), &ab);
            prop_assert_eq!(bytes, postcard::to_allocvec(&ba).unwrap());
            if a != b { prop_assert_ne!(a.digest(), b.digest()); }
        }

        #[test]
        fn remove_is_set_difference(a in arb_vv(), pick in 0usize..64) {
            let all: Vec<_> = members(&a).into_iter().collect();
            let mut b = a.clone();
            if let Some(&victim) = all.get(pick % all.len().max(1)) {
                prop_assert!(b.remove(victim));
                prop_assert!(!b.remove(victim));
                let mut expect = members(&a);
                expect.remove(&victim);
                prop_assert_eq!(members(&b), expect);
                // Canonical form: equal to the clock built from the same set.
                let mut rebuilt = VersionVector::new();
                for id in members(&b) { rebuilt.insert(id); }
                prop_assert_eq!(b, rebuilt);
            }
        }
    }
}
