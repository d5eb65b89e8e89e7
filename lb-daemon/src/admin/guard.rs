//! Who may use the admin API: every request passes these checks before its route, in this
//! order (the first that fails answers):
//!
//! 1. `Host` (TCP only): `localhost`, a loopback address or the listen address, with or without
//!    a port; else 403. A web page that got a name of its own resolved to 127.0.0.1 (DNS
//!    rebinding) sends that name, so it cannot read `/status`.
//! 2. `Origin`, when the request has one: the API's own (`http://` and the request's `Host`);
//!    else 403. Browsers send it with every cross-site POST, so a page the operator opens
//!    cannot drain or reload the balancer (CSRF).
//! 3. The bearer token, when `[admin] token_file` sets one: `Authorization: Bearer <token>`;
//!    else 401.
//! 4. A POST's `Content-Type` must be `application/json`; else 415. A browser cannot send that
//!    type across sites without a CORS preflight, which this API never answers.
//!
//! Refusals are JSON `{"error": "..."}` like the API's other errors.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::control::Control;

/// Which listener a request came in on, and what the checks read from the daemon.
#[derive(Clone)]
pub struct Guard {
    /// The TCP address the API is bound to; `None` for the unix socket (no `Host` check:
    /// reaching the socket takes the file's permissions).
    pub tcp: Option<SocketAddr>,
    /// The running daemon, whose config holds the current token (a reload may change it).
    pub control: Arc<Control>,
}

/// The middleware: runs the checks of the module docs, then the route.
pub async fn check(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    let token = guard.control.admin_token();
    match refusal(
        request.method(),
        request.headers(),
        guard.tcp,
        token.as_deref(),
    ) {
        Some((code, why)) => {
            let mut response =
                (code, axum::Json(serde_json::json!({ "error": why }))).into_response();
            if code == StatusCode::UNAUTHORIZED {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
            }
            response
        }
        None => next.run(request).await,
    }
}

/// Why a request with `method` and `headers`, on the listener `tcp` (`None`: the unix socket),
/// is refused when the API's token is `token`: the status and the reason; `None` when it may
/// go on to its route.
pub fn refusal(
    method: &Method,
    headers: &HeaderMap,
    tcp: Option<SocketAddr>,
    token: Option<&str>,
) -> Option<(StatusCode, String)> {
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let host = text(header::HOST);
    if let Some(bound) = tcp {
        match host {
            Some(h) if host_allowed(h, bound) => {}
            Some(h) => {
                return Some((
                    StatusCode::FORBIDDEN,
                    format!(
                        "Host `{h}` is not this API's: use localhost, a loopback address or \
                         {bound}"
                    ),
                ))
            }
            None => return Some((StatusCode::FORBIDDEN, "no Host header".into())),
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let own = host.map(|h| format!("http://{h}"));
        if origin.to_str().ok() != own.as_deref() || own.is_none() {
            return Some((
                StatusCode::FORBIDDEN,
                "cross-origin requests are refused (the Origin is not this API's)".into(),
            ));
        }
    }
    if let Some(token) = token {
        let given = text(header::AUTHORIZATION)
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| same_secret(g.as_bytes(), token.as_bytes())) {
            return Some((
                StatusCode::UNAUTHORIZED,
                "a bearer token is required (Authorization: Bearer <[admin] token_file>)".into(),
            ));
        }
    }
    if method == Method::POST {
        let json = text(header::CONTENT_TYPE)
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Some((
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "a POST must have Content-Type: application/json".into(),
            ));
        }
    }
    None
}

/// Whether `host` (a `Host` header: a name or address, maybe with a port) names this API,
/// bound to `bound`: `localhost`, a loopback address, or the bound address itself; when bound
/// to a wildcard address, any address literal (a name is still refused: that is what DNS
/// rebinding sends).
fn host_allowed(host: &str, bound: SocketAddr) -> bool {
    let name = match host.parse::<SocketAddr>() {
        Ok(addr) => return ip_allowed(addr.ip(), bound),
        Err(_) => host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) {
                name
            } else {
                host
            }
        }),
    };
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) => ip_allowed(ip, bound),
        Err(_) => bare.eq_ignore_ascii_case("localhost"),
    }
}

fn ip_allowed(ip: IpAddr, bound: SocketAddr) -> bool {
    ip.is_loopback() || ip == bound.ip() || bound.ip().is_unspecified()
}

/// Compares two secrets in time that depends only on their lengths.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                header::HeaderName::from_bytes(k.as_bytes()).expect("a header name"),
                v.parse().expect("a header value"),
            );
        }
        h
    }

    fn code(
        method: Method,
        pairs: &[(&str, &str)],
        tcp: Option<&str>,
        token: Option<&str>,
    ) -> Option<u16> {
        let tcp = tcp.map(|t| t.parse().expect("literal"));
        refusal(&method, &headers(pairs), tcp, token).map(|(c, _)| c.as_u16())
    }

    const API: Option<&str> = Some("127.0.0.1:9100");
    const JSON: (&str, &str) = ("content-type", "application/json");

    #[test]
    fn a_cross_site_post_is_forbidden_and_a_local_one_passes() {
        let csrf = [
            ("host", "127.0.0.1:9100"),
            ("origin", "http://attacker.example"),
            ("content-type", "text/plain"),
        ];
        assert_eq!(code(Method::POST, &csrf, API, None), Some(403));
        let own = [
            ("host", "127.0.0.1:9100"),
            ("origin", "http://127.0.0.1:9100"),
            JSON,
        ];
        assert_eq!(code(Method::POST, &own, API, None), None);
        assert_eq!(
            code(Method::POST, &[("host", "localhost:9100"), JSON], API, None),
            None
        );
        assert_eq!(
            code(
                Method::POST,
                &[("host", "localhost"), ("content-type", "text/plain")],
                API,
                None
            ),
            Some(415)
        );
        assert_eq!(
            code(
                Method::POST,
                &[
                    ("host", "[::1]:9100"),
                    ("content-type", "application/json; charset=utf-8")
                ],
                API,
                None
            ),
            None
        );
    }

    #[test]
    fn a_rebound_name_cannot_read_the_status() {
        for host in ["evil.example", "evil.example:9100", "127.0.0.1.nip.io:9100"] {
            assert_eq!(
                code(Method::GET, &[("host", host)], API, None),
                Some(403),
                "{host}"
            );
        }
        assert_eq!(code(Method::GET, &[], API, None), Some(403), "no Host");
        // The unix socket checks no Host.
        assert_eq!(code(Method::GET, &[("host", "lb-admin")], None, None), None);
        // On a wildcard listen any address literal is this host's, a name is not.
        let any = Some("0.0.0.0:9100");
        assert_eq!(
            code(Method::GET, &[("host", "10.1.2.3:9100")], any, Some("t")),
            Some(401)
        );
        assert_eq!(
            code(Method::GET, &[("host", "lb.example:9100")], any, Some("t")),
            Some(403)
        );
    }

    #[test]
    fn the_token_is_required_when_set() {
        let ok = [
            ("host", "127.0.0.1:9100"),
            ("authorization", "Bearer s3cret"),
        ];
        assert_eq!(code(Method::GET, &ok, API, Some("s3cret")), None);
        let wrong = [
            ("host", "127.0.0.1:9100"),
            ("authorization", "Bearer s3cre7"),
        ];
        assert_eq!(code(Method::GET, &wrong, API, Some("s3cret")), Some(401));
        assert_eq!(
            code(
                Method::GET,
                &[("host", "127.0.0.1:9100")],
                API,
                Some("s3cret")
            ),
            Some(401)
        );
        assert!(!same_secret(b"abc", b"abcd"));
    }
}
