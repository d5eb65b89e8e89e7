//! What lb's tc paths need beyond the shared topology, set up before their daemon starts and
//! undone after it stops, and the CPU time of the tc program itself.
//!
//! Unlike XDP (`crate::xdp`) the tc program asks nothing of its neighbours: no change of tx
//! checksum offload, no program on the veth peers, GSO packets stay whole. What remains is
//! what DSR itself needs, set up as for the XDP DSR path:
//! - `lb-daemon decap --hook tc` on every backend's `b0` (the documented decapsulator for a
//!   veth: the backend strips the outer header of the balancer's tunnels and answers from the
//!   VIP; at tc, so the balancer's veth keeps GSO, which an XDP program on `b0` would take);
//! - MTU 1600 on the balancer's links to the backends (the veths, or the bridge and its ports)
//!   and on the backends' `b0`, for the 20-byte outer header.
//!
//! NAT needs nothing. The balancer's CPU for tc is softirq time; the part spent in `lb_tc`
//! itself is read from the kernel's BPF run-time statistics of the programs the daemon holds
//! ([`TcSetup::program_time`]).

use std::collections::BTreeSet;

use lb_tests::xdp::{Decap, Mode, DSR_BACKEND_MTU};

use crate::program_time::ProgramTime;
use crate::topology::{Network, Topology};
use crate::xdp::quietly;

/// The MTU the topology's links have outside the DSR runs.
const NORMAL_MTU: u32 = 1500;

/// The tc-only set-up of one run; undone on drop (drop the daemon first).
pub struct TcSetup<'a> {
    topo: &'a Topology,
    mode: Mode,
    decaps: Vec<Decap>,
}

impl<'a> TcSetup<'a> {
    /// Applies what `mode` needs on `topo`, with `object` the BPF object for the DSR
    /// decapsulators. `Err(reason)` (with whatever was applied undone) when a step fails.
    pub fn start(topo: &'a Topology, mode: Mode, object: &std::path::Path) -> Result<Self, String> {
        let mut setup = TcSetup {
            topo,
            mode,
            decaps: Vec::new(),
        };
        if mode == Mode::Dsr {
            setup.backend_mtu(DSR_BACKEND_MTU)?;
            // The balancer's DSR tunnels leave from its `local_address`, the VIP (balancer.rs).
            let from = [std::net::IpAddr::V4(crate::topology::VIP)];
            for b in &topo.backends {
                // Decap::start ties the decapsulator's life to the calling thread
                // (PR_SET_PDEATHSIG): the harness's main thread, which outlives the run.
                setup
                    .decaps
                    .push(quietly(|| Decap::start_at("tc", b, "b0", object, &from))?);
            }
        }
        Ok(setup)
    }

    /// Sets `mtu` on every link between the balancer and the backends, both ends.
    fn backend_mtu(&self, mtu: u32) -> Result<(), String> {
        let mtu = mtu.to_string();
        let n = self.topo.backends.len();
        let mut balancer_side: Vec<String> = match self.topo.network {
            Network::Veth => (1..=n).map(|i| format!("l{i}")).collect(),
            // A bridge's MTU follows its ports' unless set; set both, ports first.
            Network::Bridge => (1..=n).map(|i| format!("p{i}")).collect(),
        };
        if self.topo.network == Network::Bridge {
            balancer_side.push("br0".into());
        }
        for dev in &balancer_side {
            self.topo
                .balancer
                .ip(&["link", "set", dev, "mtu", &mtu])
                .map_err(|e| format!("MTU {mtu} on {dev}: {e}"))?;
        }
        for b in &self.topo.backends {
            b.ip(&["link", "set", "b0", "mtu", &mtu])
                .map_err(|e| format!("MTU {mtu} on b0: {e}"))?;
        }
        Ok(())
    }

    /// The run time and run count of the BPF programs that the process `pid` (the daemon)
    /// holds open: the kernel's `run_time_ns` and `run_cnt` of each, which for the tc paths
    /// is `lb_tc` on every interface it is attached to; they advance only while statistics
    /// are on ([`crate::program_time::StatsOn`]). `Err(reason)` when the process holds no
    /// program.
    ///
    /// This is the time inside the program only: the redirect and the delivery to the next
    /// namespace run in softirq outside it, which `/proc/stat` shows machine-wide only.
    pub fn program_time(&self, pid: u32) -> Result<ProgramTime, String> {
        Ok(ProgramTime::of(&programs_held_by(pid)?))
    }
}

impl Drop for TcSetup<'_> {
    fn drop(&mut self) {
        self.decaps.clear();
        if self.mode == Mode::Dsr {
            if let Err(e) = self.backend_mtu(NORMAL_MTU) {
                eprintln!("lb-bench: restoring the backend links' MTU: {e}");
            }
        }
    }
}

/// The ids of the BPF programs process `pid` has open (`prog_id:` in the fdinfo of its
/// `anon_inode:bpf-prog` descriptors).
fn programs_held_by(pid: u32) -> Result<BTreeSet<u32>, String> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))?;
    let mut ids = BTreeSet::new();
    for entry in entries.flatten() {
        let is_prog = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy() == "anon_inode:bpf-prog");
        if !is_prog {
            continue;
        }
        let info = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
        if let Some(id) = std::fs::read_to_string(&info)
            .ok()
            .and_then(|text| prog_id(&text))
        {
            ids.insert(id);
        }
    }
    if ids.is_empty() {
        return Err(format!("process {pid} holds no BPF program"));
    }
    Ok(ids)
}

/// The `prog_id:` of a BPF program's fdinfo text.
fn prog_id(fdinfo: &str) -> Option<u32> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("prog_id:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_id_is_read_from_fdinfo() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nprog_type:\t3\n\
                    prog_jited:\t1\nprog_tag:\t0123456789abcdef\nmemlock:\t4096\nprog_id:\t312\n\
                    run_time_ns:\t0\nrun_cnt:\t0\n";
        assert_eq!(prog_id(text), Some(312));
        assert_eq!(prog_id("pos:\t0\n"), None, "a non-program fd has no id");
    }
}
