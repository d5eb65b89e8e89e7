//! The flow's 5-tuple and the hash both data planes use to place a new flow in a Maglev table.

/// A flow's 5-tuple as the packet carries it.
///
/// Addresses are stored as four 32-bit words holding the address bytes in network order
/// (`u32::from_ne_bytes` of each 4-byte group), so the value matches what the BPF program
/// copies straight out of the IP header. An IPv4 address fills `[0]` and leaves `[1..4]`
/// zero, and `family` tells the two apart (an IPv4 key is never equal to the key of an IPv6
/// address whose last 96 bits are zero). Ports are in host byte order. `_pad` must be zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Client (source) address, see the type's docs for the layout.
    pub src_addr: [u32; 4],
    /// VIP (destination) address, same layout.
    pub dst_addr: [u32; 4],
    /// Client (source) port, host byte order.
    pub src_port: u16,
    /// VIP (destination) port, host byte order.
    pub dst_port: u16,
    /// IP protocol number: 6 for TCP, 17 for UDP.
    pub protocol: u8,
    /// The addresses' family, [`FAMILY_V4`](crate::maps::FAMILY_V4) or
    /// [`FAMILY_V6`](crate::maps::FAMILY_V6). Not hashed by [`flow_hash`]: a service has one
    /// family, so it places no flow differently.
    pub family: u8,
    /// Explicit padding; always zero.
    pub _pad: [u8; 2],
}

/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;

/// Seed of [`flow_hash`]. Every balancer host must use the same one so that they agree on
/// where a flow goes; changing it moves every flow that conntrack does not pin.
pub const FLOW_HASH_SEED: u32 = 0x5bd1_e995;

#[inline(always)]
fn mix(h: u32, word: u32) -> u32 {
    // One MurmurHash3 (x86_32) block step.
    let mut k = word.wrapping_mul(0xcc9e_2d51);
    k = k.rotate_left(15);
    k = k.wrapping_mul(0x1b87_3593);
    let h = (h ^ k).rotate_left(13);
    h.wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn finish(mut h: u32, len: u32) -> u32 {
    // MurmurHash3's fmix32: every input bit affects every output bit.
    h ^= len;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hashes a flow's 5-tuple to 32 bits: MurmurHash3 (x86_32) over the ten 32-bit words of
/// the key, seeded with [`FLOW_HASH_SEED`].
///
/// A fixed number of steps with no loop over data-dependent lengths, so the BPF verifier
/// accepts it as is. The daemon and the BPF program both call this one function: a
/// userspace test pins its output for known inputs, so a change to it cannot go unnoticed.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    hash_words(
        &[
            key.src_addr[0],
            key.src_addr[1],
            key.src_addr[2],
            key.src_addr[3],
            key.dst_addr[0],
            key.dst_addr[1],
            key.dst_addr[2],
            key.dst_addr[3],
            (key.src_port as u32) << 16 | key.dst_port as u32,
            key.protocol as u32,
        ],
        FLOW_HASH_SEED,
    )
}

/// Hashes only the client address of a flow, for the `source_hash` scheduler: every
/// connection from one client address lands on the same backend while the set is stable.
#[inline(always)]
pub fn source_hash(key: &FlowKey) -> u32 {
    hash_words(&key.src_addr, FLOW_HASH_SEED)
}

#[inline(always)]
fn hash_words<const N: usize>(words: &[u32; N], seed: u32) -> u32 {
    let mut h = seed;
    let mut i = 0;
    while i < N {
        h = mix(h, words[i]);
        i += 1;
    }
    finish(h, (N * 4) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, protocol: u8) -> FlowKey {
        FlowKey {
            src_addr: [u32::from_ne_bytes(src), 0, 0, 0],
            dst_addr: [u32::from_ne_bytes(dst), 0, 0, 0],
            src_port: sport,
            dst_port: dport,
            protocol,
            family: crate::maps::FAMILY_V4,
            _pad: [0; 2],
        }
    }

    #[test]
    fn flow_hash_output_is_pinned() {
        // These values are the contract between lb-daemon and lb-ebpf, and between balancer
        // hosts running different builds: if this test changes, every unpinned flow moves.
        let a = v4([10, 0, 0, 1], 40000, [192, 0, 2, 10], 80, IPPROTO_TCP);
        let b = v4([10, 0, 0, 2], 40000, [192, 0, 2, 10], 80, IPPROTO_TCP);
        let c = v4([10, 0, 0, 1], 40000, [192, 0, 2, 10], 53, IPPROTO_UDP);
        let pinned = [flow_hash(&a), flow_hash(&b), flow_hash(&c), source_hash(&a)];
        assert_eq!(pinned, PINNED, "flow_hash changed: {pinned:#010x?}");
    }

    #[test]
    fn flow_hash_depends_on_every_field() {
        let base = v4([10, 0, 0, 1], 40000, [192, 0, 2, 10], 80, IPPROTO_TCP);
        let h = flow_hash(&base);
        let mut k = base;
        k.src_port += 1;
        assert_ne!(flow_hash(&k), h, "source port ignored");
        let mut k = base;
        k.dst_port += 1;
        assert_ne!(flow_hash(&k), h, "destination port ignored");
        let mut k = base;
        k.protocol = IPPROTO_UDP;
        assert_ne!(flow_hash(&k), h, "protocol ignored");
        let mut k = base;
        k.src_addr[3] = 1;
        assert_ne!(flow_hash(&k), h, "last IPv6 word ignored");
        let mut k = base;
        k.src_port += 1;
        assert_eq!(
            source_hash(&k),
            source_hash(&base),
            "source_hash must ignore ports"
        );
    }

    const PINNED: [u32; 4] = [0x62e4_32b6, 0x6e4c_49f5, 0x4a78_578b, 0x2f9e_bae7];
}
