//! The admin HTTP API, served with axum on the control plane's tokio runtime.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /status` | JSON [`Status`](crate::admin::status::Status): services, backends, health, weights, counters |
//! | `GET /metrics` | Prometheus text exposition (see [`super::metrics`]) |
//! | `POST /services/{service}/backends/{backend}/drain` | no new flows to the backend |
//! | `POST /services/{service}/backends/{backend}/enable` | ends a drain |
//! | `POST /services/{service}/backends/{backend}/weight` with body `{"weight": N}` | sets the weight |
//! | `POST /reload` | re-reads the config file; 200 with what changed, 422 with why it was refused |
//! | `POST /node/drain` | withdraws every announced VIP (`[announce]`) and announces none until `/node/enable`; answers once the routes are gone, with [`AnnounceStatus`](crate::announce::AnnounceStatus) |
//! | `POST /node/enable` | ends a node drain: VIPs are announced again as they can be served |
//!
//! Errors are JSON `{"error": "..."}` with 404 (no such service or backend), 400 (bad
//! address or weight) or 409 (a backend that is being removed, a node drain without
//! `[announce]`); before its route a request
//! may get 403, 401 or 415 from [`super::guard`].

use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tracing::info;

use crate::config::Admin;
use crate::control::Control;
use crate::service::AdminError;

/// Why the admin API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The TCP address could not be bound (in use, not local).
    #[error("admin API: cannot listen on {addr}: {source}")]
    Listen {
        /// `[admin] listen`.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The unix socket could not be created.
    #[error("admin API: cannot listen on unix socket {path}: {source}")]
    Socket {
        /// `[admin] socket`.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The API's routes over `control`.
pub fn router(control: Arc<Control>) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/reload", post(reload))
        .route("/services/{service}/backends/{backend}/drain", post(drain))
        .route(
            "/services/{service}/backends/{backend}/enable",
            post(enable),
        )
        .route(
            "/services/{service}/backends/{backend}/weight",
            post(weight),
        )
        .route("/node/drain", post(drain_node))
        .route("/node/enable", post(enable_node))
        .with_state(control)
}

/// [`router`] behind the checks of [`super::guard`], for the listener `tcp` (the bound TCP
/// address, `None` for the unix socket).
pub fn guarded(control: Arc<Control>, tcp: Option<SocketAddr>) -> Router {
    let guard = super::guard::Guard {
        tcp,
        control: Arc::clone(&control),
    };
    router(control).layer(axum::middleware::from_fn_with_state(
        guard,
        super::guard::check,
    ))
}

/// Binds the admin addresses and serves the API on the current tokio runtime until the
/// returned tasks are aborted. Returns the bound TCP address (the real port when the config
/// says 0; `None` with `listen = ""`) and the server tasks.
///
/// The unix socket is created mode 0660 and given `[admin] group` when set; a stale socket
/// file left by an earlier run is replaced. A daemon taking over from another (`inherited`)
/// binds it at a path of its own, which [`Served::pending`] moves to the configured one once
/// this daemon is ready: until then the path is the old daemon's, which goes on if this one
/// stops first.
///
/// Returns `Err(ApiError::Listen)` when the TCP address cannot be bound,
/// `Err(ApiError::Socket)` when the socket cannot be created, chmod-ed or chown-ed.
pub async fn serve(
    control: Arc<Control>,
    admin: &Admin,
    inherited: Option<&crate::handover::Inherited>,
) -> Result<Served, ApiError> {
    let mut tasks = Vec::new();
    let mut bound = None;
    let mut socket = None;
    if let Some(listen) = admin.listen {
        let listen_err = |source| ApiError::Listen {
            addr: listen,
            source,
        };
        // The daemon this one replaces still listens there: its listener is taken over.
        let listener = match inherited.and_then(|i| i.take_named(listen, ADMIN_SOCKET, 0)) {
            Some(fd) => {
                let std = std::net::TcpListener::from(fd);
                std.set_nonblocking(true).map_err(listen_err)?;
                tokio::net::TcpListener::from_std(std).map_err(listen_err)?
            }
            None => tokio::net::TcpListener::bind(listen)
                .await
                .map_err(listen_err)?,
        };
        {
            use std::os::fd::AsFd;
            socket = Some(listener.as_fd().try_clone_to_owned().map_err(listen_err)?);
        }
        let addr = listener.local_addr().map_err(listen_err)?;
        let app = guarded(Arc::clone(&control), Some(addr));
        tasks.push(tokio::spawn(super::serve::tcp(
            listener,
            app,
            addr.to_string(),
        )));
        info!("admin API listening on http://{addr}");
        bound = Some(addr);
    }
    let mut pending = None;
    if let Some(path) = &admin.socket {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".upgrade-{}", std::process::id()));
        let beside = path.with_file_name(name);
        // A unix socket's path holds at most 107 bytes: a longer one is bound in place, as
        // before (a stopped upgrade then takes the old daemon's path away).
        let at = match inherited {
            Some(_) if beside.as_os_str().len() <= crate::config::MAX_SOCKET_PATH => {
                // Made first: it removes the path whatever fails after the bind.
                pending = Some(PendingSocket {
                    at: beside.clone(),
                    path: path.clone(),
                    published: false,
                });
                beside
            }
            Some(_) => {
                tracing::warn!(
                    "admin API: {} is too long for a temporary path beside it; bound in place \
                     (a stopped upgrade then leaves the old daemon without it)",
                    path.display()
                );
                path.clone()
            }
            None => path.clone(),
        };
        let unix = bind_socket(&at, admin.group.as_ref().map(|g| g.gid))?;
        let app = guarded(control, None);
        tasks.push(tokio::spawn(super::serve::unix(
            unix,
            app,
            path.display().to_string(),
        )));
        match &pending {
            Some(_) => info!(
                "admin API listening on unix socket {}, moved to {} once this daemon is ready",
                at.display(),
                path.display()
            ),
            None => info!("admin API listening on unix socket {}", path.display()),
        }
    }
    Ok(Served {
        addr: bound,
        tasks,
        socket,
        pending,
    })
}

/// The kind [`crate::handover`] names the admin API's TCP listener by.
pub const ADMIN_SOCKET: &str = "admin";

/// What [`serve`] started.
pub struct Served {
    /// The TCP address the API listens on (the port chosen when the config said 0).
    pub addr: Option<SocketAddr>,
    /// The listeners' tasks: abort them to stop serving.
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    /// A duplicate of the TCP listener, for an upgrade's hand-over.
    pub socket: Option<std::os::fd::OwnedFd>,
    /// The unix socket of a daemon taking over, still at a path of its own.
    pub pending: Option<PendingSocket>,
}

/// The admin API's unix socket bound beside its configured path (`[admin] socket`) by a
/// daemon taking over from another, whose socket the configured path still is. Dropped before
/// [`PendingSocket::publish`] (an upgrade stopped or failed before it was ready), it removes
/// its own path and leaves the old daemon's alone.
pub struct PendingSocket {
    /// Where the socket is bound now: the configured path with `.upgrade-<pid>` added.
    at: PathBuf,
    /// The configured path.
    path: PathBuf,
    published: bool,
}

impl PendingSocket {
    /// Moves the socket to its configured path (`rename(2)`, which replaces the old daemon's
    /// at once: a client finds one socket or the other, never none).
    ///
    /// Returns `Err(ApiError::Socket)` naming the configured path when the rename fails; the
    /// socket is then removed, and the API stays reachable over TCP only, if configured.
    pub fn publish(mut self) -> Result<(), ApiError> {
        self.published = true;
        std::fs::rename(&self.at, &self.path).map_err(|source| {
            let _ = std::fs::remove_file(&self.at);
            ApiError::Socket {
                path: self.path.clone(),
                source,
            }
        })
    }
}

impl Drop for PendingSocket {
    fn drop(&mut self) {
        use std::os::unix::fs::FileTypeExt;
        // Only a socket: something else there was refused by the bind, and is not ours.
        let socket = std::fs::symlink_metadata(&self.at).is_ok_and(|m| m.file_type().is_socket());
        if !self.published && socket {
            let _ = std::fs::remove_file(&self.at);
        }
    }
}

/// The unix socket at `path`, mode 0660, group `gid` when given; replaces a stale socket.
///
/// Returns `Err(ApiError::Socket)` when `path` cannot be bound, or names something other than
/// a socket (a mistyped path to a file is not deleted).
fn bind_socket(path: &FsPath, gid: Option<u32>) -> Result<tokio::net::UnixListener, ApiError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let socket_err = |source| ApiError::Socket {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(socket_err)?,
        Ok(_) => {
            return Err(socket_err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket: not replaced",
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_err(e)),
    }
    let unix = tokio::net::UnixListener::bind(path).map_err(socket_err)?;
    if let Some(gid) = gid {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
            .map_err(|e| socket_err(e.into()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(socket_err)?;
    Ok(unix)
}

/// Runs `f` on tokio's blocking pool: reading the counters takes std mutexes (the XDP
/// plane's, held by its sync thread during a table write) and one syscall per counter, and
/// the control plane's runtime has one thread, which must stay free for health checks,
/// signals and the other requests.
async fn off_runtime<T: Send + 'static>(
    control: Arc<Control>,
    f: impl FnOnce(&Control) -> T + Send + 'static,
) -> Result<T, Response> {
    tokio::task::spawn_blocking(move || {
        // A pool thread started before the daemon lowered its privileges.
        crate::privileges::follow();
        f(&control)
    })
    .await
    .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn status(State(control): State<Arc<Control>>) -> Response {
    match off_runtime(control, Control::status).await {
        Ok(status) => Json(status).into_response(),
        Err(response) => response,
    }
}

async fn metrics(State(control): State<Arc<Control>>) -> Response {
    let rendered = match off_runtime(control, super::metrics::render).await {
        Ok(r) => r,
        Err(response) => return response,
    };
    match rendered {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn reload(State(control): State<Arc<Control>>) -> Response {
    match crate::reload::reload(&control).await {
        Ok(summary) => Json(serde_json::json!({ "applied": summary })).into_response(),
        Err(why) => error(StatusCode::UNPROCESSABLE_ENTITY, why.to_string()),
    }
}

async fn drain(
    State(control): State<Arc<Control>>,
    Path((service, backend)): Path<(String, String)>,
) -> Response {
    admin_call(control, service, backend, |s, b| s.drain(b)).await
}

async fn enable(
    State(control): State<Arc<Control>>,
    Path((service, backend)): Path<(String, String)>,
) -> Response {
    admin_call(control, service, backend, |s, b| s.enable(b)).await
}

async fn drain_node(State(control): State<Arc<Control>>) -> Response {
    let Some(announcer) = control.announcer().cloned() else {
        return no_announce();
    };
    announcer.drain_node(&control).await;
    Json(announcer.status()).into_response()
}

async fn enable_node(State(control): State<Arc<Control>>) -> Response {
    let Some(announcer) = control.announcer().cloned() else {
        return no_announce();
    };
    announcer.enable_node(&control).await;
    Json(announcer.status()).into_response()
}

fn no_announce() -> Response {
    error(
        StatusCode::CONFLICT,
        "the config has no [announce]: this node announces nothing to drain".into(),
    )
}

/// The weight a `POST .../weight` body asks for: `{"weight": N}`. `Err` says what is wrong
/// with any other body (the range is checked when the weight is set).
pub fn weight_of(body: &[u8]) -> Result<u32, String> {
    serde_json::from_slice::<WeightBody>(body)
        .map(|w| w.weight)
        .map_err(|e| format!("the body must be {{\"weight\": N}} with N in 0..=256: {e}"))
}

/// `POST .../weight` body.
#[derive(serde::Deserialize)]
struct WeightBody {
    weight: u32,
}

async fn weight(
    State(control): State<Arc<Control>>,
    Path((service, backend)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let weight = match weight_of(&body) {
        Ok(w) => w,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    admin_call(control, service, backend, move |s, b| {
        s.set_weight(b, weight)
    })
    .await
}

/// Runs `call` on backend `backend` of service `service` and answers with the service's
/// status. Off the runtime ([`off_runtime`]): the call rebuilds the service's scheduler, a
/// Maglev table of up to `table_size` slots.
async fn admin_call(
    control: Arc<Control>,
    service: String,
    backend: String,
    call: impl FnOnce(&crate::service::ServiceRuntime, SocketAddr) -> Result<(), AdminError>
        + Send
        + 'static,
) -> Response {
    let result = off_runtime(control, move |control| {
        let s = control
            .services()
            .by_name(&service)
            .ok_or_else(|| AdminError::NoService(service.clone()))?;
        let addr: SocketAddr = (backend.parse()).map_err(|_| AdminError::BadAddress(backend))?;
        call(&s, addr)?;
        Ok::<_, AdminError>(s.status())
    })
    .await;
    let result = match result {
        Ok(r) => r,
        Err(response) => return response,
    };
    match result {
        Ok(status) => Json(status).into_response(),
        Err(e) => {
            let code = match e {
                AdminError::NoService(_) | AdminError::NoBackend { .. } => StatusCode::NOT_FOUND,
                AdminError::Weight(_) | AdminError::BadAddress(_) => StatusCode::BAD_REQUEST,
                AdminError::Removing(_) => StatusCode::CONFLICT,
            };
            error(code, e.to_string())
        }
    }
}

fn error(code: StatusCode, message: String) -> Response {
    (code, Json(serde_json::json!({ "error": message }))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_socket_path_replaces_a_stale_socket_and_never_a_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let stale = dir.path().join("admin.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
        assert!(stale.exists(), "a closed listener leaves its socket file");
        bind_socket(&stale, None).expect("a stale socket is replaced");

        let file = dir.path().join("lb.toml");
        std::fs::write(&file, "keep me").expect("write");
        let refused = bind_socket(&file, None).map(drop);
        assert!(
            matches!(refused, Err(ApiError::Socket { .. })),
            "a regular file at the socket path was taken: {refused:?}"
        );
        assert_eq!(std::fs::read_to_string(&file).expect("read"), "keep me");
    }
}
