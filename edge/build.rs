//! edgecore's link: sections with a name prefix the compilers use for code that runs once or
//! rarely (`.text.startup`: C++ static initializers, hundreds of them in RocksDB;
//! `.text.unlikely`: cold paths) are kept together instead of interleaved with the rest, so
//! that starting the process maps far fewer pages of the binary into memory
//! (BENCHMARKS.md "edgecore idle memory").
fn main() {
    // An ELF linker option (lld, and GNU ld since 2.31).
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg-bin=edgecore=-Wl,-z,keep-text-section-prefix");
    }
}
