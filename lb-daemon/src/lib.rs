//! `lb-daemon`: the control plane of the lb load balancer and its userspace data plane.
//!
//! Data flows one way: [`config`] -> [`service`] (health, rebuilds) -> [`snapshot`] ->
//! [`dataplane`]. The data planes never reach back into config parsing.
#![deny(missing_docs)]

pub mod admin;
pub mod announce;
pub mod backend_stats;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod discovery;
pub mod fuzzing;
pub mod handover;
pub mod health;
pub mod heap;
pub mod host_addrs;
pub mod log_writer;
pub mod maglev;
pub mod notify;
pub mod placement;
pub mod priority;
pub mod privileges;
pub mod reload;
pub mod scheduler;
pub mod service;
pub mod shortage;
pub mod snapshot;
pub mod watchdog;
