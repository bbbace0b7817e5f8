//! Who made a delta: every delta is signed by its origin's Ed25519 key (the [`NodeId`] is the
//! public key), so a member relaying deltas cannot forge one in another node's name.
//!
//! Verifying every signature would cost more than applying the change, so deltas form a hash
//! chain per origin: each carries the chain hash of its origin's previous delta (`prev`), and
//! its own chain hash covers its id, document, body and `prev`. A run of consecutive deltas
//! from one origin, each linking to the one before, is authentic if the signature on its last
//! delta verifies: one verification per run, a few per batch. Every delta still carries its
//! own signature, so any single one can be checked alone (a run that ends early, a push).

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::delta::{Delta, DeltaBody};
use crate::id::NodeId;

/// An Ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl Default for Signature {
    fn default() -> Self {
        Signature([0; 64])
    }
}

impl std::fmt::Debug for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signature(")?;
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

impl Serialize for Signature {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Signature;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("64 bytes of signature")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Signature, E> {
                let arr: [u8; 64] = v
                    .try_into()
                    .map_err(|_| E::invalid_length(v.len(), &self))?;
                Ok(Signature(arr))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// A delta's place in its origin's chain and the origin's signature over it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Auth {
    /// The chain hash of the origin's previous delta (any value for a chain's first delta:
    /// it is covered by this delta's hash and signature either way).
    pub prev: [u8; 32],
    /// The origin's signature over this delta's chain hash. All zeros: unsigned.
    pub sig: Signature,
}

impl Auth {
    /// Whether this carries no signature at all (a delta stored before deltas were signed).
    pub fn is_unsigned(&self) -> bool {
        self.sig == Signature::default()
    }
}

/// The chain hash of a delta: SHA-256 over a domain tag, its id, document, body and `prev`.
pub fn chain_hash(d: &Delta) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"tandem/delta/1");
    h.update(d.id.origin.as_bytes());
    h.update(d.id.seq.to_be_bytes());
    h.update(d.doc.as_bytes());
    match &d.body {
        DeltaBody::Change(bytes) => {
            h.update([0u8]);
            h.update((bytes.len() as u64).to_be_bytes());
            h.update(bytes);
        }
        DeltaBody::Tombstone => h.update([1u8]),
    }
    h.update(d.auth.prev);
    h.finalize().into()
}

/// Whether `sig` is `origin`'s signature over `hash`.
pub fn verify(origin: &NodeId, hash: &[u8; 32], sig: &Signature) -> bool {
    UnparsedPublicKey::new(&ED25519, origin.as_bytes())
        .verify(hash, &sig.0)
        .is_ok()
}

/// A node's signing key.
pub struct Signer {
    pair: Ed25519KeyPair,
    id: NodeId,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The key was not an Ed25519 key.
#[derive(Debug, thiserror::Error)]
#[error("not an Ed25519 key: {0}")]
pub struct KeyError(String);

impl Signer {
    /// From a PKCS#8 document (the node's `identity.key`).
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|e| KeyError(e.to_string()))?;
        Ok(Self::from_pair(pair))
    }

    /// From a 32-byte seed: for tests and the simulator, which make keys from their rng.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        match Ed25519KeyPair::from_seed_unchecked(&seed) {
            Ok(pair) => Self::from_pair(pair),
            // ring accepts every 32-byte seed.
            Err(_) => unreachable!("an Ed25519 seed is any 32 bytes"),
        }
    }

    fn from_pair(pair: Ed25519KeyPair) -> Self {
        let mut pk = [0u8; 32];
        pk.copy_from_slice(pair.public_key().as_ref());
        Self {
            pair,
            id: NodeId::from_bytes(pk),
        }
    }

    /// The NodeId: the public key.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Signs a 32-byte hash (of something this node vouches for, under its own domain tag).
    pub fn sign_hash(&self, hash: &[u8; 32]) -> Signature {
        let mut sig = [0u8; 64];
        sig.copy_from_slice(self.pair.sign(hash).as_ref());
        Signature(sig)
    }

    /// Links `d` after the delta whose chain hash is `prev`, signs it, and returns its chain
    /// hash (the next delta's `prev`).
    pub fn sign(&self, d: &mut Delta, prev: [u8; 32]) -> [u8; 32] {
        d.auth.prev = prev;
        let hash = chain_hash(d);
        let mut sig = [0u8; 64];
        sig.copy_from_slice(self.pair.sign(&hash).as_ref());
        d.auth.sig = Signature(sig);
        hash
    }
}

/// Checks the origins' signatures on `deltas` cheaply: splits them into runs (consecutive
/// seqs of one origin, each linking to the one before) and verifies the last signature of each
/// run, which vouches for the whole run through the chain. When it fails, the run's signatures
/// are checked one by one from its end: the run is good up to the last delta whose own
/// signature verifies, and what follows it is refused. Returns, per delta, whether it is
/// authentic.
pub fn verify_batch(deltas: &[Delta]) -> Vec<bool> {
    let mut ok = vec![false; deltas.len()];
    let hashes: Vec<[u8; 32]> = deltas.iter().map(chain_hash).collect();
    let mut start = 0;
    while start < deltas.len() {
        let mut end = start;
        while let Some(next) = deltas.get(end + 1) {
            let cur = &deltas[end];
            let links = next.id.origin == cur.id.origin
                && Some(next.id.seq) == cur.id.seq.checked_add(1)
                && next.auth.prev == hashes[end];
            if !links {
                break;
            }
            end += 1;
        }
        let origin = deltas[start].id.origin;
        // From the run's end back: the first signature that verifies vouches for it and
        // everything before it in the run.
        if let Some(good) = (start..=end)
            .rev()
            .find(|&i| verify(&origin, &hashes[i], &deltas[i].auth.sig))
        {
            ok[start..=good].iter_mut().for_each(|v| *v = true);
        }
        start = end + 1;
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::{DeltaId, DocId};

    fn delta(origin: NodeId, seq: u64, body: &[u8]) -> Delta {
        Delta {
            id: DeltaId { origin, seq },
            doc: DocId::from_bytes([7; 16]),
            body: DeltaBody::Change(body.to_vec()),
            auth: Auth::default(),
        }
    }

    fn chain(signer: &Signer, n: u64) -> Vec<Delta> {
        let mut prev = [0; 32];
        (1..=n)
            .map(|seq| {
                let mut d = delta(signer.id(), seq, &[seq as u8; 10]);
                prev = signer.sign(&mut d, prev);
                d
            })
            .collect()
    }

    #[test]
    fn a_signed_chain_verifies_and_any_tampering_is_caught() {
        let a = Signer::from_seed([1; 32]);
        let good = chain(&a, 5);
        assert_eq!(verify_batch(&good), vec![true; 5]);
        // Any one delta alone verifies too.
        for d in &good {
            assert_eq!(verify_batch(std::slice::from_ref(d)), [true]);
        }
        // A changed body in the middle breaks the link: the tail still verifies on its own
        // signature, the changed one does not.
        let mut bad = good.clone();
        bad[2].body = DeltaBody::Change(vec![9; 10]);
        assert_eq!(verify_batch(&bad), [true, true, false, true, true]);
        // A changed last delta: the rest of the run is vouched for by its own signatures.
        let mut bad = good.clone();
        bad[4].doc = DocId::from_bytes([8; 16]);
        assert_eq!(verify_batch(&bad), [true, true, true, true, false]);
    }

    #[test]
    fn forged_and_unsigned_deltas_are_refused() {
        let a = Signer::from_seed([1; 32]);
        let mallory = Signer::from_seed([2; 32]);
        // Mallory signs a delta claiming to be from A.
        let mut forged = delta(a.id(), 1, b"evil");
        mallory.sign(&mut forged, [0; 32]);
        assert_eq!(verify_batch(&[forged]), [false]);
        // An unsigned one.
        assert_eq!(verify_batch(&[delta(a.id(), 1, b"x")]), [false]);
        // A forged delta appended to a good chain, linking to it: refused, the chain kept.
        let mut run = chain(&a, 3);
        let mut tail = delta(a.id(), 4, b"evil");
        tail.auth.prev = chain_hash(&run[2]);
        tail.auth.sig = run[2].auth.sig;
        run.push(tail);
        assert_eq!(verify_batch(&run), [true, true, true, false]);
        // A non-key NodeId never verifies (and never panics).
        let odd = NodeId::from_bytes([0xff; 32]);
        assert_eq!(verify_batch(&[delta(odd, 1, b"x")]), [false]);
    }

    #[test]
    fn runs_of_many_origins_verify_with_one_check_each() {
        let a = Signer::from_seed([1; 32]);
        let b = Signer::from_seed([2; 32]);
        let mut all = chain(&a, 4);
        all.extend(chain(&b, 3));
        assert_eq!(verify_batch(&all), vec![true; 7]);
        let bytes = postcard::to_allocvec(&all).unwrap();
        let back: Vec<Delta> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, all);
    }
}
