//! End-to-end test helpers for lb: real backend servers on loopback, a guard around a running
//! `lb-daemon`, small clients, and the checks the tests and the demo share.
//!
//! Every helper owns what it starts and releases it on drop, also when a test panics: servers
//! close their sockets and join their threads, a [`daemon::Daemon`] is killed and reaped. Every
//! wait is bounded in time, every loop in count. Traffic only ever goes to 127.0.0.0/8.
//!
//! Environment:
//! - `LB_DAEMON_BIN`: the `lb-daemon` to test (set by `cargo xtask test`); unset, the first
//!   daemon a test process starts runs `cargo build -p lb-daemon` first.
//! - `LB_DAEMON_RUST_LOG`: the daemon's `RUST_LOG` (default `info`; the tests read its log).
//! - `LB_TEST_ECHO_DAEMON=1`: copy the daemon's log to stderr as it comes.
//! - `LB_REQUIRE_PRIVILEGED=1`: tests that need root fail instead of skipping.
#![deny(missing_docs)]

pub mod admin;
pub mod backend;
pub mod client;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod data;
mod http_wire;
pub mod load;
pub mod netns;
pub mod packet;
pub mod ports;
pub mod privileged;
pub mod tally;
pub mod threads;
pub mod xdp;

pub use backend::{HashServer, HttpNameServer, SourceServer, TcpServer, UdpEcho};
pub use daemon::Daemon;
pub use ports::free_port;
pub use privileged::require_root;
pub use tally::Tally;
