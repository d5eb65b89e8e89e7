//! One daemon per pin directory (`[global] bpf_pin_dir`).
//!
//! A daemon adopts the pinned set it finds at start, and one whose config has no eBPF
//! service removes it. Without a guard, a second `lb-daemon run` on the same host (by
//! hand, a second unit, a config being tried out) would do either to the set a running daemon
//! serves: adopt it (rewrite its tables from another config, attach its programs again) or
//! remove it (the running daemon's flows would then not survive its next restart). So a daemon
//! holds an exclusive `flock(2)` on the pin directory for as long as it runs, and a daemon
//! that finds it held refuses to start, naming the directory.
//!
//! An upgrade (`lb-daemon upgrade`, SIGUSR2) runs two daemons on one set on purpose: the old
//! daemon hands a duplicate of its locked descriptor over with its sockets
//! ([`HANDOVER_KIND`]). A duplicate shares the lock, which the kernel releases only when
//! the last descriptor of it closes, so it passes to the new daemon with no moment
//! unlocked, and stays with the old one if the new one fails before it is ready.
//!
//! The lock is on the directory itself, not on a file in it: a bpffs holds only pins. It is
//! taken only where a daemon finds or makes the directory: a daemon with no bpffs, or not
//! allowed to open the directory, has no set to protect.

use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The kind (`OfferedSocket::protocol` in `crate::handover`) of the lock's descriptor in a
/// hand-over's offer. It is no socket: a daemon of a release before this one takes it for
/// an unused socket and closes it.
pub const HANDOVER_KIND: &str = "pin-lock";

/// The address the lock's descriptor is offered under (it has none): `0.0.0.0:0`.
pub const HANDOVER_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));

/// Why the pin directory cannot be this daemon's.
#[derive(Debug, thiserror::Error)]
pub enum PinLockError {
    /// Another process (another lb-daemon) holds the directory's lock.
    #[error(
        "another lb-daemon runs the eBPF data plane pinned in {} (it holds the directory's \
         lock): stop it first, replace it with `lb-daemon upgrade` or SIGUSR2, or give this \
         daemon a [global] bpf_pin_dir of its own",
        path.display()
    )]
    Held {
        /// The pin directory.
        path: PathBuf,
    },
}

/// The lock this process holds: the directory and its locked descriptor.
struct Held {
    dir: PathBuf,
    fd: OwnedFd,
}

/// At most one lock per process: the pin directory is fixed until restart (a reload that
/// changes it is refused).
static HELD: Mutex<Option<Held>> = Mutex::new(None);

fn held() -> std::sync::MutexGuard<'static, Option<Held>> {
    HELD.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes the lock of pin directory `dir` for this process, unless it holds it already.
/// Returns `Ok(true)` when this process holds it, `Ok(false)` when it cannot be taken for
/// another reason than another holder (there is no such directory, it cannot be opened, a
/// lock of another directory is held), which leaves the caller on its own.
///
/// Returns `Err(PinLockError::Held)` when another process holds it.
pub fn claim(dir: &Path) -> Result<bool, PinLockError> {
    let mut held = held();
    if let Some(h) = held.as_ref() {
        if h.dir != dir {
            return Ok(false);
        }
        if is_same(dir, &h.fd) != Some(false) {
            return Ok(true);
        }
        // The directory was removed (no eBPF service was left) and made again: the lock of
        // the removed one protects nothing.
        *held = None;
    }
    // A directory opened read-only; `std` sets close-on-exec, so a successor started by
    // SIGUSR2 gets the lock only through the hand-over.
    let Ok(file) = fs::File::open(dir) else {
        return Ok(false);
    };
    if !file.metadata().is_ok_and(|m| m.is_dir()) {
        return Ok(false);
    }
    let fd = OwnedFd::from(file);
    match lock_exclusive(&fd) {
        Ok(()) => {
            *held = Some(Held {
                dir: dir.to_path_buf(),
                fd,
            });
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(PinLockError::Held {
            path: dir.to_path_buf(),
        }),
        Err(_) => Ok(false),
    }
}

/// Keeps `fd`, the lock an old daemon handed over, as this process's lock of `dir` when it
/// is the lock of that very directory (same device and inode; the new config may name
/// another one). Returns whether it was kept; a descriptor not kept is closed.
pub fn inherit(dir: &Path, fd: OwnedFd) -> bool {
    let mut held = held();
    if is_same(dir, &fd) != Some(true) || held.is_some() {
        return false;
    }
    *held = Some(Held {
        dir: dir.to_path_buf(),
        fd,
    });
    true
}

/// A duplicate of the held lock's descriptor, for a hand-over; `None` when this process
/// holds none, or the duplicate fails (out of descriptors): the new daemon then finds the
/// lock held, and refuses to start while this one goes on.
pub fn for_handover() -> Option<OwnedFd> {
    held().as_ref().and_then(|h| h.fd.try_clone().ok())
}

/// `flock(fd, LOCK_EX | LOCK_NB)`. Never undone with `LOCK_UN`, which would release the lock
/// for every duplicate (`nix`'s `Flock` does that when dropped): the kernel releases it when
/// the last descriptor closes.
fn lock_exclusive(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: `fd` is an open descriptor for the duration of the call.
    match unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Whether `fd` is open on the file at `path` (same device and inode); `None` when either
/// cannot be looked at.
fn is_same(path: &Path, fd: &OwnedFd) -> Option<bool> {
    let open = fd.try_clone().and_then(|fd| fs::File::from(fd).metadata());
    match (fs::metadata(path), open) {
        (Ok(a), Ok(b)) => Some(a.dev() == b.dev() && a.ino() == b.ino()),
        _ => None,
    }
}

/// Lets go of the lock this process holds, if any: for a daemon that took it only to look
/// at the directory (`pins::remove_unused`) and runs no eBPF service.
pub fn release() {
    *held() = None;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lock is per open directory: a second open of the same directory (what a second
    /// daemon does) is refused while the first holds it, and a duplicate shares it.
    #[test]
    fn a_second_open_is_refused_and_a_duplicate_shares_the_lock() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let held =
            |fd: &OwnedFd| lock_exclusive(fd).is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock);
        let first = OwnedFd::from(fs::File::open(dir.path()).expect("open"));
        lock_exclusive(&first).expect("first lock");
        let second = OwnedFd::from(fs::File::open(dir.path()).expect("open"));
        assert!(held(&second), "a second open took the lock");
        let dup = first.try_clone().expect("dup");
        drop(first);
        assert!(
            held(&second),
            "the lock went with the first descriptor while a duplicate was open"
        );
        drop(dup);
        lock_exclusive(&second).expect("free once all closed");
    }
}
