//! `cargo fuzz run mqtt` (in fuzz/, with RUSTC_BOOTSTRAP=1 on stable): see [`kedge_fuzz::mqtt`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kedge_fuzz::mqtt(data));
