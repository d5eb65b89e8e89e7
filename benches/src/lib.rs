//! lb's benchmarks.
//!
//! - The criterion micro-benchmarks are in `benches/micro.rs`
//!   (`cargo bench -p lb-benches --bench micro`).
//! - `lb-bench` (`src/bin/lb-bench.rs`, run by `cargo xtask bench`) is the side-by-side
//!   throughput harness: it builds a namespace topology, starts real servers, and measures
//!   `direct`, lb's data planes, HAProxy and nginx on the same backends. Its pure parts
//!   ([`stats`], [`metric`], [`report`], [`chart`]) are unit-tested; the rest needs root.
#![deny(missing_docs)]

pub mod balancer;
pub mod chart;
pub mod client;
pub mod harness;
pub mod metric;
pub mod procstat;
pub mod program_cost;
pub mod program_time;
pub mod report;
pub mod restore;
pub mod server;
pub mod stats;
pub mod stop;
pub mod tc;
pub mod topology;
pub mod xdp;
