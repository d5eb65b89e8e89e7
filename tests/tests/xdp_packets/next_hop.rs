//! The program's next-hop cache (`lb-ebpf/src/next_hop.rs`): a route's answer is reused for
//! `NEXT_HOP_TTL_NS` on the CPU that asked, then asked again, so a next hop that changes its
//! MAC address gets the packets that follow; and a packet longer than the route has passed is
//! still checked against the MTU. The cache is per CPU, so each test pins its thread (the
//! kernel runs BPF_PROG_TEST_RUN on the caller's CPU): otherwise a packet could run on a CPU
//! that never cached the route, and the test would not see the cache at all.

use super::*;
use lb_common::maps::NEXT_HOP_TTL_NS;
use lb_tests::xdp::testrun::mac;
use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// The MAC address the first backend takes over (a container restarted on the same IP).
const NEW_B1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x77];

/// Pins the calling thread to CPU 0, where every test run of the test then happens.
fn pin_to_one_cpu() {
    let mut cpus = CpuSet::new();
    cpus.set(0).expect("CPU 0 in a CPU set");
    sched_setaffinity(Pid::from_raw(0), &cpus).expect("pin the test's thread to CPU 0");
}

#[test]
fn a_backend_that_changes_its_mac_address_gets_the_next_packets_once_the_cache_ages() {
    let Some(mut lab) = lab("next_hop_mac") else {
        return;
    };
    pin_to_one_cpu();
    lab.backend(0, B1_4.into(), 8080);
    lab.backend(1, B1_6.into(), 8080);
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0]);
    lab.service(1, VIP6.into(), 80, IPPROTO_TCP, MODE_NAT, &[1]);
    let families: [(IpAddr, IpAddr, IpAddr); 2] = [
        (CLIENT4.into(), VIP4.into(), B1_4.into()),
        (CLIENT6.into(), VIP6.into(), B1_6.into()),
    ];
    let segment =
        |client, vip, flags| Packet::tcp(client, 40000, vip, 80, flags).frame(VC_MAC, CLIENT_MAC);
    for (client, vip, _) in families {
        for flags in [TCP_SYN, TCP_ACK] {
            let out = lab.expect(
                lab.vc,
                &segment(client, vip, flags),
                XDP_REDIRECT,
                "a segment",
            );
            assert_eq!(
                &out[..6],
                &B1_MAC,
                "{vip}: a segment goes to the backend's MAC"
            );
        }
    }

    for (_, _, backend) in families {
        lab.ns
            .ip(&[
                "neigh",
                "replace",
                &backend.to_string(),
                "lladdr",
                &mac(NEW_B1_MAC),
                "dev",
                "vb",
                "nud",
                "permanent",
            ])
            .expect("give the backend a new MAC address");
    }
    // Each family's ACK, and the MAC address it was sent to.
    let ack_macs = |lab: &Lab| {
        families.map(|(client, vip, _)| {
            let out = lab.expect(
                lab.vc,
                &segment(client, vip, TCP_ACK),
                XDP_REDIRECT,
                "an ACK",
            );
            (vip, [out[0], out[1], out[2], out[3], out[4], out[5]])
        })
    };
    // Right after the change the cached answer still holds (well within the lifetime): the
    // cache is in use, so what follows checks that it ages.
    for (vip, dmac) in ack_macs(&lab) {
        assert_eq!(
            dmac, B1_MAC,
            "{vip}: the next hop was not taken from the cache"
        );
    }
    std::thread::sleep(std::time::Duration::from_nanos(NEXT_HOP_TTL_NS) * 2);
    for (vip, dmac) in ack_macs(&lab) {
        assert_eq!(
            dmac, NEW_B1_MAC,
            "{vip}: an ACK after the backend's MAC changed (and the cache's lifetime passed) \
             went to the old MAC"
        );
    }
}

#[test]
fn a_packet_longer_than_the_cached_route_has_passed_is_checked_against_the_mtu() {
    let Some(mut lab) = lab("next_hop_mtu") else {
        return;
    };
    pin_to_one_cpu();
    lab.backend(0, B1_4.into(), 8080);
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0]);
    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    let segment = |flags, len: usize| {
        Packet::tcp(client, 40000, vip, 80, flags)
            .payload(&vec![0x55; len - 40])
            .frame(VC_MAC, CLIENT_MAC)
    };
    lab.expect(lab.vc, &segment(TCP_SYN, 60), XDP_REDIRECT, "a SYN");
    lab.expect(
        lab.vc,
        &segment(TCP_ACK, 1500),
        XDP_REDIRECT,
        "1500 bytes (vb's MTU)",
    );
    let before = lab.stat(Stat::TooBigSent);
    // Both right after packets that filled the cache for this route.
    lab.expect(lab.vc, &segment(TCP_ACK, 1510), XDP_TX, "1510 bytes");
    assert_eq!(
        lab.stat(Stat::TooBigSent),
        before + 1,
        "1510 bytes over a 1500-byte link must be refused for the MTU (and answered)"
    );
    lab.expect(
        lab.vc,
        &segment(TCP_ACK, 1500),
        XDP_REDIRECT,
        "1500 bytes again",
    );
}
