//! Test payloads and their fingerprints: a seeded byte stream both ends can regenerate, and
//! the `sha256-hex byte-count` receipt the hash server sends back.

use std::fmt;

use sha2::{Digest, Sha256};

/// A reproducible stream of pseudo-random bytes (SplitMix64): the same seed gives the same
/// bytes on both ends of a transfer, so neither has to keep a copy.
#[derive(Debug, Clone)]
pub struct ByteStream {
    state: u64,
    /// Bytes of the current 8-byte word not yet handed out.
    pending: [u8; 8],
    pending_len: usize,
}

impl ByteStream {
    /// A stream determined by `seed`.
    pub fn new(seed: u64) -> Self {
        ByteStream {
            state: seed,
            pending: [0; 8],
            pending_len: 0,
        }
    }

    fn next_word(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fills `buf` with the next `buf.len()` bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() && self.pending_len > 0 {
            buf[i] = self.pending[8 - self.pending_len];
            self.pending_len -= 1;
            i += 1;
        }
        let mut words = buf[i..].chunks_exact_mut(8);
        for w in &mut words {
            w.copy_from_slice(&self.next_word().to_le_bytes());
        }
        let rest = words.into_remainder();
        if !rest.is_empty() {
            self.pending = self.next_word().to_le_bytes();
            self.pending_len = 8;
            for b in rest {
                *b = self.pending[8 - self.pending_len];
                self.pending_len -= 1;
            }
        }
    }
}

/// What arrived at one end of a transfer: its SHA-256 and its length. On the wire (the hash
/// server's reply) it is one line, `"{sha256 as 64 lowercase hex digits} {bytes}\n"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// SHA-256 of the bytes, 64 lowercase hex digits.
    pub sha256: String,
    /// How many bytes.
    pub bytes: u64,
}

impl Receipt {
    /// Parses one receipt line (the trailing newline is optional). `None` when it is not
    /// `"{64 hex digits} {decimal}"`.
    pub fn parse(line: &str) -> Option<Receipt> {
        let mut parts = line.trim_end_matches(['\n', '\r']).split(' ');
        let sha256 = parts.next()?;
        let bytes = parts.next()?.parse().ok()?;
        if parts.next().is_some()
            || sha256.len() != 64
            || !sha256.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return None;
        }
        Some(Receipt {
            sha256: sha256.to_ascii_lowercase(),
            bytes,
        })
    }

    /// The receipt of the first `len` bytes of `ByteStream::new(seed)`.
    pub fn of_stream(len: u64, seed: u64) -> Receipt {
        let mut hasher = Hasher::default();
        let mut stream = ByteStream::new(seed);
        let mut buf = vec![0u8; 256 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            stream.fill(&mut buf[..n]);
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        hasher.finish()
    }

    /// The receipt of `bytes`.
    pub fn of(bytes: &[u8]) -> Receipt {
        let mut h = Hasher::default();
        h.update(bytes);
        h.finish()
    }
}

impl fmt::Display for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.sha256, self.bytes)
    }
}

/// Builds a [`Receipt`] from bytes fed in pieces.
#[derive(Default)]
pub struct Hasher {
    sha: Sha256,
    bytes: u64,
}

impl Hasher {
    /// Adds the next piece.
    pub fn update(&mut self, piece: &[u8]) {
        self.sha.update(piece);
        self.bytes += piece.len() as u64;
    }

    /// The receipt of everything fed so far.
    pub fn finish(self) -> Receipt {
        Receipt {
            sha256: hex(&self.sha.finalize()),
            bytes: self.bytes,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        write!(s, "{b:02x}").expect("writing to a String cannot fail");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_is_the_same_however_it_is_cut() {
        let mut whole = vec![0u8; 1000];
        ByteStream::new(7).fill(&mut whole);
        let mut pieces = vec![0u8; 1000];
        let mut s = ByteStream::new(7);
        let mut at = 0;
        for len in [1, 3, 8, 13, 0, 64, 5, 7, 899] {
            s.fill(&mut pieces[at..at + len]);
            at += len;
        }
        assert_eq!(at, 1000);
        assert_eq!(whole, pieces, "the stream depends on how the reads are cut");
        let mut other = vec![0u8; 1000];
        ByteStream::new(8).fill(&mut other);
        assert_ne!(whole, other, "two seeds gave the same bytes");
    }

    #[test]
    fn receipt_matches_known_sha256_and_round_trips() {
        let r = Receipt::of(b"abc");
        assert_eq!(
            r.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(r.bytes, 3);
        assert_eq!(Receipt::parse(&format!("{r}\n")), Some(r));
        assert_eq!(Receipt::parse("xyz 3"), None);
        assert_eq!(Receipt::parse(""), None);
    }

    #[test]
    fn receipt_of_stream_matches_receipt_of_its_bytes() {
        let mut buf = vec![0u8; 300_001];
        ByteStream::new(42).fill(&mut buf);
        assert_eq!(Receipt::of_stream(300_001, 42), Receipt::of(&buf));
    }
}
