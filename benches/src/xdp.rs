//! What lb's XDP paths need beyond the shared topology, set up before their daemon starts and
//! undone after it stops, and the CPU time of the XDP program itself.
//!
//! The set-up is the end-to-end tests' (`lb_tests::xdp`), applied to the benchmark topology:
//! - transmit checksum offload off on the client's and the backends' veth ends: a local
//!   sender's partial checksum does not survive XDP's rewrite and redirect (this also turns
//!   off TSO on them, so their stacks send MTU-sized segments);
//! - `lb-daemon decap` on those ends: a veth delivers `XDP_REDIRECT`ed frames only when its
//!   peer has an XDP program, and DSR backends need it to strip the outer header;
//! - DSR: MTU 1600 on the balancer-to-backend veths for the 20-byte outer header;
//! - `direct-xdp-veth` (no balancer): `lb-daemon decap` on the balancer's veths too, where
//!   the daemon would attach `lb_xdp`, so that the kernel routes with XDP on every veth.
//!
//! Each is undone when the [`XdpSetup`] drops, so the other paths run on the topology as it
//! was. The balancer's CPU for XDP is softirq time; the part spent in `lb_xdp` itself is read
//! from the kernel's BPF run-time statistics (`BPF_ENABLE_STATS`), see
//! [`XdpSetup::program_time`].

use std::collections::BTreeSet;
use std::panic::{self, UnwindSafe};
use std::path::Path;

use lb_tests::xdp::{set_tx_checksum, Decap, Mode, DSR_BACKEND_MTU};

use crate::program_time::ProgramTime;
use crate::topology::Topology;

/// The MTU the topology's veths have outside the DSR runs.
const NORMAL_MTU: u32 = 1500;

/// Which XDP veth set-up a path runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpVeth {
    /// lb's XDP data plane in this mode (the daemon attaches `lb_xdp` in the balancer).
    Lb(Mode),
    /// No balancer: a pass-everything program (`lb-daemon decap`) on the balancer's veths
    /// too, so the kernel routes with XDP attached everywhere, as `direct` under XDP's
    /// conditions.
    Pass,
}

/// The XDP-only set-up of one run; undone on drop (drop the daemon first).
pub struct XdpSetup<'a> {
    topo: &'a Topology,
    kind: XdpVeth,
    decaps: Vec<Decap>,
}

impl<'a> XdpSetup<'a> {
    /// Applies the set-up `kind`, with `object` the BPF object for the decapsulators.
    /// `Err(reason)` (with whatever was applied undone) when a step fails.
    pub fn start(topo: &'a Topology, kind: XdpVeth, object: &Path) -> Result<XdpSetup<'a>, String> {
        let mut setup = XdpSetup {
            topo,
            kind,
            decaps: Vec::new(),
        };
        set_tx_checksum(&topo.client, "c0", false)
            .map_err(|e| format!("turning off tx checksum offload on c0: {e}"))?;
        for b in &topo.backends {
            set_tx_checksum(b, "b0", false)
                .map_err(|e| format!("turning off tx checksum offload on b0: {e}"))?;
        }
        if kind == XdpVeth::Lb(Mode::Dsr) {
            setup.backend_mtu(DSR_BACKEND_MTU)?;
        }
        // The balancer's DSR tunnels leave from its `local_address`, the VIP (see balancer.rs).
        let from = [std::net::IpAddr::V4(crate::topology::VIP)];
        // Decap::start ties the decapsulator's life to the calling thread (PR_SET_PDEATHSIG):
        // this is the harness's main thread, which outlives the run.
        setup
            .decaps
            .push(quietly(|| Decap::start(&topo.client, "c0", object, &from))?);
        for b in &topo.backends {
            setup
                .decaps
                .push(quietly(|| Decap::start(b, "b0", object, &from))?);
        }
        if kind == XdpVeth::Pass {
            // No balancer to attach lb_xdp: the same pass-everything program goes on the
            // balancer's own veths, so that the kernel routes with XDP on every veth, as
            // with lb's program there (a veth with an XDP program receives in NAPI, with
            // GRO).
            let ifaces = std::iter::once("l0".to_string()).chain(topo.network.backend_interfaces());
            for iface in ifaces {
                let decap = quietly(|| Decap::start(&topo.balancer, &iface, object, &from))?;
                // Generic XDP would make this reference slower than lb's native one.
                if decap.ready_line().contains("generic") {
                    return Err(format!(
                        "the pass program on {iface} went on in generic mode: {}",
                        decap.ready_line()
                    ));
                }
                setup.decaps.push(decap);
            }
        }
        Ok(setup)
    }

    fn backend_mtu(&self, mtu: u32) -> Result<(), String> {
        let mtu = mtu.to_string();
        for (i, b) in self.topo.backends.iter().enumerate() {
            let lb_if = format!("l{}", i + 1);
            self.topo
                .balancer
                .ip(&["link", "set", &lb_if, "mtu", &mtu])
                .map_err(|e| format!("MTU {mtu} on {lb_if}: {e}"))?;
            b.ip(&["link", "set", "b0", "mtu", &mtu])
                .map_err(|e| format!("MTU {mtu} on b0: {e}"))?;
        }
        Ok(())
    }

    /// The run time and run count of the XDP programs attached in the balancer namespace
    /// (the kernel's `run_time_ns` and `run_cnt` of each distinct program, counted once
    /// however many interfaces it is attached to); they advance only while statistics are on
    /// ([`crate::program_time::StatsOn`]). `Err(reason)` when no program is found.
    ///
    /// This is the time inside `lb_xdp` only: the redirect and the veth's delivery to the next
    /// namespace run in softirq outside it, which `/proc/stat` shows machine-wide only.
    pub fn program_time(&self) -> Result<ProgramTime, String> {
        Ok(ProgramTime::of(&attached_programs(self.topo)?))
    }
}

impl Drop for XdpSetup<'_> {
    fn drop(&mut self) {
        self.decaps.clear();
        if self.kind == XdpVeth::Lb(Mode::Dsr) {
            if let Err(e) = self.backend_mtu(NORMAL_MTU) {
                eprintln!("lb-bench: restoring the backend veths' MTU: {e}");
            }
        }
        let topo = self.topo;
        let ends = std::iter::once(&topo.client).chain(&topo.backends);
        for (ns, dev) in ends.zip(std::iter::once("c0").chain(std::iter::repeat("b0"))) {
            if let Err(e) = set_tx_checksum(ns, dev, true) {
                eprintln!("lb-bench: turning tx checksum offload back on: {e}");
            }
        }
    }
}

/// The ids of the XDP programs attached to the balancer's interfaces (`ip -j link`).
fn attached_programs(topo: &Topology) -> Result<BTreeSet<u32>, String> {
    let out = topo
        .balancer
        .run("ip", &["-j", "link", "show"])
        .map_err(|e| e.to_string())?;
    let links: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("`ip -j link`: {e}"))?;
    let mut ids = BTreeSet::new();
    for link in links.as_array().into_iter().flatten() {
        if let Some(xdp) = link.get("xdp") {
            collect_ids(xdp, &mut ids);
        }
    }
    if ids.is_empty() {
        return Err("no XDP program is attached in the balancer namespace".into());
    }
    Ok(ids)
}

/// Every `"id"` number under `v` (`ip` nests them as `prog.id` or `attached[].prog.id`).
fn collect_ids(v: &serde_json::Value, ids: &mut BTreeSet<u32>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
                    Some(id) if k == "id" => {
                        ids.insert(id);
                    }
                    _ => collect_ids(v, ids),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_ids(v, ids)),
        _ => {}
    }
}

/// Runs `f`, which reports failure by panicking (the test helpers do), and turns a panic into
/// `Err(message)` without printing it.
pub fn quietly<T>(f: impl FnOnce() -> T + UnwindSafe) -> Result<T, String> {
    let hook = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));
    let r = panic::catch_unwind(f);
    panic::set_hook(hook);
    r.map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "it panicked".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_ids_are_found_however_ip_nests_them() {
        let links: serde_json::Value = serde_json::from_str(
            r#"[{"ifname":"lo"},
                {"ifname":"l0","xdp":{"mode":1,"prog":{"id":41,"name":"lb_xdp","tag":"ab"}}},
                {"ifname":"l1","xdp":{"mode":4,"attached":[{"mode":1,"prog":{"id":41}},
                                                          {"mode":2,"prog":{"id":7}}]}}]"#,
        )
        .expect("valid JSON");
        let mut ids = BTreeSet::new();
        for l in links.as_array().expect("an array") {
            if let Some(x) = l.get("xdp") {
                collect_ids(x, &mut ids);
            }
        }
        assert_eq!(
            ids,
            BTreeSet::from([7, 41]),
            "each attached program is counted once"
        );
    }

    #[test]
    fn a_helper_panic_becomes_the_skip_reason() {
        let r: Result<(), String> = quietly(|| panic!("the BPF object is missing"));
        assert_eq!(r, Err("the BPF object is missing".to_string()));
        assert_eq!(quietly(|| 3), Ok(3));
    }
}
