//! The admin API's client, behind `lb-daemon status|drain|enable|weight|reload`.

use std::path::PathBuf;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

/// Why a request to the admin API failed (the daemon's own refusals are not errors here:
/// they come back as a [`Reply`] with their status).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The admin address could not be reached.
    #[error("cannot reach the admin API at {target}: {source} (is lb-daemon running, and is --admin its [admin] listen?)")]
    Connect {
        /// The address tried.
        target: String,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("admin API at {target}: {source}")]
    Http {
        /// The address tried.
        target: String,
        /// Why.
        source: hyper::Error,
    },
    /// The daemon did not answer within [`REQUEST_TIMEOUT`].
    #[error("admin API at {0}: no answer within {REQUEST_TIMEOUT:?}")]
    Timeout(String),
    /// The request could not be built (a path with characters a URI cannot hold).
    #[error("bad request: {0}")]
    Request(#[from] hyper::http::Error),
}

/// How long one admin request may take, connect to last byte.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// An answer of the admin API.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The HTTP status code.
    pub status: u16,
    /// The body, JSON or metrics text.
    pub body: String,
}

impl Reply {
    /// Whether the status is 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The `error` field of a JSON error body, or the body itself.
    pub fn error_message(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| self.body.trim().to_string())
    }
}

/// Sends one request to the admin API at `target` (`host:port`, or the path of the unix
/// socket when it starts with `/`) and reads the whole answer.
///
/// Returns `Err(ClientError::Connect)` when nothing answers at `target`,
/// `Err(ClientError::Http)` when the exchange breaks off, `Err(ClientError::Timeout)` after
/// [`REQUEST_TIMEOUT`].
pub async fn request(
    target: &str,
    method: Method,
    path: &str,
    body: Option<String>,
) -> Result<Reply, ClientError> {
    tokio::time::timeout(REQUEST_TIMEOUT, request_now(target, method, path, body))
        .await
        .map_err(|_| ClientError::Timeout(target.to_string()))?
}

async fn request_now(
    target: &str,
    method: Method,
    path: &str,
    body: Option<String>,
) -> Result<Reply, ClientError> {
    let connect_err = |source| ClientError::Connect {
        target: target.to_string(),
        source,
    };
    let http_err = |source| ClientError::Http {
        target: target.to_string(),
        source,
    };
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "lb-admin")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let (status, bytes) = if target.starts_with('/') {
        let stream = tokio::net::UnixStream::connect(PathBuf::from(target))
            .await
            .map_err(connect_err)?;
        exchange(TokioIo::new(stream), req)
            .await
            .map_err(http_err)?
    } else {
        let stream = tokio::net::TcpStream::connect(target)
            .await
            .map_err(connect_err)?;
        exchange(TokioIo::new(stream), req)
            .await
            .map_err(http_err)?
    };
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    })
}

async fn exchange<T>(io: T, req: Request<Full<Bytes>>) -> Result<(u16, Bytes), hyper::Error>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    let driver = tokio::spawn(conn);
    let res = sender.send_request(req).await?;
    let status = res.status().as_u16();
    let body = res.into_body().collect().await?.to_bytes();
    drop(sender);
    let _connection_closed = driver.await;
    Ok((status, body))
}

/// Percent-encodes a path segment (an IPv6 backend's brackets and colons, a service name's
/// spaces) so it reaches the API whole.
pub fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The `/status` JSON as a table for people: one block per service, one row per backend.
pub fn status_table(status: &serde_json::Value) -> String {
    use std::fmt::Write;
    let s = |v: &serde_json::Value, k: &str| -> String {
        match v.get(k) {
            Some(serde_json::Value::String(x)) => x.clone(),
            Some(serde_json::Value::Null) | None => "-".into(),
            Some(x) => x.to_string(),
        }
    };
    let n = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "data plane {}, config {}, up {}s, {} open, reloads {} applied / {} refused",
        s(status, "dataplane"),
        s(status, "config"),
        status
            .get("uptime_seconds")
            .and_then(|x| x.as_f64())
            .unwrap_or(0.0) as u64,
        n(status, "active"),
        status
            .pointer("/reloads/succeeded")
            .and_then(|x| x.as_u64())
            .unwrap_or(0),
        status
            .pointer("/reloads/failed")
            .and_then(|x| x.as_u64())
            .unwrap_or(0),
    );
    if let Some(last) = status.pointer("/reloads/last").and_then(|x| x.as_str()) {
        let _ = writeln!(out, "last reload: {last}");
    }
    if let Some(xdp) = status.get("xdp").filter(|x| !x.is_null()) {
        match xdp.get("error").and_then(|e| e.as_str()) {
            Some(e) => {
                let _ = writeln!(out, "XDP counters unreadable: {e}");
            }
            None => {
                let p = |k: &str| {
                    xdp.pointer(&format!("/packets/{k}"))
                        .and_then(|x| x.as_u64())
                };
                let total = |prefix: &str| -> u64 {
                    xdp.get("packets")
                        .and_then(|x| x.as_object())
                        .map(|m| {
                            m.iter()
                                .filter(|(k, _)| k.starts_with(prefix))
                                .filter_map(|(_, v)| v.as_u64())
                                .sum()
                        })
                        .unwrap_or(0)
                };
                let (drops, refused) = (total("drop_"), total("refused_"));
                let _ = writeln!(
                    out,
                    "XDP: {} packets, {} forwarded, {} NAT replies, {} passed to the kernel, \
                     {drops} dropped, {refused} refused by client limits",
                    p("packets").unwrap_or(0),
                    p("forwarded").unwrap_or(0),
                    p("nat_replies").unwrap_or(0),
                    p("pass_not_vip").unwrap_or(0) + p("fib_pass").unwrap_or(0),
                );
            }
        }
    }
    let empty = Vec::new();
    let listed = |key: &'static str| {
        status
            .get(key)
            .and_then(|x| x.as_array())
            .unwrap_or(&empty)
            .iter()
            .map(move |svc| (key, svc))
    };
    for (list, svc) in listed("services").chain(listed("removed_services")) {
        let _ = writeln!(
            out,
            "\n{}service {}  {}/{}  {}  table generation {}\n  {}",
            if list == "removed_services" {
                "removed by a reload, draining: "
            } else {
                ""
            },
            s(svc, "name"),
            s(svc, "listen"),
            s(svc, "protocol"),
            s(svc, "scheduler"),
            n(svc, "generation"),
            s(svc, "dataplane")
        );
        if let Some(x) = svc.get("xdp").filter(|x| !x.is_null()) {
            let _ = writeln!(
                out,
                "  XDP: {} flows started, {} packets, {}",
                n(x, "flows"),
                n(x, "packets"),
                human_bytes(n(x, "bytes"))
            );
        }
        let header = [
            "BACKEND",
            "ORIGIN",
            "HEALTH",
            "STATE",
            "WEIGHT",
            "EFFECTIVE",
            "ACTIVE",
            "TOTAL",
            "FAILED",
            "BYTES IN",
            "BYTES OUT",
            "LAST CHECK",
        ];
        let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
        for b in svc
            .get("backends")
            .and_then(|x| x.as_array())
            .unwrap_or(&empty)
        {
            rows.push(vec![
                s(b, "address"),
                s(b, "origin"),
                s(b, "health"),
                s(b, "state"),
                n(b, "weight").to_string(),
                n(b, "effective_weight").to_string(),
                n(b, "active").to_string(),
                n(b, "total").to_string(),
                n(b, "connect_failures").to_string(),
                human_bytes(n(b, "bytes_to_backend")),
                human_bytes(n(b, "bytes_from_backend")),
                s(b, "last_check"),
            ]);
        }
        let widths: Vec<usize> = (0..header.len())
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        for r in rows {
            let line: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            let _ = writeln!(out, "  {}", line.join("  ").trim_end());
        }
    }
    out
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_backends_are_encoded_for_the_path() {
        assert_eq!(path_segment("[::1]:80"), "%5B::1%5D:80");
        assert_eq!(path_segment("127.0.0.1:9001"), "127.0.0.1:9001");
    }

    #[test]
    fn the_table_has_a_row_per_backend() {
        let status = serde_json::json!({
            "dataplane": "proxy", "config": "/etc/lb/lb.toml", "uptime_seconds": 3.2, "active": 1,
            "reloads": {"succeeded": 1, "failed": 0, "last": null},
            "services": [{"name": "web", "listen": "127.0.0.1:8080", "protocol": "tcp",
                "scheduler": "maglev", "generation": 2, "backends": [
                {"address": "127.0.0.1:9001", "origin": "static", "health": "up", "state": "active",
                 "weight": 2, "effective_weight": 2, "active": 1, "total": 5, "connect_failures": 0,
                 "bytes_to_backend": 2048, "bytes_from_backend": 10, "last_check": "ok"}]}]
        });
        let t = status_table(&status);
        assert!(t.contains("service web  127.0.0.1:8080/tcp"), "{t}");
        assert!(
            !t.contains("XDP"),
            "a proxy-only daemon shows no XDP lines: {t}"
        );
        let row = t
            .lines()
            .find(|l| l.contains("127.0.0.1:9001"))
            .expect("a row for the backend");
        assert!(row.contains("2.0 KiB") && row.contains("ok"), "{row}");
    }

    #[test]
    fn xdp_figures_and_removed_services_are_shown() {
        let svc = |name: &str, xdp: serde_json::Value| {
            serde_json::json!({"name": name, "listen": "10.0.0.1:80", "protocol": "tcp",
                "scheduler": "maglev", "generation": 1, "dataplane": "XDP data plane (nat) on eth0 (native)",
                "xdp": xdp, "backends": []})
        };
        let status = serde_json::json!({
            "dataplane": "xdp", "config": "/etc/lb/lb.toml", "uptime_seconds": 1.0, "active": 0,
            "reloads": {"succeeded": 1, "failed": 0, "last": null},
            "xdp": {"packets": {"packets": 10, "forwarded": 7, "nat_replies": 2, "pass_not_vip": 1,
                "drop_no_backend": 3, "drop_mtu": 1}, "error": null},
            "services": [svc("web", serde_json::json!({"packets": 7, "bytes": 2048, "flows": 3}))],
            "removed_services": [svc("old", serde_json::Value::Null)]
        });
        let t = status_table(&status);
        assert!(
            t.contains(
                "XDP: 10 packets, 7 forwarded, 2 NAT replies, 1 passed to the kernel, 4 dropped"
            ),
            "{t}"
        );
        assert!(
            t.contains("XDP: 3 flows started, 7 packets, 2.0 KiB"),
            "{t}"
        );
        assert!(
            t.contains("removed by a reload, draining: service old"),
            "{t}"
        );
    }
}
