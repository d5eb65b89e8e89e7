//!
//! SNAT port lifecycle (issue 10): a port comes back when its flow ends, stays out of use for
//! the service's hold time, and a SYN that finds none is reset. Service 0 is TCP NAT on
//! VIP4:80 with the one backend b1, service 1 UDP NAT on VIP4:53 with b1.

use super::*;

/// Service `id`'s SNAT range becomes `first..=first + ports - 1`, held `hold_s` seconds.
fn snat(lab: &mut Lab, id: u32, ports: u16, hold_s: u32) {
    let mut s = lab.services.get(&id, 0).expect("read SERVICES");
    s.snat_port_max = s.snat_port_min + ports - 1;
    s.snat_hold_s = hold_s;
    lab.services.set(id, s, 0).expect("write SERVICES");
}

fn nat_lab(test: &str, ports: u16, hold_s: u32) -> Option<Lab> {
    let mut lab = lab(test)?;
    lab.backend(0, B1_4.into(), 8080);
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0]);
    snat(&mut lab, 0, ports, hold_s);
    Some(lab)
}

/// A client segment from CLIENT4:`sport` to VIP4:80 with `flags`.
fn client(sport: u16, flags: u8) -> Vec<u8> {
    let (c, v): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    Packet::tcp(c, sport, v, 80, flags).frame(VC_MAC, CLIENT_MAC)
}

/// b1's segment to the balancer's SNAT port `snat` with `flags`.
fn backend(snat: u16, flags: u8) -> Vec<u8> {
    let (b, l): (IpAddr, IpAddr) = (B1_4.into(), LOCAL4.into());
    Packet::tcp(b, 8080, l, snat, flags).frame(VB_MAC, B1_MAC)
}

fn entries(lab: &Lab) -> usize {
    lab.nat_reverse.keys().filter(|k| k.is_ok()).count()
}

/// Opens a flow from `sport`: the SYN must be forwarded; returns its SNAT port.
fn open(lab: &Lab, sport: u16, what: &str) -> u16 {
    let out = lab.expect(lab.vc, &client(sport, TCP_SYN), XDP_REDIRECT, what);
    l4_source_port(&out)
}

/// [`open`], then b1's SYN-ACK on the flow's port, which must be forwarded: an answered flow.
fn open_answered(lab: &Lab, sport: u16) -> u16 {
    let port = open(lab, sport, "the flow's SYN");
    lab.expect(
        lab.vb,
        &backend(port, TCP_SYN | TCP_ACK),
        XDP_REDIRECT,
        "b1's SYN-ACK",
    );
    port
}

#[test]
fn twenty_flows_closed_one_after_another_reuse_a_four_port_range() {
    let Some(lab) = nat_lab("snat_reuse", 4, 0) else {
        return;
    };
    for n in 0..20u16 {
        let sport = 42_000 + n;
        let port = open(&lab, sport, &format!("flow {n}'s SYN (FIN both ways)"));
        lab.expect(
            lab.vc,
            &client(sport, TCP_FIN | TCP_ACK),
            XDP_REDIRECT,
            &format!("flow {n}'s client FIN"),
        );
        lab.expect(
            lab.vb,
            &backend(port, TCP_FIN | TCP_ACK),
            XDP_REDIRECT,
            &format!("flow {n}'s backend FIN"),
        );
        assert!(
            entries(&lab) <= 4,
            "after flow {n}, NAT_REVERSE holds {} entries for a 4-port range",
            entries(&lab)
        );
    }
    for n in 0..20u16 {
        let sport = 43_000 + n;
        let port = open(&lab, sport, &format!("flow {n}'s SYN (RST)"));
        if n % 2 == 0 {
            lab.expect(
                lab.vc,
                &client(sport, TCP_RST | TCP_ACK),
                XDP_REDIRECT,
                &format!("flow {n}'s client RST"),
            );
        } else {
            // Answered first: an RST before any answer is a refusal (see below).
            lab.expect(
                lab.vb,
                &backend(port, TCP_SYN | TCP_ACK),
                XDP_REDIRECT,
                &format!("flow {n}'s backend SYN-ACK"),
            );
            lab.expect(
                lab.vb,
                &backend(port, TCP_RST | TCP_ACK),
                XDP_REDIRECT,
                &format!("flow {n}'s backend RST"),
            );
        }
        assert!(entries(&lab) <= 4, "after RST flow {n}: {}", entries(&lab));
    }
    assert_eq!(
        (
            lab.stat(Stat::DropNatPortsExhausted),
            lab.stat(Stat::RefusedNatPortsExhausted)
        ),
        (0, 0),
        "a SYN found no SNAT port though every earlier flow had ended"
    );
}

/// Ended flows' ports are taken again before ports that have no entry, so `NAT_REVERSE`
/// holds about the flows of the moment, not every port ever used: the map is an LRU of
/// `NAT_REVERSE_SIZE` entries, and once the ports ever used outnumber it (the default range
/// in front of five backends) its evictions would take the entries of live flows that idle.
#[test]
fn ended_flows_ports_are_taken_again_before_unused_ones() {
    let Some(lab) = nat_lab("snat_few_entries", 256, 0) else {
        return;
    };
    for n in 0..200u16 {
        let sport = 48_000 + n;
        open(&lab, sport, &format!("flow {n}'s SYN"));
        lab.expect(
            lab.vc,
            &client(sport, TCP_RST | TCP_ACK),
            XDP_REDIRECT,
            &format!("flow {n}'s client RST"),
        );
    }
    // With one flow at a time, a new flow finds a free port among its 16 probes once about
    // a sixteenth of the range has entries; taking unused ports first gave 200 entries.
    assert!(
        entries(&lab) <= 64,
        "200 flows one after another left {} NAT_REVERSE entries in a 256-port range",
        entries(&lab)
    );
    assert_eq!(
        (
            lab.stat(Stat::DropNatPortsExhausted),
            lab.stat(Stat::RefusedNatPortsExhausted)
        ),
        (0, 0),
        "a SYN found no SNAT port though every earlier flow had ended"
    );
}

/// Of the free ports, one whose backend closed first (it may still hold the old flow's
/// TIME_WAIT for 60 s) is passed over while a port without entry is there; one whose client
/// closed first is taken again at once. In a 16-port range every port is probed.
#[test]
fn a_port_the_backend_may_hold_in_time_wait_is_taken_after_unused_ones() {
    let Some(lab) = nat_lab("snat_time_wait_last", 16, 0) else {
        return;
    };
    let end = |sport: u16, port: u16, backend_first: bool| {
        let (first, second) = if backend_first {
            (
                backend(port, TCP_FIN | TCP_ACK),
                client(sport, TCP_FIN | TCP_ACK),
            )
        } else {
            (
                client(sport, TCP_FIN | TCP_ACK),
                backend(port, TCP_FIN | TCP_ACK),
            )
        };
        let (a, b) = if backend_first {
            (lab.vb, lab.vc)
        } else {
            (lab.vc, lab.vb)
        };
        lab.expect(a, &first, XDP_REDIRECT, "the first FIN");
        lab.expect(b, &second, XDP_REDIRECT, "the second FIN");
    };
    let a = open(&lab, 49_000, "flow A");
    end(49_000, a, true);
    let b = open(&lab, 49_001, "flow B");
    assert_ne!(
        b, a,
        "flow B took the port b1 may hold in TIME_WAIT though others had no entry"
    );
    end(49_001, b, false);
    assert_eq!(
        open(&lab, 49_002, "flow C"),
        b,
        "flow C did not take the port freed without TIME_WAIT"
    );
}

/// A backend that refuses a connection (an RST answering the SYN: its server is stopped)
/// does not fail the client: the RST is dropped and counted, the flow keeps its port, and
/// the client's resent SYN goes out again; once the backend answered, its RST is the
/// connection's end and reaches the client.
#[test]
fn a_backends_refusal_of_a_syn_is_dropped_so_the_client_retries() {
    let Some(lab) = nat_lab("snat_refused", 4, 0) else {
        return;
    };
    let port = open(&lab, 45_000, "the SYN");
    lab.expect(
        lab.vb,
        &backend(port, TCP_RST | TCP_ACK),
        XDP_DROP,
        "the backend's RST refusing the SYN",
    );
    assert_eq!(lab.stat(Stat::DropRefusedSyn), 1, "refusal counted");
    assert_eq!(
        open(&lab, 45_000, "the client's resent SYN"),
        port,
        "the resent SYN took another port: the refused flow's was freed or lost"
    );
    lab.expect(
        lab.vb,
        &backend(port, TCP_SYN | TCP_ACK),
        XDP_REDIRECT,
        "the backend's SYN-ACK to the resent SYN",
    );
    lab.expect(
        lab.vb,
        &backend(port, TCP_RST | TCP_ACK),
        XDP_REDIRECT,
        "the backend's RST once it had answered",
    );
    assert_eq!(
        lab.stat(Stat::DropRefusedSyn),
        1,
        "an answered flow's RST was dropped"
    );
}

#[test]
fn a_freed_port_is_held_and_a_syn_that_finds_none_is_reset() {
    let Some(mut lab) = nat_lab("snat_hold", 1, 3600) else {
        return;
    };
    let port = open(&lab, 44_000, "the first flow");
    lab.expect(
        lab.vc,
        &client(44_000, TCP_RST),
        XDP_REDIRECT,
        "the first flow's RST",
    );
    let out = lab.expect(
        lab.vc,
        &client(44_001, TCP_SYN),
        XDP_TX,
        "a second flow while the only port is held",
    );
    assert_eq!(
        tcp_flags_of(&out),
        TCP_RST | TCP_ACK,
        "the SYN that found no port is not answered with a RST+ACK"
    );
    assert_eq!(
        lab.stat(Stat::RefusedNatPortsExhausted),
        1,
        "refusal counted"
    );
    snat(&mut lab, 0, 1, 0);
    assert_eq!(
        open(&lab, 44_001, "the second flow once the hold is over"),
        port,
        "the freed port was not reused"
    );
}

/// The hold depends on who closed first: the backend's FIN first leaves the backend's
/// socket in TIME_WAIT, and the port is held the whole `snat_hold_s` towards that backend
/// (another backend may have it); the client's FIN first (the backend closed passively)
/// holds it only `SNAT_QUIET_S`.
#[test]
fn a_port_is_held_for_the_hold_time_only_when_the_backend_closed_first() {
    let Some(mut lab) = nat_lab("snat_time_wait", 1, 3600) else {
        return;
    };
    lab.backend(1, B2_4.into(), 8080);
    // Flow A: the client closes first, so b1 holds no TIME_WAIT.
    let port = open(&lab, 47_000, "flow A");
    lab.expect(
        lab.vc,
        &client(47_000, TCP_FIN | TCP_ACK),
        XDP_REDIRECT,
        "flow A's client FIN",
    );
    lab.expect(
        lab.vb,
        &backend(port, TCP_FIN | TCP_ACK),
        XDP_REDIRECT,
        "flow A's backend FIN",
    );
    lab.expect(
        lab.vc,
        &client(47_001, TCP_SYN),
        XDP_TX,
        "flow B within SNAT_QUIET_S of flow A's end",
    );
    // Whole seconds of the program's clock: SNAT_QUIET_S (2) has surely passed after 3 s.
    std::thread::sleep(std::time::Duration::from_millis(3_100));
    assert_eq!(
        open(
            &lab,
            47_001,
            "flow B after SNAT_QUIET_S, though the hold is an hour"
        ),
        port,
        "a port whose client closed first was held longer than SNAT_QUIET_S"
    );
    // Flow B: b1 closes first, so it holds TIME_WAIT: the port is held the full hour.
    lab.expect(
        lab.vb,
        &backend(port, TCP_FIN | TCP_ACK),
        XDP_REDIRECT,
        "flow B's backend FIN",
    );
    lab.expect(
        lab.vc,
        &client(47_001, TCP_FIN | TCP_ACK),
        XDP_REDIRECT,
        "flow B's client FIN",
    );
    std::thread::sleep(std::time::Duration::from_millis(3_100));
    let out = lab.expect(
        lab.vc,
        &client(47_002, TCP_SYN),
        XDP_TX,
        "flow C towards b1 while b1 holds flow B's TIME_WAIT",
    );
    assert_eq!(tcp_flags_of(&out), TCP_RST | TCP_ACK, "flow C is not reset");
    assert_eq!(
        lab.stat(Stat::RefusedNatPortsExhausted),
        2,
        "the refusals of flows B and C were not counted"
    );
    assert_eq!(entries(&lab), 1, "one port towards b1, one entry");
    // The hold is per backend: towards b2 the same port number is free.
    lab.publish(0, &[1]);
    let out = lab.expect(
        lab.vc,
        &client(47_002, TCP_SYN),
        XDP_REDIRECT,
        "flow C towards b2",
    );
    assert_eq!(
        (
            Ipv4Addr::new(out[30], out[31], out[32], out[33]),
            l4_source_port(&out)
        ),
        (B2_4, port),
        "flow C did not get the port towards b2"
    );
    assert_eq!(
        lab.stat(Stat::DropNatPortsExhausted),
        0,
        "no SYN was dropped"
    );
}

#[test]
fn a_late_packet_of_a_flow_whose_port_was_taken_over_is_not_translated() {
    let Some(lab) = nat_lab("snat_reclaimed", 1, 0) else {
        return;
    };
    let port = open(&lab, 45_000, "flow A");
    lab.expect(
        lab.vc,
        &client(45_000, TCP_RST),
        XDP_REDIRECT,
        "flow A's RST",
    );
    assert_eq!(
        open(&lab, 45_001, "flow B"),
        port,
        "flow B took another port"
    );
    let out = lab.expect(
        lab.vc,
        &client(45_000, TCP_ACK),
        XDP_TX,
        "a late ACK of flow A",
    );
    assert_eq!(
        tcp_flags_of(&out),
        TCP_RST,
        "flow A's late ACK is not reset"
    );
    assert_eq!(lab.stat(Stat::ResetNatPortReclaimed), 1, "reset counted");
    // The port's replies belong to flow B now.
    let out = lab.expect(lab.vb, &backend(port, TCP_ACK), XDP_REDIRECT, "b1's reply");
    assert_eq!(
        u16::from_be_bytes([out[36], out[37]]),
        45_001,
        "b1's reply on the port went to flow A's client port, not flow B's"
    );
}

#[test]
fn an_ack_only_miss_takes_no_port_and_syn_fin_or_syn_rst_are_dropped() {
    let Some(lab) = nat_lab("snat_miss", 4, 0) else {
        return;
    };
    let out = lab.expect(lab.vc, &client(46_000, TCP_ACK), XDP_TX, "an ACK-only miss");
    assert_eq!(
        tcp_flags_of(&out),
        TCP_RST,
        "the miss is answered with a bare RST"
    );
    assert_eq!(entries(&lab), 0, "an ACK-only miss took a SNAT port");
    assert_eq!(
        lab.stat(Stat::ResetNatNoFlow),
        1,
        "the miss was not counted"
    );
    lab.expect(
        lab.vc,
        &client(46_001, TCP_RST),
        XDP_DROP,
        "a RST of no known flow",
    );
    for (flags, what) in [
        (TCP_SYN | TCP_FIN, "SYN+FIN"),
        (TCP_SYN | TCP_RST, "SYN+RST"),
    ] {
        lab.expect(lab.vc, &client(46_002, flags), XDP_DROP, what);
    }
    assert_eq!(lab.stat(Stat::DropSynFin), 2, "SYN+FIN and SYN+RST counted");
    assert_eq!(entries(&lab), 0, "a dropped packet took a SNAT port");
    assert!(
        lab.conntrack
            .get(
                &flow(CLIENT4.into(), 46_002, VIP4.into(), 80, IPPROTO_TCP),
                0
            )
            .is_err(),
        "a SYN+FIN opened a flow"
    );
}

#[test]
fn a_udp_flow_idle_past_the_timeout_gives_its_port_to_a_new_flow() {
    let Some(mut lab) = lab("snat_idle") else {
        return;
    };
    lab.backend(1, B1_4.into(), 5353);
    lab.service(1, VIP4.into(), 53, IPPROTO_UDP, MODE_NAT, &[1]);
    snat(&mut lab, 1, 1, 3600);
    lab.limits
        .set(
            1,
            Limits {
                idle_timeout_s: 1,
                ..Limits::default()
            },
            0,
        )
        .expect("write LIMITS");
    let (c, v): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    let datagram = |sport: u16| {
        Packet::udp(c, sport, v, 53)
            .payload(b"q")
            .frame(VC_MAC, CLIENT_MAC)
    };
    lab.expect(lab.vc, &datagram(5000), XDP_REDIRECT, "flow A");
    lab.expect(
        lab.vc,
        &datagram(5001),
        XDP_DROP,
        "flow B while A holds the port",
    );
    assert_eq!(
        lab.stat(Stat::DropNatPortsExhausted),
        1,
        "UDP exhaustion counted"
    );
    // Idle past the 1 s timeout plus the stored time's lag (CT_REFRESH_SECS + 1).
    std::thread::sleep(std::time::Duration::from_millis(5_200));
    lab.expect(
        lab.vc,
        &datagram(5001),
        XDP_REDIRECT,
        "flow B after A idled out",
    );
}

/// A crowded range still serves new flows: 48 flows stay open in a 64-port range and every
/// SYN gets a port. With the 8 probes of before, the 48th SYN was refused (all 8 of its probed
/// ports taken); with 16, a refusal among these 48 is about a 2% chance over hash seeds (the
/// sum of `(k/64)^16` over the fill), and none with this lab's.
#[test]
fn forty_eight_open_flows_fit_a_sixty_four_port_range() {
    let Some(lab) = nat_lab("snat_crowded", 64, 60) else {
        return;
    };
    let mut ports = std::collections::BTreeSet::new();
    for n in 0..48u16 {
        let port = open(
            &lab,
            46_000 + n,
            &format!("open flow {n}'s SYN, {n} ports taken"),
        );
        assert!(
            ports.insert(port),
            "flow {n} got port {port}, which an open flow holds"
        );
    }
    assert_eq!(
        (
            lab.stat(Stat::DropNatPortsExhausted),
            lab.stat(Stat::RefusedNatPortsExhausted)
        ),
        (0, 0),
        "a SYN was refused while the range had free ports"
    );
}

/// A SYN that starts a flow anew on its own 5-tuple, whose conntrack entry lost the closed
/// mark (evicted during the close, then re-made by a late segment without SYN), puts its
/// ended port in use again: another flow cannot take the port from under the new connection.
#[test]
fn a_syn_reusing_an_ended_flows_tuple_puts_its_port_in_use_again() {
    let Some(mut lab) = nat_lab("snat_reused_tuple", 1, 0) else {
        return;
    };
    let port = open(&lab, 44_200, "the first connection");
    lab.expect(
        lab.vc,
        &client(44_200, TCP_RST),
        XDP_REDIRECT,
        "the first connection's RST",
    );
    // The entry as a late segment re-makes it after an eviction: no closed mark.
    let key = flow(CLIENT4.into(), 44_200, VIP4.into(), 80, IPPROTO_TCP);
    let mut entry = lab
        .conntrack
        .get(&key, 0)
        .expect("the flow's conntrack entry");
    entry.flags &= !CT_F_CLOSED;
    lab.conntrack
        .insert(key, entry, 0)
        .expect("write CONNTRACK");
    assert_eq!(
        open(
            &lab,
            44_200,
            "the client's new connection on the same 5-tuple"
        ),
        port
    );
    let out = lab.expect(
        lab.vc,
        &client(44_201, TCP_SYN),
        XDP_TX,
        "another client port while the only port carries the new connection",
    );
    assert_eq!(
        tcp_flags_of(&out),
        TCP_RST | TCP_ACK,
        "another flow took the port of a live connection"
    );
}

#[test]
fn a_port_whose_time_is_ahead_of_the_programs_clock_is_held_not_free() {
    // An older lb-ebpf stamped times with the fine clock, up to a tick ahead of the coarse
    // one; while both programs share the maps (an upgrade) such a time must read as just
    // now, not wrap into an age of years that frees the port.
    let Some(mut lab) = nat_lab("snat_ahead", 1, 2) else {
        return;
    };
    open(&lab, 44_100, "the first flow");
    lab.expect(
        lab.vc,
        &client(44_100, TCP_RST),
        XDP_REDIRECT,
        "the first flow's RST",
    );
    let k = lab
        .nat_reverse
        .keys()
        .find_map(Result::ok)
        .expect("the port's NAT_REVERSE entry");
    let mut r = lab.nat_reverse.get(&k, 0).expect("read NAT_REVERSE");
    let ended = nat_flags(r.state);
    assert_ne!(ended & NAT_F_ENDED, 0, "the RST did not end the flow");
    r.state = nat_state(nat_seen(r.state).wrapping_add(1), ended);
    lab.nat_reverse.insert(k, r, 0).expect("write NAT_REVERSE");
    let out = lab.expect(
        lab.vc,
        &client(44_101, TCP_SYN),
        XDP_TX,
        "a second flow while the only port's time is ahead",
    );
    assert_eq!(
        tcp_flags_of(&out),
        TCP_RST | TCP_ACK,
        "a port ended a second from now was taken, as if free for years"
    );
}

/// The conntrack entry and the `NAT_REVERSE` entry of the open flow from `sport` (towards b1
/// on SNAT port `port`).
fn flow_entries(lab: &Lab, sport: u16, port: u16) -> (FlowKey, CtEntry, FlowKey, NatReverse) {
    let key = flow(CLIENT4.into(), sport, VIP4.into(), 80, IPPROTO_TCP);
    let ct = lab
        .conntrack
        .get(&key, 0)
        .expect("the flow's conntrack entry");
    let rkey = flow(B1_4.into(), 8080, LOCAL4.into(), port, IPPROTO_TCP);
    let r = lab
        .nat_reverse
        .get(&rkey, 0)
        .expect("the port's NAT_REVERSE entry");
    (key, ct, rkey, r)
}

/// Sets the conntrack time of the flow `key` (entry `ct`) `age` seconds before the
/// program's clock (`CLOCK_MONOTONIC_COARSE`) reads now, and returns that time. A negative
/// `age` puts it ahead, which the program reads as just now (`ct_age`): no segment renews it
/// for `CT_REFRESH_SECS - age` seconds, however the test is delayed meanwhile.
fn age_flow(lab: &mut Lab, key: FlowKey, mut ct: CtEntry, age: i32) -> u32 {
    ct.seen_s = super::ageing::monotonic().0.wrapping_sub(age as u32);
    lab.conntrack.insert(key, ct, 0).expect("write CONNTRACK");
    ct.seen_s
}

/// Between two renewals of its conntrack time, an established TCP flow's plain segments keep
/// their SNAT port without looking at its `NAT_REVERSE` entry; the segment that renews the
/// time (here: the time made 2 s old) also renews the port's time when it is a second old,
/// so the port's time is never older than the flow's, and the idle rule cannot free the
/// port of a flow that is busy.
#[test]
fn a_segment_that_renews_its_flows_time_renews_its_ports_time() {
    let Some(mut lab) = nat_lab("snat_renew", 4, 0) else {
        return;
    };
    let port = open(&lab, 44_300, "the flow's SYN");
    let (key, ct, rkey, mut r) = flow_entries(&lab, 44_300, port);
    let old = age_flow(&mut lab, key, ct, 2);
    r.state = nat_state(old.wrapping_add(1), nat_flags(r.state));
    lab.nat_reverse
        .insert(rkey, r, 0)
        .expect("write NAT_REVERSE");
    let out = lab.expect(
        lab.vc,
        &client(44_300, TCP_ACK),
        XDP_REDIRECT,
        "a segment whose flow's time is 2 s old",
    );
    assert_eq!(l4_source_port(&out), port, "the segment changed port");
    let (_, ct, _, r) = flow_entries(&lab, 44_300, port);
    assert_ne!(ct.seen_s, old, "the flow's time was not renewed");
    assert_eq!(
        nat_seen(r.state),
        ct.seen_s,
        "the port's time (a second old) was not renewed with the flow's"
    );
}

/// What a plain segment between two renewals gives up, and gets back: a `NAT_REVERSE` entry
/// evicted under a busy flow is not re-made by the flow's next segment (which keeps its port)
/// but by the one that renews the flow's time, within `CT_REFRESH_SECS + 1` seconds.
#[test]
fn a_busy_flows_evicted_port_entry_is_made_again_when_its_time_is_renewed() {
    let Some(mut lab) = nat_lab("snat_evicted_busy", 4, 0) else {
        return;
    };
    let port = open(&lab, 44_400, "the flow's SYN");
    let (key, ct, rkey, _) = flow_entries(&lab, 44_400, port);
    age_flow(&mut lab, key, ct, -1);
    lab.nat_reverse
        .remove(&rkey)
        .expect("evict the port's entry");
    let out = lab.expect(
        lab.vc,
        &client(44_400, TCP_ACK),
        XDP_REDIRECT,
        "a plain segment while its time is fresh",
    );
    assert_eq!(l4_source_port(&out), port, "the segment changed port");
    assert_eq!(entries(&lab), 0, "a plain segment looked the port up");
    age_flow(&mut lab, key, ct, CT_REFRESH_SECS as i32);
    let out = lab.expect(
        lab.vc,
        &client(44_400, TCP_ACK),
        XDP_REDIRECT,
        "the segment that renews the flow's time",
    );
    assert_eq!(
        l4_source_port(&out),
        port,
        "the renewing segment changed port"
    );
    let (_, _, _, r) = flow_entries(&lab, 44_400, port);
    assert_eq!(
        (r.client_port, r.vip_port),
        (44_400, 80),
        "the port's entry was made again for another flow"
    );
}

/// A renewal spent on a segment the route lookup stops (here too big for the backend link,
/// answered with "fragmentation needed") passes to the flow's next segment, which checks
/// the port: without that the flow would go unchecked until the renewal after.
#[test]
fn a_renewal_the_route_stopped_passes_to_the_next_segment() {
    let Some(mut lab) = nat_lab("snat_renewal_stopped", 4, 0) else {
        return;
    };
    let port = open(&lab, 44_500, "the flow's SYN");
    let (key, ct, rkey, _) = flow_entries(&lab, 44_500, port);
    age_flow(&mut lab, key, ct, CT_REFRESH_SECS as i32);
    lab.nat_reverse
        .remove(&rkey)
        .expect("evict the port's entry");
    let (c, v): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    let big = Packet::tcp(c, 44_500, v, 80, TCP_ACK)
        .payload(&[0x55; 1470])
        .frame(VC_MAC, CLIENT_MAC);
    lab.expect(
        lab.vc,
        &big,
        XDP_TX,
        "a renewing segment too big for the backend link",
    );
    assert_eq!(
        lab.stat(Stat::TooBigSent),
        1,
        "the segment was not answered"
    );
    lab.expect(
        lab.vc,
        &client(44_500, TCP_ACK),
        XDP_REDIRECT,
        "the next segment",
    );
    assert_eq!(
        entries(&lab),
        1,
        "the next segment did not check the port (its entry was not made again)"
    );
}

/// A flow whose conntrack entry was made in mid-stream (lost, then re-made by a segment
/// without SYN) checks its port on every segment: it may have lost its closed mark with the
/// entry.
#[test]
fn a_flow_made_in_mid_stream_checks_its_port_on_every_segment() {
    let Some(mut lab) = nat_lab("snat_midstream_checks", 4, 0) else {
        return;
    };
    let port = open(&lab, 44_600, "the flow's SYN");
    let (key, mut ct, rkey, _) = flow_entries(&lab, 44_600, port);
    ct.flags |= CT_F_MIDSTREAM;
    age_flow(&mut lab, key, ct, -1);
    lab.nat_reverse
        .remove(&rkey)
        .expect("evict the port's entry");
    lab.expect(
        lab.vc,
        &client(44_600, TCP_ACK),
        XDP_REDIRECT,
        "a plain segment while its time is fresh",
    );
    assert_eq!(
        entries(&lab),
        1,
        "a mid-stream flow's segment did not check its port"
    );
}

/// The backend's RST marks the client's flow closed even when the route lookup then stops it
/// (here too big for the client link): `reverse` has ended the port, which may be taken over
/// after its hold, so the flow's later segments must keep checking it.
#[test]
fn a_backend_rst_the_route_stopped_still_closes_the_flow() {
    let Some(lab) = nat_lab("snat_rst_stopped", 4, 0) else {
        return;
    };
    let port = open_answered(&lab, 44_700);
    let (b, l): (IpAddr, IpAddr) = (B1_4.into(), LOCAL4.into());
    let big = Packet::tcp(b, 8080, l, port, TCP_RST | TCP_ACK)
        .payload(&[0x66; 1470])
        .frame(VB_MAC, B1_MAC);
    lab.expect(
        lab.vb,
        &big,
        XDP_TX,
        "b1's RST, too big for the client link",
    );
    let (_, ct, _, r) = flow_entries(&lab, 44_700, port);
    assert_ne!(
        nat_flags(r.state) & NAT_F_ENDED,
        0,
        "the RST did not end the port"
    );
    assert_ne!(
        ct.flags & CT_F_CLOSED,
        0,
        "the port ended but the client's flow was not closed"
    );
}

/// A port entry re-made under an established flow (evicted, then re-made by the segment that
/// renews the flow's time) counts as answered: the backend's RST that ends the connection
/// reaches the client, not dropped as the refusal of a SYN.
#[test]
fn a_backend_rst_on_a_port_entry_made_again_reaches_the_client() {
    let Some(mut lab) = nat_lab("snat_remade_rst", 4, 0) else {
        return;
    };
    let port = open_answered(&lab, 44_800);
    let (key, ct, rkey, _) = flow_entries(&lab, 44_800, port);
    lab.nat_reverse
        .remove(&rkey)
        .expect("evict the port's entry");
    age_flow(&mut lab, key, ct, CT_REFRESH_SECS as i32);
    lab.expect(
        lab.vc,
        &client(44_800, TCP_ACK),
        XDP_REDIRECT,
        "the segment that renews the flow's time (and re-makes the entry)",
    );
    let out = lab.expect(
        lab.vb,
        &backend(port, TCP_RST | TCP_ACK),
        XDP_REDIRECT,
        "b1's RST ending the connection",
    );
    assert_eq!(
        u16::from_be_bytes([out[36], out[37]]),
        44_800,
        "b1's RST went to another client port"
    );
    assert_eq!(lab.stat(Stat::DropRefusedSyn), 0, "taken for a refused SYN");
}
