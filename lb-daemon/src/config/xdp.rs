//! The eBPF data plane's keys of a `[[service]]`, the same for its XDP and tc hooks:
//! `interface`, `backend_interfaces`, `forwarding`, `local_address`, `snat_ports`, `snat_port_hold`; their settings type and
//! their rules.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::raw::{Addresses, RawXdp};
use super::validate::{Validator, XdpContext};
use super::{ConfigError, DataplaneKind, SchedulerKind};
use lb_common::maps::MAX_LOCAL_ADDRS;

/// How the eBPF data plane (XDP or tc) carries a service's packets to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Forwarding {
    /// Full NAT: the destination becomes the backend, the source becomes `local_address` and a
    /// port from `snat_ports`, and replies come back through the balancer, which translates
    /// them back. Works with unmodified backends anywhere the balancer can route to (the
    /// default).
    #[default]
    Nat,
    /// Direct server return: the packet is encapsulated (IPIP / IP6IP6) to the backend, which
    /// decapsulates it (`lb-daemon decap`), sees the client's real address and replies to it
    /// directly from the VIP (configured on its loopback).
    Dsr,
}

/// The default `snat_port_hold`: how long a SNAT port whose flow ended stays out of use. Long
/// enough for the last ACK and a retransmitted FIN of the old flow to find their translation
/// (a few retransmission timeouts); see "SNAT ports" in `lb_common::maps` for why it is not
/// the backend's TIME_WAIT (60 s).
pub const DEFAULT_SNAT_PORT_HOLD: Duration = Duration::from_secs(2);

/// The longest `snat_port_hold` accepted: a port held longer is as good as lost.
pub const MAX_SNAT_PORT_HOLD: Duration = Duration::from_secs(3600);

/// A service's eBPF data plane settings (XDP or tc hook alike). Only the eBPF data plane reads
/// them; `interface` is `None` exactly when the service cannot use it (then the other fields
/// are defaults).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct XdpSettings {
    /// The network interface the VIP's traffic arrives on: the eBPF program attaches there.
    /// `None`: the service cannot use the eBPF data plane (`auto` then runs it on the proxy).
    pub interface: Option<String>,
    /// The interfaces backends are reached through, when not `interface` itself. The program
    /// attaches there too: NAT replies arrive there (and `XDP_REDIRECT` can only send to
    /// interfaces the daemon registered).
    pub backend_interfaces: Vec<String>,
    /// NAT or DSR.
    pub forwarding: Forwarding,
    /// `local_address`: the balancer's own addresses on the backends' side, in the config's
    /// order. `nat`: the SNAT sources (the backends' replies come back to them); one or more,
    /// at most `lb_common::maps::MAX_LOCAL_ADDRS`, each flow taking one by its hash. `dsr`:
    /// exactly one, the encapsulated packets' outer source. Same family as the VIP and the
    /// backends. Empty exactly when `interface` is `None`.
    pub local_addresses: Vec<IpAddr>,
    /// `nat`: the SNAT source ports, inclusive; each concurrent flow to one backend takes one.
    /// `None`: the default, chosen when the service starts on the eBPF data plane: the widest range of at
    /// least 1024 ports outside the host's `net.ipv4.ip_local_port_range` (1024-32767 with
    /// Linux's default), so the balancer's own connections never collide with translated
    /// flows. A configured range that overlaps it is refused then.
    pub snat_ports: Option<(u16, u16)>,
    /// `nat`: how long a SNAT port whose flow ended (both FINs, or an RST) stays out of use
    /// before another flow towards the same backend may take it; whole seconds, at most
    /// [`MAX_SNAT_PORT_HOLD`]. Default [`DEFAULT_SNAT_PORT_HOLD`].
    pub snat_port_hold: Duration,
}

/// The longest interface name Linux accepts (IFNAMSIZ minus the NUL).
const MAX_IFNAME: usize = 15;

/// Whether `n` is a name Linux would take for an interface.
fn is_interface_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_IFNAME
        && !n.contains(['/', ' ', ':', '\t', '\n'])
        && n != "."
        && n != ".."
}

impl Validator<'_> {
    /// Rules: interface names are valid Linux names; `dataplane = "proxy"` takes none of the
    /// eBPF keys; without `interface` none of the others; `dataplane = "xdp"` or `"tc"` needs
    /// `interface` and the `maglev` scheduler (the only one the eBPF program runs). With `interface`:
    /// `local_address` is required and of the VIP's family, as is every backend; `snat_ports`
    /// (nat only) is an ordered range of at least 1024 ports; `dsr` backends listen on the
    /// VIP's port (the packet reaches them unchanged).
    pub(super) fn xdp(
        &self,
        i: usize,
        svc: &XdpContext<'_>,
        raw: RawXdp,
    ) -> Result<XdpSettings, ConfigError> {
        if svc.dataplane == DataplaneKind::Proxy {
            self.no_xdp_keys_on_proxy(i, &raw)?;
            return Ok(XdpSettings::default());
        }
        let Some(interface) = raw.interface.clone() else {
            self.no_xdp_keys_without_interface(i, svc, &raw)?;
            return Ok(XdpSettings::default());
        };
        let backend_interfaces = self.interfaces(i, &interface, raw.backend_interfaces)?;
        self.xdp_scheduler(i, svc)?;
        let forwarding = raw
            .forwarding
            .as_ref()
            .map_or(Forwarding::default(), |v| *v.get_ref());
        let local_addresses =
            self.local_addresses(i, svc, &interface, forwarding, raw.local_address)?;
        let snat_ports = self.snat_ports(i, forwarding, raw.snat_ports)?;
        let snat_port_hold = self.snat_port_hold(i, forwarding, raw.snat_port_hold)?;
        self.xdp_backends(i, svc, forwarding)?;
        Ok(XdpSettings {
            interface: Some(interface.into_inner()),
            backend_interfaces,
            forwarding,
            local_addresses,
            snat_ports,
            snat_port_hold,
        })
    }

    /// `dataplane = "proxy"`: the first eBPF key given, if any, is an error.
    fn no_xdp_keys_on_proxy(&self, i: usize, raw: &RawXdp) -> Result<(), ConfigError> {
        if let Some((key, span)) = raw.first_given(true) {
            return Err(self.invalid(
                span,
                format!("service[{i}].{key}"),
                format!(
                    "`{key}` configures the eBPF data plane, but this service has \
                     dataplane = \"proxy\"; remove it, or use \"auto\", \"xdp\" or \"tc\""
                ),
            ));
        }
        Ok(())
    }

    /// No `interface`: no other eBPF key either, and not `dataplane = "xdp"` or `"tc"` (which
    /// points at the service's name, as there is no key to point at).
    fn no_xdp_keys_without_interface(
        &self,
        i: usize,
        svc: &XdpContext<'_>,
        raw: &RawXdp,
    ) -> Result<(), ConfigError> {
        if let Some((key, span)) = raw.first_given(false) {
            return Err(self.invalid(
                span,
                format!("service[{i}].{key}"),
                format!(
                    "`{key}` needs `interface` (where the VIP's traffic arrives); without \
                     it the service runs on the proxy"
                ),
            ));
        }
        if svc.dataplane.forces_ebpf() {
            let hook = match svc.dataplane {
                DataplaneKind::Tc => "tc",
                _ => "XDP",
            };
            return Err(self.invalid(
                svc.name_span.clone(),
                format!("service[{i}].interface"),
                format!(
                    "dataplane = \"{}\" needs `interface`, the interface the VIP's traffic \
                     arrives on (the {hook} program attaches there)",
                    svc.dataplane
                ),
            ));
        }
        Ok(())
    }

    /// `interface`, then every name in `backend_interfaces`, are Linux interface names;
    /// returns `backend_interfaces` (empty when absent).
    fn interfaces(
        &self,
        i: usize,
        interface: &Spanned<String>,
        backend_interfaces: Option<Spanned<Vec<String>>>,
    ) -> Result<Vec<String>, ConfigError> {
        if !is_interface_name(interface.get_ref()) {
            return Err(self.invalid(
                interface.span(),
                format!("service[{i}].interface"),
                format!(
                    "`{}` is not an interface name (1 to {MAX_IFNAME} bytes, no `/`, `:` or spaces)",
                    interface.get_ref()
                ),
            ));
        }
        let Some(list) = backend_interfaces else {
            return Ok(Vec::new());
        };
        if let Some(bad) = list.get_ref().iter().find(|n| !is_interface_name(n)) {
            return Err(self.invalid(
                list.span(),
                format!("service[{i}].backend_interfaces"),
                format!(
                    "`{bad}` is not an interface name (1 to {MAX_IFNAME} bytes, no `/`, `:` or spaces)"
                ),
            ));
        }
        Ok(list.into_inner())
    }

    /// `dataplane = "xdp"` or `"tc"` runs only `maglev`; `auto` leaves other schedulers to the
    /// proxy.
    fn xdp_scheduler(&self, i: usize, svc: &XdpContext<'_>) -> Result<(), ConfigError> {
        if svc.dataplane.forces_ebpf() && svc.scheduler != SchedulerKind::Maglev {
            return Err(self.invalid(
                svc.name_span.clone(),
                format!("service[{i}].scheduler"),
                format!(
                    "the eBPF data plane (dataplane = \"{}\") runs only the `maglev` scheduler, \
                     not `{}`; use scheduler = \"maglev\", or dataplane = \"auto\" or \"proxy\"",
                    svc.dataplane, svc.scheduler
                ),
            ));
        }
        Ok(())
    }

    /// `local_address`, one address or a list: at least one, at most [`MAX_LOCAL_ADDRS`], no
    /// repeats, each of the VIP's family and one the backends can answer (not unspecified,
    /// loopback, multicast, broadcast, nor IPv4 written as `::ffff:a.b.c.d`); `dsr` takes
    /// exactly one (its outer source).
    fn local_addresses(
        &self,
        i: usize,
        svc: &XdpContext<'_>,
        interface: &Spanned<String>,
        forwarding: Forwarding,
        raw: Option<Spanned<Addresses>>,
    ) -> Result<Vec<IpAddr>, ConfigError> {
        let field = format!("service[{i}].local_address");
        let Some(given) = raw else {
            return Err(self.invalid(
                interface.span(),
                field,
                "an eBPF (XDP or tc) service needs `local_address`, the balancer's own address \
                 on the backends' side (the NAT source, or the outer source of DSR packets)"
                    .into(),
            ));
        };
        let span = given.span();
        let all = given.into_inner().0;
        let bad = |message: String| Err(self.invalid(span.clone(), field.clone(), message));
        if all.is_empty() {
            return bad("the list is empty; give at least one address".into());
        }
        if forwarding == Forwarding::Dsr && all.len() > 1 {
            return bad(
                "forwarding = \"dsr\" sends from one outer source: give one address".into(),
            );
        }
        if all.len() > MAX_LOCAL_ADDRS as usize {
            return bad(format!(
                "{} addresses; a service takes at most {MAX_LOCAL_ADDRS}",
                all.len()
            ));
        }
        for (k, a) in all.iter().enumerate() {
            if let (Some(message), true) =
                (super::validate::ipv4_mapped(*a, None), svc.listen.is_ipv4())
            {
                return bad(message);
            }
            // The backends answer to it: an address they cannot reply to fails every flow.
            let unusable = match a {
                IpAddr::V4(v4) => v4.is_broadcast(),
                IpAddr::V6(_) => false,
            } || a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast();
            if unusable {
                return bad(format!(
                    "{a} cannot be a source the backends answer: give an address of this host \
                     on the backends' side (not unspecified, loopback, multicast or broadcast)"
                ));
            }
            if a.is_ipv4() != svc.listen.is_ipv4() {
                return bad(format!(
                    "{a} is not of the VIP's address family ({})",
                    svc.listen.ip()
                ));
            }
            if all[..k].contains(a) {
                return bad(format!("{a} is given twice"));
            }
        }
        Ok(all)
    }

    /// `snat_ports`: nat only; `[first, last]` with `0 < first <= last`, at least 1024 ports.
    fn snat_ports(
        &self,
        i: usize,
        forwarding: Forwarding,
        raw: Option<Spanned<[u16; 2]>>,
    ) -> Result<Option<(u16, u16)>, ConfigError> {
        let f = || format!("service[{i}].snat_ports");
        match (forwarding, raw) {
            (Forwarding::Dsr, Some(p)) => Err(self.invalid(
                p.span(),
                f(),
                "`snat_ports` is for forwarding = \"nat\"; with \"dsr\" the backend sees \
                 the client's own address and port"
                    .into(),
            )),
            (_, None) => Ok(None),
            (Forwarding::Nat, Some(p)) => {
                let [lo, hi] = *p.get_ref();
                if lo == 0 || hi < lo || u32::from(hi - lo) + 1 < 1024 {
                    return Err(self.invalid(
                        p.span(),
                        f(),
                        format!(
                            "[{lo}, {hi}] must be [first, last] with 0 < first <= last and at \
                             least 1024 ports; keep it outside net.ipv4.ip_local_port_range"
                        ),
                    ));
                }
                Ok(Some((lo, hi)))
            }
        }
    }

    /// `snat_port_hold`: nat only; at most [`MAX_SNAT_PORT_HOLD`], default
    /// [`DEFAULT_SNAT_PORT_HOLD`].
    fn snat_port_hold(
        &self,
        i: usize,
        forwarding: Forwarding,
        raw: Option<Spanned<Duration>>,
    ) -> Result<Duration, ConfigError> {
        let f = || format!("service[{i}].snat_port_hold");
        match (forwarding, raw) {
            (Forwarding::Dsr, Some(h)) => Err(self.invalid(
                h.span(),
                f(),
                "`snat_port_hold` is for forwarding = \"nat\"; \"dsr\" takes no SNAT ports".into(),
            )),
            (_, None) => Ok(DEFAULT_SNAT_PORT_HOLD),
            (Forwarding::Nat, Some(h)) => {
                if *h.get_ref() > MAX_SNAT_PORT_HOLD {
                    return Err(self.invalid(
                        h.span(),
                        f(),
                        format!(
                            "{} is longer than the most a port may be held ({}s)",
                            humantime::format_duration(*h.get_ref()),
                            MAX_SNAT_PORT_HOLD.as_secs()
                        ),
                    ));
                }
                Ok(*h.get_ref())
            }
        }
    }

    /// Every `ip:port` backend is of the VIP's family (the eBPF program forwards within one
    /// family), and
    /// with `dsr` every backend, named ones too, listens on the VIP's port.
    fn xdp_backends(
        &self,
        i: usize,
        svc: &XdpContext<'_>,
        forwarding: Forwarding,
    ) -> Result<(), ConfigError> {
        let vip_port = svc.listen.port();
        let wrong_port = |j: usize, span, port: u16| {
            self.invalid(
                span,
                format!("service[{i}].backend[{j}].address"),
                format!(
                    "with forwarding = \"dsr\" the backend receives the packet as the \
                     client sent it, so it must listen on the VIP's port {vip_port}, not {port}"
                ),
            )
        };
        for (j, b) in svc.backends.iter().enumerate() {
            let text = b.get_ref().address.get_ref();
            let span = b.get_ref().address.span();
            let Ok(address) = text.parse::<SocketAddr>() else {
                // A DNS name: its records are known only at run time. Those of the other
                // family never enter the eBPF table; the DSR port rule applies to the name.
                let port = text
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok());
                if let (Forwarding::Dsr, Some(port)) = (forwarding, port) {
                    if port != vip_port {
                        return Err(wrong_port(j, span, port));
                    }
                }
                continue;
            };
            if super::validate::ipv4_mapped(address.ip(), None).is_some() {
                // Refused by `backends` with the form to write, not as another family.
                continue;
            }
            if address.is_ipv4() != svc.listen.is_ipv4() {
                return Err(self.invalid(
                    span,
                    format!("service[{i}].backend[{j}].address"),
                    format!(
                        "{address} is not of the VIP's address family: the eBPF data plane \
                         forwards within one family"
                    ),
                ));
            }
            if forwarding == Forwarding::Dsr && address.port() != vip_port {
                return Err(wrong_port(j, span, address.port()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod xdp_tests {
    use std::net::IpAddr;
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::config::{parse, Service};

    const BACKENDS: &str = r#"
[[service.backend]]
address = "10.200.1.2:80"
[[service.backend]]
address = "10.200.2.2:80"
"#;

    fn parse_service(keys: &str) -> Result<Service, ConfigError> {
        let text = format!(
            "[[service]]\nname = \"web\"\nlisten = \"10.200.100.1:80\"\nprotocol = \"tcp\"\n{keys}\n{BACKENDS}"
        );
        parse(&text, Path::new("xdp.toml")).map(|mut c| c.services.remove(0))
    }

    fn error(keys: &str) -> (String, Option<usize>) {
        let e = parse_service(keys).expect_err("the config must be refused");
        (e.to_string(), e.line())
    }

    #[test]
    fn nat_service_with_interface_parses_with_defaults() {
        let s = parse_service(
            "dataplane = \"xdp\"\ninterface = \"eth0\"\nlocal_address = \"10.200.0.1\"",
        )
        .expect("valid");
        assert_eq!(s.xdp.interface.as_deref(), Some("eth0"));
        assert_eq!(
            s.xdp.forwarding,
            Forwarding::Nat,
            "nat is the default forwarding"
        );
        assert_eq!(
            s.xdp.local_addresses,
            vec!["10.200.0.1".parse::<IpAddr>().expect("ip")]
        );
        assert_eq!(
            s.xdp.snat_ports, None,
            "the default range is chosen at start"
        );
        assert_eq!(s.xdp.snat_port_hold, DEFAULT_SNAT_PORT_HOLD);
        assert!(s.xdp.backend_interfaces.is_empty());
    }

    #[test]
    fn tc_takes_the_same_keys_and_rules_as_xdp() {
        let s = parse_service(
            "dataplane = \"tc\"\ninterface = \"l0\"\nbackend_interfaces = [\"br0\"]\n\
             forwarding = \"dsr\"\nlocal_address = \"10.200.0.1\"",
        )
        .expect("a tc service with the XDP keys is valid");
        assert_eq!(s.dataplane, DataplaneKind::Tc);
        assert_eq!(s.xdp.interface.as_deref(), Some("l0"));
        assert_eq!(s.xdp.backend_interfaces, vec!["br0".to_string()]);
        assert_eq!(s.xdp.forwarding, Forwarding::Dsr);
        let (msg, line) = error("dataplane = \"tc\"");
        assert!(
            msg.contains("dataplane = \"tc\" needs `interface`") && msg.contains("tc program"),
            "{msg}"
        );
        assert_eq!(line, Some(2), "{msg}");
        let (msg, _) = error(
            "dataplane = \"tc\"\nscheduler = \"round_robin\"\ninterface = \"l0\"\nlocal_address = \"10.200.0.1\"",
        );
        assert!(
            msg.contains("service[0].scheduler") && msg.contains("dataplane = \"tc\""),
            "{msg}"
        );
        let (msg, _) = error("dataplane = \"tc\"\ninterface = \"l0\"");
        assert!(msg.contains("service[0].local_address"), "{msg}");
    }

    #[test]
    fn auto_without_interface_has_no_xdp_settings() {
        let s = parse_service("").expect("valid");
        assert_eq!(s.dataplane, DataplaneKind::Auto);
        assert_eq!(s.xdp, XdpSettings::default());
    }

    #[test]
    fn xdp_needs_an_interface() {
        let (msg, line) = error("dataplane = \"xdp\"");
        assert!(
            msg.contains("service[0].interface") && msg.contains("needs `interface`"),
            "{msg}"
        );
        assert_eq!(
            line,
            Some(2),
            "the error points at the service's name line: {msg}"
        );
    }

    #[test]
    fn xdp_refuses_schedulers_other_than_maglev() {
        let (msg, line) = error(
            "dataplane = \"xdp\"\nscheduler = \"least_conn\"\ninterface = \"eth0\"\nlocal_address = \"10.200.0.1\"",
        );
        assert!(
            msg.contains("service[0].scheduler") && msg.contains("`least_conn`"),
            "{msg}"
        );
        assert_eq!(line, Some(2), "{msg}");
    }

    #[test]
    fn auto_accepts_other_schedulers_and_leaves_the_choice_to_the_daemon() {
        let s = parse_service(
            "scheduler = \"round_robin\"\ninterface = \"eth0\"\nlocal_address = \"10.200.0.1\"",
        )
        .expect("auto with round_robin is valid: it runs on the proxy");
        assert_eq!(s.scheduler, SchedulerKind::RoundRobin);
    }

    #[test]
    fn proxy_refuses_xdp_keys() {
        let (msg, line) = error("dataplane = \"proxy\"\ninterface = \"eth0\"");
        assert!(
            msg.contains("service[0].interface") && msg.contains("dataplane = \"proxy\""),
            "{msg}"
        );
        assert_eq!(line, Some(6), "{msg}");
    }

    #[test]
    fn xdp_keys_without_interface_are_refused_not_ignored() {
        let (msg, line) = error("forwarding = \"dsr\"");
        assert!(
            msg.contains("service[0].forwarding") && msg.contains("needs `interface`"),
            "{msg}"
        );
        assert_eq!(line, Some(5), "{msg}");
    }

    #[test]
    fn local_address_is_required_and_of_the_vips_family() {
        let (msg, line) = error("interface = \"eth0\"");
        assert!(msg.contains("service[0].local_address"), "{msg}");
        assert_eq!(line, Some(5), "{msg}");
        let (msg, line) = error("interface = \"eth0\"\nlocal_address = \"fd00::1\"");
        assert!(msg.contains("address family"), "{msg}");
        assert_eq!(line, Some(6), "{msg}");
    }

    #[test]
    fn an_ipv4_mapped_backend_of_an_ebpf_service_is_told_its_ipv4_form() {
        let text = "[[service]]\nname = \"web\"\nlisten = \"10.200.100.1:80\"\n\
                    protocol = \"tcp\"\ninterface = \"eth0\"\nlocal_address = \"10.200.0.1\"\n\
                    [[service.backend]]\naddress = \"[::ffff:10.200.1.2]:80\"\n";
        let msg = crate::config::parse(text, std::path::Path::new("t.toml"))
            .expect_err("a mapped backend")
            .to_string();
        assert!(msg.contains("write it as 10.200.1.2:80"), "{msg}");
    }

    #[test]
    fn local_address_must_be_one_the_backends_can_answer() {
        for bad in ["0.0.0.0", "127.0.0.1", "224.0.0.1", "255.255.255.255"] {
            let (msg, line) = error(&format!("interface = \"eth0\"\nlocal_address = \"{bad}\""));
            assert!(
                msg.contains("service[0].local_address") && msg.contains("cannot be a source"),
                "{bad}: {msg}"
            );
            assert_eq!(line, Some(6), "{msg}");
        }
    }

    #[test]
    fn local_address_may_be_a_pool_for_nat_only() {
        let s =
            parse_service("interface = \"eth0\"\nlocal_address = [\"10.200.0.1\", \"10.200.0.3\"]")
                .expect("a pool of two");
        let want: Vec<IpAddr> = vec![
            "10.200.0.1".parse().expect("ip"),
            "10.200.0.3".parse().expect("ip"),
        ];
        assert_eq!(s.xdp.local_addresses, want);
        let sixteen: Vec<String> = (1..=17).map(|i| format!("\"10.200.0.{i}\"")).collect();
        for (keys, words) in [
            ("local_address = []", "empty"),
            (
                "local_address = [\"10.200.0.1\", \"10.200.0.1\"]",
                "given twice",
            ),
            (
                "local_address = [\"10.200.0.1\", \"fd00::1\"]",
                "address family",
            ),
            (
                "forwarding = \"dsr\"\nlocal_address = [\"10.200.0.1\", \"10.200.0.3\"]",
                "one outer source",
            ),
            (
                &format!("local_address = [{}]", sixteen.join(", ")),
                "at most 16",
            ),
            ("local_address = \"not-an-ip\"", "is not an IP address"),
        ] {
            let (msg, line) = error(&format!("interface = \"eth0\"\n{keys}"));
            assert!(
                msg.contains("local_address") && msg.contains(words),
                "`{keys}` must be refused with `{words}`: {msg}"
            );
            assert!(line.is_some(), "`{keys}`: no line in {msg}");
        }
    }

    #[test]
    fn snat_port_hold_is_a_nat_duration_of_at_most_an_hour() {
        let nat = "interface = \"eth0\"\nlocal_address = \"10.200.0.1\"\n";
        let s = parse_service(&format!("{nat}snat_port_hold = \"30s\"")).expect("valid");
        assert_eq!(s.xdp.snat_port_hold, Duration::from_secs(30));
        let (msg, line) = error(&format!("{nat}snat_port_hold = \"2h\""));
        assert!(msg.contains("service[0].snat_port_hold"), "{msg}");
        assert_eq!(line, Some(7), "{msg}");
        let (msg, _) = error(&format!(
            "{nat}forwarding = \"dsr\"\nsnat_port_hold = \"1s\""
        ));
        assert!(msg.contains("service[0].snat_port_hold"), "{msg}");
    }

    #[test]
    fn bad_interface_names_and_snat_ranges_are_refused() {
        let (msg, _) =
            error("interface = \"a-name-longer-than-15\"\nlocal_address = \"10.200.0.1\"");
        assert!(msg.contains("not an interface name"), "{msg}");
        let (msg, _) = error(
            "interface = \"eth0\"\nbackend_interfaces = [\"ok\", \"bad/name\"]\nlocal_address = \"10.200.0.1\"",
        );
        assert!(msg.contains("service[0].backend_interfaces"), "{msg}");
        let (msg, line) = error(
            "interface = \"eth0\"\nlocal_address = \"10.200.0.1\"\nsnat_ports = [62000, 61000]",
        );
        assert!(msg.contains("service[0].snat_ports"), "{msg}");
        assert_eq!(line, Some(7), "{msg}");
    }

    #[test]
    fn dsr_backends_listen_on_the_vip_port_and_take_no_snat_ports() {
        let s = parse_service(
            "forwarding = \"dsr\"\ninterface = \"eth0\"\nlocal_address = \"10.200.0.1\"",
        )
        .expect("dsr with backends on port 80 is valid");
        assert_eq!(s.xdp.forwarding, Forwarding::Dsr);
        let (msg, _) = error(
            "forwarding = \"dsr\"\ninterface = \"eth0\"\nlocal_address = \"10.200.0.1\"\nsnat_ports = [61000, 65000]",
        );
        assert!(msg.contains("service[0].snat_ports"), "{msg}");
        let text = "[[service]]\nname = \"web\"\nlisten = \"10.200.100.1:80\"\nprotocol = \"tcp\"\nforwarding = \"dsr\"\ninterface = \"eth0\"\nlocal_address = \"10.200.0.1\"\n[[service.backend]]\naddress = \"10.200.1.2:8080\"\n";
        let e = parse(text, Path::new("xdp.toml")).expect_err("port 8080 != VIP port 80");
        assert!(
            e.to_string().contains("service[0].backend[0].address") && e.line() == Some(9),
            "{e}"
        );
    }

    #[test]
    fn global_bpf_object_is_kept() {
        let text = format!(
            "[global]\nbpf_object = \"/opt/lb/lb-ebpf\"\n[[service]]\nname = \"web\"\nlisten = \"10.200.100.1:80\"\nprotocol = \"tcp\"\n{BACKENDS}"
        );
        let c = parse(&text, Path::new("xdp.toml")).expect("valid");
        assert_eq!(c.global.bpf_object, Some(PathBuf::from("/opt/lb/lb-ebpf")));
    }
}

#[cfg(test)]
mod xdp_examples {
    #[test]
    fn the_xdp_example_configs_are_valid() {
        for (name, text) in [
            (
                "config/xdp-nat.toml",
                include_str!("../../../config/xdp-nat.toml"),
            ),
            (
                "config/xdp-dsr.toml",
                include_str!("../../../config/xdp-dsr.toml"),
            ),
        ] {
            if let Err(e) = crate::config::parse(text, std::path::Path::new(name)) {
                panic!("the example {name} no longer parses: {e}");
            }
        }
    }
}
