//! lb's benchmarks. The criterion micro-benchmarks are in `benches/micro.rs`
//! (`cargo bench -p lb-benches --bench micro`).
