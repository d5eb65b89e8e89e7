//! `GET /metrics`: the daemon's counters in the Prometheus (OpenMetrics) text format, built
//! with `prometheus-client` at each scrape from the live counters.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `lb_backend_connections_total` | counter: connections (TCP) or sessions (UDP) opened, and flows started on XDP | service, backend |
//! | `lb_backend_active_connections` | gauge: open now | service, backend |
//! | `lb_backend_connect_failures_total` | counter: failed connect attempts | service, backend |
//! | `lb_backend_health_checks_unknown_total` | counter: active checks that could not run for want of local ports, descriptors or memory (they leave the backend's state alone) | service, backend |
//! | `lb_backend_bytes_total` | counter: bytes, `direction` = `to_backend` or `from_backend` (XDP: frames to the backend only) | service, backend, direction |
//! | `lb_xdp_backend_packets_total` | counter: client packets XDP forwarded to a backend | service, backend |
//! | `lb_xdp_snat_ports_in_use` | gauge: SNAT ports towards a backend in use or held (XDP `nat`, counted every 10 s or so) | service, backend |
//! | `lb_xdp_snat_ports_free` | gauge: SNAT ports a new flow towards a backend may still take | service, backend |
//! | `lb_xdp_backend_left_out` | gauge: 1 when the eBPF table gives a backend no slot whatever its health (`nat`: its replies would miss the program; `nat` or `dsr` at the XDP hook: it is routed out of a device XDP cannot send to; `/status` `xdp.left_out` says why), else 0 | service, backend |
//! | `lb_xdp_snat_count_timestamp_seconds` | gauge: Unix time at which the count behind the two SNAT gauges began (a port taken before it is counted) | service, backend |
//! | `lb_xdp_packets_total` | counter: packets the XDP program saw | |
//! | `lb_xdp_packet_outcomes_total` | counter: what it did with them, by `outcome` (`forwarded`, `nat_replies`, `pass_not_vip`, `drop_no_backend`...) | outcome |
//! | `lb_backend_up` | gauge: 1 when the health checks say up | service, backend |
//! | `lb_backend_weight` | gauge: the weight the scheduler uses now (0 draining) | service, backend |
//! | `lb_proxy_no_backend_total` | counter: connections/datagrams refused for want of a backend | |
//! | `lb_proxy_dropped_datagrams_total` | counter: UDP datagrams dropped | |
//! | `lb_proxy_errors_total` | counter: connections and sessions ended by an error | |
//! | `lb_reloads_total` | counter: reloads, `result` = `applied` or `refused` | result |
//! | `lb_config_last_reload_success_timestamp_seconds` | gauge: Unix time | |
//! | `lb_start_time_seconds` | gauge: Unix time of the daemon's start | |
//! | `lb_vip_announced` | gauge: 1 while the VIP's route is in the `[announce]` table (announced), 0 when withdrawn | vip |
//! | `lb_node_draining` | gauge: 1 while `drain-node` holds every VIP back (`[announce]` only) | |
//!
//! Services a reload removed keep their series while they drain (see `/status`'s
//! `removed_services`), unless a live service has their name (a service moved to another
//! address): then the live one's are shown. A backend's series go when it does.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::admin::status::{ProxyCountersView, ServiceStatus, XdpStatus};
use crate::control::Control;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    service: String,
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    service: String,
    backend: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// The metrics text for `control` now.
///
/// Returns `Err` only if formatting into a `String` fails, which it does not.
pub fn render(control: &Control) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::with_prefix("lb");
    let full = control.status();
    let mut backends = BackendFamilies::default();
    // A removed service whose name lives on (a reload moved it to another address) would
    // mix two services' values under one label set: only the live one is shown.
    let removed = full
        .removed_services
        .iter()
        .filter(|r| !full.services.iter().any(|s| s.name == r.name));
    for status in full.services.iter().chain(removed) {
        backends.add_service(status);
    }
    // Registration order is the order of the text out: backend families, XDP, proxy, reloads.
    let xdp_families = backends.register(&mut reg);
    if let Some(xdp) = &full.xdp {
        register_xdp(&mut reg, xdp_families, xdp);
    }
    register_proxy(&mut reg, &full.proxy);
    register_reloads(&mut reg, control);
    if let Some(announce) = &full.announce {
        register_announce(&mut reg, announce);
    }

    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg)?;
    Ok(out)
}

/// The per-backend families, filled from every service's backends before registration.
#[derive(Default)]
struct BackendFamilies {
    connections: Family<BackendLabels, Counter>,
    active: Family<BackendLabels, Gauge>,
    failures: Family<BackendLabels, Counter>,
    checks_unknown: Family<BackendLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
    up: Family<BackendLabels, Gauge>,
    weight: Family<BackendLabels, Gauge>,
    xdp: XdpBackendFamilies,
}

/// The per-backend families only a service on XDP fills; registered only when XDP runs.
#[derive(Default)]
struct XdpBackendFamilies {
    packets: Family<BackendLabels, Counter>,
    left_out: Family<BackendLabels, Gauge>,
    snat_in_use: Family<BackendLabels, Gauge>,
    snat_free: Family<BackendLabels, Gauge>,
    snat_counted: Family<BackendLabels, FloatGauge>,
}

impl BackendFamilies {
    /// Adds one series per family for each of `status`'s backends.
    fn add_service(&mut self, status: &ServiceStatus) {
        for b in &status.backends {
            let l = BackendLabels {
                service: status.name.clone(),
                backend: b.address.to_string(),
            };
            self.connections.get_or_create(&l).inc_by(b.total);
            self.active.get_or_create(&l).set(clamp(b.active));
            self.failures.get_or_create(&l).inc_by(b.connect_failures);
            self.checks_unknown
                .get_or_create(&l)
                .inc_by(b.checks_unknown);
            self.up.get_or_create(&l).set(i64::from(b.health == "up"));
            self.weight
                .get_or_create(&l)
                .set(i64::from(b.effective_weight));
            if let Some(x) = &b.xdp {
                self.xdp.packets.get_or_create(&l).inc_by(x.packets);
                self.xdp
                    .left_out
                    .get_or_create(&l)
                    .set(i64::from(x.left_out.is_some()));
                if let (Some(used), Some(free)) = (x.snat_ports_in_use, x.snat_ports_free) {
                    self.xdp.snat_in_use.get_or_create(&l).set(clamp(used));
                    self.xdp.snat_free.get_or_create(&l).set(clamp(free));
                }
                if let Some(at) = x.snat_counted_unix_seconds {
                    self.xdp.snat_counted.get_or_create(&l).set(at);
                }
            }
            for (direction, n) in [
                ("to_backend", b.bytes_to_backend),
                ("from_backend", b.bytes_from_backend),
            ] {
                self.bytes
                    .get_or_create(&BytesLabels {
                        service: status.name.clone(),
                        backend: l.backend.clone(),
                        direction,
                    })
                    .inc_by(n);
            }
        }
    }

    /// Registers the families every data plane fills; hands back the XDP ones, which
    /// [`register_xdp`] registers when XDP runs.
    fn register(self, reg: &mut Registry) -> XdpBackendFamilies {
        reg.register(
            "backend_connections",
            "Connections (TCP) or sessions (UDP) opened to a backend",
            self.connections,
        );
        reg.register(
            "backend_active_connections",
            "Connections (TCP) or sessions (UDP) open to a backend now",
            self.active,
        );
        reg.register(
            "backend_connect_failures",
            "Failed connect attempts to a backend",
            self.failures,
        );
        reg.register(
            "backend_health_checks_unknown",
            "Active health checks that could not run for want of this host's ports, \
             descriptors or memory",
            self.checks_unknown,
        );
        reg.register_with_unit(
            "backend",
            "Bytes carried between clients and a backend, by direction",
            Unit::Bytes,
            self.bytes,
        );
        reg.register(
            "backend_up",
            "1 when the health checks say the backend is up",
            self.up,
        );
        reg.register(
            "backend_weight",
            "The weight the scheduler gives the backend now (0: draining, down or removed)",
            self.weight,
        );
        self.xdp
    }
}

/// Registers the XDP per-backend families, then the program's packet count and outcomes.
fn register_xdp(reg: &mut Registry, backends: XdpBackendFamilies, xdp: &XdpStatus) {
    reg.register(
        "xdp_backend_packets",
        "Client packets the XDP program forwarded to a backend",
        backends.packets,
    );
    reg.register(
        "xdp_backend_left_out",
        "1 when the eBPF table gives a backend no slot whatever its health: its replies would \
         miss the program, or XDP cannot send to it (see /status)",
        backends.left_out,
    );
    reg.register(
        "xdp_snat_ports_in_use",
        "SNAT ports towards a backend in use or held after their flow ended (XDP nat)",
        backends.snat_in_use,
    );
    reg.register(
        "xdp_snat_ports_free",
        "SNAT ports a new flow towards a backend may still take (XDP nat)",
        backends.snat_free,
    );
    reg.register_with_unit(
        "xdp_snat_count_timestamp",
        "Unix time at which the count behind the SNAT port gauges began (XDP nat)",
        Unit::Seconds,
        backends.snat_counted,
    );
    let outcomes = Family::<OutcomeLabels, Counter>::default();
    let seen = Counter::<u64>::default();
    for (outcome, n) in &xdp.packets {
        // `packets` is every packet the program saw, not an outcome: summing the
        // outcomes must not count them twice.
        if outcome == "packets" {
            seen.inc_by(*n);
            continue;
        }
        outcomes
            .get_or_create(&OutcomeLabels {
                outcome: outcome.clone(),
            })
            .inc_by(*n);
    }
    reg.register("xdp_packets", "Packets the XDP program saw", seen);
    reg.register(
        "xdp_packet_outcomes",
        "What the XDP program did with packets, by outcome",
        outcomes,
    );
}

/// Registers the proxy-wide counters.
fn register_proxy(reg: &mut Registry, counters: &ProxyCountersView) {
    reg.register(
        "proxy_no_backend",
        "Connections refused and datagrams dropped because no backend was eligible",
        counter(counters.no_backend),
    );
    reg.register(
        "proxy_dropped_datagrams",
        "UDP datagrams dropped",
        counter(counters.dropped_datagrams),
    );
    reg.register(
        "proxy_errors",
        "Connections and sessions ended by an error",
        counter(counters.errors),
    );
}

/// Registers the reload counts, the last applied config's time and the start time.
fn register_reloads(reg: &mut Registry, control: &Control) {
    let history = control.reloads();
    let reloads = Family::<ReloadLabels, Counter>::default();
    reloads
        .get_or_create(&ReloadLabels { result: "applied" })
        .inc_by(history.succeeded);
    reloads
        .get_or_create(&ReloadLabels { result: "refused" })
        .inc_by(history.failed);
    reg.register("reloads", "Config reloads, applied or refused", reloads);
    let last = FloatGauge::default();
    last.set(history.last_success_unix_seconds);
    reg.register_with_unit(
        "config_last_reload_success_timestamp",
        "Unix time of the last applied config (or of start)",
        Unit::Seconds,
        last,
    );
    let start = FloatGauge::default();
    start.set(control.start_unix_seconds());
    reg.register_with_unit(
        "start_time",
        "Unix time of the daemon's start",
        Unit::Seconds,
        start,
    );
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VipLabels {
    vip: String,
}

fn register_announce(reg: &mut Registry, announce: &crate::announce::AnnounceStatus) {
    let announced = Family::<VipLabels, Gauge>::default();
    for v in &announce.vips {
        announced
            .get_or_create(&VipLabels {
                vip: v.vip.to_string(),
            })
            .set(i64::from(v.announced));
    }
    reg.register(
        "vip_announced",
        "1 while the VIP is announced (its route in the [announce] table)",
        announced,
    );
    let draining = Gauge::<i64>::default();
    draining.set(i64::from(announce.node_draining));
    reg.register(
        "node_draining",
        "1 while drain-node holds every VIP back",
        draining,
    );
}

/// A counter standing at `n`.
fn counter(n: u64) -> Counter<u64> {
    let c = Counter::<u64>::default();
    c.inc_by(n);
    c
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
