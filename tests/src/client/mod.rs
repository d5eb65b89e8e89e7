//! Small clients that talk to a VIP the way users' programs would: one TCP connection per
//! HTTP request, uploads and downloads with receipts, UDP request/reply. All have timeouts.

mod http;
mod tcp;
mod udp;

pub use http::{http_get, http_get_from, HttpConnection};
pub use tcp::{connect, connect_from, download, upload, Upload};
pub use udp::{learnt_path_mtu, udp_request, UdpClient};

use std::io;
use std::time::Duration;

/// How long a connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long any one read or write may block.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a request through the balancer failed, in the terms a user would report it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The TCP connect failed (refused, timed out).
    #[error("connect failed: {0}")]
    Connect(#[source] io::Error),
    /// Reading or writing failed after the connect (reset, timeout, early close).
    #[error("connection failed: {0}")]
    Io(#[from] io::Error),
    /// The peer answered, but not with what the protocol says.
    #[error("bad response: {0}")]
    BadResponse(String),
    /// The HTTP status was not 200.
    #[error("HTTP status {0}")]
    Status(u16),
}
