//! The paths under test and how each balancer is configured and started in the balancer
//! namespace: lb-daemon (proxy, either splice mode; XDP in NAT and DSR mode), HAProxy
//! (`mode tcp`) and nginx (`stream`), all with the same three backends, round robin where the
//! data plane has it (the XDP program has only a Maglev table).

use std::fmt::Write as _;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::report::PathKind;
use crate::server::{BULK_PORT, RR_PORT, UDP_PORT};
use crate::topology::{backend_addr, Topology, BACKENDS, VIP, XDP_VIP};

pub use crate::xdp::XdpVeth;
pub use lb_tests::xdp::Mode;

/// The balancer's request/reply port (to backends' [`RR_PORT`]).
pub const VIP_RR: u16 = 8000;
/// The balancer's bulk port (to backends' [`BULK_PORT`]).
pub const VIP_BULK: u16 = 8001;
/// The balancer's UDP port (to backends' [`UDP_PORT`]).
pub const VIP_UDP: u16 = 8002;

/// A path traffic takes from the client to the backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// No balancer: the client spreads flows over the backends itself; the balancer
    /// namespace only routes.
    Direct,
    /// `direct` on the veth set-up the XDP paths need (checksum offload off, an XDP program
    /// on every veth, here one that passes everything to the kernel's routing): the
    /// no-balancer limit under XDP's conditions, which tells the cost of XDP on veth apart
    /// from the cost of lb's program.
    DirectXdpVeth,
    /// lb-daemon's userspace proxy with io_uring splice (`LB_PROXY_SPLICE=uring`).
    LbProxy,
    /// lb-daemon's userspace proxy with splice(2) system calls (`LB_PROXY_SPLICE=syscall`,
    /// the daemon's default).
    LbProxySyscall,
    /// lb-daemon's XDP data plane, NAT mode.
    LbXdpNat,
    /// lb-daemon's XDP data plane, DSR mode.
    LbXdpDsr,
    /// HAProxy, `mode tcp`.
    Haproxy,
    /// nginx `stream` module.
    Nginx,
}

impl Path {
    /// Every path, in report order.
    pub const ALL: [Path; 8] = [
        Path::Direct,
        Path::DirectXdpVeth,
        Path::LbXdpNat,
        Path::LbXdpDsr,
        Path::LbProxy,
        Path::LbProxySyscall,
        Path::Haproxy,
        Path::Nginx,
    ];

    /// The path's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::DirectXdpVeth => "direct-xdp-veth",
            Path::LbProxy => "lb-proxy",
            Path::LbProxySyscall => "lb-proxy-syscall",
            Path::LbXdpNat => "lb-xdp-nat",
            Path::LbXdpDsr => "lb-xdp-dsr",
            Path::Haproxy => "haproxy",
            Path::Nginx => "nginx",
        }
    }

    /// Baseline, ours or peer.
    pub fn kind(self) -> PathKind {
        match self {
            Path::Direct | Path::DirectXdpVeth => PathKind::Baseline,
            Path::Haproxy | Path::Nginx => PathKind::Peer,
            _ => PathKind::Ours,
        }
    }

    /// The XDP veth set-up the path runs on, if any.
    pub fn xdp_setup(self) -> Option<XdpVeth> {
        match self {
            Path::DirectXdpVeth => Some(XdpVeth::Pass),
            Path::LbXdpNat => Some(XdpVeth::Lb(Mode::Nat)),
            Path::LbXdpDsr => Some(XdpVeth::Lb(Mode::Dsr)),
            _ => None,
        }
    }

    /// Whether the path balances UDP (HAProxy does not).
    pub fn has_udp(self) -> bool {
        self != Path::Haproxy
    }

    /// Where the client sends `port`'s traffic (a VIP port; for `direct`, the backends'
    /// port on every backend; for XDP, the backends' port on [`XDP_VIP`], since DSR
    /// backends receive the client's packet unchanged).
    pub fn targets(self, vip_port: u16) -> Vec<SocketAddr> {
        let port = match vip_port {
            VIP_RR => RR_PORT,
            VIP_BULK => BULK_PORT,
            _ => UDP_PORT,
        };
        match self {
            Path::Direct | Path::DirectXdpVeth => (0..BACKENDS)
                .map(|i| SocketAddr::new(backend_addr(i), port))
                .collect(),
            Path::LbXdpNat | Path::LbXdpDsr => vec![SocketAddr::new(XDP_VIP.into(), port)],
            _ => vec![SocketAddr::new(VIP.into(), vip_port)],
        }
    }
}

/// Programs the balancers need.
#[derive(Debug, Clone)]
pub struct Programs {
    /// lb-daemon (release build).
    pub daemon: PathBuf,
    /// `haproxy`, if installed.
    pub haproxy: Option<PathBuf>,
    /// `nginx`, if installed.
    pub nginx: Option<PathBuf>,
    /// nginx's stream module, if installed.
    pub nginx_stream: Option<PathBuf>,
    /// lb's BPF object (`cargo xtask build-ebpf`), or why there is none.
    pub bpf_object: Result<PathBuf, String>,
}

/// A running balancer process in the balancer namespace; killed and reaped on drop.
pub struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    /// The file its stdout and stderr go to.
    pub fn log(&self) -> &FsPath {
        &self.log
    }

    /// `Some(status)` when it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: `pid` is our child, not yet reaped, so it cannot be a recycled pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Why a path cannot run.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The path cannot run on this machine or build; the report says why.
    #[error("{0}")]
    Unavailable(String),
    /// Something failed that should not have.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Starts `path`'s balancer with its config in `dir` and its log in `log`. `Ok(None)` for
/// `direct` (nothing to start). The caller waits for it to answer.
pub fn start(
    path: Path,
    topo: &Topology,
    programs: &Programs,
    dir: &FsPath,
    log: PathBuf,
) -> Result<Option<Running>, StartError> {
    let (mut cmd, config) = match path {
        Path::Direct | Path::DirectXdpVeth => return Ok(None),
        Path::LbProxy | Path::LbProxySyscall | Path::LbXdpNat | Path::LbXdpDsr => {
            let text = match path.xdp_setup() {
                Some(XdpVeth::Lb(mode)) => {
                    let object = programs
                        .bpf_object
                        .as_ref()
                        .map_err(|why| StartError::Unavailable(format!("no BPF object: {why}")))?;
                    lb_xdp_config(mode, object)
                }
                _ => lb_config("proxy"),
            };
            let config = dir.join(format!("{}.toml", path.name()));
            std::fs::write(&config, text)?;
            let mut cmd = topo.balancer.command(&programs.daemon.to_string_lossy());
            cmd.arg("run").arg("--config").arg(&config);
            cmd.env("RUST_LOG", "warn");
            cmd.env(
                lb_daemon::daemon::SPLICE_ENV,
                if path == Path::LbProxySyscall {
                    "syscall"
                } else {
                    "uring"
                },
            );
            (cmd, config)
        }
        Path::Haproxy => {
            let bin = programs.haproxy.as_ref().ok_or_else(|| {
                StartError::Unavailable("haproxy is not installed (apt-get install haproxy)".into())
            })?;
            let config = dir.join("haproxy.cfg");
            std::fs::write(&config, haproxy_config())?;
            let mut cmd = topo.balancer.command(&bin.to_string_lossy());
            cmd.arg("-db").arg("-f").arg(&config);
            (cmd, config)
        }
        Path::Nginx => {
            let bin = programs.nginx.as_ref().ok_or_else(|| {
                StartError::Unavailable("nginx is not installed (apt-get install nginx)".into())
            })?;
            let module = programs.nginx_stream.as_ref().ok_or_else(|| {
                StartError::Unavailable(
                    "nginx's stream module is not installed (apt-get install libnginx-mod-stream)"
                        .into(),
                )
            })?;
            let config = dir.join("nginx.conf");
            std::fs::write(&config, nginx_config(module, dir))?;
            let mut cmd = topo.balancer.command(&bin.to_string_lossy());
            cmd.arg("-p").arg(dir).arg("-c").arg(&config).args([
                "-e",
                "stderr",
                "-g",
                "daemon off;",
            ]);
            (cmd, config)
        }
    };
    let out = File::create(&log)?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let child = cmd.spawn()?;
    let _ = config;
    Ok(Some(Running { child, log }))
}

fn backends(port: u16) -> impl Iterator<Item = SocketAddr> {
    (0..BACKENDS).map(move |i| SocketAddr::new(backend_addr(i), port))
}

/// lb-daemon's config: three services on the VIP, round robin, no health checks (every
/// peer runs without them too).
pub fn lb_config(dataplane: &str) -> String {
    let mut s = String::from("[global]\nworkers = 0\ndrain_timeout = \"1s\"\n");
    for (name, vip_port, port, proto) in [
        ("rr", VIP_RR, RR_PORT, "tcp"),
        ("bulk", VIP_BULK, BULK_PORT, "tcp"),
        ("udp", VIP_UDP, UDP_PORT, "udp"),
    ] {
        let _ = write!(
            s,
            "\n[[service]]\nname = \"{name}\"\nlisten = \"{VIP}:{vip_port}\"\nprotocol = \"{proto}\"\n\
             scheduler = \"round_robin\"\ndataplane = \"{dataplane}\"\n\n[service.health]\nkind = \"none\"\n"
        );
        for b in backends(port) {
            let _ = write!(s, "\n[[service.backend]]\naddress = \"{b}\"\nweight = 1\n");
        }
    }
    s
}

/// lb-daemon's config for its XDP paths: the same three services on [`XDP_VIP`] with the
/// backends' ports, `dataplane = "xdp"` (the daemon refuses to start rather than fall back),
/// Maglev, `lb_xdp` on the client-facing `l0` and the backend veths, the balancer's client-side
/// address as `local_address`, no health checks (as every path; the topology's neighbours are
/// permanent). NAT services use the documented default SNAT port range (no `snat_ports`): the
/// balancer runs every round of the path, so what a user's long-lived daemon would run out of,
/// the benchmark runs out of too.
pub fn lb_xdp_config(mode: Mode, bpf_object: &FsPath) -> String {
    let mut s = format!(
        "[global]\nbpf_object = \"{}\"\ndrain_timeout = \"1s\"\n",
        bpf_object.display()
    );
    let ifs: Vec<String> = (1..=BACKENDS).map(|n| format!("\"l{n}\"")).collect();
    for (name, port, proto) in [
        ("rr", RR_PORT, "tcp"),
        ("bulk", BULK_PORT, "tcp"),
        ("udp", UDP_PORT, "udp"),
    ] {
        let _ = write!(
            s,
            "\n[[service]]\nname = \"{name}\"\nlisten = \"{XDP_VIP}:{port}\"\nprotocol = \"{proto}\"\n\
             scheduler = \"maglev\"\ndataplane = \"xdp\"\ninterface = \"l0\"\n\
             backend_interfaces = [{}]\nlocal_address = \"{VIP}\"\n",
            ifs.join(", ")
        );
        match mode {
            Mode::Nat => s.push_str("forwarding = \"nat\"\n"),
            Mode::Dsr => s.push_str("forwarding = \"dsr\"\n"),
        }
        s.push_str("\n[service.health]\nkind = \"none\"\n");
        for b in backends(port) {
            let _ = write!(s, "\n[[service.backend]]\naddress = \"{b}\"\nweight = 1\n");
        }
    }
    s
}

/// HAProxy's config: `mode tcp`, round robin, threads = cores (its default). `maxconn` stays
/// under what the usual hard limit of open files allows (HAProxy refuses to start otherwise);
/// the tests never hold more than a few dozen connections at once.
pub fn haproxy_config() -> String {
    let mut s = String::from(
        "global\n    maxconn 9000\n\ndefaults\n    mode tcp\n    timeout connect 2s\n    \
         timeout client 60s\n    timeout server 60s\n",
    );
    for (name, vip_port, port) in [("rr", VIP_RR, RR_PORT), ("bulk", VIP_BULK, BULK_PORT)] {
        let _ = write!(
            s,
            "\nfrontend {name}\n    bind {VIP}:{vip_port}\n    default_backend {name}_pool\n\n\
             backend {name}_pool\n    balance roundrobin\n"
        );
        for (i, b) in backends(port).enumerate() {
            let _ = writeln!(s, "    server b{} {b}", i + 1);
        }
    }
    s
}

/// nginx's config: the stream module, one worker per core, round robin (its default), and
/// `proxy_half_close on` so a client's half-close reaches the backend as with the others.
pub fn nginx_config(module: &FsPath, dir: &FsPath) -> String {
    let mut s = format!(
        "load_module {};\nuser root;\nworker_processes auto;\nworker_rlimit_nofile 20000;\n\
         pid {}/nginx.pid;\nerror_log stderr warn;\n\nevents {{\n    worker_connections 9000;\n}}\n\nstream {{\n",
        module.display(),
        dir.display()
    );
    for (name, vip_port, port, udp) in [
        ("rr", VIP_RR, RR_PORT, false),
        ("bulk", VIP_BULK, BULK_PORT, false),
        ("udp", VIP_UDP, UDP_PORT, true),
    ] {
        let _ = writeln!(s, "    upstream {name} {{");
        for b in backends(port) {
            let _ = writeln!(s, "        server {b};");
        }
        let _ = writeln!(s, "    }}");
        if udp {
            let _ = writeln!(
                s,
                "    server {{\n        listen {VIP}:{vip_port} udp;\n        proxy_pass {name};\n        \
                 proxy_responses 1;\n        proxy_timeout 5s;\n    }}"
            );
        } else {
            let _ = writeln!(
                s,
                // The bulk test half-closes and waits for the byte count: nginx forwards a
                // half-close only when asked (1.21.4+); HAProxy and lb always do.
                "    server {{\n        listen {VIP}:{vip_port};\n        proxy_pass {name};\n        \
                 proxy_half_close on;\n    }}"
            );
        }
    }
    s.push_str("}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_balancer_gets_the_same_three_backends() {
        for (name, config) in [
            ("lb", lb_config("proxy")),
            ("haproxy", haproxy_config()),
            (
                "nginx",
                nginx_config(FsPath::new("/m.so"), FsPath::new("/d")),
            ),
        ] {
            for port in [RR_PORT, BULK_PORT] {
                for b in backends(port) {
                    assert!(
                        config.contains(&b.to_string()),
                        "{name} config lacks backend {b}: {config}"
                    );
                }
            }
        }
        assert_eq!(
            Path::Direct.targets(VIP_BULK).len(),
            BACKENDS,
            "direct spreads flows over every backend itself"
        );
    }

    #[test]
    fn the_xdp_configs_are_valid_lb_configs_with_the_backends_ports_on_the_vip() {
        for mode in [Mode::Nat, Mode::Dsr] {
            let text = lb_xdp_config(mode, FsPath::new("/obj/lb-ebpf"));
            let _config = lb_daemon::config::parse(&text, FsPath::new("bench.toml"))
                .unwrap_or_else(|e| panic!("the {mode:?} config does not load: {e}\n{text}"));
            for port in [RR_PORT, BULK_PORT, UDP_PORT] {
                assert!(
                    text.contains(&format!("listen = \"{XDP_VIP}:{port}\"")),
                    "{mode:?}: the service for backend port {port} is not on the XDP VIP at \
                     that port (DSR backends receive the client's packet unchanged): {text}"
                );
                for b in backends(port) {
                    assert!(text.contains(&b.to_string()), "{mode:?} lacks {b}: {text}");
                }
            }
        }
        for path in [Path::LbXdpNat, Path::LbXdpDsr] {
            assert_eq!(
                path.targets(VIP_UDP),
                vec![SocketAddr::new(XDP_VIP.into(), UDP_PORT)],
                "{} is reached on the XDP VIP",
                path.name()
            );
        }
    }
}
