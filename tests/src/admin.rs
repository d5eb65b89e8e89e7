//! A client of the daemon's admin API for tests: plain HTTP/1.1 over a std TCP stream (so the
//! tests do not share the daemon's HTTP stack), and `lb-daemon` CLI runs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::daemon::daemon_binary;

/// How long one admin request may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// An admin API answer: status code and body.
#[derive(Debug, Clone)]
pub struct AdminReply {
    /// HTTP status code.
    pub status: u16,
    /// The body.
    pub body: String,
}

impl AdminReply {
    /// The body as JSON; panics with the body when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("the admin API answered non-JSON ({e}): {}", self.body))
    }
}

/// Sends `method path` with `body` to the admin API at `addr` and reads the whole answer.
/// Panics when the API cannot be reached or answers garbage: a test cannot go on.
pub fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> AdminReply {
    let mut s = TcpStream::connect_timeout(&addr, ADMIN_TIMEOUT)
        .unwrap_or_else(|e| panic!("cannot reach the admin API at {addr}: {e}"));
    let _ = s.set_read_timeout(Some(ADMIN_TIMEOUT));
    let _ = s.set_write_timeout(Some(ADMIN_TIMEOUT));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .unwrap_or_else(|e| panic!("admin request {method} {path} failed: {e}"));
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("admin answer to {method} {path} broke off: {e}"));
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in the admin answer: {text}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in the admin answer: {head}"));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    AdminReply {
        status,
        body: if chunked {
            dechunk(rest)
        } else {
            rest.to_string()
        },
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `GET /status` as JSON.
pub fn status(addr: SocketAddr) -> Value {
    let r = request(addr, "GET", "/status", "");
    assert_eq!(r.status, 200, "GET /status failed: {}", r.body);
    r.json()
}

/// One backend's entry in a `/status` document, if the service has it.
pub fn backend<'a>(status: &'a Value, service: &str, backend: SocketAddr) -> Option<&'a Value> {
    status["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == service)?["backends"]
        .as_array()?
        .iter()
        .find(|b| b["address"] == backend.to_string())
}

/// The addresses of a service's backends in a `/status` document, sorted.
pub fn backend_addresses(status: &Value, service: &str) -> Vec<SocketAddr> {
    let mut v: Vec<SocketAddr> = status["services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == service))
        .and_then(|s| s["backends"].as_array())
        .map(|b| {
            b.iter()
                .filter_map(|b| b["address"].as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The outcome of an `lb-daemon` CLI command.
#[derive(Debug)]
pub struct CliOutcome {
    /// Exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `lb-daemon ARGS --admin ADDR` and waits for it. Panics when it cannot be started.
pub fn cli(admin: &str, args: &[&str]) -> CliOutcome {
    let binary = daemon_binary().unwrap_or_else(|e| panic!("no lb-daemon binary: {e}"));
    let out = Command::new(&binary)
        .args(args)
        .arg("--admin")
        .arg(admin)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
    CliOutcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
