//! Frames over quinn streams: the async glue around the sans-IO [`FrameDecoder`].

use bytes::{Buf, Bytes, BytesMut};

use crate::error::LinkError;
use crate::frame::{length_prefix, Frame, FrameDecoder};

/// Bodies up to this size are copied next to their length prefix into one chunk; larger ones
/// are handed to quinn as their own chunk, without a copy.
const COPY_THRESHOLD: usize = 8 * 1024;

/// Reads validated frames from a receive stream.
#[derive(Debug)]
pub(crate) struct FrameReader {
    stream: quinn::RecvStream,
    decoder: FrameDecoder,
    pending: Bytes,
}

impl FrameReader {
    pub(crate) fn new(stream: quinn::RecvStream, max_frame: usize) -> Self {
        FrameReader {
            stream,
            decoder: FrameDecoder::new(max_frame),
            pending: Bytes::new(),
        }
    }

    /// The next frame; `None` at a clean end of stream.
    pub(crate) async fn next(&mut self) -> Result<Option<Frame>, LinkError> {
        loop {
            if !self.pending.is_empty() {
                let mut input = &self.pending[..];
                let decoded = self.decoder.decode(&mut input);
                let consumed = self.pending.len() - input.len();
                self.pending.advance(consumed);
                if self.pending.is_empty() {
                    // An empty slice still pins quinn's whole receive buffer; let it go.
                    self.pending = Bytes::new();
                }
                if let Some(frame) = decoded? {
                    return Ok(Some(frame));
                }
            }
            match self.stream.read_chunk(usize::MAX, true).await? {
                Some(chunk) => self.pending = chunk.bytes,
                None => {
                    self.decoder.finish()?;
                    return Ok(None);
                }
            }
        }
    }
}

/// Writes frame bodies, each behind its length prefix, in as few quinn calls as it can.
pub(crate) async fn write_bodies<'a>(
    stream: &mut quinn::SendStream,
    bodies: impl IntoIterator<Item = &'a Bytes>,
    max_frame: usize,
) -> Result<(), LinkError> {
    let mut chunks = Vec::new();
    let mut small = BytesMut::new();
    for body in bodies {
        small.extend_from_slice(&length_prefix(body.len(), max_frame)?);
        if body.len() <= COPY_THRESHOLD {
            small.extend_from_slice(body);
        } else {
            chunks.push(small.split().freeze());
            chunks.push(body.clone());
        }
    }
    if !small.is_empty() {
        chunks.push(small.freeze());
    }
    stream.write_all_chunks(&mut chunks).await?;
    Ok(())
}
