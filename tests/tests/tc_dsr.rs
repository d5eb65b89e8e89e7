//! The tc data plane (`dataplane = "tc"`, `lb_tc` at tc ingress) in `dsr` mode, end to end:
//! the same checks as `xdp_dsr.rs` in the same namespaces, with nothing changed on the
//! neighbours (tx checksum offload stays on, so the client's and the backends' packets arrive
//! `CHECKSUM_PARTIAL` and as GSO super-packets; no XDP program on the veth peers, and only the backends run `lb-daemon decap`). See `lb_tests::xdp`.
//!
//! Needs root and the BPF object (`cargo xtask build-ebpf`).

use lb_tests::xdp::scenarios;
use lb_tests::xdp::{Mode, Path, Plane};

const PATH: Path = Path {
    plane: Plane::Tc,
    mode: Mode::Dsr,
};

#[test]
fn http_requests_spread_evenly_over_three_backends() {
    if lb_tests::require_root("tc_dsr::http_requests_spread_evenly_over_three_backends") {
        scenarios::requests_spread_evenly(PATH);
    }
}

#[test]
fn a_100_mib_upload_arrives_intact_and_udp_gets_replies() {
    if lb_tests::require_root("tc_dsr::a_100_mib_upload_arrives_intact_and_udp_gets_replies") {
        scenarios::transfer_and_udp(PATH);
    }
}

#[test]
fn new_flows_avoid_a_down_backend_while_a_long_upload_completes() {
    if lb_tests::require_root(
        "tc_dsr::new_flows_avoid_a_down_backend_while_a_long_upload_completes",
    ) {
        scenarios::backend_down(PATH);
    }
}

#[test]
fn a_backend_that_comes_up_takes_new_flows_and_existing_ones_stay() {
    if lb_tests::require_root(
        "tc_dsr::a_backend_that_comes_up_takes_new_flows_and_existing_ones_stay",
    ) {
        scenarios::backend_added(PATH);
    }
}

#[test]
fn counters_match_the_traffic_sent() {
    if lb_tests::require_root("tc_dsr::counters_match_the_traffic_sent") {
        scenarios::counters_match(PATH);
    }
}

/// A backend link of 1500 bytes has no room for the 20 bytes of IPIP on a full-size segment.
/// On tc the client's GSO super-packets are encapsulated whole and segmented to fit (the
/// segment size shrinks by the outer header), and segments that would not fit are answered
/// with "fragmentation needed": either way a 10 MiB upload arrives intact.
#[test]
fn an_upload_over_a_1500_byte_backend_link_arrives_intact() {
    if !lb_tests::require_root("tc_dsr::an_upload_over_a_1500_byte_backend_link") {
        return;
    }
    let world = lb_tests::xdp::world::World::start(PATH, 1, 1);
    let t = &world.topology;
    t.set_backend_link_mtu(0, 1500);
    const LEN: u64 = 10 * 1024 * 1024;
    let vip = lb_tests::xdp::Topology::vip(lb_tests::xdp::world::BULK);
    let receipt = world
        .client(|| lb_tests::client::upload(vip, LEN, 11))
        .unwrap_or_else(|e| panic!("the upload over a 1500-byte backend link failed: {e}"));
    assert_eq!(
        receipt,
        lb_tests::data::Receipt::of_stream(LEN, 11),
        "the backend did not receive the 10 MiB the client sent, byte for byte"
    );
}

/// Datagrams in the UDP GSO test's one send, and the size of each.
const GSO_DATAGRAMS: usize = 8;
const GSO_SIZE: usize = 1200;

/// A client sending with UDP GSO (`UDP_SEGMENT`: eight 1,200-byte datagrams in one send)
/// reaches `lb_tc` as one super-packet; encapsulated, it must still be cut into the same eight
/// datagrams (the outer header must not change the segment size, as it would for TCP): the
/// backend echoes each one whole.
#[test]
fn udp_gso_datagrams_keep_their_boundaries_through_the_tunnel() {
    if !lb_tests::require_root("tc_dsr::udp_gso_datagrams_keep_their_boundaries") {
        return;
    }
    let world = lb_tests::xdp::world::World::start(PATH, 1, 1);
    let vip = lb_tests::xdp::Topology::vip(lb_tests::xdp::world::DNS);
    let payloads: Vec<Vec<u8>> = (0..GSO_DATAGRAMS)
        .map(|i| (0..GSO_SIZE).map(|j| (i * 31 + j * 7) as u8).collect())
        .collect();
    let replies = world
        .client(|| gso_exchange(vip, &payloads))
        .unwrap_or_else(|e| panic!("the UDP GSO exchange through the VIP failed: {e}"));
    let mut echoed: Vec<Vec<u8>> = replies
        .iter()
        .map(|r| {
            let colon = r
                .iter()
                .position(|&b| b == b':')
                .unwrap_or_else(|| panic!("a reply of {} bytes is not `name:payload`", r.len()));
            r[colon + 1..].to_vec()
        })
        .collect();
    let sizes: Vec<usize> = echoed.iter().map(Vec::len).collect();
    echoed.sort();
    let mut sent = payloads.clone();
    sent.sort();
    assert!(
        echoed == sent,
        "the backend did not get the {GSO_DATAGRAMS} datagrams of {GSO_SIZE} bytes one send \
         carried, each whole: it echoed datagrams of {sizes:?} bytes"
    );
}

/// Sends `payloads` (each [`GSO_SIZE`] bytes) to `vip` in one `send` with `UDP_SEGMENT`, and
/// collects the replies until as many came as were sent or 5 s passed. Inside the client's
/// namespace.
fn gso_exchange(vip: std::net::SocketAddr, payloads: &[Vec<u8>]) -> std::io::Result<Vec<Vec<u8>>> {
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(vip)?;
    let size = GSO_SIZE as libc::c_int;
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.send(&payloads.concat())?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut replies = Vec::new();
    let mut buf = vec![0u8; 65536];
    while replies.len() < payloads.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        socket.set_read_timeout(Some(left))?;
        match socket.recv(&mut buf) {
            Ok(n) => replies.push(buf[..n].to_vec()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(e) => return Err(e),
        }
    }
    Ok(replies)
}

/// The client sends a 1,472-byte UDP datagram with DF (a 1,500-byte IPv4 packet, too big for
/// a 1,500-byte backend link once the 20 bytes of IPIP are added): its path MTU towards the
/// VIP must drop to 1,480 once the balancer's "fragmentation needed" arrives.
///
/// The datagram leaves the client's socket `CHECKSUM_PARTIAL` (its veth offloads the UDP
/// checksum), and `lb_tc` builds the answer from it. The balancer's client-facing veth has its
/// transmit checksum offload turned off, so the kernel finishes the answer's checksum at
/// transmit as a network card would: from the socket buffer's checksum start, into the field
/// at its checksum offset, both still the datagram's. An answer whose checksums do not
/// account for that reaches the client corrupted, and its kernel drops it.
#[test]
fn fragmentation_needed_built_from_a_partial_checksum_packet_survives_a_checksumming_link() {
    if !lb_tests::require_root("tc_dsr::fragmentation_needed_built_from_a_partial_checksum") {
        return;
    }
    let world = lb_tests::xdp::world::World::start(PATH, 1, 1);
    let t = &world.topology;
    t.set_backend_link_mtu(0, 1500);
    lb_tests::xdp::disable_tx_checksum(&t.balancer, "l0").expect("tx checksum offload off on l0");
    let vip = lb_tests::xdp::Topology::vip(lb_tests::xdp::world::DNS);
    let mtu = world
        .client(|| lb_tests::client::learnt_path_mtu(vip, 1500))
        .unwrap_or_else(|e| panic!("sending the 1,472-byte datagram failed: {e}"));
    assert_eq!(
        mtu, 1480,
        "the client's path MTU towards the VIP stayed {mtu}: the balancer's \"fragmentation \
         needed\" did not arrive intact"
    );
}
