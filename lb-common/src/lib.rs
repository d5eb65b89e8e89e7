//! Types and functions shared by the XDP program (`lb-ebpf`) and the daemon (`lb-daemon`).
//!
//! `no_std` so the BPF program can use it. Every type that crosses into a BPF map is
//! `#[repr(C)]` with its padding written out as named fields that callers zero, so the
//! kernel's byte-wise key comparison never sees stray bytes. [`maps`] is the map contract
//! between the two sides; with the `user` feature the map types implement `aya::Pod`.
#![no_std]
#![deny(missing_docs)]

pub mod flow;
pub mod maps;
pub mod stats;

pub use flow::{flow_hash, FlowKey};
pub use stats::{Counters, Stat, STATS_LEN};
