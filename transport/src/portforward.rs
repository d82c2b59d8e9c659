//! Kubernetes' port-forward protocol (`portforward.k8s.io`, version 1), the server's side,
//! over a SPDY/3.1 session ([`crate::spdy`]) as kubectl 1.32 speaks it: tunnelled in a
//! WebSocket of subprotocol [`SPDY_TUNNEL_PROTOCOL`] (KEP-4006; kubectl falls back to an HTTP
//! `Upgrade: SPDY/3.1` only when the WebSocket upgrade fails).
//!
//! Per connection accepted on a local port, kubectl opens two SPDY streams with the headers
//! `streamType` (`error`, then `data`), `port` (the pod's port, decimal) and `requestID` (the
//! same for both). The server replies to each (`SYN_REPLY`), carries the data stream's bytes to
//! the port and back, writes a failure's text on the error stream, and ends both streams (FIN)
//! when the connection is over; kubectl ends the local connection once the error stream ended.
//! Several ports, and several connections per port, share one session.
//!
//! [`serve`] runs a session: it answers the protocol and hands each connection to the caller
//! as a [`Forward`], whose [`ToClient`] writes the data and error streams back. Backpressure:
//! a connection's input is a bounded channel; while its reader does not take it, the session
//! stops reading the client (as kubelet's spdystream does: SPDY as kubectl speaks it has no
//! per-stream flow control), and output waits for the client's byte stream.

use std::collections::HashMap;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::spdy::{self, Frame};

/// The WebSocket subprotocol of port-forward tunnelled over WebSocket (kubectl ≥ 1.30).
pub const SPDY_TUNNEL_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";
/// The port-forward protocol's name (the SPDY upgrade's `X-Stream-Protocol-Version`).
pub const PROTOCOL_V1: &str = "portforward.k8s.io";
/// Frames queued towards the client per session (each at most [`spdy::MAX_DATA`] + 8 bytes).
const OUT_FRAMES: usize = 16;
/// Pieces of client data queued per connection before the session stops reading the client.
const IN_PIECES: usize = 8;

/// One connection kubectl accepted on a local port, to carry to the pod's `port`.
pub struct Forward {
    /// The pod's port.
    pub port: u16,
    /// kubectl's id of the connection (decimal, per session).
    pub request_id: String,
    /// The client's bytes for the port, in order; the channel ends when the client finished its
    /// side (half close) or abandoned the connection (then [`Forward::cancelled`] is too).
    pub from_client: mpsc::Receiver<Bytes>,
    /// The way back.
    pub to_client: ToClient,
    /// Cancelled when the client resets this connection or the session ends (kubectl gone).
    pub cancelled: CancellationToken,
}

/// The client went away (the session's output is closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the port-forward client went away")]
pub struct ClientGone;

/// The data and error streams of one connection, towards the client. Ending it explicitly
/// ([`finish`](Self::finish)) ends both streams; dropping it unfinished resets them.
pub struct ToClient {
    data_id: u32,
    /// 0 when the client opened no error stream for this connection.
    error_id: u32,
    /// The WebSocket channel protocol's (data, error) channels instead of SPDY streams
    /// ([`serve_channels`]).
    channels: Option<(u8, u8)>,
    out: mpsc::Sender<Vec<u8>>,
    data_closed: bool,
    done: bool,
    /// Held while the connection lives ([`serve_channels`] ends when all are dropped).
    _alive: Option<mpsc::Sender<()>>,
}

impl ToClient {
    /// Sends bytes from the port on the data stream (in frames of at most
    /// [`spdy::MAX_DATA`]), waiting while the client does not read.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), ClientGone> {
        if let Some((data, _)) = self.channels {
            for piece in bytes.chunks(spdy::MAX_DATA) {
                let mut message = Vec::with_capacity(piece.len() + 1);
                message.push(data);
                message.extend_from_slice(piece);
                self.out.send(message).await.map_err(|_| ClientGone)?;
            }
            return Ok(());
        }
        for piece in bytes.chunks(spdy::MAX_DATA) {
            self.out
                .send(spdy::data(self.data_id, false, piece))
                .await
                .map_err(|_| ClientGone)?;
        }
        Ok(())
    }

    /// Ends the data stream (the port closed its side); the error stream stays open.
    pub async fn close_data(&mut self) {
        if self.channels.is_some() {
            // The channel protocol has no half close: the connection ends with the session.
            self.data_closed = true;
            return;
        }
        if !self.data_closed {
            self.data_closed = true;
            let _ = self.out.send(spdy::data(self.data_id, true, b"")).await;
        }
    }

    /// Ends the connection: `error`'s text on the error stream if there is one (kubectl prints
    /// it as "an error occurred forwarding L -> R: …"), then both streams end.
    pub async fn finish(mut self, error: Option<&str>) {
        self.done = true;
        if let Some((_, channel)) = self.channels {
            if let Some(text) = error {
                let mut message = vec![channel];
                message.extend_from_slice(text.as_bytes());
                let _ = self.out.send(message).await;
            }
            return;
        }
        if let (Some(text), true) = (error, self.error_id != 0) {
            let _ = self
                .out
                .send(spdy::data(self.error_id, false, text.as_bytes()))
                .await;
        }
        self.close_data().await;
        if self.error_id != 0 {
            let _ = self.out.send(spdy::data(self.error_id, true, b"")).await;
        }
    }
}

impl Drop for ToClient {
    fn drop(&mut self) {
        if self.done || self.channels.is_some() {
            return;
        }
        // Abandoned (the carrier failed, or the session ended): reset both streams. Queued at
        // once if there is room, else by a task that waits for room (the session's end closes
        // the queue, which ends the task).
        let mut frames = vec![spdy::rst_stream(self.data_id, spdy::status::CANCEL)];
        if self.error_id != 0 {
            frames.push(spdy::rst_stream(self.error_id, spdy::status::CANCEL));
        }
        let mut rest = Vec::new();
        for frame in frames {
            match self.out.try_send(frame) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(frame)) => rest.push(frame),
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
        if rest.is_empty() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let out = self.out.clone();
            runtime.spawn(async move {
                for frame in rest {
                    if out.send(frame).await.is_err() {
                        return;
                    }
                }
            });
        }
    }
}

/// A connection's data stream as the session sees it.
struct DataStream {
    /// `None` once the client finished its side or the reader went away.
    input: Option<mpsc::Sender<Bytes>>,
    cancelled: CancellationToken,
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Runs one port-forward session: `from_client` is the client's byte stream (the WebSocket's
/// binary messages, in order), `to_client` takes this side's frames (each to be sent as one
/// binary message). Each connection the client opens is given to `on_forward` (which should
/// spawn its carrier, and not block). Returns when the client ends the session (its stream
/// ends, `GOAWAY`, or malformed SPDY); every connection's `cancelled` then fires.
pub async fn serve<S, F>(mut from_client: S, to_client: mpsc::Sender<Vec<u8>>, mut on_forward: F)
where
    S: Stream<Item = Bytes> + Unpin,
    F: FnMut(Forward),
{
    let session = CancellationToken::new();
    let _cancel_all = session.clone().drop_guard();
    let mut decoder = spdy::Decoder::new();
    let mut encoder = spdy::Encoder::new();
    // requestID → the error stream's id, until its data stream comes.
    let mut error_streams: HashMap<String, u32> = HashMap::new();
    let mut data_streams: HashMap<u32, DataStream> = HashMap::new();
    // Error stream id → its connection's token (a reset of either stream cancels it).
    let mut error_of: HashMap<u32, CancellationToken> = HashMap::new();
    while let Some(bytes) = from_client.next().await {
        decoder.push(&bytes);
        loop {
            let frame = match decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "port-forward session ended");
                    let _ = to_client
                        .send(spdy::goaway(0, spdy::status::PROTOCOL_ERROR))
                        .await;
                    return;
                }
            };
            match frame {
                Frame::SynStream {
                    stream_id, headers, ..
                } => {
                    // Every stream is accepted; a bad one is then reset.
                    if to_client
                        .send(encoder.syn_reply(stream_id, &[]))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let port = header(&headers, "port").and_then(|p| p.parse::<u16>().ok());
                    let request_id = header(&headers, "requestid").unwrap_or("").to_owned();
                    let kind = header(&headers, "streamtype").unwrap_or("");
                    let Some(port) = port.filter(|p| *p > 0) else {
                        let _ = to_client
                            .send(spdy::rst_stream(stream_id, spdy::status::PROTOCOL_ERROR))
                            .await;
                        continue;
                    };
                    match kind {
                        "error" => {
                            error_streams.insert(request_id, stream_id);
                        }
                        "data" => {
                            data_streams.retain(|_, s| {
                                s.input.as_ref().is_some_and(|tx| !tx.is_closed())
                                    && !s.cancelled.is_cancelled()
                            });
                            error_of.retain(|_, token| !token.is_cancelled());
                            let error_id = error_streams.remove(&request_id).unwrap_or(0);
                            let (tx, rx) = mpsc::channel(IN_PIECES);
                            let cancelled = session.child_token();
                            if error_id != 0 {
                                error_of.insert(error_id, cancelled.clone());
                            }
                            data_streams.insert(
                                stream_id,
                                DataStream {
                                    input: Some(tx),
                                    cancelled: cancelled.clone(),
                                },
                            );
                            on_forward(Forward {
                                port,
                                request_id,
                                from_client: rx,
                                to_client: ToClient {
                                    data_id: stream_id,
                                    error_id,
                                    channels: None,
                                    out: to_client.clone(),
                                    data_closed: false,
                                    done: false,
                                    _alive: None,
                                },
                                cancelled,
                            });
                        }
                        _ => {
                            let _ = to_client
                                .send(spdy::rst_stream(stream_id, spdy::status::PROTOCOL_ERROR))
                                .await;
                        }
                    }
                }
                Frame::Data {
                    stream_id,
                    fin,
                    data,
                } => {
                    let Some(stream) = data_streams.get_mut(&stream_id) else {
                        continue; // the error stream's FIN, or a connection already over
                    };
                    if !data.is_empty() {
                        if let Some(tx) = &stream.input {
                            // Waits while the connection's carrier is slow: backpressure.
                            if tx.send(data).await.is_err() {
                                stream.input = None;
                            }
                        }
                    }
                    if fin {
                        stream.input = None;
                    }
                }
                Frame::RstStream { stream_id, .. } => {
                    if let Some(stream) = data_streams.remove(&stream_id) {
                        stream.cancelled.cancel();
                    }
                    if let Some(token) = error_of.remove(&stream_id) {
                        token.cancel();
                    }
                }
                Frame::Ping(id) => {
                    if to_client.send(spdy::ping(id)).await.is_err() {
                        return;
                    }
                }
                Frame::GoAway { .. } => return,
                Frame::SynReply { .. }
                | Frame::Headers { .. }
                | Frame::Settings
                | Frame::WindowUpdate { .. }
                | Frame::Unknown(_) => {}
            }
        }
    }
}

/// The upgrade token of a plain SPDY port-forward (`Upgrade: SPDY/3.1`, what kubectl before
/// 1.30, `KUBECTL_PORT_FORWARD_WEBSOCKETS=false` and client-go's SPDY dialer used by other tools
/// ask for, with `X-Stream-Protocol-Version: portforward.k8s.io`).
pub const SPDY_UPGRADE: &str = "SPDY/3.1";

/// The header naming the sub-protocol of a SPDY upgrade (request: offered; answer: chosen).
pub const PROTOCOL_HEADER: &str = "X-Stream-Protocol-Version";

/// Whether a request is a SPDY port-forward upgrade: its `Upgrade` header and the protocols it
/// offers in [`PROTOCOL_HEADER`] (one of them [`PROTOCOL_V1`]).
pub fn is_spdy_upgrade<'a>(
    upgrade: Option<&str>,
    mut offered: impl Iterator<Item = &'a str>,
) -> bool {
    upgrade.is_some_and(|u| u.eq_ignore_ascii_case(SPDY_UPGRADE))
        && offered.any(|p| p.split(',').any(|p| p.trim() == PROTOCOL_V1))
}

/// What a client that asked for neither transport is told (`upgrade`: what it asked for).
pub fn unsupported(upgrade: Option<&str>) -> String {
    format!(
        "port-forward is served over WebSocket with the {SPDY_TUNNEL_PROTOCOL} subprotocol \
         (kubectl 1.30 and later) or {CHANNEL_PROTOCOL} (with ?ports=), or as an HTTP upgrade \
         to {SPDY_UPGRADE} with {PROTOCOL_HEADER}: {PROTOCOL_V1}; this request asked to upgrade \
         to {}",
        upgrade.unwrap_or("nothing")
    )
}

/// Runs a session ([`serve`]) over a plain byte connection: the SPDY upgrade's, after its
/// `101 Switching Protocols`.
pub async fn serve_io<IO, F>(io: IO, on_forward: F)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    F: FnMut(Forward),
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (read, mut write) = tokio::io::split(io);
    let (out_tx, mut out_rx) = output_channel();
    let input = futures_util::stream::unfold(read, |mut read| async move {
        let mut buf = vec![0u8; spdy::MAX_DATA];
        match read.read(&mut buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Bytes::from(buf), read))
            }
        }
    });
    let writer = async {
        while let Some(frame) = out_rx.recv().await {
            if write.write_all(&frame).await.is_err() {
                break;
            }
        }
        let _ = write.shutdown().await;
    };
    tokio::select! {
        _ = serve(Box::pin(input), out_tx, on_forward) => {}
        _ = writer => {}
    }
}

/// The WebSocket subprotocol of kubelet's channel port-forward protocol (binary), which
/// clients other than kubectl speak (the Python and JavaScript clients).
pub const CHANNEL_PROTOCOL: &str = "v4.channel.k8s.io";

/// The `ports` of a channel-protocol request's query (`ports=8080,9090`, or the parameter
/// repeated), in order; an error names a bad one.
pub fn query_ports(query: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for pair in query.split('&') {
        let Some(("ports", value)) = pair.split_once('=') else {
            continue;
        };
        for port in value.split("%2C").flat_map(|v| v.split(',')) {
            match port.trim().parse::<u16>() {
                Ok(p) if p > 0 => ports.push(p),
                _ => return Err(format!("invalid port {port:?}")),
            }
        }
    }
    if ports.is_empty() {
        return Err("at least one port is required (ports=N)".into());
    }
    Ok(ports)
}

/// Runs kubelet's WebSocket channel protocol for port-forward (`v4.channel.k8s.io`): one
/// connection per port of `ports` (a request's `ports` query, see [`query_ports`]), port `i`
/// on data channel `2i` and error channel `2i+1`; each binary message is a channel byte and its
/// payload. The first message on each channel carries the port, `u16` little-endian. The
/// client's data messages go to the port; a failure's text goes on the error channel. Returns
/// when the client leaves or every connection is over (then the caller closes the WebSocket).
pub async fn serve_channels<S, F>(
    ports: Vec<u16>,
    mut from_client: S,
    to_client: mpsc::Sender<Vec<u8>>,
    mut on_forward: F,
) where
    S: Stream<Item = Bytes> + Unpin,
    F: FnMut(Forward),
{
    let session = CancellationToken::new();
    let _cancel_all = session.clone().drop_guard();
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    let mut inputs: Vec<Option<mpsc::Sender<Bytes>>> = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let (data, error) = ((2 * i) as u8, (2 * i + 1) as u8);
        for channel in [data, error] {
            let mut first = vec![channel];
            first.extend_from_slice(&port.to_le_bytes());
            if to_client.send(first).await.is_err() {
                return;
            }
        }
        let (tx, rx) = mpsc::channel(IN_PIECES);
        inputs.push(Some(tx));
        on_forward(Forward {
            port: *port,
            request_id: i.to_string(),
            from_client: rx,
            to_client: ToClient {
                data_id: 0,
                error_id: 0,
                channels: Some((data, error)),
                out: to_client.clone(),
                data_closed: false,
                done: false,
                _alive: Some(alive_tx.clone()),
            },
            cancelled: session.child_token(),
        });
    }
    drop(alive_tx);
    loop {
        tokio::select! {
            message = from_client.next() => {
                let Some(message) = message else { return };
                let Some((&channel, payload)) = message.split_first() else { continue };
                if channel % 2 != 0 || payload.is_empty() {
                    continue;
                }
                let Some(slot) = inputs.get_mut(channel as usize / 2) else { continue };
                if let Some(tx) = slot {
                    if tx.send(message.slice(1..)).await.is_err() {
                        *slot = None;
                    }
                }
            }
            _ = alive_rx.recv() => return, // every connection is over
        }
    }
}

/// A channel's capacity for the frames of one session (see [`serve`]).
pub fn output_channel() -> (mpsc::Sender<Vec<u8>>, mpsc::Receiver<Vec<u8>>) {
    mpsc::channel(OUT_FRAMES)
}

/// One end of a forwarded connection, read side: the next bytes, `Ok(None)` once that side
/// finished sending (half close), `Err` when it aborted.
pub trait Source {
    /// The next bytes; `Ok(None)` at the half close, `Err` at an abort.
    fn recv(&mut self) -> impl std::future::Future<Output = Result<Option<Bytes>, ()>> + Send;
}

/// One end of a forwarded connection, write side.
pub trait Sink {
    /// Writes bytes, waiting while the other end does not read; `Err` once it is gone.
    fn send(&mut self, bytes: &[u8]) -> impl std::future::Future<Output = Result<(), ()>> + Send;
    /// Ends this direction (half close).
    fn close(&mut self) -> impl std::future::Future<Output = ()> + Send;
    /// Resolves when the other end stopped reading for good (the connection is over on its
    /// side); never, for ends that cannot tell.
    fn gone(&self) -> futures_util::future::BoxFuture<'static, ()> {
        Box::pin(std::future::pending())
    }
}

/// How a carried connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Both sides finished (or the pod's side finished and the client's did not within the
    /// linger time, or the far end ended the connection).
    Clean,
    /// One side aborted (a reset, a broken socket, the session gone).
    Aborted,
}

/// Carries one connection both ways until both directions finished, or either side aborted.
/// Once the pod's side finished (it closed, or the carrier behind it did), the client's side
/// has `linger` to finish too, or until the pod's sink says it is gone: kubectl ends its local
/// connection only when the connection's streams end, so a server that closes first must not
/// wait on a client that waits on it (containerd's port-forward lingers 1 s the same way).
pub async fn pump(
    client_in: &mut impl Source,
    client_out: &mut impl Sink,
    pod_in: &mut impl Source,
    pod_out: &mut impl Sink,
    linger: std::time::Duration,
) -> Ended {
    let pod_gone = pod_out.gone();
    let upward = async {
        loop {
            match client_in.recv().await {
                Ok(Some(bytes)) => {
                    if pod_out.send(&bytes).await.is_err() {
                        return false;
                    }
                }
                Ok(None) => {
                    pod_out.close().await;
                    return true;
                }
                Err(()) => return false,
            }
        }
    };
    let downward = async {
        loop {
            match pod_in.recv().await {
                Ok(Some(bytes)) => {
                    if client_out.send(&bytes).await.is_err() {
                        return false;
                    }
                }
                Ok(None) => {
                    client_out.close().await;
                    return true;
                }
                Err(()) => return false,
            }
        }
    };
    tokio::pin!(upward, downward, pod_gone);
    let mut up_done = false;
    loop {
        tokio::select! {
            ok = &mut upward, if !up_done => {
                if !ok {
                    return Ended::Aborted;
                }
                up_done = true;
            }
            ok = &mut downward => {
                if !ok {
                    return Ended::Aborted;
                }
                if up_done {
                    return Ended::Clean;
                }
                let rest = async {
                    tokio::select! {
                        ok = &mut upward => ok,
                        _ = &mut pod_gone => true,
                    }
                };
                return match tokio::time::timeout(linger, rest).await {
                    Ok(false) => Ended::Aborted,
                    _ => Ended::Clean,
                };
            }
        }
    }
}

/// The client's side of a [`Forward`] as a [`Source`]: its bytes, until it finished (or reset).
pub struct ClientInput<'a> {
    /// [`Forward::from_client`].
    pub from_client: &'a mut mpsc::Receiver<Bytes>,
    /// [`Forward::cancelled`]: a reset, not a half close, when it fires.
    pub cancelled: &'a CancellationToken,
}

impl Source for ClientInput<'_> {
    async fn recv(&mut self) -> Result<Option<Bytes>, ()> {
        tokio::select! {
            biased;
            _ = self.cancelled.cancelled() => Err(()),
            bytes = self.from_client.recv() => match bytes {
                Some(bytes) => Ok(Some(bytes)),
                None if self.cancelled.is_cancelled() => Err(()),
                None => Ok(None),
            },
        }
    }
}

impl Sink for ToClient {
    async fn send(&mut self, bytes: &[u8]) -> Result<(), ()> {
        ToClient::send(self, bytes).await.map_err(|_| ())
    }
    async fn close(&mut self) {
        self.close_data().await
    }
}

/// A TCP connection's read half as a [`Source`].
pub struct TcpSource {
    read: tokio::net::tcp::OwnedReadHalf,
    buf: Vec<u8>,
}

/// A TCP connection's write half as a [`Sink`] (closing it shuts down the write side).
pub struct TcpSink(pub tokio::net::tcp::OwnedWriteHalf);

/// The two halves of a TCP connection for [`pump`].
pub fn tcp_halves(stream: tokio::net::TcpStream) -> (TcpSource, TcpSink) {
    let _ = stream.set_nodelay(true);
    let (read, write) = stream.into_split();
    (
        TcpSource {
            read,
            buf: vec![0; spdy::MAX_DATA],
        },
        TcpSink(write),
    )
}

impl Source for TcpSource {
    async fn recv(&mut self) -> Result<Option<Bytes>, ()> {
        use tokio::io::AsyncReadExt;
        match self.read.read(&mut self.buf).await {
            Ok(0) => Ok(None),
            Ok(n) => Ok(Some(Bytes::copy_from_slice(&self.buf[..n]))),
            Err(_) => Err(()),
        }
    }
}

impl Sink for TcpSink {
    async fn send(&mut self, bytes: &[u8]) -> Result<(), ()> {
        use tokio::io::AsyncWriteExt;
        self.0.write_all(bytes).await.map_err(|_| ())
    }
    async fn close(&mut self) {
        use tokio::io::AsyncWriteExt;
        let _ = self.0.shutdown().await;
    }
}

/// A duplex call's reading side ([`crate::StreamReader`]) as a [`Source`]: the contents of its
/// `data` messages; its clean end is the peer's half close, an error its abort.
pub struct LinkSource(pub crate::StreamReader);

impl Source for LinkSource {
    async fn recv(&mut self) -> Result<Option<Bytes>, ()> {
        match self.0.next().await {
            Ok(Some(message)) => Ok(Some(message.content())),
            Ok(None) => Ok(None),
            Err(_) => Err(()),
        }
    }
}

/// A duplex call's writing side as a [`Sink`] of `data` messages; closing finishes the stream.
/// Dropped unclosed, it resets the stream (an abort for the peer).
pub struct LinkSink(pub Option<crate::StreamWriter>);

impl LinkSink {
    /// Abandons the stream (the peer reads an error).
    pub fn reset(&mut self) {
        if let Some(writer) = self.0.take() {
            writer.reset();
        }
    }
}

impl Sink for LinkSink {
    async fn send(&mut self, bytes: &[u8]) -> Result<(), ()> {
        let Some(writer) = self.0.as_mut() else {
            return Err(());
        };
        writer
            .send(&crate::stream::data(bytes.to_vec()))
            .await
            .map_err(|_| ())
    }
    async fn close(&mut self) {
        if let Some(writer) = self.0.take() {
            let _ = writer.finish();
        }
    }
    fn gone(&self) -> futures_util::future::BoxFuture<'static, ()> {
        match &self.0 {
            Some(writer) => Box::pin(writer.stopped()),
            None => Box::pin(std::future::pending()),
        }
    }
}

impl Drop for LinkSink {
    fn drop(&mut self) {
        self.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spdy::tests::{client_compressor, syn_stream};

    /// The frames the session sent so far, decoded.
    async fn frames(
        out: &mut mpsc::Receiver<Vec<u8>>,
        decoder: &mut spdy::Decoder,
        n: usize,
    ) -> Vec<Frame> {
        let mut got = Vec::new();
        while got.len() < n {
            while let Some(frame) = decoder.next_frame().unwrap() {
                got.push(frame);
            }
            if got.len() >= n {
                break;
            }
            let bytes = tokio::time::timeout(std::time::Duration::from_secs(5), out.recv())
                .await
                .expect("a frame within 5 s")
                .expect("the session's output");
            decoder.push(&bytes);
        }
        got
    }

    fn data(id: u32, fin: bool, bytes: &[u8]) -> Frame {
        Frame::Data {
            stream_id: id,
            fin,
            data: Bytes::copy_from_slice(bytes),
        }
    }

    #[test]
    fn ports_come_from_the_query_as_clients_send_them() {
        assert_eq!(query_ports("ports=8080,9090"), Ok(vec![8080, 9090]));
        assert_eq!(query_ports("ports=80&ports=443"), Ok(vec![80, 443]));
        assert_eq!(query_ports("ports=80%2C81"), Ok(vec![80, 81]));
        assert!(query_ports("").is_err());
        assert!(query_ports("ports=http").is_err());
    }

    #[tokio::test]
    async fn a_session_pairs_streams_carries_bytes_and_cancels() {
        let (client_tx, client_rx) = mpsc::channel::<Bytes>(16);
        let (out_tx, mut out_rx) = output_channel();
        let (fwd_tx, mut fwd_rx) = mpsc::unbounded_channel();
        let session = tokio::spawn(serve(
            Box::pin(futures_util::stream::unfold(
                client_rx,
                |mut rx| async move { rx.recv().await.map(|b| (b, rx)) },
            )),
            out_tx,
            move |forward| {
                let _ = fwd_tx.send(forward);
            },
        ));
        let mut compress = client_compressor();
        let mut decoder = spdy::Decoder::new();
        let send = |bytes: Vec<u8>| {
            let tx = client_tx.clone();
            async move { tx.send(Bytes::from(bytes)).await.unwrap() }
        };
        let headers = |kind: &'static str, id: &'static str| {
            [("streamtype", kind), ("port", "8080"), ("requestid", id)]
        };
        // kubectl's order: the error stream (closed at once on its side), then the data stream.
        send(syn_stream(&mut compress, 1, &headers("error", "0"))).await;
        send(spdy::data(1, true, b"")).await;
        send(syn_stream(&mut compress, 3, &headers("data", "0"))).await;
        send(spdy::data(3, false, b"hello")).await;
        let replies = frames(&mut out_rx, &mut decoder, 2).await;
        assert_eq!(
            replies,
            [
                Frame::SynReply {
                    stream_id: 1,
                    fin: false
                },
                Frame::SynReply {
                    stream_id: 3,
                    fin: false
                }
            ]
        );
        let mut forward = fwd_rx.recv().await.unwrap();
        assert_eq!((forward.port, forward.request_id.as_str()), (8080, "0"));
        assert_eq!(forward.from_client.recv().await.unwrap(), "hello");
        forward.to_client.send(b"world").await.unwrap();
        assert_eq!(
            frames(&mut out_rx, &mut decoder, 1).await,
            [data(3, false, b"world")]
        );
        // The client's half close ends its input; the end carries the error text.
        send(spdy::data(3, true, b"")).await;
        assert!(forward.from_client.recv().await.is_none());
        assert!(!forward.cancelled.is_cancelled());
        forward.to_client.finish(Some("refused")).await;
        assert_eq!(
            frames(&mut out_rx, &mut decoder, 3).await,
            [
                data(1, false, b"refused"),
                data(3, true, b""),
                data(1, true, b"")
            ]
        );

        // A second connection, reset by the client: cancelled; its streams reset when dropped.
        send(syn_stream(&mut compress, 5, &headers("error", "1"))).await;
        send(syn_stream(&mut compress, 7, &headers("data", "1"))).await;
        frames(&mut out_rx, &mut decoder, 2).await;
        let second = fwd_rx.recv().await.unwrap();
        send(spdy::rst_stream(7, spdy::status::CANCEL)).await;
        second.cancelled.cancelled().await;
        drop(second);
        let resets = frames(&mut out_rx, &mut decoder, 2).await;
        assert!(
            matches!(resets[0], Frame::RstStream { stream_id: 7, .. }),
            "{resets:?}"
        );

        // Pings are echoed; the client going away ends the session and cancels the rest.
        send(syn_stream(&mut compress, 9, &headers("error", "2"))).await;
        send(syn_stream(&mut compress, 11, &headers("data", "2"))).await;
        send(spdy::ping(1)).await;
        let third = fwd_rx.recv().await.unwrap();
        let got = frames(&mut out_rx, &mut decoder, 3).await;
        assert_eq!(got[2], Frame::Ping(1));
        drop(client_tx);
        session.await.unwrap();
        third.cancelled.cancelled().await;
    }
}
