//! The wire protocol's messages and framing, with no IO.
//!
//! Every stream on a member connection starts with one [`StreamKind`] byte, then carries
//! length-prefixed frames (4-byte little-endian length, then postcard). Each kind has its own
//! message type, each wrapped in a versioned frame enum (`V1(..)`), so a message on the wrong
//! stream is a decode error, not a runtime check, and a future version can be told apart and
//! refused with a reason before anything else is decoded.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::clock::VersionVector;
use crate::delta::{Delta, MAX_CHANGE_BYTES};
use crate::id::NodeId;
use crate::members::MemberList;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 5;

/// Largest frame accepted: one maximal change plus room for its envelope.
pub const MAX_FRAME: usize = MAX_CHANGE_BYTES + 64 * 1024;

/// Target size of one catch-up batch.
pub const BATCH_BYTES: usize = 256 * 1024;

/// The first byte of every stream opened on a member connection: what the stream carries. New
/// layers add a kind; nothing depends on the order streams are opened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum StreamKind {
    /// The sync stream (bi, opened by the dialer): [`SyncMsg`].
    Sync = 1,
    /// A push stream (uni, one per direction): [`PushMsg`].
    Push = 2,
    /// The join handshake (bi, on a join connection): [`JoinMsg`].
    Join = 3,
    /// One Raft RPC (bi, one request and one reply per stream): [`RaftMsg`].
    Raft = 4,
}

impl StreamKind {
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Sync,
            2 => Self::Push,
            3 => Self::Join,
            4 => Self::Raft,
            _ => return None,
        })
    }

    pub fn byte(self) -> u8 {
        self as u8
    }
}

/// The largest datagram accepted (tag included). What a node sends is sized to its path
/// (quinn's `max_datagram_size()`, about 1,100 bytes at the initial MTU, more once path MTU
/// discovery finds room); what it accepts is bounded by this, whatever the sender's path.
pub const MAX_DATAGRAM: usize = 1452;

/// The first byte of every QUIC datagram: what it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DatagramKind {
    /// SWIM gossip ([`crate::gossip`]).
    Gossip = 1,
    /// A clock digest and addresses ([`crate::entropy`]).
    Digest = 2,
}

impl DatagramKind {
    /// The body of `packet` if it is a datagram of this kind: tagged so, not empty after the
    /// tag, and at most [`MAX_DATAGRAM`] bytes in all.
    pub fn body(self, packet: &[u8]) -> Option<&[u8]> {
        match packet {
            [tag, body @ ..] if *tag == self as u8 && !body.is_empty() => {
                (packet.len() <= MAX_DATAGRAM).then_some(body)
            }
            _ => None,
        }
    }
}

/// A message on the sync stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SyncMsg {
    /// First frame, both ways: who I am and what I hold.
    Hello {
        version: u32,
        node: NodeId,
        /// What the node calls itself (for people; never trusted for anything).
        name: String,
        clock: VersionVector,
    },
    /// Catch-up deltas, in `(origin, seq)` order; answered with [`SyncMsg::Ack`]. `seq` counts
    /// batches from 1 on each session.
    Batch { seq: u64, deltas: Vec<Delta> },
    /// Batch `seq` is durably stored.
    Ack { seq: u64 },
    /// Everything the peer lacked as of its Hello has been sent.
    CaughtUp,
    /// The first `stored` frames of the sender's push stream are durably stored (cumulative;
    /// sent when the receiver's queue of pushes drains, so one ack covers a burst).
    PushAck { stored: u64 },
    /// Anti-entropy: "this is everything I hold now; send me what I lack". The receiver trusts
    /// it as it trusts a Hello clock, forgets what it only believed it had sent, and sends the
    /// rest from its store. Unless `reply`, a receiver that lacks something the clock holds
    /// answers with its own clock (`reply: true`), so one exchange repairs both ways.
    Resync { clock: VersionVector, reply: bool },
}

/// A message on a push stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PushMsg {
    /// Live deltas.
    Push { deltas: Vec<Delta> },
}

/// A message on the join stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum JoinMsg {
    /// The invite secret, where the joiner can be reached, what it calls itself, and whether
    /// it asks to be a voter whenever possible.
    Request {
        secret: [u8; 32],
        addrs: Vec<String>,
        name: String,
        prefer_voter: bool,
    },
    /// Accepted: the admission committed. The joiner's Raft id, and the replicated member list
    /// as of the admission (the joiner trusts it until its own Raft log catches up).
    Accepted { raft_id: u64, list: MemberList },
    /// Refused, with the reason.
    Refused { reason: String },
}

/// A message on a Raft stream. The RPC itself is opaque here (the daemon's Raft library
/// encodes it); the envelope says which cluster and epoch it belongs to, so traffic from
/// another cluster or an older epoch is told apart before anything else is decoded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RaftMsg {
    Request {
        cluster: [u8; 16],
        epoch: u64,
        rpc: Vec<u8>,
    },
    Reply {
        rpc: Vec<u8>,
    },
    /// The receiver is in a later epoch (after a recovery): the sender adopts it.
    StaleEpoch {
        epoch: u64,
    },
    /// Refused: another cluster, or the receiver's Raft is not running; why.
    Refused {
        reason: String,
    },
}

impl Message for RaftMsg {
    const KIND: StreamKind = StreamKind::Raft;
    fn name(&self) -> &'static str {
        match self {
            Self::Request { .. } => "RaftRequest",
            Self::Reply { .. } => "RaftReply",
            Self::StaleEpoch { .. } => "RaftStaleEpoch",
            Self::Refused { .. } => "RaftRefused",
        }
    }
}

/// A versioned frame of one stream's messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Frame<M> {
    V1(M),
}

/// A message type that travels in frames on one kind of stream.
pub trait Message: Serialize + DeserializeOwned + Clone + std::fmt::Debug {
    /// The stream it belongs on.
    const KIND: StreamKind;
    /// Its name, for errors and logs.
    fn name(&self) -> &'static str;
}

impl Message for SyncMsg {
    const KIND: StreamKind = StreamKind::Sync;
    fn name(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "Hello",
            Self::Batch { .. } => "Batch",
            Self::Ack { .. } => "Ack",
            Self::CaughtUp => "CaughtUp",
            Self::PushAck { .. } => "PushAck",
            Self::Resync { .. } => "Resync",
        }
    }
}

impl Message for PushMsg {
    const KIND: StreamKind = StreamKind::Push;
    fn name(&self) -> &'static str {
        "Push"
    }
}

impl Message for JoinMsg {
    const KIND: StreamKind = StreamKind::Join;
    fn name(&self) -> &'static str {
        match self {
            Self::Request { .. } => "JoinRequest",
            Self::Accepted { .. } => "JoinAccepted",
            Self::Refused { .. } => "JoinRefused",
        }
    }
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("undecodable frame: {0}")]
    Decode(#[from] postcard::Error),
}

/// Encodes a frame with its 4-byte little-endian length prefix.
pub fn encode<M: Message>(msg: &M) -> Result<Vec<u8>, FrameError> {
    // Reserve the prefix and serialise behind it: no second copy of a large batch.
    let mut out = postcard::to_extend(&Frame::V1(msg), vec![0u8; 4])?;
    let len = out.len() - 4;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    out[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(out)
}

/// The body length a 4-byte prefix announces, refused before anything is allocated if it is
/// over [`MAX_FRAME`].
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes a frame body (without its length prefix). Trailing bytes are an error.
pub fn decode<M: Message>(body: &[u8]) -> Result<M, FrameError> {
    let (frame, rest) = postcard::take_from_bytes::<Frame<M>>(body)?;
    if !rest.is_empty() {
        return Err(FrameError::Decode(postcard::Error::DeserializeBadEncoding));
    }
    match frame {
        Frame::V1(m) => Ok(m),
    }
}

/// Splits a byte stream into frames without IO: feed it bytes as they arrive, take frames out.
/// Used by tests and fuzzers to run whole streams through the same checks the daemon makes.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame (and its size on the wire), `Ok(None)` if more bytes are needed.
    pub fn next_frame<M: Message>(&mut self) -> Result<Option<(M, usize)>, FrameError> {
        let Some(prefix) = self.buf.get(..4) else {
            return Ok(None);
        };
        let mut p = [0u8; 4];
        p.copy_from_slice(prefix);
        let len = frame_len(p)?;
        let Some(body) = self.buf.get(4..4 + len) else {
            return Ok(None);
        };
        let msg = decode(body)?;
        self.buf.drain(..4 + len);
        Ok(Some((msg, len + 4)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_an_error() {
        let msg = SyncMsg::Hello {
            version: PROTOCOL_VERSION,
            node: NodeId::from_bytes([3; 32]),
            name: "x".into(),
            clock: VersionVector::new(),
        };
        let bytes = encode(&msg).unwrap();
        assert_eq!(decode::<SyncMsg>(&bytes[4..]).unwrap(), msg);
        assert!(decode::<SyncMsg>(&[]).is_err());
        assert!(decode::<SyncMsg>(&[7, 1, 2]).is_err(), "unknown version");
        for i in 0..bytes.len() - 4 {
            assert!(
                decode::<SyncMsg>(&bytes[4..4 + i]).is_err(),
                "truncated at {i}"
            );
        }
        let mut long = bytes[4..].to_vec();
        long.push(0);
        assert!(decode::<SyncMsg>(&long).is_err(), "trailing bytes");
        assert!(frame_len(((MAX_FRAME + 1) as u32).to_le_bytes()).is_err());
    }

    #[test]
    fn a_message_on_the_wrong_stream_does_not_decode() {
        let push = encode(&PushMsg::Push { deltas: vec![] }).unwrap();
        // `Push` is variant 0 of PushMsg; as a SyncMsg it would be a Hello missing its fields.
        assert!(decode::<SyncMsg>(&push[4..]).is_err());
        let join = encode(&JoinMsg::Refused {
            reason: "no".into(),
        })
        .unwrap();
        assert!(decode::<PushMsg>(&join[4..]).is_err());
    }

    #[test]
    fn the_reader_splits_a_stream_at_any_chunking() {
        let msgs = [
            SyncMsg::Ack { seq: 1 },
            SyncMsg::CaughtUp,
            SyncMsg::Batch {
                seq: 2,
                deltas: vec![],
            },
        ];
        let bytes: Vec<u8> = msgs.iter().flat_map(|m| encode(m).unwrap()).collect();
        for chunk in 1..bytes.len() {
            let mut r = FrameReader::new();
            let mut got = Vec::new();
            for c in bytes.chunks(chunk) {
                r.push(c);
                while let Some((m, _)) = r.next_frame::<SyncMsg>().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, msgs);
        }
        for kind in [
            StreamKind::Sync,
            StreamKind::Push,
            StreamKind::Join,
            StreamKind::Raft,
        ] {
            assert_eq!(StreamKind::from_byte(kind.byte()), Some(kind));
        }
        assert_eq!(StreamKind::from_byte(0), None);
    }
}
