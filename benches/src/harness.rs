//! One benchmark run: for each topology with a path to measure, builds it, starts the servers,
//! measures its paths round by round on one balancer each, and assembles the [`Report`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::balancer::{
    self, Case, Path, Plane, Programs, Running, StartError, VIP_BULK, VIP_PPS, VIP_RR, VIP_UDP,
};
use crate::client;
use crate::metric::Metric;
use crate::procstat;
use crate::program_time::{ProgramTime, StatsOn};
use crate::report::{Churn, Figure, Machine, PairedReference, PathKind, PathReport, Report};
use crate::server::Servers;
use crate::stop;
use crate::tc::TcSetup;
use crate::topology::{self, Network, Topology};
use crate::xdp::XdpSetup;

/// How a run is sized and where it writes.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The programs to run.
    pub programs: Programs,
    /// Rounds; each path is measured once per round (at least 3 for a median).
    pub rounds: usize,
    /// How long each test runs in each round.
    pub test_time: Duration,
    /// Where configs and logs go (`<out>/work`, `<out>/logs`).
    pub out: PathBuf,
    /// The command line, for the report.
    pub command: String,
    /// Paths to measure, each on its topology (default: all).
    pub paths: Vec<Case>,
    /// How long the churn test of [`CHURN_PATHS`] runs (zero: not at all); at least two
    /// [`CHURN_WINDOW`]s for a first and a last figure.
    pub churn_time: Duration,
}

/// The paths whose report gets a churn figure: new connections at full speed for
/// [`Plan::churn_time`] on the balancer that ran the rounds, the first and the last
/// [`CHURN_WINDOW`] compared. Full NAT is where a leak of SNAT ports shows.
const CHURN_PATHS: [Path; 1] = [Path::LbXdpNat];
const CHURN_WINDOW: Duration = Duration::from_secs(10);

/// Client concurrency: 16 connection loops, 16 kept-alive connections, 8 UDP sockets.
const CONN_THREADS: usize = 16;
const KEPT_ALIVE: usize = 16;
const UDP_SOCKETS: usize = 8;
/// The packet-rate test: flows (one UDP socket, so one source port, each), sending threads,
/// and the most datagrams one round may send whatever its length.
const PPS_FLOWS: usize = 256;
const PPS_THREADS: usize = 2;
const PPS_MAX_DATAGRAMS: u64 = 100_000_000;
/// How long the backends get to count the datagrams still in flight when the senders stop.
const PPS_SETTLE: Duration = Duration::from_millis(200);

/// Runs the plan. `Err` when the topology or the servers cannot be set up, or on Ctrl-C;
/// a path that fails is reported as skipped with its reason instead.
pub fn run(plan: &Plan) -> Result<Report> {
    let logs = plan.out.join("logs");
    let work = plan.out.join("work");
    std::fs::create_dir_all(&logs).context("creating the log directory")?;
    std::fs::create_dir_all(&work).context("creating the work directory")?;
    let machine = machine();
    let date_utc = date_utc();
    let mut skipped: BTreeMap<&str, String> = BTreeMap::new();
    let mut samples: BTreeMap<&str, BTreeMap<Metric, Vec<f64>>> = BTreeMap::new();
    let mut notes: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut paired: BTreeMap<&str, Paired> = BTreeMap::new();
    let mut churn = Vec::new();
    for network in Network::ALL {
        let cases: Vec<Case> = plan
            .paths
            .iter()
            .copied()
            .filter(|c| c.network == network)
            .collect();
        if cases.is_empty() {
            continue;
        }
        eprintln!(
            "lb-bench: building the {} namespace topology",
            network.name()
        );
        let topo = topology::build(network)
            .with_context(|| format!("building the {} namespaces (needs root)", network.name()))?;
        let servers = Servers::start(&topo).context("starting the backend servers")?;
        for t in Path::Direct.targets(network, VIP_RR) {
            wait_answering(&topo, t, None).with_context(|| format!("backend server {t}"))?;
        }
        let mut results = Results {
            skipped: &mut skipped,
            samples: &mut samples,
            notes: &mut notes,
            paired: &mut paired,
            churn: &mut churn,
        };
        run_network(plan, &topo, &servers, &cases, &logs, &work, &mut results)?;
    }
    let paths = plan
        .paths
        .iter()
        .map(|c| PathReport {
            name: c.name().into(),
            network: c.network,
            kind: c.path.kind(),
            skipped: skipped.get(c.name()).cloned(),
            figures: samples
                .remove(c.name())
                .unwrap_or_default()
                .into_iter()
                .map(|(m, v)| (m, Figure::new(v)))
                .collect(),
            notes: notes.remove(c.name()).unwrap_or_default(),
            paired: paired
                .remove(c.name())
                .unwrap_or_default()
                .into_iter()
                .map(|(reference, samples)| PairedReference {
                    name: reference.name().into(),
                    kind: reference.path.kind(),
                    figures: samples
                        .into_iter()
                        .map(|(m, v)| (m, Figure::new(v)))
                        .collect(),
                })
                .collect(),
        })
        .collect();
    let mut run_notes = vec![
        "LB CPU: user+system time of every process in the balancer namespace (/proc/<pid>/stat), \
         during the two bulk tests (per GB received by the servers) and the connection test \
         (per 1,000 completed connections). `direct` has no balancer process: its forwarding \
         runs in softirq."
            .to_string(),
        "softirq: machine-wide (/proc/stat), so it includes the client's and backends' stacks; \
         the kernel does not split it by namespace."
            .to_string(),
        "lb-xdp-*: the balancer's work runs in softirq. Their LB CPU is the time the kernel ran \
         the lb_xdp program (BPF run-time statistics, `run_time_ns` of the program attached in \
         the balancer namespace) plus lb-daemon's own user+system time; the redirect and the \
         veth delivery after the program are only in the machine-wide softirq column. Peak RSS \
         is lb-daemon's; its BPF maps are kernel memory and not in it."
            .to_string(),
        "direct-xdp-veth: `direct` on the XDP paths' veth set-up (below), with a pass-everything \
         XDP program (`lb-daemon decap`) on the balancer's veths too, so the kernel routes with \
         XDP attached everywhere: lb-xdp-* against it shows the cost of lb's program and \
         redirect alone, against `direct` also the cost of XDP on veth."
            .to_string(),
        "lb-xdp-*: run with what XDP on veth needs (as in the end-to-end tests), set up around \
         each of their runs and undone after: tx checksum offload off on the client's and \
         backends' veth ends (which also turns off their TSO: they send MTU-sized segments, \
         where the other paths send 64 KiB ones), `lb-daemon decap` on those ends (the XDP \
         program a veth peer needs to receive redirected frames; DSR backends decapsulate with \
         it), MTU 1600 on the balancer-to-backend veths for DSR. Maglev instead of round robin \
         (the program has only a Maglev table). DSR replies go from the backend (VIP on its \
         loopback) through the balancer's kernel routing (lb_xdp passes them) to the client, \
         not through XDP."
            .to_string(),
        "lb-tc-*: lb-daemon with `dataplane = \"tc\"` (lb_tc at tc ingress on l0 and on the \
         balancer's interfaces towards the backends), the documented defaults and nothing \
         changed on the neighbours: tx checksum offload and TSO stay on, no program on the veth \
         peers. DSR backends decapsulate at tc (`lb-daemon decap --hook tc` on each backend's \
         b0) and their links get MTU 1600 for the outer header. Their LB CPU is the \
         run time of the BPF programs the daemon holds (BPF run-time statistics) plus its own \
         user+system time."
            .to_string(),
        "program ns/run (lb-xdp-*, lb-tc-*): lb's program in traffic, the change of its BPF \
         run-time statistics (`run_time_ns` over `run_cnt`) across the two bulk tests and \
         across the 64-byte packet test. It and these paths' LB CPU come from one more round \
         with the statistics on, the cost round, after the path's rounds; the statistics add \
         two scheduler-clock reads to every program run (no user's host has them on), so \
         every other figure of these paths comes from the rounds with them off. A run is one \
         packet at XDP and one socket buffer at tc, where a GSO super-packet of up to 64 KiB \
         is one run. It includes the runs on \
         replies and on packets the program passes; `cargo bench --bench micro` gives the \
         same program's warm cost per case."
            .to_string(),
        "bridge topology (paths ending in -bridge): the backends' veths are enslaved to br0 in \
         the balancer's namespace, one subnet for all (Docker's default bridge network), the \
         client on its own veth; no permanent neighbour entries. Its ratios are to \
         `direct-bridge` (the kernel routing into the bridge) and to its own peers."
            .to_string(),
        format!(
            "64-byte pkt/s: {PPS_FLOWS} UDP flows (one socket, so one source port, each) on \
             {PPS_THREADS} threads send {}-byte payloads (64-byte Ethernet frames) one way with \
             sendmmsg(2), batches of 32, as fast as the kernel takes them, for the test time \
             (at most {PPS_MAX_DATAGRAMS} datagrams); the figure is what the backends' \
             recvmmsg(2) counters received per second of sending. HAProxy has no UDP.",
            client::BLAST_PAYLOAD
        ),
        "Every round of a path runs on one balancer process started once for the path (as a \
         user runs it: a leak shows as a falling rate), with lb-daemon's documented defaults \
         (no `snat_ports`); paths run one after the other. Each topology's `direct` runs \
         first and again last, and its figures (the reference of the peers' and proxies' \
         ratios) are the median of both runs' rounds; its notes give both runs' medians. \
         lb's tc paths are compared with a `direct` (`direct-bridge`) measured beside them \
         instead, and the XDP paths' `direct-xdp-veth` targets with a `direct-xdp-veth` \
         measured beside them (the `↳` rows; their ratios to `direct` still use the \
         topology's own runs), and `lb-proxy` (veth) with a HAProxy and an nginx measured \
         beside it (its ratios to the best peer and its targets use those runs): for each \
         such reference a twin of the topology, built the same way and removed after the \
         path, runs it in rounds interleaved with the path's (with one reference the path \
         first in rounds 1, 3, 5..., the reference in rounds 2, 4...; with two the order \
         turns by one place each round, and the peers swap places every three rounds) \
         while the path's balancer stays up on the first, so that the machine's drift over \
         minutes lands on every side of those ratios alike."
            .to_string(),
        "Clients and servers are Rust (benches/src/client.rs, server.rs): 1 and 8 bulk flows, \
         16 connection loops, 16 kept-alive connections, 8 UDP sockets, 64-byte messages; \
         clients, servers and the balancer share the same cores."
            .to_string(),
    ];
    if machine.load_before > 0.5 {
        run_notes.push(format!(
            "Other work was running (load average {:.2} at the start): figures are noisy.",
            machine.load_before
        ));
    }
    Ok(Report {
        machine,
        command: plan.command.clone(),
        date_utc,
        rounds: plan.rounds,
        seconds_per_test: plan.test_time.as_secs_f64(),
        paths,
        churn,
        notes: run_notes,
    })
}

/// A path's paired references: each one's case and its samples, one per round, in the order
/// of their first round.
type Paired = Vec<(Case, BTreeMap<Metric, Vec<f64>>)>;

/// Where [`run`] gathers every case's results, keyed by the case's name.
struct Results<'r> {
    skipped: &'r mut BTreeMap<&'static str, String>,
    samples: &'r mut BTreeMap<&'static str, BTreeMap<Metric, Vec<f64>>>,
    notes: &'r mut BTreeMap<&'static str, Vec<String>>,
    /// Keyed by the path's case name.
    paired: &'r mut BTreeMap<&'static str, Paired>,
    churn: &'r mut Vec<Churn>,
}

/// Measures `cases`, all on `topo`'s network, one after the other. `Err` on Ctrl-C.
fn run_network(
    plan: &Plan,
    topo: &Topology,
    servers: &Servers,
    cases: &[Case],
    logs: &std::path::Path,
    work: &std::path::Path,
    results: &mut Results<'_>,
) -> Result<()> {
    let Results {
        skipped,
        samples,
        notes,
        paired,
        churn,
    } = results;
    // Every round of a path runs on one balancer process, started once, as a user runs it:
    // a leak (ports, fds, memory) shows as a rate falling from round to round instead of being
    // reset by a fresh daemon. The price is that paths cannot be interleaved round by round
    // on one topology (a tc or XDP balancer holds its interfaces), so the machine's drift
    // over the run (other tenants, clocks) would land between a path and its reference. The
    // topology's `direct` runs first and again last (its figures the median of both runs'
    // rounds), and the paths with targets against a reference or the peers get their own
    // runs of them, each on a twin topology, round for round (`paired_order`).
    let order = bracket(cases, plan.rounds);
    for &(case, first_round) in &order {
        let path = case.path;
        if stop::requested() {
            bail!("interrupted");
        }
        let log = logs.join(format!("{}.log", case.name()));
        let mut run = match PathRun::start(plan, topo, case, work, log) {
            Ok(run) => run,
            Err(reason) => {
                if stop::requested() {
                    bail!("interrupted");
                }
                let reason = match path.plane() {
                    Plane::Xdp(_) if path.packet_layer() => {
                        format!("the XDP data plane did not start: {reason}")
                    }
                    Plane::Tc(_) => format!("the tc data plane did not start: {reason}"),
                    _ => reason,
                };
                eprintln!("lb-bench: {}: skipped: {reason}", case.name());
                skipped.insert(case.name(), reason);
                continue;
            }
        };
        // The paired references run each on a second topology built the same way, so that
        // the path's balancer stays up (and its programs attached) through all its rounds
        // while the references' rounds go between them. Built for this path only: their
        // idle servers would otherwise run beside every other path too.
        // The twins, the references and the rounds in a block of their own: the twins go as
        // soon as the rounds end, before the path's churn test and its balancer's stop. (When
        // a reference cannot start, its twin stays up, idle, through the path's rounds.)
        {
            let mut twins = Vec::new();
            for &r in case.paired_references() {
                let r = Case {
                    path: r,
                    network: case.network,
                };
                match Twin::build(case.network) {
                    Ok(t) => twins.push((r, t)),
                    Err(reason) => notes.entry(case.name()).or_default().push(format!(
                        "no paired {}: the twin topology: {reason}; compared with the \
                         topology's own runs",
                        r.name()
                    )),
                }
            }
            // Declared after the twins, so dropped (stopped) before them.
            let mut references = Vec::new();
            for (r, twin) in &twins {
                // A baseline has no balancer process, so nothing writes its log.
                let log = logs.join(format!("{}-beside-{}.log", r.name(), case.name()));
                match PathRun::start(plan, &twin.topo, *r, work, log) {
                    Ok(run) => references.push((run, &twin.topo, &twin.servers)),
                    Err(reason) => notes.entry(case.name()).or_default().push(format!(
                        "no paired {}: {reason}; compared with the topology's own runs",
                        r.name()
                    )),
                }
            }
            let total = plan.rounds * order.iter().filter(|(c, _)| *c == case).count();
            for round in first_round..first_round + plan.rounds {
                if stop::requested() {
                    bail!("interrupted");
                }
                for side in paired_order(round - first_round, references.len()) {
                    if stop::requested() {
                        bail!("interrupted");
                    }
                    let (who, measured) = match side {
                        Side::Reference(i) => {
                            let (r, t, s) = &mut references[i];
                            eprintln!(
                                "lb-bench: {} beside {}: round {}/{total}",
                                r.case.name(),
                                case.name(),
                                round + 1
                            );
                            (r.case, r.measure_round(plan, t, s, round, false))
                        }
                        Side::Path => {
                            eprintln!("lb-bench: {}: round {}/{total}", case.name(), round + 1);
                            let measured = run.measure_round(plan, topo, servers, round, false);
                            (case, measured)
                        }
                    };
                    record(samples, paired, notes, case.name(), side, who, measured);
                }
            }
            if !references.is_empty() {
                let names: Vec<&str> = references.iter().map(|(r, _, _)| r.case.name()).collect();
                let first: Vec<String> = (0..=references.len())
                    .map(|round| {
                        let who = match paired_order(round, references.len())[0] {
                            Side::Path => "this path",
                            Side::Reference(i) => names[i],
                        };
                        format!("{who} first in round {}", round + 1)
                    })
                    .collect();
                let (what, each, swap) = if names.len() == 1 {
                    ("reference", "", String::new())
                } else {
                    let sides = names.len() + 1;
                    let swap = format!(
                        ", the references listed the other way round in rounds {}-{}",
                        sides + 1,
                        2 * sides
                    );
                    ("references", " each", swap)
                };
                notes.entry(case.name()).or_default().push(format!(
                    "its targets' {what} ({}) ran{each} on a twin of this topology in rounds \
                     interleaved with this path's, the order turning by one place each round \
                     ({}, and so on{swap}); their figures are the `↳` rows",
                    names.join(", "),
                    first.join(", ")
                ));
            }
            for (r, _, _) in references {
                let name = r.case.name();
                let mut n = Vec::new();
                r.finish(&mut n);
                notes.entry(case.name()).or_default().extend(
                    n.into_iter()
                        .map(|note| format!("the paired {name}: {note}")),
                );
            }
        }
        if path.packet_layer() {
            cost_round(plan, topo, servers, &mut run, samples, notes)?;
        }
        if first_round > 0 {
            if let Some(note) = samples.get(case.name()).and_then(|s| drift(s, plan.rounds)) {
                notes.entry(case.name()).or_default().push(note);
            }
        }
        if CHURN_PATHS.contains(&path)
            && case.network == Network::Veth
            && !plan.churn_time.is_zero()
        {
            eprintln!(
                "lb-bench: {}: churn, {} s of new connections",
                case.name(),
                plan.churn_time.as_secs()
            );
            let timeline = topo.client.enter(|| {
                client::connections_timeline(
                    &case.targets(VIP_RR),
                    CONN_THREADS,
                    plan.churn_time,
                    CHURN_WINDOW,
                )
            });
            match timeline.and_then(|t| t) {
                Ok(t) => churn.push(Churn::from_windows(case.name(), CHURN_WINDOW, &t)),
                Err(e) => notes
                    .entry(case.name())
                    .or_default()
                    .push(format!("churn test failed: {e}")),
            }
        }
        run.finish(notes.entry(case.name()).or_default());
    }
    Ok(())
}

/// The figures a cost round gives lb's tc and XDP paths: those that need the program's run
/// time, which the kernel counts only with statistics on.
const COST_ROUND_METRICS: [Metric; 4] = [
    Metric::CpuPerGb,
    Metric::CpuPer1kConn,
    Metric::ProgramNsBulk,
    Metric::ProgramNsPacket,
];

/// One more round of `run`'s tests with BPF run-time statistics on ([`StatsOn`]), which
/// gives the path's program-time figures ([`COST_ROUND_METRICS`]) and nothing else: the
/// statistics slow every program run down, so its rates and latencies come from the rounds
/// before, run as a user's host runs (statistics off). A note says so, or why there are no
/// such figures. `Err` on Ctrl-C.
fn cost_round(
    plan: &Plan,
    topo: &Topology,
    servers: &Servers,
    run: &mut PathRun<'_>,
    samples: &mut BTreeMap<&'static str, BTreeMap<Metric, Vec<f64>>>,
    notes: &mut BTreeMap<&'static str, Vec<String>>,
) -> Result<()> {
    if stop::requested() {
        bail!("interrupted");
    }
    let name = run.case.name();
    if stats_sysctl_on() {
        notes.entry(name).or_default().push(
            "kernel.bpf_stats_enabled is 1 on this host: every figure of this path includes \
             the statistics' clock reads, not only the cost round's"
                .into(),
        );
    }
    let stats = match StatsOn::enable() {
        Ok(s) => s,
        Err(e) => {
            notes
                .entry(name)
                .or_default()
                .push(format!("no LB CPU or program figures: {e}"));
            return Ok(());
        }
    };
    eprintln!("lb-bench: {name}: cost round (BPF run-time statistics on)");
    let (figures, n) = run.measure_round(plan, topo, servers, plan.rounds, true);
    drop(stats);
    let into = samples.entry(name).or_default();
    for m in COST_ROUND_METRICS {
        // A figure the round could not give is a failure (the report says `failed`): every
        // tc and XDP path has a daemon, bulk, connections and UDP.
        let v = figures
            .iter()
            .find(|(f, _)| *f == m)
            .map_or(f64::NAN, |(_, v)| *v);
        into.entry(m).or_default().push(v);
    }
    let entry = notes.entry(name).or_default();
    entry.extend(n.into_iter().map(|note| format!("cost round: {note}")));
    entry.push(
        "LB CPU and program ns/run: from one more round with BPF run-time statistics on \
         (the cost round), which the other figures do not include: the statistics add two \
         clock reads to every program run"
            .into(),
    );
    Ok(())
}

/// Whether the host keeps BPF run-time statistics on for everyone (`kernel.bpf_stats_enabled`
/// set to 1), whoever else holds them. `false` when it cannot be read.
fn stats_sysctl_on() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() == "1")
}

/// Files one round's `measured` figures and notes, measured by `who`, under the path named
/// `path`: the path's own (`side` [`Side::Path`]) with its samples, or those of its paired
/// reference `who` (any [`Side::Reference`]) with the path's paired samples of that
/// reference, each note then prefixed with the reference's name.
fn record(
    samples: &mut BTreeMap<&'static str, BTreeMap<Metric, Vec<f64>>>,
    paired: &mut BTreeMap<&'static str, Paired>,
    notes: &mut BTreeMap<&'static str, Vec<String>>,
    path: &'static str,
    side: Side,
    who: Case,
    measured: Measured,
) {
    let (figures, mut n) = measured;
    let name = who.name();
    let into = match side {
        Side::Path => samples.entry(path).or_default(),
        Side::Reference(_) => {
            let references = paired.entry(path).or_default();
            let at = match references.iter().position(|(r, _)| *r == who) {
                Some(at) => at,
                None => {
                    references.push((who, BTreeMap::new()));
                    references.len() - 1
                }
            };
            &mut references[at].1
        }
    };
    for (m, v) in figures {
        into.entry(m).or_default().push(v);
    }
    if side != Side::Path {
        for note in &mut n {
            *note = format!("the paired {name}: {note}");
        }
    }
    notes.entry(path).or_default().append(&mut n);
}

/// A second topology like the first, with its own servers, for one paired reference.
struct Twin {
    /// Declared first: the servers stop before their namespaces go.
    servers: Servers,
    topo: Topology,
}

impl Twin {
    /// Builds `network`'s topology again and starts its servers, then waits until they
    /// answer. `Err(reason)` when a step fails (what was built is removed).
    fn build(network: Network) -> Result<Twin, String> {
        eprintln!(
            "lb-bench: building a twin of the {} topology for a paired reference",
            network.name()
        );
        let topo = topology::build(network).map_err(|e| format!("building it: {e}"))?;
        let servers =
            Servers::start(&topo).map_err(|e| format!("starting its backend servers: {e}"))?;
        for a in Path::Direct.targets(network, VIP_RR) {
            wait_answering(&topo, a, None).map_err(|e| format!("its backend server {a}: {e:#}"))?;
        }
        Ok(Twin { servers, topo })
    }
}

/// Which run a round measures: the path under test or its `i`-th running paired reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Path,
    Reference(usize),
}

/// The order of a path and its `references` running paired references in the path's round
/// `index` (0 for round 1): the path, then each reference, turned by one place each round, so
/// that in every `references + 1` rounds each side goes first once. With one reference: A B,
/// B A, A B... With more, every other block of `references + 1` rounds lists the references
/// the other way round (A B C, B C A, C A B, then A C B, C B A, B A C), so that over two
/// blocks each side runs right after each other one as often: a side that leaves the machine
/// worse for the next (sockets in TIME_WAIT, a warm cache gone) burdens them all alike. When
/// the rounds are not a multiple of the sides, the earlier sides go first once more often.
fn paired_order(index: usize, references: usize) -> Vec<Side> {
    let sides = references + 1;
    let backwards = references > 1 && (index / sides) % 2 == 1;
    let base: Vec<Side> = std::iter::once(Side::Path)
        .chain(
            (0..references)
                .map(|i| Side::Reference(if backwards { references - 1 - i } else { i })),
        )
        .collect();
    (0..sides).map(|k| base[(index + k) % sides]).collect()
}

/// The order `cases` (one topology's) run in, each with the number of its first round: the
/// topology's `direct` first and, when another path runs on the topology, again last (its
/// rounds `rounds..2 * rounds`), the others in their order in between.
fn bracket(cases: &[Case], rounds: usize) -> Vec<(Case, usize)> {
    let reference = cases.iter().copied().find(|c| c.path == Path::Direct);
    let others = cases.iter().copied().filter(|c| c.path != Path::Direct);
    let mut order: Vec<(Case, usize)> = reference.map(|r| (r, 0)).into_iter().collect();
    order.extend(others.map(|c| (c, 0)));
    if let Some(r) = reference.filter(|_| cases.len() > 1) {
        order.push((r, rounds));
    }
    order
}

/// What a reference measured in two runs (`samples`: each figure's first `rounds` samples,
/// then the second run's) says about the machine's drift: every figure's median in the first
/// run and in the second, e.g. `bulk 1 flow Gbit/s 16.8 → 15.0 (-11%)`. `None` without a
/// second run.
fn drift(samples: &BTreeMap<Metric, Vec<f64>>, rounds: usize) -> Option<String> {
    let median = |v: &[f64]| crate::stats::summarize(v).map(|s| s.median);
    let figures: Vec<String> = samples
        .iter()
        .filter(|(_, v)| v.len() > rounds)
        .filter_map(|(m, v)| {
            let (first, second) = (median(&v[..rounds])?, median(&v[rounds..])?);
            let change = if first == 0.0 {
                String::new()
            } else {
                format!(" ({:+.0}%)", (second / first - 1.0) * 100.0)
            };
            Some(format!(
                "{} {} → {}{change}",
                m.heading(),
                crate::report::number(first),
                crate::report::number(second)
            ))
        })
        .collect();
    (!figures.is_empty()).then(|| {
        format!(
            "run first and again last on its topology, its figures the median of both runs' \
             rounds; medians of the first run → the second: {}",
            figures.join(", ")
        )
    })
}

/// One round of one path: each figure's sample, and what went wrong on the way.
type Measured = (Vec<(Metric, f64)>, Vec<String>);

/// A path set up for all its rounds: the XDP paths' veth set-up and the balancer process.
struct PathRun<'t> {
    case: Case,
    /// The topology, whose balancer namespace gets its ephemeral ports back at the end.
    running_topology: &'t Topology,
    /// Declared before `xdp` and `tc`: fields drop in order, and the balancer must detach
    /// first.
    running: Option<Running>,
    /// The XDP paths' extra set-up.
    xdp: Option<XdpSetup<'t>>,
    /// The tc paths' extra set-up.
    tc: Option<TcSetup<'t>>,
}

impl<'t> PathRun<'t> {
    /// Sets up `path` and starts its balancer, then waits until it answers. `Err(reason)`
    /// when the path cannot run at all.
    fn start(
        plan: &Plan,
        topo: &'t Topology,
        case: Case,
        work: &std::path::Path,
        log: PathBuf,
    ) -> Result<PathRun<'t>, String> {
        let path = case.path;
        let object = || {
            plan.programs
                .bpf_object
                .as_ref()
                .map_err(|why| format!("no BPF object: {why}"))
        };
        // The XDP and tc paths' extra set-up comes first (the daemon's XDP needs the
        // decapsulators on the veth peers) and goes last (after the daemon detached).
        let xdp = match path.xdp_setup() {
            Some(kind) => Some(XdpSetup::start(topo, kind, object()?)?),
            None => None,
        };
        let tc = match path.tc_mode() {
            Some(mode) => Some(TcSetup::start(topo, mode, object()?)?),
            None => None,
        };
        // The proxies' wide ephemeral range (see `topology`) would leave NAT no room for its
        // default SNAT range; an XDP or tc host keeps the kernel's default.
        set_local_ports(topo, xdp.is_some() || tc.is_some())?;
        let mut running = match balancer::start(path, topo, &plan.programs, work, log) {
            Ok(r) => r,
            Err(StartError::Unavailable(why)) => return Err(why),
            Err(e) => return Err(format!("could not start: {e}")),
        };
        let target = case.targets(VIP_RR)[0];
        wait_answering(topo, target, running.as_mut()).map_err(|e| format!("{e:#}"))?;
        Ok(PathRun {
            case,
            running_topology: topo,
            running,
            xdp,
            tc,
        })
    }

    /// Stops the balancer, then undoes the set-up; notes a balancer that exited on its own.
    fn finish(mut self, notes: &mut Vec<String>) {
        if let Some(r) = self.running.as_mut() {
            if let Some(status) = r.exited() {
                notes.push(format!(
                    "the balancer exited during the tests ({status}); see {}",
                    r.log().display()
                ));
            }
        }
        drop(self.running.take());
        drop(self.xdp.take());
        drop(self.tc.take());
        if let Err(e) = set_local_ports(self.running_topology, false) {
            notes.push(e);
        }
    }

    /// Runs every test once on the running balancer. For lb's tc and XDP paths the figures
    /// that need the program's run time (LB CPU, program ns/run) only when `costs` (the
    /// cost round, with BPF run-time statistics on); for every other path in every round.
    fn measure_round(
        &mut self,
        plan: &Plan,
        topo: &Topology,
        servers: &Servers,
        round: usize,
        costs: bool,
    ) -> Measured {
        let case = self.case;
        let path = case.path;
        let costs = costs || !path.packet_layer();
        let xdp = &self.xdp;
        let tc = &self.tc;
        let daemon = self.running.as_ref().map(Running::pid);
        let d = plan.test_time;
        let mut figures = Vec::new();
        let mut notes = Vec::new();
        let fail = |what: &str, e: &dyn std::fmt::Display, notes: &mut Vec<String>| {
            notes.push(format!("round {}: {what} failed: {e}", round + 1));
            f64::NAN
        };
        let ns = topo.balancer.name();
        // lb's program's run time and runs so far (XDP and tc paths); `None` where lb runs
        // no program (a baseline, a proxy).
        let program = || match (xdp, tc, daemon) {
            _ if !costs => None,
            (Some(x), _, _) if path.kind() != PathKind::Baseline => Some(x.program_time()),
            (_, Some(t), Some(pid)) => Some(t.program_time(pid)),
            _ => None,
        };
        // The balancer's CPU seconds so far: its processes' user + system time, plus, for XDP
        // and tc, the time the kernel ran lb's program (softirq). `None` when the program's
        // part cannot be read. Also the program's own reading, for its cost per run.
        let cpu = |notes: &mut Vec<String>| -> (procstat::Usage, Option<f64>, Option<ProgramTime>) {
            let u = procstat::usage(ns);
            let (seconds, time) = match program() {
                None => (Some(0.0), None),
                Some(Ok(t)) => (Some(t.seconds), Some(t)),
                Some(Err(e)) => {
                    notes.push(format!(
                        "round {}: no LB CPU figures: the program's run time: {e}",
                        round + 1
                    ));
                    (None, None)
                }
            };
            (u, seconds.map(|p| p + u.cpu_seconds), time)
        };
        let (u0, c0, t0) = cpu(&mut notes);
        let s0 = procstat::softirq_seconds();
        let mut bytes = 0u64;
        for (metric, flows) in [(Metric::Bulk1, 1), (Metric::Bulk8, 8)] {
            let r = topo
                .client
                .enter(|| client::bulk(&case.targets(VIP_BULK), flows, d))
                .and_then(|r| r);
            let v = match r {
                Ok(b) => {
                    bytes += b.bytes;
                    b.gbps()
                }
                Err(e) => fail(metric.heading(), &e, &mut notes),
            };
            figures.push((metric, v));
        }
        let (u1, c1, t1) = cpu(&mut notes);
        let s1 = procstat::softirq_seconds();
        let gb = bytes as f64 / 1e9;
        // A baseline has no balancer (direct-xdp-veth's pass programs' loaders do nothing).
        let has_process = path.kind() != PathKind::Baseline && u0.processes > 0 && u1.processes > 0;
        if gb > 0.0 {
            if let (true, Some(c0), Some(c1)) = (has_process && costs, c0, c1) {
                figures.push((Metric::CpuPerGb, (c1 - c0) * 1e3 / gb));
            }
            figures.push((Metric::SoftirqPerGb, (s1 - s0) * 1e3 / gb));
        }
        if let Some(ns) = t0.zip(t1).and_then(|(t0, t1)| t1.ns_per_run_since(t0)) {
            if costs {
                figures.push((Metric::ProgramNsBulk, ns));
            }
        }

        let conns = topo
            .client
            .enter(|| client::connections(&case.targets(VIP_RR), CONN_THREADS, d));
        let (_, c2, _) = cpu(&mut notes);
        match conns {
            Ok((r, kinds)) => {
                if r.failed > 0 {
                    let kinds: Vec<String> =
                        kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
                    notes.push(format!(
                        "round {}: {} of {} new connections failed ({})",
                        round + 1,
                        r.failed,
                        r.failed + r.done,
                        kinds.join(", ")
                    ));
                }
                figures.push((Metric::ConnRate, r.per_second()));
                if let (true, Some(c1), Some(c2)) = (has_process && r.done > 0 && costs, c1, c2) {
                    figures.push((
                        Metric::CpuPer1kConn,
                        (c2 - c1) * 1e3 / (r.done as f64 / 1e3),
                    ));
                }
            }
            Err(e) => {
                let v = fail(Metric::ConnRate.heading(), &e, &mut notes);
                figures.push((Metric::ConnRate, v));
            }
        }

        let kept = topo
            .client
            .enter(|| client::kept_alive(&case.targets(VIP_RR), KEPT_ALIVE, d))
            .and_then(|r| r);
        let v = match kept {
            Ok(r) if r.failed == 0 => r.per_second(),
            Ok(r) => fail(
                Metric::KeepAliveRate.heading(),
                &format!("{} of {KEPT_ALIVE} connections broke", r.failed),
                &mut notes,
            ),
            Err(e) => fail(Metric::KeepAliveRate.heading(), &e, &mut notes),
        };
        figures.push((Metric::KeepAliveRate, v));

        if path.has_udp() {
            let udp = topo
                .client
                .enter(|| client::udp(&case.targets(VIP_UDP), UDP_SOCKETS, d))
                .and_then(|r| r);
            match udp {
                Ok(u) => {
                    if u.rate.failed > 0 {
                        notes.push(format!(
                            "round {}: {} UDP requests got no reply within 200 ms",
                            round + 1,
                            u.rate.failed
                        ));
                    }
                    figures.push((Metric::UdpRate, u.rate.per_second()));
                    figures.push((Metric::UdpP50, u.p50_us));
                    figures.push((Metric::UdpP99, u.p99_us));
                }
                Err(e) => {
                    let v = fail("UDP", &e, &mut notes);
                    for m in [Metric::UdpRate, Metric::UdpP50, Metric::UdpP99] {
                        figures.push((m, v));
                    }
                }
            }
        } else if round == 0 {
            notes.push("no UDP figures: HAProxy does not balance UDP".into());
        }

        if path.has_udp() {
            let before = servers.counted();
            let t0 = program().and_then(Result::ok);
            let blast = topo.client.enter(|| {
                client::blast(
                    &case.targets(VIP_PPS),
                    PPS_FLOWS,
                    PPS_THREADS,
                    d,
                    PPS_MAX_DATAGRAMS,
                )
            });
            match blast.and_then(|r| r) {
                Ok(sent) => {
                    std::thread::sleep(PPS_SETTLE);
                    let got = servers.counted().saturating_sub(before);
                    let t1 = program().and_then(Result::ok);
                    if let Some(ns) = t0.zip(t1).and_then(|(t0, t1)| t1.ns_per_run_since(t0)) {
                        if costs {
                            figures.push((Metric::ProgramNsPacket, ns));
                        }
                    }
                    let rate = got as f64 / sent.seconds;
                    if round == 0 {
                        notes.push(format!(
                            "round 1: packet rate: {} datagrams sent ({:.0}/s), {got} counted by \
                             the backends ({:.1}% lost)",
                            sent.datagrams,
                            sent.datagrams as f64 / sent.seconds,
                            100.0 * (1.0 - got as f64 / sent.datagrams.max(1) as f64)
                        ));
                    }
                    figures.push((Metric::PacketRate, rate));
                }
                Err(e) => {
                    let v = fail(Metric::PacketRate.heading(), &e, &mut notes);
                    figures.push((Metric::PacketRate, v));
                }
            }
        }

        let u3 = procstat::usage(ns);
        if has_process {
            figures.push((Metric::PeakRss, u3.peak_rss as f64 / (1024.0 * 1024.0)));
        }
        (figures, notes)
    }
}

/// The balancer namespace's ephemeral ports: the kernel's default for an XDP path, else the
/// wide range every proxy path gets (`topology`).
fn set_local_ports(topo: &Topology, xdp: bool) -> Result<(), String> {
    let range = if xdp {
        topology::KERNEL_LOCAL_PORTS
    } else {
        topology::PROXY_LOCAL_PORTS
    };
    topo.balancer
        .sysctl("net.ipv4.ip_local_port_range", range)
        .map_err(|e| format!("setting the balancer's ip_local_port_range to {range}: {e}"))
}

/// Waits (up to 10 s) until one request/reply exchange with `target` succeeds from the
/// client namespace. `Err` with the balancer's last log lines when it exits or never answers.
fn wait_answering(
    topo: &Topology,
    target: SocketAddr,
    mut running: Option<&mut Running>,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::new();
    while Instant::now() < deadline && !stop::requested() {
        if let Some(r) = running.as_deref_mut() {
            if let Some(status) = r.exited() {
                bail!("it exited ({status}): {}", log_tail(r.log()));
            }
        }
        let ok = topo
            .client
            .enter(|| client::connections(&[target], 1, Duration::from_millis(1)))
            .map(|(r, _)| r.done > 0);
        match ok {
            Ok(true) => return Ok(()),
            Ok(false) => last = format!("no reply from {target}"),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let tail = running.map(|r| log_tail(r.log())).unwrap_or_default();
    bail!("did not answer within 10 s ({last}) {tail}")
}

/// The last few non-empty lines of a log, on one line.
fn log_tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        // lb-daemon's log lines start with a timestamp and level: keep the message.
        .map(|l| l.find(" ERROR ").map_or(l, |i| &l[i + " ERROR ".len()..]))
        .collect();
    lines[lines.len().saturating_sub(3)..].join(" / ")
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown CPU".to_string(), |s| s.trim().to_string());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or("unknown".into(), |s| s.trim().to_string());
    let load_before = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN);
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        kernel,
        load_before,
    }
}

fn date_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown date".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(path: Path) -> Case {
        Case {
            path,
            network: Network::Veth,
        }
    }

    #[test]
    fn a_path_and_its_paired_references_take_turns_going_first() {
        let (p, r0, r1) = (Side::Path, Side::Reference(0), Side::Reference(1));
        let order: Vec<Vec<Side>> = (0..4).map(|i| paired_order(i, 1)).collect();
        assert_eq!(
            order,
            vec![vec![p, r0], vec![r0, p], vec![p, r0], vec![r0, p]]
        );
        let order: Vec<Vec<Side>> = (0..7).map(|i| paired_order(i, 2)).collect();
        assert_eq!(
            order,
            vec![
                vec![p, r0, r1],
                vec![r0, r1, p],
                vec![r1, p, r0],
                vec![p, r1, r0],
                vec![r1, r0, p],
                vec![r0, p, r1],
                vec![p, r0, r1]
            ]
        );
        // Over two blocks, every side runs right after each other one equally often.
        let mut follows = BTreeMap::new();
        for round in &order[..6] {
            for pair in round.windows(2) {
                *follows
                    .entry(format!("{:?}>{:?}", pair[0], pair[1]))
                    .or_insert(0) += 1;
            }
        }
        assert_eq!(follows.len(), 6, "{follows:?}");
        assert!(follows.values().all(|&n| n == 2), "{follows:?}");
        assert_eq!(paired_order(3, 0), vec![p], "without a reference");
        assert_eq!(case(Path::LbTcNat).paired_references(), &[Path::Direct]);
        let on_bridge = Case {
            path: Path::LbTcDsr,
            network: Network::Bridge,
        };
        assert_eq!(on_bridge.paired_references(), &[Path::Direct]);
        assert_eq!(
            case(Path::LbXdpDsr).paired_references(),
            &[Path::DirectXdpVeth]
        );
        assert_eq!(
            case(Path::LbProxy).paired_references(),
            &[Path::Haproxy, Path::Nginx],
            "the proxy's targets are against the peers"
        );
        let proxy_on_bridge = Case {
            path: Path::LbProxy,
            network: Network::Bridge,
        };
        assert!(
            proxy_on_bridge.paired_references().is_empty(),
            "no targets there"
        );
        assert!(case(Path::LbProxyUring).paired_references().is_empty());
        assert!(
            case(Path::Direct).paired_references().is_empty(),
            "no reference of a reference"
        );
    }

    #[test]
    fn a_round_is_filed_under_its_side() {
        let (mut samples, mut paired, mut notes) = Default::default();
        let path = "lb-tc-nat";
        let mut file = |side, who: Path, bulk: f64, note: &str| {
            let measured = (vec![(Metric::Bulk1, bulk)], vec![note.to_string()]);
            record(
                &mut samples,
                &mut paired,
                &mut notes,
                path,
                side,
                case(who),
                measured,
            );
        };
        file(Side::Path, Path::LbTcNat, 17.0, "a");
        file(Side::Reference(0), Path::Direct, 16.0, "b");
        file(Side::Reference(1), Path::Nginx, 9.0, "c");
        file(Side::Reference(0), Path::Direct, 15.0, "d");
        assert_eq!(samples[path][&Metric::Bulk1], vec![17.0]);
        let filed: Vec<(&str, &Vec<f64>)> = paired[path]
            .iter()
            .map(|(who, figures)| (who.name(), &figures[&Metric::Bulk1]))
            .collect();
        assert_eq!(
            filed,
            vec![("direct", &vec![16.0, 15.0]), ("nginx", &vec![9.0])],
            "each reference's rounds under its own name"
        );
        assert_eq!(
            notes[path],
            vec![
                "a",
                "the paired direct: b",
                "the paired nginx: c",
                "the paired direct: d"
            ],
            "the references' notes say whose they are"
        );
    }

    #[test]
    fn direct_runs_first_and_again_last_when_another_path_runs() {
        let cases = [case(Path::LbTcNat), case(Path::Direct), case(Path::Nginx)];
        let order: Vec<(&str, usize)> = bracket(&cases, 5)
            .into_iter()
            .map(|(c, first)| (c.name(), first))
            .collect();
        assert_eq!(
            order,
            vec![("direct", 0), ("lb-tc-nat", 0), ("nginx", 0), ("direct", 5)]
        );
        let alone: Vec<&str> = bracket(&[case(Path::Direct)], 5)
            .into_iter()
            .map(|(c, _)| c.name())
            .collect();
        assert_eq!(alone, vec!["direct"], "nothing to bracket");
        let without: Vec<&str> = bracket(&[case(Path::LbTcNat)], 5)
            .into_iter()
            .map(|(c, _)| c.name())
            .collect();
        assert_eq!(without, vec!["lb-tc-nat"]);
    }

    #[test]
    fn drift_gives_each_runs_median() {
        let mut samples = BTreeMap::new();
        samples.insert(Metric::Bulk1, vec![16.0, 17.0, 18.0, 14.0, 15.0, f64::NAN]);
        let note = drift(&samples, 3).expect("two runs");
        assert!(
            note.contains("bulk 1 flow Gbit/s 17.0 → 14.5 (-15%)"),
            "{note}"
        );
        samples.insert(Metric::Bulk1, vec![16.0, 17.0, 18.0]);
        assert_eq!(drift(&samples, 3), None, "one run has no drift");
    }
}
