//! The TCP health check: the backend accepts a connection.

use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::CheckError;

/// Passes when a TCP connect to `target` completes; the connection is closed at once, after
/// `header` (a PROXY protocol header, see [`super::check_behind`]) when there is one.
///
/// Not bounded in time by itself: [`super::check`] puts the timeout around it.
/// Returns `Err(CheckError::Refused)` on a RST, `Err(CheckError::Unreachable)` on no route.
pub(super) async fn check(target: SocketAddr, header: Option<&[u8]>) -> Result<(), CheckError> {
    let mut stream = TcpStream::connect(target).await?;
    if let Some(header) = header {
        stream.write_all(header).await?;
    }
    drop(stream);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpListener;

    use crate::config::CheckKind;
    use crate::health::{check, CheckError};

    const TIMEOUT: Duration = Duration::from_secs(2);

    #[tokio::test]
    async fn tcp_check_passes_against_a_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("listener address");
        assert_eq!(
            check(addr, &CheckKind::Tcp, TIMEOUT).await,
            Ok(()),
            "a TCP check of a listening backend should pass"
        );
    }

    #[tokio::test]
    async fn tcp_check_of_a_closed_port_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("listener address");
        drop(listener);
        assert_eq!(
            check(addr, &CheckKind::Tcp, TIMEOUT).await,
            Err(CheckError::Refused),
            "a TCP check of a closed port should fail as refused"
        );
    }

    #[tokio::test]
    async fn tcp_check_passes_over_ipv6_loopback() {
        let Ok(listener) = TcpListener::bind("[::1]:0").await else {
            eprintln!("skipped: no IPv6 loopback here");
            return;
        };
        let addr = listener.local_addr().expect("listener address");
        assert_eq!(check(addr, &CheckKind::Tcp, TIMEOUT).await, Ok(()));
    }
}
