//! The paths under test and how each balancer is configured and started in the balancer
//! namespace: lb-daemon (proxy, either splice mode; XDP and tc in NAT and DSR mode), HAProxy
//! (`mode tcp`) and nginx (`stream`), all with the same three backends, round robin where the
//! data plane has it (the packet-layer programs have only a Maglev table).

use std::fmt::Write as _;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::report::PathKind;
use crate::server::{BULK_PORT, PPS_PORT, RR_PORT, UDP_PORT};
use crate::topology::{Network, Topology, BACKENDS, VIP, XDP_VIP};

pub use crate::xdp::XdpVeth;
pub use lb_tests::xdp::Mode;

/// The balancer's request/reply port (to backends' [`RR_PORT`]).
pub const VIP_RR: u16 = 8000;
/// The balancer's bulk port (to backends' [`BULK_PORT`]).
pub const VIP_BULK: u16 = 8001;
/// The balancer's UDP port (to backends' [`UDP_PORT`]).
pub const VIP_UDP: u16 = 8002;
/// The balancer's packet-rate port (to backends' [`PPS_PORT`], one way).
pub const VIP_PPS: u16 = 8003;

/// A path traffic takes from the client to the backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// No balancer: the client spreads flows over the backends itself; the balancer
    /// namespace only routes (through the bridge on the bridge topology).
    Direct,
    /// `direct` on the veth set-up the XDP paths need (checksum offload off, an XDP program
    /// on every veth, here one that passes everything to the kernel's routing): the
    /// no-balancer limit under XDP's conditions, which tells the cost of XDP on veth apart
    /// from the cost of lb's program.
    DirectXdpVeth,
    /// lb-daemon's userspace proxy as a user runs it: its default relay, splice(2) system
    /// calls (`LB_PROXY_SPLICE` unset). The proxy targets are judged on this path.
    LbProxy,
    /// lb-daemon's userspace proxy with io_uring splice (`LB_PROXY_SPLICE=uring`, opt-in).
    LbProxyUring,
    /// lb-daemon's XDP data plane, NAT mode.
    LbXdpNat,
    /// lb-daemon's XDP data plane, DSR mode.
    LbXdpDsr,
    /// lb-daemon's tc data plane (`lb_tc` at tc ingress), NAT mode.
    LbTcNat,
    /// lb-daemon's tc data plane, DSR mode.
    LbTcDsr,
    /// HAProxy, `mode tcp`.
    Haproxy,
    /// nginx `stream` module.
    Nginx,
}

/// Where a path's balancing happens, which decides its set-up and its VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plane {
    /// No balancer (the `direct` paths): the kernel routes.
    Kernel,
    /// A userspace proxy: lb-daemon's, HAProxy, nginx.
    Proxy,
    /// lb's XDP program, with the XDP veth set-up `XdpVeth` (also `direct-xdp-veth`).
    Xdp(XdpVeth),
    /// lb's tc program in this forwarding mode.
    Tc(Mode),
}

impl Path {
    /// Every path, in report order.
    pub const ALL: [Path; 10] = [
        Path::Direct,
        Path::DirectXdpVeth,
        Path::LbXdpNat,
        Path::LbXdpDsr,
        Path::LbTcNat,
        Path::LbTcDsr,
        Path::LbProxy,
        Path::LbProxyUring,
        Path::Haproxy,
        Path::Nginx,
    ];

    /// The `LB_PROXY_SPLICE` value lb-daemon runs with on this path: `None` (the variable
    /// unset, the daemon's default relay, as a user runs it) but on `lb-proxy-uring`.
    pub fn splice_mode(self) -> Option<&'static str> {
        (self == Path::LbProxyUring).then_some("uring")
    }

    /// The path's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::DirectXdpVeth => "direct-xdp-veth",
            Path::LbProxy => "lb-proxy",
            Path::LbProxyUring => "lb-proxy-uring",
            Path::LbXdpNat => "lb-xdp-nat",
            Path::LbXdpDsr => "lb-xdp-dsr",
            Path::LbTcNat => "lb-tc-nat",
            Path::LbTcDsr => "lb-tc-dsr",
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

    /// Where its balancing happens.
    pub fn plane(self) -> Plane {
        match self {
            Path::Direct => Plane::Kernel,
            Path::DirectXdpVeth => Plane::Xdp(XdpVeth::Pass),
            Path::LbXdpNat => Plane::Xdp(XdpVeth::Lb(Mode::Nat)),
            Path::LbXdpDsr => Plane::Xdp(XdpVeth::Lb(Mode::Dsr)),
            Path::LbTcNat => Plane::Tc(Mode::Nat),
            Path::LbTcDsr => Plane::Tc(Mode::Dsr),
            Path::LbProxy | Path::LbProxyUring | Path::Haproxy | Path::Nginx => Plane::Proxy,
        }
    }

    /// The XDP veth set-up the path runs on, if any.
    pub fn xdp_setup(self) -> Option<XdpVeth> {
        match self.plane() {
            Plane::Xdp(kind) => Some(kind),
            _ => None,
        }
    }

    /// The tc path's forwarding mode, if it is one.
    pub fn tc_mode(self) -> Option<Mode> {
        match self.plane() {
            Plane::Tc(mode) => Some(mode),
            _ => None,
        }
    }

    /// Whether lb's program forwards packets itself (XDP or tc), so that the client sends to
    /// [`XDP_VIP`] and the balancer keeps the kernel's ephemeral ports for NAT's range.
    pub fn packet_layer(self) -> bool {
        matches!(
            self,
            Path::LbXdpNat | Path::LbXdpDsr | Path::LbTcNat | Path::LbTcDsr
        )
    }

    /// Whether the path can run on `network`: XDP cannot redirect into a bridge, so the XDP
    /// paths are on the veth topology only.
    pub fn runs_on(self, network: Network) -> bool {
        network == Network::Veth || self.xdp_setup().is_none()
    }

    /// Whether the path balances UDP (HAProxy does not).
    pub fn has_udp(self) -> bool {
        self != Path::Haproxy
    }

    /// Where the client sends `port`'s traffic on `network` (a VIP port; for `direct`, the
    /// backends' port on every backend; for the packet-layer paths, the backends' port on
    /// [`XDP_VIP`], since DSR backends receive the client's packet unchanged).
    pub fn targets(self, network: Network, vip_port: u16) -> Vec<SocketAddr> {
        let port = backend_port(vip_port);
        match self {
            Path::Direct | Path::DirectXdpVeth => (0..BACKENDS)
                .map(|i| SocketAddr::new(network.backend_addr(i), port))
                .collect(),
            _ if self.packet_layer() => vec![SocketAddr::new(XDP_VIP.into(), port)],
            _ => vec![SocketAddr::new(VIP.into(), vip_port)],
        }
    }
}

/// The backends' port behind the VIP port `vip_port`.
fn backend_port(vip_port: u16) -> u16 {
    match vip_port {
        VIP_RR => RR_PORT,
        VIP_BULK => BULK_PORT,
        VIP_PPS => PPS_PORT,
        _ => UDP_PORT,
    }
}

/// A path on one of the topologies: what the harness measures and reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Case {
    /// What balances.
    pub path: Path,
    /// How the backends are attached.
    pub network: Network,
}

impl Case {
    /// Every case, in report order: every path on veth, then the bridge topology's
    /// (`direct`, lb's tc paths and proxies, HAProxy, nginx).
    pub fn all() -> Vec<Case> {
        Network::ALL
            .into_iter()
            .flat_map(|network| {
                Path::ALL
                    .into_iter()
                    .filter(move |p| p.runs_on(network))
                    .map(move |path| Case { path, network })
            })
            .collect()
    }

    /// The references whose rounds the harness interleaves with this case's, each on a twin
    /// of its topology, because the targets compare them: `direct` (`direct-bridge`)
    /// for the tc paths, `direct-xdp-veth` for the XDP paths (the cost of lb's program
    /// alone), and HAProxy and nginx for `lb-proxy` on veth (its targets are against the best
    /// peer of each figure, and UDP p99 against nginx's). Empty for every other case, which
    /// is compared with the topology's own runs of its reference.
    pub fn paired_references(self) -> &'static [Path] {
        match self.path {
            Path::LbTcNat | Path::LbTcDsr => &[Path::Direct],
            Path::LbXdpNat | Path::LbXdpDsr => &[Path::DirectXdpVeth],
            Path::LbProxy if self.network == Network::Veth => &[Path::Haproxy, Path::Nginx],
            _ => &[],
        }
    }

    /// Its name in reports and in `--only`: the path's name, with `-bridge` on the bridge
    /// topology (`direct-bridge`, `lb-tc-nat-bridge`).
    pub fn name(self) -> &'static str {
        if self.network == Network::Veth {
            return self.path.name();
        }
        match self.path {
            Path::Direct => "direct-bridge",
            Path::DirectXdpVeth => "direct-xdp-veth-bridge",
            Path::LbProxy => "lb-proxy-bridge",
            Path::LbProxyUring => "lb-proxy-uring-bridge",
            Path::LbXdpNat => "lb-xdp-nat-bridge",
            Path::LbXdpDsr => "lb-xdp-dsr-bridge",
            Path::LbTcNat => "lb-tc-nat-bridge",
            Path::LbTcDsr => "lb-tc-dsr-bridge",
            Path::Haproxy => "haproxy-bridge",
            Path::Nginx => "nginx-bridge",
        }
    }

    /// The case named `name`, if there is one.
    pub fn named(name: &str) -> Option<Case> {
        Case::all().into_iter().find(|c| c.name() == name)
    }

    /// Where the client sends `vip_port`'s traffic ([`Path::targets`]).
    pub fn targets(self, vip_port: u16) -> Vec<SocketAddr> {
        self.path.targets(self.network, vip_port)
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

    /// Its process id (`ip netns exec` execs the balancer, so this is the balancer's own).
    pub fn pid(&self) -> u32 {
        self.child.id()
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
        Path::LbProxy
        | Path::LbProxyUring
        | Path::LbXdpNat
        | Path::LbXdpDsr
        | Path::LbTcNat
        | Path::LbTcDsr => {
            let net = topo.network;
            let object = || {
                programs
                    .bpf_object
                    .as_ref()
                    .map_err(|why| StartError::Unavailable(format!("no BPF object: {why}")))
            };
            let text = match path.plane() {
                Plane::Xdp(XdpVeth::Lb(mode)) => lb_packet_config("xdp", mode, net, object()?),
                Plane::Tc(mode) => lb_packet_config("tc", mode, net, object()?),
                _ => lb_config("proxy", net),
            };
            let config = dir.join(format!("{}-{}.toml", path.name(), net.name()));
            std::fs::write(&config, text)?;
            let mut cmd = topo.balancer.command(&programs.daemon.to_string_lossy());
            cmd.arg("run").arg("--config").arg(&config);
            cmd.env("RUST_LOG", "warn");
            cmd.env_remove(lb_daemon::daemon::SPLICE_ENV);
            if let Some(mode) = path.splice_mode() {
                cmd.env(lb_daemon::daemon::SPLICE_ENV, mode);
            }
            (cmd, config)
        }
        Path::Haproxy => {
            let bin = programs.haproxy.as_ref().ok_or_else(|| {
                StartError::Unavailable("haproxy is not installed (apt-get install haproxy)".into())
            })?;
            let config = dir.join("haproxy.cfg");
            std::fs::write(&config, haproxy_config(topo.network))?;
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
            std::fs::write(&config, nginx_config(module, dir, topo.network))?;
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

fn backends(network: Network, port: u16) -> impl Iterator<Item = SocketAddr> {
    (0..BACKENDS).map(move |i| SocketAddr::new(network.backend_addr(i), port))
}

/// The services every balancer gets: name, VIP port, backends' port, protocol.
const SERVICES: [(&str, u16, u16, &str); 4] = [
    ("rr", VIP_RR, RR_PORT, "tcp"),
    ("bulk", VIP_BULK, BULK_PORT, "tcp"),
    ("udp", VIP_UDP, UDP_PORT, "udp"),
    ("pps", VIP_PPS, PPS_PORT, "udp"),
];

/// lb-daemon's config: four services on the VIP, round robin, no health checks (every
/// peer runs without them too), the backends of `network`.
pub fn lb_config(dataplane: &str, network: Network) -> String {
    let mut s = String::from("[global]\nworkers = 0\ndrain_timeout = \"1s\"\n");
    for (name, vip_port, port, proto) in SERVICES {
        let _ = write!(
            s,
            "\n[[service]]\nname = \"{name}\"\nlisten = \"{VIP}:{vip_port}\"\nprotocol = \"{proto}\"\n\
             scheduler = \"round_robin\"\ndataplane = \"{dataplane}\"\n\n[service.health]\nkind = \"none\"\n"
        );
        for b in backends(network, port) {
            let _ = write!(s, "\n[[service.backend]]\naddress = \"{b}\"\nweight = 1\n");
        }
    }
    s
}

/// lb-daemon's config for its packet-layer paths: the same four services on [`XDP_VIP`] with
/// the backends' ports, `dataplane = plane` (`"xdp"` or `"tc"`: the daemon refuses to start
/// rather than fall back), Maglev, the program on the client-facing `l0` and on the
/// balancer's interfaces towards the backends (the veths, or the bridge), the balancer's
/// client-side address as `local_address`, no health checks (as every path). NAT services use
/// the documented default SNAT port range (no `snat_ports`): the balancer runs every round of
/// the path, so what a user's long-lived daemon would run out of, the benchmark runs out of
/// too.
pub fn lb_packet_config(plane: &str, mode: Mode, network: Network, bpf_object: &FsPath) -> String {
    let mut s = format!(
        "[global]\nbpf_object = \"{}\"\ndrain_timeout = \"1s\"\n",
        bpf_object.display()
    );
    let ifs: Vec<String> = network
        .backend_interfaces()
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect();
    for (name, _, port, proto) in SERVICES {
        let _ = write!(
            s,
            "\n[[service]]\nname = \"{name}\"\nlisten = \"{XDP_VIP}:{port}\"\nprotocol = \"{proto}\"\n\
             scheduler = \"maglev\"\ndataplane = \"{plane}\"\ninterface = \"l0\"\n\
             backend_interfaces = [{}]\nlocal_address = \"{VIP}\"\n",
            ifs.join(", ")
        );
        match mode {
            Mode::Nat => s.push_str("forwarding = \"nat\"\n"),
            Mode::Dsr => s.push_str("forwarding = \"dsr\"\n"),
        }
        s.push_str("\n[service.health]\nkind = \"none\"\n");
        for b in backends(network, port) {
            let _ = write!(s, "\n[[service.backend]]\naddress = \"{b}\"\nweight = 1\n");
        }
    }
    s
}

/// HAProxy's config: `mode tcp`, round robin, threads = cores (its default). `maxconn` stays
/// under what the usual hard limit of open files allows (HAProxy refuses to start otherwise);
/// the tests never hold more than a few dozen connections at once.
pub fn haproxy_config(network: Network) -> String {
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
        for (i, b) in backends(network, port).enumerate() {
            let _ = writeln!(s, "    server b{} {b}", i + 1);
        }
    }
    s
}

/// nginx's config: the stream module, one worker per core, round robin (its default), and
/// `proxy_half_close on` so a client's half-close reaches the backend as with the others.
/// The packet-rate service expects no answer (`proxy_responses 0`).
pub fn nginx_config(module: &FsPath, dir: &FsPath, network: Network) -> String {
    let mut s = format!(
        "load_module {};\nuser root;\nworker_processes auto;\nworker_rlimit_nofile 20000;\n\
         pid {}/nginx.pid;\nerror_log stderr warn;\n\nevents {{\n    worker_connections 9000;\n}}\n\nstream {{\n",
        module.display(),
        dir.display()
    );
    for (name, vip_port, port, proto) in SERVICES {
        let _ = writeln!(s, "    upstream {name} {{");
        for b in backends(network, port) {
            let _ = writeln!(s, "        server {b};");
        }
        let _ = writeln!(s, "    }}");
        if proto == "udp" {
            let responses = u8::from(port != PPS_PORT);
            let _ = writeln!(
                s,
                "    server {{\n        listen {VIP}:{vip_port} udp;\n        proxy_pass {name};\n        \
                 proxy_responses {responses};\n        proxy_timeout 5s;\n    }}"
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
    fn every_balancer_gets_the_same_three_backends_on_either_network() {
        for network in Network::ALL {
            for (name, config) in [
                ("lb", lb_config("proxy", network)),
                ("haproxy", haproxy_config(network)),
                (
                    "nginx",
                    nginx_config(FsPath::new("/m.so"), FsPath::new("/d"), network),
                ),
            ] {
                for port in [RR_PORT, BULK_PORT] {
                    for b in backends(network, port) {
                        assert!(
                            config.contains(&b.to_string()),
                            "{name} config lacks backend {b}: {config}"
                        );
                    }
                }
            }
            assert_eq!(
                Path::Direct.targets(network, VIP_BULK).len(),
                BACKENDS,
                "direct spreads flows over every backend itself"
            );
        }
        let nginx = nginx_config(FsPath::new("/m.so"), FsPath::new("/d"), Network::Veth);
        assert!(
            nginx.contains(&format!(
                "listen {VIP}:{VIP_PPS} udp;\n        proxy_pass pps;\n        proxy_responses 0;"
            )),
            "nginx waits for no answer on the packet-rate service: {nginx}"
        );
    }

    /// The packet-layer planes.
    const PLANES: [&str; 2] = ["xdp", "tc"];

    #[test]
    fn the_packet_layer_configs_are_valid_lb_configs_with_the_backends_ports_on_the_vip() {
        for (plane, mode, network) in PLANES.into_iter().flat_map(|plane| {
            [Mode::Nat, Mode::Dsr]
                .into_iter()
                .flat_map(move |mode| Network::ALL.map(|net| (plane, mode, net)))
        }) {
            let what = format!("{plane} {mode:?} on {}", network.name());
            let text = lb_packet_config(plane, mode, network, FsPath::new("/obj/lb-ebpf"));
            let _config = lb_daemon::config::parse(&text, FsPath::new("bench.toml"))
                .unwrap_or_else(|e| panic!("the {what} config does not load: {e}\n{text}"));
            for port in [RR_PORT, BULK_PORT, UDP_PORT, PPS_PORT] {
                assert!(
                    text.contains(&format!("listen = \"{XDP_VIP}:{port}\"")),
                    "{what}: the service for backend port {port} is not on the VIP at that \
                     port (DSR backends receive the client's packet unchanged): {text}"
                );
                for b in backends(network, port) {
                    assert!(text.contains(&b.to_string()), "{what} lacks {b}: {text}");
                }
            }
            let ifs = network.backend_interfaces().join("\", \"");
            assert!(
                text.contains(&format!("backend_interfaces = [\"{ifs}\"]")),
                "{what}: the program goes on the balancer's interfaces towards the backends: {text}"
            );
        }
        for path in [Path::LbXdpNat, Path::LbXdpDsr, Path::LbTcNat, Path::LbTcDsr] {
            assert_eq!(
                path.targets(Network::Bridge, VIP_UDP),
                vec![SocketAddr::new(XDP_VIP.into(), UDP_PORT)],
                "{} is reached on the packet-layer VIP",
                path.name()
            );
        }
    }

    #[test]
    fn lb_proxy_runs_the_daemons_default_relay() {
        assert_eq!(Path::LbProxy.name(), "lb-proxy");
        assert_eq!(
            Path::LbProxy.splice_mode(),
            None,
            "the path the proxy targets are judged on must run what a user runs"
        );
        assert_eq!(Path::LbProxyUring.splice_mode(), Some("uring"));
        assert!(Path::ALL
            .iter()
            .filter(|p| **p != Path::LbProxyUring)
            .all(|p| p.splice_mode().is_none()));
    }

    #[test]
    fn cases_have_unique_names_and_no_xdp_on_the_bridge() {
        let all = Case::all();
        let mut names: Vec<_> = all.iter().map(|c| c.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len(), "two cases share a name: {names:?}");
        for want in [
            "direct-bridge",
            "lb-tc-nat-bridge",
            "lb-tc-dsr-bridge",
            "lb-proxy-bridge",
            "haproxy-bridge",
            "nginx-bridge",
            "lb-tc-nat",
            "lb-tc-dsr",
        ] {
            assert!(
                Case::named(want).is_some(),
                "no case named {want}: {names:?}"
            );
        }
        assert!(
            all.iter()
                .all(|c| c.network == Network::Veth || c.path.xdp_setup().is_none()),
            "XDP_REDIRECT cannot go into a bridge: no XDP path on the bridge topology"
        );
    }
}
