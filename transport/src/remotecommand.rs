//! Kubernetes' remote-command protocol (`exec`, `attach`) over a SPDY/3.1 session, the
//! server's side, sans-IO: what kubelet's streaming server speaks after an HTTP
//! `Upgrade: SPDY/3.1` (kube-apiserver ≥ 1.30 still talks it to kubelets, translating a
//! kubectl's WebSocket; kubectl speaks it itself with `KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false`
//! and before 1.30).
//!
//! The upgrade request offers protocols in `X-Stream-Protocol-Version`; this side answers
//! [`PROTOCOL_V4`] (JSON `Status` on the error stream, terminal resize). The client then opens
//! one SPDY stream per channel, header `streamType`: `error` always, `stdin`, `stdout`,
//! `stderr` (not with a TTY) and `resize` (with a TTY) as the request's query asked
//! ([`Expected`]). The server replies to each (`SYN_REPLY`), runs the command once all expected
//! streams are open, writes its output as `DATA` on `stdout`/`stderr`, and at the end writes the
//! final `Status` on `error` and ends every stream it writes (FIN); stdin's FIN is the end of
//! the input, and `resize` carries JSON `{"Width":w,"Height":h}` objects one after another.
//!
//! [`Session`] turns the client's bytes into [`Event`]s and this side's
//! [`StreamMessage`]s into frames; the caller carries the bytes (see `cloud::cloudstream`).

use crate::spdy::{self, Frame, SpdyError};
use crate::stream::StreamMessage;

/// The remote-command protocol version served over SPDY.
pub const PROTOCOL_V4: &str = "v4.channel.k8s.io";
/// The most resize bytes buffered without a complete JSON object (a client sends ~30).
const MAX_RESIZE_BUFFER: usize = 4096;

/// Whether a SPDY upgrade offers [`PROTOCOL_V4`] (`offered`: the values of its
/// `X-Stream-Protocol-Version` headers, each possibly a comma-separated list).
pub fn offers_v4<'a>(mut offered: impl Iterator<Item = &'a str>) -> bool {
    offered.any(|p| p.split(',').any(|p| p.trim() == PROTOCOL_V4))
}

/// The channels a session has, from the request's query (`stdin`, `stdout`, `stderr`, `tty`;
/// kubelet's own paths say `input`, `output`, `error`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expected {
    /// The client sends input.
    pub stdin: bool,
    /// The client reads standard output.
    pub stdout: bool,
    /// The client reads standard error (never with a TTY: it goes to stdout then).
    pub stderr: bool,
    /// A terminal: the client sends its size on a `resize` stream.
    pub tty: bool,
}

impl Expected {
    /// Reads the flags of a query string (`1` or `true` set one); both the API's names and
    /// kubelet's (`input`, `output`, `error`) are understood.
    pub fn from_query(query: &str) -> Expected {
        let mut expected = Expected::default();
        for (key, value) in query.split('&').filter_map(|p| p.split_once('=')) {
            let on = value == "1" || value.eq_ignore_ascii_case("true");
            match key {
                "stdin" | "input" => expected.stdin = on,
                "stdout" | "output" => expected.stdout = on,
                "stderr" | "error" => expected.stderr = on,
                "tty" => expected.tty = on,
                _ => {}
            }
        }
        if expected.tty {
            expected.stderr = false;
        }
        expected
    }

    fn wants(&self, kind: Kind) -> bool {
        match kind {
            Kind::Error => true,
            Kind::Stdin => self.stdin,
            Kind::Stdout => self.stdout,
            Kind::Stderr => self.stderr,
            Kind::Resize => self.tty,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Error = 0,
    Stdin = 1,
    Stdout = 2,
    Stderr = 3,
    Resize = 4,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Error,
        Kind::Stdin,
        Kind::Stdout,
        Kind::Stderr,
        Kind::Resize,
    ];

    fn parse(name: &str) -> Option<Kind> {
        Some(match name {
            "error" => Kind::Error,
            "stdin" => Kind::Stdin,
            "stdout" => Kind::Stdout,
            "stderr" => Kind::Stderr,
            "resize" => Kind::Resize,
            _ => return None,
        })
    }
}

/// What the client's bytes meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Frames to send to the client (stream replies, ping answers, refusals), in order.
    Send(Vec<u8>),
    /// Input for the command: `Stdin`, `StdinClose` or `Resize`.
    Command(StreamMessage),
    /// The client ended the session (`GOAWAY`, or reset a stream it reads).
    Ended,
}

/// One remote-command session over SPDY, this side the server.
pub struct Session {
    decoder: spdy::Decoder,
    encoder: spdy::Encoder,
    expected: Expected,
    /// Stream id per [`Kind`] once the client opened it.
    streams: [Option<u32>; 5],
    resize: Vec<u8>,
    stdin_closed: bool,
}

impl Session {
    /// A session before any of the client's streams.
    pub fn new(expected: Expected) -> Session {
        Session {
            decoder: spdy::Decoder::new(),
            encoder: spdy::Encoder::new(),
            expected,
            streams: [None; 5],
            resize: Vec::new(),
            stdin_closed: false,
        }
    }

    /// Whether every stream the query asked for is open (the command may start).
    pub fn ready(&self) -> bool {
        Kind::ALL
            .iter()
            .all(|&k| !self.expected.wants(k) || self.streams[k as usize].is_some())
    }

    /// Reads the client's bytes (any split of its byte stream).
    ///
    /// # Errors
    /// [`SpdyError`] for malformed SPDY; the session cannot go on (answer with
    /// [`spdy::goaway`] and close).
    pub fn receive(&mut self, bytes: &[u8]) -> Result<Vec<Event>, SpdyError> {
        self.decoder.push(bytes);
        let mut events = Vec::new();
        while let Some(frame) = self.decoder.next_frame()? {
            match frame {
                Frame::SynStream {
                    stream_id,
                    headers,
                    fin,
                } => {
                    let kind = headers
                        .iter()
                        .find(|(n, _)| n == "streamtype")
                        .and_then(|(_, v)| Kind::parse(v));
                    match kind {
                        Some(kind) if self.streams[kind as usize].is_none() => {
                            self.streams[kind as usize] = Some(stream_id);
                            events.push(Event::Send(self.encoder.syn_reply(stream_id, &[])));
                            if fin && kind == Kind::Stdin {
                                self.close_stdin(&mut events);
                            }
                        }
                        // A second stream of a kind, or one this protocol does not have.
                        _ => events.push(Event::Send(spdy::rst_stream(
                            stream_id,
                            spdy::status::PROTOCOL_ERROR,
                        ))),
                    }
                }
                Frame::Data {
                    stream_id,
                    fin,
                    data,
                } => match self.kind_of(stream_id) {
                    Some(Kind::Stdin) => {
                        if !data.is_empty() && !self.stdin_closed {
                            events.push(Event::Command(StreamMessage::Stdin(data.to_vec())));
                        }
                        if fin {
                            self.close_stdin(&mut events);
                        }
                    }
                    Some(Kind::Resize) => {
                        self.resize.extend_from_slice(&data);
                        self.read_sizes(&mut events);
                    }
                    // Nothing else is the client's to write (its FINs on the streams it reads).
                    _ => {}
                },
                Frame::RstStream { stream_id, .. } => match self.kind_of(stream_id) {
                    Some(Kind::Stdin) => self.close_stdin(&mut events),
                    Some(Kind::Resize) | None => {}
                    Some(_) => events.push(Event::Ended),
                },
                Frame::Ping(id) => events.push(Event::Send(spdy::ping(id))),
                Frame::GoAway { .. } => events.push(Event::Ended),
                Frame::SynReply { .. }
                | Frame::Headers { .. }
                | Frame::Settings
                | Frame::WindowUpdate { .. }
                | Frame::Unknown(_) => {}
            }
        }
        Ok(events)
    }

    fn kind_of(&self, stream_id: u32) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|&k| self.streams[k as usize] == Some(stream_id))
    }

    fn close_stdin(&mut self, events: &mut Vec<Event>) {
        if !self.stdin_closed {
            self.stdin_closed = true;
            events.push(Event::Command(StreamMessage::StdinClose));
        }
    }

    /// Each complete `{"Width":…,"Height":…}` in the resize buffer (client-go's JSON encoder
    /// writes them one after another, newline-separated).
    fn read_sizes(&mut self, events: &mut Vec<Event>) {
        let mut consumed = 0;
        let mut values =
            serde_json::Deserializer::from_slice(&self.resize).into_iter::<serde_json::Value>();
        while let Some(Ok(size)) = values.next() {
            consumed = values.byte_offset();
            let dimension = |k: &str| {
                size.get(k)
                    .and_then(|v| v.as_u64())
                    .unwrap_or(0)
                    .min(u16::MAX as u64) as u16
            };
            events.push(Event::Command(StreamMessage::Resize {
                width: dimension("Width"),
                height: dimension("Height"),
            }));
        }
        self.resize.drain(..consumed);
        if self.resize.len() > MAX_RESIZE_BUFFER {
            // Not JSON objects: dropped rather than held.
            self.resize.clear();
        }
    }

    /// The frames for one of the command's messages: `Stdout`/`Stderr` as data on their
    /// streams (nothing if the client did not open that stream), `Exit` as the final `Status`
    /// on the error stream followed by the end of every stream this side writes.
    pub fn output(&self, message: &StreamMessage) -> Vec<u8> {
        let mut frames = Vec::new();
        let data = |kind: Kind, bytes: &[u8], frames: &mut Vec<u8>| {
            if let Some(id) = self.streams[kind as usize] {
                for piece in bytes.chunks(spdy::MAX_DATA) {
                    frames.extend_from_slice(&spdy::data(id, false, piece));
                }
            }
        };
        match message {
            StreamMessage::Stdout(bytes) => data(Kind::Stdout, bytes, &mut frames),
            StreamMessage::Stderr(bytes) => data(Kind::Stderr, bytes, &mut frames),
            StreamMessage::Exit(status) => {
                // client-go (v4) reads a Success status as exit code 0; kubelet writes it too.
                data(Kind::Error, status, &mut frames);
                for kind in [Kind::Stdout, Kind::Stderr, Kind::Error] {
                    if let Some(id) = self.streams[kind as usize] {
                        frames.extend_from_slice(&spdy::data(id, true, b""));
                    }
                }
            }
            _ => {}
        }
        frames
    }

    /// The frames ending a session that could not run (the streams did not come in time, or
    /// the node refused): `message` as a `Failure` status on the error stream, then the end of
    /// every stream this side writes.
    pub fn fail(&self, message: &str) -> Vec<u8> {
        let status = serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": "InternalError", "code": 500,
        });
        self.output(&StreamMessage::exit(&status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's side of the session: the streams kubectl opens, in its order.
    fn open(client: &mut spdy::Encoder, kinds: &[(&str, u32)]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for (kind, id) in kinds {
            bytes.extend(client.syn_stream(*id, false, &[("streamType", kind)]));
        }
        bytes
    }

    fn frames(bytes: &[u8]) -> Vec<Frame> {
        let mut decoder = spdy::Decoder::new();
        decoder.push(bytes);
        std::iter::from_fn(|| decoder.next_frame().unwrap()).collect()
    }

    #[test]
    fn query_flags_in_either_naming_and_a_tty_has_no_stderr() {
        assert_eq!(
            Expected::from_query("command=ls&stdin=true&stdout=true&stderr=true"),
            Expected {
                stdin: true,
                stdout: true,
                stderr: true,
                tty: false
            }
        );
        assert_eq!(
            Expected::from_query("command=sh&input=1&output=1&error=1&tty=1"),
            Expected {
                stdin: true,
                stdout: true,
                stderr: false,
                tty: true
            }
        );
        assert!(offers_v4(
            ["v5.channel.k8s.io", "v4.channel.k8s.io, v3.channel.k8s.io"].into_iter()
        ));
        assert!(!offers_v4(["v3.channel.k8s.io"].into_iter()));
    }

    #[test]
    fn a_session_is_ready_once_its_streams_are_open_and_carries_both_ways() {
        let mut client = spdy::Encoder::new();
        let mut session = Session::new(Expected::from_query("stdin=1&stdout=1&tty=1"));
        let first = open(&mut client, &[("error", 1), ("stdin", 3)]);
        let events = session.receive(&first).unwrap();
        assert_eq!(events.len(), 2);
        assert!(!session.ready());
        // The rest, split mid-frame, with stdin's bytes and two sizes.
        let mut rest = open(&mut client, &[("stdout", 5), ("resize", 7)]);
        rest.extend(spdy::data(3, false, b"echo hi\n"));
        rest.extend(spdy::data(
            7,
            false,
            b"{\"Width\":80,\"Height\":24}\n{\"Width\":",
        ));
        rest.extend(spdy::data(7, false, b"100,\"Height\":30}\n"));
        rest.extend(spdy::data(3, true, b""));
        let (a, b) = rest.split_at(11);
        let mut events = session.receive(a).unwrap();
        events.extend(session.receive(b).unwrap());
        assert!(session.ready());
        let commands: Vec<_> = events
            .into_iter()
            .filter_map(|e| match e {
                Event::Command(c) => Some(c),
                _ => None,
            })
            .collect();
        assert_eq!(
            commands,
            vec![
                StreamMessage::Stdin(b"echo hi\n".to_vec()),
                StreamMessage::Resize {
                    width: 80,
                    height: 24
                },
                StreamMessage::Resize {
                    width: 100,
                    height: 30
                },
                StreamMessage::StdinClose,
            ]
        );
        // Output, then the end: the status on the error stream and every stream ended.
        let mut out = session.output(&StreamMessage::Stdout(b"hi\n".to_vec()));
        out.extend(session.output(&StreamMessage::Stderr(b"dropped".to_vec())));
        out.extend(
            session.output(&StreamMessage::Exit(bytes::Bytes::from_static(
                b"{\"status\":\"Success\"}",
            ))),
        );
        let sent = frames(&out);
        assert_eq!(
            sent,
            vec![
                Frame::Data {
                    stream_id: 5,
                    fin: false,
                    data: bytes::Bytes::from_static(b"hi\n")
                },
                Frame::Data {
                    stream_id: 1,
                    fin: false,
                    data: bytes::Bytes::from_static(b"{\"status\":\"Success\"}")
                },
                Frame::Data {
                    stream_id: 5,
                    fin: true,
                    data: bytes::Bytes::new()
                },
                Frame::Data {
                    stream_id: 1,
                    fin: true,
                    data: bytes::Bytes::new()
                },
            ]
        );
    }

    #[test]
    fn unknown_or_repeated_streams_are_refused_and_a_reset_of_output_ends_the_session() {
        let mut client = spdy::Encoder::new();
        let mut session = Session::new(Expected::from_query("stdout=1"));
        let bytes = open(&mut client, &[("error", 1), ("bogus", 3), ("error", 5)]);
        let events = session.receive(&bytes).unwrap();
        let refused: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                Event::Send(f) => match frames(f).pop() {
                    Some(Frame::RstStream { stream_id, .. }) => Some(stream_id),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        assert_eq!(refused, vec![3, 5]);
        let events = session
            .receive(&open(&mut client, &[("stdout", 7)]))
            .unwrap();
        assert_eq!(events.len(), 1);
        assert!(session.ready());
        let events = session
            .receive(&spdy::rst_stream(7, spdy::status::CANCEL))
            .unwrap();
        assert_eq!(events, vec![Event::Ended]);
        assert!(session
            .receive(b"\x80\x03\x00\x01\xff\xff\xff\xff")
            .is_err());
    }
}
