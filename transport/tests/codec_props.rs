//! Property tests: any message survives framing, however the byte stream is split, and no
//! input makes the decoder panic or allocate past its limit.

use bytes::BytesMut;
use proptest::prelude::*;
use transport::frame::{encode_body, put_frame, ArchivedEnvelope, Envelope, FrameDecoder};
use transport::{Header, Message, Route};

fn message() -> impl Strategy<Value = Message> {
    let text = || ".{0,40}";
    (
        (text(), text(), any::<i64>(), text(), any::<bool>()),
        (text(), text(), text(), text()),
        proptest::collection::vec(any::<u8>(), 0..4096),
    )
        .prop_map(
            |(
                (id, parent_id, timestamp, resource_version, sync),
                (source, group, operation, resource),
                content,
            )| Message {
                header: Header {
                    id,
                    parent_id,
                    timestamp,
                    resource_version,
                    sync,
                },
                route: Route {
                    source,
                    group,
                    operation,
                    resource,
                },
                content: content.into(),
            },
        )
}

proptest! {
    #[test]
    fn messages_round_trip_through_any_split(messages in proptest::collection::vec(message(), 1..6), cuts in proptest::collection::vec(any::<usize>(), 0..8)) {
        let mut wire = BytesMut::new();
        for m in &messages {
            put_frame(&mut wire, &encode_body(&Envelope::Message(m)));
        }
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (wire.len() + 1)).collect();
        cuts.push(0);
        cuts.push(wire.len());
        cuts.sort_unstable();
        let mut decoder = FrameDecoder::new(1 << 20);
        let mut got = Vec::new();
        for pair in cuts.windows(2) {
            let mut input = &wire[pair[0]..pair[1]];
            while let Some(frame) = decoder.decode(&mut input).unwrap() {
                got.push(frame.into_message().unwrap().to_message());
            }
        }
        decoder.finish().unwrap();
        prop_assert_eq!(got, messages);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut decoder = FrameDecoder::new(4096);
        let mut input = &bytes[..];
        // Either frames, a clean error, or a need for more bytes; never a panic.
        while let Ok(Some(frame)) = decoder.decode(&mut input) {
            let _ = frame.kind();
            if let ArchivedEnvelope::Message(m) = frame.envelope() {
                let _ = m.route.resource.as_str();
            }
        }
    }
}
