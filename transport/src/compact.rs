//! The compact form of a message (link protocol 3): the messages that make up nearly all of a
//! link's traffic, without the ~100 bytes a full [`Message`] archive spends on its header and
//! route strings.
//!
//! A message has a compact form when its route is in [`ROUTES`], a static table both sides
//! know (as HPACK's static table in RFC 7541, Appendix A), and its header carries nothing but a
//! resourceVersion: no id, no parent id, no timestamp, not `sync`. That is every message of
//! kedge's object sync (group `sync`), whose order comes from its stream. Anything else
//! (ServiceBus requests, KubeEdge-shaped messages with ids) keeps the full form.
//!
//! The payload of an [`Envelope::Compact`](crate::frame::Envelope::Compact) frame:
//!
//! ```text
//! route index (u8) ‖ resourceVersion + 1 (LEB128; 0 = none) ‖ resource length (LEB128)
//!     ‖ resource (UTF-8) ‖ content (the rest)
//! ```
//!
//! LEB128 is written here rather than taken from a crate: it is ten lines, and the decoder
//! must reject overlong and over-`u64` encodings exactly as this format says.

use std::ops::Range;

use crate::message::Message;

/// The routes with a compact form, `(source, group, operation)`, indexed by their code.
/// Append only: a code, once given, keeps its meaning (a new one needs a new protocol
/// version, since an older peer cannot read it).
pub const ROUTES: [(&str, &str, &str); 13] = [
    ("cloudcore", "sync", "upsert"),
    ("cloudcore", "sync", "delete"),
    ("cloudcore", "sync", "bump"),
    ("cloudcore", "sync", "session"),
    ("cloudcore", "sync", "digest-request"),
    ("cloudcore", "sync", "hello-request"),
    ("cloudcore", "sync", "report-ack"),
    ("edgecore", "sync", "report-patch"),
    ("edgecore", "sync", "report"),
    ("edgecore", "sync", "ack"),
    ("edgecore", "sync", "hello"),
    ("edgecore", "sync", "digest"),
    ("edgecore", "sync", "refetch"),
];

/// A compact payload, read: where its parts are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Parsed {
    /// Index into [`ROUTES`].
    pub route: u8,
    /// The resourceVersion, if the message has one.
    pub resource_version: Option<u64>,
    /// The resource's byte range in the payload (valid UTF-8).
    pub resource: Range<usize>,
    /// The content's byte range in the payload.
    pub content: Range<usize>,
}

/// The compact payload of `message`, or `None` when it has no compact form (see the module
/// docs).
pub(crate) fn encode(message: &Message) -> Option<Vec<u8>> {
    let h = &message.header;
    if !h.id.is_empty() || !h.parent_id.is_empty() || h.timestamp != 0 || h.sync {
        return None;
    }
    let resource_version = match h.resource_version.as_str() {
        "" => 0,
        text => {
            let v: u64 = text.parse().ok()?;
            // Only the canonical decimal form comes back as the same text.
            if v.to_string() != text || v == u64::MAX {
                return None;
            }
            v + 1
        }
    };
    let r = &message.route;
    let route = ROUTES.iter().position(|(source, group, operation)| {
        r.source == *source && r.group == *group && r.operation == *operation
    })?;
    let mut out = Vec::with_capacity(1 + 10 + 10 + r.resource.len() + message.content.len());
    out.push(route as u8);
    put_leb128(&mut out, resource_version);
    put_leb128(&mut out, r.resource.len() as u64);
    out.extend_from_slice(r.resource.as_bytes());
    out.extend_from_slice(&message.content);
    Some(out)
}

/// Reads a compact payload.
///
/// # Errors
/// A reason when the route index is not in [`ROUTES`], a number is truncated, overlong or
/// over `u64`, the resource runs past the end or is not UTF-8.
pub(crate) fn parse(payload: &[u8]) -> Result<Parsed, String> {
    let (&route, mut rest) = payload.split_first().ok_or("an empty compact message")?;
    if usize::from(route) >= ROUTES.len() {
        return Err(format!("unknown compact route {route}"));
    }
    let rv = get_leb128(&mut rest).ok_or("a malformed resourceVersion")?;
    let len = get_leb128(&mut rest).ok_or("a malformed resource length")?;
    let start = payload.len() - rest.len();
    let end = usize::try_from(len)
        .ok()
        .and_then(|len| start.checked_add(len))
        .filter(|end| *end <= payload.len())
        .ok_or("the resource runs past the message")?;
    std::str::from_utf8(&payload[start..end]).map_err(|_| "the resource is not UTF-8")?;
    Ok(Parsed {
        route,
        resource_version: rv.checked_sub(1),
        resource: start..end,
        content: end..payload.len(),
    })
}

fn put_leb128(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads one unsigned LEB128 number from the front of `input`; `None` when it is truncated,
/// longer than 10 bytes, over `u64::MAX` or not minimal (a trailing zero byte).
fn get_leb128(input: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (i, &byte) in input.iter().enumerate().take(10) {
        let bits = u64::from(byte & 0x7f);
        if i == 9 && bits > 1 {
            return None;
        }
        value |= bits << (7 * i);
        if byte & 0x80 == 0 {
            if i > 0 && byte == 0 {
                return None;
            }
            *input = &input[i + 1..];
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Header, Route};
    use proptest::prelude::*;

    fn sync(operation: &str, resource: &str, rv: &str, content: &[u8]) -> Message {
        Message {
            header: Header {
                resource_version: rv.into(),
                ..Header::default()
            },
            route: Route::new("edgecore", "sync", operation, resource),
            content: bytes::Bytes::copy_from_slice(content),
        }
    }

    #[test]
    fn a_status_patch_report_is_small() {
        let m = sync(
            "report-patch",
            "pods/default/web-7d4b9c-x2x9k",
            "123456",
            b"\0\0\0\0\0\0\x04\xd2{\"status\":{\"message\":\"round-1\"}}",
        );
        let payload = encode(&m).unwrap();
        // Route 1, version 3, length 1, the key and the content: 34 bytes more than the
        // content, where the full form's archive spends ~140.
        assert_eq!(payload.len(), 1 + 3 + 1 + 29 + m.content.len());
        let parsed = parse(&payload).unwrap();
        assert_eq!(ROUTES[usize::from(parsed.route)].2, "report-patch");
        assert_eq!(parsed.resource_version, Some(123_456));
        assert_eq!(
            &payload[parsed.resource.clone()],
            b"pods/default/web-7d4b9c-x2x9k"
        );
        assert_eq!(&payload[parsed.content.clone()], &m.content[..]);
    }

    #[test]
    fn messages_outside_the_table_or_with_ids_keep_the_full_form() {
        let mut m = sync("report", "pods/a/b", "1", b"{}");
        assert!(encode(&m).is_some());
        m.route.group = "bus".into();
        assert!(encode(&m).is_none(), "unknown route");
        let mut m = sync("report", "pods/a/b", "1", b"{}");
        m.header.id = "x".into();
        assert!(encode(&m).is_none(), "an id");
        let mut m = sync("report", "pods/a/b", "01", b"{}");
        assert!(encode(&m).is_none(), "a version that is not canonical");
        m.header.resource_version = "abc".into();
        assert!(encode(&m).is_none(), "a version that is not a number");
        m.header.resource_version = String::new();
        let parsed = parse(&encode(&m).unwrap()).unwrap();
        assert_eq!(parsed.resource_version, None);
    }

    #[test]
    fn malformed_payloads_are_refused() {
        for (payload, why) in [
            (&b""[..], "empty"),
            (&[200, 0, 0][..], "unknown route"),
            (&[0, 0x80][..], "truncated version"),
            (&[0, 0x80, 0x00, 0][..], "overlong version"),
            (&[0, 1, 5, b'a'][..], "resource past the end"),
            (&[0, 1, 1, 0xff][..], "resource not UTF-8"),
            (
                &[
                    0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0,
                ][..],
                "over u64",
            ),
        ] {
            assert!(parse(payload).is_err(), "{why}");
        }
    }

    proptest! {
        #[test]
        fn leb128_round_trips(v in any::<u64>()) {
            let mut out = Vec::new();
            put_leb128(&mut out, v);
            let mut input = &out[..];
            prop_assert_eq!(get_leb128(&mut input), Some(v));
            prop_assert!(input.is_empty());
        }

        #[test]
        fn parse_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse(&payload);
        }
    }
}
