//! The admin API's client, behind `lb-daemon status|drain|enable|weight|reload`.

use std::fmt::Write;
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
/// socket when it starts with `/`) and reads the whole answer. `token`: the bearer token
/// when the API requires one (`[admin] token_file`).
///
/// Returns `Err(ClientError::Connect)` when nothing answers at `target`,
/// `Err(ClientError::Http)` when the exchange breaks off, `Err(ClientError::Timeout)` after
/// [`REQUEST_TIMEOUT`].
pub async fn request(
    target: &str,
    method: Method,
    path: &str,
    body: Option<String>,
    token: Option<&str>,
) -> Result<Reply, ClientError> {
    tokio::time::timeout(
        REQUEST_TIMEOUT,
        request_now(target, method, path, body, token),
    )
    .await
    .map_err(|_| ClientError::Timeout(target.to_string()))?
}

async fn request_now(
    target: &str,
    method: Method,
    path: &str,
    body: Option<String>,
    token: Option<&str>,
) -> Result<Reply, ClientError> {
    let connect_err = |source| ClientError::Connect {
        target: target.to_string(),
        source,
    };
    let http_err = |source| ClientError::Http {
        target: target.to_string(),
        source,
    };
    // The API checks that Host names it (see `guard.rs`); over the socket it is not checked.
    let host = if target.starts_with('/') {
        "localhost"
    } else {
        target
    };
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
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
    let mut out = String::new();
    write_summary(&mut out, status);
    if let Some(xdp) = status.get("xdp").filter(|x| !x.is_null()) {
        write_xdp_summary(&mut out, xdp);
    }
    if let Some(announce) = status.get("announce").filter(|x| !x.is_null()) {
        write_announce(&mut out, announce);
    }
    for (key, removed) in [("services", false), ("removed_services", true)] {
        for svc in list(status, key) {
            write_service(&mut out, svc, removed);
        }
    }
    out
}

/// `announce: table 100 (node draining): 10.0.0.1 announced; 10.0.0.2 withdrawn (why)`.
fn write_announce(out: &mut String, announce: &serde_json::Value) {
    let vips: Vec<String> = list(announce, "vips")
        .map(|v| match v.get("reason").and_then(|r| r.as_str()) {
            None => format!("{} announced", text(v, "vip")),
            Some(why) => format!("{} withdrawn ({why})", text(v, "vip")),
        })
        .collect();
    let draining = if announce.get("node_draining") == Some(&serde_json::Value::Bool(true)) {
        " (node draining)"
    } else {
        ""
    };
    let _ = writeln!(
        out,
        "announce: table {}{draining}: {}",
        text(announce, "table"),
        if vips.is_empty() {
            "no VIP".to_string()
        } else {
            vips.join("; ")
        }
    );
}

/// The column heads of a service's backend table, in [`backend_row`]'s order.
const BACKEND_COLUMNS: [&str; 12] = [
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

/// The daemon's line (data plane, config, uptime, open, reloads) and the last reload's outcome.
fn write_summary(out: &mut String, status: &serde_json::Value) {
    let _ = writeln!(
        out,
        "data plane {}, config {}, up {}s, {} open, reloads {} applied / {} refused",
        text(status, "dataplane"),
        text(status, "config"),
        status
            .get("uptime_seconds")
            .and_then(|x| x.as_f64())
            .unwrap_or(0.0) as u64,
        number(status, "active"),
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
}

/// The XDP program's packet counts by outcome, or why they could not be read.
fn write_xdp_summary(out: &mut String, xdp: &serde_json::Value) {
    if let Some(e) = xdp.get("error").and_then(|e| e.as_str()) {
        let _ = writeln!(out, "XDP counters unreadable: {e}");
        return;
    }
    let p = |k: &str| {
        xdp.pointer(&format!("/packets/{k}"))
            .and_then(|x| x.as_u64())
            .unwrap_or(0)
    };
    // Drops and refusals are many outcomes each (`drop_no_backend`, `drop_mtu`...): summed.
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
        "XDP: {} packets, {} forwarded, {} NAT replies, {} DSR replies, {} passed to the \
         kernel, {drops} dropped, {refused} refused by client limits",
        p("packets"),
        p("forwarded"),
        p("nat_replies"),
        p("dsr_replies"),
        p("pass_not_vip") + p("fib_pass"),
    );
}

/// One service's block: its line, its data plane, its XDP figures when on XDP, then its
/// backend table. `removed`: a service a reload removed that is still draining.
fn write_service(out: &mut String, svc: &serde_json::Value, removed: bool) {
    let _ = writeln!(
        out,
        "\n{}service {}  {}/{}  {}  table generation {}\n  {}",
        if removed {
            "removed by a reload, draining: "
        } else {
            ""
        },
        text(svc, "name"),
        text(svc, "listen"),
        text(svc, "protocol"),
        text(svc, "scheduler"),
        number(svc, "generation"),
        text(svc, "dataplane")
    );
    if let Some(x) = svc.get("xdp").filter(|x| !x.is_null()) {
        let _ = writeln!(
            out,
            "  XDP: {} flows started, {} packets, {}",
            number(x, "flows"),
            number(x, "packets"),
            human_bytes(number(x, "bytes"))
        );
    }
    let mut rows: Vec<Vec<String>> = vec![BACKEND_COLUMNS.iter().map(|h| h.to_string()).collect()];
    rows.extend(list(svc, "backends").map(backend_row));
    write_aligned(out, &rows);
}

/// One backend's cells, in [`BACKEND_COLUMNS`]' order.
fn backend_row(b: &serde_json::Value) -> Vec<String> {
    vec![
        text(b, "address"),
        text(b, "origin"),
        text(b, "health"),
        text(b, "state"),
        number(b, "weight").to_string(),
        number(b, "effective_weight").to_string(),
        number(b, "active").to_string(),
        number(b, "total").to_string(),
        number(b, "connect_failures").to_string(),
        human_bytes(number(b, "bytes_to_backend")),
        human_bytes(number(b, "bytes_from_backend")),
        text(b, "last_check"),
    ]
}

/// `rows` (the head first, each as long as [`BACKEND_COLUMNS`]) with each column padded to
/// its widest cell, indented by two spaces, trailing spaces cut.
fn write_aligned(out: &mut String, rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..BACKEND_COLUMNS.len())
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

/// The array at `key` in `v`, empty when missing or not an array.
fn list<'a>(v: &'a serde_json::Value, key: &str) -> impl Iterator<Item = &'a serde_json::Value> {
    v.get(key)
        .and_then(|x| x.as_array())
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
}

/// The field `k` of `v` as text: a string as is, `-` when missing or null, else its JSON.
fn text(v: &serde_json::Value, k: &str) -> String {
    match v.get(k) {
        Some(serde_json::Value::String(x)) => x.clone(),
        Some(serde_json::Value::Null) | None => "-".into(),
        Some(x) => x.to_string(),
    }
}

/// The field `k` of `v` as an unsigned number, 0 when missing or not one.
fn number(v: &serde_json::Value, k: &str) -> u64 {
    v.get(k).and_then(|x| x.as_u64()).unwrap_or(0)
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
            "xdp": {"packets": {"packets": 13, "forwarded": 7, "nat_replies": 2, "dsr_replies": 3,
                "pass_not_vip": 1, "drop_no_backend": 3, "drop_mtu": 1}, "error": null},
            "services": [svc("web", serde_json::json!({"packets": 7, "bytes": 2048, "flows": 3}))],
            "removed_services": [svc("old", serde_json::Value::Null)]
        });
        let t = status_table(&status);
        assert!(
            t.contains(
                "XDP: 13 packets, 7 forwarded, 2 NAT replies, 3 DSR replies, 1 passed to the \
                 kernel, 4 dropped"
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

    #[test]
    fn the_whole_table_is_pinned() {
        // Every section once (summary, last reload, unreadable XDP counters, a service with
        // IPv6 backends of unequal widths, a removed service with no backends), byte for byte.
        let status = serde_json::json!({
            "dataplane": "xdp+proxy", "config": "/etc/lb/lb.toml", "uptime_seconds": 75.9, "active": 3,
            "reloads": {"succeeded": 2, "failed": 1, "last": "refused: bad weight"},
            "xdp": {"packets": {}, "error": "map gone"},
            "services": [{"name": "web", "listen": "[2001:db8::1]:443", "protocol": "tcp",
                "scheduler": "maglev", "generation": 4, "dataplane": "proxy data plane (no interface is configured)",
                "backends": [
                {"address": "[2001:db8::10]:443", "origin": "static", "health": "up", "state": "active",
                 "weight": 2, "effective_weight": 2, "active": 1, "total": 5, "connect_failures": 0,
                 "bytes_to_backend": 3_000_000, "bytes_from_backend": 10, "last_check": "ok"},
                {"address": "[2001:db8::11]:443", "origin": "web.example:443", "health": "down", "state": "slow_start",
                 "weight": 10, "effective_weight": 0, "active": 0, "total": 12345, "connect_failures": 7,
                 "bytes_to_backend": 0, "bytes_from_backend": 5_000_000_000u64, "last_check": null}]}],
            "removed_services": [{"name": "old", "listen": "10.0.0.1:53", "protocol": "udp",
                "scheduler": "round_robin", "generation": 1, "dataplane": "proxy", "backends": []}]
        });
        let want = concat!(
            "data plane xdp+proxy, config /etc/lb/lb.toml, up 75s, 3 open, reloads 2 applied / 1 refused\n",
            "last reload: refused: bad weight\n",
            "XDP counters unreadable: map gone\n",
            "\n",
            "service web  [2001:db8::1]:443/tcp  maglev  table generation 4\n",
            "  proxy data plane (no interface is configured)\n",
            "  BACKEND             ORIGIN           HEALTH  STATE       WEIGHT  EFFECTIVE  ACTIVE  TOTAL  FAILED  BYTES IN  BYTES OUT  LAST CHECK\n",
            "  [2001:db8::10]:443  static           up      active      2       2          1       5      0       2.9 MiB   10 B       ok\n",
            "  [2001:db8::11]:443  web.example:443  down    slow_start  10      0          0       12345  7       0 B       4.7 GiB    -\n",
            "\n",
            "removed by a reload, draining: service old  10.0.0.1:53/udp  round_robin  table generation 1\n",
            "  proxy\n",
            "  BACKEND  ORIGIN  HEALTH  STATE  WEIGHT  EFFECTIVE  ACTIVE  TOTAL  FAILED  BYTES IN  BYTES OUT  LAST CHECK\n",
        );
        assert_eq!(status_table(&status), want);
    }
}
