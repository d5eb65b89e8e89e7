//!
//! Fuzzing through BPF_PROG_TEST_RUN (issue 10): a seeded generator of frames over the grammar
//! the program parses (Ethernet with 0-2 VLAN tags; IPv4 with any IHL and options and any
//! fragment bits; IPv6 with extension headers; TCP with any data offset and flags; UDP; ICMP
//! quoting IPv4 with options; truncation anywhere), each run through `lb_xdp`, with what must
//! hold for every frame checked. `LB_FUZZ_FRAMES` (default 100,000) and `LB_FUZZ_SEED` set the
//! run (`cargo xtask fuzz-xdp --frames N --seed S`); a failure prints the seed, the frame's
//! index and its bytes.

use super::*;

/// xorshift64*: small, seeded, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

/// One generated frame: its bytes, the interface it comes in on, the client flow it
/// carries to a VIP (if it is one), and whether it was cut short.
struct Case {
    frame: Vec<u8>,
    ingress_is_client: bool,
    flow: Option<FlowKey>,
    truncated: bool,
}

const VIP4_PORTS: [u16; 3] = [80, 53, 443];

fn l4(rng: &mut Rng, src: IpAddr, dst: IpAddr, protocol: u8, sport: u16, dport: u16) -> Vec<u8> {
    let n = rng.below(48) as usize;
    let payload = rng.bytes(n);
    match protocol {
        6 => {
            let flags = match rng.below(10) {
                0..=3 => TCP_SYN,
                4..=6 => TCP_ACK,
                _ => rng.byte(),
            };
            let mut seg = packet::tcp(src, sport, dst, dport, flags, &payload);
            // Any data offset: options (random bytes) between the header and the payload.
            if rng.percent(25) {
                let words = 1 + rng.below(10) as usize;
                let options = rng.bytes(words * 4);
                let mut with = seg[..20].to_vec();
                with.extend_from_slice(&options);
                with.extend_from_slice(&seg[20..]);
                with[12] = ((5 + words as u8) << 4) | (with[12] & 0x0f);
                with[16..18].copy_from_slice(&[0, 0]);
                let c = packet::checksum(&[&packet::pseudo(src, dst, 6, with.len()), &with]);
                with[16..18].copy_from_slice(&c.to_be_bytes());
                seg = with;
            }
            seg
        }
        17 => {
            let mut d = packet::udp(src, sport, dst, dport, &payload);
            if src.is_ipv4() && rng.percent(10) {
                d[6..8].copy_from_slice(&[0, 0]);
            }
            d
        }
        1 | 58 => {
            // An error quoting a packet (IPv4 with options when it can) of a flow the
            // lab knows, or anything at all.
            let quote_v4 = src.is_ipv4();
            let quote = if quote_v4 {
                let n = 4 * rng.below(3) as usize;
                let opts = rng.bytes(n);
                let inner = packet::udp(
                    LOCAL4.into(),
                    20_000 + rng.below(100) as u16,
                    B1_4.into(),
                    5353,
                    b"",
                );
                packet::ipv4(LOCAL4, B1_4, 17, packet::V4_CLIENT, &opts, &inner)
            } else {
                let inner = packet::tcp(
                    LOCAL6.into(),
                    20_000 + rng.below(100) as u16,
                    B1_6.into(),
                    8080,
                    TCP_ACK,
                    b"",
                );
                packet::ipv6(LOCAL6, B1_6, 6, 0x6000_0000, 64, &inner)
            };
            let (kind, code) = if rng.percent(70) {
                if quote_v4 {
                    (3, 4)
                } else {
                    (2, 0)
                }
            } else {
                (rng.byte(), rng.byte())
            };
            let mut m = vec![kind, code, 0, 0];
            m.extend_from_slice(&(rng.next() as u32).to_be_bytes());
            m.extend_from_slice(&quote);
            let pseudo = if quote_v4 {
                Vec::new()
            } else {
                packet::pseudo(src, dst, 58, m.len())
            };
            let c = packet::checksum(&[&pseudo, &m]);
            m[2..4].copy_from_slice(&c.to_be_bytes());
            m
        }
        _ => payload,
    }
}

fn case(rng: &mut Rng) -> Case {
    let v4 = rng.percent(60);
    let direction = rng.below(4); // 0, 1: to a VIP; 2: a reply; 3: anything
    let protocol = match rng.below(20) {
        0..=8 => 6,
        9..=15 => 17,
        16..=18 => {
            if v4 {
                1
            } else {
                58
            }
        }
        _ => rng.byte(),
    };
    let (src, dst, sport, dport): (IpAddr, IpAddr, u16, u16) = match (direction, v4) {
        (0 | 1, true) => (
            CLIENT4.into(),
            VIP4.into(),
            1024 + rng.below(200) as u16,
            VIP4_PORTS[rng.below(3) as usize],
        ),
        (0 | 1, false) => (
            CLIENT6.into(),
            VIP6.into(),
            1024 + rng.below(200) as u16,
            [80, 53][rng.below(2) as usize],
        ),
        (2, true) => (
            B1_4.into(),
            LOCAL4.into(),
            [8080, 5353][rng.below(2) as usize],
            20_000 + rng.below(100) as u16,
        ),
        (2, false) => (
            B1_6.into(),
            LOCAL6.into(),
            8080,
            20_000 + rng.below(100) as u16,
        ),
        (_, true) => (
            Ipv4Addr::from(rng.next() as u32).into(),
            Ipv4Addr::from(rng.next() as u32).into(),
            rng.next() as u16,
            rng.next() as u16,
        ),
        (_, false) => (
            Ipv6Addr::from(u128::from(rng.next()) << 64 | u128::from(rng.next())).into(),
            Ipv6Addr::from(u128::from(rng.next()) << 64 | u128::from(rng.next())).into(),
            rng.next() as u16,
            rng.next() as u16,
        ),
    };
    let l4 = l4(rng, src, dst, protocol, sport, dport);
    let (ip, ethertype) = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let opts = if rng.percent(20) {
                let n = 4 * (1 + rng.below(10) as usize);
                rng.bytes(n)
            } else {
                Vec::new()
            };
            let frag = if rng.percent(85) {
                0x4000
            } else {
                rng.next() as u16
            };
            let h = packet::V4 {
                tos: rng.byte(),
                id: rng.next() as u16,
                frag,
                ttl: rng.byte(),
            };
            (packet::ipv4(s, d, protocol, h, &opts, &l4), packet::ETH_IP)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            // Extension headers (8 bytes each) before the L4 header.
            let mut payload = l4.clone();
            let mut next = protocol;
            if rng.percent(25) {
                for _ in 0..1 + rng.below(3) {
                    let kind = [0u8, 43, 44, 60][rng.below(4) as usize];
                    let mut ext = vec![next, 0];
                    ext.extend_from_slice(&rng.bytes(6));
                    ext.extend_from_slice(&payload);
                    payload = ext;
                    next = kind;
                }
            }
            (
                packet::ipv6(s, d, next, 0x6000_0000, rng.byte(), &payload),
                packet::ETH_IPV6,
            )
        }
        _ => unreachable!("one family per case"),
    };
    let ingress_is_client = match direction {
        0 | 1 => true,
        2 => false,
        _ => rng.percent(50),
    };
    let (dmac, smac) = if ingress_is_client {
        (VC_MAC, CLIENT_MAC)
    } else {
        (VB_MAC, B1_MAC)
    };
    let mut frame = match rng.below(10) {
        0..=6 => packet::eth(dmac, smac, None, ethertype, &ip),
        7 | 8 => packet::eth(dmac, smac, Some(rng.next() as u16 & 0x0fff), ethertype, &ip),
        _ => {
            // Two tags (QinQ).
            let inner = packet::eth(dmac, smac, Some(7), ethertype, &ip);
            let mut f = inner[..12].to_vec();
            f.extend_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&(rng.next() as u16 & 0x0fff).to_be_bytes());
            f.extend_from_slice(&inner[12..]);
            f
        }
    };
    let flow = (direction < 2 && (protocol == 6 || protocol == 17))
        .then(|| flow(src, sport, dst, dport, protocol));
    // BPF_PROG_TEST_RUN takes no frame shorter than an Ethernet header.
    let truncated = rng.percent(15) && frame.len() > 15;
    if truncated {
        let keep = 14 + rng.below(frame.len() as u64 - 14) as usize;
        frame.truncate(keep);
    }
    Case {
        frame,
        ingress_is_client,
        flow,
        truncated,
    }
}

/// Where the IP header starts (after 0-2 VLAN tags) and its EtherType.
fn l3(frame: &[u8]) -> Option<(usize, u16)> {
    let mut at = 12;
    let mut ethertype = u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]);
    while ethertype == 0x8100 {
        at += 4;
        ethertype = u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]);
    }
    Some((at + 2, ethertype))
}

/// Why a frame the program sent on is not a well-formed packet: IP lengths that do not
/// match the frame, or a wrong IPv4 header, TCP or UDP checksum (of an encapsulated
/// packet too). `None` when it is sound.
fn unsound(frame: &[u8]) -> Option<String> {
    let (at, ethertype) = l3(frame)?;
    let ip = &frame[at..];
    let len = match ethertype {
        packet::ETH_IP => u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]) as usize,
        packet::ETH_IPV6 => 40 + u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]) as usize,
        other => return Some(format!("sent on with EtherType {other:#06x}")),
    };
    if len != ip.len() {
        return Some(format!("IP length {len} but {} bytes after L2", ip.len()));
    }
    std::panic::catch_unwind(|| packet::assert_checksums(frame, "fuzz"))
        .err()
        .map(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "a checksum check failed".into())
        })
}

fn stats(lab: &Lab) -> Vec<u64> {
    (0..lb_common::STATS_LEN)
        .map(|i| {
            lab.stats
                .get(&i, 0)
                .map(|v| v.iter().sum::<u64>())
                .unwrap_or(0)
        })
        .collect()
}

#[test]
fn every_generated_frame_gets_exactly_one_outcome_and_nothing_broken_leaves() {
    let Some(mut lab) = lab("fuzz") else {
        return;
    };
    let frames: u64 = std::env::var("LB_FUZZ_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let seed: u64 = std::env::var("LB_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x6c62_2d66_757a_7a31);
    // TCP and UDP NAT on VIP4, TCP NAT on VIP6, TCP and UDP DSR.
    lab.backend(0, B1_4.into(), 8080);
    lab.backend(1, B1_4.into(), 5353);
    lab.backend(2, B1_6.into(), 8080);
    lab.backend(3, B1_4.into(), 443);
    lab.backend(4, B1_6.into(), 53);
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0]);
    lab.service(1, VIP4.into(), 53, IPPROTO_UDP, MODE_NAT, &[1]);
    lab.service(2, VIP6.into(), 80, IPPROTO_TCP, MODE_NAT, &[2]);
    lab.service(3, VIP4.into(), 443, IPPROTO_TCP, MODE_DSR, &[3]);
    lab.service(4, VIP6.into(), 53, IPPROTO_UDP, MODE_DSR, &[4]);
    let packets = Stat::Packets as usize;
    let side = Stat::CtMissNonSyn as usize;
    let mut rng = Rng(seed | 1);
    let mut before = stats(&lab);
    let mut outcomes = std::collections::BTreeMap::<&str, u64>::new();
    for n in 0..frames {
        let c = case(&mut rng);
        let fail = |why: String| -> ! {
            panic!(
                "fuzz seed {seed} frame {n} ({} bytes, {}): {why}\n{:02x?}",
                c.frame.len(),
                if c.truncated { "truncated" } else { "whole" },
                c.frame
            )
        };
        let tracked_before = c.flow.is_some_and(|k| lab.conntrack.get(&k, 0).is_ok());
        let ingress = if c.ingress_is_client { lab.vc } else { lab.vb };
        let Some((action, out)) = lab.try_run(PROG_BALANCER, ingress, &c.frame) else {
            // No socket buffer can be built from it: the program never ran (tc lab only).
            *outcomes.entry("no socket buffer (not run)").or_default() += 1;
            continue;
        };
        let after = stats(&lab);
        let changed: Vec<usize> = (0..after.len())
            .filter(|&i| i != packets && i != side && after[i] != before[i])
            .collect();
        if after[packets] != before[packets] + 1 {
            fail("`packets` did not count it once".into());
        }
        match changed.as_slice() {
            [i] if after[*i] == before[*i] + 1 => {
                *outcomes.entry(Stat::ALL[*i].name()).or_default() += 1;
            }
            _ => fail(format!(
                "not exactly one outcome counter went up by one: {:?}",
                changed
                    .iter()
                    .map(|&i| (Stat::ALL[i].name(), after[i] - before[i]))
                    .collect::<Vec<_>>()
            )),
        }
        before = after;
        match action {
            XDP_PASS => {
                if out != c.frame {
                    fail("a passed frame was changed".into());
                }
            }
            XDP_TX | XDP_REDIRECT => {
                if c.truncated {
                    fail(format!(
                        "a truncated frame was sent on ({})",
                        action_name(action)
                    ));
                }
                if let Some(why) = unsound(&out) {
                    fail(format!(
                        "sent on ({}) but unsound: {why}",
                        action_name(action)
                    ));
                }
            }
            XDP_DROP => {}
            other => fail(format!("unknown action {other}")),
        }
        if matches!(action, XDP_PASS | XDP_DROP) && !tracked_before {
            if let Some(k) = c.flow {
                if lab.conntrack.get(&k, 0).is_ok() {
                    fail(format!(
                        "{} but it opened a conntrack entry",
                        action_name(action)
                    ));
                }
            }
        }
    }
    eprintln!("fuzz: seed {seed}, {frames} frames, outcomes {outcomes:?}");
    assert!(
        outcomes.len() >= 8,
        "the generator reached only {} outcomes: {outcomes:?}",
        outcomes.len()
    );
}
