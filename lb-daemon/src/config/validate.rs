//! The rules a parsed file must follow: the `Validator` core, `[global]`, `[admin]`, and one
//! `[[service]]` (its backends, health, limits and XDP keys each have their own file).
//!
//! Checks run in file order and the first broken rule is the error, so the order of the
//! steps below is part of the behaviour (the tests assert which error a file gets).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use super::backends::OwnListens;
use super::raw::{RawAdmin, RawAnnounce, RawBackend, RawConfig, RawGlobal, RawService, RawXdp};
use super::{
    is_prime, locate, Admin, AdminGroup, AdminToken, Announce, Config, ConfigError, DataplaneKind,
    Global, Protocol, ProxyOnly, ProxyProtocol, SchedulerKind, Service, DEFAULT_ADMIN_LISTEN,
    DEFAULT_ANNOUNCE_PROTOCOL, DEFAULT_TABLE_SIZE, MAX_TABLE_SIZE, MAX_WORKERS,
};

/// Checks a [`RawConfig`] against the rules and builds the [`Config`]; knows the text only
/// to turn spans into lines.
/// The longest service name, in bytes (ASCII characters).
const MAX_NAME_LEN: usize = 64;

pub(super) struct Validator<'a> {
    pub(super) text: &'a str,
    pub(super) path: &'a Path,
}

/// What the XDP rules need to know of the rest of a `[[service]]`.
pub(super) struct XdpContext<'a> {
    pub(super) name_span: Range<usize>,
    pub(super) listen: SocketAddr,
    pub(super) dataplane: DataplaneKind,
    pub(super) scheduler: SchedulerKind,
    pub(super) backends: &'a [Spanned<RawBackend>],
}

/// The longest token file read, in bytes: a token is a line, and a path like `/dev/zero`
/// must not make `check` read forever.
const MAX_TOKEN_FILE: u64 = 4096;

/// The contents of the regular file `path`, at most [`MAX_TOKEN_FILE`] bytes of UTF-8.
fn read_token(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut text = String::new();
    file.take(MAX_TOKEN_FILE + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_TOKEN_FILE {
        return Err(std::io::Error::other(format!(
            "longer than {MAX_TOKEN_FILE} bytes"
        )));
    }
    Ok(text)
}

impl Validator<'_> {
    /// An `Invalid` error at `span` of the text.
    pub(super) fn invalid(
        &self,
        span: Range<usize>,
        field: String,
        message: String,
    ) -> ConfigError {
        ConfigError::Invalid {
            location: locate(self.text, self.path, &span),
            field,
            message,
        }
    }

    /// A duration that must be above zero; `default` when the key is absent.
    pub(super) fn positive(
        &self,
        d: Option<Spanned<Duration>>,
        default: Duration,
        field: impl FnOnce() -> String,
    ) -> Result<Duration, ConfigError> {
        match d {
            None => Ok(default),
            Some(d) if d.get_ref().is_zero() => {
                Err(self.invalid(d.span(), field(), "must be longer than 0".into()))
            }
            Some(d) => Ok(d.into_inner()),
        }
    }

    /// The whole file: at least one service, `[global]`, every service's name and listen
    /// address, `[admin]` (and no TCP service a socket of on its address), then every
    /// service's other keys.
    pub(super) fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        if raw.service.is_empty() {
            return Err(self.invalid(
                0..0,
                "service".into(),
                "no [[service]] is configured; a config needs at least one".into(),
            ));
        }
        let global = self.global(raw.global)?;
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut listens: HashMap<(SocketAddr, Protocol), String> = HashMap::new();
        let raws: Vec<(Range<usize>, RawService)> = raw
            .service
            .into_iter()
            .map(|s| (s.span(), s.into_inner()))
            .collect();
        // Every listen address first: a backend may not be any of them.
        let mut ids = Vec::with_capacity(raws.len());
        for (i, (_, svc)) in raws.iter().enumerate() {
            ids.push(self.identity(i, svc, &mut names, &mut listens)?);
        }
        let admin = self.admin(raw.admin)?;
        // The API binds after the services: one of them at its address would stop the start.
        if let Some(at) = admin.listen.filter(|a| a.port() != 0) {
            for (i, (_, svc)) in raws.iter().enumerate() {
                let listen = *svc.listen.get_ref();
                // An eBPF-only service binds no socket.
                let binds = !matches!(svc.dataplane, DataplaneKind::Xdp | DataplaneKind::Tc);
                if svc.protocol == Protocol::Tcp && binds && binds_overlap(listen, at) {
                    return Err(self.invalid(
                        svc.listen.span(),
                        format!("service[{i}].listen"),
                        format!(
                            "{listen} takes the admin API's address {at} (`[admin] listen`); \
                             move one of them"
                        ),
                    ));
                }
            }
        }
        let own = OwnListens::new(listens, admin.listen);
        let mut services = Vec::with_capacity(raws.len());
        for (i, ((svc_span, svc), (name, listen))) in raws.into_iter().zip(ids).enumerate() {
            services.push(self.service(i, svc_span, name, listen, svc, &own)?);
        }
        let announce = raw.announce.map(|a| self.announce(a)).transpose()?;
        Ok(Config {
            global,
            admin,
            services,
            announce,
        })
    }

    /// `[announce]`: `table`, `protocol`, `withdraw_wait`.
    fn announce(&self, raw: Spanned<RawAnnounce>) -> Result<Announce, ConfigError> {
        let raw = raw.into_inner();
        let table = match *raw.table.get_ref() {
            0 | 253..=255 => {
                return Err(self.invalid(
                    raw.table.span(),
                    "announce.table".into(),
                    format!(
                        "{} is the kernel's own (0 unspecified, 253 default, 254 main, 255 \
                         local); give a table of its own, e.g. 100",
                        raw.table.get_ref()
                    ),
                ))
            }
            t => t,
        };
        let protocol = match raw.protocol {
            None => DEFAULT_ANNOUNCE_PROTOCOL,
            Some(p) => match u8::try_from(*p.get_ref()) {
                Ok(n) if n > 4 && n != 12 => n,
                _ => {
                    return Err(self.invalid(
                        p.span(),
                        "announce.protocol".into(),
                        format!(
                            "{} is not a route protocol number of its own: 5..=255, not 12 \
                             (BIRD's)",
                            p.get_ref()
                        ),
                    ))
                }
            },
        };
        Ok(Announce {
            table,
            protocol,
            withdraw_wait: raw
                .withdraw_wait
                .map_or(Duration::from_secs(2), Spanned::into_inner),
        })
    }

    /// `[global]`: `workers`, `worker_priority`, then `drain_timeout`.
    fn global(&self, raw: RawGlobal) -> Result<Global, ConfigError> {
        Ok(Global {
            workers: match raw.workers {
                None => 0,
                Some(n) if *n.get_ref() <= MAX_WORKERS => n.into_inner(),
                Some(n) => {
                    return Err(self.invalid(
                        n.span(),
                        "global.workers".into(),
                        format!(
                            "{} is more than {MAX_WORKERS}; 0 means one per core",
                            n.get_ref()
                        ),
                    ))
                }
            },
            worker_priority: match raw.worker_priority {
                None => super::DEFAULT_WORKER_PRIORITY,
                Some(n) => match i32::try_from(*n.get_ref()) {
                    Ok(nice) if (-20..=19).contains(&nice) => nice,
                    _ => {
                        return Err(self.invalid(
                            n.span(),
                            "global.worker_priority".into(),
                            format!(
                                "{} is not a nice value: -20 (most favoured) to 19",
                                n.get_ref()
                            ),
                        ))
                    }
                },
            },
            drain_timeout: self.positive(raw.drain_timeout, Duration::from_secs(30), || {
                "global.drain_timeout".into()
            })?,
            bpf_object: match raw.bpf_object {
                // Taken as a path, "" would be the only place looked at, and never found.
                Some(p) if p.get_ref().as_os_str().is_empty() => {
                    return Err(self.invalid(
                        p.span(),
                        "global.bpf_object".into(),
                        "is empty; leave the key out for the default search".into(),
                    ))
                }
                other => other.map(Spanned::into_inner),
            },
            upgrade_socket: match raw.upgrade_socket {
                None => None,
                Some(p) if p.get_ref().as_os_str().len() > super::MAX_SOCKET_PATH => {
                    return Err(self.invalid(
                        p.span(),
                        "global.upgrade_socket".into(),
                        too_long(p.get_ref()),
                    ))
                }
                Some(p) if p.get_ref().is_absolute() => Some(p.into_inner()),
                Some(p) => {
                    return Err(self.invalid(
                        p.span(),
                        "global.upgrade_socket".into(),
                        format!("{} is not an absolute path", p.get_ref().display()),
                    ))
                }
            },
            bpf_pin_dir: match raw.bpf_pin_dir {
                None => Some(super::default_bpf_pin_dir()),
                Some(d) if d.get_ref().as_os_str().is_empty() => None,
                Some(d) if d.get_ref().is_absolute() => Some(d.into_inner()),
                Some(d) => {
                    return Err(self.invalid(
                        d.span(),
                        "global.bpf_pin_dir".into(),
                        format!(
                            "{} is not an absolute path (a directory on a bpffs, or \"\" to \
                             pin nothing)",
                            d.get_ref().display()
                        ),
                    ))
                }
            },
        })
    }

    /// `[admin]`: `listen` (an address, not IPv4 written as `::ffff:a.b.c.d`; the default, or
    /// "" for none), an absolute `socket` path of at most [`super::MAX_SOCKET_PATH`] bytes, its
    /// `group` (which must exist), and `token_file` (read now; required when
    /// `listen` is not loopback). At least one of `listen` and `socket`.
    fn admin(&self, raw: RawAdmin) -> Result<Admin, ConfigError> {
        let listen_span = raw.listen.as_ref().map_or(0..0, |l| l.span());
        let listen = match raw.listen {
            None => Some(DEFAULT_ADMIN_LISTEN),
            Some(l) if l.get_ref().trim().is_empty() => None,
            Some(l) => {
                let at = l.get_ref().trim().parse::<SocketAddr>().map_err(|_| {
                    self.invalid(
                        l.span(),
                        "admin.listen".into(),
                        format!(
                            "`{}` is not an address like \"127.0.0.1:9100\" (or \"\" for the \
                             socket only)",
                            l.get_ref()
                        ),
                    )
                })?;
                if let Some(message) = ipv4_mapped(at.ip(), Some(at.port())) {
                    return Err(self.invalid(l.span(), "admin.listen".into(), message));
                }
                Some(at)
            }
        };
        let socket = match raw.socket {
            None => None,
            Some(p) if p.get_ref().as_os_str().len() > super::MAX_SOCKET_PATH => {
                return Err(self.invalid(p.span(), "admin.socket".into(), too_long(p.get_ref())))
            }
            Some(p) if p.get_ref().is_absolute() => Some(p.into_inner()),
            Some(p) => {
                return Err(self.invalid(
                    p.span(),
                    "admin.socket".into(),
                    format!("`{}` must be an absolute path", p.get_ref().display()),
                ))
            }
        };
        if listen.is_none() && socket.is_none() {
            return Err(self.invalid(
                listen_span,
                "admin.listen".into(),
                "is \"\" and there is no `socket`: the admin API needs one of them".into(),
            ));
        }
        let group = match raw.group {
            None => None,
            Some(g) if socket.is_none() => {
                return Err(self.invalid(
                    g.span(),
                    "admin.group".into(),
                    "is the unix socket's group, and there is no `socket`".into(),
                ))
            }
            Some(g) => {
                let name = g.get_ref().trim().to_string();
                match nix::unistd::Group::from_name(&name) {
                    Ok(Some(found)) => Some(AdminGroup {
                        name,
                        gid: found.gid.as_raw(),
                    }),
                    Ok(None) => {
                        return Err(self.invalid(
                            g.span(),
                            "admin.group".into(),
                            format!("there is no group `{name}` on this host"),
                        ))
                    }
                    Err(e) => {
                        return Err(self.invalid(
                            g.span(),
                            "admin.group".into(),
                            format!("cannot look group `{name}` up: {e}"),
                        ))
                    }
                }
            }
        };
        let token = match raw.token_file {
            None => None,
            Some(f) => {
                let bad =
                    |message: String| self.invalid(f.span(), "admin.token_file".into(), message);
                let text = read_token(f.get_ref())
                    .map_err(|e| bad(format!("cannot read `{}`: {e}", f.get_ref().display())))?;
                let secret = text.trim().to_string();
                if secret.is_empty() {
                    return Err(bad(format!("`{}` is empty", f.get_ref().display())));
                }
                Some(AdminToken {
                    file: f.get_ref().clone(),
                    secret,
                })
            }
        };
        if let Some(addr) = listen {
            if !addr.ip().is_loopback() && token.is_none() {
                return Err(self.invalid(
                    listen_span,
                    "admin.listen".into(),
                    format!(
                        "{addr} is not a loopback address: anyone who reaches it could drain and \
                         reload the balancer; set `token_file` (a bearer token) or listen on \
                         127.0.0.1"
                    ),
                ));
            }
        }
        Ok(Admin {
            listen,
            socket,
            group,
            token,
        })
    }

    /// Service `i`'s name (not empty, unique) and listen address (unique per protocol);
    /// records both in `names` and `listens` for the services after it.
    fn identity(
        &self,
        i: usize,
        svc: &RawService,
        names: &mut HashMap<String, usize>,
        listens: &mut HashMap<(SocketAddr, Protocol), String>,
    ) -> Result<(String, SocketAddr), ConfigError> {
        let name_span = svc.name.span();
        let name = svc.name.get_ref().clone();
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return Err(self.invalid(
                name_span,
                format!("service[{i}].name"),
                format!("must be 1 to {MAX_NAME_LEN} characters long"),
            ));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        {
            return Err(self.invalid(
                name_span,
                format!("service[{i}].name"),
                format!(
                    "`{name}` has {c:?}; a name is letters, digits, `_`, `.` and `-` (it is \
                     a metrics label and a URL path segment)"
                ),
            ));
        }
        if let Some(first) = names.insert(name.clone(), i) {
            return Err(self.invalid(
                name_span,
                format!("service[{i}].name"),
                format!("duplicate service name `{name}` (also service[{first}])"),
            ));
        }
        let listen_span = svc.listen.span();
        let listen = *svc.listen.get_ref();
        if let Some(message) = ipv4_mapped(listen.ip(), Some(listen.port())) {
            return Err(self.invalid(listen_span, format!("service[{i}].listen"), message));
        }
        if let Some(other) = listens.insert((listen, svc.protocol), name.clone()) {
            return Err(self.invalid(
                listen_span,
                format!("service[{i}].listen"),
                format!("duplicate listen address {listen} (also service `{other}`)"),
            ));
        }
        Ok((name, listen))
    }

    /// One `[[service]]` after its name and listen address: retries, table size, the XDP
    /// keys, the backends, health, timeouts, PROXY protocol and limits, in that order.
    fn service(
        &self,
        i: usize,
        svc_span: Range<usize>,
        name: String,
        listen: SocketAddr,
        svc: RawService,
        own: &OwnListens,
    ) -> Result<Service, ConfigError> {
        let f = |k: &str| format!("service[{i}].{k}");
        // Checked after the backend count, but copied out before the fields move.
        let raw_xdp = RawXdp::of(&svc);
        // Where a setting only the proxy runs is written, for a forced eBPF data plane.
        let spans = ProxyOnlySpans {
            name: svc.name.span(),
            listen: svc.listen.span(),
            // Only a header that is on keeps the service off the eBPF plane.
            proxy_protocol: (svc.proxy_protocol.as_ref())
                .filter(|p| *p.get_ref() != ProxyProtocol::Off)
                .map(|p| p.span()),
            access_log: svc.access_log.as_ref().map(|a| a.span()),
            per_client: (svc.limits.as_ref())
                .and_then(|l| l.max_connections_per_client.as_ref())
                .map(|m| m.span()),
            flow_cap: (svc.max_connections.as_ref())
                .or(svc.max_sessions.as_ref())
                .map(|m| m.span()),
            service: svc_span.clone(),
        };
        let retries = self.retries(i, svc.retries)?;
        let table_size_span = svc
            .table_size
            .as_ref()
            .map_or(svc_span.clone(), |m| m.span());
        let table_size = self.table_size(i, svc.table_size)?;
        if svc.backend.is_empty() {
            return Err(self.invalid(
                svc_span.clone(),
                f("backend"),
                format!("service `{name}` has no [[service.backend]]; it needs at least one"),
            ));
        }
        let xdp = self.xdp(
            i,
            &XdpContext {
                name_span: svc.name.span(),
                listen,
                dataplane: svc.dataplane,
                scheduler: svc.scheduler,
                backends: &svc.backend,
            },
            raw_xdp,
        )?;
        let (backends, discovered) = self.backends(i, svc.backend, svc.protocol, own)?;
        self.some_weight(i, &svc_span, &name, &backends, &discovered)?;
        self.table_holds(i, table_size, table_size_span.clone(), backends.len())?;
        let health = self.health(i, svc.protocol, svc.health)?;
        // The fields are checked in the order they are written here.
        let service = Service {
            name,
            listen,
            protocol: svc.protocol,
            scheduler: svc.scheduler,
            dataplane: svc.dataplane,
            connect_timeout: self.positive(svc.connect_timeout, Duration::from_secs(5), || {
                f("connect_timeout")
            })?,
            idle_timeout: self.positive(
                svc.idle_timeout,
                match svc.protocol {
                    Protocol::Tcp => Duration::from_secs(600),
                    Protocol::Udp => Duration::from_secs(30),
                },
                || f("idle_timeout"),
            )?,
            retries,
            table_size,
            health,
            backends,
            discovered,
            resolve_interval: self.positive(
                svc.resolve_interval,
                Duration::from_secs(5),
                || f("resolve_interval"),
            )?,
            slow_start: match svc.slow_start {
                None => None,
                Some(d) => Some(self.positive(Some(d), Duration::ZERO, || f("slow_start"))?),
            },
            proxy_protocol: self.proxy_protocol(i, svc.protocol, svc.proxy_protocol)?,
            limits: self.limits(i, svc.limits)?,
            max_flows: self.max_flows(i, svc.protocol, svc.max_connections, svc.max_sessions)?,
            access_log: svc.access_log.is_some_and(|a| *a.get_ref()),
            xdp,
        };
        self.runs_on_forced_ebpf(i, &service, spans, table_size_span)?;
        Ok(service)
    }

    /// `dataplane = "xdp"` or `"tc"` with a setting only the proxy runs
    /// ([`Service::proxy_only`]): refused at that setting's line, rather than at the start.
    fn runs_on_forced_ebpf(
        &self,
        i: usize,
        service: &Service,
        spans: ProxyOnlySpans,
        table_size: Range<usize>,
    ) -> Result<(), ConfigError> {
        if !service.dataplane.forces_ebpf() {
            return Ok(());
        }
        let Some(setting) = service.proxy_only() else {
            return Ok(());
        };
        let flow_cap = match service.protocol {
            Protocol::Tcp => "max_connections",
            Protocol::Udp => "max_sessions",
        };
        let (key, span) = match setting {
            ProxyOnly::Scheduler(_) => ("scheduler", spans.name),
            ProxyOnly::LoopbackVip(_) | ProxyOnly::WildcardVip(_) => ("listen", spans.listen),
            ProxyOnly::TableTooLarge(_) => ("table_size", table_size),
            ProxyOnly::ProxyOnlySettings => match spans.proxy_protocol {
                Some(span) => ("proxy_protocol", span),
                None => ("access_log", spans.access_log.unwrap_or(spans.service)),
            },
            ProxyOnly::UdpSessionLimit => (
                "limits.max_connections_per_client",
                spans.per_client.unwrap_or(spans.service),
            ),
            ProxyOnly::FlowCap => (flow_cap, spans.flow_cap.unwrap_or(spans.service)),
        };
        Err(self.invalid(
            span,
            format!("service[{i}].{key}"),
            format!(
                "dataplane = \"{}\" cannot carry this service: {setting}; use dataplane = \
                 \"auto\" (which runs it on the proxy) or \"proxy\"",
                service.dataplane
            ),
        ))
    }

    /// `retries`: at most 100; 2 by default.
    fn retries(&self, i: usize, raw: Option<Spanned<u32>>) -> Result<u32, ConfigError> {
        match raw {
            None => Ok(2),
            Some(r) if *r.get_ref() > 100 => Err(self.invalid(
                r.span(),
                format!("service[{i}].retries"),
                "must be at most 100".into(),
            )),
            Some(r) => Ok(r.into_inner()),
        }
    }

    /// `table_size`: a prime no larger than [`MAX_TABLE_SIZE`]; the Maglev default otherwise.
    fn table_size(&self, i: usize, raw: Option<Spanned<u32>>) -> Result<u32, ConfigError> {
        let Some(m) = raw else {
            return Ok(DEFAULT_TABLE_SIZE);
        };
        let v = *m.get_ref();
        if !is_prime(v) || v > MAX_TABLE_SIZE {
            return Err(self.invalid(
                m.span(),
                format!("service[{i}].table_size"),
                format!(
                    "{v} must be a prime no larger than {MAX_TABLE_SIZE} (65537 is the default)"
                ),
            ));
        }
        Ok(v)
    }

    /// The Maglev table (at `span`) has room for each of the `count` backends.
    fn table_holds(
        &self,
        i: usize,
        table_size: u32,
        span: Range<usize>,
        count: usize,
    ) -> Result<(), ConfigError> {
        if (table_size as usize) < count {
            return Err(self.invalid(
                span,
                format!("service[{i}].table_size"),
                format!("table size {table_size} is smaller than the {count} backends"),
            ));
        }
        Ok(())
    }

    /// `proxy_protocol`: v1 is text over a TCP stream, so a UDP service cannot use it.
    fn proxy_protocol(
        &self,
        i: usize,
        protocol: Protocol,
        raw: Option<Spanned<ProxyProtocol>>,
    ) -> Result<ProxyProtocol, ConfigError> {
        match raw {
            None => Ok(ProxyProtocol::Off),
            Some(p) if *p.get_ref() == ProxyProtocol::V1 && protocol == Protocol::Udp => Err(self
                .invalid(
                    p.span(),
                    format!("service[{i}].proxy_protocol"),
                    "PROXY protocol v1 carries only TCP; use \"v2\" for a UDP service".into(),
                )),
            Some(p) => Ok(p.into_inner()),
        }
    }
}

/// Whether TCP sockets bound to `a` and `b` take the same connections: the same port, and
/// the same address, or a wildcard of the other's family (the IPv6 one, dual-stack, takes
/// IPv4 too).
fn binds_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let covers =
        |w: SocketAddr, o: SocketAddr| w.ip().is_unspecified() && (w.is_ipv6() || o.is_ipv4());
    a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

/// Where a service's settings that only the proxy runs are written (see
/// `Validator::runs_on_forced_ebpf`); `service`, the `[[service]]` table, as the fallback.
struct ProxyOnlySpans {
    name: Range<usize>,
    listen: Range<usize>,
    proxy_protocol: Option<Range<usize>>,
    access_log: Option<Range<usize>>,
    per_client: Option<Range<usize>>,
    flow_cap: Option<Range<usize>>,
    service: Range<usize>,
}

/// The message for a socket path longer than [`super::MAX_SOCKET_PATH`].
fn too_long(path: &Path) -> String {
    format!(
        "`{}` is {} bytes long; a unix socket path has at most {}",
        path.display(),
        path.as_os_str().len(),
        super::MAX_SOCKET_PATH
    )
}

/// The message for an IPv4 address written in its IPv4-mapped IPv6 form (`::ffff:a.b.c.d`):
/// the checks that compare addresses (duplicate VIPs and backends, a backend that is the
/// service's own address, the admin API's address) compare them as written, and the
/// eBPF plane would key such a VIP as IPv6, which no IPv4 packet matches. `None` for any
/// other address.
pub(super) fn ipv4_mapped(ip: IpAddr, port: Option<u16>) -> Option<String> {
    let IpAddr::V6(v6) = ip else { return None };
    let v4 = v6.to_ipv4_mapped()?;
    let plain = port.map_or_else(|| v4.to_string(), |p| format!("{v4}:{p}"));
    Some(format!(
        "`{ip}` is an IPv4 address in its IPv4-mapped IPv6 form; write it as {plain}"
    ))
}

#[cfg(test)]
mod tests {
    use super::binds_overlap;

    #[test]
    fn binds_overlap_by_port_address_and_family() {
        let a = |s: &str| s.parse().expect("literal");
        assert!(binds_overlap(a("127.0.0.1:9100"), a("127.0.0.1:9100")));
        assert!(binds_overlap(a("0.0.0.0:9100"), a("127.0.0.1:9100")));
        assert!(
            binds_overlap(a("127.0.0.1:9100"), a("[::]:9100")),
            "dual-stack"
        );
        assert!(
            !binds_overlap(a("0.0.0.0:9100"), a("[::1]:9100")),
            "other family"
        );
        assert!(!binds_overlap(a("127.0.0.1:9100"), a("127.0.0.2:9100")));
        assert!(!binds_overlap(a("0.0.0.0:9100"), a("0.0.0.0:9101")));
    }
}
