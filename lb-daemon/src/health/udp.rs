//! The UDP health check: a probe datagram gets a reply.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::net::UdpSocket;

use super::CheckError;

/// Reply bytes shown in a [`CheckError::BadReply`], at most.
const SHOWN_REPLY: usize = 64;

/// Passes when `send`, sent to `target` in one datagram (after `header`, a PROXY protocol v2
/// header, see [`super::check_behind`], when there is one), is answered by one datagram that
/// starts with `expect` (any reply when `expect` is `None`).
///
/// Uses a fresh socket on an ephemeral port of the target's family, connected to `target`
/// so that only the backend's replies are received and an ICMP port unreachable surfaces as
/// `ECONNREFUSED`: that fails at once with `Err(CheckError::Refused)`. A reply without the
/// prefix fails with `Err(CheckError::BadReply)`. Not bounded in time by itself:
/// [`super::check`] puts the timeout around it.
pub(super) async fn check(
    target: SocketAddr,
    header: Option<&[u8]>,
    send: &[u8],
    expect: Option<&[u8]>,
) -> Result<(), CheckError> {
    let local: SocketAddr = match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(target).await?;
    match header {
        Some(header) => socket.send(&[header, send].concat()).await?,
        None => socket.send(send).await?,
    };
    // Room for the prefix and the bytes a log line shows, and one more to tell a longer
    // reply: a datagram longer than the buffer is cut, which only drops its tail. (Not the
    // largest payload: a silent backend would hold 64 KiB per check while it times out.)
    let mut reply = vec![0u8; expect.map_or(0, <[u8]>::len).max(SHOWN_REPLY) + 1];
    let n = socket.recv(&mut reply).await?;
    let reply = &reply[..n];
    match expect {
        Some(prefix) if !reply.starts_with(prefix) => Err(CheckError::BadReply(format!(
            "reply \"{}\" does not start with \"{}\"",
            shown(reply),
            shown(prefix)
        ))),
        _ => Ok(()),
    }
}

/// The first bytes of `bytes`, escaped so that any payload is printable in a log line.
fn shown(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(SHOWN_REPLY)];
    let mut text = head.escape_ascii().to_string();
    if bytes.len() > SHOWN_REPLY {
        text.push_str("...");
    }
    text
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use tokio::net::UdpSocket;

    use crate::config::{CheckKind, ProxyProtocol};
    use crate::health::{check, check_behind, CheckError};

    const TIMEOUT: Duration = Duration::from_secs(2);

    fn udp(send: &[u8], expect: Option<&[u8]>) -> CheckKind {
        CheckKind::Udp {
            send: send.to_vec(),
            expect: expect.map(<[u8]>::to_vec),
        }
    }

    /// An echo server on `bind` that answers every datagram with the same bytes until the
    /// returned task is aborted.
    async fn echo(bind: &str) -> Option<(SocketAddr, tokio::task::JoinHandle<()>)> {
        let socket = UdpSocket::bind(bind).await.ok()?;
        let addr = socket.local_addr().expect("socket address");
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let _ = socket.send_to(&buf[..n], from).await;
            }
        });
        Some((addr, task))
    }

    #[tokio::test]
    async fn udp_check_passes_against_an_echo_server() {
        let (addr, server) = echo("127.0.0.1:0").await.expect("bind the echo server");
        assert_eq!(check(addr, &udp(b"ping", None), TIMEOUT).await, Ok(()));
        assert_eq!(
            check(addr, &udp(b"ping", Some(b"pi")), TIMEOUT).await,
            Ok(()),
            "a reply starting with the expected bytes should pass"
        );
        server.abort();
    }

    #[tokio::test]
    async fn udp_check_of_a_proxy_protocol_service_sends_a_local_header_before_the_probe() {
        let (addr, server) = echo("127.0.0.1:0").await.expect("bind the echo server");
        let header = crate::dataplane::proxy::local_header(ProxyProtocol::V2).expect("a header");
        let echoed = [header.as_slice(), b"ping"].concat();
        assert_eq!(
            check_behind(
                addr,
                &udp(b"ping", Some(&echoed)),
                TIMEOUT,
                ProxyProtocol::V2
            )
            .await,
            Ok(()),
            "the probe must go in one datagram after the v2 header"
        );
        server.abort();
    }

    #[tokio::test]
    async fn a_long_reply_is_judged_by_its_prefix_and_shown_cut() {
        let (addr, server) = echo("127.0.0.1:0").await.expect("bind the echo server");
        let long = [b'a'; 1500];
        assert_eq!(
            check(addr, &udp(&long, Some(b"aaa")), TIMEOUT).await,
            Ok(())
        );
        let shown = format!("{}...", "a".repeat(64));
        assert_eq!(
            check(addr, &udp(&long, Some(b"b")), TIMEOUT).await,
            Err(CheckError::BadReply(format!(
                r#"reply "{shown}" does not start with "b""#
            )))
        );
        server.abort();
    }

    #[tokio::test]
    async fn udp_check_passes_over_ipv6_loopback() {
        let Some((addr, server)) = echo("[::1]:0").await else {
            eprintln!("skipped: no IPv6 loopback here");
            return;
        };
        assert_eq!(
            check(addr, &udp(b"ping", Some(b"ping")), TIMEOUT).await,
            Ok(())
        );
        server.abort();
    }

    #[tokio::test]
    async fn udp_check_fails_on_a_reply_without_the_expected_prefix() {
        let (addr, server) = echo("127.0.0.1:0").await.expect("bind the echo server");
        let result = check(addr, &udp(b"ping\n", Some(b"pong")), TIMEOUT).await;
        assert_eq!(
            result,
            Err(CheckError::BadReply(
                r#"reply "ping\n" does not start with "pong""#.into()
            ))
        );
        server.abort();
    }

    #[tokio::test]
    async fn udp_check_of_a_closed_port_is_refused() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = socket.local_addr().expect("socket address");
        drop(socket);
        assert_eq!(
            check(addr, &udp(b"ping", None), TIMEOUT).await,
            Err(CheckError::Refused),
            "an ICMP port unreachable should fail the check as refused"
        );
    }

    #[tokio::test]
    async fn udp_check_times_out_on_a_backend_that_never_replies() {
        // Bound but never read: datagrams are queued, nothing answers, no ICMP error.
        let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = silent.local_addr().expect("socket address");
        let timeout = Duration::from_millis(200);
        assert_eq!(
            check(addr, &udp(b"ping", None), timeout).await,
            Err(CheckError::Timeout(timeout))
        );
        drop(silent);
    }
}
