//! Interfaces deleted and made again under the same name: a container network's bridge that
//! `docker compose down` and `up` made anew, a card whose driver was reloaded, a bond or VLAN
//! a network manager rebuilt. The kernel takes a program off with its device, and the new
//! device (another index) has none: without `lb_tc` on a backend bridge, NAT replies reach
//! the host's stack, which answers them with resets, and on the client's side a VIP's packets
//! are routed by the host instead of balanced. So the daemon looks each attached interface up
//! by name every [`FOLLOW_EVERY`] (and a reload placing a service on it looks first) and,
//! when the index changed, attaches the program again at the same hook, as at placement
//! (peer redirect, bridge watch and `DEVMAP` entry included; XDP native where it attaches, so
//! a generic attachment may come back native). Flows go on: conntrack, the tables and the
//! SNAT ports are in the maps, not on the device.
//!
//! An interface that comes back with the same index is taken as the same device (renamed
//! away and back, which keeps its program) and not attached twice. A device that carries no
//! Ethernet frames (a tun or WireGuard device under the old name) does not get the program,
//! which would misread its packets. A re-attach that fails, or is refused so, is logged as an
//! error, and the interface no longer counts as attached: it is not followed any more, and
//! the next placement that names it (a reload) attaches afresh or fails saying why, instead of
//! taking it for attached. Interfaces are
//! followed as long as the program is attached to them, which is until exit, also after the
//! last service that named one is gone.

use std::time::Duration;

use tracing::{error, info, warn};

use super::iface_kind::{self, InterfaceKind};
use super::{loader, lock, AttachMode, HookRequest, XdpPlane};

/// How often the interfaces are looked up by name: the longest a re-made interface runs
/// without the program, besides the attach itself.
pub const FOLLOW_EVERY: Duration = Duration::from_secs(1);

impl XdpPlane {
    /// Looks up each interface the program is attached to by name, and attaches the program
    /// again to one whose index changed since (the device was deleted and another made under
    /// its name). Logs an interface gone (once) and each attach, or why it failed. Blocks
    /// while the kernel attaches: call it from a blocking context.
    pub fn follow_interfaces(&mut self) {
        let names: Vec<String> = self.attached.keys().cloned().collect();
        for name in names {
            let now = loader::if_index(&name);
            let Some(a) = self.attached.get_mut(&name) else {
                continue;
            };
            match now {
                None if !a.gone => {
                    a.gone = true;
                    warn!(
                        "eBPF: {name} is gone (it was index {}); {} goes on the next interface \
                         of that name",
                        a.ifindex,
                        a.mode.program()
                    );
                }
                None => {}
                Some(index) if index == a.ifindex && a.gone => {
                    a.gone = false;
                    info!("eBPF: {name} is back with the same index, its program still on it");
                }
                Some(index) if index == a.ifindex => {}
                Some(index) => self.attach_again(&name, index),
            }
        }
    }

    /// Attaches the program again to `name`, now the device with index `ifindex`, at the hook
    /// it had; the old link (its device is gone, the kernel detached it) and its pin are let
    /// go. When it cannot, `name` leaves `attached` (logged).
    pub(super) fn attach_again(&mut self, name: &str, ifindex: u32) {
        let Some(a) = self.attached.get_mut(name) else {
            return;
        };
        let was = a.ifindex;
        let mode = a.mode;
        let old = a.link.take();
        a.ifindex = ifindex;
        a.gone = false;
        // Closing a detached link's fd frees it; its pin goes too (`pin_link` replaces only
        // the pin of the mode the new link gets).
        self.pinned_links.remove(name);
        if let Some(pin) = self.pins.as_ref().and_then(|p| p.link_path(name, mode)) {
            let _ = std::fs::remove_file(pin);
        }
        if let Some(link) = old {
            // Whatever the kernel says of a link whose device is gone, aya forgets it.
            let _ = self.detach(link);
        }
        // Watched again below if the new device is a bridge too.
        lock(&self.state).bridges.remove(name);
        if let Ok(kind @ InterfaceKind::NotEthernet { .. }) = iface_kind::kind_of(name) {
            error!(
                "eBPF: {name} was made again (index {ifindex}, was {was}) as {kind}, which \
                 carries no Ethernet frames: {} is not attached to it",
                mode.program()
            );
            self.attached.remove(name);
            return;
        }
        let attached = self
            .attach_one(name, ifindex, hook_of(mode))
            .map(|(now, link)| (now, self.pin_link(name, now, link)));
        match attached {
            Ok((now, link)) => {
                if let Some(a) = self.attached.get_mut(name) {
                    a.mode = now;
                    a.link = link;
                }
                // A backend whose route left with the old device (to a default route, say)
                // comes back to its table at the next poll, not up to REPLIES_EVERY later.
                let at = std::time::Instant::now();
                for r in &mut lock(&self.state).running {
                    r.slot.ask_replies_soon(at);
                }
                info!(
                    "eBPF: {name} was made again (index {ifindex}, was {was}): {} attached to it \
                     again ({now})",
                    now.program()
                );
            }
            Err(e) => {
                error!(
                    "eBPF: {name} was made again (index {ifindex}, was {was}), and {} cannot be \
                     attached to it: {e}; its packets reach the host's stack, not the balancer",
                    mode.program()
                );
                self.attached.remove(name);
            }
        }
    }
}

/// The hook a service asked for where the program went on as `mode`: the same again.
fn hook_of(mode: AttachMode) -> HookRequest {
    match mode {
        AttachMode::Tcx | AttachMode::Clsact => HookRequest::Tc,
        AttachMode::Native => HookRequest::Xdp {
            allow_generic: false,
        },
        AttachMode::Generic => HookRequest::Xdp {
            allow_generic: true,
        },
    }
}
