//! Feeds arbitrary bytes to the frame decoder, split into chunks as a network would, and reads
//! every field of every frame that validates. Any panic, over-read or unbounded allocation is a
//! bug. Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run frame_decoder` in transport/.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transport::frame::{ArchivedEnvelope, FrameDecoder};

fuzz_target!(|data: &[u8]| {
    // The first byte chooses the chunk size, so the fuzzer explores frame boundaries too.
    let Some((&chunk, rest)) = data.split_first() else { return };
    let chunk = usize::from(chunk).max(1);
    let mut decoder = FrameDecoder::new(64 * 1024);
    for part in rest.chunks(chunk) {
        let mut input = part;
        loop {
            match decoder.decode(&mut input) {
                Ok(Some(frame)) => match frame.envelope() {
                    ArchivedEnvelope::Message(_) => {
                        let message = frame.into_message().expect("a Message frame");
                        let owned = message.to_message();
                        assert_eq!(owned.content, message.content());
                    }
                    ArchivedEnvelope::Hello(h) => {
                        let _ = (h.protocol_version, h.send_epoch, h.recv_epoch, h.recv_acked);
                    }
                    ArchivedEnvelope::Ack(_)
                    | ArchivedEnvelope::Heartbeat
                    | ArchivedEnvelope::StreamStart(_) => {}
                },
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = decoder.finish();
});
