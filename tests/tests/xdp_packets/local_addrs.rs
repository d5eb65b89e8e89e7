//! A `nat` service with two local addresses (IPVS full-NAT's local address pool): each flow
//! takes its SNAT port on the address its hash names, for every packet; the pool carries as
//! many concurrent flows as the addresses' ranges together, and replies to either address are
//! translated back.

use super::*;
use aya::maps::{Array, MapData};
use lb_common::maps::{local_addr_index, snat_addr_index, LOCAL_ADDRS};

/// The second local address.
const LOCAL4_B: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// SNAT ports per address.
const PORTS: u16 = 4;

fn client_key(sport: u16) -> FlowKey {
    flow(CLIENT4.into(), sport, VIP4.into(), 80, IPPROTO_TCP)
}

#[test]
fn flows_spread_over_the_local_addresses_and_each_keeps_its_own() {
    let Some(mut lab) = lab("local_addrs") else {
        return;
    };
    let (client, vip, backend): (IpAddr, IpAddr, IpAddr) =
        (CLIENT4.into(), VIP4.into(), B1_4.into());
    lab.backend(0, backend, 8080);
    lab.service(0, vip, 80, IPPROTO_TCP, MODE_NAT, &[0]);
    let mut s = lab.services.get(&0, 0).expect("read SERVICES");
    s.snat_port_max = s.snat_port_min + PORTS - 1;
    s.local_addrs = 2;
    lab.services.set(0, s, 0).expect("write SERVICES");
    let mut pool: Array<&mut MapData, [u32; 4]> = Array::try_from(
        lab.ebpf
            .map_mut(LOCAL_ADDRS)
            .expect("the object has LOCAL_ADDRS"),
    )
    .expect("LOCAL_ADDRS is an array of address words");
    pool.set(local_addr_index(0, 1), words(LOCAL4_B.into()), 0)
        .expect("write LOCAL_ADDRS");
    let locals = [LOCAL4, LOCAL4_B];

    let flows: Vec<u16> = (41000..41016).collect();
    let address_of = |sport: u16| snat_addr_index(flow_hash(&client_key(sport)), 2) as usize;
    let mut per_address = [0u16; 2];
    for &sport in &flows {
        per_address[address_of(sport)] += 1;
    }
    let can_carry: u16 = per_address.iter().map(|&n| n.min(PORTS)).sum();
    assert!(
        can_carry > PORTS,
        "the test's flows must need both addresses: {per_address:?} per address"
    );

    let mut carried = Vec::new();
    for &sport in &flows {
        let syn = packet::frame(
            VC_MAC,
            CLIENT_MAC,
            &packet::ip(
                client,
                vip,
                6,
                &packet::tcp(client, sport, vip, 80, TCP_SYN, b""),
            ),
        );
        let (action, out) = lab.run(PROG_BALANCER, lab.vc, &syn);
        if action != XDP_REDIRECT {
            assert_eq!(
                action_name(action),
                "XDP_TX",
                "a SYN without a port is reset"
            );
            continue;
        }
        let src: [u8; 4] = out[26..30].try_into().expect("4 bytes");
        let want = locals[address_of(sport)];
        assert_eq!(
            Ipv4Addr::from(src),
            want,
            "flow {sport} must leave from the address its hash names"
        );
        let port = u16::from_be_bytes([out[34], out[35]]);
        carried.push((sport, want, port));
    }
    assert_eq!(
        carried.len() as u16,
        can_carry,
        "with {PORTS} ports on each of 2 addresses ({per_address:?} flows per address) \
         every address's ports are used"
    );
    assert_eq!(
        lab.stat(Stat::RefusedNatPortsExhausted),
        u64::from(flows.len() as u16 - can_carry),
        "the other SYNs are refused"
    );

    for &(sport, local, port) in &carried {
        // A later packet of the flow keeps its address and port.
        let ack = packet::frame(
            VC_MAC,
            CLIENT_MAC,
            &packet::ip(
                client,
                vip,
                6,
                &packet::tcp(client, sport, vip, 80, TCP_ACK, b"x"),
            ),
        );
        let out = lab.expect(lab.vc, &ack, XDP_REDIRECT, "a later packet of the flow");
        assert_eq!(
            &out[26..30],
            &local.octets(),
            "flow {sport} changed its address"
        );
        assert_eq!(
            u16::from_be_bytes([out[34], out[35]]),
            port,
            "flow {sport} changed its port"
        );
        // The backend's reply to that address and port goes back to the client.
        let l: IpAddr = local.into();
        let reply = packet::frame(
            VB_MAC,
            B1_MAC,
            &packet::ip(
                backend,
                l,
                6,
                &packet::tcp(backend, 8080, l, port, TCP_ACK, b"y"),
            ),
        );
        let out = lab.expect(lab.vb, &reply, XDP_REDIRECT, "the backend's reply");
        let want = packet::frame(
            CLIENT_MAC,
            VC_MAC,
            &packet::forwarded(&packet::ip(
                vip,
                client,
                6,
                &packet::tcp(vip, 80, client, sport, TCP_ACK, b"y"),
            )),
        );
        packet::assert_checksums(&out, "the reply sent to the client");
        assert_same(&out, &want, "the reply sent to the client");
    }
}
