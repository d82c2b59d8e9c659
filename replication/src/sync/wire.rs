//! The sync messages on kedge's transport. Each is one transport [`Message`] in route group
//! `sync`, its operation naming the variant; an object's key is the route's resource, its
//! version the header's `resource_version`, its bytes the content. An [`Down::Upsert`] is
//! encoded once per change ([`Change::shared_encoding`]) and the same bytes go to every node.
//! Fixed-size fields (session ids, counts, report ids) are big-endian in the content.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use transport::{EncodedMessage, Message, ReceivedMessage, Route};

use super::messages::{Down, Hello, Report, SessionId, Up, Watermark};
use crate::change::{Change, ChangeKind};
use crate::key::ObjectKey;
use crate::version::{ResourceVersion, Revision};

/// The route group of every sync message.
pub const GROUP: &str = "sync";

/// Why a received message is not a sync message this side can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The route group is not [`GROUP`]; the group it has.
    #[error("not a sync message (group {0:?})")]
    NotSync(String),
    /// An operation this direction does not have; the operation.
    #[error("unknown sync operation {0:?}")]
    UnknownOperation(String),
    /// A sync operation whose key, version or content does not decode.
    #[error("sync {operation}: {problem}")]
    Malformed {
        /// The operation (`upsert`, `hello`, ...).
        operation: &'static str,
        /// What is wrong.
        problem: String,
    },
}

fn malformed(operation: &'static str, problem: impl Into<String>) -> WireError {
    WireError::Malformed {
        operation,
        problem: problem.into(),
    }
}

fn message(
    operation: &str,
    resource: &str,
    rv: Option<ResourceVersion>,
    content: Bytes,
) -> Message {
    // No uuid or timestamp: sync messages are ordered by their stream, and the bytes of an
    // upsert must not depend on when (or to whom) it is sent.
    Message {
        header: transport::Header {
            resource_version: rv.map(|v| v.to_string()).unwrap_or_default(),
            ..Default::default()
        },
        route: Route::new("cloudcore", GROUP, operation, resource),
        content,
    }
}

fn u64s(values: &[u64]) -> Bytes {
    let mut out = BytesMut::with_capacity(8 * values.len());
    for v in values {
        out.put_u64(*v);
    }
    out.freeze()
}

/// Encodes a downward message (upserts shared across nodes).
pub fn encode_down(down: &Down) -> EncodedMessage {
    let m = match down {
        Down::Upsert(change) => {
            return change.shared_encoding(|c: &Change| {
                EncodedMessage::encode_compact(&message(
                    "upsert",
                    c.key.as_str(),
                    Some(c.rv),
                    c.object.clone(),
                ))
            })
        }
        Down::Session(s) => message("session", "", None, u64s(&[s.epoch, s.number])),
        Down::Delete { key, rv } => message("delete", key.as_str(), Some(*rv), Bytes::new()),
        Down::Bump { key, base, rv } => {
            message("bump", key.as_str(), Some(*rv), u64s(&[base.get()]))
        }
        Down::DigestRequest => message("digest-request", "", None, Bytes::new()),
        Down::HelloRequest => message("hello-request", "", None, Bytes::new()),
        Down::ReportAck { through } => message("report-ack", "", None, u64s(&[*through])),
    };
    EncodedMessage::encode_compact(&m)
}

/// The parts of a received message that sync reads.
pub struct Parts<'a> {
    /// The route group.
    pub group: &'a str,
    /// The route operation: the message variant.
    pub operation: &'a str,
    /// The route resource: an object key, or empty.
    pub resource: &'a str,
    /// The header's resourceVersion (decimal), or empty.
    pub resource_version: std::borrow::Cow<'a, str>,
    /// The content (a slice of the receive buffer).
    pub content: Bytes,
}

impl<'a> Parts<'a> {
    /// The parts of `received`, borrowed.
    pub fn of(received: &'a ReceivedMessage) -> Self {
        let route = received.route();
        Parts {
            group: route.group,
            operation: route.operation,
            resource: route.resource,
            resource_version: received.header().resource_version,
            content: received.content(),
        }
    }
}

fn key(op: &'static str, parts: &Parts<'_>) -> Result<ObjectKey, WireError> {
    ObjectKey::parse(parts.resource).map_err(|e| malformed(op, e.to_string()))
}

fn rv(op: &'static str, parts: &Parts<'_>) -> Result<ResourceVersion, WireError> {
    parts
        .resource_version
        .parse()
        .map_err(|_| malformed(op, format!("resource version {:?}", parts.resource_version)))
}

fn fixed<const N: usize>(op: &'static str, content: &Bytes) -> Result<[u64; N], WireError> {
    if content.len() != 8 * N {
        return Err(malformed(
            op,
            format!("{} content bytes, expected {}", content.len(), 8 * N),
        ));
    }
    let mut buf = content.clone();
    Ok(std::array::from_fn(|_| buf.get_u64()))
}

/// Decodes a downward message. An upsert decodes as a [`ChangeKind::Modified`] change at
/// revision 0 (the edge orders by session count, not by the cloud's revision).
///
/// # Errors
/// [`WireError::NotSync`] for another route group, [`WireError::UnknownOperation`] for an
/// operation that is not downward, [`WireError::Malformed`] for a key that does not parse, a
/// resourceVersion that is not a decimal `u64`, or content of the wrong length.
pub fn decode_down(parts: Parts<'_>) -> Result<Down, WireError> {
    if parts.group != GROUP {
        return Err(WireError::NotSync(parts.group.to_owned()));
    }
    Ok(match parts.operation {
        "upsert" => {
            let key = key("upsert", &parts)?;
            let rv = rv("upsert", &parts)?;
            // The cloud's revision is not sent: the edge orders by session count, not revision.
            Down::Upsert(Arc::new(Change::new(
                Revision::ZERO,
                key,
                rv,
                ChangeKind::Modified,
                parts.content,
            )))
        }
        "session" => {
            let [epoch, number] = fixed::<2>("session", &parts.content)?;
            Down::Session(SessionId { epoch, number })
        }
        "delete" => Down::Delete {
            key: key("delete", &parts)?,
            rv: rv("delete", &parts)?,
        },
        "bump" => {
            let [base] = fixed::<1>("bump", &parts.content)?;
            Down::Bump {
                key: key("bump", &parts)?,
                base: ResourceVersion(base),
                rv: rv("bump", &parts)?,
            }
        }
        "digest-request" => Down::DigestRequest,
        "hello-request" => Down::HelloRequest,
        "report-ack" => {
            let [through] = fixed::<1>("report-ack", &parts.content)?;
            Down::ReportAck { through }
        }
        other => return Err(WireError::UnknownOperation(other.to_owned())),
    })
}

/// Encodes an upward message, in its compact form (the link expands it for a cloud that
/// speaks an older protocol).
pub fn encode_up(up: &Up) -> EncodedMessage {
    EncodedMessage::encode_compact(&up_message(up))
}

/// An upward message as a transport [`Message`] (its full form).
pub fn up_message(up: &Up) -> Message {
    let mut m = match up {
        Up::Hello(h) => {
            let (has, epoch, number, count) = match h.applied {
                Some(w) => (1, w.session.epoch, w.session.number, w.count),
                None => (0, 0, 0, 0),
            };
            message(
                "hello",
                "",
                None,
                u64s(&[h.store_id, has, epoch, number, count, h.objects, h.digest]),
            )
        }
        Up::Ack { session, count } => message(
            "ack",
            "",
            None,
            u64s(&[session.epoch, session.number, *count]),
        ),
        Up::Digest(pairs) => {
            let mut out = BytesMut::new();
            for (key, rv) in pairs {
                out.put_u32(key.as_str().len() as u32);
                out.put_slice(key.as_bytes());
                out.put_u64(rv.get());
            }
            message("digest", "", None, out.freeze())
        }
        Up::Refetch { key } => message("refetch", key.as_str(), None, Bytes::new()),
        Up::Report(r) => {
            let (operation, body) = match &r.patch {
                Some(patch) => ("report-patch", patch),
                None => ("report", &r.object),
            };
            let mut out = BytesMut::with_capacity(8 + body.len());
            out.put_u64(r.id);
            out.put_slice(body);
            message(operation, r.key.as_str(), Some(r.base), out.freeze())
        }
    };
    m.route.source = "edgecore".into();
    m
}

/// Decodes an upward message (`report-patch` as a [`Report`] with `patch` set and an empty
/// `object`).
///
/// # Errors
/// [`WireError::NotSync`] for another route group, [`WireError::UnknownOperation`] for an
/// operation that is not upward, [`WireError::Malformed`] for a key that does not parse, a
/// resourceVersion that is not a decimal `u64`, fixed-size content of the wrong length, a
/// truncated digest, a report shorter than its 8-byte id, or an empty patch.
pub fn decode_up(parts: Parts<'_>) -> Result<Up, WireError> {
    if parts.group != GROUP {
        return Err(WireError::NotSync(parts.group.to_owned()));
    }
    Ok(match parts.operation {
        "hello" => {
            let [store_id, has, epoch, number, count, objects, digest] =
                fixed::<7>("hello", &parts.content)?;
            Up::Hello(Hello {
                store_id,
                applied: (has == 1).then_some(Watermark {
                    session: SessionId { epoch, number },
                    count,
                }),
                objects,
                digest,
            })
        }
        "ack" => {
            let [epoch, number, count] = fixed::<3>("ack", &parts.content)?;
            Up::Ack {
                session: SessionId { epoch, number },
                count,
            }
        }
        "digest" => {
            let mut buf = parts.content.clone();
            let mut pairs = Vec::new();
            while buf.has_remaining() {
                if buf.remaining() < 4 {
                    return Err(malformed("digest", "truncated"));
                }
                let len = buf.get_u32() as usize;
                if buf.remaining() < len + 8 {
                    return Err(malformed("digest", "truncated"));
                }
                let key_bytes = buf.copy_to_bytes(len);
                let text = std::str::from_utf8(&key_bytes)
                    .map_err(|_| malformed("digest", "key is not UTF-8"))?;
                let key = ObjectKey::parse(text).map_err(|e| malformed("digest", e.to_string()))?;
                pairs.push((key, ResourceVersion(buf.get_u64())));
            }
            Up::Digest(pairs)
        }
        "refetch" => Up::Refetch {
            key: key("refetch", &parts)?,
        },
        operation @ ("report" | "report-patch") => {
            let name = if operation == "report" {
                "report"
            } else {
                "report-patch"
            };
            if parts.content.len() < 8 {
                return Err(malformed(name, "content shorter than its id"));
            }
            let id = parts.content.clone().get_u64();
            let body = parts.content.slice(8..);
            let patch = operation == "report-patch";
            if patch && body.is_empty() {
                return Err(malformed(name, "an empty patch"));
            }
            Up::Report(Report {
                id,
                key: key(name, &parts)?,
                base: rv(name, &parts)?,
                object: if patch { Bytes::new() } else { body.clone() },
                patch: patch.then_some(body),
            })
        }
        other => return Err(WireError::UnknownOperation(other.to_owned())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use transport::frame::Frame;

    fn received(encoded: &EncodedMessage) -> ReceivedMessage {
        Frame::validate(encoded.body().clone())
            .expect("valid frame")
            .into_message()
            .expect("a message frame")
    }

    fn k(s: &str) -> ObjectKey {
        ObjectKey::parse(s).unwrap()
    }

    #[test]
    fn down_round_trips_and_upserts_are_shared() {
        let change = Arc::new(Change::new(
            Revision(9),
            k("pods/default/p"),
            ResourceVersion(7),
            ChangeKind::Added,
            Bytes::from_static(b"{\"a\":1}"),
        ));
        let a = encode_down(&Down::Upsert(change.clone()));
        let b = encode_down(&Down::Upsert(change.clone()));
        assert_eq!(
            a.body().as_ptr(),
            b.body().as_ptr(),
            "one encoding per change"
        );
        let messages = [
            Down::Upsert(change),
            Down::Session(SessionId {
                epoch: 5,
                number: 2,
            }),
            Down::Delete {
                key: k("configmaps/ns/c"),
                rv: ResourceVersion(11),
            },
            Down::Bump {
                key: k("pods/ns/p"),
                base: ResourceVersion(3),
                rv: ResourceVersion(12),
            },
            Down::DigestRequest,
            Down::HelloRequest,
            Down::ReportAck { through: 44 },
        ];
        for down in messages {
            let r = received(&encode_down(&down));
            let back = decode_down(Parts::of(&r)).unwrap();
            assert_eq!(
                format!("{back:?}")
                    .replace("revision: Revision(0)", "revision: Revision(9)")
                    .replace("Modified", "Added"),
                format!("{down:?}")
            );
        }
    }

    #[test]
    fn up_round_trips() {
        let messages = [
            Up::Hello(Hello {
                store_id: 1,
                applied: Some(Watermark {
                    session: SessionId {
                        epoch: 2,
                        number: 3,
                    },
                    count: 4,
                }),
                objects: 5,
                digest: 6,
            }),
            Up::Hello(Hello {
                store_id: 1,
                applied: None,
                objects: 0,
                digest: 0,
            }),
            Up::Ack {
                session: SessionId {
                    epoch: 2,
                    number: 3,
                },
                count: 99,
            },
            Up::Digest(vec![
                (k("pods/a/b"), ResourceVersion(1)),
                (k("nodes//n"), ResourceVersion(2)),
            ]),
            Up::Refetch { key: k("pods/a/b") },
            Up::Report(Report {
                id: 7,
                key: k("pods/a/b"),
                base: ResourceVersion(3),
                object: Bytes::from_static(b"{}"),
                patch: None,
            }),
            Up::Report(Report {
                id: 8,
                key: k("pods/a/b"),
                base: ResourceVersion(3),
                object: Bytes::new(),
                patch: Some(Bytes::from_static(b"{\"status\":{\"message\":\"m\"}}")),
            }),
        ];
        for up in messages {
            let r = received(&encode_up(&up));
            assert_eq!(decode_up(Parts::of(&r)).unwrap(), up);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let bad = |op: &str, resource: &str, rv: &str, content: &'static [u8]| Parts {
            group: GROUP,
            operation: Box::leak(op.to_owned().into_boxed_str()),
            resource: Box::leak(resource.to_owned().into_boxed_str()),
            resource_version: rv.to_owned().into(),
            content: Bytes::from_static(content),
        };
        assert!(decode_down(bad("upsert", "no-slashes", "1", b"")).is_err());
        assert!(decode_down(bad("upsert", "pods/a/b", "x", b"")).is_err());
        assert!(decode_down(bad("session", "", "", b"short")).is_err());
        assert!(decode_down(bad("teleport", "", "", b"")).is_err());
        assert!(decode_up(bad("digest", "", "", b"\x00\x00\x00\xffabc")).is_err());
        assert!(decode_up(bad("report", "pods/a/b", "1", b"1234")).is_err());
        assert!(decode_up(bad("hello", "", "", b"")).is_err());
        let mut other = bad("hello", "", "", b"");
        other.group = "resource";
        assert!(matches!(decode_up(other), Err(WireError::NotSync(_))));
    }
}
