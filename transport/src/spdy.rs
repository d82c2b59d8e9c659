//! SPDY/3.1 framing (sans-IO), as much of it as Kubernetes' port-forward protocol uses.
//!
//! kubectl 1.32 forwards ports with `SPDY/3.1+portforward.k8s.io`: a WebSocket whose binary
//! messages carry a SPDY/3.1 session as a byte stream (KEP-4006 "tunneling"; a frame may span
//! messages and a message may hold several frames), the same session older kubectl spoke over
//! an HTTP `Upgrade: SPDY/3.1`. The client (moby/spdystream) opens streams, the server answers
//! each with `SYN_REPLY` and then exchanges `DATA` frames; there is no SPDY flow control in
//! that implementation (`WINDOW_UPDATE` is ignored), so backpressure is the byte stream's.
//!
//! Frame layout (draft-mbelshe-httpbis-spdy-00, big-endian):
//! - control: `1|version(15) type(16) flags(8) length(24)` and `length` bytes of payload;
//! - data: `0|stream-id(31) flags(8) length(24)` and `length` bytes (flag `0x01` = FIN).
//!
//! Header blocks (`SYN_STREAM`, `SYN_REPLY`, `HEADERS`) are `u32` count, then per pair `u32`
//! length + lower-case name and `u32` length + value (values NUL-separated), all compressed
//! with one zlib stream per direction using SPDY/3's preset dictionary. This side inflates the
//! client's blocks with the dictionary and writes its own as stored (uncompressed) deflate
//! blocks of a zlib stream without a dictionary, which any zlib reader accepts.

use bytes::{Buf, Bytes, BytesMut};
use flate2::{Decompress, FlushDecompress, Status};

/// The protocol version this module speaks.
pub const VERSION: u16 = 3;
/// The largest data frame this side sends (the format allows 16 MiB - 1).
pub const MAX_DATA: usize = 32 * 1024;
/// The largest frame accepted from a peer (control or data), in bytes of payload.
pub const MAX_FRAME: usize = 1 << 20;
/// The largest header block accepted once inflated, in bytes.
const MAX_HEADERS: usize = 64 * 1024;

/// `RST_STREAM` status codes.
pub mod status {
    /// The peer broke the protocol (a stream without the headers port-forward needs).
    pub const PROTOCOL_ERROR: u32 = 1;
    /// The stream was refused before any processing.
    pub const REFUSED_STREAM: u32 = 3;
    /// The stream is no longer needed (a connection abandoned).
    pub const CANCEL: u32 = 5;
    /// The endpoint failed.
    pub const INTERNAL_ERROR: u32 = 6;
}

const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_SETTINGS: u16 = 4;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const TYPE_WINDOW_UPDATE: u16 = 9;
const FLAG_FIN: u8 = 0x01;

/// A frame read from the peer. Stream ids are 31-bit (a client's are odd); `fin` is the
/// frame's FIN flag (the sender's side of that stream ends with it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A new stream and its headers (names lower-case, as SPDY requires).
    SynStream {
        /// The new stream.
        stream_id: u32,
        /// The opener sends nothing more on it.
        fin: bool,
        /// Its header pairs, in order (a multi-valued header's values NUL-separated).
        headers: Vec<(String, String)>,
    },
    /// The peer accepted a stream this side opened (a server never opens any: ignored).
    SynReply {
        /// The accepted stream.
        stream_id: u32,
        /// The peer sends nothing more on it.
        fin: bool,
    },
    /// The peer abandoned a stream.
    RstStream {
        /// The abandoned stream.
        stream_id: u32,
        /// Why, one of [`status`].
        status: u32,
    },
    /// The peer's settings (window sizes, which no kubectl honours: ignored).
    Settings,
    /// A ping to echo (a client's ids are odd).
    Ping(u32),
    /// The peer ends the session.
    GoAway {
        /// The last stream it processed.
        last_good_stream_id: u32,
        /// Why (0 OK, 1 protocol error, 2 internal error).
        status: u32,
    },
    /// More headers for a stream (ignored).
    Headers {
        /// The stream.
        stream_id: u32,
        /// The peer sends nothing more on it.
        fin: bool,
    },
    /// More flow-control window for a stream (ignored: see the module docs).
    WindowUpdate {
        /// The stream (0: the session).
        stream_id: u32,
        /// The window's growth, in bytes.
        delta: u32,
    },
    /// Bytes of a stream.
    Data {
        /// The stream.
        stream_id: u32,
        /// The peer's side of the stream ends here.
        fin: bool,
        /// The bytes (possibly none, with `fin`).
        data: Bytes,
    },
    /// A control frame of a type this module does not know (skipped).
    Unknown(u16),
}

/// A malformed SPDY session: the session cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed SPDY: {0}")]
pub struct SpdyError(pub String);

fn err(message: impl Into<String>) -> SpdyError {
    SpdyError(message.into())
}

/// Reads frames from the peer's byte stream, in whatever pieces it arrives.
pub struct Decoder {
    buf: BytesMut,
    inflate: Decompress,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A decoder at the start of a session (its header zlib stream not begun).
    pub fn new() -> Decoder {
        Decoder {
            buf: BytesMut::new(),
            inflate: Decompress::new(true),
        }
    }

    /// Appends bytes of the session as they came.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes pushed and not yet read as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, `None` until one is complete. An error (an oversized frame, a
    /// header block that does not inflate or parse, another version) ends the session.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, SpdyError> {
        if self.buf.len() < 8 {
            return Ok(None);
        }
        let word = u32::from_be_bytes(self.buf[0..4].try_into().unwrap());
        let flags = self.buf[4];
        let length = u32::from_be_bytes([0, self.buf[5], self.buf[6], self.buf[7]]) as usize;
        if length > MAX_FRAME {
            return Err(err(format!(
                "a frame of {length} bytes (at most {MAX_FRAME})"
            )));
        }
        if self.buf.len() < 8 + length {
            return Ok(None);
        }
        self.buf.advance(8);
        let payload = self.buf.split_to(length).freeze();
        let fin = flags & FLAG_FIN != 0;
        if word & 0x8000_0000 == 0 {
            return Ok(Some(Frame::Data {
                stream_id: word,
                fin,
                data: payload,
            }));
        }
        let version = ((word >> 16) & 0x7fff) as u16;
        if version != VERSION {
            return Err(err(format!("version {version} (only {VERSION} is spoken)")));
        }
        let kind = (word & 0xffff) as u16;
        let u32_at = |at: usize| -> Result<u32, SpdyError> {
            payload
                .get(at..at + 4)
                .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
                .ok_or_else(|| err(format!("control frame {kind} too short")))
        };
        Ok(Some(match kind {
            TYPE_SYN_STREAM => {
                let stream_id = u32_at(0)? & 0x7fff_ffff;
                if payload.len() < 10 {
                    return Err(err("SYN_STREAM too short"));
                }
                let headers = self.headers(&payload[10..])?;
                Frame::SynStream {
                    stream_id,
                    fin,
                    headers,
                }
            }
            TYPE_SYN_REPLY | TYPE_HEADERS => {
                let stream_id = u32_at(0)? & 0x7fff_ffff;
                // Inflated to keep the shared zlib stream in step; the contents are not used.
                self.headers(&payload[4..])?;
                if kind == TYPE_SYN_REPLY {
                    Frame::SynReply { stream_id, fin }
                } else {
                    Frame::Headers { stream_id, fin }
                }
            }
            TYPE_RST_STREAM => Frame::RstStream {
                stream_id: u32_at(0)? & 0x7fff_ffff,
                status: u32_at(4)?,
            },
            TYPE_SETTINGS => Frame::Settings,
            TYPE_PING => Frame::Ping(u32_at(0)?),
            TYPE_GOAWAY => Frame::GoAway {
                last_good_stream_id: u32_at(0)? & 0x7fff_ffff,
                status: u32_at(4).unwrap_or(0),
            },
            TYPE_WINDOW_UPDATE => Frame::WindowUpdate {
                stream_id: u32_at(0)? & 0x7fff_ffff,
                delta: u32_at(4)? & 0x7fff_ffff,
            },
            other => Frame::Unknown(other),
        }))
    }

    /// Inflates a compressed header block (the session's zlib stream, SPDY/3's dictionary) and
    /// parses its pairs.
    fn headers(&mut self, mut input: &[u8]) -> Result<Vec<(String, String)>, SpdyError> {
        let mut out = Vec::with_capacity(256);
        loop {
            if out.capacity() - out.len() < 256 {
                out.reserve(4096);
            }
            let (in_before, out_before) = (self.inflate.total_in(), self.inflate.total_out());
            let result = self
                .inflate
                .decompress_vec(input, &mut out, FlushDecompress::Sync);
            let used = (self.inflate.total_in() - in_before) as usize;
            let produced = self.inflate.total_out() - out_before;
            input = &input[used..];
            match result {
                Ok(Status::StreamEnd) => break,
                Ok(_) => {
                    if input.is_empty() && out.len() < out.capacity() {
                        break;
                    }
                    if used == 0 && produced == 0 {
                        if input.is_empty() {
                            break;
                        }
                        return Err(err("a header block does not inflate"));
                    }
                }
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(HEADER_DICTIONARY)
                        .map_err(|e| err(format!("the header dictionary: {e}")))?;
                }
                Err(e) => return Err(err(format!("a header block: {e}"))),
            }
            if out.len() > MAX_HEADERS {
                return Err(err("a header block over 64 KiB"));
            }
        }
        parse_header_block(&out)
    }
}

fn parse_header_block(mut block: &[u8]) -> Result<Vec<(String, String)>, SpdyError> {
    let mut take = |n: usize| -> Result<&[u8], SpdyError> {
        if block.len() < n {
            return Err(err("a header block ends early"));
        }
        let (head, rest) = block.split_at(n);
        block = rest;
        Ok(head)
    };
    let count = u32::from_be_bytes(take(4)?.try_into().unwrap()) as usize;
    let mut headers = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let len = u32::from_be_bytes(take(4)?.try_into().unwrap()) as usize;
        let name = String::from_utf8_lossy(take(len)?).to_ascii_lowercase();
        let len = u32::from_be_bytes(take(4)?.try_into().unwrap()) as usize;
        let value = String::from_utf8_lossy(take(len)?).into_owned();
        headers.push((name, value));
    }
    Ok(headers)
}

/// Writes this side's frames that carry headers. Keeps this direction's header compression
/// state, so one encoder serves one session.
#[derive(Default)]
pub struct Encoder {
    zlib_started: bool,
}

fn control(kind: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(8 + payload.len());
    frame.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    frame.extend_from_slice(&kind.to_be_bytes());
    frame.push(flags);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    frame.extend_from_slice(payload);
    frame
}

impl Encoder {
    /// An encoder at the start of a session (its header zlib stream not begun).
    pub fn new() -> Encoder {
        Encoder::default()
    }

    /// A header block as the next piece of this direction's zlib stream: the stream's header
    /// first (no dictionary), then the block as stored, non-final deflate blocks and an empty
    /// one, byte for byte what a sync flush of uncompressed data looks like.
    fn header_block(&mut self, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut raw = Vec::new();
        raw.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (name, value) in headers {
            raw.extend_from_slice(&(name.len() as u32).to_be_bytes());
            raw.extend_from_slice(name.to_ascii_lowercase().as_bytes());
            raw.extend_from_slice(&(value.len() as u32).to_be_bytes());
            raw.extend_from_slice(value.as_bytes());
        }
        let mut out = Vec::with_capacity(raw.len() + 16);
        if !self.zlib_started {
            // CMF 0x78 (deflate, 32 KiB window), FLG 0x01 (no dictionary; 0x7801 % 31 == 0).
            out.extend_from_slice(&[0x78, 0x01]);
            self.zlib_started = true;
        }
        for piece in raw.chunks(u16::MAX as usize) {
            let len = piece.len() as u16;
            out.push(0x00); // BFINAL 0, BTYPE 00 (stored), padded to the byte
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&(!len).to_le_bytes());
            out.extend_from_slice(piece);
        }
        // The sync-flush marker (an empty stored block): Go's inflater hands out what it
        // decoded only when a block boundary makes it flush, and must not read past the frame.
        out.extend_from_slice(&[0x00, 0x00, 0x00, 0xff, 0xff]);
        out
    }

    /// `SYN_STREAM`: opens stream `stream_id` (a client's are odd) with `headers`; with `fin`
    /// this side sends nothing on it (only reads).
    pub fn syn_stream(&mut self, stream_id: u32, fin: bool, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut payload = stream_id.to_be_bytes().to_vec();
        // Associated-to stream 0, priority 0, slot 0.
        payload.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        payload.extend_from_slice(&self.header_block(headers));
        control(TYPE_SYN_STREAM, if fin { FLAG_FIN } else { 0 }, &payload)
    }

    /// `SYN_REPLY`: accepts a stream the peer opened.
    pub fn syn_reply(&mut self, stream_id: u32, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut payload = stream_id.to_be_bytes().to_vec();
        payload.extend_from_slice(&self.header_block(headers));
        control(TYPE_SYN_REPLY, 0, &payload)
    }
}

/// `RST_STREAM`: abandons a stream with a status from [`status`].
pub fn rst_stream(stream_id: u32, status: u32) -> Vec<u8> {
    let mut payload = stream_id.to_be_bytes().to_vec();
    payload.extend_from_slice(&status.to_be_bytes());
    control(TYPE_RST_STREAM, 0, &payload)
}

/// `PING` with the peer's id: the answer to its ping.
pub fn ping(id: u32) -> Vec<u8> {
    control(TYPE_PING, 0, &id.to_be_bytes())
}

/// `GOAWAY`: no new streams after `last_good_stream_id`.
pub fn goaway(last_good_stream_id: u32, status: u32) -> Vec<u8> {
    let mut payload = last_good_stream_id.to_be_bytes().to_vec();
    payload.extend_from_slice(&status.to_be_bytes());
    control(TYPE_GOAWAY, 0, &payload)
}

/// A `DATA` frame; `fin` ends this side of the stream (with or without data). Up to
/// [`MAX_DATA`] bytes is polite; the format allows 16 MiB - 1.
pub fn data(stream_id: u32, fin: bool, data: &[u8]) -> Vec<u8> {
    debug_assert!(data.len() < 1 << 24);
    let mut frame = Vec::with_capacity(8 + data.len());
    frame.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
    frame.push(if fin { FLAG_FIN } else { 0 });
    frame.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
    frame.extend_from_slice(data);
    frame
}

/// SPDY/3's zlib dictionary for header blocks (SPDY/3 draft, section 2.6.10.1), 1423 bytes.
pub const HEADER_DICTIONARY: &[u8; 1423] = b"\
\x00\x00\x00\x07options\x00\x00\x00\x04head\x00\x00\x00\x04post\x00\x00\x00\x03put\x00\x00\
\x00\x06delete\x00\x00\x00\x05trace\x00\x00\x00\x06accept\x00\x00\x00\x0eaccept-charset\
\x00\x00\x00\x0faccept-encoding\x00\x00\x00\x0faccept-language\x00\x00\x00\x0daccept-range\
s\x00\x00\x00\x03age\x00\x00\x00\x05allow\x00\x00\x00\x0dauthorization\x00\x00\x00\x0dcach\
e-control\x00\x00\x00\x0aconnection\x00\x00\x00\x0ccontent-base\x00\x00\x00\x10content-enc\
oding\x00\x00\x00\x10content-language\x00\x00\x00\x0econtent-length\x00\x00\x00\x10content\
-location\x00\x00\x00\x0bcontent-md5\x00\x00\x00\x0dcontent-range\x00\x00\x00\x0ccontent-t\
ype\x00\x00\x00\x04date\x00\x00\x00\x04etag\x00\x00\x00\x06expect\x00\x00\x00\x07expires\
\x00\x00\x00\x04from\x00\x00\x00\x04host\x00\x00\x00\x08if-match\x00\x00\x00\x11if-modifie\
d-since\x00\x00\x00\x0dif-none-match\x00\x00\x00\x08if-range\x00\x00\x00\x13if-unmodified-\
since\x00\x00\x00\x0dlast-modified\x00\x00\x00\x08location\x00\x00\x00\x0cmax-forwards\x00\
\x00\x00\x06pragma\x00\x00\x00\x12proxy-authenticate\x00\x00\x00\x13proxy-authorization\
\x00\x00\x00\x05range\x00\x00\x00\x07referer\x00\x00\x00\x0bretry-after\x00\x00\x00\x06ser\
ver\x00\x00\x00\x02te\x00\x00\x00\x07trailer\x00\x00\x00\x11transfer-encoding\x00\x00\x00\
\x07upgrade\x00\x00\x00\x0auser-agent\x00\x00\x00\x04vary\x00\x00\x00\x03via\x00\x00\x00\
\x07warning\x00\x00\x00\x10www-authenticate\x00\x00\x00\x06method\x00\x00\x00\x03get\x00\
\x00\x00\x06status\x00\x00\x00\x06200 OK\x00\x00\x00\x07version\x00\x00\x00\x08HTTP/1.1\
\x00\x00\x00\x03url\x00\x00\x00\x06public\x00\x00\x00\x0aset-cookie\x00\x00\x00\x0akeep-al\
ive\x00\x00\x00\x06origin10010120120220520630030230330430530630740240540640740840941041141\
2413414415416417502504505203 Non-Authoritative Information204 No Content301 Moved Permanen\
tly400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 N\
ot Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:0\
0:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif\
,application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=gzi\
p,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.";

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    /// A client's header compressor, as moby/spdystream sets it up.
    pub(crate) fn client_compressor() -> Compress {
        let mut compress = Compress::new(Compression::best(), true);
        compress.set_dictionary(HEADER_DICTIONARY).unwrap();
        compress
    }

    /// What the Go client (moby/spdystream) writes: one zlib stream with the dictionary, a sync
    /// flush after each header block.
    fn go_like_block(compress: &mut Compress, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut raw = Vec::new();
        raw.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (n, v) in headers {
            raw.extend_from_slice(&(n.len() as u32).to_be_bytes());
            raw.extend_from_slice(n.as_bytes());
            raw.extend_from_slice(&(v.len() as u32).to_be_bytes());
            raw.extend_from_slice(v.as_bytes());
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        compress
            .compress_vec(&raw, &mut out, FlushCompress::Sync)
            .unwrap();
        out
    }

    pub(crate) fn syn_stream(
        compress: &mut Compress,
        id: u32,
        headers: &[(&str, &str)],
    ) -> Vec<u8> {
        let mut payload = id.to_be_bytes().to_vec();
        payload.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        payload.extend_from_slice(&go_like_block(compress, headers));
        control(TYPE_SYN_STREAM, 0, &payload)
    }

    #[test]
    fn the_dictionary_is_spdy3s() {
        assert_eq!(HEADER_DICTIONARY.len(), 1423);
        assert!(HEADER_DICTIONARY.starts_with(b"\x00\x00\x00\x07options"));
        assert!(HEADER_DICTIONARY.ends_with(b",*,enq=0."));
    }

    #[test]
    fn frames_of_a_client_split_anywhere_are_read() {
        let mut compress = Compress::new(Compression::best(), true);
        compress.set_dictionary(HEADER_DICTIONARY).unwrap();
        let mut wire = Vec::new();
        wire.extend(syn_stream(
            &mut compress,
            1,
            &[("streamtype", "error"), ("port", "80"), ("requestid", "0")],
        ));
        wire.extend(data(1, true, b""));
        wire.extend(syn_stream(
            &mut compress,
            3,
            &[("streamtype", "data"), ("port", "80"), ("requestid", "0")],
        ));
        wire.extend(data(3, false, b"GET / HTTP/1.0\r\n\r\n"));
        wire.extend(ping(1));
        wire.extend(rst_stream(3, status::CANCEL));
        // Byte by byte, as a tunnel may cut it.
        let mut decoder = Decoder::new();
        let mut frames = Vec::new();
        for b in &wire {
            decoder.push(std::slice::from_ref(b));
            while let Some(frame) = decoder.next_frame().unwrap() {
                frames.push(frame);
            }
        }
        assert_eq!(decoder.buffered(), 0);
        assert_eq!(frames.len(), 6, "{frames:?}");
        assert_eq!(
            frames[0],
            Frame::SynStream {
                stream_id: 1,
                fin: false,
                headers: vec![
                    ("streamtype".into(), "error".into()),
                    ("port".into(), "80".into()),
                    ("requestid".into(), "0".into())
                ]
            }
        );
        assert_eq!(
            frames[1],
            Frame::Data {
                stream_id: 1,
                fin: true,
                data: Bytes::new()
            }
        );
        let Frame::SynStream { headers, .. } = &frames[2] else {
            panic!("{:?}", frames[2])
        };
        assert_eq!(headers[0].1, "data");
        assert_eq!(
            frames[3],
            Frame::Data {
                stream_id: 3,
                fin: false,
                data: Bytes::from_static(b"GET / HTTP/1.0\r\n\r\n")
            }
        );
        assert_eq!(frames[4], Frame::Ping(1));
        assert_eq!(
            frames[5],
            Frame::RstStream {
                stream_id: 3,
                status: status::CANCEL
            }
        );
    }

    #[test]
    fn replies_are_a_zlib_stream_any_reader_inflates() {
        let mut encoder = Encoder::new();
        let mut decoder = Decoder::new();
        decoder.inflate = Decompress::new(true);
        let mut wire = encoder.syn_reply(1, &[]);
        wire.extend(encoder.syn_reply(3, &[("x-kedge", "yes")]));
        decoder.push(&wire);
        assert_eq!(
            decoder.next_frame().unwrap(),
            Some(Frame::SynReply {
                stream_id: 1,
                fin: false
            })
        );
        assert_eq!(
            decoder.next_frame().unwrap(),
            Some(Frame::SynReply {
                stream_id: 3,
                fin: false
            })
        );
    }

    #[test]
    fn an_oversized_frame_is_refused_before_it_is_buffered() {
        let mut decoder = Decoder::new();
        decoder.push(&[0, 0, 0, 1, 0, 0xff, 0xff, 0xff]);
        assert!(decoder.next_frame().is_err());
    }
}
