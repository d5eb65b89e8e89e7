//! The HTTP health check: `GET path` over HTTP/1.1 answers with the expected status.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::CheckError;

/// The longest status line we read before calling the reply bad, in bytes; also the most
/// bytes of interim (1xx) responses skipped before the final one.
const MAX_STATUS_LINE: usize = 8 * 1024;

/// Passes when `GET path HTTP/1.1` to `target` is answered with status `expect_status`.
///
/// The request carries `Host: <host>` (`<target>` when `host` is `None`), `Connection:
/// close` and `User-Agent: lb-health`;
/// bytes of `path` that may not appear in a request line (space, controls, non-ASCII) are
/// percent-encoded. `header` (a PROXY protocol header, see [`super::check_behind`]), when
/// there is one, goes first, in the same write. Only the final status line is read (interim
/// 1xx responses before it are skipped); the connection is then closed.
/// Not bounded in time by itself: [`super::check`] puts the timeout around the whole exchange.
///
/// Returns `Err(CheckError::BadStatus)` for another status, `Err(CheckError::BadReply)` when
/// the reply has no HTTP status line, or the connect's error (`Refused`, `Unreachable`, `Io`).
pub(super) async fn check(
    target: SocketAddr,
    header: Option<&[u8]>,
    path: &str,
    host: Option<&str>,
    expect_status: u16,
) -> Result<(), CheckError> {
    let mut stream = TcpStream::connect(target).await?;
    // SocketAddr's Display brackets IPv6 addresses, as a Host header needs.
    let host = host.map_or_else(|| target.to_string(), str::to_string);
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: lb-health\r\n\r\n",
        request_target(path)
    );
    let mut bytes = header.unwrap_or_default().to_vec();
    bytes.extend_from_slice(request.as_bytes());
    stream.write_all(&bytes).await?;
    let mut reply = Reply {
        stream: &mut stream,
        buf: Vec::with_capacity(256),
        skipped: 0,
    };
    let mut got = parse_status(&reply.line().await?)?;
    // Interim responses (`100 Continue`, `103 Early Hints`; not `101`, which ends HTTP)
    // come before the final one, each a status line and headers up to an empty line (RFC
    // 9110 §15.2), unless the check expects one of them.
    while (100..200).contains(&got) && got != 101 && got != expect_status {
        while !reply.line().await?.is_empty() {}
        got = parse_status(&reply.line().await?)?;
    }
    if got == expect_status {
        Ok(())
    } else {
        Err(CheckError::BadStatus {
            got,
            want: expect_status,
        })
    }
}

/// `path` with every byte that a request line cannot carry raw written as `%XX`.
fn request_target(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for &b in path.as_bytes() {
        if b <= b' ' || b >= 0x7f {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(char::from(b));
        }
    }
    out
}

/// The reply of one check, read line by line.
struct Reply<'a> {
    stream: &'a mut TcpStream,
    /// Bytes read and not yet returned as a line.
    buf: Vec<u8>,
    /// Bytes of lines returned so far.
    skipped: usize,
}

impl Reply<'_> {
    /// The next line, without its end (CRLF or a bare LF).
    ///
    /// Returns `Err(CheckError::BadReply)` when the stream closes first, or when the line,
    /// or all lines so far, pass [`MAX_STATUS_LINE`] bytes.
    async fn line(&mut self) -> Result<Vec<u8>, CheckError> {
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                self.skipped += line.len();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.buf.len() + self.skipped > MAX_STATUS_LINE {
                return Err(CheckError::BadReply(format!(
                    "no status line in the first {MAX_STATUS_LINE} bytes"
                )));
            }
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(CheckError::BadReply(
                    if self.buf.is_empty() && self.skipped == 0 {
                        "connection closed without a reply".into()
                    } else {
                        "connection closed in the status line".into()
                    },
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The status code of an HTTP/1.x status line such as `HTTP/1.1 503 Service Unavailable`.
fn parse_status(line: &[u8]) -> Result<u16, CheckError> {
    let bad = || {
        let shown: String = line.iter().take(64).copied().map(char::from).collect();
        CheckError::BadReply(format!("not an HTTP status line: {shown:?}"))
    };
    let mut parts = line.splitn(3, |&b| b == b' ');
    let version = parts.next().ok_or_else(bad)?;
    let code = parts.next().ok_or_else(bad)?;
    if !version.starts_with(b"HTTP/") || code.len() != 3 || !code.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    Ok(code.iter().fold(0u16, |n, &d| n * 10 + u16::from(d - b'0')))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;

    use super::{parse_status, request_target};
    use crate::config::{CheckKind, ProxyProtocol};
    use crate::health::{check, check_behind, CheckError};

    const TIMEOUT: Duration = Duration::from_secs(2);

    fn http(path: &str, expect_status: u16) -> CheckKind {
        CheckKind::Http {
            path: path.into(),
            expect_status,
            host: None,
        }
    }

    /// A one-connection HTTP server that answers with `reply` and hands back the request head.
    async fn server(reply: &'static str) -> (SocketAddr, oneshot::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("listener address");
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut head = Vec::new();
            let mut chunk = [0u8; 512];
            // Bounded: the client's request head is small, and it closes after its timeout.
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&chunk[..n]),
                }
            }
            let _ = stream.write_all(reply.as_bytes()).await;
            let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn http_check_passes_on_the_expected_status_and_sends_a_proper_request() {
        let (addr, request) =
            server("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok").await;
        assert_eq!(check(addr, &http("/healthz", 200), TIMEOUT).await, Ok(()));
        let request = request.await.expect("the server saw no request");
        let expected = format!(
            "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nUser-Agent: lb-health\r\n\r\n"
        );
        assert_eq!(request, expected, "the backend got a different request");
    }

    #[tokio::test]
    async fn http_check_of_a_proxy_protocol_service_sends_a_local_header_first() {
        for (version, header) in [
            (ProxyProtocol::V1, b"PROXY UNKNOWN\r\n".to_vec()),
            (
                ProxyProtocol::V2,
                crate::dataplane::proxy::local_header(ProxyProtocol::V2).expect("a v2 header"),
            ),
        ] {
            let (addr, request) = server("HTTP/1.1 200 OK\r\n\r\n").await;
            assert_eq!(
                check_behind(addr, &http("/", 200), TIMEOUT, version).await,
                Ok(())
            );
            let request = request.await.expect("the server saw no request");
            assert!(
                request.as_bytes().starts_with(&header)
                    && request[header.len()..].starts_with("GET / HTTP/1.1\r\n"),
                "{version:?}: the check must send the header, then its request; sent {request:?}"
            );
        }
    }

    #[tokio::test]
    async fn interim_responses_before_the_final_one_are_skipped() {
        let (addr, _request) = server(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
             HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert_eq!(check(addr, &http("/", 200), TIMEOUT).await, Ok(()));
        let (addr, _request) =
            server("HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 503 Unavailable\r\n\r\n").await;
        assert_eq!(
            check(addr, &http("/", 200), TIMEOUT).await,
            Err(CheckError::BadStatus {
                got: 503,
                want: 200
            }),
            "the final status is the one judged"
        );
    }

    #[tokio::test]
    async fn http_check_sends_the_configured_host() {
        let (addr, request) = server("HTTP/1.1 200 OK\r\n\r\n").await;
        let kind = CheckKind::Http {
            path: "/".into(),
            expect_status: 200,
            host: Some("app.example".into()),
        };
        assert_eq!(check(addr, &kind, TIMEOUT).await, Ok(()));
        let request = request.await.expect("the server saw no request");
        assert!(
            request.contains("\r\nHost: app.example\r\n"),
            "the request must carry the configured Host: {request:?}"
        );
    }

    #[tokio::test]
    async fn http_check_fails_on_another_status() {
        let (addr, _request) =
            server("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n").await;
        let result = check(addr, &http("/", 200), TIMEOUT).await;
        assert_eq!(
            result,
            Err(CheckError::BadStatus {
                got: 503,
                want: 200
            })
        );
        assert_eq!(
            result.expect_err("checked above").to_string(),
            "HTTP status 503, expected 200"
        );
    }

    #[tokio::test]
    async fn http_check_passes_when_the_expected_status_is_not_200() {
        let (addr, _request) = server("HTTP/1.0 204\r\n\r\n").await;
        assert_eq!(check(addr, &http("/", 204), TIMEOUT).await, Ok(()));
    }

    #[tokio::test]
    async fn http_check_times_out_on_a_backend_that_never_answers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("listener address");
        let (hold_tx, hold_rx) = oneshot::channel::<()>();
        let silent = tokio::spawn(async move {
            let accepted = listener.accept().await;
            // Keep the connection open, unanswered, until the test is done.
            let _ = hold_rx.await;
            drop(accepted);
        });
        let timeout = Duration::from_millis(200);
        assert_eq!(
            check(addr, &http("/", 200), timeout).await,
            Err(CheckError::Timeout(timeout)),
            "a backend that accepts but never answers should time out"
        );
        let _ = hold_tx.send(());
        let _ = silent.await;
    }

    #[tokio::test]
    async fn http_check_fails_on_a_reply_that_is_not_http() {
        let (addr, _request) = server("SSH-2.0-OpenSSH_9.9\r\n").await;
        let result = check(addr, &http("/", 200), TIMEOUT).await;
        assert!(
            matches!(&result, Err(CheckError::BadReply(why)) if why.contains("SSH-2.0")),
            "a non-HTTP reply should fail as a bad reply naming it, got {result:?}"
        );
    }

    #[tokio::test]
    async fn http_check_fails_when_the_backend_closes_without_a_reply() {
        let (addr, _request) = server("").await;
        let result = check(addr, &http("/", 200), TIMEOUT).await;
        assert_eq!(
            result,
            Err(CheckError::BadReply(
                "connection closed without a reply".into()
            ))
        );
    }

    #[tokio::test]
    async fn http_check_of_a_closed_port_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("listener address");
        drop(listener);
        assert_eq!(
            check(addr, &http("/", 200), TIMEOUT).await,
            Err(CheckError::Refused)
        );
    }

    #[test]
    fn status_lines_parse() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK"), Ok(200));
        assert_eq!(parse_status(b"HTTP/1.0 404"), Ok(404));
        assert!(parse_status(b"HTTP/1.1 20 OK").is_err());
        assert!(parse_status(b"HTTP/1.1 2x0 OK").is_err());
        assert!(parse_status(b"ICY 200 OK").is_err());
        assert!(parse_status(b"").is_err());
    }

    #[test]
    fn unsafe_path_bytes_are_percent_encoded() {
        assert_eq!(request_target("/a b\r\nX: y"), "/a%20b%0D%0AX:%20y");
        assert_eq!(request_target("/caf\u{e9}"), "/caf%C3%A9");
        assert_eq!(request_target("/ok?x=1"), "/ok?x=1");
    }
}
