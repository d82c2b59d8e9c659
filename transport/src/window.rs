//! Sans-IO reliability for one direction of a link: the sender's window of unacked messages and
//! the receiver's view of what it has delivered and made durable.
//!
//! Sequence numbers are per direction and start at 1. Data frames carry no sequence number:
//! a data stream opens with `StreamStart(first_seq)` and the n-th message after it is
//! `first_seq + n`. That keeps a message's encoded bytes identical for every node it goes to,
//! so the cloud encodes a change once and shares the bytes.
//!
//! An *epoch* names one sender's window. It changes when the sender loses its window (process
//! restart). A receiver that sees a new epoch starts counting afresh from the stream start, and
//! the application is told, because what was in flight on the old window is gone.

use std::collections::VecDeque;

use crate::frame::{EncodedMessage, Hello};

/// The peer did something the protocol does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SequenceError {
    /// An ack (or a hello's `recv_acked`) for a sequence this side never sent.
    #[error("peer acked sequence {acked}, but only {sent} was ever sent")]
    AckBeyondSent {
        /// The sequence the peer acked.
        acked: u64,
        /// The highest sequence sent (0 before any).
        sent: u64,
    },
    /// A data stream that starts past the next undelivered sequence: messages would be lost.
    #[error("data stream starts at {first}, but {expected} is the next expected (a gap)")]
    Gap {
        /// The `StreamStart` sequence.
        first: u64,
        /// The sequence after the last one delivered.
        expected: u64,
    },
    /// A message on a data stream before its `StreamStart`.
    #[error("message before StreamStart on a data stream")]
    NoStreamStart,
}

/// Messages sent but not yet acked, bounded in count and bytes. A full window is backpressure.
#[derive(Debug)]
pub struct SendWindow {
    epoch: u64,
    /// Sequence of `entries[0]`; everything below it is acked.
    base: u64,
    entries: VecDeque<EncodedMessage>,
    bytes: usize,
    max_messages: usize,
    max_bytes: usize,
}

impl SendWindow {
    /// An empty window named `epoch` (nonzero; 0 means "none" in a hello), holding at most
    /// `max_messages` (at least 1) messages and `max_bytes` bytes of frame bodies. The first
    /// message gets sequence 1.
    pub fn new(epoch: u64, max_messages: usize, max_bytes: usize) -> Self {
        SendWindow {
            epoch,
            base: 1,
            entries: VecDeque::new(),
            bytes: 0,
            max_messages: max_messages.max(1),
            max_bytes,
        }
    }

    /// This window's epoch, sent as the hello's `send_epoch`.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Highest sequence the peer has acked.
    pub fn acked(&self) -> u64 {
        self.base - 1
    }

    /// Sequence the next pushed message gets.
    pub fn next_seq(&self) -> u64 {
        self.base + self.entries.len() as u64
    }

    /// Messages in the window (sent or not, not yet acked).
    pub fn unacked_messages(&self) -> usize {
        self.entries.len()
    }

    /// Frame body bytes of the messages in the window.
    pub fn unacked_bytes(&self) -> usize {
        self.bytes
    }

    /// Whether a message of `len` bytes fits. One message always fits in an empty window, so a
    /// message larger than the byte budget still goes out (alone).
    pub fn has_room(&self, len: usize) -> bool {
        self.entries.is_empty()
            || (self.entries.len() < self.max_messages && self.bytes + len <= self.max_bytes)
    }

    /// Appends a message and returns its sequence, or gives it back when the window is full.
    ///
    /// # Errors
    /// The message itself, given back, when it does not fit ([`has_room`](Self::has_room)).
    pub fn push(&mut self, message: EncodedMessage) -> Result<u64, EncodedMessage> {
        if !self.has_room(message.len()) {
            return Err(message);
        }
        let seq = self.next_seq();
        self.bytes += message.len();
        self.entries.push_back(message);
        Ok(seq)
    }

    /// Cumulative ack: drops everything up to `seq`. Returns how many messages were freed.
    ///
    /// An ack at or below what was already acked frees nothing.
    ///
    /// # Errors
    /// [`SequenceError::AckBeyondSent`] when `seq` is above the highest sequence pushed.
    pub fn ack(&mut self, seq: u64) -> Result<usize, SequenceError> {
        let sent = self.next_seq() - 1;
        if seq > sent {
            return Err(SequenceError::AckBeyondSent { acked: seq, sent });
        }
        let mut freed = 0;
        while self.base <= seq {
            if let Some(message) = self.entries.pop_front() {
                self.bytes -= message.len();
            }
            self.base += 1;
            freed += 1;
        }
        Ok(freed)
    }

    /// The unacked message with sequence `seq`, if it is still in the window.
    pub fn get(&self, seq: u64) -> Option<&EncodedMessage> {
        let index = seq.checked_sub(self.base)?;
        self.entries.get(usize::try_from(index).ok()?)
    }

    /// Applies the peer's hello: if the peer tracks this window's epoch, what it acked is done.
    /// Returns whether the peer knew this window (`false`: it lost it, everything is resent).
    ///
    /// # Errors
    /// [`SequenceError::AckBeyondSent`] when the peer claims to have more of this window than was
    /// sent.
    pub fn on_peer_hello(&mut self, hello: &Hello) -> Result<bool, SequenceError> {
        if hello.recv_epoch != self.epoch {
            return Ok(false);
        }
        self.ack(hello.recv_acked)?;
        Ok(true)
    }
}

/// What the receiver of one direction has delivered to the application and made durable.
#[derive(Debug, Default)]
pub struct ReceiveTracker {
    /// The peer's window this state refers to; 0 before any.
    epoch: u64,
    /// Highest sequence handed to the application.
    delivered: u64,
    /// Highest sequence the application said is durable (what we ack).
    durable: u64,
    /// Highest durable sequence already acked to the peer.
    acked_to_peer: u64,
    /// Sequence of the next message on the current data stream; `None` before `StreamStart`.
    stream_next: Option<u64>,
    /// A new epoch was seen: the next stream start sets the baseline.
    rebase_pending: bool,
}

impl ReceiveTracker {
    /// A tracker that has seen no peer window yet (epoch 0).
    pub fn new() -> Self {
        ReceiveTracker::default()
    }

    /// The peer's window (its `send_epoch`) the counters refer to; 0 before the first hello.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Highest sequence handed to the application.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Highest sequence the application made durable: what this side acks, and sends as the
    /// hello's `recv_acked`.
    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// Applies the peer's hello. Returns `true` when the peer's window is new to us (first
    /// contact, or the peer restarted): the application must not assume anything it had.
    pub fn on_peer_hello(&mut self, hello: &Hello) -> bool {
        self.stream_next = None;
        if hello.send_epoch == self.epoch {
            return false;
        }
        self.epoch = hello.send_epoch;
        self.rebase_pending = true;
        true
    }

    /// A data stream started; its first message has sequence `first`.
    ///
    /// After a new epoch, `first - 1` becomes the baseline (nothing before it is expected).
    ///
    /// # Errors
    /// [`SequenceError::Gap`] when, on a known epoch, `first` is past the next undelivered
    /// sequence.
    pub fn on_stream_start(&mut self, first: u64) -> Result<(), SequenceError> {
        if self.rebase_pending {
            let base = first.saturating_sub(1);
            self.delivered = base;
            self.durable = base;
            self.acked_to_peer = base;
            self.rebase_pending = false;
        } else if first > self.delivered + 1 {
            return Err(SequenceError::Gap {
                first,
                expected: self.delivered + 1,
            });
        }
        self.stream_next = Some(first);
        Ok(())
    }

    /// A message arrived on the data stream. Returns its sequence if it is new, `None` if it is
    /// a replay of one already delivered.
    ///
    /// # Errors
    /// [`SequenceError::NoStreamStart`] when no data stream has started since the last hello.
    pub fn on_message(&mut self) -> Result<Option<u64>, SequenceError> {
        let seq = self.stream_next.ok_or(SequenceError::NoStreamStart)?;
        self.stream_next = Some(seq + 1);
        if seq <= self.delivered {
            return Ok(None);
        }
        self.delivered = seq;
        Ok(Some(seq))
    }

    /// The application made everything up to `seq` durable.
    pub fn on_durable(&mut self, seq: u64) {
        self.durable = self.durable.max(seq.min(self.delivered));
    }

    /// The cumulative ack to send now, if it advanced since the last one sent.
    pub fn take_ack(&mut self) -> Option<u64> {
        (self.durable > self.acked_to_peer).then(|| {
            self.acked_to_peer = self.durable;
            self.durable
        })
    }

    /// After a reconnect the peer learns `durable` from our hello.
    pub fn hello_sent(&mut self) {
        self.acked_to_peer = self.durable;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;

    fn msg(n: u8) -> EncodedMessage {
        EncodedMessage::encode(&Message {
            content: vec![n; 10].into(),
            ..Message::default()
        })
    }

    fn hello(send_epoch: u64, recv_epoch: u64, recv_acked: u64) -> Hello {
        Hello {
            protocol_version: 1,
            send_epoch,
            recv_epoch,
            recv_acked,
        }
    }

    #[test]
    fn window_is_bounded_and_frees_on_cumulative_ack() {
        let mut w = SendWindow::new(5, 3, usize::MAX);
        assert_eq!(w.push(msg(1)), Ok(1));
        assert_eq!(w.push(msg(2)), Ok(2));
        assert_eq!(w.push(msg(3)), Ok(3));
        assert!(w.push(msg(4)).is_err(), "a full window refuses");
        assert_eq!(w.ack(2), Ok(2));
        assert_eq!(w.acked(), 2);
        assert_eq!(w.get(3), Some(&msg(3)));
        assert_eq!(w.get(2), None);
        assert_eq!(w.push(msg(4)), Ok(4));
        assert_eq!(w.ack(1), Ok(0), "an old ack is harmless");
        assert_eq!(
            w.ack(9),
            Err(SequenceError::AckBeyondSent { acked: 9, sent: 4 })
        );
    }

    #[test]
    fn byte_budget_bounds_the_window_but_one_large_message_fits_alone() {
        let big = EncodedMessage::encode(&Message {
            content: vec![0; 1000].into(),
            ..Message::default()
        });
        let mut w = SendWindow::new(1, 100, 500);
        assert_eq!(w.push(big.clone()), Ok(1));
        assert!(w.push(msg(1)).is_err());
        w.ack(1).unwrap();
        assert_eq!(w.unacked_bytes(), 0);
        assert_eq!(w.push(msg(1)), Ok(2));
    }

    #[test]
    fn hello_from_a_peer_that_knows_the_window_acks_it() {
        let mut w = SendWindow::new(7, 10, usize::MAX);
        for n in 0..5 {
            w.push(msg(n)).unwrap();
        }
        assert_eq!(w.on_peer_hello(&hello(1, 7, 3)), Ok(true));
        assert_eq!(w.acked(), 3);
        assert_eq!(
            w.on_peer_hello(&hello(1, 8, 5)),
            Ok(false),
            "another epoch: resend all"
        );
        assert_eq!(w.acked(), 3);
    }

    #[test]
    fn receiver_drops_replays_and_acks_only_durable() {
        let mut r = ReceiveTracker::new();
        assert!(r.on_peer_hello(&hello(9, 0, 0)));
        r.on_stream_start(1).unwrap();
        assert_eq!(r.on_message(), Ok(Some(1)));
        assert_eq!(r.on_message(), Ok(Some(2)));
        assert_eq!(r.on_message(), Ok(Some(3)));
        r.on_durable(2);
        assert_eq!(r.take_ack(), Some(2));
        assert_eq!(r.take_ack(), None);
        // Reconnect: the sender replays from 3 (it saw our ack of 2).
        assert!(!r.on_peer_hello(&hello(9, 0, 0)));
        r.hello_sent();
        r.on_stream_start(3).unwrap();
        assert_eq!(r.on_message(), Ok(None), "3 was delivered already");
        assert_eq!(r.on_message(), Ok(Some(4)));
        r.on_durable(10);
        assert_eq!(r.durable(), 4, "durable never passes delivered");
    }

    #[test]
    fn receiver_rebases_on_a_new_epoch_and_rejects_gaps() {
        let mut r = ReceiveTracker::new();
        r.on_peer_hello(&hello(1, 0, 0));
        r.on_stream_start(1).unwrap();
        r.on_message().unwrap();
        // The peer restarted with a window that starts later (it had acks we never saw persist).
        assert!(r.on_peer_hello(&hello(2, 0, 0)));
        r.on_stream_start(40).unwrap();
        assert_eq!(r.on_message(), Ok(Some(40)));
        // Same epoch, but the stream skips ahead: a gap is a protocol error.
        assert!(!r.on_peer_hello(&hello(2, 0, 0)));
        assert_eq!(
            r.on_stream_start(45),
            Err(SequenceError::Gap {
                first: 45,
                expected: 41
            })
        );
        let mut fresh = ReceiveTracker::new();
        assert_eq!(fresh.on_message(), Err(SequenceError::NoStreamStart));
    }
}
