//! The little of HTTP/1.1 the name server and the client need: a message head (start line and
//! headers) read from a buffered stream, bounded in size.

use std::io::{self, BufRead, Read};

/// The largest head accepted, in bytes.
pub(crate) const MAX_HEAD: usize = 16 * 1024;

/// A start line and its headers.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) start: String,
    headers: Vec<(String, String)>,
}

impl Head {
    /// The first header named `name` (case-insensitive), trimmed.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `Content-Length`, 0 when absent. `Err(InvalidData)` when it is not a number.
    pub(crate) fn content_length(&self) -> io::Result<usize> {
        match self.header("content-length") {
            None => Ok(0),
            Some(v) => v
                .parse()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length")),
        }
    }

    /// Whether the `Connection` header lists `token` (e.g. `keep-alive`, `close`).
    pub(crate) fn connection_has(&self, token: &str) -> bool {
        self.header("connection")
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }
}

/// Reads one head. `Ok(None)` on a clean end of stream before any byte; `Err(InvalidData)`
/// when the head is longer than [`MAX_HEAD`] or not text; `Err(UnexpectedEof)` when the
/// stream ends inside it.
pub(crate) fn read_head(r: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut lines = Vec::new();
    let mut total = 0;
    loop {
        let mut line = Vec::new();
        let n = r
            .by_ref()
            .take((MAX_HEAD - total + 1) as u64)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            if lines.is_empty() {
                return Ok(None);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        total += n;
        if total > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too long"));
        }
        if !line.ends_with(b"\n") {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let text = String::from_utf8(line)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "head is not UTF-8"))?;
        let text = text.trim_end_matches(['\r', '\n']).to_string();
        if text.is_empty() {
            if lines.is_empty() {
                // Stray CRLF before a request is allowed (RFC 9112 §2.2).
                continue;
            }
            break;
        }
        lines.push(text);
    }
    let start = lines.remove(0);
    let headers = lines
        .into_iter()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    Ok(Some(Head { start, headers }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn reads_two_pipelined_heads() {
        let mut r = Cursor::new(
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Keep-Alive\r\n\r\nGET /health HTTP/1.1\r\n\r\n"
                .to_vec(),
        );
        let h = read_head(&mut r).unwrap().unwrap();
        assert_eq!(h.start, "GET / HTTP/1.1");
        assert_eq!(h.header("HOST"), Some("x"));
        assert!(h.connection_has("keep-alive"));
        let h = read_head(&mut r).unwrap().unwrap();
        assert_eq!(h.start, "GET /health HTTP/1.1");
        assert!(read_head(&mut r).unwrap().is_none());
    }

    #[test]
    fn rejects_endless_head() {
        let mut r = Cursor::new(vec![b'a'; MAX_HEAD * 2]);
        assert!(read_head(&mut r).is_err());
    }
}
