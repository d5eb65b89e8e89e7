//! Whether the kernel forwards on an interface. The eBPF programs pick each packet's next
//! hop with `bpf_fib_lookup`, an input-route lookup from the interface the packet came in
//! on, which fails (`BPF_FIB_LKUP_RET_FWD_DISABLED`, counted as `drop_forwarding_disabled`)
//! while forwarding is off there: `net.ipv4.conf.<if>.forwarding` (set for every interface
//! by `net.ipv4.ip_forward`) or `net.ipv6.conf.<if>.forwarding`. Off is the default of a
//! host and of a new network namespace, so a service placed on the eBPF plane there would
//! drop every packet; placement reads the setting first.

use std::path::{Path, PathBuf};

/// Why the kernel cannot be shown to forward on an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotForwarding {
    /// The sysctl `key` (e.g. `net.ipv4.conf.l0.forwarding`) is 0.
    Off {
        /// The sysctl that turns it on.
        key: String,
    },
    /// `/proc/sys/net` cannot be read (a sandbox that hides it): forwarding is unknown.
    Unreadable {
        /// The sysctl that could not be read.
        key: String,
        /// Why.
        error: String,
    },
}

/// Whether the kernel forwards on `interface` (IPv6 when `ipv6`): `None` when it does, or
/// when the interface does not exist (the attach names that error); `Some` with the sysctl
/// when it is off or cannot be read.
pub fn check(interface: &str, ipv6: bool) -> Option<NotForwarding> {
    let family = if ipv6 { "ipv6" } else { "ipv4" };
    let conf: PathBuf = ["/proc/sys/net", family, "conf"].iter().collect();
    let key = format!("net.{family}.conf.{interface}.forwarding");
    match std::fs::read_to_string(conf.join(interface).join("forwarding")) {
        Ok(value) if value.trim() == "0" => Some(NotForwarding::Off { key }),
        Ok(_) => None,
        Err(_) if is_dir(&conf) => None,
        Err(e) => Some(NotForwarding::Unreadable {
            key,
            error: e.to_string(),
        }),
    }
}

fn is_dir(path: &Path) -> bool {
    path.is_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interface_that_does_not_exist_is_left_to_the_attach() {
        assert_eq!(check("no-such-if-0", false), None);
        assert_eq!(check("no-such-if-0", true), None);
    }

    #[test]
    fn the_key_names_the_family_and_the_interface() {
        // Whatever this host's setting, a reading of "0" names this key.
        if let Some(NotForwarding::Off { key }) = check("lo", false) {
            assert_eq!(key, "net.ipv4.conf.lo.forwarding");
        }
    }
}
