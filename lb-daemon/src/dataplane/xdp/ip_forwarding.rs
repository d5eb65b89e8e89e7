//! Whether the kernel forwards on an interface. The eBPF programs pick each packet's next
//! hop with `bpf_fib_lookup`, an input-route lookup from the interface the packet came in
//! on, which fails (`BPF_FIB_LKUP_RET_FWD_DISABLED`, counted as `drop_forwarding_disabled`)
//! while forwarding is off there: `net.ipv4.conf.<if>.forwarding` (set for every interface
//! by `net.ipv4.ip_forward`) or `net.ipv6.conf.<if>.forwarding`. Off is the default of a
//! host and of a new network namespace, so a service placed on the eBPF plane there would
//! drop every packet; placement reads the setting first.

use std::path::PathBuf;

/// The sysctl that turns forwarding on for `interface` (IPv6 when `ipv6`), e.g.
/// `net.ipv4.conf.l0.forwarding`, if it is off now; `None` when it is on or cannot be read
/// (no such interface: the attach names that error).
pub fn off(interface: &str, ipv6: bool) -> Option<String> {
    let family = if ipv6 { "ipv6" } else { "ipv4" };
    let path: PathBuf = ["/proc/sys/net", family, "conf", interface, "forwarding"]
        .iter()
        .collect();
    let value = std::fs::read_to_string(path).ok()?;
    (value.trim() == "0").then(|| format!("net.{family}.conf.{interface}.forwarding"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interface_that_does_not_exist_is_not_said_to_be_off() {
        assert_eq!(off("no-such-if-0", false), None);
        assert_eq!(off("no-such-if-0", true), None);
    }

    #[test]
    fn the_key_names_the_family_and_the_interface() {
        // Whatever this host's setting, a reading of "0" names this key.
        if let Some(key) = off("lo", false) {
            assert_eq!(key, "net.ipv4.conf.lo.forwarding");
        }
    }
}
