//! The per-packet cost of lb's programs, `lb_xdp` and `lb_tc`, under BPF_PROG_TEST_RUN: the
//! kernel runs the program on a crafted frame and reports how long the run took, so the
//! figure is the program alone (no NIC, no stack, no system call).
//!
//! The lab is the packet tests' ([`lb_tests::xdp::testrun::Lab`]): the lb-ebpf object named by
//! `LB_EBPF_OBJ` loaded, its maps filled as the daemon fills them, a namespace with a client
//! side (`vc`) and a backend side (`vb`) for `bpf_fib_lookup` to route in. Two services: a NAT
//! one (VIP 10.0.0.10:80, two backends, the SNAT range widened to 1024-65535) and a DSR one
//! (port 81, one backend). The cases ([`Packet`]):
//!
//! - `new SYN`: a SYN of a flow the balancer has never seen (NAT: Maglev pick, conntrack
//!   insert, SNAT port claimed, rewrite, route), a fresh client port each packet;
//! - `established`: a client ACK of a NAT flow in conntrack (lookup, rewrite, route);
//! - `NAT reply`: the backend's ACK back to the client (reverse lookup, rewrite, route);
//! - `DSR encapsulation`: a client ACK of a DSR flow in conntrack, wrapped in IPIP;
//! - `passed`: an ARP frame, which the program hands to the kernel at once: the floor,
//!   mostly the kernel's own cost of one test run.
//!
//! "Route" is mostly the program's next-hop cache (`lb-ebpf/src/next_hop.rs`), as in traffic:
//! the case's first run fills it, and a full `bpf_fib_lookup` follows every 100 ms per CPU.
//!
//! Two figures per case:
//!
//! - **Fresh** (one packet per run, `repeat = 1`): the program on a cold start, as after
//!   the system call that starts the run; the figure is the kernel's `duration` of the run,
//!   which includes one pair of clock reads around the program. The `passed` case is
//!   measured both ways ([`Packet::PassedRepeated`] runs it with `repeat` = 1,000, valid
//!   there since nothing is rewritten): their difference is that per-run overhead.
//! - **Restored** ([`ProgramLab::run_restored`], `repeat` = [`RESTORED_REPEAT`]): the
//!   program warm, as a stream of packets finds it (the `repeat` form Katran's performance
//!   tests use).
//!   The kernel hands the *same* buffer to every repetition and lb's programs rewrite it in
//!   place (NAT addresses, an outer header for DSR), so a plain `repeat` would from the second
//!   repetition on time the program passing its own output. A harness
//!   ([`crate::restore`]) writes the case's frame back before each repetition and
//!   tail-calls the program; the last repetition's answer and frame must equal one plain
//!   run's. The harness's own cost is in every restored figure: the `passed` case's restored
//!   figure less its plain `repeat` one. The `new SYN` case has no restored form (a SYN is
//!   new once), nor has `lb_tc`'s DSR encapsulation: Linux (6.18 here) keeps the socket
//!   buffer marked as tunnelled after the harness strips the outer header, and refuses the
//!   next encapsulation (stripping it with `BPF_F_ADJ_ROOM_DECAP_L3_IPV4` does not clear that
//!   either: tried on 2026-12-05).

use std::net::IpAddr;
use std::os::fd::AsFd;
use std::time::Duration;

use aya::maps::{HashMap, MapData};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use lb_common::flow::IPPROTO_TCP;
use lb_common::maps::{MODE_DSR, MODE_NAT, PROG_BALANCER, PROG_TC};
use lb_common::FlowKey;
use lb_tests::packet::{l4_source_port, Packet as Frame, TCP_ACK, TCP_SYN};
use lb_tests::xdp::testrun::{
    Hook, Lab, B1_4, B1_MAC, B2_4, B2_MAC, CLIENT4, CLIENT_MAC, LOCAL4, VB_MAC, VC_MAC, VIP4,
};

use crate::restore::Harness;
use crate::xdp::quietly;

/// `XDP_PASS`, `XDP_REDIRECT`.
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
/// `TC_ACT_UNSPEC` (hand the packet on: the hook's next program, or the stack),
/// `TC_ACT_REDIRECT`.
const TC_ACT_UNSPEC: u32 = u32::MAX;
const TC_ACT_REDIRECT: u32 = 7;

/// New flows the `new SYN` case opens before the lab's conntrack and NAT maps are emptied
/// (outside the timed runs), so that SNAT ports never run out.
const NEW_FLOWS_BETWEEN_RESETS: u32 = 4096;
/// The repetitions of [`Packet::PassedRepeated`].
const PASSED_REPEAT: u32 = 1000;
/// The repetitions of one run with the frame restored ([`ProgramLab::run_restored`]).
pub const RESTORED_REPEAT: u32 = 1000;

/// The NAT service's port on the VIP.
const NAT_PORT: u16 = 80;
/// The DSR service's port on the VIP.
const DSR_PORT: u16 = 81;
/// The backends' port behind the NAT service.
const BACKEND_PORT: u16 = 8080;

/// One of lb's balancer programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// `lb_xdp`, the XDP program.
    Xdp,
    /// `lb_tc`, the tc program (a socket buffer at tc ingress).
    Tc,
}

impl Program {
    /// Both.
    pub const ALL: [Program; 2] = [Program::Xdp, Program::Tc];

    /// The program's name in the object.
    pub fn name(self) -> &'static str {
        match self {
            Program::Xdp => PROG_BALANCER,
            Program::Tc => PROG_TC,
        }
    }

    /// The hook the program runs at.
    fn hook(self) -> Hook {
        match self {
            Program::Xdp => Hook::Xdp,
            Program::Tc => Hook::Tc,
        }
    }

    /// What the program answers for a packet it forwards, and for one it hands to the stack.
    fn actions(self) -> (u32, u32) {
        match self {
            Program::Xdp => (XDP_REDIRECT, XDP_PASS),
            Program::Tc => (TC_ACT_REDIRECT, TC_ACT_UNSPEC),
        }
    }
}

/// A packet case (see the module's list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet {
    /// A SYN of a new NAT flow.
    NewSyn,
    /// A client packet of an established NAT flow.
    Established,
    /// A backend's reply on an established NAT flow.
    NatReply,
    /// A client packet of an established DSR flow, encapsulated.
    DsrEncap,
    /// An ARP frame, passed at once, one per run.
    Passed,
    /// The same, with `repeat` = 1,000 per run.
    PassedRepeated,
}

impl Packet {
    /// Every case, in report order.
    pub const ALL: [Packet; 6] = [
        Packet::NewSyn,
        Packet::Established,
        Packet::NatReply,
        Packet::DsrEncap,
        Packet::Passed,
        Packet::PassedRepeated,
    ];

    /// The case's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Packet::NewSyn => "new SYN (NAT)",
            Packet::Established => "established (NAT)",
            Packet::NatReply => "NAT reply",
            Packet::DsrEncap => "DSR encapsulation",
            Packet::Passed => "passed (ARP)",
            Packet::PassedRepeated => "passed (ARP), repeat 1000",
        }
    }
}

/// The flows a program's established cases run on: each program opens its own, so a case
/// measures the program's own conntrack entries.
#[derive(Debug, Clone)]
struct Flows {
    /// The client's ACK on the NAT flow.
    established: Vec<u8>,
    /// The backend's ACK back on it.
    reply: Vec<u8>,
    /// The client's ACK on the DSR flow.
    dsr: Vec<u8>,
}

/// The loaded object with its services, and the flows each program has opened.
pub struct ProgramLab {
    lab: Lab,
    /// Per program ([`Program::ALL`] order), once [`ProgramLab::prepare`] opened them.
    flows: [Option<Flows>; 2],
    /// The next client port of the `new SYN` case.
    next_port: u16,
    /// New flows since the maps were last emptied.
    new_flows: u32,
    /// The cases [`ProgramLab::prepare_restored`] made ready.
    restored: Vec<Restored>,
}

/// A case ready to run with its frame restored before every repetition.
struct Restored {
    program: Program,
    case: Packet,
    harness: Harness,
    /// The test run's context (see [`context`]).
    ctx: Vec<u8>,
    /// What one plain run of the case answers, and the frame it leaves.
    action: u32,
    expected: Vec<u8>,
}

impl ProgramLab {
    /// Loads the object named by `LB_EBPF_OBJ` (`lb_xdp` and `lb_tc` in it) and adds the two
    /// services. `Err(reason)` when not root, when `LB_EBPF_OBJ` is unset, or when
    /// the object does not load.
    pub fn new() -> Result<ProgramLab, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("BPF_PROG_TEST_RUN needs root (CAP_BPF, CAP_NET_ADMIN)".into());
        }
        // The lab loads lb_xdp, lb_decap and lb_tc (the verifier checks each).
        let lab = quietly(|| Lab::new(Hook::Xdp))?;
        let (nat_slots, dsr_slots) = ([0, 1, 0, 1, 0, 1, 1], [2, 2, 2]);
        let mut lab = lab;
        quietly(move || {
            lab.backend(0, B1_4.into(), BACKEND_PORT);
            lab.backend(1, B2_4.into(), BACKEND_PORT);
            lab.backend(2, B1_4.into(), 0);
            lab.service(0, VIP4.into(), NAT_PORT, IPPROTO_TCP, MODE_NAT, &nat_slots);
            lab.service(1, VIP4.into(), DSR_PORT, IPPROTO_TCP, MODE_DSR, &dsr_slots);
            lab
        })
        .and_then(|mut lab| {
            // The whole port range: the `new SYN` case opens thousands of flows between
            // resets, the lab's 100 ports would run out.
            let mut s = lab
                .services
                .get(&0, 0)
                .map_err(|e| format!("read SERVICES: {e}"))?;
            (s.snat_port_min, s.snat_port_max) = (1024, 65535);
            lab.services
                .set(0, s, 0)
                .map_err(|e| format!("write SERVICES: {e}"))?;
            Ok(ProgramLab {
                lab,
                flows: [None, None],
                next_port: 0,
                new_flows: 0,
                restored: Vec::new(),
            })
        })
    }

    /// `Err(reason)` when `program` is not in the loaded object.
    pub fn available(&self, program: Program) -> Result<(), String> {
        match self.lab.ebpf.program(program.name()) {
            Some(_) => Ok(()),
            None => Err(format!("the BPF object has no program {}", program.name())),
        }
    }

    /// Makes `case` ready to run through `program` (opens the flows its established cases
    /// run on, if not open yet) and runs it once to check the program answers as the case
    /// expects. `Err(reason)` when it does not, or the program cannot run.
    pub fn prepare(&mut self, program: Program, case: Packet) -> Result<(), String> {
        self.available(program)?;
        if matches!(
            case,
            Packet::Established | Packet::NatReply | Packet::DsrEncap
        ) {
            self.open_flows(program)?;
        }
        self.run(program, case).map(drop)
    }

    /// Runs one packet of `case` through `program` (for [`Packet::PassedRepeated`], one run
    /// of 1,000 repetitions) and returns the kernel's duration per packet. `Err` when the
    /// test run fails or the program answers otherwise than the case expects.
    pub fn run(&mut self, program: Program, case: Packet) -> Result<Duration, String> {
        let (frame, ingress, want) = self.case_frame(program, case)?;
        let repeat = match case {
            Packet::PassedRepeated => PASSED_REPEAT,
            _ => 1,
        };
        let (action, _, duration) = self.test_run(program, &frame, ingress, repeat)?;
        answered(program, case, action, want)?;
        Ok(duration)
    }

    /// Makes `case` ready to run through `program` with its frame restored before each of
    /// [`RESTORED_REPEAT`] repetitions ([`crate::restore`]): opens the flows, loads the
    /// harness, and checks that the last repetition answers with the action and the frame
    /// one plain run of the case gives. `Err(reason)` for a case that cannot repeat (a new
    /// SYN is new once; [`Packet::PassedRepeated`] repeats already), or when a check fails.
    pub fn prepare_restored(&mut self, program: Program, case: Packet) -> Result<(), String> {
        if matches!(case, Packet::NewSyn | Packet::PassedRepeated) {
            return Err(format!("{} has no restored form", case.name()));
        }
        if (program, case) == (Program::Tc, Packet::DsrEncap) {
            // Seen on Linux 6.18: every repetition after the first was dropped by lb_tc
            // (`DropAdjustHead`), the run's check catching it.
            return Err(
                "the kernel keeps a socket buffer marked as tunnelled after the \
                        harness strips the outer header, and refuses lb_tc's next \
                        encapsulation of it"
                    .into(),
            );
        }
        self.prepare(program, case)?;
        let (frame, ingress, want) = self.case_frame(program, case)?;
        let (action, expected, _) = self.test_run(program, &frame, ingress, 1)?;
        answered(program, case, action, want)?;
        let target = self
            .lab
            .ebpf
            .program(program.name())
            .ok_or_else(|| format!("the object has no program {}", program.name()))?
            .fd()
            .map_err(|e| format!("{}: {e}", program.name()))?
            .as_fd();
        let harness = Harness::new(program.hook(), &frame, target)
            .map_err(|e| format!("{} {}: {e}", program.name(), case.name()))?;
        let ctx = context(program, frame.len(), ingress);
        self.restored.push(Restored {
            program,
            case,
            harness,
            ctx,
            action,
            expected,
        });
        self.run_restored(program, case).map(drop)
    }

    /// One test run of [`RESTORED_REPEAT`] repetitions of `case` through `program`, the frame
    /// restored before each ([`ProgramLab::prepare_restored`] first): the kernel's duration
    /// per packet, the harness's restore and tail call included. `Err` when the test run
    /// fails, or its last repetition answers or leaves the frame otherwise than one plain
    /// run of the case.
    pub fn run_restored(&self, program: Program, case: Packet) -> Result<Duration, String> {
        let r = self
            .restored
            .iter()
            .find(|r| r.program == program && r.case == case)
            .ok_or_else(|| format!("{}: prepare_restored() first", case.name()))?;
        let out = self
            .lab
            .ns
            .enter(|| r.harness.run(&r.ctx, RESTORED_REPEAT))
            .map_err(|e| format!("entering the lab's namespace: {e}"))?
            .map_err(|e| format!("BPF_PROG_TEST_RUN of the restoring harness: {e}"))?;
        if out.action != r.action || out.frame != r.expected {
            return Err(format!(
                "{} through {}, restored: the last repetition answered {} with a {}-byte \
                 frame, one plain run {} with a {}-byte frame{}",
                case.name(),
                program.name(),
                out.action,
                out.frame.len(),
                r.action,
                r.expected.len(),
                if out.frame.len() == r.expected.len() {
                    " (bytes differ)"
                } else {
                    ""
                }
            ));
        }
        Ok(out.per_packet)
    }

    /// The frame of `case` for `program`, the interface it arrives on, and the action the
    /// program must answer.
    fn case_frame(
        &mut self,
        program: Program,
        case: Packet,
    ) -> Result<(Vec<u8>, u32, u32), String> {
        let (forwarded, passed) = program.actions();
        let flows = self.flows[program as usize]
            .clone()
            .ok_or_else(|| format!("{}: prepare() first", case.name()));
        Ok(match case {
            Packet::NewSyn => {
                if self.new_flows >= NEW_FLOWS_BETWEEN_RESETS {
                    self.reset()?;
                }
                self.new_flows += 1;
                self.next_port = self.next_port.wrapping_add(1).max(1024);
                let syn = Frame::tcp(
                    CLIENT4.into(),
                    self.next_port,
                    VIP4.into(),
                    NAT_PORT,
                    TCP_SYN,
                )
                .frame(VC_MAC, CLIENT_MAC);
                (syn, self.lab.vc, forwarded)
            }
            Packet::Established => (flows?.established, self.lab.vc, forwarded),
            Packet::NatReply => (flows?.reply, self.lab.vb, forwarded),
            Packet::DsrEncap => (flows?.dsr, self.lab.vc, forwarded),
            Packet::Passed | Packet::PassedRepeated => (arp(), self.lab.vc, passed),
        })
    }

    /// Opens `program`'s NAT and DSR flows (a SYN each) and builds the frames of its
    /// established cases.
    fn open_flows(&mut self, program: Program) -> Result<(), String> {
        if self.flows[program as usize].is_some() {
            return Ok(());
        }
        let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
        // Client ports of their own, below the `new SYN` case's range.
        let (nat_port, dsr_port) = match program {
            Program::Xdp => (100, 101),
            Program::Tc => (200, 201),
        };
        let syn = Frame::tcp(client, nat_port, vip, NAT_PORT, TCP_SYN).frame(VC_MAC, CLIENT_MAC);
        let (action, out, _) = self.test_run(program, &syn, self.lab.vc, 1)?;
        if action != program.actions().0 {
            return Err(format!(
                "{}: the SYN opening the NAT flow was answered {action}",
                program.name()
            ));
        }
        let snat = l4_source_port(&out);
        let key = lb_tests::xdp::testrun::flow(client, nat_port, vip, NAT_PORT, IPPROTO_TCP);
        let backend = conntrack_backend(&self.lab.conntrack, &key)?;
        let (b_addr, b_mac) = if backend == 0 {
            (B1_4, B1_MAC)
        } else {
            (B2_4, B2_MAC)
        };
        let established =
            Frame::tcp(client, nat_port, vip, NAT_PORT, TCP_ACK).frame(VC_MAC, CLIENT_MAC);
        let reply = Frame::tcp(b_addr.into(), BACKEND_PORT, LOCAL4.into(), snat, TCP_ACK)
            .frame(VB_MAC, b_mac);
        let dsr_syn =
            Frame::tcp(client, dsr_port, vip, DSR_PORT, TCP_SYN).frame(VC_MAC, CLIENT_MAC);
        let (action, _, _) = self.test_run(program, &dsr_syn, self.lab.vc, 1)?;
        if action != program.actions().0 {
            return Err(format!(
                "{}: the SYN opening the DSR flow was answered {action}",
                program.name()
            ));
        }
        let dsr = Frame::tcp(client, dsr_port, vip, DSR_PORT, TCP_ACK).frame(VC_MAC, CLIENT_MAC);
        self.flows[program as usize] = Some(Flows {
            established,
            reply,
            dsr,
        });
        Ok(())
    }

    /// Empties conntrack and the NAT reverse map (the `new SYN` case's flows and every
    /// program's established ones, which [`ProgramLab::prepare`] opens again).
    fn reset(&mut self) -> Result<(), String> {
        let keys: Vec<FlowKey> = self.lab.conntrack.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = self.lab.conntrack.remove(&k);
        }
        let keys: Vec<FlowKey> = self.lab.nat_reverse.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = self.lab.nat_reverse.remove(&k);
        }
        self.flows = [None, None];
        self.new_flows = 0;
        Ok(())
    }

    /// One BPF_PROG_TEST_RUN of `program` on `frame` as if it arrived on `ingress`, `repeat`
    /// times: the action, the output frame and the kernel's duration per repetition.
    fn test_run(
        &self,
        program: Program,
        frame: &[u8],
        ingress: u32,
        repeat: u32,
    ) -> Result<(u32, Vec<u8>, Duration), String> {
        let mut out = vec![0u8; frame.len() + 256];
        let ctx = context(program, frame.len(), ingress);
        let name = program.name();
        let prog = self
            .lab
            .ebpf
            .program(name)
            .ok_or_else(|| format!("the object has no program {name}"))?;
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat,
            ..TestRunOptions::default()
        };
        let result = self
            .lab
            .ns
            .enter(|| match program {
                Program::Xdp => <&Xdp>::try_from(prog)
                    .map_err(|e| e.to_string())
                    .and_then(|p| p.test_run(opts).map_err(|e| format!("{e:?}"))),
                Program::Tc => <&SchedClassifier>::try_from(prog)
                    .map_err(|e| e.to_string())
                    .and_then(|p| p.test_run(opts).map_err(|e| format!("{e:?}"))),
            })
            .map_err(|e| format!("entering the lab's namespace: {e}"))?
            .map_err(|e| format!("BPF_PROG_TEST_RUN of {name} failed: {e}"))?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out, result.duration))
    }
}

/// The backend conntrack recorded for `key`.
fn conntrack_backend(
    conntrack: &HashMap<MapData, FlowKey, lb_common::maps::CtEntry>,
    key: &FlowKey,
) -> Result<u32, String> {
    conntrack
        .get(key, 0)
        .map(|e| e.backend)
        .map_err(|e| format!("the new flow is not in conntrack: {e}"))
}

/// `Err` naming the case when `program` answered `action` where the case expects `want`.
fn answered(program: Program, case: Packet, action: u32, want: u32) -> Result<(), String> {
    if action == want {
        return Ok(());
    }
    Err(format!(
        "{} through {}: the program answered {action}, not {want}",
        case.name(),
        program.name()
    ))
}

/// The test run's context for `program`: an `xdp_md` or a `__sk_buff` for a `len`-byte frame
/// arriving on `ingress`.
fn context(program: Program, len: usize, ingress: u32) -> Vec<u8> {
    match program {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex.
        Program::Xdp => [0, len as u32, 0, ingress, 0, 0]
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .collect(),
        // struct __sk_buff up to ifindex: len, pkt_type, mark, queue_mapping, protocol,
        // vlan_present, vlan_tci, vlan_proto, priority, ingress_ifindex, ifindex. The
        // kernel takes the device from `ifindex` and the input interface from
        // `ingress_ifindex`; the rest must be zero.
        Program::Tc => [0, 0, 0, 0, 0, 0, 0, 0, 0, ingress, ingress]
            .iter()
            .flat_map(|w: &u32| w.to_ne_bytes())
            .collect(),
    }
}

/// An ARP request from the client for the balancer's address on `vc`.
fn arp() -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&CLIENT4.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 0, 1, 1]);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arp_frame_is_a_request_for_the_balancer() {
        let f = arp();
        assert_eq!(f.len(), 42, "an ARP request over Ethernet is 42 bytes");
        assert_eq!(&f[12..14], &[0x08, 0x06], "EtherType ARP");
        assert_eq!(&f[38..42], &[10, 0, 1, 1], "asks for vc's address");
    }

    #[test]
    fn every_case_has_its_own_name() {
        let mut names: Vec<_> = Packet::ALL.iter().map(|p| p.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Packet::ALL.len());
    }
}
