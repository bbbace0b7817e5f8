//! Frames on QUIC streams: the IO half of `tandem_crdt::proto` (which defines the messages,
//! the versioned frame and the size limit). The length is checked before anything is
//! allocated; a stream's first byte is its [`StreamKind`].

pub use tandem_crdt::proto::{
    BATCH_BYTES, FrameError, JoinMsg, MAX_FRAME, Message, PROTOCOL_VERSION, PushMsg, StreamKind,
    SyncMsg, decode, encode,
};

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("unexpected {0} on this stream")]
    Unexpected(&'static str),
}

/// Writes one frame; returns its size on the wire.
pub async fn write<M: Message>(
    stream: &mut quinn::SendStream,
    msg: &M,
) -> Result<usize, WireError> {
    let bytes = encode(msg)?;
    stream.write_all(&bytes).await?;
    Ok(bytes.len())
}

/// Reads one frame and its size on the wire; `Ok(None)` at a clean end of stream.
pub async fn read<M: Message>(
    stream: &mut quinn::RecvStream,
) -> Result<Option<(M, usize)>, WireError> {
    let mut prefix = [0u8; 4];
    match stream.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = tandem_crdt::proto::frame_len(prefix)?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok(Some((decode(&body)?, len + 4)))
}

/// Opens a stream of `kind` by writing its kind byte.
pub async fn announce(stream: &mut quinn::SendStream, kind: StreamKind) -> Result<(), WireError> {
    stream.write_all(&[kind.byte()]).await?;
    Ok(())
}
