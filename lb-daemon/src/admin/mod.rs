//! The admin API (`[admin] listen`, default 127.0.0.1:9100, and/or a unix socket), behind the
//! checks of `guard.rs` (Host, Origin, token, JSON POSTs) and the bounds of `serve.rs`:
//! status, Prometheus metrics, drain/enable/weight of a backend, reload; and the
//! `lb-daemon status|drain|enable|weight|reload` client of it.

pub mod api;
pub mod client;
pub mod guard;
pub mod metrics;
pub mod serve;
pub mod stall;
pub mod status;
