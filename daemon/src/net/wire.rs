//! The wire protocol: length-prefixed postcard frames with a hard size limit. Every frame is a
//! [`Frame`] whose first byte is the protocol version, so a future version can be told apart
//! (and refused with a reason) before anything else is decoded.

use serde::{Deserialize, Serialize};
use tandem_crdt::{Delta, NodeId, VersionVector, delta::MAX_CHANGE_BYTES};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame accepted: one maximal change plus room for its envelope.
pub const MAX_FRAME: usize = MAX_CHANGE_BYTES + 64 * 1024;

/// Target size of one catch-up batch.
pub const BATCH_BYTES: usize = 256 * 1024;

/// A frame on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Frame {
    V1(Msg),
}

/// Version 1 messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Msg {
    /// First frame on the sync stream, both ways: who I am and what I hold.
    Hello {
        version: u32,
        node: NodeId,
        /// What the node calls itself (for people; never trusted for anything).
        name: String,
        clock: VersionVector,
    },
    /// Catch-up deltas, in `(origin, seq)` order; answered with [`Msg::Ack`].
    Batch { seq: u64, deltas: Vec<Delta> },
    /// Batch `seq` is stored.
    Ack { seq: u64 },
    /// Everything the peer lacked as of its Hello has been sent.
    CaughtUp,
    /// Live deltas (on the push stream).
    Push { deltas: Vec<Delta> },
    /// Join handshake: the invite secret.
    JoinRequest {
        secret: [u8; 32],
        addrs: Vec<String>,
    },
    /// Join accepted: the inviter's member list (id, addresses).
    JoinAccepted { members: Vec<(NodeId, Vec<String>)> },
    /// Join refused, with the reason.
    JoinRefused { reason: String },
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("undecodable frame: {0}")]
    Decode(#[from] postcard::Error),
    #[error("stream: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream ended")]
    Closed,
}

/// Encodes a frame with its 4-byte little-endian length prefix.
pub fn encode(msg: &Msg) -> Result<Vec<u8>, WireError> {
    let body = postcard::to_allocvec(&Frame::V1(msg.clone()))?;
    if body.len() > MAX_FRAME {
        return Err(WireError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a frame body (without its length prefix).
pub fn decode(body: &[u8]) -> Result<Msg, WireError> {
    match postcard::from_bytes::<Frame>(body)? {
        Frame::V1(m) => Ok(m),
    }
}

/// Writes one frame.
pub async fn write(stream: &mut quinn::SendStream, msg: &Msg) -> Result<usize, WireError> {
    let bytes = encode(msg)?;
    stream.write_all(&bytes).await?;
    Ok(bytes.len())
}

/// Reads one frame; `Ok(None)` at a clean end of stream. The length is checked before any
/// buffer is allocated.
pub async fn read(stream: &mut quinn::RecvStream) -> Result<Option<(Msg, usize)>, WireError> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok(Some((decode(&body)?, len + 4)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_an_error() {
        let msg = Msg::Hello {
            version: PROTOCOL_VERSION,
            node: NodeId::from_bytes([3; 32]),
            name: "x".into(),
            clock: VersionVector::new(),
        };
        let bytes = encode(&msg).unwrap();
        assert_eq!(decode(&bytes[4..]).unwrap(), msg);
        assert!(decode(&[]).is_err());
        assert!(decode(&[7, 1, 2]).is_err(), "unknown version");
        for i in 0..bytes.len() - 4 {
            let _ = decode(&bytes[4..4 + i]); // truncated: error or a shorter valid value, never a panic
        }
        assert!(matches!(
            decode(&[0, 1, 0xff, 0xff, 0xff, 0xff, 0x0f]),
            Err(WireError::Decode(_))
        ));
    }
}
