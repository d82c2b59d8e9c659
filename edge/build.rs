//! edgecore's link: sections with a name prefix the compilers use for code that runs once or
//! rarely (`.text.startup`: C++ static initializers, hundreds of them in RocksDB;
//! `.text.unlikely`: cold paths) are kept together instead of interleaved with the rest, so
//! that starting the process maps far fewer pages of the binary into memory
//! (BENCHMARKS.md "edgecore idle memory").
//!
//! It also generates DMI's gRPC messages and services (`proto/dmi/v1beta1/api.proto`,
//! KubeEdge's device management interface) with `protoc`, as k8s-cri's build does for CRI.
fn main() {
    println!("cargo:rerun-if-changed=proto/dmi/v1beta1/api.proto");
    // Maps as BTreeMaps: a message encodes to the same bytes every time, which the digest of
    // what a mapper was told relies on (HashMap order differs per instance).
    if let Err(e) = tonic_prost_build::configure()
        .btree_map(".")
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/dmi/v1beta1/api.proto"], &["proto"])
    {
        panic!("cannot generate DMI's gRPC code from proto/dmi/v1beta1/api.proto (is protoc installed?): {e}");
    }
    // An ELF linker option (lld, and GNU ld since 2.31).
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg-bin=edgecore=-Wl,-z,keep-text-section-prefix");
    }
}
