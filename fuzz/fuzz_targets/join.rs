//! `cargo fuzz run join` (in fuzz/, with RUSTC_BOOTSTRAP=1 on stable): see [`kedge_fuzz::join`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kedge_fuzz::join(data));
