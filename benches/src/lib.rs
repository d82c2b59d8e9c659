//! Criterion benchmarks of each layer, always beside a baseline measured in the same run
//! (see `benches/benches/*.rs` and BENCHMARKS.md). This library holds the shared fixtures:
//! a realistic pod object and the KubeEdge message that carries it.

pub mod fixtures;
pub mod kubeedge;
