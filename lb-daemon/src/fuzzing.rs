//! The bodies of the fuzz targets in `fuzz/` (cargo-fuzz), kept in the library so that the
//! saved corpora run as ordinary tests too (`lb-daemon/tests/fuzz_corpus.rs`). Each takes any
//! bytes and panics only when a property below is broken.

use std::net::SocketAddr;
use std::path::Path;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};

use crate::config::MAX_DURATION;

/// A config file of any bytes: parsing and validation return a config or an error naming the
/// file, never panic; a config they accept keeps the validator's promises (named services,
/// each with a backend, names of `[A-Za-z0-9_.-]` up to 64, durations at most a year).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.toml");
    match crate::config::parse(text, path) {
        Ok(c) => {
            assert!(!c.services.is_empty());
            for s in &c.services {
                assert!(
                    !s.backends.is_empty() || !s.discovered.is_empty(),
                    "{}",
                    s.name
                );
                assert!((1..=64).contains(&s.name.len()), "{:?}", s.name);
                assert!(s
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)));
                for d in [s.connect_timeout, s.idle_timeout, s.health.interval] {
                    assert!(d <= MAX_DURATION, "{d:?}");
                }
            }
        }
        Err(e) => assert!(e.to_string().starts_with("fuzz.toml"), "{e}"),
    }
}

/// An admin request of any bytes, as the API's own code sees it before and after routing:
/// byte 0 picks the method, byte 1 the listener, byte 2 whether a token is set; then header
/// lines `name: value` up to a blank line, then a `weight` body. The checks of
/// [`crate::admin::guard`] answer only 401, 403 or 415, let a POST through only with a JSON
/// content type and a token-protected request only with the token; the body parser returns a
/// weight or a reason.
pub fn admin_request(data: &[u8]) {
    let [m, l, t, rest @ ..] = data else {
        return;
    };
    let method =
        [Method::GET, Method::POST, Method::PUT, Method::DELETE][usize::from(*m) % 4].clone();
    let tcp: Option<SocketAddr> = match l % 3 {
        0 => None,
        1 => Some(SocketAddr::from(([127, 0, 0, 1], 9100))),
        _ => Some(SocketAddr::from(([0, 0, 0, 0], 9100))),
    };
    let token = (t % 2 == 1).then_some("t0ken");
    let text = String::from_utf8_lossy(rest);
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let mut headers = HeaderMap::new();
    for line in head.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value.trim()),
        ) {
            headers.append(n, v);
        }
    }
    match crate::admin::guard::refusal(&method, &headers, tcp, token) {
        Some((code, why)) => {
            assert!([401, 403, 415].contains(&code.as_u16()), "{code}: {why}");
        }
        None => {
            if method == Method::POST {
                let ct = headers
                    .get(axum::http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                assert!(
                    ct.to_ascii_lowercase().contains("application/json"),
                    "{ct:?}"
                );
            }
            if token.is_some() {
                assert!(headers.get(axum::http::header::AUTHORIZATION).is_some());
            }
        }
    }
    let _ = crate::admin::api::weight_of(body.as_bytes());
}

/// The proxy's relay state machine driven by a simulated socket pair scripted by the bytes:
/// bytes out equal bytes in, nothing is asked after the end, one operation at a time (see
/// `dataplane/proxy/relay.rs`, `simulate`).
pub fn relay(data: &[u8]) {
    crate::dataplane::proxy::simulate_relay(data);
}
