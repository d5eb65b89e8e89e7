//! The admin API (`[admin] listen`, default 127.0.0.1:9100, and optionally a unix socket):
//! status, Prometheus metrics, drain/enable/weight of a backend, reload; and the
//! `lb-daemon status|drain|enable|weight|reload` client of it.

pub mod api;
pub mod client;
pub mod metrics;
pub mod status;
