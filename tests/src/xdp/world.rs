//! One XDP test's running system: the [`Topology`], real servers in every backend namespace,
//! and `lb-daemon` in the balancer namespace with three XDP services on the VIP:
//!
//! | service | VIP port | backends | health check |
//! |---|---|---|---|
//! | `web`  | tcp 80 | [`HttpNameServer`] `b{i}` on :80 | http, 200 ms |
//! | `bulk` | tcp 81 | [`PeerServer`] `b{i}` on :81 (hash receipts, client addresses) | tcp, 200 ms |
//! | `dns`  | udp 53 | [`UdpEcho`] `b{i}` on :53 | udp (NAT) or none (DSR) |

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::{backend_ip, bpf_object, in_netns, Mode, Path, PeerServer, Topology, VIP};
use crate::config::{DaemonConfig, ServiceConfig};
use crate::{Daemon, HttpNameServer, UdpEcho};

/// Port of the `web` service (VIP and backends).
pub const WEB: u16 = 80;
/// Port of the `bulk` service.
pub const BULK: u16 = 81;
/// Port of the `dns` service.
pub const DNS: u16 = 53;

/// The servers of one backend namespace.
pub struct BackendServers {
    /// `web`.
    pub http: HttpNameServer,
    /// `bulk`.
    pub peer: PeerServer,
    /// `dns`.
    pub udp: UdpEcho,
}

/// A running XDP test system; everything stops and goes on drop (daemon first).
pub struct World {
    /// The daemon in the balancer namespace.
    pub daemon: Daemon,
    /// Servers per backend, index 0 is `b1`; `None` for a backend whose servers have not been
    /// started (see [`World::start_backend`]).
    pub servers: Vec<Option<BackendServers>>,
    /// Namespaces and decapsulators.
    pub topology: Topology,
    /// NAT or DSR.
    pub mode: Mode,
}

impl World {
    /// Builds `n` backends and starts servers on the first `running` of them (the others
    /// are configured but have no server: their health checks fail until
    /// [`World::start_backend`]), then the daemon, and waits for its `ready`.
    ///
    /// `path`: a [`Mode`] alone runs on XDP; [`Path::tc`] on tc.
    pub fn start(path: impl Into<Path>, n: usize, running: usize) -> World {
        let path = path.into();
        let mode = path.mode;
        let checked: Vec<usize> = (1..=running).collect();
        World::start_custom(path, n, running, &checked, |topology| {
            let mut config =
                DaemonConfig::new().global("bpf_object", bpf_object().display().to_string());
            for name in ["web", "bulk", "dns"] {
                let backends: Vec<(usize, u32)> = (1..=n).map(|i| (i, 1)).collect();
                config = config.service(service(topology, mode, name, &backends));
            }
            let toml = config.to_toml();
            in_netns(&topology.balancer, || Daemon::start(&toml))
                .expect("enter the balancer namespace")
        })
    }

    /// Builds `n` backends, starts servers on the first `running` of them, runs `launch` to
    /// start the daemon in the balancer namespace (see [`in_netns`]; [`service`] gives the
    /// usual services), and waits until it has health-checked each backend of `checked`
    /// (1-based): until then the balancer does not know their MAC addresses.
    pub fn start_custom(
        path: impl Into<Path>,
        n: usize,
        running: usize,
        checked: &[usize],
        launch: impl FnOnce(&Topology) -> Daemon,
    ) -> World {
        let path = path.into();
        let mode = path.mode;
        let topology = Topology::at(path, n);
        let mut servers = Vec::new();
        for i in 1..=n {
            servers.push(if i <= running {
                Some(start_servers(&topology, mode, i))
            } else {
                None
            });
        }
        let daemon = launch(&topology);
        // A health check of each backend makes the balancer resolve its MAC address. Until
        // then the program hands packets to the kernel, which drops NAT'ed ones (their source
        // is the balancer's own address); tests that count packets must not start earlier.
        for &i in checked {
            if let Some(s) = &servers[i - 1] {
                assert!(
                    s.http.wait_for_health_checks(2, Duration::from_secs(15)),
                    "the daemon did not health-check b{i} within 15 s"
                );
            }
        }
        World {
            daemon,
            servers,
            topology,
            mode,
        }
    }

    /// Starts the servers of backend `i` (1-based) that [`World::start`] left out.
    pub fn start_backend(&mut self, i: usize) {
        let s = start_servers(&self.topology, self.mode, i);
        self.servers[i - 1] = Some(s);
    }

    /// The servers of backend `i` (1-based); panics if they were never started.
    pub fn backend(&mut self, i: usize) -> &mut BackendServers {
        self.servers[i - 1]
            .as_mut()
            .unwrap_or_else(|| panic!("backend b{i} has no servers running"))
    }

    /// Runs `f` in the client's namespace.
    pub fn client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.topology
            .client
            .enter(f)
            .expect("enter the client namespace")
    }

    /// The backend (1-based) holding the one long `bulk` connection a test opened: the only
    /// one with an open `bulk` connection (health checks are short-lived). Panics when none
    /// or several show one for 3 s.
    pub fn bulk_connection_holder(&mut self, backends: usize) -> usize {
        for _ in 0..300 {
            let open: Vec<usize> = (1..=backends)
                .filter(|&i| self.backend(i).peer.open_connections() > 0)
                .collect();
            if let [only] = open[..] {
                return only;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("cannot tell which backend holds the long bulk connection")
    }

    /// Waits up to `timeout` for the daemon to log that `backend` of `service` is `state`
    /// ("UP" or "DOWN") after log line `mark`, then for the next XDP table of `service`.
    /// Panics in the user's words when either does not come.
    pub fn wait_for_table_after(
        &self,
        mark: usize,
        service: &str,
        backend: SocketAddr,
        state: &str,
        timeout: Duration,
    ) {
        let line = format!("backend {backend} of service {service} is {state}");
        let (at, _) = self
            .daemon
            .wait_for_log_after(mark, &line, timeout)
            .unwrap_or_else(|e| panic!("the daemon never said `{line}`: {e}"));
        let table = format!("service {service}: XDP table generation");
        self.daemon
            .wait_for_log_after(at, &table, timeout)
            .unwrap_or_else(|e| {
                panic!(
                    "after `{line}` the daemon never published a new XDP table for {service}: {e}"
                )
            });
    }
}

/// The `[[service]]` of the usual service `name` (`web`, `bulk` or `dns`, see the module
/// docs) on XDP in `topology`, with backends `(i, weight)` (`i` 1-based): its VIP port, health
/// check and XDP keys. NAT services take the default SNAT range, as a user's would.
pub fn service(
    topology: &Topology,
    mode: Mode,
    name: &str,
    backends: &[(usize, u32)],
) -> ServiceConfig {
    let (port, udp): (u16, bool) = match name {
        "web" => (WEB, false),
        "bulk" => (BULK, false),
        "dns" => (DNS, true),
        other => panic!("no usual XDP test service `{other}`"),
    };
    let vip = SocketAddr::new(IpAddr::V4(VIP), port);
    let mut svc = if udp {
        ServiceConfig::udp(name, vip)
    } else {
        ServiceConfig::tcp(name, vip)
    };
    // Fast checks, but patient with a slow answer: on a loaded machine a 500 ms timeout
    // can flap a healthy backend, and a DOWN flag re-places its pinned flows. A stopped
    // server is refused at once, so it still goes DOWN within fall x interval.
    let patient = |s: ServiceConfig| s.health("timeout", "2s").health("fall", 3);
    svc = match (name, mode) {
        ("web", _) => patient(svc.fast_health("http")),
        ("bulk", _) => patient(svc.fast_health("tcp")),
        // A DSR backend answers from the VIP only; a probe to its own address would
        // get a reply from an address the checker does not expect.
        (_, Mode::Dsr) => svc.health("kind", "none"),
        (_, Mode::Nat) => patient(svc.fast_health("udp")),
    };
    for (key, value) in topology.xdp_keys(mode) {
        svc = svc.set(key, value);
    }
    for &(i, weight) in backends {
        svc = svc.backend(SocketAddr::new(IpAddr::V4(backend_ip(i)), port), weight);
    }
    svc
}

fn start_servers(topology: &Topology, mode: Mode, i: usize) -> BackendServers {
    let name = format!("b{i}");
    let any = |port| SocketAddr::from(([0, 0, 0, 0], port));
    // A DSR backend must answer UDP from the VIP: bind it there, not to the wildcard (whose
    // replies would leave from the backend's own address).
    let udp_at = match mode {
        Mode::Nat => SocketAddr::new(IpAddr::V4(backend_ip(i)), DNS),
        Mode::Dsr => SocketAddr::new(IpAddr::V4(VIP), DNS),
    };
    topology.backends[i - 1]
        .enter(|| BackendServers {
            http: HttpNameServer::start_on(&name, any(WEB)).expect("web server starts"),
            peer: PeerServer::start_on(&name, any(BULK)).expect("bulk server starts"),
            udp: UdpEcho::start_on(&name, udp_at).expect("udp echo starts"),
        })
        .expect("enter the backend namespace")
}

impl Drop for World {
    fn drop(&mut self) {
        // SIGTERM first, so the daemon logs its XDP counters (shown with its log when a test
        // fails); the Daemon guard kills it if it does not exit.
        if self.daemon.exit_status().is_none() {
            let _ = self.daemon.signal(nix::sys::signal::Signal::SIGTERM);
            let _ = self.daemon.wait_exit(Duration::from_secs(10));
        }
    }
}
