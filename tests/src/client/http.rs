//! An HTTP/1.1 client for the name servers: the body it returns is the backend's name.

use std::io::{BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};

use super::{connect_from, ClientError};
use crate::http_wire::{read_head, MAX_HEAD};

/// `GET path` on a new connection (`Connection: close`); returns the body, which a name
/// server sets to its name. Fails with `ClientError::Status` on any status but 200.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String, ClientError> {
    http_get_from(None, addr, path)
}

/// Like [`http_get`], from the source address `source` (e.g. `127.0.0.7`), so a test can be
/// many clients.
pub fn http_get_from(
    source: Option<IpAddr>,
    addr: SocketAddr,
    path: &str,
) -> Result<String, ClientError> {
    let stream = connect_from(source, addr)?;
    let mut conn = HttpConnection {
        out: stream.try_clone()?,
        input: BufReader::new(stream),
    };
    conn.request(path, false)
}

/// One kept-alive connection (`Connection: keep-alive`) for several requests; it stays open
/// until dropped, which is how a test holds connections on a backend.
pub struct HttpConnection {
    out: TcpStream,
    input: BufReader<TcpStream>,
}

impl HttpConnection {
    /// Connects to `addr`. Returns `ClientError::Connect` if that fails.
    pub fn open(addr: SocketAddr) -> Result<HttpConnection, ClientError> {
        Self::open_from(None, addr)
    }

    /// Connects to `addr` from the source address `source`, when given.
    pub fn open_from(
        source: Option<IpAddr>,
        addr: SocketAddr,
    ) -> Result<HttpConnection, ClientError> {
        let stream = connect_from(source, addr)?;
        Ok(HttpConnection {
            out: stream.try_clone()?,
            input: BufReader::new(stream),
        })
    }

    /// The connection's local (client) address and port.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.out.local_addr()
    }

    /// `GET path` on this connection; returns the body.
    pub fn get(&mut self, path: &str) -> Result<String, ClientError> {
        self.request(path, true)
    }

    fn request(&mut self, path: &str, keep_alive: bool) -> Result<String, ClientError> {
        let connection = if keep_alive { "keep-alive" } else { "close" };
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: lb-test\r\nConnection: {connection}\r\n\r\n");
        self.out.write_all(request.as_bytes())?;
        let head = read_head(&mut self.input)?.ok_or_else(|| {
            ClientError::BadResponse("the connection closed before any response".into())
        })?;
        let status = head
            .start
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| ClientError::BadResponse(format!("status line `{}`", head.start)))?;
        let len = head.content_length()?;
        if len > MAX_HEAD {
            return Err(ClientError::BadResponse(format!("a {len}-byte body")));
        }
        let mut body = vec![0u8; len];
        self.input.read_exact(&mut body)?;
        if status != 200 {
            return Err(ClientError::Status(status));
        }
        String::from_utf8(body).map_err(|_| ClientError::BadResponse("body is not UTF-8".into()))
    }
}
