//! `cargo fuzz run protobuf_body` (in fuzz/, with RUSTC_BOOTSTRAP=1 on stable): see [`kedge_fuzz::protobuf_body`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kedge_fuzz::protobuf_body(data));
