//! GSO super-packets, which only socket buffers have: a test run gives one its segment size
//! and count (`Lab::run_tc_gso`, which says what such a run cannot show).

use lb_tests::xdp::testrun::Gso;

use super::*;

/// One segment's payload in the case that is too big: more than the client link's MTU
/// (1,500 bytes, the lab's veth) holds after the IPv4 and TCP headers, as a backend on a
/// jumbo-frame link sends. A test run cannot tell the kernel where a segment's payload starts,
/// so any segment size gives the same outcome there; this one is what the case stands for.
const JUMBO_SEGMENT: u16 = 1600;

#[test]
fn a_dsr_reply_whose_segments_are_too_big_for_the_client_link_goes_to_the_kernel() {
    let Some(mut lab) = lab("tc_gso_dsr_reply") else {
        return;
    };
    lab.backend(0, B1_4.into(), 0);
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_DSR, &[0, 0, 0]);
    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    let syn = Packet::tcp(client, 41000, vip, 80, TCP_SYN).frame(VC_MAC, CLIENT_MAC);
    lab.expect(lab.vc, &syn, XDP_REDIRECT, "the client's SYN");

    // The kernel's forward path is the one to segment such a reply or answer "too big". The
    // route lookup does not look at a super-packet's length (`Frame::mtu_len`): the segment
    // check (`Frame::segments_fit`) is what stops it.
    let payload = vec![0x5a; 2 * usize::from(JUMBO_SEGMENT)];
    let reply = Packet::tcp(vip, 80, client, 41000, TCP_ACK).payload(&payload);
    let frame = reply.frame(VB_MAC, B1_MAC);
    let jumbo = Gso {
        size: JUMBO_SEGMENT,
        segs: 2,
    };
    let what = "a reply of 2 segments of 1,600 bytes";
    let (action, out) = lab.run_tc_gso(lab.vb, &frame, jumbo);
    assert_eq!(action_name(action), "XDP_PASS", "{what}: sent on");
    assert_same(&out, &frame, what);
    assert_eq!(lab.stat(Stat::DsrReplies), 0, "{what}: counted as sent on");

    // The check is the segments', not a refusal of every super-packet: one that is no longer
    // than the MTU as a whole is sent on (the kernel answers before it looks at segments).
    let reply = Packet::tcp(vip, 80, client, 41000, TCP_ACK).payload(&[0x5a; 2 * 500]);
    let small = Gso { size: 500, segs: 2 };
    let what = "a reply of 2 segments of 500 bytes";
    let (action, out) = lab.run_tc_gso(lab.vb, &reply.clone().frame(VB_MAC, B1_MAC), small);
    assert_eq!(action_name(action), "XDP_REDIRECT", "{what}: not sent on");
    assert_same(&out, &reply.forwarded().frame(CLIENT_MAC, VC_MAC), what);
    assert_eq!(lab.stat(Stat::DsrReplies), 1, "{what}: not counted");
}
