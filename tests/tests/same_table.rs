//! Every balancer node builds the same Maglev table from the same backends: two daemons
//! whose configs list the services and the backends in other orders, one of them finding
//! its backends through DNS answers in yet another order (so their service and backend ids
//! differ), hold tables that name the same backend in every slot. Read from the kernel's
//! maps through the daemons' pins: the tables the eBPF plane forwards by, slot for slot; and
//! the daemon's own table (the proxy's scheduler, `/status` `maglev_table`) is that one. Two
//! proxy daemons fed permuted configs and DNS answers show the same `maglev_table` digest.
//!
//! Needs root and the BPF object (`cargo xtask build-ebpf`).

use std::net::{IpAddr, SocketAddr};
use std::path::Path as FsPath;
use std::time::Duration;

use aya::maps::{Array, HashMap, MapData};
use lb_common::maps::{table_index, Backend, Service, VipKey, VipValue};
use lb_tests::admin;
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::xdp::world::{service, World, BULK, WEB};
use lb_tests::xdp::{backend_ip, bpf_object, in_netns, Mode, Path, VIP};
use lb_tests::{Daemon, HttpNameServer};

const NAME: &str = "bulk.lb-test";

#[test]
fn two_daemons_with_permuted_configs_and_dns_answers_build_the_same_tables() {
    if !lb_tests::require_root("same_table::two_daemons_with_permuted_configs") {
        return;
    }
    let path = Path::tc(Mode::Nat);
    // Node A: web's backends in order with weights 1, 2, 3, 1; bulk's four listed.
    let a = World::start_custom(path, 4, 4, &[1, 2, 3, 4], |t| {
        let toml = DaemonConfig::new()
            .global("bpf_object", bpf_object().display().to_string())
            .service(service(
                t,
                Mode::Nat,
                "web",
                &[(1, 1), (2, 2), (3, 3), (4, 1)],
            ))
            .service(service(
                t,
                Mode::Nat,
                "bulk",
                &[(1, 1), (2, 1), (3, 1), (4, 1)],
            ))
            .to_toml();
        in_netns(&t.balancer, || Daemon::start(&toml)).expect("enter the balancer namespace")
    });
    // Node B: the services the other way round (other service ids), web's backends permuted
    // (other backend ids), bulk's from DNS answers in another order.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let hosts = dir.path().join("hosts");
    let mut text = String::from("127.0.0.1 localhost\n");
    for i in [4, 2, 3, 1] {
        text.push_str(&format!("{} {NAME}\n", backend_ip(i)));
    }
    std::fs::write(&hosts, text).expect("hosts written");
    let wrapper = lb_tests::daemon::private_hosts_wrapper(dir.path(), &hosts);
    let config_file = dir.path().join("lb.toml");
    let b = World::start_custom(path, 4, 4, &[1, 2, 3, 4], |t| {
        let toml = DaemonConfig::new()
            .global("bpf_object", bpf_object().display().to_string())
            .service(
                service(t, Mode::Nat, "bulk", &[])
                    .set("resolve_interval", "300ms")
                    .backend_named(&format!("{NAME}:{BULK}"), 1),
            )
            .service(service(
                t,
                Mode::Nat,
                "web",
                &[(4, 1), (3, 3), (1, 1), (2, 2)],
            ))
            .to_toml();
        lb_tests::xdp::spawn_with_hosts(&t.balancer, &wrapper, &config_file, &toml)
    });
    b.daemon
        .wait_for_log(
            &format!("{NAME}:{BULK} resolves to"),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("node B never resolved {NAME}: {e}"));

    let pins = |w: &World| {
        w.daemon
            .pin_dir()
            .unwrap_or_else(|| panic!("the helper gave the daemon no pin directory"))
            .join(format!("v{}", lb_common::maps::LAYOUT_VERSION))
    };
    let (pins_a, pins_b) = (pins(&a), pins(&b));
    let mut ids = Vec::new();
    for port in [WEB, BULK] {
        let vip = SocketAddr::new(IpAddr::V4(VIP), port);
        let backends: Vec<SocketAddr> = (1..=4)
            .map(|i| SocketAddr::new(IpAddr::V4(backend_ip(i)), port))
            .collect();
        // Until every backend is in both tables (B's bulk follows its DNS answers).
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let (table_a, table_b, id_a, id_b) = loop {
            let (ta, ia) = live_table(&pins_a, vip);
            let (tb, ib) = live_table(&pins_b, vip);
            let full = |t: &[SocketAddr]| backends.iter().all(|b| t.contains(b));
            if full(&ta) && full(&tb) {
                break (ta, tb, ia, ib);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{vip}: the tables never held all four backends"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        ids.push((id_a, id_b));
        assert_eq!(table_a.len(), 65537, "{vip}: node A's table size");
        let differ = table_a.iter().zip(&table_b).filter(|(x, y)| x != y).count();
        assert!(
            table_a.len() == table_b.len() && differ == 0,
            "{vip}: {differ} of {} slots name another backend on node B",
            table_a.len()
        );
        // The daemon's own table (the one its proxy would schedule by) is the kernel's.
        let st = in_netns(&a.topology.balancer, || {
            admin::status(a.daemon.admin_addr())
        })
        .expect("enter the balancer namespace");
        let name = if port == WEB { "web" } else { "bulk" };
        let shown = st["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == name))
            .map(|s| s["maglev_table"].clone())
            .unwrap_or_default();
        assert_eq!(
            shown,
            serde_json::json!({"size": 65537, "fnv1a": digest(&table_a)}),
            "{vip}: /status shows another table than the kernel's"
        );
        if port == WEB {
            // The weights hold: backend 3 (weight 3) has three times backend 1's slots.
            let share = |i: usize| table_a.iter().filter(|a| **a == backends[i - 1]).count();
            let (one, three) = (share(1), share(3));
            assert!(
                three.abs_diff(3 * one) <= 3,
                "{vip}: weights 1 and 3 got {one} and {three} slots"
            );
        }
    }
    assert!(
        ids.iter().any(|(x, y)| x != y),
        "the two nodes gave the services the same ids ({ids:?}): the test shows nothing"
    );
}

/// The FNV-1a digest of a table of backend addresses, as `/status` `maglev_table` writes it.
fn digest(table: &[SocketAddr]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for a in table {
        let mut bytes = match a.ip() {
            IpAddr::V4(ip) => ip.octets().to_vec(),
            IpAddr::V6(ip) => ip.octets().to_vec(),
        };
        bytes.extend_from_slice(&a.port().to_be_bytes());
        for b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// The live table of the service at `vip` (TCP) in the pinned maps under `set`: each slot's
/// backend address, and the service id.
fn live_table(set: &FsPath, vip: SocketAddr) -> (Vec<SocketAddr>, u32) {
    let open = |name: &str| {
        MapData::from_pin(set.join(name)).unwrap_or_else(|e| {
            panic!("cannot open the pinned {name} under {}: {e}", set.display())
        })
    };
    let vips: HashMap<MapData, VipKey, VipValue> =
        HashMap::try_from(aya::maps::Map::HashMap(open("VIPS"))).expect("VIPS");
    let services: Array<MapData, Service> =
        Array::try_from(aya::maps::Map::Array(open("SERVICES"))).expect("SERVICES");
    let backends: Array<MapData, Backend> =
        Array::try_from(aya::maps::Map::Array(open("BACKENDS"))).expect("BACKENDS");
    let tables: Array<MapData, u32> =
        Array::try_from(aya::maps::Map::Array(open("TABLES"))).expect("TABLES");
    let Ok(id) = vips.get(&VipKey::new(vip, lb_common::flow::IPPROTO_TCP), 0) else {
        return (Vec::new(), u32::MAX);
    };
    let id = id.service;
    let service = services.get(&id, 0).expect("the service's entry");
    let half = service.active_half & 1;
    let size = service.table_size[half as usize];
    let table = (0..size)
        .map(|s| {
            let b = tables
                .get(&table_index(id, half, s), 0)
                .expect("a table slot");
            backends
                .get(&b, 0)
                .ok()
                .and_then(|b| b.address())
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
        })
        .collect();
    (table, id)
}

/// The same on the proxy plane: two daemons on loopback, one with the backends in another
/// order and the other service's from DNS answers in another order, show the same table
/// digest for each service.
#[test]
fn two_proxy_daemons_with_permuted_configs_and_dns_answers_show_the_same_table() {
    if !lb_tests::require_root("same_table::two_proxy_daemons") {
        return;
    }
    let port = lb_tests::free_port();
    let ip = |i: u8| IpAddr::from([127, 0, 0, i]);
    let servers: Vec<HttpNameServer> = (2..=5)
        .map(|i| {
            HttpNameServer::start_on(&format!("b{i}"), SocketAddr::new(ip(i), port))
                .expect("backend starts")
        })
        .collect();
    let backend = |i: u8| SocketAddr::new(ip(i), port);
    let with = |s: ServiceConfig, list: &[(u8, u32)]| {
        list.iter()
            .fold(s.fast_health("tcp"), |s, &(i, w)| s.backend(backend(i), w))
    };
    let a = Daemon::start(
        &DaemonConfig::new()
            .service(with(
                ServiceConfig::tcp("web", lb_tests::ports::free_addr()),
                &[(2, 1), (3, 2), (4, 3), (5, 1)],
            ))
            .service(with(
                ServiceConfig::tcp("named", lb_tests::ports::free_addr()),
                &[(2, 1), (3, 1), (4, 1), (5, 1)],
            ))
            .to_toml(),
    );
    let dir = tempfile::tempdir().expect("a temporary directory");
    let hosts = dir.path().join("hosts");
    let mut text = String::from("127.0.0.1 localhost\n");
    for i in [5, 3, 2, 4] {
        text.push_str(&format!("{} {NAME}\n", ip(i)));
    }
    std::fs::write(&hosts, text).expect("hosts written");
    let wrapper = lb_tests::daemon::private_hosts_wrapper(dir.path(), &hosts);
    let config = dir.path().join("lb.toml");
    std::fs::write(
        &config,
        DaemonConfig::new()
            .service(
                ServiceConfig::tcp("named", lb_tests::ports::free_addr())
                    .fast_health("tcp")
                    .set("resolve_interval", "300ms")
                    .backend_named(&format!("{NAME}:{port}"), 1),
            )
            .service(with(
                ServiceConfig::tcp("web", lb_tests::ports::free_addr()),
                &[(5, 1), (4, 3), (2, 1), (3, 2)],
            ))
            .to_toml(),
    )
    .expect("config written");
    let b = Daemon::spawn(&wrapper, &config, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("lb-daemon did not start in its mount namespace: {e}"));
    let table = |d: &Daemon, name: &str| {
        admin::status(d.admin_addr())["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == name))
            .map(|s| s["maglev_table"].clone())
            .unwrap_or_default()
    };
    // B's named service follows its DNS answers: wait for all four.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while table(&b, "named") != table(&a, "named") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    for name in ["web", "named"] {
        let (ta, tb) = (table(&a, name), table(&b, name));
        assert!(
            ta["size"] == 65537 && ta["fnv1a"].is_string(),
            "{name}: node A shows no table: {ta}"
        );
        assert_eq!(ta, tb, "{name}: the two proxy daemons hold other tables");
    }
    drop(servers);
}
