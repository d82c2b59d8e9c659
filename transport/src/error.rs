//! Typed errors and the application close codes a connection is closed with.

use std::time::Duration;

use crate::frame::FrameError;
use crate::tls::TlsError;
use crate::window::SequenceError;

/// Application error codes in QUIC CONNECTION_CLOSE frames: the peer and the logs see why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CloseCode {
    /// Orderly close.
    Normal = 0,
    /// The peer broke the protocol (malformed frame, wrong frame for the stream, bad sequence).
    Protocol = 1,
    /// A frame over the configured maximum.
    FrameTooLarge = 2,
    /// The same node connected again; this older connection is superseded.
    Replaced = 3,
    /// No common protocol version.
    Version = 4,
    /// The certificate does not name a valid node.
    Unauthorized = 5,
    /// The endpoint is shutting down.
    ShuttingDown = 6,
}

impl CloseCode {
    /// The close code with this numeric value, as read from a peer's CONNECTION_CLOSE frame;
    /// `None` for a value this version does not define.
    pub fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            0 => CloseCode::Normal,
            1 => CloseCode::Protocol,
            2 => CloseCode::FrameTooLarge,
            3 => CloseCode::Replaced,
            4 => CloseCode::Version,
            5 => CloseCode::Unauthorized,
            6 => CloseCode::ShuttingDown,
            _ => return None,
        })
    }

    /// This code as the QUIC variable-length integer `quinn::Connection::close` takes.
    pub fn var_int(self) -> quinn::VarInt {
        quinn::VarInt::from_u32(self as u32)
    }
}

/// What went wrong on a link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The link was closed locally ([`crate::LinkHandle::close`], or the [`crate::Link`] dropped).
    #[error("the link is closed")]
    Closed,
    /// The link has no connection with a finished hello right now (the peer is unreachable).
    #[error("not connected")]
    NotConnected,
    /// A frame could not be encoded or decoded (too large, empty, malformed, truncated).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer's sequence numbers or acks are inconsistent with this side's window.
    #[error(transparent)]
    Sequence(#[from] SequenceError),
    /// The peer broke the link protocol (a frame of the wrong kind, a stream closed too early).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// No common link protocol version: the peer's hello names one this side does not speak
    /// (below [`crate::MIN_PROTOCOL_VERSION`], or a cloud's answer above what the node offered).
    #[error("peer speaks link protocol version {peer}, this side {ours} (and down to {min})", min = crate::MIN_PROTOCOL_VERSION)]
    Version {
        /// The version in the peer's hello.
        peer: u32,
        /// The highest version this side speaks ([`crate::LinkConfig::protocol_version`]).
        ours: u32,
    },
    /// The QUIC connection ended (closed by the peer, idle timeout, reset).
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing to a QUIC stream failed (the peer stopped it, or the connection ended).
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading from a QUIC stream failed (the peer reset it, or the connection ended).
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    /// The QUIC stream had already been finished or reset on this side.
    #[error("stream already closed: {0}")]
    ClosedStream(#[from] quinn::ClosedStream),
    /// An exchange took longer than its deadline (the handshake, a request); the deadline it had.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

impl LinkError {
    /// The close code to end a connection with after this error, if the error is ours to
    /// report (a connection that is already gone needs no close).
    pub fn close_code(&self) -> Option<CloseCode> {
        match self {
            LinkError::Frame(FrameError::TooLarge { .. }) => Some(CloseCode::FrameTooLarge),
            LinkError::Frame(_) | LinkError::Sequence(_) | LinkError::Protocol(_) => {
                Some(CloseCode::Protocol)
            }
            LinkError::Version { .. } => Some(CloseCode::Version),
            LinkError::Closed => Some(CloseCode::ShuttingDown),
            LinkError::Timeout(_) => Some(CloseCode::Protocol),
            LinkError::NotConnected
            | LinkError::Connection(_)
            | LinkError::Write(_)
            | LinkError::Read(_)
            | LinkError::ClosedStream(_) => None,
        }
    }
}

/// An endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The UDP socket could not be bound or configured (or there is no async runtime).
    #[error("cannot bind UDP socket {addr}: {source}")]
    Bind {
        /// The address that could not be bound.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The certificates or keys could not become a rustls configuration.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// quinn refused the rustls configuration (for example no TLS 1.3 cipher suite).
    #[error("QUIC rejected the TLS configuration: {0}")]
    QuicTls(String),
    /// A server name that is neither a DNS name nor an IP address.
    #[error("invalid server name {0:?}")]
    ServerName(String),
}
