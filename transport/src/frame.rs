//! Frames on the wire: a little-endian `u32` length, then an rkyv archive of an [`Envelope`].
//!
//! Receiving copies each frame body once, into a 16-byte-aligned buffer (an archive must be
//! aligned to be read in place), validates it with bytecheck, and from then on reads fields in
//! place. Message content is handed out as a [`Bytes`] slice of that buffer: storing or
//! forwarding it copies nothing. [`FrameDecoder`] is sans-IO: it takes bytes from any source.

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};
use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::with::{AsBox, InlineAsBox};

use crate::message::{ArchivedMessage, Header, Message, Route};

/// The first byte of a heartbeat sent as a QUIC DATAGRAM (RFC 9221) instead of a frame.
pub const DATAGRAM_HEARTBEAT: u8 = 1;

/// Length of a heartbeat datagram: its type byte and the period in milliseconds (`u32`, LE).
pub const HEARTBEAT_DATAGRAM_LEN: usize = 5;

/// Largest QUIC datagram either side accepts (its `max_datagram_frame_size`): heartbeats are
/// the only datagrams, and nothing larger need be buffered.
pub const MAX_DATAGRAM: usize = 64;

/// The datagram of a heartbeat announcing `period_ms`: `[DATAGRAM_HEARTBEAT, period_ms (LE)]`.
/// Unreliable, which is what a heartbeat needs (a lost one is followed by the next), and ~20
/// bytes smaller on the wire than a [`Envelope::Heartbeat`] frame on a stream.
pub fn heartbeat_datagram(period_ms: u32) -> [u8; HEARTBEAT_DATAGRAM_LEN] {
    let mut out = [0; HEARTBEAT_DATAGRAM_LEN];
    out[0] = DATAGRAM_HEARTBEAT;
    out[1..].copy_from_slice(&period_ms.to_le_bytes());
    out
}

/// The period (milliseconds, 0: not said) of a heartbeat datagram; `None` for a datagram that
/// is not one (another type, or a truncated one: ignored, so that a newer peer may add types).
pub fn parse_heartbeat_datagram(datagram: &[u8]) -> Option<u32> {
    match datagram {
        [DATAGRAM_HEARTBEAT, a, b, c, d, ..] => Some(u32::from_le_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// Default largest frame body accepted or sent: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// The first message on the control stream, in both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Hello {
    /// Protocol version the sender speaks ([`crate::PROTOCOL_VERSION`]).
    pub protocol_version: u32,
    /// Identity of the sender's outgoing data stream; a new one after the sender lost its window.
    pub send_epoch: u64,
    /// The peer's `send_epoch` that `recv_acked` refers to (0 if none seen yet).
    pub recv_epoch: u64,
    /// Highest sequence number of the peer's stream this side has made durable.
    pub recv_acked: u64,
}

/// Everything a kedge frame can carry. Borrowed for sending, read in place when received.
///
/// An archived enum is as large as its largest variant, so the large ones are boxed (a 4-byte
/// relative pointer): an `Ack` or `Heartbeat` body is 16 bytes instead of a message header's
/// ~90. They are the frames an idle link sends.
#[derive(Debug, rkyv::Archive, rkyv::Serialize)]
pub enum Envelope<'a> {
    /// Control stream: session setup.
    Hello(#[rkyv(with = AsBox)] Hello),
    /// Control stream: cumulative ack, everything up to and including this sequence is durable.
    Ack(u64),
    /// Control stream, node to cloud: the node is alive (it renews its Lease). Reliable within
    /// the connection (QUIC retransmits it), never replayed across connections. Carries the
    /// node's heartbeat period in milliseconds, so the cloud's grace for the node follows it;
    /// 0 when not said: nodes before it sent a bare `Heartbeat`, whose zeroed padding reads as
    /// 0 (the body stays 16 bytes, so either side may be the older one).
    Heartbeat(u32),
    /// Data stream: the sequence number of the first message that follows on this stream.
    StreamStart(u64),
    /// Data and request streams: one application message.
    Message(#[rkyv(with = InlineAsBox)] &'a Message),
    /// Data streams, link protocol 3 and later: one message in its compact form (see
    /// [`crate::compact`]). Never sent to a peer that speaks an older version: the link
    /// expands it to [`Envelope::Message`] for such a peer ([`EncodedMessage::for_version`]).
    Compact(#[rkyv(with = InlineAsBox)] &'a [u8]),
}

/// The archived form of any [`Envelope`].
pub type ArchivedFrame = ArchivedEnvelope<'static>;

/// Why bytes could not become a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A frame body over the maximum (or over `u32::MAX` bytes, which its prefix cannot say).
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Body length in bytes, as given or as the length prefix announced.
        len: usize,
        /// The maximum body length in bytes.
        max: usize,
    },
    /// A length prefix of zero: no frame body is empty.
    #[error("empty frame")]
    Empty,
    /// The body is not a valid rkyv archive of an [`Envelope`] (bytecheck's reason).
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({have} of {want} bytes)")]
    Truncated {
        /// Bytes of the frame received, length prefix included.
        have: usize,
        /// Bytes the whole frame has, length prefix included (4 while the prefix is incomplete).
        want: usize,
    },
}

/// A message already encoded as a frame body. Encode once, then clone (a refcount) to send the
/// same bytes to any number of nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedMessage(Bytes);

impl EncodedMessage {
    /// Encodes `message` as a frame body (an [`Envelope::Message`] archive), once.
    pub fn encode(message: &Message) -> Self {
        EncodedMessage(encode_body(&Envelope::Message(message)))
    }

    /// Encodes `message` in its compact form ([`Envelope::Compact`], see [`crate::compact`])
    /// when it has one, in the full form otherwise. For the link's ordered data stream, which
    /// expands it for a peer of an older protocol version.
    pub fn encode_compact(message: &Message) -> Self {
        match crate::compact::encode(message) {
            Some(payload) => EncodedMessage(encode_body(&Envelope::Compact(&payload))),
            None => EncodedMessage::encode(message),
        }
    }

    /// Whether the body is a compact message.
    pub fn is_compact(&self) -> bool {
        matches!(self.envelope(), ArchivedEnvelope::Compact(_))
    }

    /// The body to send to a peer speaking link protocol `version`: these bytes, or for a peer
    /// before compact messages (version 2) the same message in its full form.
    pub fn for_version(&self, version: u32) -> Bytes {
        if version >= crate::config::COMPACT_PROTOCOL_VERSION || !self.is_compact() {
            return self.0.clone();
        }
        let frame = Frame {
            body: self.0.clone(),
        };
        match frame.into_message() {
            Ok(message) => encode_body(&Envelope::Message(&message.to_message())),
            // A compact body is always a message.
            Err(frame) => frame.body,
        }
    }

    fn envelope(&self) -> &ArchivedFrame {
        // SAFETY: an `EncodedMessage` is only made by `encode_body` (a valid archive, in a
        // 16-byte-aligned buffer) or from a validated frame (`ReceivedMessage::encoded`), and
        // `Bytes` is immutable.
        unsafe { rkyv::access_unchecked::<ArchivedFrame>(&self.0) }
    }

    /// The frame body (without the length prefix).
    pub fn body(&self) -> &Bytes {
        &self.0
    }

    /// Length of the frame body in bytes (without the 4-byte prefix).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the body is empty (never for an encoded message).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Encodes an envelope into a frame body. Serializing owned, in-memory values cannot fail.
pub fn encode_body(envelope: &Envelope<'_>) -> Bytes {
    let body: AlignedVec =
        rkyv::to_bytes::<rancor::Panic>(envelope).unwrap_or_else(|never| match never {});
    Bytes::from_owner(body)
}

/// Appends `len ‖ body` to `out`: the whole frame as it goes on the wire.
pub fn put_frame(out: &mut BytesMut, body: &[u8]) {
    out.reserve(4 + body.len());
    out.put_u32_le(body.len() as u32);
    out.put_slice(body);
}

/// The 4-byte length prefix of a body, checked against `max`.
///
/// # Errors
/// [`FrameError::TooLarge`] when `body_len` exceeds `max` or `u32::MAX`.
pub fn length_prefix(body_len: usize, max: usize) -> Result<[u8; 4], FrameError> {
    if body_len > max || body_len > u32::MAX as usize {
        return Err(FrameError::TooLarge { len: body_len, max });
    }
    Ok((body_len as u32).to_le_bytes())
}

/// A received, validated frame. Cheap to clone; fields are read in place.
#[derive(Clone)]
pub struct Frame {
    body: Bytes,
}

impl Frame {
    /// Validates an archive. `body` should start on a 16-byte boundary (as [`FrameDecoder`]
    /// gives); one that does not is copied once into an aligned buffer.
    ///
    /// # Errors
    /// [`FrameError::Empty`] for an empty body, [`FrameError::Malformed`] when it is not a valid
    /// archive of an [`Envelope`].
    pub fn validate(body: Bytes) -> Result<Self, FrameError> {
        if body.is_empty() {
            return Err(FrameError::Empty);
        }
        if body.as_ptr().align_offset(16) != 0 {
            // Never for bodies from FrameDecoder; a defensive copy for any other caller.
            let mut aligned = AlignedVec::<16>::with_capacity(body.len());
            aligned.extend_from_slice(&body);
            return Frame::validate(Bytes::from_owner(aligned));
        }
        let envelope = rkyv::access::<ArchivedFrame, rancor::Error>(&body)
            .map_err(|e| FrameError::Malformed(e.to_string()))?;
        if let ArchivedEnvelope::Compact(payload) = envelope {
            crate::compact::parse(payload.get()).map_err(FrameError::Malformed)?;
        }
        Ok(Frame { body })
    }

    /// The envelope, read in place.
    pub fn envelope(&self) -> &ArchivedFrame {
        // SAFETY: `body` was validated as an `ArchivedFrame` in `validate` and `Bytes` is
        // immutable, so the same bytes are still a valid archive.
        unsafe { rkyv::access_unchecked::<ArchivedFrame>(&self.body) }
    }

    /// The frame body as received.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// This frame as a message, if it is one.
    ///
    /// # Errors
    /// The frame itself, given back, when it carries another envelope variant (use
    /// [`kind`](Self::kind) to name it).
    pub fn into_message(self) -> Result<ReceivedMessage, Frame> {
        match self.envelope() {
            ArchivedEnvelope::Message(_) | ArchivedEnvelope::Compact(_) => {
                Ok(ReceivedMessage { frame: self })
            }
            _ => Err(self),
        }
    }

    /// A short name of the envelope variant, for errors and logs.
    pub fn kind(&self) -> &'static str {
        match self.envelope() {
            ArchivedEnvelope::Hello(_) => "Hello",
            ArchivedEnvelope::Ack(_) => "Ack",
            ArchivedEnvelope::Heartbeat(_) => "Heartbeat",
            ArchivedEnvelope::StreamStart(_) => "StreamStart",
            ArchivedEnvelope::Message(_) => "Message",
            ArchivedEnvelope::Compact(_) => "Compact",
        }
    }
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frame")
            .field("kind", &self.kind())
            .field("len", &self.body.len())
            .finish()
    }
}

/// A received message, read in place from its frame (full or compact form alike). As small
/// as its frame: a compact message's few numbers are read again when asked for (a couple of
/// LEB128 numbers) rather than kept, since every delivery in every node's event queue has one.
#[derive(Clone)]
pub struct ReceivedMessage {
    frame: Frame,
}

/// What a received message is, read from its frame.
enum Form<'a> {
    /// An [`Envelope::Message`] archive.
    Full(&'a ArchivedMessage),
    /// An [`Envelope::Compact`] payload, parsed.
    Compact(&'a [u8], crate::compact::Parsed),
}

/// A received message's header, borrowed. Fields as in [`Header`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderRef<'a> {
    /// Unique id of the message; empty for a compact one.
    pub id: &'a str,
    /// The id of the request it answers, or empty.
    pub parent_id: &'a str,
    /// Milliseconds since the Unix epoch when it was made; 0 for a compact one.
    pub timestamp: i64,
    /// The resourceVersion of the object it carries, or empty.
    pub resource_version: Cow<'a, str>,
    /// Whether the sender waits for a response.
    pub sync: bool,
}

/// A received message's route, borrowed. Fields as in [`Route`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteRef<'a> {
    /// The module that sent it.
    pub source: &'a str,
    /// The module group it is for.
    pub group: &'a str,
    /// What it does.
    pub operation: &'a str,
    /// What it is about.
    pub resource: &'a str,
}

impl ReceivedMessage {
    fn form(&self) -> Form<'_> {
        match self.frame.envelope() {
            ArchivedEnvelope::Message(message) => Form::Full(message.get()),
            ArchivedEnvelope::Compact(payload) => {
                let payload = payload.get();
                match crate::compact::parse(payload) {
                    Ok(parsed) => Form::Compact(payload, parsed),
                    // Parsed when the frame was validated; the bytes are immutable.
                    Err(e) => unreachable!("a validated compact frame no longer parses: {e}"),
                }
            }
            // `ReceivedMessage` is only built from message frames (`Frame::into_message`).
            _ => unreachable!("ReceivedMessage holds a non-message frame"),
        }
    }

    /// The message header, read in place (a compact message's resourceVersion is formatted).
    pub fn header(&self) -> HeaderRef<'_> {
        match self.form() {
            Form::Compact(_, parsed) => HeaderRef {
                id: "",
                parent_id: "",
                timestamp: 0,
                resource_version: parsed
                    .resource_version
                    .map_or(Cow::Borrowed(""), |v| Cow::Owned(v.to_string())),
                sync: false,
            },
            Form::Full(m) => HeaderRef {
                id: m.header.id.as_str(),
                parent_id: m.header.parent_id.as_str(),
                timestamp: m.header.timestamp.to_native(),
                resource_version: Cow::Borrowed(m.header.resource_version.as_str()),
                sync: m.header.sync,
            },
        }
    }

    /// The message route, read in place.
    pub fn route(&self) -> RouteRef<'_> {
        match self.form() {
            Form::Compact(payload, parsed) => {
                let (source, group, operation) = crate::compact::ROUTES[usize::from(parsed.route)];
                RouteRef {
                    source,
                    group,
                    operation,
                    // Checked to be UTF-8 when parsed.
                    resource: std::str::from_utf8(&payload[parsed.resource]).unwrap_or(""),
                }
            }
            Form::Full(m) => RouteRef {
                source: m.route.source.as_str(),
                group: m.route.group.as_str(),
                operation: m.route.operation.as_str(),
                resource: m.route.resource.as_str(),
            },
        }
    }

    /// The content, as a slice of the receive buffer: no copy.
    pub fn content(&self) -> Bytes {
        match self.form() {
            Form::Compact(payload, parsed) => self.frame.body.slice_ref(&payload[parsed.content]),
            Form::Full(m) => self.frame.body.slice_ref(m.content.as_slice()),
        }
    }

    /// Whether it came in the compact form.
    pub fn is_compact(&self) -> bool {
        matches!(self.frame.envelope(), ArchivedEnvelope::Compact(_))
    }

    /// The same bytes, ready to forward to another peer without re-encoding.
    pub fn encoded(&self) -> EncodedMessage {
        EncodedMessage(self.frame.body.clone())
    }

    /// An owned copy of the message.
    pub fn to_message(&self) -> Message {
        let h = self.header();
        let r = self.route();
        Message {
            header: Header {
                id: h.id.to_owned(),
                parent_id: h.parent_id.to_owned(),
                timestamp: h.timestamp,
                resource_version: h.resource_version.into_owned(),
                sync: h.sync,
            },
            route: Route::new(r.source, r.group, r.operation, r.resource),
            content: self.content(),
        }
    }
}

impl std::fmt::Debug for ReceivedMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let route = self.route();
        f.debug_struct("ReceivedMessage")
            .field("id", &self.header().id)
            .field("operation", &route.operation)
            .field("resource", &route.resource)
            .field("content_len", &self.content().len())
            .finish()
    }
}

/// Splits a byte stream into validated frames. Sans-IO: feed it whatever the transport reads.
#[derive(Debug)]
pub struct FrameDecoder {
    max_frame: usize,
    state: DecodeState,
}

#[derive(Debug)]
enum DecodeState {
    Length { bytes: [u8; 4], have: usize },
    Body { body: AlignedVec<16>, want: usize },
}

impl FrameDecoder {
    /// A decoder that refuses frame bodies over `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        FrameDecoder {
            max_frame,
            state: DecodeState::Length {
                bytes: [0; 4],
                have: 0,
            },
        }
    }

    /// Consumes bytes from the front of `input` until a frame is complete (returned) or `input`
    /// is empty (`None`). Call again with the rest of `input` after a frame. After an error the
    /// stream is unusable: close it.
    ///
    /// # Errors
    /// [`FrameError::Empty`] for a zero length prefix, [`FrameError::TooLarge`] for a length over
    /// the decoder's maximum (before anything is allocated for it), [`FrameError::Malformed`] for
    /// a body that is not a valid archive.
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<Frame>, FrameError> {
        loop {
            match &mut self.state {
                DecodeState::Length { bytes, have } => {
                    if input.is_empty() {
                        return Ok(None);
                    }
                    let take = (4 - *have).min(input.len());
                    bytes[*have..*have + take].copy_from_slice(&input[..take]);
                    *have += take;
                    *input = &input[take..];
                    if *have < 4 {
                        return Ok(None);
                    }
                    let want = u32::from_le_bytes(*bytes) as usize;
                    if want == 0 {
                        return Err(FrameError::Empty);
                    }
                    if want > self.max_frame {
                        return Err(FrameError::TooLarge {
                            len: want,
                            max: self.max_frame,
                        });
                    }
                    // Reserve only what is in hand plus a bit, so a lying length prefix cannot
                    // make us allocate the maximum up front.
                    let mut body = AlignedVec::<16>::new();
                    body.reserve(want.min(input.len().max(64 * 1024)));
                    self.state = DecodeState::Body { body, want };
                }
                DecodeState::Body { body, want } => {
                    let take = (*want - body.len()).min(input.len());
                    body.extend_from_slice(&input[..take]);
                    *input = &input[take..];
                    if body.len() < *want {
                        return Ok(None);
                    }
                    let body = std::mem::take(body);
                    self.state = DecodeState::Length {
                        bytes: [0; 4],
                        have: 0,
                    };
                    return Frame::validate(Bytes::from_owner(body)).map(Some);
                }
            }
        }
    }

    /// Call at end of stream: an error if the stream stopped inside a frame.
    ///
    /// # Errors
    /// [`FrameError::Truncated`] when part of a length prefix or body has been read, counting
    /// the prefix's 4 bytes in `have` and `want`.
    pub fn finish(&self) -> Result<(), FrameError> {
        match &self.state {
            DecodeState::Length { have: 0, .. } => Ok(()),
            DecodeState::Length { have, .. } => Err(FrameError::Truncated {
                have: *have,
                want: 4,
            }),
            DecodeState::Body { body, want } => Err(FrameError::Truncated {
                have: body.len() + 4,
                want: want + 4,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Route;

    fn wire(envelopes: &[Envelope<'_>]) -> Vec<u8> {
        let mut out = BytesMut::new();
        for e in envelopes {
            put_frame(&mut out, &encode_body(e));
        }
        out.to_vec()
    }

    #[test]
    fn decodes_frames_split_at_every_byte() {
        let msg = Message::new(
            Route::new("a", "b", "update", "ns/pod/x"),
            &b"{\"k\":1}"[..],
        );
        let bytes = wire(&[
            Envelope::StreamStart(7),
            Envelope::Message(&msg),
            Envelope::Ack(9),
        ]);
        for split in 0..bytes.len() {
            let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
            let mut frames = Vec::new();
            for part in [&bytes[..split], &bytes[split..]] {
                let mut input = part;
                while let Some(f) = dec.decode(&mut input).unwrap() {
                    frames.push(f);
                }
                assert!(input.is_empty());
            }
            dec.finish().unwrap();
            assert_eq!(frames.len(), 3);
            assert!(matches!(frames[0].envelope(), ArchivedEnvelope::StreamStart(s) if *s == 7));
            let got = frames[1].clone().into_message().unwrap();
            assert_eq!(got.to_message(), msg);
            assert!(matches!(frames[2].envelope(), ArchivedEnvelope::Ack(s) if *s == 9));
        }
    }

    #[test]
    fn control_frames_are_small_and_hello_round_trips() {
        // What an idle link sends: 16-byte bodies, not the size of the largest variant.
        for envelope in [Envelope::Ack(u64::MAX), Envelope::Heartbeat(u32::MAX)] {
            assert_eq!(encode_body(&envelope).len(), 16, "{envelope:?}");
        }
        let hello = Hello {
            protocol_version: crate::PROTOCOL_VERSION,
            send_epoch: 1,
            recv_epoch: 2,
            recv_acked: 3,
        };
        let bytes = wire(&[Envelope::Hello(hello), Envelope::Heartbeat(10_000)]);
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let mut input = &bytes[..];
        let first = dec.decode(&mut input).unwrap().unwrap();
        let ArchivedEnvelope::Hello(got) = first.envelope() else {
            panic!("expected Hello, got {}", first.kind());
        };
        assert_eq!(got.recv_acked.to_native(), 3);
        assert_eq!(got.send_epoch.to_native(), 1);
        let second = dec.decode(&mut input).unwrap().unwrap();
        assert!(matches!(second.envelope(), ArchivedEnvelope::Heartbeat(p) if *p == 10_000));
    }

    #[test]
    fn heartbeat_datagrams_round_trip_and_others_are_not_heartbeats() {
        let d = heartbeat_datagram(15_000);
        assert_eq!(d.len(), HEARTBEAT_DATAGRAM_LEN);
        assert_eq!(parse_heartbeat_datagram(&d), Some(15_000));
        assert_eq!(parse_heartbeat_datagram(&heartbeat_datagram(0)), Some(0));
        assert_eq!(parse_heartbeat_datagram(&d[..4]), None, "truncated");
        assert_eq!(parse_heartbeat_datagram(&[]), None);
        assert_eq!(
            parse_heartbeat_datagram(&[7, 0, 0, 0, 0]),
            None,
            "another type"
        );
    }

    /// The envelope as it was before heartbeats carried a period: what older nodes send.
    #[derive(rkyv::Archive, rkyv::Serialize)]
    #[allow(dead_code)]
    enum BarePeriodEnvelope {
        Hello(#[rkyv(with = AsBox)] Hello),
        Ack(u64),
        Heartbeat,
        StreamStart(u64),
    }

    #[test]
    fn a_heartbeat_without_a_period_reads_as_zero_and_one_with_a_period_as_a_heartbeat() {
        // An older node's bare heartbeat to a newer cloud: its padding is zeroed.
        let old = rkyv::to_bytes::<rancor::Panic>(&BarePeriodEnvelope::Heartbeat).unwrap();
        assert_eq!(old.len(), 16);
        let mut framed = BytesMut::new();
        put_frame(&mut framed, &old);
        let frame = FrameDecoder::new(DEFAULT_MAX_FRAME)
            .decode(&mut &framed[..])
            .unwrap()
            .unwrap();
        assert!(matches!(frame.envelope(), ArchivedEnvelope::Heartbeat(p) if *p == 0));
        // A newer node's heartbeat to an older cloud: the same tag, the period in what the
        // older side takes for padding.
        let new = encode_body(&Envelope::Heartbeat(15_000));
        let new = aligned(&new);
        let archived = rkyv::access::<ArchivedBarePeriodEnvelope, rancor::Error>(&new).unwrap();
        assert!(matches!(archived, ArchivedBarePeriodEnvelope::Heartbeat));
    }

    fn aligned(bytes: &[u8]) -> AlignedVec {
        let mut out = AlignedVec::new();
        out.extend_from_slice(bytes);
        out
    }

    #[test]
    fn content_is_a_slice_of_the_receive_buffer() {
        let msg = Message::new(Route::default(), vec![b'x'; 1000]);
        let bytes = wire(&[Envelope::Message(&msg)]);
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let frame = dec.decode(&mut &bytes[..]).unwrap().unwrap();
        let body_range = frame.body().as_ptr_range();
        let got = frame.into_message().unwrap();
        let content = got.content();
        assert_eq!(&content[..], &msg.content[..]);
        assert!(body_range.contains(&content.as_ptr()), "content was copied");
    }

    #[test]
    fn oversized_length_is_rejected_before_allocating() {
        let mut dec = FrameDecoder::new(1024);
        let mut input: &[u8] = &(1u32 << 30).to_le_bytes();
        assert_eq!(
            dec.decode(&mut input).unwrap_err(),
            FrameError::TooLarge {
                len: 1 << 30,
                max: 1024
            }
        );
    }

    #[test]
    fn garbage_is_malformed_and_truncation_is_reported() {
        let mut dec = FrameDecoder::new(1024);
        let mut input: &[u8] = &[8, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        assert!(matches!(
            dec.decode(&mut input),
            Err(FrameError::Malformed(_))
        ));

        let mut dec = FrameDecoder::new(1024);
        let mut input: &[u8] = &[8, 0, 0, 0, 1, 2];
        assert!(dec.decode(&mut input).unwrap().is_none());
        assert_eq!(
            dec.finish().unwrap_err(),
            FrameError::Truncated { have: 6, want: 12 }
        );
        let mut input: &[u8] = &[0, 0, 0, 0];
        assert_eq!(
            FrameDecoder::new(10).decode(&mut input).unwrap_err(),
            FrameError::Empty
        );
    }

    #[test]
    fn encoded_message_is_shareable_and_forwardable() {
        let msg = Message::new(Route::default(), &b"{}"[..]);
        let enc = EncodedMessage::encode(&msg);
        let frame = Frame::validate(enc.body().clone()).unwrap();
        let received = frame.into_message().unwrap();
        assert_eq!(received.encoded(), enc);
    }
}
