//! Which I/O errors are this host's own shortage rather than a peer's answer.
//!
//! A connect or bind that fails for want of a local port, descriptor, buffer or memory says
//! nothing about the backend: the health checks and the proxy's passive checks must not hold
//! it against the backend, or a flood that exhausts the host would mark every healthy
//! backend DOWN (and so turn a partial outage into a total one).

use std::io;

/// Whether `err` is a shortage of this host's resources: `EADDRNOTAVAIL` and `EADDRINUSE` (no
/// free local port), `EMFILE` and `ENFILE` (no descriptor, for the process or the system),
/// `ENOBUFS` and `ENOMEM` (no kernel memory). `false` for every other error, and for errors
/// without an OS code.
pub fn is_local_shortage(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(
            libc::EADDRNOTAVAIL
                | libc::EADDRINUSE
                | libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortages_are_local_and_a_peers_answers_are_not() {
        let os = io::Error::from_raw_os_error;
        for code in [
            libc::EADDRNOTAVAIL,
            libc::EADDRINUSE,
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
        ] {
            assert!(is_local_shortage(&os(code)), "errno {code}");
        }
        for code in [
            libc::ECONNREFUSED,
            libc::ECONNRESET,
            libc::EHOSTUNREACH,
            libc::ETIMEDOUT,
        ] {
            assert!(!is_local_shortage(&os(code)), "errno {code}");
        }
        assert!(!is_local_shortage(&io::Error::other("no code")));
    }
}
