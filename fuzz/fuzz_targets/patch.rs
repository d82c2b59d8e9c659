//! `cargo fuzz run patch` (in fuzz/, with RUSTC_BOOTSTRAP=1 on stable): see [`kedge_fuzz::patch`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kedge_fuzz::patch(data));
