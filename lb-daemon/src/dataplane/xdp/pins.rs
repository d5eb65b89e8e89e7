//! Where the eBPF plane pins its state on a bpffs (`[global] bpf_pin_dir`), so that the
//! program, its attachments and its maps outlive the daemon: after a crash, a `SIGKILL` or a
//! restart, established flows keep flowing and new ones are placed on the last table
//! (health frozen) until a daemon starts again and adopts the set.
//!
//! Layout, under the pin directory `D`: `D/v{LAYOUT_VERSION}/` holds one file per map of
//! `lb_common::maps::PINNED_MAPS` (by map name) and one per program link,
//! `link_{native|generic|tcx}_{interface}`, a `.` of the interface's name written `:` (bpffs
//! refuses dots in names; interface names have no `:`). A daemon adopts only the set of its own layout
//! version; a set of another version (an upgrade that changed the maps) is removed with a
//! warning, which detaches its programs and cuts its flows. Attachments through netlink (tc
//! `clsact` on kernels before 6.6, XDP before 5.9) cannot be pinned: their flows end with
//! the daemon, as before.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use lb_common::maps::{LAYOUT_VERSION, PINNED_MAPS, VIPS};
use tracing::{info, warn};

use super::AttachMode;

/// `statfs` magic of a bpffs (`BPF_FS_MAGIC`, linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where a bpffs is mounted on a systemd host; the daemon mounts one there when a pin
/// directory below it finds none (a host or container without systemd), as Cilium's agent
/// does.
const BPF_FS: &str = "/sys/fs/bpf";

/// Why the pin directory cannot be used; the plane then runs unpinned (flows end with the
/// daemon), with a warning.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The directory (or its set directory) could not be created or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Another daemon holds the directory (`pin_lock`): this one must not touch its set.
    #[error(transparent)]
    Held(#[from] super::pin_lock::PinLockError),
    /// The directory is not on a bpffs (mount one: `mount -t bpf bpf /sys/fs/bpf`).
    #[error("{} is not on a bpffs (mount -t bpf bpf /sys/fs/bpf)", path.display())]
    NotBpffs {
        /// The directory.
        path: PathBuf,
    },
}

/// The pinned set of this layout version: `bpf_pin_dir/v{LAYOUT_VERSION}`.
#[derive(Debug, Clone)]
pub struct Pins {
    root: PathBuf,
    set: PathBuf,
}

impl Pins {
    /// Opens the set of this layout version under `root`, creating `root` and the set
    /// directory (mode 0700) as needed, after removing the sets of other layout versions
    /// (logged: their flows are cut). Returns the set and whether it holds pinned maps to
    /// adopt.
    ///
    /// Returns `Err(PinError::NotBpffs)` when `root` is not on a bpffs,
    /// `Err(PinError::Held)` when another daemon holds `root` (`pin_lock`),
    /// `Err(PinError::Io)` when a directory cannot be created or read.
    pub fn open(root: &Path) -> Result<(Pins, bool), PinError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PinError::Io { path, source }
        };
        make_root(root)?;
        // Before anything in it is read or removed.
        super::pin_lock::claim(root)?;
        let set = root.join(format!("v{LAYOUT_VERSION}"));
        for entry in fs::read_dir(root).map_err(io_err(root))? {
            let path = entry.map_err(io_err(root))?.path();
            if path != set && is_set(&path) {
                warn!(
                    "eBPF: {} holds a pinned data plane of another map layout (this daemon's is \
                     v{LAYOUT_VERSION}); removing it: the flows it carried are cut",
                    path.display()
                );
                remove_set(&path);
            }
        }
        let adopt = set.join(VIPS).exists();
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&set)
            .or_else(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(e),
            })
            .map_err(io_err(&set))?;
        Ok((
            Pins {
                root: root.to_path_buf(),
                set,
            },
            adopt,
        ))
    }

    /// The set's directory.
    pub fn dir(&self) -> &Path {
        &self.set
    }

    /// Where map `name` is pinned.
    pub fn map_path(&self, name: &str) -> PathBuf {
        self.set.join(name)
    }

    /// Where the link attaching a program to `interface` in `mode` is pinned; `None` for
    /// `clsact`, which has no link to pin.
    pub fn link_path(&self, interface: &str, mode: AttachMode) -> Option<PathBuf> {
        let slug = match mode {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
            AttachMode::Tcx => "tcx",
            AttachMode::Clsact => return None,
        };
        Some(
            self.set
                .join(format!("link_{slug}_{}", interface.replace('.', ":"))),
        )
    }

    /// The pinned links of the set: each interface, how its program is attached, and the
    /// pin's path. Files that are not links of this layout are ignored.
    pub fn links(&self) -> Vec<(String, AttachMode, PathBuf)> {
        let Ok(dir) = fs::read_dir(&self.set) else {
            return Vec::new();
        };
        let mut links = Vec::new();
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let mut parts = name.splitn(3, '_');
            let (Some("link"), Some(slug), Some(interface)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let mode = match slug {
                "native" => AttachMode::Native,
                "generic" => AttachMode::Generic,
                "tcx" => AttachMode::Tcx,
                _ => continue,
            };
            links.push((interface.replace(':', "."), mode, entry.path()));
        }
        links.sort_by(|a, b| a.0.cmp(&b.0));
        links
    }

    /// Removes the set: its links' programs are detached once the daemon closes its own
    /// descriptors (at once for those it holds none of), and its maps are freed with the
    /// last program that uses them. The pin directory itself goes if nothing else is in it.
    pub fn remove(&self) {
        remove_set(&self.set);
        // Fails when another set or file is there: it stays.
        let _ = fs::remove_dir(&self.root);
        info!("eBPF: pins under {} removed", self.set.display());
    }
}

/// Makes pin directory `root` (mode 0700, its parents as needed) on a bpffs, mounting one at
/// `/sys/fs/bpf` first if `root` is below it and none is there. Nothing when it exists.
///
/// Returns `Err(PinError::Io)` when it cannot be made, `Err(PinError::NotBpffs)` when it is
/// not on a bpffs.
pub fn make_root(root: &Path) -> Result<(), PinError> {
    if root.starts_with(BPF_FS) && !is_bpffs(Path::new(BPF_FS)) {
        mount_bpffs_once();
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(|source| PinError::Io {
            path: root.to_path_buf(),
            source,
        })?;
    if !is_bpffs(root) {
        return Err(PinError::NotBpffs {
            path: root.to_path_buf(),
        });
    }
    Ok(())
}

/// Removes a set found under `root` while no eBPF plane runs (the config has no eBPF
/// service any more): its programs would go on forwarding the VIPs on a frozen table.
/// Logged when there was one; errors are logged too. A set another daemon holds
/// (`pin_lock`) is that daemon's, and stays; the lock this one took to look is let go of.
pub fn remove_unused(root: &Path) {
    use super::pin_lock;
    if let Err(e) = pin_lock::claim(root) {
        info!(
            "eBPF: the pins under {} are left alone: {e}",
            root.display()
        );
        return;
    }
    remove_sets(root);
    // This daemon runs no eBPF plane: it held the lock (its own, or one an upgrade handed
    // it) only to look, and must not keep a later eBPF daemon out.
    pin_lock::release();
}

/// [`remove_unused`]'s work, under the lock.
fn remove_sets(root: &Path) {
    let Ok(dir) = fs::read_dir(root) else {
        return;
    };
    for path in dir.flatten().map(|e| e.path()).filter(|p| is_set(p)) {
        warn!(
            "eBPF: {} holds a pinned data plane and no service runs on eBPF now; removing it: \
             the flows it carried are cut",
            path.display()
        );
        remove_set(&path);
    }
    let _ = fs::remove_dir(root);
}

/// Whether `path` is on a bpffs (`false` when it cannot be told).
// `f_type`'s width differs between architectures: the cast is not a no-op everywhere.
#[allow(clippy::unnecessary_cast)]
fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|fs| fs.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// A lock file for [`mount_bpffs_once`].
const MOUNT_LOCK: &str = "/run/lb-bpffs.lock";

/// Mounts a bpffs at [`BPF_FS`] unless one is there, under an exclusive lock on
/// [`MOUNT_LOCK`]: daemons starting at once (the tests run many) would otherwise each mount
/// one, stacked, and pin into instances the others cannot see. Without the lock file (no
/// writable `/run`) it mounts unlocked.
fn mount_bpffs_once() {
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(MOUNT_LOCK)
        .ok()
        .and_then(|f| nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).ok());
    if !is_bpffs(Path::new(BPF_FS)) {
        mount_bpffs();
    }
    drop(lock);
}

/// Mounts a bpffs at [`BPF_FS`]; logs the outcome (without `CAP_SYS_ADMIN` it fails, and the
/// plane runs unpinned: under systemd the bpffs is there already).
fn mount_bpffs() {
    use nix::mount::{mount, MsFlags};
    match mount(
        Some("bpf"),
        BPF_FS,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    ) {
        Ok(()) => info!("eBPF: mounted a bpffs at {BPF_FS} (there was none)"),
        Err(e) => warn!("eBPF: there is no bpffs at {BPF_FS} and mounting one failed: {e}"),
    }
}

/// Whether `path` is a set directory: `v` and a number.
fn is_set(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix('v'))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        && path.is_dir()
}

/// Removes a set directory and its pins (bpffs has no recursive removal of its own; each
/// pin is a file). Errors are logged.
fn remove_set(path: &Path) {
    if let Err(e) = fs::remove_dir_all(path) {
        warn!("eBPF: cannot remove {}: {e}", path.display());
    }
}

/// The maps of `PINNED_MAPS` with their pin paths in `pins`, for the loader.
pub fn map_paths(pins: &Pins) -> Vec<(&'static str, PathBuf)> {
    PINNED_MAPS
        .iter()
        .map(|name| (*name, pins.map_path(name)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_directories_are_v_and_a_number() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["v1", "v22", "vx", "v", "links"] {
            fs::create_dir(dir.path().join(name)).expect("mkdir");
        }
        let sets: Vec<bool> = ["v1", "v22", "vx", "v", "links"]
            .iter()
            .map(|n| is_set(&dir.path().join(n)))
            .collect();
        assert_eq!(sets, [true, true, false, false, false]);
    }

    #[test]
    fn link_pins_name_their_mode_and_interface() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pins = Pins {
            root: dir.path().to_path_buf(),
            set: dir.path().to_path_buf(),
        };
        for (iface, mode) in [
            ("eth0.100", AttachMode::Tcx),
            ("l0", AttachMode::Native),
            ("br-x", AttachMode::Generic),
        ] {
            let path = pins.link_path(iface, mode).expect("a link");
            fs::write(path, b"").expect("write");
        }
        assert_eq!(pins.link_path("l0", AttachMode::Clsact), None);
        fs::write(dir.path().join("VIPS"), b"").expect("write");
        let links: Vec<(String, AttachMode)> =
            pins.links().into_iter().map(|(i, m, _)| (i, m)).collect();
        assert_eq!(
            links,
            [
                ("br-x".to_string(), AttachMode::Generic),
                ("eth0.100".to_string(), AttachMode::Tcx),
                ("l0".to_string(), AttachMode::Native),
            ]
        );
    }
}
