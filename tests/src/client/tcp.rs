//! TCP connects (optionally from a chosen loopback source address), and transfers that end in
//! a [`Receipt`] of what arrived.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::{ClientError, CONNECT_TIMEOUT, IO_TIMEOUT};
use crate::data::{ByteStream, Hasher, Receipt};

/// Connects to `addr` with the default timeouts set.
pub fn connect(addr: SocketAddr) -> Result<TcpStream, ClientError> {
    connect_from(None, addr)
}

/// Connects to `addr`, first binding to `source` (port chosen by the kernel) when given.
/// Read and write timeouts are set to [`IO_TIMEOUT`]. Returns `ClientError::Connect` when the
/// bind or the connect fails.
pub fn connect_from(source: Option<IpAddr>, addr: SocketAddr) -> Result<TcpStream, ClientError> {
    let stream = match source {
        None => TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(ClientError::Connect)?,
        Some(ip) => {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
                .map_err(ClientError::Connect)?;
            socket
                .bind(&SockAddr::from(SocketAddr::new(ip, 0)))
                .map_err(ClientError::Connect)?;
            socket
                .connect_timeout(&SockAddr::from(addr), CONNECT_TIMEOUT)
                .map_err(ClientError::Connect)?;
            TcpStream::from(socket)
        }
    };
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Sends the first `len` bytes of `ByteStream::new(seed)` to a hash server at `addr`,
/// half-closes, and returns the receipt the server sent back. Compare it with
/// `Receipt::of_stream(len, seed)`.
pub fn upload(addr: SocketAddr, len: u64, seed: u64) -> Result<Receipt, ClientError> {
    let mut up = Upload::start(addr, seed)?;
    up.send(len)?;
    up.finish()
}

/// An upload in progress to a hash server, sent in as many pieces as a test likes.
pub struct Upload {
    stream: TcpStream,
    bytes: ByteStream,
    buf: Vec<u8>,
    sent: u64,
}

impl Upload {
    /// Connects to the hash server (through the balancer) at `addr`.
    pub fn start(addr: SocketAddr, seed: u64) -> Result<Upload, ClientError> {
        Ok(Upload {
            stream: connect(addr)?,
            bytes: ByteStream::new(seed),
            buf: vec![0u8; 256 * 1024],
            sent: 0,
        })
    }

    /// Sends the next `len` bytes of the stream.
    pub fn send(&mut self, len: u64) -> Result<(), ClientError> {
        let mut left = len;
        while left > 0 {
            let n = left.min(self.buf.len() as u64) as usize;
            self.bytes.fill(&mut self.buf[..n]);
            self.stream.write_all(&self.buf[..n])?;
            left -= n as u64;
        }
        self.sent += len;
        Ok(())
    }

    /// Bytes sent so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Half-closes (`shutdown(SHUT_WR)`) and reads the server's receipt line.
    /// `ClientError::BadResponse` when the reply is not a receipt.
    pub fn finish(self) -> Result<Receipt, ClientError> {
        self.stream.shutdown(Shutdown::Write)?;
        let mut line = String::new();
        BufReader::new(&self.stream)
            .take(256)
            .read_line(&mut line)?;
        Receipt::parse(&line).ok_or_else(|| {
            if line.is_empty() {
                ClientError::BadResponse("the connection closed without a receipt".into())
            } else {
                ClientError::BadResponse(format!("`{}` is not a receipt", line.trim_end()))
            }
        })
    }
}

/// Asks a source server at `addr` for the first `len` bytes of `ByteStream::new(seed)` and
/// returns the receipt of what arrived before its end of stream. Compare it with
/// `Receipt::of_stream(len, seed)`.
pub fn download(addr: SocketAddr, len: u64, seed: u64) -> Result<Receipt, ClientError> {
    let mut stream = connect(addr)?;
    stream.write_all(format!("{len} {seed}\n").as_bytes())?;
    let mut hasher = Hasher::default();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
    Ok(hasher.finish())
}
