//! `cargo fuzz run frame_decoder` (in fuzz/, with RUSTC_BOOTSTRAP=1 on stable): see [`kedge_fuzz::frame_decoder`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kedge_fuzz::frame_decoder(data));
