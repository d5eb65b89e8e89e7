//! The proxy workers' scheduling priority (`[global] worker_priority`, a nice value).
//!
//! Linux keeps a nice value per thread, so the workers lower theirs when they start and the
//! control plane (health checks, admin API) keeps the daemon's own. A nice value below the
//! current one needs `CAP_SYS_NICE` or a high enough `RLIMIT_NICE`. The capability goes when
//! the daemon lowers its privileges (`crate::privileges`), so at start-up, while it still has
//! `CAP_SYS_RESOURCE`, the daemon raises `RLIMIT_NICE` far enough instead: a limit of `n`
//! lets a process lower its threads down to `20 - n` and nothing more, and it passes to the
//! daemon an upgrade in place (SIGUSR2) starts, whose workers lower themselves too. Where the
//! limit cannot be raised (a container without `CAP_SYS_RESOURCE`), the daemon keeps
//! `CAP_SYS_NICE` instead ([`needs_capability`]).

use std::io;

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Why a thread's priority could not be set.
#[derive(Debug, thiserror::Error)]
pub enum PriorityError {
    /// The kernel refused: `nice` is below the current value and the thread has neither
    /// `CAP_SYS_NICE` nor an `RLIMIT_NICE` that allows it (`EACCES`/`EPERM`).
    #[error("cannot set the nice value to {nice}: {source}")]
    Refused {
        /// The nice value asked for, -20 to 19.
        nice: i32,
        /// The kernel's error.
        source: io::Error,
    },
    /// `RLIMIT_NICE` could not be read or raised to allow `nice` (raising its hard limit
    /// needs `CAP_SYS_RESOURCE`).
    #[error("cannot raise RLIMIT_NICE to {} for a nice value of {nice}: {source}", limit_for(*.nice))]
    Limit {
        /// The nice value the limit should allow, -20 to 18 (below the daemon's own).
        nice: i32,
        /// The kernel's error.
        source: io::Error,
    },
}

/// The `RLIMIT_NICE` value that lets a process lower a thread to `nice` (-20 to 19):
/// `20 - nice`, so 30 for -10 (setrlimit(2), "RLIMIT_NICE").
pub fn limit_for(nice: i32) -> u64 {
    u64::try_from(20 - nice.clamp(-20, 19)).unwrap_or(0)
}

/// How [`allow`] made way for the workers' nice value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// The value is not below the calling thread's: nothing was needed.
    NotLower,
    /// `RLIMIT_NICE` allows it (it did, or the daemon raised it).
    Limit,
    /// `RLIMIT_NICE` could not be raised, and the thread has `CAP_SYS_NICE`, which
    /// `crate::privileges` then keeps ([`needs_capability`]).
    Capability,
}

/// Makes sure that threads can be lowered to `nice` also after the daemon dropped
/// `CAP_SYS_NICE`: raises `RLIMIT_NICE` (soft and hard) to [`limit_for`]`(nice)` when `nice`
/// is below the calling thread's value and the limit does not allow it. Call it at start-up,
/// before `crate::privileges::lower`.
///
/// Returns `Err(PriorityError::Limit)` when the limit cannot be raised (no
/// `CAP_SYS_RESOURCE` for the hard limit) and the thread has no `CAP_SYS_NICE` either: the
/// workers would stay at the daemon's value.
pub fn allow(nice: i32) -> Result<Allowed, PriorityError> {
    if !lowers(nice) {
        return Ok(Allowed::NotLower);
    }
    let wanted = limit_for(nice);
    let refused = |e: nix::Error| PriorityError::Limit {
        nice,
        source: io::Error::from(e),
    };
    let (soft, hard) = getrlimit(Resource::RLIMIT_NICE).map_err(refused)?;
    if soft >= wanted {
        return Ok(Allowed::Limit);
    }
    match setrlimit(Resource::RLIMIT_NICE, wanted, hard.max(wanted)) {
        Ok(()) => Ok(Allowed::Limit),
        Err(_)
            if caps::has_cap(
                None,
                caps::CapSet::Effective,
                caps::Capability::CAP_SYS_NICE,
            )
            .unwrap_or(false) =>
        {
            Ok(Allowed::Capability)
        }
        Err(e) => Err(refused(e)),
    }
}

/// Whether `nice` is below the calling thread's nice value (lowering needs a privilege).
fn lowers(nice: i32) -> bool {
    this_thread().map_or(true, |current| nice < current)
}

/// Whether lowering a thread to `nice` will need `CAP_SYS_NICE`: `nice` is below the calling
/// thread's value and this process's `RLIMIT_NICE` does not allow it (the daemon could not
/// raise it, see [`allow`]; a container without `CAP_SYS_RESOURCE`). `crate::privileges`
/// then keeps the capability, so that the daemon an upgrade in place starts can lower its
/// workers too.
pub fn needs_capability(nice: i32) -> bool {
    lowers(nice)
        && getrlimit(Resource::RLIMIT_NICE).map_or(true, |(soft, _)| soft < limit_for(nice))
}

/// Sets the calling thread's nice value to `nice` (-20 to 19); other threads keep theirs.
///
/// Returns `Err(PriorityError::Refused)` when the kernel refuses (see [`allow`]).
pub fn set_this_thread(nice: i32) -> Result<(), PriorityError> {
    // SAFETY: plain syscalls on the calling thread's own id.
    let ret = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(PriorityError::Refused {
            nice,
            source: io::Error::last_os_error(),
        })
    }
}

/// The calling thread's nice value, -20 to 19.
///
/// Returns `Err` when the kernel cannot report it (it can always report a thread's own).
pub fn this_thread() -> io::Result<i32> {
    // `getpriority` may return -1 as a value: errno tells an error apart.
    // SAFETY: plain syscalls on the calling thread's own id and errno.
    unsafe {
        *libc::__errno_location() = 0;
        let tid = libc::gettid();
        let value = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
        if value == -1 && *libc::__errno_location() != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_twenty_less_the_nice_value() {
        assert_eq!(limit_for(-10), 30);
        assert_eq!(limit_for(-20), 40);
        assert_eq!(limit_for(0), 20);
        assert_eq!(limit_for(19), 1);
        assert_eq!(limit_for(-99), 40, "clamped to the range");
    }

    /// Raising a thread's nice value needs no privilege, and only that thread changes.
    #[test]
    fn a_thread_sets_its_own_nice_value_only() {
        let before = this_thread().expect("own nice value");
        let target = (before + 3).min(19);
        let inside = std::thread::spawn(move || {
            set_this_thread(target).expect("raising the nice value is always allowed");
            this_thread().expect("own nice value")
        })
        .join()
        .expect("the thread ran");
        assert_eq!(inside, target);
        assert_eq!(this_thread().expect("own nice value"), before);
    }
}
