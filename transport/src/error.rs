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

    pub fn var_int(self) -> quinn::VarInt {
        quinn::VarInt::from_u32(self as u32)
    }
}

/// What went wrong on a link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the link is closed")]
    Closed,
    #[error("not connected")]
    NotConnected,
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Sequence(#[from] SequenceError),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("peer speaks link protocol version {peer}, this side {ours}")]
    Version { peer: u32, ours: u32 },
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("stream already closed: {0}")]
    ClosedStream(#[from] quinn::ClosedStream),
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
    #[error("cannot bind UDP socket {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("QUIC rejected the TLS configuration: {0}")]
    QuicTls(String),
    #[error("invalid server name {0:?}")]
    ServerName(String),
}
