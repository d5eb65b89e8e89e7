//! Finding, loading and attaching the BPF object's XDP programs.
//!
//! Nothing is pinned. Programs are attached through BPF links (the kernel falls back to a
//! netlink attach only where links are missing, before 5.9), so the kernel detaches them when
//! the process's link descriptors close: on a clean exit and on a crash alike. No program is
//! left forwarding with a table nobody updates.

use std::path::{Path, PathBuf};

use aya::programs::{Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use tracing::warn;

/// Environment variable naming the BPF object, checked before the built-in locations.
pub const OBJECT_ENV: &str = "LB_EBPF_OBJ";
/// Where `cargo xtask build-ebpf` writes the object, relative to the workspace root.
pub const BUILD_OUTPUT: &str = "target/bpf/bpfel-unknown-none/release/lb-ebpf";
/// Where a package installs the object.
pub const INSTALLED: &str = "/usr/lib/lb/lb-ebpf";
/// The object's file name next to the `lb-daemon` executable.
pub const OBJECT_NAME: &str = "lb-ebpf";

/// Why the BPF object could not be found, loaded or attached.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// No object at the configured path, nor at any default location.
    #[error("no BPF object found (looked at {}); build it with `cargo xtask build-ebpf` or set [global] bpf_object", .tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    NotFound {
        /// Every path looked at, in order.
        tried: Vec<PathBuf>,
    },
    /// The object could not be parsed or its maps created (not root, no BPF, a bad file).
    #[error("cannot load the BPF object {}: {source}", path.display())]
    Object {
        /// The object.
        path: PathBuf,
        /// What aya reported.
        source: Box<aya::EbpfError>,
    },
    /// The object has no XDP program of this name: it is not lb's, or of another version
    /// than this daemon. (A missing map is `MapsError::Missing`, found when the maps are
    /// taken.)
    #[error("the BPF object {} has no {what} `{name}`; it is not the lb-ebpf this daemon was built with", path.display())]
    Missing {
        /// The object.
        path: PathBuf,
        /// What is missing: "XDP program".
        what: &'static str,
        /// The missing name.
        name: String,
    },
    /// The kernel refused the program (the verifier's log is in the message).
    #[error("the kernel refused the XDP program `{name}`: {source}")]
    Program {
        /// The program.
        name: String,
        /// What the kernel said.
        source: Box<aya::programs::ProgramError>,
    },
    /// Native XDP could not attach to the interface, and generic mode was not allowed: a
    /// `dataplane = "auto"` service never runs on generic XDP, which cannot deliver
    /// everywhere (redirected frames vanish into a bridge).
    #[error("no native XDP on {interface} ({native}); generic XDP is used only with dataplane = \"xdp\"")]
    NativeOnly {
        /// The interface.
        interface: String,
        /// Why native (driver) mode failed.
        native: String,
    },
    /// Neither native nor generic XDP could attach to the interface.
    #[error("cannot attach XDP to {interface}: native mode: {native}; generic mode: {generic}")]
    Attach {
        /// The interface.
        interface: String,
        /// Why native (driver) mode failed.
        native: String,
        /// Why generic (SKB) mode failed.
        generic: String,
    },
}

/// How a program ended up attached to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver (`xdpdrv`): the fast path proper.
    Native,
    /// In the kernel's generic receive path (`xdpgeneric`): works on any interface, at a
    /// fraction of native speed.
    Generic,
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
        })
    }
}

/// The places searched for the BPF object, in order: `configured` (`[global] bpf_object`)
/// alone if given; else `$LB_EBPF_OBJ`, `lb-ebpf` next to the running executable,
/// [`BUILD_OUTPUT`] under the current directory, then [`INSTALLED`].
pub fn candidates(configured: Option<&Path>) -> Vec<PathBuf> {
    if let Some(p) = configured {
        return vec![p.to_path_buf()];
    }
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os(OBJECT_ENV).filter(|p| !p.is_empty()) {
        out.push(PathBuf::from(p));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        out.push(dir.join(OBJECT_NAME));
    }
    out.push(PathBuf::from(BUILD_OUTPUT));
    out.push(PathBuf::from(INSTALLED));
    out
}

/// The first of [`candidates`] that is a file.
///
/// Returns `Err(LoadError::NotFound)` listing every place looked at.
pub fn find_object(configured: Option<&Path>) -> Result<PathBuf, LoadError> {
    let tried = candidates(configured);
    tried
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or(LoadError::NotFound { tried })
}

/// Loads the object at `path` into the kernel's map and BTF tables (programs are loaded
/// separately, by [`load_program`]). `shrink`: maps to create with one entry only, for a
/// process that never uses them (the decapsulator needs no Maglev tables).
///
/// Returns `Err(LoadError::Object)` when the file is not a BPF object or a map cannot be
/// created (no root, no memory).
pub fn load_object(path: &Path, shrink: &[&str]) -> Result<Ebpf, LoadError> {
    let mut loader = EbpfLoader::new();
    for name in shrink {
        loader.map_max_entries(name, 1);
    }
    loader.load_file(path).map_err(|source| LoadError::Object {
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}

/// Loads XDP program `name` of `ebpf` into the kernel (the verifier runs here).
///
/// Returns `Err(LoadError::Missing)` when the object has no XDP program of that name, and
/// `Err(LoadError::Program)` when the kernel refuses it.
pub fn load_program<'a>(
    ebpf: &'a mut Ebpf,
    path: &Path,
    name: &str,
) -> Result<&'a mut Xdp, LoadError> {
    let missing = || LoadError::Missing {
        path: path.to_path_buf(),
        what: "XDP program",
        name: name.to_string(),
    };
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(missing)?
        .try_into()
        .map_err(|_| missing())?;
    prog.load().map_err(|source| LoadError::Program {
        name: name.to_string(),
        source: Box::new(source),
    })?;
    Ok(prog)
}

/// Attaches the loaded `prog` to `interface`: native mode first, then, if `allow_generic`,
/// generic mode (with a warning) when the driver has no XDP support.
///
/// Returns the mode it attached in; `Err(LoadError::NativeOnly)` when native mode failed and
/// generic is not allowed, `Err(LoadError::Attach)` with both modes' errors.
pub fn attach(
    prog: &mut Xdp,
    interface: &str,
    allow_generic: bool,
) -> Result<AttachMode, LoadError> {
    let native = match prog.attach(interface, XdpMode::Driver) {
        Ok(_) => return Ok(AttachMode::Native),
        Err(e) => error_chain(&e),
    };
    if !allow_generic {
        return Err(LoadError::NativeOnly {
            interface: interface.to_string(),
            native,
        });
    }
    match prog.attach(interface, XdpMode::Skb) {
        Ok(_) => {
            warn!(
                "XDP on {interface} runs in generic (SKB) mode, at a fraction of native speed: \
                 native mode failed: {native}"
            );
            Ok(AttachMode::Generic)
        }
        Err(e) => Err(LoadError::Attach {
            interface: interface.to_string(),
            native,
            generic: error_chain(&e),
        }),
    }
}

/// The interface's index, or `None` when there is no such interface.
pub fn if_index(interface: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(interface).ok()
}

/// Whether `interface` is a loopback device (`lo`, or any of type `ARPHRD_LOOPBACK`).
pub fn is_loopback(interface: &str) -> bool {
    const ARPHRD_LOOPBACK: &str = "772";
    interface == "lo"
        || std::fs::read_to_string(format!("/sys/class/net/{interface}/type"))
            .is_ok_and(|t| t.trim() == ARPHRD_LOOPBACK)
}

/// `e` and its sources, joined with ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_object_is_the_only_candidate() {
        let got = candidates(Some(Path::new("/opt/lb/lb-ebpf")));
        assert_eq!(got, vec![PathBuf::from("/opt/lb/lb-ebpf")]);
    }

    #[test]
    fn default_search_ends_with_the_build_output_then_the_installed_path() {
        let got = candidates(None);
        let n = got.len();
        assert!(n >= 3, "{got:?}");
        assert_eq!(got[n - 2], PathBuf::from(BUILD_OUTPUT));
        assert_eq!(got[n - 1], PathBuf::from(INSTALLED));
        assert!(
            got[n - 3].ends_with(OBJECT_NAME),
            "next to the executable comes before the build output: {got:?}"
        );
    }

    #[test]
    fn a_missing_object_names_every_place_looked_at() {
        let e = find_object(Some(Path::new("/nonexistent/lb-ebpf"))).expect_err("no such file");
        assert!(e.to_string().contains("/nonexistent/lb-ebpf"), "{e}");
        assert!(e.to_string().contains("cargo xtask build-ebpf"), "{e}");
    }

    #[test]
    fn lo_is_loopback() {
        assert!(is_loopback("lo"));
    }
}
