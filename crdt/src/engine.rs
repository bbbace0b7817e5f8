//! The sans-IO sync engine. It owns the node clock and the origin sequence, is fed [`Input`]s
//! and answers with [`Action`]s for the caller to carry out (persist deltas, emit events); it
//! never touches a socket, a file or the time of day. Storage is reached through the
//! [`DeltaStore`] trait, with [`MemStore`] for tests and simulations.

use std::collections::{BTreeMap, VecDeque};
use std::ops::RangeInclusive;
use std::sync::Arc;

use crate::clock::VersionVector;
use crate::delta::{Delta, DeltaBody, DeltaError};
use crate::id::{DeltaId, DocId, NodeId};
use crate::sign::{self, Auth, Signer};

/// Read access to the deltas a node holds.
pub trait DeltaStore {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Deltas from `origin` with seqs in `seqs`, in seq order, starting at the lowest held.
    /// Stops before the delta that would take the total [`Delta::encoded_len`] past
    /// `max_bytes`, except that the first delta is always returned.
    fn load_range(
        &self,
        origin: &NodeId,
        seqs: RangeInclusive<u64>,
        max_bytes: usize,
    ) -> Result<Vec<Delta>, Self::Error>;
}

/// An in-memory [`DeltaStore`].
#[derive(Debug, Default, Clone)]
pub struct MemStore {
    deltas: BTreeMap<DeltaId, Delta>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores deltas; storing one twice is harmless.
    pub fn insert(&mut self, deltas: impl IntoIterator<Item = Delta>) {
        for d in deltas {
            self.deltas.entry(d.id).or_insert(d);
        }
    }

    pub fn get(&self, id: &DeltaId) -> Option<&Delta> {
        self.deltas.get(id)
    }

    pub fn len(&self) -> usize {
        self.deltas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }

    /// The clock that exactly describes the stored deltas.
    pub fn clock(&self) -> VersionVector {
        let mut vv = VersionVector::new();
        for id in self.deltas.keys() {
            vv.insert(*id);
        }
        vv
    }

    pub fn iter(&self) -> impl Iterator<Item = &Delta> {
        self.deltas.values()
    }
}

impl DeltaStore for MemStore {
    type Error = std::convert::Infallible;

    fn load_range(
        &self,
        origin: &NodeId,
        seqs: RangeInclusive<u64>,
        max_bytes: usize,
    ) -> Result<Vec<Delta>, Self::Error> {
        let lo = DeltaId {
            origin: *origin,
            seq: *seqs.start(),
        };
        let hi = DeltaId {
            origin: *origin,
            seq: *seqs.end(),
        };
        let mut out = Vec::new();
        let mut used = 0;
        for d in self.deltas.range(lo..=hi).map(|(_, d)| d) {
            used += d.encoded_len();
            if !out.is_empty() && used > max_bytes {
                break;
            }
            out.push(d.clone());
        }
        Ok(out)
    }
}

/// Where a delta came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Made on this node.
    Local,
    /// Received from this peer (which may have relayed it from its origin).
    Remote(NodeId),
}

/// What the engine is told.
#[derive(Debug, Clone)]
pub enum Input {
    /// A local commit produced this body for `doc`.
    LocalChange { doc: DocId, body: DeltaBody },
    /// A peer sent these deltas.
    RemoteDeltas { from: NodeId, deltas: Vec<Delta> },
    /// A peer sent these deltas, and their changes were parsed ahead of time (by
    /// [`Delta::validate`], off the engine, while an earlier batch was committed): `parsed[i]`
    /// is used for `deltas[i]` only if it is that delta's change (see
    /// [`Delta::validate_with`]); a missing or mismatched one is validated here as usual.
    RemoteParsed {
        from: NodeId,
        deltas: Vec<Delta>,
        parsed: Vec<Option<Box<automerge::Change>>>,
    },
}

/// What the engine asks its caller to do, in order.
#[derive(Debug)]
pub enum Action {
    /// Store these deltas (new to this node, already in the engine's clock) durably, in one
    /// transaction with the clock. A caller that cannot must stop using the engine: its clock
    /// is ahead of the store.
    Persist {
        deltas: Vec<Delta>,
        source: Source,
        /// For received deltas, each one's change as validation parsed it (parallel to
        /// `deltas`; `None` for a tombstone), so nothing parses it again. Empty for local ones.
        changes: Vec<Option<Box<automerge::Change>>>,
    },
    /// A peer sent a delta that failed validation; nothing of it was kept.
    Reject { from: NodeId, error: DeltaError },
}

/// The sync engine of one node.
#[derive(Debug, Clone)]
pub struct Engine {
    me: NodeId,
    signer: Arc<Signer>,
    clock: VersionVector,
    /// Own seqs up to here are taken even if not in the clock (a damaged own delta was dropped
    /// to be fetched again): a new local delta never reuses one.
    own_floor: u64,
    /// The chain hash of this node's latest delta: the next one links to it.
    chain: [u8; 32],
}

impl Engine {
    /// Starts from the clock recovered from storage; local deltas are signed with `signer`.
    pub fn new(signer: Arc<Signer>, clock: VersionVector) -> Self {
        Self {
            me: signer.id(),
            signer,
            clock,
            own_floor: 0,
            chain: [0; 32],
        }
    }

    /// Continues this node's hash chain after its latest stored delta (whose chain hash this
    /// is). Without it the next delta starts a new chain, which costs a receiver one more
    /// signature check, nothing else.
    pub fn with_chain(mut self, chain: [u8; 32]) -> Self {
        self.chain = chain;
        self
    }

    /// Marks own seqs up to `seq` as taken (see [`Engine::forget`]), across restarts.
    pub fn with_own_floor(mut self, seq: u64) -> Self {
        self.own_floor = self.own_floor.max(seq);
        self
    }

    /// Drops a delta from the clock (it was found damaged in storage), so that peers send it
    /// again. Its seq is never reused for a local delta.
    pub fn forget(&mut self, id: DeltaId) {
        self.clock.remove(id);
        if id.origin == self.me {
            self.own_floor = self.own_floor.max(id.seq);
        }
    }

    /// Rolls the clock back to what storage holds, after writes queued on top of it failed.
    /// The chain head stays at the last delta made, so the next delta may not link to the one
    /// stored before it: that only starts a new run (one more signature check for receivers).
    pub fn reset_clock(&mut self, committed: VersionVector) {
        self.clock = committed;
    }

    pub fn node_id(&self) -> NodeId {
        self.me
    }

    /// Everything this node holds.
    pub fn clock(&self) -> &VersionVector {
        &self.clock
    }

    /// Feeds one input; returns the actions to carry out.
    pub fn handle(&mut self, input: Input) -> Vec<Action> {
        match input {
            Input::LocalChange { doc, body } => vec![Action::Persist {
                deltas: vec![self.local_delta(doc, body)],
                source: Source::Local,
                changes: Vec::new(),
            }],
            Input::RemoteDeltas { from, deltas } => self.remote_deltas(from, deltas, Vec::new()),
            Input::RemoteParsed {
                from,
                deltas,
                parsed,
            } => self.remote_deltas(from, deltas, parsed),
        }
    }

    /// The local-write path: wraps `body` as this node's next delta and advances the clock.
    pub fn local_delta(&mut self, doc: DocId, body: DeltaBody) -> Delta {
        let seq = self.clock.max_seq(&self.me).max(self.own_floor) + 1;
        let id = DeltaId {
            origin: self.me,
            seq,
        };
        self.clock.insert(id);
        let mut d = Delta {
            id,
            doc,
            body,
            auth: Auth::default(),
        };
        self.chain = self.signer.sign(&mut d, self.chain);
        d
    }

    fn remote_deltas(
        &mut self,
        from: NodeId,
        deltas: Vec<Delta>,
        parsed: Vec<Option<Box<automerge::Change>>>,
    ) -> Vec<Action> {
        let mut candidates = Vec::new();
        let mut actions = Vec::new();
        let mut parsed = parsed.into_iter();
        for d in deltas {
            let pre = parsed.next().flatten();
            if self.clock.contains(d.id) {
                continue;
            }
            match d.validate_with(pre) {
                Ok(change) => candidates.push((d, change)),
                Err(error) => actions.push(Action::Reject { from, error }),
            }
        }
        // Only what its origin signed gets in: a forged delta that came first would make the
        // genuine one with its id look like a duplicate.
        let (candidates, parsed): (Vec<Delta>, Vec<_>) = candidates.into_iter().unzip();
        let authentic = sign::verify_batch(&candidates);
        let mut fresh = Vec::with_capacity(candidates.len());
        let mut changes = Vec::with_capacity(candidates.len());
        for ((d, change), ok) in candidates.into_iter().zip(parsed).zip(authentic) {
            if !ok {
                actions.push(Action::Reject {
                    from,
                    error: DeltaError::BadSignature { id: d.id },
                });
            } else if self.clock.insert(d.id) {
                fresh.push(d);
                changes.push(change);
            }
        }
        if !fresh.is_empty() {
            actions.insert(
                0,
                Action::Persist {
                    deltas: fresh,
                    source: Source::Remote(from),
                    changes,
                },
            );
        }
        actions
    }

    /// Plans what a peer with clock `peer` lacks, in `(origin, seq)` order.
    pub fn catch_up(&self, peer: &VersionVector) -> CatchUp {
        CatchUp {
            ranges: peer.missing(&self.clock).into(),
        }
    }
}

/// A cursor over the deltas a peer lacks; hands them out in bounded batches.
#[derive(Debug, Clone)]
pub struct CatchUp {
    ranges: VecDeque<(NodeId, RangeInclusive<u64>)>,
}

impl CatchUp {
    /// Deltas still to send, by count of seqs planned (some may turn out not to be stored).
    pub fn remaining(&self) -> u64 {
        self.ranges
            .iter()
            .map(|(_, r)| r.end() - r.start() + 1)
            .sum()
    }

    pub fn is_done(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The next batch: at most `max_bytes` of [`Delta::encoded_len`], except that a single
    /// delta larger than that travels alone. `None` when everything has been handed out.
    pub fn next_batch<S: DeltaStore>(
        &mut self,
        store: &S,
        max_bytes: usize,
    ) -> Result<Option<Vec<Delta>>, S::Error> {
        let mut batch: Vec<Delta> = Vec::new();
        let mut used = 0usize;
        while let Some((origin, range)) = self.ranges.front_mut() {
            let budget = max_bytes.saturating_sub(used).max(1);
            let got = store.load_range(origin, range.clone(), budget)?;
            let Some(last) = got.last() else {
                self.ranges.pop_front();
                continue;
            };
            let first_len = got.first().map_or(0, Delta::encoded_len);
            if !batch.is_empty() && used + first_len > max_bytes {
                break;
            }
            let next = last.id.seq.saturating_add(1);
            if next > *range.end() || last.id.seq == u64::MAX {
                self.ranges.pop_front();
            } else {
                *range = next..=*range.end();
            }
            used += got.iter().map(Delta::encoded_len).sum::<usize>();
            batch.extend(got);
            if used >= max_bytes {
                break;
            }
        }
        Ok((!batch.is_empty()).then_some(batch))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn n(i: u8) -> NodeId {
        crate::sign::Signer::from_seed([i; 32]).id()
    }

    fn signer(i: u8) -> std::sync::Arc<crate::sign::Signer> {
        std::sync::Arc::new(crate::sign::Signer::from_seed([i; 32]))
    }

    fn doc() -> DocId {
        DocId::from_bytes([1; 16])
    }

    /// One Automerge change setting a key to `i` characters (test data).
    pub(crate) fn change(i: usize) -> Vec<u8> {
        use automerge::transaction::Transactable;
        let mut d = automerge::Automerge::new();
        let mut tx = d.transaction();
        tx.put(automerge::ROOT, "k", "x".repeat(i)).unwrap();
        tx.commit();
        d.get_last_local_change().unwrap().raw_bytes().to_vec()
    }

    #[test]
    fn local_writes_take_contiguous_seqs() {
        let mut e = Engine::new(signer(1), VersionVector::new());
        for i in 1..=3 {
            let actions = e.handle(Input::LocalChange {
                doc: doc(),
                body: DeltaBody::Change(change(1)),
            });
            let [Action::Persist { deltas, source, .. }] = &actions[..] else {
                panic!("{actions:?}")
            };
            assert_eq!(*source, Source::Local);
            assert_eq!(deltas[0].id.seq, i);
        }
        assert_eq!(e.clock().origin(&n(1)).unwrap().prefix(), 3);
        // A restart continues from the recovered clock.
        let mut e2 = Engine::new(signer(1), e.clock().clone());
        assert_eq!(e2.local_delta(doc(), DeltaBody::Tombstone).id.seq, 4);
    }

    #[test]
    fn remote_deltas_are_deduplicated_and_validated() {
        let mut a = Engine::new(signer(1), VersionVector::new());
        let d1 = a.local_delta(doc(), DeltaBody::Change(change(1)));
        let mut b = Engine::new(signer(2), VersionVector::new());
        let bad = Delta {
            id: DeltaId {
                origin: n(1),
                seq: 2,
            },
            doc: doc(),
            body: DeltaBody::Change(vec![1, 2, 3]),
            auth: Auth::default(),
        };
        let actions = b.handle(Input::RemoteDeltas {
            from: n(1),
            deltas: vec![d1.clone(), d1.clone(), bad],
        });
        assert!(matches!(&actions[0], Action::Persist { deltas, .. } if deltas.len() == 1));
        assert!(matches!(&actions[1], Action::Reject { .. }));
        assert!(!b.clock().contains(DeltaId {
            origin: n(1),
            seq: 2
        }));
        assert!(
            b.handle(Input::RemoteDeltas {
                from: n(1),
                deltas: vec![d1]
            })
            .is_empty()
        );
    }

    #[test]
    fn catch_up_sends_only_what_is_missing_in_bounded_batches() {
        let mut a = Engine::new(signer(1), VersionVector::new());
        let mut store = MemStore::new();
        for i in 0..50 {
            let d = a.local_delta(doc(), DeltaBody::Change(change(i * 10)));
            store.insert([d]);
        }
        let mut peer = VersionVector::new();
        peer.insert_range(n(1), 1, 10);
        peer.insert_range(n(1), 20, 25);
        let mut plan = a.catch_up(&peer);
        assert_eq!(plan.remaining(), 50 - 16);
        let max = 2_000;
        let mut sent = Vec::new();
        while let Some(batch) = plan.next_batch(&store, max).unwrap() {
            let size: usize = batch.iter().map(Delta::encoded_len).sum();
            assert!(size <= max || batch.len() == 1, "batch of {size} bytes");
            sent.extend(batch.into_iter().map(|d| d.id.seq));
        }
        let expect: Vec<u64> = (11..20).chain(26..=50).collect();
        assert_eq!(sent, expect, "in (origin, seq) order, nothing twice");
    }

    #[test]
    fn oversized_delta_travels_alone() {
        let mut a = Engine::new(signer(1), VersionVector::new());
        let mut store = MemStore::new();
        store.insert([a.local_delta(doc(), DeltaBody::Change(change(5_000)))]);
        store.insert([a.local_delta(doc(), DeltaBody::Change(change(1)))]);
        let mut plan = a.catch_up(&VersionVector::new());
        assert_eq!(plan.next_batch(&store, 100).unwrap().unwrap().len(), 1);
        assert_eq!(plan.next_batch(&store, 100).unwrap().unwrap().len(), 1);
        assert!(plan.next_batch(&store, 100).unwrap().is_none());
    }
}
