//! The unit of replication: a [`Delta`] is one local commit on one document, named by its origin
//! and that origin's sequence number. Deltas are immutable and idempotent to apply; their
//! payload is checked before anything trusts it.

use serde::{Deserialize, Serialize};

use crate::id::{DeltaId, DocId};
use crate::sign::Auth;

/// Why a delta was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("delta {id}: sequence numbers start at 1")]
    ZeroSeq { id: DeltaId },
    #[error("delta {id}: change bytes are not one Automerge change: {source}")]
    BadChange {
        id: DeltaId,
        #[source]
        source: automerge::LoadChangeError,
    },
    #[error("delta {id}: change checksum does not match its content")]
    BadChecksum { id: DeltaId },
    #[error("delta {id}: automerge failed on its bytes: {why}")]
    Panicked { id: DeltaId, why: String },
    #[error("delta {id}: change is {len} bytes, over the limit of {max}")]
    TooLarge { id: DeltaId, len: usize, max: usize },
    #[error("delta {id}: not signed by its origin (forged, unsigned or altered)")]
    BadSignature { id: DeltaId },
}

/// Largest change payload a delta may carry (16 MiB); bigger edits are split by the app.
pub const MAX_CHANGE_BYTES: usize = 16 << 20;

/// What a delta does to its document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeltaBody {
    /// One Automerge change, in its binary form.
    Change(#[serde(with = "byte_buf")] Vec<u8>),
    /// The document is deleted. Deletion is final: later changes are kept (peers may still
    /// need them) but the document stays deleted on every node.
    Tombstone,
}

/// A change's bytes as serde bytes: postcard writes them as it writes a `Vec<u8>` (a length,
/// then the bytes), but reads and writes them in one go instead of one `u8` at a time. Any
/// sequence of bytes is accepted too (what other formats make of a `Vec<u8>`).
mod byte_buf {
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use serde::ser::Serializer;

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(V)
    }

    struct V;

    impl<'de> Visitor<'de> for V {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // Bounded by what arrived, not by what the sender claims.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}

/// One local commit on one document, signed by its origin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub id: DeltaId,
    pub doc: DocId,
    pub body: DeltaBody,
    /// Its place in the origin's hash chain and the origin's signature ([`crate::sign`]).
    pub auth: Auth,
}

impl Delta {
    /// Checks the delta: a positive seq and, for a change, bytes that decode as exactly one
    /// Automerge change (its checksum included). Returns the decoded change.
    pub fn validate(&self) -> Result<Option<automerge::Change>, DeltaError> {
        if self.id.seq == 0 {
            return Err(DeltaError::ZeroSeq { id: self.id });
        }
        match &self.body {
            DeltaBody::Tombstone => Ok(None),
            DeltaBody::Change(bytes) => {
                if bytes.len() > MAX_CHANGE_BYTES {
                    return Err(DeltaError::TooLarge {
                        id: self.id,
                        len: bytes.len(),
                        max: MAX_CHANGE_BYTES,
                    });
                }
                let parsed = contain(|| automerge::Change::try_from(bytes.as_slice()))
                    .map_err(|why| DeltaError::Panicked { id: self.id, why })?;
                let change = parsed.map_err(|source| DeltaError::BadChange {
                    id: self.id,
                    source,
                })?;
                // Automerge's parser does not check the header checksum; it is the first four
                // bytes of the change hash, so a flipped bit anywhere is caught here.
                if bytes.get(4..8) != Some(&change.hash().0[..4]) {
                    return Err(DeltaError::BadChecksum { id: self.id });
                }
                Ok(Some(change))
            }
        }
    }

    /// [`Delta::validate`], with the work of parsing already done: `parsed` counts as this
    /// delta's change if its bytes are exactly the delta's (so Automerge parsed and verified
    /// these very bytes) and their checksum holds. Anything else (none, a compressed change,
    /// another delta's change) and the delta is validated in full. Boxed: a parsed change is
    /// over 500 bytes, and the receive path hands each one on several times.
    pub fn validate_with(
        &self,
        parsed: Option<Box<automerge::Change>>,
    ) -> Result<Option<Box<automerge::Change>>, DeltaError> {
        if let (DeltaBody::Change(bytes), Some(change)) = (&self.body, parsed)
            && self.id.seq != 0
            && bytes.len() <= MAX_CHANGE_BYTES
            && change.raw_bytes() == bytes.as_slice()
            && bytes.get(4..8) == Some(&change.hash().0[..4])
        {
            return Ok(Some(change));
        }
        Ok(self.validate()?.map(Box::new))
    }

    /// Approximate encoded size, used to bound batches.
    pub fn encoded_len(&self) -> usize {
        let body = match &self.body {
            DeltaBody::Change(b) => b.len() + 5,
            DeltaBody::Tombstone => 1,
        };
        32 + 10 + 16 + 32 + 65 + body
    }

    /// The change payload, if this delta carries one.
    pub fn change_bytes(&self) -> Option<&[u8]> {
        match &self.body {
            DeltaBody::Change(b) => Some(b),
            DeltaBody::Tombstone => None,
        }
    }
}

/// Checks that stored or received bytes are the Automerge change they claim to be, without
/// parsing it: a change chunk's header holds the first four bytes of its hash (SHA-256 over
/// the chunk type, length and body), so a flipped bit anywhere in it shows. A compressed chunk
/// (whose checksum covers the uncompressed form) is parsed instead. Cheap enough for every
/// load and every delta served to a peer.
pub fn check_change_bytes(bytes: &[u8]) -> Result<(), String> {
    const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
    const CHANGE: u8 = 1;
    if bytes.get(..4) != Some(&MAGIC) {
        return Err("not an Automerge chunk (bad magic bytes)".into());
    }
    let (Some(checksum), Some(&kind)) = (bytes.get(4..8), bytes.get(8)) else {
        return Err("truncated chunk header".into());
    };
    if kind != CHANGE {
        let change = contain(|| automerge::Change::try_from(bytes))
            .map_err(|why| format!("automerge failed on it: {why}"))?
            .map_err(|e| e.to_string())?;
        return if checksum == &change.hash().0[..4] {
            Ok(())
        } else {
            Err("checksum does not match its content".into())
        };
    }
    // The body length, LEB128, after the type byte.
    let mut len: u64 = 0;
    let mut at = 9;
    for shift in (0..64).step_by(7) {
        let Some(&b) = bytes.get(at) else {
            return Err("truncated chunk length".into());
        };
        at += 1;
        len |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
    }
    if usize::try_from(len).ok().and_then(|l| at.checked_add(l)) != Some(bytes.len()) {
        return Err(format!(
            "chunk says {len} bytes, has {}",
            bytes.len().saturating_sub(at)
        ));
    }
    let hash = <sha2::Sha256 as sha2::Digest>::digest(&bytes[8..]);
    if checksum == &hash[..4] {
        Ok(())
    } else {
        Err("checksum does not match its content".into())
    }
}

/// Parses stored or received change bytes into an Automerge change, checked as
/// [`check_change_bytes`] checks them (magic bytes, whole, checksum) in the same pass: the
/// checksum is the first four bytes of the change's hash, which parsing computes anyway. For
/// bytes about to be applied, this parses each change once instead of twice.
pub fn parse_checked_change(bytes: &[u8]) -> Result<automerge::Change, String> {
    const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
    if bytes.get(..4) != Some(&MAGIC) {
        return Err("not an Automerge chunk (bad magic bytes)".into());
    }
    let change = contain(|| automerge::Change::try_from(bytes))
        .map_err(|why| format!("automerge failed on it: {why}"))?
        .map_err(|e| e.to_string())?;
    if bytes.get(4..8) == Some(&change.hash().0[..4]) {
        Ok(change)
    } else {
        Err("checksum does not match its content".into())
    }
}

/// Runs `f`, turning a panic inside it (Automerge on hostile bytes) into an error with its
/// message: bytes from a peer or the disk must never take the node down.
pub fn contain<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::NodeId;
    use automerge::transaction::Transactable;

    fn id(seq: u64) -> DeltaId {
        DeltaId {
            origin: NodeId::from_bytes([1; 32]),
            seq,
        }
    }

    fn change_bytes() -> Vec<u8> {
        let mut doc = automerge::Automerge::new();
        let mut tx = doc.transaction();
        tx.put(automerge::ROOT, "k", 1).unwrap();
        tx.commit();
        doc.get_last_local_change().unwrap().raw_bytes().to_vec()
    }

    #[test]
    fn a_change_is_encoded_as_a_vec_of_bytes_always_was() {
        // The wire format before change bytes were serde bytes.
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        enum Old {
            Change(Vec<u8>),
            Tombstone,
        }
        let bytes = change_bytes();
        let new = DeltaBody::Change(bytes.clone());
        let old = Old::Change(bytes);
        let wire = postcard::to_allocvec(&new).unwrap();
        assert_eq!(wire, postcard::to_allocvec(&old).unwrap());
        assert_eq!(postcard::from_bytes::<DeltaBody>(&wire).unwrap(), new);
        assert_eq!(postcard::from_bytes::<Old>(&wire).unwrap(), old);
        let json = serde_json::to_string(&new).unwrap();
        assert_eq!(json, serde_json::to_string(&old).unwrap());
        assert_eq!(serde_json::from_str::<DeltaBody>(&json).unwrap(), new);
        // A length past the end is an error, not an allocation.
        let mut cut = wire.clone();
        cut.truncate(wire.len() - 1);
        assert!(postcard::from_bytes::<DeltaBody>(&cut).is_err());
    }

    #[test]
    fn good_change_validates() {
        let d = Delta {
            id: id(1),
            doc: DocId::from_bytes([0; 16]),
            body: DeltaBody::Change(change_bytes()),
            auth: Auth::default(),
        };
        assert!(d.validate().unwrap().is_some());
    }

    #[test]
    fn bad_changes_are_errors_not_panics() {
        let good = change_bytes();
        let mut cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0; 10],
            good[..good.len() - 1].to_vec(),
            [good.clone(), vec![0]].concat(),
            [good.clone(), good.clone()].concat(),
        ];
        for i in 0..good.len() {
            let mut flipped = good.clone();
            flipped[i] ^= 0x55;
            cases.push(flipped);
        }
        for (i, bytes) in cases.into_iter().enumerate() {
            let d = Delta {
                id: id(1),
                doc: DocId::from_bytes([0; 16]),
                body: DeltaBody::Change(bytes),
                auth: Auth::default(),
            };
            assert!(d.validate().is_err(), "case {i} accepted");
        }
        let zero = Delta {
            id: id(0),
            doc: DocId::from_bytes([0; 16]),
            body: DeltaBody::Tombstone,
            auth: Auth::default(),
        };
        assert!(zero.validate().is_err());
    }

    #[test]
    fn a_change_parsed_ahead_counts_only_for_its_own_checked_bytes() {
        let delta = |seq, bytes: Vec<u8>| Delta {
            id: id(seq),
            doc: DocId::from_bytes([0; 16]),
            body: DeltaBody::Change(bytes),
            auth: Auth::default(),
        };
        let good = change_bytes();
        let parse = |b: &[u8]| Box::new(automerge::Change::try_from(b).unwrap());
        let d = delta(1, good.clone());
        let own = d.validate_with(Some(parse(&good))).unwrap().unwrap();
        assert_eq!(own.raw_bytes(), good.as_slice());
        // Another delta's change is not taken for this one's.
        let mut other = automerge::Automerge::new();
        let mut tx = other.transaction();
        tx.put(automerge::ROOT, "other", 2).unwrap();
        tx.commit();
        let other = other.get_last_local_change().unwrap().clone();
        let got = d.validate_with(Some(Box::new(other))).unwrap().unwrap();
        assert_eq!(got.hash(), own.hash());
        // Damaged bytes fail even with a good parse beside them.
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x55;
        assert!(delta(1, flipped).validate_with(Some(parse(&good))).is_err());
        // A wrong checksum parses (Automerge does not check it) but is refused here.
        let mut bad_sum = good.clone();
        bad_sum[5] ^= 0x55;
        let parsed = parse(&bad_sum);
        assert!(delta(1, bad_sum).validate_with(Some(parsed)).is_err());
        // The cheap checks still apply.
        assert!(
            delta(0, good.clone())
                .validate_with(Some(parse(&good)))
                .is_err()
        );
    }

    #[test]
    fn a_panic_is_contained_as_an_error() {
        assert_eq!(contain(|| 7), Ok(7));
        let e = contain(|| -> u8 { panic!("automerge bug") }).unwrap_err();
        assert_eq!(e, "automerge bug");
        let e = contain(|| -> u8 { panic!("{}", String::from("formatted")) }).unwrap_err();
        assert_eq!(e, "formatted");
    }

    #[test]
    fn the_cheap_check_agrees_with_parsing() {
        // A small change and a big, compressible one (automerge may store it compressed).
        let mut doc = automerge::Automerge::new();
        let mut tx = doc.transaction();
        tx.put(automerge::ROOT, "text", "x".repeat(5000)).unwrap();
        tx.commit();
        let big = doc.get_last_local_change().unwrap().raw_bytes().to_vec();
        for good in [change_bytes(), big] {
            assert_eq!(check_change_bytes(&good), Ok(()));
            assert!(parse_checked_change(&good).is_ok());
            for i in 0..good.len().min(400) {
                let mut flipped = good.clone();
                flipped[i] ^= 0x55;
                assert!(check_change_bytes(&flipped).is_err(), "flip at {i} passed");
                // Parsing with the check refuses the same damage.
                assert!(
                    parse_checked_change(&flipped).is_err(),
                    "flip at {i} parsed"
                );
            }
            assert!(check_change_bytes(&good[..good.len() - 1]).is_err());
            assert!(parse_checked_change(&good[..good.len() - 1]).is_err());
            assert!(parse_checked_change(&[good.clone(), vec![0]].concat()).is_err());
            assert!(check_change_bytes(&[good.clone(), vec![0]].concat()).is_err());
        }
        assert!(check_change_bytes(&[]).is_err());
        assert!(check_change_bytes(&[0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 1, 0xff]).is_err());
    }
}
