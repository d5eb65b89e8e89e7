//! The admin API's accept loops: at most [`MAX_CONNECTIONS`] connections at a time (one over
//! it is closed at once). A request's header must arrive within [`HEADER_TIMEOUT`], its body
//! within [`BODY_TIMEOUT`](stall::BODY_TIMEOUT), and a response the client takes nothing of
//! for [`WRITE_STALL`] ends the connection ([`super::stall`]), so a client that opens
//! connections and then sends or reads nothing cannot hold the API, or the daemon's
//! descriptors. (One that reads a few bytes every few seconds still can: nothing bounds a
//! connection's whole life.)

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use super::stall::{self, WriteStall, WRITE_STALL};

/// Admin connections served at once; more are closed as they come.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request's header (and, between requests on a
/// kept-alive connection, the next one's).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (no descriptor left, say) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `app` on `listener` until the task is aborted; `label` names it in the log.
pub async fn tcp(listener: tokio::net::TcpListener, app: Router, label: String) {
    let app = app.layer(axum::middleware::from_fn(stall::whole_body));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => admit(stream, &app, &slots, &label),
            Err(e) => accept_failed(&label, &e).await,
        }
    }
}

/// Serves `app` on the unix socket `listener` until the task is aborted.
pub async fn unix(listener: tokio::net::UnixListener, app: Router, label: String) {
    let app = app.layer(axum::middleware::from_fn(stall::whole_body));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => admit(stream, &app, &slots, &label),
            Err(e) => accept_failed(&label, &e).await,
        }
    }
}

async fn accept_failed(label: &str, e: &std::io::Error) {
    warn!("admin API on {label}: accept failed: {e}");
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// Serves one connection if a slot is free; else closes it.
fn admit<IO>(io: IO, app: &Router, slots: &Arc<Semaphore>, label: &str)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match Arc::clone(slots).try_acquire_owned() {
        Ok(permit) => {
            tokio::spawn(connection(io, app.clone(), permit));
        }
        Err(_) => debug!(
            "admin API on {label}: {MAX_CONNECTIONS} connections are open; closing a new one"
        ),
    }
}

async fn connection<IO>(io: IO, app: Router, _slot: OwnedSemaphorePermit)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(
            TokioIo::new(WriteStall::new(io, WRITE_STALL)),
            TowerToHyperService::new(app),
        )
        .await;
    if let Err(e) = served {
        debug!("admin API connection ended: {e}");
    }
}
