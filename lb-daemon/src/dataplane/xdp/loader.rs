//! Finding, loading and attaching the BPF object's programs: `lb_xdp` at the XDP hook,
//! `lb_tc` at the tc ingress hook.
//!
//! Nothing is pinned. Programs are attached through BPF links (XDP links; TCX links for tc,
//! kernel 6.6 and later), so the kernel detaches them when the process's link descriptors
//! close: on a clean exit and on a crash alike. No program is left forwarding with a table
//! nobody updates. Older kernels fall back to netlink attachments (XDP before 5.9; tc through
//! a `clsact` qdisc before 6.6): those are removed on a clean exit, when the object is
//! dropped, but a crash leaves them; the `clsact` qdisc itself stays (it is empty, and
//! harmless).

use std::path::{Path, PathBuf};

use aya::programs::tc::{NlOptions, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode};
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
    /// The object has no program of this name: it is not lb's, or of another version than
    /// this daemon. (A missing map is `MapsError::Missing`, found when the maps are taken.)
    #[error("the BPF object {} has no {what} `{name}`; it is not the lb-ebpf this daemon was built with", path.display())]
    Missing {
        /// The object.
        path: PathBuf,
        /// What is missing: "XDP program", "tc program".
        what: &'static str,
        /// The missing name.
        name: String,
    },
    /// The kernel refused the program (the verifier's log is in the message).
    #[error("the kernel refused the program `{name}`: {source}")]
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
    /// The object has no tc program `lb_tc` (it was built before the tc data plane): only
    /// the XDP hook is possible.
    #[error("the BPF object {} has no lb_tc program (it predates the tc data plane; rebuild it with `cargo xtask build-ebpf`)", path.display())]
    NoTcProgram {
        /// The object.
        path: PathBuf,
    },
    /// The tc program could not attach to the interface, through TCX nor through a
    /// `clsact` qdisc.
    #[error("cannot attach tc to {interface}: TCX: {tcx}; clsact: {clsact}")]
    TcAttach {
        /// The interface.
        interface: String,
        /// Why the TCX link failed.
        tcx: String,
        /// Why the netlink attachment through `clsact` failed.
        clsact: String,
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

/// Which hook, and how, a program ended up attached to on an interface. An interface
/// carries one hook: XDP (native or generic) or tc, never both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// `lb_xdp` in the driver (`xdpdrv`): the fast path proper.
    Native,
    /// `lb_xdp` in the kernel's generic receive path (`xdpgeneric`): works on any interface,
    /// at a fraction of native speed, and what it redirects into a bridge vanishes.
    Generic,
    /// `lb_tc` at tc ingress through a TCX link (kernel 6.6 and later).
    Tcx,
    /// `lb_tc` at tc ingress as a filter of a `clsact` qdisc (older kernels).
    Clsact,
}

impl AttachMode {
    /// Whether this is the tc hook (`lb_tc`) rather than XDP (`lb_xdp`).
    pub fn is_tc(self) -> bool {
        matches!(self, AttachMode::Tcx | AttachMode::Clsact)
    }

    /// The program on this hook: `lb_tc` or `lb_xdp`.
    pub fn program(self) -> &'static str {
        if self.is_tc() {
            lb_common::maps::PROG_TC
        } else {
            lb_common::maps::PROG_BALANCER
        }
    }
}

/// As the log and `/status` say it: `XDP native`, `XDP generic`, `tc` (a TCX link), `tc
/// clsact`.
impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachMode::Native => "XDP native",
            AttachMode::Generic => "XDP generic",
            AttachMode::Tcx => "tc",
            AttachMode::Clsact => "tc clsact",
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
/// process that never uses them (the decapsulator needs no Maglev tables). `pinned`: maps
/// (name, bpffs path) opened from their pin when one exists there, else created and pinned
/// there (see `pins.rs`).
///
/// Returns `Err(LoadError::Object)` when the file is not a BPF object or a map cannot be
/// created or pinned (no root, no memory).
pub fn load_object(
    path: &Path,
    shrink: &[&str],
    pinned: &[(&'static str, PathBuf)],
) -> Result<Ebpf, LoadError> {
    let mut loader = EbpfLoader::new();
    for name in shrink {
        loader.map_max_entries(name, 1);
    }
    for (name, pin) in pinned {
        loader.map_pin_path(name, pin.as_path());
    }
    loader.load_file(path).map_err(|source| LoadError::Object {
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}

/// Loads XDP program `name` of `ebpf` into the kernel (the verifier runs here); if it is
/// loaded already, returns it.
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
    if prog.fd().is_err() {
        prog.load().map_err(|source| LoadError::Program {
            name: name.to_string(),
            source: Box::new(source),
        })?;
    }
    Ok(prog)
}

/// Loads tc program `name` of `ebpf` into the kernel (the verifier runs here); if it is
/// loaded already, returns it.
///
/// Returns `Err(LoadError::NoTcProgram)` when the object has no tc program of that name (an
/// object built before the tc data plane), and `Err(LoadError::Program)` when the kernel
/// refuses it.
pub fn load_tc_program<'a>(
    ebpf: &'a mut Ebpf,
    path: &Path,
    name: &str,
) -> Result<&'a mut SchedClassifier, LoadError> {
    let missing = || LoadError::NoTcProgram {
        path: path.to_path_buf(),
    };
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or_else(missing)?
        .try_into()
        .map_err(|_| missing())?;
    if prog.fd().is_err() {
        prog.load().map_err(|source| LoadError::Program {
            name: name.to_string(),
            source: Box::new(source),
        })?;
    }
    Ok(prog)
}

/// Attaches the loaded tc program `prog` at `interface`'s ingress: a TCX link first (kernel
/// 6.6 and later; it goes after any TCX program already there), else a filter of the
/// interface's `clsact` qdisc, which is added when missing.
///
/// Returns the mode it attached in and the link, which `SchedClassifier::detach` takes;
/// `Err(LoadError::TcAttach)` with both ways' errors.
pub fn attach_tc(prog: &mut SchedClassifier, interface: &str) -> Result<TcAttached, LoadError> {
    let tcx = match attach_tcx(prog, interface) {
        Ok(link) => {
            return Ok(TcAttached {
                mode: AttachMode::Tcx,
                link,
            })
        }
        Err(e) => e,
    };
    match attach_clsact(prog, interface) {
        Ok(link) => {
            warn!(
                "tc on {interface} is attached through a clsact qdisc (no TCX: {tcx}); a crash \
                 leaves it attached until `tc filter del dev {interface} ingress`"
            );
            Ok(TcAttached {
                mode: AttachMode::Clsact,
                link,
            })
        }
        Err(clsact) => Err(LoadError::TcAttach {
            interface: interface.to_string(),
            tcx,
            clsact,
        }),
    }
}

/// Attaches `prog` at `interface`'s tc ingress through a TCX link, after any TCX program
/// there. `Err`: why not, in words (a kernel before 6.6 has no TCX).
fn attach_tcx(
    prog: &mut SchedClassifier,
    interface: &str,
) -> Result<aya::programs::tc::SchedClassifierLinkId, String> {
    prog.attach_with_options(
        interface,
        TcAttachType::Ingress,
        TcAttachOptions::TcxOrder(LinkOrder::default()),
    )
    .map_err(|e| error_chain(&e))
}

/// Attaches `prog` at `interface`'s tc ingress as a filter of its `clsact` qdisc, adding the
/// qdisc when it is missing. `Err`: why not, in words.
fn attach_clsact(
    prog: &mut SchedClassifier,
    interface: &str,
) -> Result<aya::programs::tc::SchedClassifierLinkId, String> {
    if let Err(e) = aya::programs::tc::qdisc_add_clsact(interface) {
        // A clsact qdisc that is there already (another tc user's, or ours from a run that
        // crashed) takes our filter as well.
        let exists = matches!(&e, aya::programs::tc::TcError::NetlinkError(n)
            if n.raw_os_error() == Some(libc::EEXIST));
        if !exists {
            return Err(format!("adding the clsact qdisc: {}", error_chain(&e)));
        }
    }
    prog.attach_with_options(
        interface,
        TcAttachType::Ingress,
        TcAttachOptions::Netlink(NlOptions::default()),
    )
    .map_err(|e| error_chain(&e))
}

/// A tc program attached to an interface by [`attach_tc`].
#[derive(Debug)]
pub struct TcAttached {
    /// TCX or clsact.
    pub mode: AttachMode,
    /// The attachment, for `SchedClassifier::detach`; dropping it leaves the program
    /// attached until the object is dropped.
    pub link: aya::programs::tc::SchedClassifierLinkId,
}

/// Attaches the loaded `prog` to `interface`: native mode first, then, if `allow_generic`,
/// generic mode (with a warning) when the driver has no XDP support.
///
/// Returns the mode it attached in and the link, which `Xdp::detach` takes;
/// `Err(LoadError::NativeOnly)` when native mode failed and generic is not allowed,
/// `Err(LoadError::Attach)` with both modes' errors.
pub fn attach(
    prog: &mut Xdp,
    interface: &str,
    allow_generic: bool,
) -> Result<(AttachMode, aya::programs::xdp::XdpLinkId), LoadError> {
    let native = match prog.attach(interface, XdpMode::Driver) {
        Ok(link) => return Ok((AttachMode::Native, link)),
        Err(e) => error_chain(&e),
    };
    if !allow_generic {
        return Err(LoadError::NativeOnly {
            interface: interface.to_string(),
            native,
        });
    }
    match prog.attach(interface, XdpMode::Skb) {
        Ok(link) => {
            warn!(
                "XDP on {interface} runs in generic (SKB) mode, at a fraction of native speed: \
                 native mode failed: {native}"
            );
            Ok((AttachMode::Generic, link))
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

/// Whether `interface` is a loopback device (`lo`, or any of type `ARPHRD_LOOPBACK`) in the
/// daemon's network namespace.
pub fn is_loopback(interface: &str) -> bool {
    interface == "lo"
        || matches!(
            super::iface_kind::kind_of(interface),
            Ok(super::iface_kind::InterfaceKind::Loopback)
        )
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

    /// The fallback for kernels without TCX, run on this one: `lb_tc` as a filter of a
    /// `clsact` qdisc, found by `tc`, and gone when the object is dropped (a clean exit).
    #[test]
    fn lb_tc_attaches_through_clsact_and_goes_with_the_object() {
        if !lb_tests::require_root("loader::lb_tc_attaches_through_clsact") {
            return;
        }
        let object = lb_tests::xdp::bpf_object();
        let ns = lb_tests::netns::Netns::new("clsact").expect("a namespace");
        ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"])
            .expect("a veth pair");
        ns.ip(&["link", "set", "v0", "up"]).expect("v0 up");
        // A clsact qdisc already there (another tc user's) takes our filter as well.
        ns.run("tc", &["qdisc", "add", "dev", "v0", "clsact"])
            .expect("a clsact qdisc");
        let filters = || {
            let out = ns
                .run("tc", &["filter", "show", "dev", "v0", "ingress"])
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            out.unwrap_or_else(|e| panic!("tc filter show: {e}"))
        };
        let ebpf = ns
            .enter(|| {
                let mut ebpf = load_object(&object, &[], &[]).expect("the object loads");
                let prog = load_tc_program(&mut ebpf, &object, lb_common::maps::PROG_TC)
                    .expect("lb_tc loads");
                attach_clsact(prog, "v0").expect("lb_tc attaches through clsact");
                ebpf
            })
            .expect("enter the namespace");
        let shown = filters();
        assert!(
            shown.contains("lb_tc"),
            "tc filter show dev v0 ingress must list lb_tc: {shown}"
        );
        // Dropped where it was attached: the netlink detach goes to the thread's namespace.
        ns.enter(move || drop(ebpf)).expect("enter the namespace");
        let shown = filters();
        assert!(
            !shown.contains("lb_tc"),
            "the filter must go with the object: {shown}"
        );
    }
}
