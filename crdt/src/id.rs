//! Identities: who wrote a delta ([`NodeId`]), which document it belongs to ([`DocId`]) and
//! where it sits in its origin's history ([`DeltaId`]). Pure values with text forms; no IO.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a text form could not be parsed into an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The text is not lowercase RFC 4648 base32 of the right length.
    #[error("invalid node id {text:?}: {why}")]
    NodeId { text: String, why: &'static str },
    /// The text is not bs58check of 16 bytes.
    #[error("invalid document id {text:?}: {why}")]
    DocId { text: String, why: &'static str },
}

/// A node's identity: its Ed25519 public key.
///
/// Shown as 52 characters of lowercase, unpadded base32; the first 8 are a short form for humans
/// ([`NodeId::short`]).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId([u8; 32]);

impl NodeId {
    /// Wraps raw public-key bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw public-key bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 8 characters of the text form.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(8);
        s
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&base32::encode(&self.0))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl FromStr for NodeId {
    type Err = IdError;

    fn from_str(text: &str) -> Result<Self, IdError> {
        let err = |why| IdError::NodeId {
            text: text.chars().take(80).collect(),
            why,
        };
        let bytes = base32::decode(text).ok_or_else(|| err("not lowercase base32"))?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| err("must encode exactly 32 bytes (52 characters)"))?;
        Ok(Self(bytes))
    }
}

/// A document's identity: 16 random bytes, shown in bs58check like automerge-repo's ids.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DocId([u8; 16]);

impl DocId {
    /// Wraps raw bytes (callers make them random).
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&bs58::encode(self.0).with_check().into_string())
    }
}

impl fmt::Debug for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocId({self})")
    }
}

impl FromStr for DocId {
    type Err = IdError;

    fn from_str(text: &str) -> Result<Self, IdError> {
        let err = |why| IdError::DocId {
            text: text.chars().take(80).collect(),
            why,
        };
        // automerge-repo's URL form (`automerge:<id>`) names the same document.
        let id = text.strip_prefix("automerge:").unwrap_or(text);
        if id.len() > 64 {
            return Err(err("too long"));
        }
        let bytes = bs58::decode(id)
            .with_check(None)
            .into_vec()
            .map_err(|_| err("not bs58check"))?;
        let bytes: [u8; 16] = bytes
            .try_into()
            .map_err(|_| err("must encode exactly 16 bytes"))?;
        Ok(Self(bytes))
    }
}

macro_rules! text_or_bytes_serde {
    ($ty:ty, $len:expr) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.collect_str(self)
                } else {
                    self.0.serialize(s)
                }
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if d.is_human_readable() {
                    let s = String::deserialize(d)?;
                    s.parse().map_err(serde::de::Error::custom)
                } else {
                    <[u8; $len]>::deserialize(d).map(Self)
                }
            }
        }
    };
}

text_or_bytes_serde!(NodeId, 32);
text_or_bytes_serde!(DocId, 16);

/// Where a delta sits: its origin node and that origin's sequence number (contiguous from 1).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct DeltaId {
    pub origin: NodeId,
    pub seq: u64,
}

impl fmt::Display for DeltaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.origin.short(), self.seq)
    }
}

/// Lowercase RFC 4648 base32 without padding (the text form of node ids and invite tokens).
pub mod base32 {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

    /// Encodes bytes.
    pub fn encode(data: &[u8]) -> String {
        let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
        let mut buf: u16 = 0;
        let mut bits = 0;
        for &b in data {
            buf = (buf << 8) | u16::from(b);
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                out.push(char::from(ALPHABET[usize::from((buf >> bits) & 31)]));
            }
        }
        if bits > 0 {
            out.push(char::from(ALPHABET[usize::from((buf << (5 - bits)) & 31)]));
        }
        out
    }

    /// Decodes canonical lowercase text; `None` for anything else.
    pub fn decode(text: &str) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(text.len() * 5 / 8);
        let mut buf: u16 = 0;
        let mut bits = 0;
        for c in text.bytes() {
            let v = match c {
                b'a'..=b'z' => c - b'a',
                b'2'..=b'7' => c - b'2' + 26,
                _ => return None,
            };
            buf = (buf << 5) | u16::from(v);
            bits += 5;
            if bits >= 8 {
                bits -= 8;
                out.push(((buf >> bits) & 0xff) as u8);
            }
        }
        // Leftover bits must be zero padding, fewer than one byte, or the text is not canonical.
        if bits >= 5 || (buf & ((1 << bits) - 1)) != 0 {
            return None;
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_text_round_trip() {
        let id = NodeId::from_bytes([7; 32]);
        let text = id.to_string();
        assert_eq!(text.len(), 52);
        assert!(
            text.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
        assert_eq!(text.parse::<NodeId>().unwrap(), id);
        assert_eq!(id.short(), &text[..8]);
    }

    #[test]
    fn node_id_rejects_bad_text() {
        assert!("".parse::<NodeId>().is_err());
        assert!("ABC".parse::<NodeId>().is_err());
        let text = NodeId::from_bytes([1; 32]).to_string();
        assert!(text[..51].parse::<NodeId>().is_err());
        assert!(format!("{text}a").parse::<NodeId>().is_err());
        assert!(text.to_uppercase().parse::<NodeId>().is_err());
    }

    #[test]
    fn base32_matches_rfc4648_vectors() {
        assert_eq!(base32::encode(b"foobar"), "mzxw6ytboi");
        assert_eq!(base32::decode("mzxw6ytboi").unwrap(), b"foobar");
        assert_eq!(base32::encode(b"f"), "my");
        assert!(base32::decode("mz").is_none(), "non-zero padding bits");
    }

    #[test]
    fn doc_id_is_bs58check() {
        let id = DocId::from_bytes([0xab; 16]);
        let text = id.to_string();
        assert_eq!(text.parse::<DocId>().unwrap(), id);
        let mut broken = text.clone().into_bytes();
        broken[3] = if broken[3] == b'2' { b'3' } else { b'2' };
        assert!(String::from_utf8(broken).unwrap().parse::<DocId>().is_err());
        assert!("0OIl".parse::<DocId>().is_err());
    }

    #[test]
    fn doc_id_matches_automerge_repo() {
        // automerge-repo's DocumentId for the UUID bytes 00..0f, computed with bs58check.
        let id = DocId::from_bytes(std::array::from_fn(|i| i as u8));
        let text = id.to_string();
        let raw = bs58::decode(&text).into_vec().unwrap();
        assert_eq!(raw.len(), 20, "16 bytes payload + 4 bytes checksum");
        assert_eq!(&raw[..16], id.as_bytes());
        let url = format!("automerge:{text}");
        assert_eq!(
            url.parse::<DocId>().unwrap(),
            id,
            "the URL form names it too"
        );
        assert!("automerge:".parse::<DocId>().is_err());
    }

    #[test]
    fn ids_serialize_as_text_or_bytes() {
        let id = NodeId::from_bytes([9; 32]);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<NodeId>(&json).unwrap(), id);
        let bin = postcard::to_allocvec(&id).unwrap();
        assert_eq!(bin.len(), 32);
        assert_eq!(postcard::from_bytes::<NodeId>(&bin).unwrap(), id);
    }
}
