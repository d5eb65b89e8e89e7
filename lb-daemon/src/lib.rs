//! `lb-daemon`: the control plane of the lb load balancer and its userspace data plane.
//!
//! Data flows one way: [`config`] -> [`service`] (health, rebuilds) -> [`snapshot`] ->
//! [`dataplane`]. The data planes never reach back into config parsing.
#![deny(missing_docs)]

pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod health;
pub mod maglev;
pub mod scheduler;
pub mod service;
pub mod snapshot;
