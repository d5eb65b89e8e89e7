//!
//! Conntrack ageing ("Conntrack ageing" in `lb_common::maps`): the tests age an entry by
//! writing an older `seen_s` into it, rather than by waiting.

use super::*;

/// The idle timeout the tests give their services, seconds.
const IDLE: u32 = 30;

/// Seconds and nanoseconds of `CLOCK_MONOTONIC_COARSE`, the clock the program stamps
/// conntrack entries with (`bpf_ktime_get_coarse_ns`).
pub(super) fn monotonic() -> (u32, u32) {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer for the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC_COARSE) failed");
    (ts.tv_sec as u32, ts.tv_nsec as u32)
}

/// Two backends (b1 id 0, b2 id 1); service 0 TCP VIP4:80 and service 1 UDP VIP4:53,
/// both NAT on a table naming only b1, both with idle timeout [`IDLE`].
fn setup(test: &str) -> Option<Lab> {
    let mut lab = lab(test)?;
    lab.backend(0, B1_4.into(), 8080);
    lab.backend(1, B2_4.into(), 8080);
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0]);
    lab.service(1, VIP4.into(), 53, IPPROTO_UDP, MODE_NAT, &[0]);
    for id in [0, 1] {
        idle_timeout(&mut lab, id, IDLE, 0);
    }
    Some(lab)
}

fn idle_timeout(lab: &mut Lab, id: u32, idle_timeout_s: u32, max_connections: u32) {
    let limits = Limits {
        idle_timeout_s,
        max_connections,
        ..Limits::default()
    };
    lab.limits.set(id, limits, 0).expect("write LIMITS");
}

fn tcp(sport: u16, flags: u8) -> Vec<u8> {
    let (c, v): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    Packet::tcp(c, sport, v, 80, flags).frame(VC_MAC, CLIENT_MAC)
}

fn udp(sport: u16) -> Vec<u8> {
    let (c, v): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    Packet::udp(c, sport, v, 53)
        .payload(b"q")
        .frame(VC_MAC, CLIENT_MAC)
}

fn key(sport: u16, protocol: u8) -> FlowKey {
    let port = if protocol == IPPROTO_TCP { 80 } else { 53 };
    flow(CLIENT4.into(), sport, VIP4.into(), port, protocol)
}

fn entry(lab: &Lab, key: &FlowKey) -> CtEntry {
    lab.conntrack
        .get(key, 0)
        .expect("the flow has a conntrack entry")
}

/// The connection slots `CLIENT4` holds in service `service` (`CLIENTS`).
fn slots(lab: &Lab, service: u32) -> u64 {
    let c = ClientKey {
        service,
        addr: words(CLIENT4.into()),
    };
    lab.clients.get(&c, 0).map_or(0, |s| s.connections)
}

/// Makes `key`'s entry look last seen `idle` seconds before its current `seen_s`.
fn age(lab: &mut Lab, key: &FlowKey, idle: u32) -> CtEntry {
    let mut e = entry(lab, key);
    e.seen_s = e.seen_s.wrapping_sub(idle);
    lab.conntrack.insert(key, e, 0).expect("write CONNTRACK");
    e
}

fn dst_of(frame: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33])
}

#[test]
fn an_aged_udp_entry_is_placed_by_the_live_table_and_a_fresh_one_is_kept() {
    let Some(mut lab) = setup("ageing_udp") else {
        return;
    };
    let (before, _) = monotonic();
    let out = lab.expect(lab.vc, &udp(5000), XDP_REDIRECT, "a first datagram");
    assert_eq!(dst_of(&out), B1_4, "the session starts on b1");
    lab.expect(lab.vc, &udp(5001), XDP_REDIRECT, "another session");
    let (after, _) = monotonic();
    let seen = entry(&lab, &key(5000, IPPROTO_UDP)).seen_s;
    assert!(
        (before..=after).contains(&seen),
        "a new entry's time {seen} is not the CLOCK_MONOTONIC_COARSE second it was made in \
         ({before}..={after})"
    );

    lab.publish(1, &[1]);
    // 5000 idle for just over the timeout, 5001 for just under it.
    age(
        &mut lab,
        &key(5000, IPPROTO_UDP),
        IDLE + CT_REFRESH_SECS + 2,
    );
    // The stored time may trail the last packet by CT_REFRESH_SECS + 1: an entry that
    // old past the timeout is not aged yet (a flow sending just under the timeout).
    age(
        &mut lab,
        &key(5001, IPPROTO_UDP),
        IDLE + CT_REFRESH_SECS + 1,
    );
    let out = lab.expect(
        lab.vc,
        &udp(5000),
        XDP_REDIRECT,
        "a datagram after a long idle",
    );
    assert_eq!(
        dst_of(&out),
        B2_4,
        "a session idle past its timeout kept its old backend instead of the table's"
    );
    let e = entry(&lab, &key(5000, IPPROTO_UDP));
    assert_eq!(e.backend, 1, "the re-placed session's entry names b2");
    assert!(e.seen_s >= seen, "the re-placed entry's time is not now");
    let out = lab.expect(
        lab.vc,
        &udp(5001),
        XDP_REDIRECT,
        "a datagram after a short idle",
    );
    assert_eq!(
        dst_of(&out),
        B1_4,
        "a session idle for less than its timeout lost its backend"
    );
    assert_eq!(
        lab.service_counters(1).new_flows,
        3,
        "the aged session did not count as a new flow"
    );

    // Idle timeout 0 (an entry never written): entries never age.
    idle_timeout(&mut lab, 1, 0, 0);
    age(&mut lab, &key(5001, IPPROTO_UDP), 100_000);
    let out = lab.expect(lab.vc, &udp(5001), XDP_REDIRECT, "a datagram, no timeout");
    assert_eq!(
        dst_of(&out),
        B1_4,
        "a service without a timeout aged a session"
    );
}

#[test]
fn an_aged_tcp_entry_keeps_its_backend_for_packets_without_syn_and_not_for_a_syn() {
    let Some(mut lab) = setup("ageing_tcp") else {
        return;
    };
    let out = lab.expect(lab.vc, &tcp(41000, TCP_SYN), XDP_REDIRECT, "the first SYN");
    assert_eq!(dst_of(&out), B1_4, "the flow starts on b1");
    lab.publish(0, &[1]);
    let k = key(41000, IPPROTO_TCP);

    // Idle long past the timeout, but the connection may be alive: it stays on b1.
    let old = age(&mut lab, &k, 10 * IDLE);
    for flags in [TCP_ACK, TCP_ACK | TCP_SYN] {
        let out = lab.expect(lab.vc, &tcp(41000, flags), XDP_REDIRECT, "a long-idle ACK");
        assert_eq!(
            dst_of(&out),
            B1_4,
            "a packet without SYN (flags {flags:#x}) of an old TCP flow moved to the \
             live table's backend"
        );
    }
    let e = entry(&lab, &k);
    assert!(
        e.seen_s > old.seen_s,
        "the old flow's packet did not refresh its entry"
    );
    // A SYN on a fresh entry is a retransmission: it keeps its backend.
    let out = lab.expect(lab.vc, &tcp(41000, TCP_SYN), XDP_REDIRECT, "a SYN again");
    assert_eq!(dst_of(&out), B1_4, "a retransmitted SYN moved");

    // A SYN on an aged entry starts a new flow on the reused port.
    age(&mut lab, &k, IDLE + CT_REFRESH_SECS + 2);
    let out = lab.expect(lab.vc, &tcp(41000, TCP_SYN), XDP_REDIRECT, "a SYN, aged");
    assert_eq!(
        dst_of(&out),
        B2_4,
        "a SYN reusing the 5-tuple of a long-idle flow kept its old backend"
    );
    assert_eq!(entry(&lab, &k).backend, 1, "the new flow's entry names b2");
    assert_eq!(lab.service_counters(0).new_flows, 2);
}

#[test]
fn an_aged_counted_entry_gives_its_connection_slot_back_once_when_replaced() {
    let Some(mut lab) = setup("ageing_slot") else {
        return;
    };
    idle_timeout(&mut lab, 0, IDLE, 1);
    let slots = |lab: &Lab| slots(lab, 0);
    lab.expect(lab.vc, &tcp(42000, TCP_SYN), XDP_REDIRECT, "the first SYN");
    lab.expect(
        lab.vc,
        &tcp(42001, TCP_SYN),
        XDP_TX,
        "a SYN over the limit of 1",
    );
    let k = key(42000, IPPROTO_TCP);
    age(&mut lab, &k, IDLE + CT_REFRESH_SECS + 2);
    // Its ACK keeps the old flow, and its slot.
    lab.expect(
        lab.vc,
        &tcp(42000, TCP_ACK),
        XDP_REDIRECT,
        "an aged flow's ACK",
    );
    assert_eq!(
        slots(&lab),
        1,
        "an ACK of an old flow changed its client's slots"
    );
    age(&mut lab, &k, IDLE + CT_REFRESH_SECS + 2);
    lab.publish(0, &[1]);
    for i in 0..3 {
        let out = lab.expect(
            lab.vc,
            &tcp(42000, TCP_SYN),
            XDP_REDIRECT,
            "a SYN replacing an aged flow that held the client's only slot",
        );
        assert_eq!(
            dst_of(&out),
            B2_4,
            "SYN {i} on the aged flow's port kept b1"
        );
    }
    assert_eq!(
        slots(&lab),
        1,
        "the replaced flow's slot was not given back exactly once (the new one holds one)"
    );
    assert_eq!(
        entry(&lab, &k).flags,
        CT_F_COUNTED,
        "the new flow's conntrack flags"
    );
    lab.expect(
        lab.vc,
        &tcp(42001, TCP_SYN),
        XDP_TX,
        "a SYN over the limit again",
    );

    // A closed flow gave its slot back with its RST (on NAT the client's FIN, a
    // half-close, does not end it): ageing must not give it again.
    lab.expect(
        lab.vc,
        &tcp(42000, TCP_RST | TCP_ACK),
        XDP_REDIRECT,
        "the client's RST",
    );
    assert_eq!(slots(&lab), 0);
    age(&mut lab, &k, IDLE + CT_REFRESH_SECS + 2);
    lab.expect(
        lab.vc,
        &tcp(42000, TCP_SYN),
        XDP_REDIRECT,
        "a SYN on an aged closed flow",
    );
    assert_eq!(
        slots(&lab),
        1,
        "a closed and aged flow's slot went back twice"
    );
    assert_eq!(lab.stat(Stat::RefusedClientConnections), 2);
}

/// Past the grace after the idle timeout a counted flow's slot is the daemon sweep's to give
/// back (it counts only flows whose slot has not expired): the program takes the mark off
/// the entry when it meets it again and gives nothing back itself, whether the flow goes on
/// (and then ends with the client's RST), ends with the backend's FIN, or is replaced by a
/// SYN. Whatever the order, the client's slot goes back once.
#[test]
fn an_expired_slot_is_left_to_the_sweep_and_never_given_back_twice() {
    let Some(mut lab) = setup("ageing_slot_expired") else {
        return;
    };
    idle_timeout(&mut lab, 0, IDLE, 3);
    let slots = |lab: &Lab| slots(lab, 0);
    let mut snat = Vec::new();
    for port in [42000, 42001, 42002] {
        let out = lab.expect(lab.vc, &tcp(port, TCP_SYN), XDP_REDIRECT, "a SYN");
        snat.push(l4_source_port(&out));
    }
    assert_eq!(slots(&lab), 3);
    let expired = IDLE + CT_REFRESH_SECS + 2 + CT_SLOT_GRACE_SECS;

    // A flow back from that long an idle goes on, uncounted; its RST gives nothing.
    let k = key(42000, IPPROTO_TCP);
    age(&mut lab, &k, expired);
    lab.expect(
        lab.vc,
        &tcp(42000, TCP_ACK),
        XDP_REDIRECT,
        "the ACK of a flow back from a long idle",
    );
    assert_eq!(entry(&lab, &k).flags, 0, "the expired flow kept its mark");
    lab.expect(
        lab.vc,
        &tcp(42000, TCP_RST | TCP_ACK),
        XDP_REDIRECT,
        "the expired flow's RST",
    );
    assert_eq!(slots(&lab), 3, "an expired flow gave its slot back itself");

    // The backend's FIN ends a flow not seen since its slot expired: nothing given back.
    let k = key(42001, IPPROTO_TCP);
    age(&mut lab, &k, expired);
    let (b, local): (IpAddr, IpAddr) = (B1_4.into(), LOCAL4.into());
    let fin = Packet::tcp(b, 8080, local, snat[1], TCP_FIN | TCP_ACK).frame(VB_MAC, B1_MAC);
    lab.expect(
        lab.vb,
        &fin,
        XDP_REDIRECT,
        "the backend's FIN after a long idle",
    );
    assert_eq!(
        entry(&lab, &k).flags,
        CT_F_CLOSED,
        "conntrack flags after the FIN"
    );
    assert_eq!(
        slots(&lab),
        3,
        "the backend's FIN gave an expired slot back"
    );

    // A SYN replacing an expired entry needs a slot of its own; the old one is the sweep's.
    let k = key(42002, IPPROTO_TCP);
    age(&mut lab, &k, expired);
    lab.expect(
        lab.vc,
        &tcp(42002, TCP_SYN),
        XDP_TX,
        "a SYN replacing an expired flow, before the sweep gave its slot back",
    );
    assert_eq!(slots(&lab), 3);
}

/// On `dsr` a flow whose backend went down is re-placed and goes on. One whose slot expired
/// goes on uncounted: its FIN must not give back the slot the sweep gave back.
#[test]
fn a_dsr_flow_re_placed_after_its_slot_expired_goes_on_uncounted() {
    let Some(mut lab) = setup("ageing_slot_replaced") else {
        return;
    };
    lab.service(2, VIP4.into(), 81, IPPROTO_TCP, MODE_DSR, &[0]);
    idle_timeout(&mut lab, 2, IDLE, 3);
    let seg = |flags: u8| {
        let (c, v): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
        Packet::tcp(c, 43000, v, 81, flags).frame(VC_MAC, CLIENT_MAC)
    };
    let slots = |lab: &Lab| slots(lab, 2);
    lab.expect(lab.vc, &seg(TCP_SYN), XDP_REDIRECT, "the SYN");
    assert_eq!(slots(&lab), 1);
    let k = flow(CLIENT4.into(), 43000, VIP4.into(), 81, IPPROTO_TCP);
    age(
        &mut lab,
        &k,
        IDLE + CT_REFRESH_SECS + 2 + CT_SLOT_GRACE_SECS,
    );
    lab.set_backend_flags(0, BACKEND_F_DOWN);
    lab.publish(2, &[1]);
    lab.expect(
        lab.vc,
        &seg(TCP_ACK),
        XDP_REDIRECT,
        "an expired flow's ACK, its backend down",
    );
    let e = entry(&lab, &k);
    assert_eq!(
        (e.backend, e.flags & CT_F_COUNTED),
        (1, 0),
        "the re-placed expired flow: its backend and mark"
    );
    lab.expect(lab.vc, &seg(TCP_FIN | TCP_ACK), XDP_REDIRECT, "its FIN");
    assert_eq!(
        slots(&lab),
        1,
        "a re-placed expired flow gave its slot back itself"
    );
}

#[test]
fn an_entry_time_is_rewritten_once_it_is_due_not_per_packet() {
    let Some(mut lab) = setup("ageing_refresh") else {
        return;
    };
    lab.expect(lab.vc, &udp(6000), XDP_REDIRECT, "a first datagram");
    let k = key(6000, IPPROTO_UDP);
    // Start early in a second, so the packets below run within it.
    let (_, ns) = monotonic();
    if ns > 500_000_000 {
        std::thread::sleep(std::time::Duration::from_nanos(
            u64::from(1_000_000_000 - ns) + 10_000_000,
        ));
    }
    let (now, _) = monotonic();
    let mut e = entry(&lab, &k);
    e.seen_s = now - (CT_REFRESH_SECS - 1);
    lab.conntrack.insert(k, e, 0).expect("write CONNTRACK");
    for _ in 0..5 {
        lab.expect(lab.vc, &udp(6000), XDP_REDIRECT, "a datagram");
    }
    let (later, _) = monotonic();
    if later == now {
        assert_eq!(
            entry(&lab, &k).seen_s,
            e.seen_s,
            "a packet rewrote an entry time not yet {CT_REFRESH_SECS} s old: the \
             refresh writes per packet"
        );
    }
    // Due: the first packet rewrites it, to now.
    e.seen_s = now - CT_REFRESH_SECS;
    lab.conntrack.insert(k, e, 0).expect("write CONNTRACK");
    lab.expect(lab.vc, &udp(6000), XDP_REDIRECT, "a datagram, entry due");
    let (later, _) = monotonic();
    let refreshed = entry(&lab, &k).seen_s;
    assert!(
        (now..=later).contains(&refreshed),
        "an entry time {CT_REFRESH_SECS} s old was not refreshed to now ({refreshed}, \
         now {now}..={later})"
    );
}

#[test]
fn an_entry_time_ahead_of_the_programs_clock_reads_as_just_seen_not_as_aged() {
    // An older lb-ebpf stamped times with the fine clock, up to a tick ahead of the coarse
    // one; while both programs share the maps (an upgrade) such a time must not wrap into
    // an age of years, which would re-place the flow on its next datagram.
    let Some(mut lab) = setup("ageing_ahead") else {
        return;
    };
    let out = lab.expect(lab.vc, &udp(7000), XDP_REDIRECT, "a first datagram");
    assert_eq!(dst_of(&out), B1_4, "the session starts on b1");
    lab.publish(1, &[1]);
    let k = key(7000, IPPROTO_UDP);
    let mut e = entry(&lab, &k);
    e.seen_s = e.seen_s.wrapping_add(1);
    lab.conntrack.insert(k, e, 0).expect("write CONNTRACK");
    let out = lab.expect(lab.vc, &udp(7000), XDP_REDIRECT, "a datagram");
    assert_eq!(
        dst_of(&out),
        B1_4,
        "a session stamped a second ahead was re-placed, as if idle past its timeout"
    );
    // The control: the same session made idle past the timeout does move.
    age(&mut lab, &k, 1 + IDLE + CT_REFRESH_SECS + 2);
    let out = lab.expect(
        lab.vc,
        &udp(7000),
        XDP_REDIRECT,
        "a datagram after a long idle",
    );
    assert_eq!(dst_of(&out), B2_4, "an aged session kept its old backend");
}
