//! Internet checksums (RFC 1071) and their incremental update (RFC 1624, eqn. 3:
//! `HC' = ~(~HC + ~m + m')`).
//!
//! Every value here is taken as it lies in the packet, in memory order (a `u16` loaded from
//! the packet, an address word as `lb_common::FlowKey` stores it). One's-complement sums do
//! not depend on byte order as long as every operand uses the same one, so nothing is swapped.

/// Folds a 32-bit one's-complement accumulator into 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Adds the two 16-bit halves of an address word to `acc`.
#[inline(always)]
fn add32(acc: u32, word: u32) -> u32 {
    acc + (word & 0xffff) + (word >> 16)
}

/// Incremental update of `check` (a stored checksum, as in the header) for 16-bit fields
/// changing from `old` to `new`, given as (old, new) words of an address or port.
#[inline(always)]
pub fn replace16(check: u16, old: u16, new: u16) -> u16 {
    let acc = (!check as u32) + (!old as u32) + new as u32;
    !fold(acc)
}

/// Incremental update of `check` for an address of `words` 32-bit words changing from `old`
/// to `new` (IPv4: 1 word, IPv6: 4; unused words must be equal in both, e.g. zero).
#[inline(always)]
pub fn replace_addr(check: u16, old: &[u32; 4], new: &[u32; 4]) -> u16 {
    let mut acc = !check as u32;
    let mut i = 0;
    while i < 4 {
        acc = add32(acc, !old[i]);
        acc = add32(acc, new[i]);
        // Keep the accumulator from overflowing 32 bits across the words.
        acc = fold(acc) as u32;
        i += 1;
    }
    !fold(acc)
}

/// The IPv4 header checksum of a 20-byte header without options, given as ten memory-order
/// `u16`s with the checksum field (index 5) ignored.
#[inline(always)]
pub fn ipv4_header(words: &[u16; 10]) -> u16 {
    let mut acc = 0u32;
    let mut i = 0;
    while i < 10 {
        if i != 5 {
            acc += words[i] as u32;
        }
        i += 1;
    }
    !fold(acc)
}

/// The one's-complement sum, folded, of the pseudo-header (RFC 9293 §3.1, RFC 8200 §8.1) of a
/// bare 20-byte TCP segment from `src` to `dst` (address words; IPv4 leaves words 1..4
/// zero). The length and protocol sum the same way for IPv4 and IPv6.
#[inline(always)]
pub fn tcp_bare_pseudo(src: &[u32; 4], dst: &[u32; 4]) -> u32 {
    let mut acc = (20u16.to_be() as u32) + (6u16.to_be() as u32);
    let mut i = 0;
    while i < 4 {
        acc = add32(acc, src[i]);
        acc = add32(acc, dst[i]);
        acc = fold(acc) as u32;
        i += 1;
    }
    acc
}

/// The one's-complement sum, folded, of a 20-byte TCP header without options (ten
/// memory-order `u16`s) with its checksum field (index 8) taken as 0.
#[inline(always)]
pub fn tcp_bare_header(header: &[u16; 10]) -> u32 {
    let mut acc = 0u32;
    let mut i = 0;
    while i < 10 {
        if i != 8 {
            acc += header[i] as u32;
        }
        i += 1;
    }
    fold(acc) as u32
}

/// `a - b` for two folded one's-complement sums (`b` a part of the bytes `a` sums), folded.
#[inline(always)]
pub fn sub(a: u32, b: u32) -> u32 {
    fold(a + (!(b as u16)) as u32) as u32
}

/// A UDP checksum that computes to 0 is sent as 0xffff (RFC 768): 0 means "no checksum".
#[inline(always)]
pub fn udp_nonzero(check: u16) -> u16 {
    if check == 0 {
        0xffff
    } else {
        check
    }
}

/// The change of an address of 4 words from `old` to `new` as one's-complement difference
/// (`~old + new`, RFC 1624 eqn. 3), folded to 16 bits, for [`add_diff`] or a kernel checksum
/// helper. Unused words must be equal in both (e.g. zero).
#[inline(always)]
pub fn diff_addr(old: &[u32; 4], new: &[u32; 4]) -> u32 {
    let mut acc = 0u32;
    let mut i = 0;
    while i < 4 {
        acc = add32(acc, !old[i]);
        acc = add32(acc, new[i]);
        acc = fold(acc) as u32;
        i += 1;
    }
    acc
}

/// The change of a 16-bit field from `old` to `new` as a folded one's-complement difference.
#[inline(always)]
pub fn diff16(old: u16, new: u16) -> u32 {
    fold(!old as u32 + new as u32) as u32
}

/// Two folded differences as one.
#[inline(always)]
pub fn sum(a: u32, b: u32) -> u32 {
    fold(a + b) as u32
}

/// `check` (a stored checksum) updated by the folded difference `diff`.
#[inline(always)]
pub fn add_diff(check: u16, diff: u32) -> u16 {
    !fold(!check as u32 + diff)
}
