//! `cargo fuzz run label_selector` (in fuzz/, with RUSTC_BOOTSTRAP=1 on stable): see [`kedge_fuzz::label_selector`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kedge_fuzz::label_selector(data));
