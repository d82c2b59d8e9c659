//! A reliable link to one peer, living across successive QUIC connections.
//!
//! The link owns the sans-IO state of both directions ([`SendWindow`], [`ReceiveTracker`]);
//! each connection runs a session over it:
//! - a control stream (bidirectional, opened by the node): `Hello` both ways, then `Ack`s (and
//!   the node's `Heartbeat` frames for a peer that takes no datagrams);
//! - one data stream each way (unidirectional): `StreamStart(first_seq)`, then messages in order;
//! - short-lived request streams (bidirectional, either side): one message each way;
//! - QUIC datagrams: the node's heartbeats (a Lease renewal in one 5-byte datagram, never
//!   retransmitted or replayed: the next one makes good a lost one).
//!
//! The application reads [`LinkEvent`]s, acks delivered messages once they are durable, and
//! sends through a bounded window: a full window makes `send` wait (backpressure). Unacked
//! messages are replayed on the next connection; the receiver drops replays it already has.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::{LinkConfig, MIN_PROTOCOL_VERSION};
use crate::error::{CloseCode, LinkError};
use crate::frame::{
    encode_body, ArchivedEnvelope, EncodedMessage, Envelope, Hello, ReceivedMessage,
};
use crate::message::Message;
use crate::stream_io::{write_bodies, FrameReader};
use crate::window::{ReceiveTracker, SendWindow};

/// What the application learns from a link, in order.
#[derive(Debug)]
pub enum LinkEvent {
    /// A connection is up and the hello exchange is done.
    Connected {
        /// The peer's outgoing stream is new to us (first contact, or the peer restarted):
        /// anything it had in flight before is gone; resynchronize at the application level.
        peer_stream_new: bool,
        /// The peer did not know our outgoing stream (it restarted): our whole unacked window
        /// is being resent, and what it acked before its restart is only as durable as its disk.
        peer_forgot_our_stream: bool,
    },
    /// A message from the peer's data stream. Ack `seq` once it is durable.
    Message(Delivery),
    /// A request from the peer; answer it with [`IncomingRequest::respond`].
    Request(IncomingRequest),
    /// The peer sent a heartbeat ([`LinkHandle::heartbeat`]).
    Heartbeat {
        /// How often the peer says it beats; `None` from peers that do not say (older nodes).
        period: Option<Duration>,
    },
    /// The connection ended; the link reconnects (node side) or waits for the node (cloud).
    Disconnected {
        /// Why, readable (the peer's close code and reason, an idle timeout, an error).
        reason: String,
    },
}

impl LinkEvent {
    /// For [`LinkEvent::Connected`]: whether the application's session over this link must
    /// start again, because one side's stream state is new (first contact, or a restart on
    /// either side). `false` means the connection resumed the link: unacked messages are
    /// replayed and nothing was lost, so a session layered on the link carries on. Both ends
    /// get the same answer from the same hello exchange. `None` for other events.
    pub fn starts_new_session(&self) -> Option<bool> {
        match self {
            LinkEvent::Connected {
                peer_stream_new,
                peer_forgot_our_stream,
            } => Some(*peer_stream_new || *peer_forgot_our_stream),
            _ => None,
        }
    }
}

/// One message from the peer's ordered data stream.
#[derive(Debug)]
pub struct Delivery {
    /// Its sequence number on the peer's stream: pass it to [`LinkHandle::ack`] once durable.
    pub seq: u64,
    /// The message, read in place from its frame.
    pub message: ReceivedMessage,
}

/// A request from the peer, with the stream to answer it on.
#[derive(Debug)]
pub struct IncomingRequest {
    /// The request message, read in place from its frame.
    pub message: ReceivedMessage,
    /// Boxed: a [`LinkEvent`] is as large as its largest variant, and every link's event
    /// queue allocates room for 32 of them up front (a tokio mpsc block). Unboxed, the
    /// streams made that ~6.5 KB per idle node in the cloud; boxed, ~2 KB.
    streams: Box<RequestStreams>,
    max_frame: usize,
}

#[derive(Debug)]
struct RequestStreams {
    stream: quinn::SendStream,
    /// The rest of the requester's side (more messages of a duplex call).
    reader: FrameReader,
}

impl IncomingRequest {
    /// Encodes `response` and answers with it; the stream is finished after it.
    ///
    /// # Errors
    /// As [`respond_encoded`](Self::respond_encoded).
    pub async fn respond(self, response: &Message) -> Result<(), LinkError> {
        self.respond_encoded(&EncodedMessage::encode(response))
            .await
    }

    /// Answers with an already encoded message and finishes the stream.
    ///
    /// # Errors
    /// [`LinkError::Frame`] when the message is over the link's `max_frame`,
    /// [`LinkError::Write`] when the requester stopped the stream or the connection ended,
    /// [`LinkError::ClosedStream`] when quinn no longer has the stream (already finished or
    /// reset).
    pub async fn respond_encoded(self, response: &EncodedMessage) -> Result<(), LinkError> {
        let mut stream = self.streams.stream;
        write_bodies(&mut stream, [response.body()], self.max_frame).await?;
        stream.finish()?;
        Ok(())
    }

    /// Answers with a stream of messages instead of one (a log that is followed, a long
    /// transfer): see [`StreamWriter`]. The requester reads them with
    /// [`LinkHandle::request_stream`].
    pub fn into_stream(self) -> StreamWriter {
        StreamWriter {
            stream: self.streams.stream,
            max_frame: self.max_frame,
        }
    }

    /// A duplex call ([`LinkHandle::open_duplex`]): the requester's further messages (stdin of
    /// an exec) and the writer of the answer. The reader's error means the requester went
    /// away; `None` that it finished its side.
    pub fn into_duplex(self) -> (StreamReader, StreamWriter) {
        let RequestStreams { stream, reader } = *self.streams;
        (
            StreamReader { reader },
            StreamWriter {
                stream,
                max_frame: self.max_frame,
            },
        )
    }
}

/// One direction of a streamed call: messages in order on the call's own QUIC stream (the
/// answer of [`IncomingRequest::into_stream`], or the requester's side of a duplex call). `send` waits while the requester does not read (QUIC flow control end to end, so a
/// slow reader grows no buffer on either side), and fails once the requester has gone away
/// (it stopped reading or its connection ended): the answerer should stop producing then.
pub struct StreamWriter {
    stream: quinn::SendStream,
    max_frame: usize,
}

impl StreamWriter {
    /// Sends one message of the response.
    ///
    /// # Errors
    /// [`LinkError::Frame`] when the message is over the link's `max_frame`,
    /// [`LinkError::Write`] when the requester has gone away (it stopped reading, or the
    /// connection ended).
    pub async fn send(&mut self, message: &Message) -> Result<(), LinkError> {
        let body = encode_body(&Envelope::Message(message));
        write_bodies(&mut self.stream, [&body], self.max_frame).await
    }

    /// Resolves when the requester stops reading (it dropped its [`StreamReader`]) or the
    /// connection ends: a producer that waits for new data (a followed log) learns this way
    /// that nobody listens any more.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let stopped = self.stream.stopped();
        async move {
            let _ = stopped.await;
        }
    }

    /// Abandons the stream: the reader gets an error, not a clean end (a session cancelled
    /// because its client went away, as opposed to one that finished). Dropping a writer
    /// finishes it cleanly instead.
    pub fn reset(mut self) {
        let _ = self.stream.reset(quinn::VarInt::from_u32(0));
    }

    /// Ends the response cleanly: the requester's [`StreamReader::next`] returns `None`.
    ///
    /// # Errors
    /// [`LinkError::ClosedStream`] when quinn no longer has the stream (already finished or
    /// reset).
    pub fn finish(mut self) -> Result<(), LinkError> {
        self.stream.finish()?;
        Ok(())
    }
}

/// The reading side of a streamed call ([`LinkHandle::request_stream`],
/// [`LinkHandle::open_duplex`], [`IncomingRequest::into_duplex`]). Dropping it tells the
/// writer to stop (QUIC STOP_SENDING), which ends a followed log on the node.
pub struct StreamReader {
    reader: FrameReader,
}

impl StreamReader {
    /// The next message of the response; `None` once the answerer finished it.
    ///
    /// # Errors
    /// [`LinkError::Read`] when the answerer reset the stream (it cancelled) or the connection
    /// ended, [`LinkError::Frame`] for a frame that does not decode, [`LinkError::Protocol`] for a
    /// frame that is not a message.
    pub async fn next(&mut self) -> Result<Option<ReceivedMessage>, LinkError> {
        match self.reader.next().await? {
            None => Ok(None),
            Some(frame) => frame
                .into_message()
                .map(Some)
                .map_err(|f| LinkError::Protocol(format!("{} frame in a response", f.kind()))),
        }
    }
}

/// The application's end of a link: its events, and a handle to act on it. Dropping the
/// `Link` closes it (and stops a node's reconnect loop).
pub struct Link {
    handle: LinkHandle,
    events: mpsc::Receiver<LinkEvent>,
    _close_on_drop: DropGuard,
}

impl Link {
    /// The next event; `None` once the link is closed.
    pub async fn next_event(&mut self) -> Option<LinkEvent> {
        self.events.recv().await
    }

    /// An event that is already waiting, without waiting for one (to batch work).
    pub fn try_next_event(&mut self) -> Option<LinkEvent> {
        self.events.try_recv().ok()
    }

    /// The handle to act on this link (also reachable through `Deref`); clone it to share.
    pub fn handle(&self) -> &LinkHandle {
        &self.handle
    }
}

impl std::ops::Deref for Link {
    type Target = LinkHandle;
    fn deref(&self) -> &LinkHandle {
        &self.handle
    }
}

/// A cloneable handle to send, ack and make requests on a link.
#[derive(Clone)]
pub struct LinkHandle {
    shared: Arc<Shared>,
}

/// Counters of a link, over all its connections.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LinkCounters {
    /// Connections whose hello exchange completed.
    pub connections: u64,
    /// Messages from the peer's data stream handed to the application (replays excluded).
    pub messages_delivered: u64,
    /// Replayed messages dropped because they had been delivered already.
    pub replays_dropped: u64,
}

pub(crate) struct Shared {
    peer: String,
    pub(crate) config: LinkConfig,
    state: Mutex<State>,
    /// A message was pushed into the window: wakes the data stream writer.
    data_ready: Notify,
    /// Window space was freed: wakes senders waiting in `send`.
    room: Notify,
    /// The application acked or asked for a heartbeat: wakes the control stream writer.
    control_ready: Notify,
    /// A heartbeat is due on the control stream.
    heartbeat_due: AtomicBool,
    /// The period the next heartbeat announces, in milliseconds.
    heartbeat_period_ms: AtomicU32,
    events: mpsc::Sender<LinkEvent>,
    /// Held by the connection being driven: connections of one link run one at a time.
    connection_slot: tokio::sync::Mutex<()>,
    current: Mutex<Current>,
    pub(crate) cancel: CancellationToken,
    connections: AtomicU64,
    delivered: AtomicU64,
    replays_dropped: AtomicU64,
}

struct State {
    window: SendWindow,
    tracker: ReceiveTracker,
}

#[derive(Default)]
struct Current {
    /// Generation of the newest connection handed to this link; older ones must give way.
    newest: u64,
    connection: Option<quinn::Connection>,
    /// The hello exchange is done on `connection`: requests may use it.
    ready: bool,
}

/// Which end of the connection this side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The node: opens the control stream and sends the first hello.
    Client,
    /// The cloud: accepts the control stream and answers the hello.
    Server,
}

impl Link {
    pub(crate) fn new(peer: String, config: LinkConfig) -> (Link, Arc<Shared>) {
        let (events_tx, events) = mpsc::channel(config.event_queue.max(1));
        let epoch = rand::random::<u64>() | 1;
        let cancel = CancellationToken::new();
        let shared = Arc::new(Shared {
            peer,
            state: Mutex::new(State {
                window: SendWindow::new(
                    epoch,
                    config.max_unacked_messages,
                    config.max_unacked_bytes,
                ),
                tracker: ReceiveTracker::new(),
            }),
            config,
            data_ready: Notify::new(),
            room: Notify::new(),
            control_ready: Notify::new(),
            heartbeat_due: AtomicBool::new(false),
            heartbeat_period_ms: AtomicU32::new(0),
            events: events_tx,
            connection_slot: tokio::sync::Mutex::new(()),
            current: Mutex::new(Current::default()),
            connections: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            replays_dropped: AtomicU64::new(0),
            cancel: cancel.clone(),
        });
        let link = Link {
            handle: LinkHandle {
                shared: shared.clone(),
            },
            events,
            _close_on_drop: cancel.drop_guard(),
        };
        (link, shared)
    }
}

impl LinkHandle {
    /// The peer: the node name (cloud side) or the server name (node side).
    pub fn peer(&self) -> &str {
        &self.shared.peer
    }

    /// Encodes and sends a message on the ordered data stream. See [`send_encoded`](Self::send_encoded).
    ///
    /// # Errors
    /// As [`send_encoded`](Self::send_encoded).
    pub async fn send(&self, message: &Message) -> Result<u64, LinkError> {
        self.send_encoded(EncodedMessage::encode(message)).await
    }

    /// Queues an encoded message for the peer and returns its sequence number. Waits while the
    /// window is full. The message is kept until the peer acks it, across reconnects.
    ///
    /// # Errors
    /// [`LinkError::Frame`] when the message is over the link's `max_frame`,
    /// [`LinkError::Closed`] when the link is closed (before or while waiting for room).
    pub async fn send_encoded(&self, mut message: EncodedMessage) -> Result<u64, LinkError> {
        crate::frame::length_prefix(message.len(), self.shared.config.max_frame)?;
        loop {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.try_send_encoded(message)? {
                Ok(seq) => return Ok(seq),
                Err(back) => message = back,
            }
            tokio::select! {
                _ = room => {}
                _ = self.shared.cancel.cancelled() => return Err(LinkError::Closed),
            }
        }
    }

    /// Queues a message if the window has room; gives it back otherwise.
    ///
    /// # Errors
    /// [`LinkError::Closed`] when the link is closed, [`LinkError::Frame`] when the message is
    /// over the link's `max_frame`. A full window is not an error: the inner `Err` gives the
    /// message back.
    pub fn try_send_encoded(
        &self,
        message: EncodedMessage,
    ) -> Result<Result<u64, EncodedMessage>, LinkError> {
        if self.shared.cancel.is_cancelled() {
            return Err(LinkError::Closed);
        }
        crate::frame::length_prefix(message.len(), self.shared.config.max_frame)?;
        let pushed = self.shared.lock_state().window.push(message);
        if pushed.is_ok() {
            self.shared.data_ready.notify_one();
        }
        Ok(pushed)
    }

    /// Everything delivered up to `seq` is durable: the peer may forget it.
    pub fn ack(&self, seq: u64) {
        self.shared.lock_state().tracker.on_durable(seq);
        self.shared.control_ready.notify_one();
    }

    /// Sends a heartbeat: a 5-byte QUIC datagram ([`crate::frame::heartbeat_datagram`]) when
    /// the peer accepts datagrams, else a frame on the control stream (20 bytes of stream
    /// data; heartbeats asked for before the writer runs go as one). No reply beyond QUIC's
    /// own ACK. `period` is how often this side beats (sent along, in milliseconds up to
    /// `u32::MAX`, so the peer can judge silence by it). A datagram is not retransmitted: a
    /// lost heartbeat is made good by the next. Not queued while there is no connection: a
    /// heartbeat is about now.
    ///
    /// # Errors
    /// [`LinkError::NotConnected`] when there is no connection with a finished hello.
    pub fn heartbeat(&self, period: Duration) -> Result<(), LinkError> {
        let Some(connection) = self.shared.ready_connection() else {
            return Err(LinkError::NotConnected);
        };
        let millis = u32::try_from(period.as_millis()).unwrap_or(u32::MAX);
        if connection
            .max_datagram_size()
            .is_some_and(|max| max >= crate::frame::HEARTBEAT_DATAGRAM_LEN)
        {
            let datagram = crate::frame::heartbeat_datagram(millis);
            match connection.send_datagram(Bytes::copy_from_slice(&datagram)) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::debug!(peer = %self.shared.peer, "heartbeat datagram not sent ({e}); sending it on the control stream")
                }
            }
        }
        self.shared
            .heartbeat_period_ms
            .store(millis, Ordering::Relaxed);
        self.shared.heartbeat_due.store(true, Ordering::Relaxed);
        self.shared.control_ready.notify_one();
        Ok(())
    }

    /// Sends a request on a stream of its own and waits for the response, at most the link's
    /// `request_timeout`. See [`request_within`](Self::request_within).
    ///
    /// # Errors
    /// As [`request_within`](Self::request_within).
    pub async fn request(&self, message: &Message) -> Result<ReceivedMessage, LinkError> {
        self.request_within(message, self.shared.config.request_timeout)
            .await
    }

    /// Sends a request on a stream of its own and waits at most `timeout` for the response.
    ///
    /// # Errors
    /// [`LinkError::NotConnected`] at once when the link has no connection (the peer is known
    /// to be unreachable), [`LinkError::Timeout`] when the peer does not answer in time (a hung
    /// peer looks connected until the idle timeout), [`LinkError::Protocol`] when the stream
    /// ends without a message, else the connection's or stream's error
    /// ([`LinkError::Connection`], [`LinkError::Write`], [`LinkError::Read`],
    /// [`LinkError::Frame`]).
    pub async fn request_within(
        &self,
        message: &Message,
        timeout: Duration,
    ) -> Result<ReceivedMessage, LinkError> {
        let connection = self
            .shared
            .ready_connection()
            .ok_or(LinkError::NotConnected)?;
        let config = &self.shared.config;
        let body = encode_body(&Envelope::Message(message));
        let exchange = async {
            let (mut send, recv) = connection.open_bi().await?;
            write_bodies(&mut send, [&body], config.max_frame).await?;
            send.finish()?;
            let mut reader = FrameReader::new(recv, config.max_frame);
            let frame = reader.next().await?.ok_or_else(|| {
                LinkError::Protocol("request stream closed without a response".into())
            })?;
            frame
                .into_message()
                .map_err(|f| LinkError::Protocol(format!("{} frame as a response", f.kind())))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| LinkError::Timeout(timeout))?
    }

    /// Sends a request on a stream of its own whose answer is a stream of messages
    /// ([`IncomingRequest::into_stream`]). Waits at most `timeout` for the first message, which
    /// is returned with the stream of the rest; later messages come as the answerer produces
    /// them, without a deadline (a followed log may be quiet for hours).
    ///
    /// # Errors
    /// As [`request_within`](Self::request_within), for the first message; a response with no
    /// message at all is [`LinkError::Protocol`].
    pub async fn request_stream(
        &self,
        message: &Message,
        timeout: Duration,
    ) -> Result<(ReceivedMessage, StreamReader), LinkError> {
        let (first, writer, reader) = self.open_duplex(message, timeout).await?;
        // Nothing more to say. The answerer may already have stopped reading (it reads only
        // the request), which makes finishing fail harmlessly.
        let _ = writer.finish();
        Ok((first, reader))
    }

    /// Opens a duplex call: `message` first, then more messages through the returned
    /// [`StreamWriter`] (which the requester finishes when it has nothing more to say), while
    /// the answer comes through the [`StreamReader`]; its first message is waited for at most
    /// `timeout` and returned. Dropping both ends cancels the call on the peer.
    ///
    /// # Errors
    /// As [`request_stream`](Self::request_stream).
    pub async fn open_duplex(
        &self,
        message: &Message,
        timeout: Duration,
    ) -> Result<(ReceivedMessage, StreamWriter, StreamReader), LinkError> {
        let connection = self
            .shared
            .ready_connection()
            .ok_or(LinkError::NotConnected)?;
        let max_frame = self.shared.config.max_frame;
        let body = encode_body(&Envelope::Message(message));
        let exchange = async {
            let (mut send, recv) = connection.open_bi().await?;
            write_bodies(&mut send, [&body], max_frame).await?;
            let mut reader = StreamReader {
                reader: FrameReader::new(recv, max_frame),
            };
            let first = reader.next().await?.ok_or_else(|| {
                LinkError::Protocol("request stream closed without a response".into())
            })?;
            Ok((
                first,
                StreamWriter {
                    stream: send,
                    max_frame,
                },
                reader,
            ))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| LinkError::Timeout(timeout))?
    }

    /// Whether a connection is up with its hello exchange done (requests can be made now).
    pub fn is_connected(&self) -> bool {
        self.shared.ready_connection().is_some()
    }

    /// Messages sent and not yet acked by the peer.
    pub fn unacked(&self) -> usize {
        self.shared.lock_state().window.unacked_messages()
    }

    /// QUIC statistics of the current connection (bytes and packets on the wire).
    pub fn connection_stats(&self) -> Option<quinn::ConnectionStats> {
        self.shared.ready_connection().map(|c| c.stats())
    }

    /// The link's counters, read now.
    pub fn counters(&self) -> LinkCounters {
        LinkCounters {
            connections: self.shared.connections.load(Ordering::Relaxed),
            messages_delivered: self.shared.delivered.load(Ordering::Relaxed),
            replays_dropped: self.shared.replays_dropped.load(Ordering::Relaxed),
        }
    }

    /// Closes the link: the current connection ends and no new one is made.
    pub fn close(&self) {
        self.shared.cancel.cancel();
    }

    /// Closes the link, its current connection with `code` and `reason` (at most ~1 KB of
    /// it reaches the peer): how the cloud tells a node why it is cut off (a revoked
    /// certificate). The cloud's server accepts the node's next connection on a new link.
    pub fn close_with(&self, code: CloseCode, reason: &str) {
        self.shared.close_with(code, reason);
    }
}

impl Shared {
    fn lock_state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock is a bug in this module; the state is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_current(&self) -> MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ready_connection(&self) -> Option<quinn::Connection> {
        let current = self.lock_current();
        current.ready.then(|| current.connection.clone()).flatten()
    }

    /// Announces a new connection from `remote` and closes the one it supersedes. Returns its
    /// generation, and the superseded connection's address if that one was still open (a
    /// second process with the same identity, or a restart before the old one timed out).
    pub(crate) fn begin_connection(&self, remote: SocketAddr) -> (u64, Option<SocketAddr>) {
        let mut current = self.lock_current();
        current.newest += 1;
        let mut replaced = None;
        if let Some(old) = current.connection.take() {
            if old.close_reason().is_none() {
                replaced = Some(old.remote_address());
                tracing::debug!(peer = %self.peer, %remote, "a new connection replaces an open one");
            }
            old.close(
                CloseCode::Replaced.var_int(),
                b"replaced by a newer connection with this node's certificate",
            );
        }
        current.ready = false;
        (current.newest, replaced)
    }

    /// Closes the current connection with `code` and `reason`, and the link with it.
    pub(crate) fn close_with(&self, code: CloseCode, reason: &str) {
        if let Some(connection) = self.lock_current().connection.take() {
            connection.close(code.var_int(), reason.as_bytes());
        }
        self.cancel.cancel();
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Runs one connection of this link until it ends; returns why it ended.
    pub(crate) async fn drive(
        self: &Arc<Self>,
        connection: quinn::Connection,
        role: Role,
        generation: u64,
    ) -> String {
        let _slot = self.connection_slot.lock().await;
        {
            let mut current = self.lock_current();
            if current.newest != generation || self.cancel.is_cancelled() {
                connection.close(CloseCode::Replaced.var_int(), b"superseded");
                return "superseded before it started".into();
            }
            current.connection = Some(connection.clone());
        }
        let mut connected = false;
        let result = tokio::select! {
            r = self.session(&connection, role, &mut connected) => r,
            _ = self.cancel.cancelled() => Err(LinkError::Closed),
        };
        {
            let mut current = self.lock_current();
            if current.newest == generation {
                current.connection = None;
                current.ready = false;
            }
        }
        let reason = match (&result, connection.close_reason()) {
            (_, Some(closed)) if !matches!(closed, quinn::ConnectionError::LocallyClosed) => {
                describe_close(&closed)
            }
            (Ok(()), _) => "peer closed the session".to_owned(),
            (Err(e), _) => e.to_string(),
        };
        if let Err(e) = &result {
            if let Some(code) = e.close_code() {
                if code != CloseCode::ShuttingDown {
                    tracing::warn!(peer = %self.peer, code = ?code, "closing connection: {e}");
                }
                let mut text = reason.clone().into_bytes();
                text.truncate(200);
                connection.close(code.var_int(), &text);
            }
        } else {
            connection.close(CloseCode::Normal.var_int(), b"session ended");
        }
        if connected {
            let _ = self
                .events
                .send(LinkEvent::Disconnected {
                    reason: reason.clone(),
                })
                .await;
        }
        reason
    }

    async fn session(
        self: &Arc<Self>,
        connection: &quinn::Connection,
        role: Role,
        connected: &mut bool,
    ) -> Result<(), LinkError> {
        let config = &self.config;
        let handshake = async {
            let (mut control_tx, control_rx) = match role {
                Role::Client => connection.open_bi().await?,
                Role::Server => connection.accept_bi().await?,
            };
            let mut control_rx = FrameReader::new(control_rx, config.max_frame);
            let mut ours = self.our_hello();
            if role == Role::Client {
                let body = encode_body(&Envelope::Hello(ours));
                write_bodies(&mut control_tx, [&body], config.max_frame).await?;
            }
            let frame = control_rx
                .next()
                .await?
                .ok_or_else(|| LinkError::Protocol("control stream closed before hello".into()))?;
            let peer = match frame.envelope() {
                ArchivedEnvelope::Hello(h) => Hello {
                    protocol_version: h.protocol_version.to_native(),
                    send_epoch: h.send_epoch.to_native(),
                    recv_epoch: h.recv_epoch.to_native(),
                    recv_acked: h.recv_acked.to_native(),
                },
                _ => {
                    return Err(LinkError::Protocol(format!(
                        "expected Hello on the control stream, got {}",
                        frame.kind()
                    )))
                }
            };
            let version = negotiate(role, ours.protocol_version, peer.protocol_version)?;
            if role == Role::Server {
                // The server's hello names the version both now speak.
                ours.protocol_version = version;
                let body = encode_body(&Envelope::Hello(ours));
                write_bodies(&mut control_tx, [&body], config.max_frame).await?;
            }
            Ok((control_tx, control_rx, peer, version))
        };
        let (control_tx, control_rx, peer, version) =
            tokio::time::timeout(config.handshake_timeout, handshake)
                .await
                .map_err(|_| LinkError::Timeout(config.handshake_timeout))??;

        let (peer_stream_new, peer_forgot_our_stream) = {
            let mut state = self.lock_state();
            let knew_ours = state.window.on_peer_hello(&peer)?;
            let new = state.tracker.on_peer_hello(&peer);
            (new, !knew_ours)
        };
        self.room.notify_waiters();
        self.lock_current().ready = true;
        self.connections.fetch_add(1, Ordering::Relaxed);
        *connected = true;
        self.events
            .send(LinkEvent::Connected {
                peer_stream_new,
                peer_forgot_our_stream,
            })
            .await
            .map_err(|_| LinkError::Closed)?;

        tokio::select! {
            r = self.write_data(connection, version) => r,
            r = self.read_data(connection) => r,
            r = self.read_control(control_rx) => r,
            r = self.write_control(control_tx) => r,
            r = self.accept_requests(connection) => r,
            r = self.read_datagrams(connection) => r,
        }
    }

    /// A heartbeat from the peer (a frame or a datagram) announcing `millis` (0: not said).
    async fn deliver_heartbeat(&self, millis: u32) -> Result<(), LinkError> {
        let period = (millis > 0).then(|| Duration::from_millis(millis.into()));
        self.events
            .send(LinkEvent::Heartbeat { period })
            .await
            .map_err(|_| LinkError::Closed)
    }

    /// Heartbeats that come as QUIC datagrams. Datagrams of other types are ignored, so that a
    /// newer peer may add some.
    async fn read_datagrams(&self, connection: &quinn::Connection) -> Result<(), LinkError> {
        loop {
            let datagram = connection.read_datagram().await?;
            match crate::frame::parse_heartbeat_datagram(&datagram) {
                Some(millis) => self.deliver_heartbeat(millis).await?,
                None => {
                    tracing::debug!(peer = %self.peer, len = datagram.len(), "ignoring a datagram that is not a heartbeat")
                }
            }
        }
    }

    fn our_hello(&self) -> Hello {
        let mut state = self.lock_state();
        state.tracker.hello_sent();
        Hello {
            protocol_version: self.config.protocol_version,
            send_epoch: state.window.epoch(),
            recv_epoch: state.tracker.epoch(),
            recv_acked: state.tracker.durable(),
        }
    }

    /// Our data stream: `StreamStart`, then every unacked message in order, then new ones,
    /// each in a form the peer's protocol `version` reads.
    async fn write_data(
        &self,
        connection: &quinn::Connection,
        version: u32,
    ) -> Result<(), LinkError> {
        const BATCH_MESSAGES: usize = 128;
        const BATCH_BYTES: usize = 512 * 1024;
        let max_frame = self.config.max_frame;
        let mut stream = connection.open_uni().await?;
        let mut cursor = self.lock_state().window.acked() + 1;
        let start = encode_body(&Envelope::StreamStart(cursor));
        write_bodies(&mut stream, [&start], max_frame).await?;
        let mut batch: Vec<Bytes> = Vec::new();
        loop {
            let ready = self.data_ready.notified();
            {
                let state = self.lock_state();
                // Messages acked while we were writing need not go out again.
                cursor = cursor.max(state.window.acked() + 1);
                let mut bytes = 0;
                while batch.len() < BATCH_MESSAGES && bytes < BATCH_BYTES {
                    let Some(message) = state.window.get(cursor + batch.len() as u64) else {
                        break;
                    };
                    bytes += message.len();
                    batch.push(message.for_version(version));
                }
            }
            if batch.is_empty() {
                // Idle: hold no batch buffer while waiting (up to 4 KB per node in the cloud).
                batch = Vec::new();
                ready.await;
                continue;
            }
            write_bodies(&mut stream, &batch, max_frame).await?;
            cursor += batch.len() as u64;
            batch.clear();
        }
    }

    /// The peer's data stream: deliver new messages, drop replays.
    async fn read_data(&self, connection: &quinn::Connection) -> Result<(), LinkError> {
        let stream = connection.accept_uni().await?;
        let mut reader = FrameReader::new(stream, self.config.max_frame);
        let first = reader
            .next()
            .await?
            .ok_or_else(|| LinkError::Protocol("data stream closed before StreamStart".into()))?;
        let ArchivedEnvelope::StreamStart(first_seq) = first.envelope() else {
            return Err(LinkError::Protocol(format!(
                "data stream opened with {} instead of StreamStart",
                first.kind()
            )));
        };
        self.lock_state()
            .tracker
            .on_stream_start(first_seq.to_native())?;
        while let Some(frame) = reader.next().await? {
            let message = frame
                .into_message()
                .map_err(|f| LinkError::Protocol(format!("{} frame on a data stream", f.kind())))?;
            let seq = self.lock_state().tracker.on_message()?;
            match seq {
                Some(seq) => {
                    self.delivered.fetch_add(1, Ordering::Relaxed);
                    self.events
                        .send(LinkEvent::Message(Delivery { seq, message }))
                        .await
                        .map_err(|_| LinkError::Closed)?;
                }
                None => {
                    self.replays_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    /// Acks from the peer free our window; heartbeats go to the application.
    async fn read_control(&self, mut reader: FrameReader) -> Result<(), LinkError> {
        while let Some(frame) = reader.next().await? {
            match frame.envelope() {
                ArchivedEnvelope::Ack(seq) => {
                    self.lock_state().window.ack(seq.to_native())?;
                    self.room.notify_waiters();
                }
                ArchivedEnvelope::Heartbeat(millis) => {
                    self.deliver_heartbeat(millis.to_native()).await?;
                }
                _ => {
                    return Err(LinkError::Protocol(format!(
                        "unexpected {} frame on the control stream",
                        frame.kind()
                    )))
                }
            }
        }
        Ok(())
    }

    /// Our acks, cumulative, sent as the application makes messages durable, and heartbeats;
    /// both in one write when both are due.
    async fn write_control(&self, mut stream: quinn::SendStream) -> Result<(), LinkError> {
        loop {
            self.control_ready.notified().await;
            if !self.config.ack_delay.is_zero() {
                tokio::time::sleep(self.config.ack_delay).await;
            }
            let ack = self.lock_state().tracker.take_ack();
            let mut bodies = Vec::with_capacity(2);
            if let Some(seq) = ack {
                bodies.push(encode_body(&Envelope::Ack(seq)));
            }
            if self.heartbeat_due.swap(false, Ordering::Relaxed) {
                let period = self.heartbeat_period_ms.load(Ordering::Relaxed);
                bodies.push(encode_body(&Envelope::Heartbeat(period)));
            }
            if !bodies.is_empty() {
                write_bodies(&mut stream, &bodies, self.config.max_frame).await?;
            }
        }
    }

    /// Request streams opened by the peer: read the request, hand it to the application.
    async fn accept_requests(
        self: &Arc<Self>,
        connection: &quinn::Connection,
    ) -> Result<(), LinkError> {
        loop {
            let (send, recv) = connection.accept_bi().await?;
            let shared = self.clone();
            let connection = connection.clone();
            tokio::spawn(async move {
                let config = &shared.config;
                let mut reader = FrameReader::new(recv, config.max_frame);
                let request =
                    match tokio::time::timeout(config.request_timeout, reader.next()).await {
                        Ok(Ok(Some(frame))) => frame.into_message().map_err(|f| {
                            LinkError::Protocol(format!("{} frame as a request", f.kind()))
                        }),
                        Ok(Ok(None)) => Err(LinkError::Protocol("empty request stream".into())),
                        Ok(Err(e)) => Err(e),
                        Err(_) => Err(LinkError::Timeout(config.request_timeout)),
                    };
                match request {
                    Ok(message) => {
                        let request = IncomingRequest {
                            message,
                            streams: Box::new(RequestStreams {
                                stream: send,
                                reader,
                            }),
                            max_frame: config.max_frame,
                        };
                        let _ = shared.events.send(LinkEvent::Request(request)).await;
                    }
                    Err(e) => {
                        if let Some(code) = e.close_code() {
                            tracing::warn!(peer = %shared.peer, "bad request stream: {e}");
                            connection.close(code.var_int(), e.to_string().as_bytes());
                        }
                    }
                }
            });
        }
    }
}

/// A readable reason for a connection the peer or the network ended.
/// The link protocol version a connection speaks, from this side's highest (`ours`) and what
/// the peer's hello says (`peer`): a node announces its highest, and the cloud answers with the
/// lower of the two, which the node then speaks too.
///
/// # Errors
/// [`LinkError::Version`] when the peer's version is below [`MIN_PROTOCOL_VERSION`], or when
/// the cloud answers a node with a version the node did not offer.
fn negotiate(role: Role, ours: u32, peer: u32) -> Result<u32, LinkError> {
    let version = match role {
        Role::Server => ours.min(peer),
        Role::Client if peer <= ours => peer,
        Role::Client => return Err(LinkError::Version { peer, ours }),
    };
    if version < MIN_PROTOCOL_VERSION {
        return Err(LinkError::Version { peer, ours });
    }
    Ok(version)
}

fn describe_close(error: &quinn::ConnectionError) -> String {
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => {
            let code = close.error_code.into_inner();
            let name = CloseCode::from_code(code)
                .map(|c| format!("{c:?}"))
                .unwrap_or_else(|| format!("code {code}"));
            format!(
                "peer closed the connection ({name}): {}",
                String::from_utf8_lossy(&close.reason)
            )
        }
        quinn::ConnectionError::TimedOut => "peer unresponsive (idle timeout)".to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every link's event queue allocates room for 32 events as soon as it exists (a tokio
    /// mpsc block), idle or not: an event's size is memory per node in the cloud.
    #[test]
    fn a_link_event_is_small() {
        let size = std::mem::size_of::<LinkEvent>();
        eprintln!(
            "LinkEvent: {size} B, Delivery {} B, IncomingRequest {} B",
            std::mem::size_of::<Delivery>(),
            std::mem::size_of::<IncomingRequest>()
        );
        assert!(size <= 64, "LinkEvent is {size} bytes");
    }
}
