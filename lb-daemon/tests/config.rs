//! Config validation: every bad file names its line and field; the example configs are valid.

use std::path::Path;

use lb_daemon::config::{self, CheckKind, ConfigError, Protocol, SchedulerKind};

const GOOD: &str = r#"
[[service]]
name = "web"
listen = "127.0.0.1:8080"
protocol = "tcp"

[[service.backend]]
address = "127.0.0.1:9001"

[[service.backend]]
address = "127.0.0.1:9002"
weight = 3
"#;

fn parse(text: &str) -> Result<config::Config, ConfigError> {
    config::parse(text, Path::new("test.toml"))
}

/// Asserts that `text` is rejected with an error on `line` that names `field`.
fn rejects(text: &str, line: usize, field: &str, words: &str) {
    let err = match parse(text) {
        Ok(_) => panic!("this config was accepted but must be rejected ({words}):\n{text}"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("test.toml:{line}:")),
        "the error should point at line {line}: {msg}"
    );
    assert!(
        msg.contains(field),
        "the error should name `{field}`: {msg}"
    );
    assert!(msg.contains(words), "the error should say `{words}`: {msg}");
    assert_eq!(err.line(), Some(line));
}

#[test]
fn good_config_gets_defaults() {
    let c = parse(GOOD).expect("the minimal config is valid");
    let s = &c.services[0];
    assert_eq!(s.protocol, Protocol::Tcp);
    assert_eq!(s.scheduler, SchedulerKind::Maglev);
    assert_eq!(s.table_size, 65_537);
    assert_eq!(s.retries, 2);
    assert_eq!(s.health.kind, CheckKind::Tcp);
    assert_eq!((s.health.rise, s.health.fall), (2, 3));
    assert_eq!(s.backends[0].weight, 1, "weight defaults to 1");
    assert_eq!(s.backends[1].weight, 3);
    assert_eq!(c.global.worker_priority, config::DEFAULT_WORKER_PRIORITY);
    assert_eq!(config::DEFAULT_WORKER_PRIORITY, -10);
    let set = parse(&format!("[global]\nworker_priority = 5\n{GOOD}")).expect("a nice value");
    assert_eq!(set.global.worker_priority, 5);
}

#[test]
fn example_configs_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("config/ exists") {
        let path = entry.expect("readable dir entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            config::load(&path).unwrap_or_else(|e| panic!("shipped example is invalid: {e}"));
            seen += 1;
        }
    }
    assert!(seen > 0, "no example config found in {}", dir.display());
}

#[test]
fn durations_are_human() {
    let text = GOOD.replace(
        "protocol = \"tcp\"",
        "protocol = \"tcp\"\nconnect_timeout = \"250ms\"\nidle_timeout = \"1m 30s\"",
    );
    let s = &parse(&text).expect("valid").services[0];
    assert_eq!(s.connect_timeout.as_millis(), 250);
    assert_eq!(s.idle_timeout.as_secs(), 90);
}

/// The mistakes `rejects` checks, a test each: its name, then one or more rows of (the config
/// text, the line the error must point at, the field it must name, words it must say).
macro_rules! rejected {
    ($($name:ident: [$(($text:expr, $line:expr, $field:expr, $words:expr)),+ $(,)?];)*) => {
        $(
            #[test]
            fn $name() {
                $(rejects(&$text, $line, $field, $words);)+
            }
        )*
    };
}

rejected! {
    unknown_key_is_named: [
        (GOOD.replace("weight = 3", "wieght = 3"), 12, "service[0].backend[1]", "unknown field `wieght`"),
    ];
    duplicate_service_name: [
        (format!("{GOOD}\n[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:8081\"\nprotocol = \"tcp\"\n[[service.backend]]\naddress = \"127.0.0.1:9001\"\n"), 15, "service[1].name", "duplicate service name `web`"),
    ];
    duplicate_listen_address: [
        (format!("{GOOD}\n[[service]]\nname = \"api\"\nlisten = \"127.0.0.1:8080\"\nprotocol = \"tcp\"\n[[service.backend]]\naddress = \"127.0.0.1:9001\"\n"), 16, "service[1].listen", "duplicate listen address"),
    ];
    empty_backend_list: [
        ("[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\nprotocol = \"tcp\"\n", 1, "service[0].backend", "needs at least one"),
    ];
    weight_out_of_range: [
        (GOOD.replace("weight = 3", "weight = 300"), 12, "service[0].backend[1].weight", "out of range"),
        (GOOD.replace("weight = 3", "weight = -1"), 12, "service[0].backend[1].weight", "out of range"),
    ];
    all_weights_zero: [
        (GOOD.replace("weight = 3", "weight = 0").replace("address = \"127.0.0.1:9001\"", "address = \"127.0.0.1:9001\"\nweight = 0"), 2, "service[0].backend", "every backend has weight 0"),
    ];
    duplicate_backend: [
        (GOOD.replace("127.0.0.1:9002", "127.0.0.1:9001"), 11, "service[0].backend[1].address", "duplicate backend"),
    ];
    bad_duration: [
        (GOOD.replace("protocol = \"tcp\"", "protocol = \"tcp\"\nconnect_timeout = \"5 parsecs\""), 6, "service[0].connect_timeout", "is not a duration"),
        (GOOD.replace("protocol = \"tcp\"", "protocol = \"tcp\"\nidle_timeout = \"0s\""), 6, "service[0].idle_timeout", "longer than 0"),
    ];
    table_size_must_be_prime: [
        (GOOD.replace("protocol = \"tcp\"", "protocol = \"tcp\"\ntable_size = 65536"), 6, "service[0].table_size", "must be a prime"),
    ];
    bad_address: [
        (GOOD.replace("127.0.0.1:9002", "127.0.0.1"), 11, "service[0].backend[1].address", "invalid socket address"),
    ];
    wrong_type: [
        (GOOD.replace("weight = 3", "weight = \"heavy\""), 12, "service[0].backend[1].weight", "invalid type"),
    ];
    unknown_scheduler: [
        (GOOD.replace("protocol = \"tcp\"", "protocol = \"tcp\"\nscheduler = \"fastest\""), 6, "service[0].scheduler", "unknown variant `fastest`"),
    ];
    check_kind_must_fit_protocol: [
        (format!("{GOOD}\n[service.health]\nkind = \"udp\"\n"), 15, "service[0].health.kind", "cannot check a TCP service"),
    ];
    rise_and_fall_in_range: [
        (format!("{GOOD}\n[service.health]\nrise = 0\n"), 15, "service[0].health.rise", "out of range"),
    ];
    http_path_must_be_absolute: [
        (format!("{GOOD}\n[service.health]\nkind = \"http\"\npath = \"health\"\n"), 16, "service[0].health.path", "must start with `/`"),
    ];
    no_service_at_all: [
        ("[global]\nworkers = 2\n", 1, "service", "no [[service]]"),
    ];
    not_toml: [
        (GOOD.replace("name = \"web\"", "name = web"), 3, "syntax", "invalid string"),
    ];
    proxy_protocol_v1_is_tcp_only: [
        ("[[service]]\nname = \"dns\"\nlisten = \"127.0.0.1:53\"\nprotocol = \"udp\"\nproxy_protocol = \"v1\"\n[[service.backend]]\naddress = \"127.0.0.1:5353\"\n", 5, "service[0].proxy_protocol", "v1 carries only TCP"),
    ];
    limits_in_range: [
        (GOOD.replace("protocol = \"tcp\"", "protocol = \"tcp\"\n[service.limits]\nburst = 5"), 7, "service[0].limits.burst", "needs new_connections_per_second"),
        (GOOD.replace("protocol = \"tcp\"", "protocol = \"tcp\"\n[service.limits]\nmax_connections_per_client = 0"), 7, "service[0].limits.max_connections_per_client", "out of range"),
    ];
    check_keys_must_fit_the_kind: [
        (format!("{GOOD}\n[service.health]\npath = \"/health\"\n"), 15, "service[0].health.path", "applies only to kind = \"http\""),
        (format!("{GOOD}\n[service.health]\nkind = \"http\"\nsend = \"x\"\n"), 16, "service[0].health.send", "applies only to kind = \"udp\""),
    ];
    workers_are_bounded: [
        (format!("[global]\nworkers = 100000000\n{GOOD}"), 2, "global.workers", "more than 1024"),
    ];
    worker_priority_is_a_nice_value: [
        (format!("[global]\nworker_priority = -21\n{GOOD}"), 2, "global.worker_priority", "-20 (most favoured) to 19"),
        (format!("[global]\nworkers = 2\nworker_priority = 20\n{GOOD}"), 3, "global.worker_priority", "not a nice value"),
        (format!("[global]\nworker_priority = 9999999999\n{GOOD}"), 2, "global.worker_priority", "not a nice value"),
    ];
    table_smaller_than_backend_count_points_at_table_size: [
        (GOOD.replace("protocol = \"tcp\"", "protocol = \"tcp\"\ntable_size = 2").replace("weight = 3", "weight = 3\n[[service.backend]]\naddress = \"127.0.0.1:9003\""), 6, "service[0].table_size", "smaller than the 3 backends"),
    ];
    a_backend_name_must_be_a_dns_name_with_a_port: [
        (GOOD.replace("127.0.0.1:9002", "app_ser ver:80"), 11, "service[0].backend[1].address", "neither an IP address nor a DNS name"),
        (GOOD.replace("127.0.0.1:9002", "app:http"), 11, "service[0].backend[1].address", "not a port"),
    ];
}

/// An IPv4 address in its IPv4-mapped IPv6 form would slip past the checks that compare
/// addresses as written (a backend that is the service's own address, two services on one
/// VIP, the admin API's address): refused, with the form to write.
#[test]
fn ipv4_mapped_addresses_are_refused_with_their_ipv4_form() {
    let own = GOOD.replace("127.0.0.1:9001", "[::ffff:127.0.0.1]:8080");
    rejects(
        &own,
        8,
        "service[0].backend[0].address",
        "write it as 127.0.0.1:8080",
    );
    let listen = GOOD.replace(
        "listen = \"127.0.0.1:8080\"",
        "listen = \"[::ffff:10.0.0.1]:80\"",
    );
    rejects(&listen, 4, "service[0].listen", "write it as 10.0.0.1:80");
    let admin = format!("[admin]\nlisten = \"[::ffff:127.0.0.1]:9100\"\n{GOOD}");
    rejects(&admin, 2, "admin.listen", "write it as 127.0.0.1:9100");
}

/// A socket path the kernel cannot bind is refused at its line, not at the daemon's start.
#[test]
fn socket_paths_longer_than_a_unix_socket_takes_are_refused() {
    let long = format!("/run/{}/admin.sock", "d".repeat(100));
    let admin = format!("[admin]\nsocket = \"{long}\"\n{GOOD}");
    rejects(&admin, 2, "admin.socket", "at most 107");
    let upgrade = format!("[global]\nupgrade_socket = \"{long}\"\n{GOOD}");
    rejects(&upgrade, 2, "global.upgrade_socket", "at most 107");
}

/// `dataplane = "xdp"` with a setting only the proxy runs: `lb-daemon check` and a reload
/// refuse it at its line, instead of the daemon failing at start with no line.
#[test]
fn a_forced_ebpf_dataplane_refuses_settings_only_the_proxy_runs_at_their_line() {
    let xdp = |extra: &str| {
        format!(
            "[[service]]\nname = \"web\"\nlisten = \"10.200.100.1:80\"\nprotocol = \"tcp\"\n\
             dataplane = \"xdp\"\ninterface = \"eth0\"\nlocal_address = \"10.200.0.1\"\n{extra}\n\
             [[service.backend]]\naddress = \"10.200.1.2:80\"\n"
        )
    };
    parse(&xdp("")).expect("the eBPF data plane carries it");
    rejects(
        &xdp("table_size = 131071"),
        8,
        "service[0].table_size",
        "65537 slots",
    );
    rejects(
        &xdp("max_connections = 100"),
        8,
        "service[0].max_connections",
        "proxy data plane",
    );
    rejects(
        &xdp("proxy_protocol = \"v1\""),
        8,
        "service[0].proxy_protocol",
        "only in the proxy",
    );
    let logged = xdp("proxy_protocol = \"off\"\naccess_log = true");
    rejects(&logged, 9, "service[0].access_log", "only in the proxy");
    let loopback = xdp("").replace("10.200.100.1:80", "127.0.0.2:80");
    rejects(&loopback, 3, "service[0].listen", "loopback address");
    let mut auto = xdp("access_log = true").replace("dataplane = \"xdp\"", "dataplane = \"auto\"");
    parse(&auto).expect("auto runs it on the proxy");
    auto = auto.replace("access_log = true", "");
    parse(&auto).expect("valid");
}

#[test]
fn an_empty_bpf_object_is_refused_not_searched_for() {
    let empty = format!("[global]\nbpf_object = \"\"\n{GOOD}");
    rejects(&empty, 2, "global.bpf_object", "leave the key out");
}

#[test]
fn same_port_for_tcp_and_udp_is_fine() {
    let text = format!("{GOOD}\n[[service]]\nname = \"dns\"\nlisten = \"127.0.0.1:8080\"\nprotocol = \"udp\"\n[[service.backend]]\naddress = \"127.0.0.1:9001\"\n");
    parse(&text).expect("TCP and UDP may share a port");
}

#[test]
fn ipv6_listen() {
    let text = GOOD.replace("127.0.0.1:8080", "[::1]:8080");
    let c = parse(&text).expect("IPv6 VIPs are valid");
    assert!(c.services[0].listen.is_ipv6());
}

#[test]
fn proxy_protocol_and_limits() {
    let text = GOOD.replace(
        "protocol = \"tcp\"",
        "protocol = \"tcp\"\nproxy_protocol = \"v2\"\naccess_log = true\n[service.limits]\nmax_connections_per_client = 10\nnew_connections_per_second = 5.5",
    );
    let s = &parse(&text).expect("valid").services[0];
    assert_eq!(s.proxy_protocol, config::ProxyProtocol::V2);
    assert!(s.access_log);
    assert_eq!(s.limits.max_connections, Some(10));
    assert_eq!(s.limits.rate, Some(5.5));
    assert_eq!(s.limits.burst, 6, "burst defaults to the rate, rounded up");
}

#[test]
fn admin_slow_start_and_named_backends() {
    let text = GOOD.replace(
        "[[service]]",
        "[admin]\nlisten = \"127.0.0.1:9200\"\nsocket = \"/run/lb/admin.sock\"\n\n[[service]]\nslow_start = \"30s\"\nresolve_interval = \"2s\"",
    ) + "\n[[service.backend]]\naddress = \"app.internal:3000\"\nweight = 2\n";
    let c = parse(&text).expect("valid");
    assert_eq!(
        c.admin.listen.map(|l| l.to_string()).as_deref(),
        Some("127.0.0.1:9200")
    );
    assert_eq!(
        c.admin.socket.as_deref(),
        Some(Path::new("/run/lb/admin.sock"))
    );
    let s = &c.services[0];
    assert_eq!(s.slow_start, Some(std::time::Duration::from_secs(30)));
    assert_eq!(s.resolve_interval, std::time::Duration::from_secs(2));
    assert_eq!(s.backends.len(), 2, "ip:port backends stay in `backends`");
    assert_eq!(s.discovered.len(), 1, "the name goes to `discovered`");
    assert_eq!(s.discovered[0].to_string(), "app.internal:3000");
    assert_eq!(s.discovered[0].weight, 2);
    let d = parse(GOOD).expect("valid");
    assert_eq!(
        d.admin.listen.map(|l| l.to_string()).as_deref(),
        Some("127.0.0.1:9100"),
        "the admin API defaults to loopback port 9100"
    );
    assert_eq!(
        d.services[0].slow_start, None,
        "slow start is off by default"
    );
}

#[test]
fn passive_timeout_defaults_to_10s_and_applies_only_without_active_checks() {
    let c = parse(GOOD).expect("the minimal config is valid");
    assert_eq!(
        c.services[0].health.passive_timeout,
        std::time::Duration::from_secs(10)
    );
    let text = format!("{GOOD}\n[service.health]\nkind = \"none\"\npassive_timeout = \"1m 30s\"\n");
    let c = parse(&text).expect("passive_timeout with kind = none is valid");
    assert_eq!(
        c.services[0].health.passive_timeout,
        std::time::Duration::from_secs(90)
    );
    let text = format!("{GOOD}\n[service.health]\nkind = \"tcp\"\npassive_timeout = \"5s\"\n");
    rejects(
        &text,
        16,
        "service[0].health.passive_timeout",
        "applies only to kind = \"none\"",
    );
    let text = format!("{GOOD}\n[service.health]\nkind = \"none\"\npassive_timeout = \"0s\"\n");
    rejects(
        &text,
        16,
        "service[0].health.passive_timeout",
        "must be longer than 0",
    );
}
