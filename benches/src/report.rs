//! The harness's results: one [`Report`] per run, its ratio tables, the targets, and
//! the markdown and JSON renderings.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::balancer::{Case, Path};
use crate::client::Rate;
use crate::metric::Metric;
use crate::stats::{summarize, Summary};
use crate::topology::Network;

/// What a path is, for the ratio columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    /// No balancer: the balancer namespace only routes (`direct`).
    Baseline,
    /// One of lb's data planes.
    Ours,
    /// A balancer a user would pick instead (HAProxy, nginx).
    Peer,
}

/// One figure of one path: every round's sample and their summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figure {
    /// One sample per round that measured it (NaN when that round's measurement failed).
    pub samples: Vec<f64>,
    /// Median and range of the finite samples; `None` when there are none.
    pub summary: Option<Summary>,
}

impl Figure {
    /// A figure from its samples.
    pub fn new(samples: Vec<f64>) -> Figure {
        let summary = summarize(&samples);
        Figure { samples, summary }
    }
}

/// One path's results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PathReport {
    /// The path's name (`direct`, `lb-proxy`, `haproxy`, `lb-tc-nat-bridge`...).
    pub name: String,
    /// The topology it ran on; its ratios are to that topology's `direct`.
    pub network: Network,
    /// Baseline, ours or a peer.
    pub kind: PathKind,
    /// Why the path did not run; `None` when it ran.
    pub skipped: Option<String>,
    /// Figures measured; a metric missing here does not apply to the path (HAProxy has no UDP).
    pub figures: BTreeMap<Metric, Figure>,
    /// What did not go as planned (a failed test in one round, a metric that does not apply).
    pub notes: Vec<String>,
    /// The references measured beside this path, their rounds interleaved with the path's
    /// (`Case::paired_references`); empty for a path without one, and without those that
    /// did not run.
    pub paired: Vec<PairedReference>,
}

impl PathReport {
    /// The median of `metric`, when measured.
    pub fn median(&self, metric: Metric) -> Option<f64> {
        median(&self.figures, metric)
    }

    /// Its paired run of the reference named `name`, if it has one.
    pub fn paired_run(&self, name: &str) -> Option<&PairedReference> {
        self.paired.iter().find(|r| r.name == name)
    }

    /// Its paired runs of peers (`lb-proxy`'s HAProxy and nginx).
    fn paired_peers(&self) -> impl Iterator<Item = &PairedReference> {
        self.paired.iter().filter(|r| r.kind == PathKind::Peer)
    }
}

/// A reference (`direct`, `direct-bridge`, `direct-xdp-veth`, or a peer beside `lb-proxy`)
/// measured on a twin of a path's topology in rounds interleaved with the path's: round 1
/// path then reference, round 2 reference then path, and so on (with two references, the
/// order turns by one place each round). Drift of the machine over minutes then lands on
/// every side of the path's ratios alike, where the topology's own reference runs (first and
/// last) can be half an hour away from the path, and a peer's own run minutes away.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairedReference {
    /// The reference's case name on the path's topology (`direct-bridge` beside
    /// `lb-tc-nat-bridge`, `haproxy` beside `lb-proxy`).
    pub name: String,
    /// A baseline or a peer.
    pub kind: PathKind,
    /// Its figures, one sample per round, as [`PathReport::figures`].
    pub figures: BTreeMap<Metric, Figure>,
}

/// Of the rounds in which both `path` and its paired `reference` measured a sample (finite,
/// the reference's not zero), how many gave a ratio that is `ok`, and how many there were.
/// Round k of each is the k-th sample: a failed round is NaN, not left out, so the two
/// stay in step.
fn rounds_met(path: &Figure, reference: &Figure, ok: &dyn Fn(f64) -> bool) -> (usize, usize) {
    let ratios: Vec<f64> = path
        .samples
        .iter()
        .zip(&reference.samples)
        .filter(|(p, r)| p.is_finite() && r.is_finite() && **r != 0.0)
        .map(|(p, r)| p / r)
        .collect();
    (ratios.iter().filter(|r| ok(**r)).count(), ratios.len())
}

/// The best of `figures`' samples of `metric` round by round, as one figure (one sample per
/// round): what a path's round is checked against when its reference is the best peer.
/// A round that one of them failed (NaN, or no sample) is NaN: the best of the others is
/// not that round's best peer. Figures without the metric (HAProxy's UDP) take no part;
/// `None` when none has it.
fn best_per_round(figures: &[&BTreeMap<Metric, Figure>], metric: Metric) -> Option<Figure> {
    let samples: Vec<&Vec<f64>> = figures
        .iter()
        .filter_map(|f| f.get(&metric))
        .map(|f| &f.samples)
        .collect();
    let rounds = samples.iter().map(|s| s.len()).max()?;
    let best = (0..rounds)
        .map(|k| {
            samples.iter().try_fold(f64::NAN, |best, s| {
                let v = s.get(k).copied().filter(|v| v.is_finite())?;
                Some(if best.is_nan() || metric.better(v, best) {
                    v
                } else {
                    best
                })
            })
        })
        .map(|best| best.unwrap_or(f64::NAN))
        .collect();
    Some(Figure::new(best))
}

fn median(figures: &BTreeMap<Metric, Figure>, metric: Metric) -> Option<f64> {
    figures
        .get(&metric)
        .and_then(|f| f.summary)
        .map(|s| s.median)
}

/// The machine a run happened on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Machine {
    /// CPU model from /proc/cpuinfo.
    pub cpu: String,
    /// Online CPUs.
    pub cores: usize,
    /// `uname -r`.
    pub kernel: String,
    /// 1-minute load average when the run started: high means other work was running.
    pub load_before: f64,
}

/// A whole run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The machine.
    pub machine: Machine,
    /// The command that produced it.
    pub command: String,
    /// When it started, UTC, `YYYY-MM-DD HH:MM`.
    pub date_utc: String,
    /// Rounds (each path measured once per round; a path's rounds one after the other, its
    /// paired reference's between them).
    pub rounds: usize,
    /// Seconds each test ran in each round.
    pub seconds_per_test: f64,
    /// Every path, run or skipped.
    pub paths: Vec<PathReport>,
    /// The churn figures (new connections at full speed for a minute on one balancer).
    pub churn: Vec<Churn>,
    /// Remarks about the whole run (methods, noise).
    pub notes: Vec<String>,
}

/// New connections per second at the start and at the end of a long run on one balancer: a
/// leak of anything a connection holds (SNAT ports, file descriptors) shows as `last` falling
/// below `first`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Churn {
    /// The path.
    pub path: String,
    /// How long the run went, s.
    pub seconds: f64,
    /// New connections/s in the first window.
    pub first: f64,
    /// New connections/s in the last window.
    pub last: f64,
    /// The window, s.
    pub window: f64,
    /// Connections that failed over the whole run.
    pub failed: u64,
}

impl Churn {
    /// The churn figure of `path` from its per-window rates (`windows` of `window` each, in
    /// order; at least one).
    pub fn from_windows(path: &str, window: Duration, windows: &[Rate]) -> Churn {
        let rate = |r: Option<&Rate>| r.map_or(f64::NAN, Rate::per_second);
        Churn {
            path: path.into(),
            seconds: window.as_secs_f64() * windows.len() as f64,
            first: rate(windows.first()),
            last: rate(windows.last()),
            window: window.as_secs_f64(),
            failed: windows.iter().map(|r| r.failed).sum(),
        }
    }

    /// `last / first`: 1.0 when nothing leaks.
    pub fn ratio(&self) -> f64 {
        self.last / self.first
    }
}

/// An issue-4 target checked against a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetCheck {
    /// What is compared, e.g. "lb-proxy bulk 8 flows vs best peer".
    pub what: String,
    /// The target, e.g. ">= 1.25x".
    pub target: String,
    /// The measured ratio, when both sides were measured.
    pub ratio: Option<f64>,
    /// Met, missed, or unknown (`None`: a side was not measured).
    pub met: Option<bool>,
    /// With a paired reference ([`PairedReference`], not the topology's own runs of it): in
    /// how many rounds the path's sample met the target against the reference's sample of
    /// the same round, and in how many rounds both were measured (`(3, 5)`: 3 of 5;
    /// `(0, 0)` when a side lacks the figure). One round's ratio moves by tenths on this
    /// machine, so a median a few percent off says less than a count that holds round after
    /// round. `None` without a paired reference: other runs are minutes away, not beside
    /// the path.
    pub rounds: Option<(usize, usize)>,
    /// What the ratio's reference is, for the report's column: `paired (↳ row)`, `paired
    /// (best ↳ row of each round)` (`lb-proxy` against its paired peers) or `its row`.
    pub reference: String,
}

impl TargetCheck {
    /// Whether the reference is the run paired with the path ([`PairedReference`]), not
    /// the topology's own runs of it: whether rounds could be counted.
    pub fn paired(&self) -> bool {
        self.rounds.is_some()
    }
}

impl Report {
    /// The path named `name`.
    pub fn path(&self, name: &str) -> Option<&PathReport> {
        self.paths.iter().find(|p| p.name == name)
    }

    /// The peer on `network` with the best median for `metric`, and that median.
    pub fn best_peer(&self, network: Network, metric: Metric) -> Option<(&PathReport, f64)> {
        self.paths
            .iter()
            .filter(|p| p.kind == PathKind::Peer && p.network == network)
            .filter_map(|p| p.median(metric).map(|m| (p, m)))
            .fold(None, |best, (p, m)| match best {
                Some((_, b)) if !metric.better(m, b) => best,
                _ => Some((p, m)),
            })
    }

    /// `path`'s median over `reference`'s for `metric`; `None` when either is missing or the
    /// reference is zero.
    pub fn ratio(&self, path: &PathReport, reference: f64, metric: Metric) -> Option<f64> {
        let value = path.median(metric)?;
        (reference != 0.0).then(|| value / reference)
    }

    /// The median of `metric` of the reference named `reference` as `path` is compared
    /// with it: the run paired with `path` when it has one of that name, else the path
    /// named `reference` in the report.
    pub fn reference_median(
        &self,
        path: &PathReport,
        reference: &str,
        metric: Metric,
    ) -> Option<f64> {
        match path.paired_run(reference) {
            Some(p) => median(&p.figures, metric),
            None => self.path(reference)?.median(metric),
        }
    }

    /// `path`'s ratio to `direct` on its own topology (`direct-bridge` on the bridge) for
    /// `metric`: to its paired run of it when it has one ([`PairedReference`]).
    pub fn ratio_to_direct(&self, path: &PathReport, metric: Metric) -> Option<f64> {
        let direct = self.reference_median(path, direct_name(path.network), metric)?;
        self.ratio(path, direct, metric)
    }

    /// The peers `path` is compared with, by case name, when it has paired runs of peers
    /// (`lb-proxy`): those its case pairs with (`Case::paired_references`), those it has
    /// runs of, and the topology's own peers. Each is read from the paired run when there is
    /// one, else from the topology's run ([`Report::reference_median`]), so a peer whose
    /// paired run did not start still counts. Empty for a path without paired peers.
    fn peers_of<'a>(&'a self, path: &'a PathReport) -> Vec<&'a str> {
        if path.paired_peers().next().is_none() {
            return Vec::new();
        }
        let expected = Case::all()
            .into_iter()
            .filter(|c| c.name() == path.name)
            .flat_map(|c| {
                c.paired_references().iter().map(move |&r| Case {
                    path: r,
                    network: c.network,
                })
            })
            .filter(|r| r.path.kind() == PathKind::Peer)
            .map(|r| r.name());
        let mut names: Vec<&str> = expected.collect();
        let others = path.paired_peers().map(|r| r.name.as_str()).chain(
            self.paths
                .iter()
                .filter(|p| p.kind == PathKind::Peer && p.network == path.network)
                .map(|p| p.name.as_str()),
        );
        for name in others {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }

    /// The best median of `metric` among the peers `path` is compared with: with paired
    /// runs of peers (`lb-proxy`), those of [`Report::peers_of`]; else the topology's
    /// peers ([`Report::best_peer`]). `None` when no such peer measured it.
    pub fn best_peer_median(&self, path: &PathReport, metric: Metric) -> Option<f64> {
        let peers = self.peers_of(path);
        if peers.is_empty() {
            return self.best_peer(path.network, metric).map(|(_, m)| m);
        }
        peers
            .into_iter()
            .filter_map(|name| self.reference_median(path, name, metric))
            .fold(None, |best, m| match best {
                Some(b) if !metric.better(m, b) => best,
                _ => Some(m),
            })
    }

    /// The paired runs `path` is checked against round by round for the best peer: its paired
    /// runs of every peer of [`Report::peers_of`], or `None` when one of those has none (a
    /// round's best would then miss a peer) or it has no paired peers at all.
    fn paired_peer_rounds<'a>(&'a self, path: &'a PathReport) -> Option<Vec<&'a PairedReference>> {
        let peers = self.peers_of(path);
        if peers.is_empty() {
            return None;
        }
        peers
            .into_iter()
            .map(|name| path.paired_run(name))
            .collect()
    }

    /// `path`'s ratio to the best peer for `metric`: of the peers of its paired runs when it
    /// has any, else of its topology's ([`Report::best_peer_median`]).
    pub fn ratio_to_best_peer(&self, path: &PathReport, metric: Metric) -> Option<f64> {
        let best = self.best_peer_median(path, metric)?;
        self.ratio(path, best, metric)
    }

    /// The networks with at least one path in the report, in report order.
    pub fn networks(&self) -> Vec<Network> {
        Network::ALL
            .into_iter()
            .filter(|n| self.paths.iter().any(|p| p.network == *n))
            .collect()
    }

    /// The issues' targets: lb's XDP and tc paths at least 1.0x their topology's `direct` on
    /// every figure but the cost ones (at most 1.0x for latency), the XDP paths at least 1.0x
    /// `direct-xdp-veth` (the program's cost alone), `lb-proxy` (the proxy with its default
    /// relay, as a user runs it) 1.25x the best peer on bulk throughput and 1.2x on new
    /// connections, and UDP p99 at most half of nginx's. A reference a path has a paired
    /// run of is read from that run ([`Report::reference_median`]).
    pub fn targets(&self) -> Vec<TargetCheck> {
        let mut out = Vec::new();
        let mut check = |what: String,
                         target: &str,
                         ratio: Option<f64>,
                         ok: &dyn Fn(f64) -> bool,
                         rounds: Option<(&Figure, &Figure)>,
                         best_of_round: bool| {
            let paired = rounds.is_some();
            out.push(TargetCheck {
                what,
                target: target.into(),
                ratio,
                met: ratio.map(ok),
                rounds: rounds.map(|(path, reference)| rounds_met(path, reference, ok)),
                reference: match (paired, best_of_round) {
                    (true, true) => "paired (best ↳ row of each round)",
                    (true, false) => "paired (↳ row)",
                    (false, _) => "its row",
                }
                .into(),
            });
        };
        let packet_paths = [Path::LbXdpNat, Path::LbXdpDsr, Path::LbTcNat, Path::LbTcDsr];
        for case in Network::ALL.into_iter().flat_map(|network| {
            packet_paths
                .into_iter()
                .map(move |path| Case { path, network })
        }) {
            let name = case.name();
            let Some(p) = self.path(name) else { continue };
            let mut references = vec![direct_name(case.network)];
            if case.path.xdp_setup().is_some() {
                references.push(Path::DirectXdpVeth.name());
            }
            for reference in references {
                let paired = p.paired_run(reference);
                // The issues' figures are the rates and latencies, not the costs.
                for m in Metric::ALL.into_iter().filter(|m| !m.is_cost()) {
                    let ratio = self
                        .reference_median(p, reference, m)
                        .and_then(|v| self.ratio(p, v, m));
                    let what = format!("{name} {} vs {reference}", m.heading());
                    let empty = Figure::new(Vec::new());
                    let rounds = paired.map(|r| {
                        (
                            p.figures.get(&m).unwrap_or(&empty),
                            r.figures.get(&m).unwrap_or(&empty),
                        )
                    });
                    if m.higher_is_better() {
                        check(what, ">= 1.0x", ratio, &|r| r >= 1.0, rounds, false);
                    } else {
                        check(what, "<= 1.0x", ratio, &|r| r <= 1.0, rounds, false);
                    }
                }
            }
        }
        if let Some(p) = self.path("lb-proxy") {
            // Round by round against the best of its paired peers, when every peer it is
            // compared with has a paired run.
            let peers: Option<Vec<&BTreeMap<Metric, Figure>>> = self
                .paired_peer_rounds(p)
                .map(|runs| runs.into_iter().map(|r| &r.figures).collect());
            let empty = Figure::new(Vec::new());
            let rounds_of = |m: Metric, of: &[&BTreeMap<Metric, Figure>]| {
                best_per_round(of, m).unwrap_or_else(|| empty.clone())
            };
            for (m, target, goal) in [
                (Metric::Bulk1, ">= 1.25x", 1.25),
                (Metric::Bulk8, ">= 1.25x", 1.25),
                (Metric::ConnRate, ">= 1.2x", 1.2),
            ] {
                let best = peers.as_deref().map(|of| rounds_of(m, of));
                check(
                    format!("lb-proxy {} vs best peer", m.heading()),
                    target,
                    self.ratio_to_best_peer(p, m),
                    &|r| r >= goal,
                    best.as_ref()
                        .map(|b| (p.figures.get(&m).unwrap_or(&empty), b)),
                    true,
                );
            }
            let nginx = self.reference_median(p, "nginx", Metric::UdpP99);
            let paired_nginx = p
                .paired_run("nginx")
                .map(|r| rounds_of(Metric::UdpP99, &[&r.figures]));
            check(
                "lb-proxy UDP p99 µs vs nginx".into(),
                "<= 0.5x",
                nginx.and_then(|n| self.ratio(p, n, Metric::UdpP99)),
                &|r| r <= 0.5,
                paired_nginx
                    .as_ref()
                    .map(|n| (p.figures.get(&Metric::UdpP99).unwrap_or(&empty), n)),
                false,
            );
        }
        out
    }

    /// What the header's rounds line adds for paired runs: the clause for lb's tc and XDP
    /// paths when one of them has a paired reference, and one naming the peers measured
    /// beside each path that has paired peers (`lb-proxy`). Empty without paired runs.
    fn paired_clauses(&self) -> String {
        let mut s = String::new();
        if self
            .paths
            .iter()
            .any(|p| p.paired.iter().any(|r| r.kind == PathKind::Baseline))
        {
            s.push_str(
                "; lb's tc and XDP paths: their targets' reference (`↳` rows) measured beside \
                 them on a twin topology, rounds interleaved, and their LB CPU and program \
                 ns/run from one more round with BPF run-time statistics on (one sample: its \
                 min–max repeats it)",
            );
        }
        for p in &self.paths {
            let peers: Vec<&str> = p.paired_peers().map(|r| r.name.as_str()).collect();
            if !peers.is_empty() {
                let _ = write!(
                    s,
                    "; `{}`: {} measured beside it the same way, each on a twin (`↳` rows), its \
                     best-peer ratios and targets against them",
                    p.name,
                    peers.join(" and ")
                );
            }
        }
        s
    }

    /// The report as markdown: machine, absolute figures (median and min–max), ratios to
    /// `direct` and to the best peer, targets, notes.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(s, "## Run of {} UTC\n", self.date_utc);
        let _ = writeln!(s, "- command: `{}`", self.command);
        let _ = writeln!(
            s,
            "- machine: {} cores, {}, kernel {}; load average {:.2} when it started",
            m.cores, m.cpu, m.kernel, m.load_before
        );
        let _ = writeln!(
            s,
            "- each figure: median of {} rounds (min–max in brackets) on one balancer per path, \
             {} s per test; `direct` and `direct-bridge`: {} rounds, run first and again last \
             on their topology{}",
            self.rounds,
            self.seconds_per_test,
            2 * self.rounds,
            self.paired_clauses()
        );
        for network in self.networks() {
            self.network_tables(&mut s, network);
        }
        if !self.churn.is_empty() {
            let _ = writeln!(
                s,
                "\n### Churn (new connections at full speed on one balancer)\n"
            );
            let _ = writeln!(
                s,
                "| path | run s | first window conn/s | last window conn/s | last / first | failed |"
            );
            let _ = writeln!(s, "|---|---|---|---|---|---|");
            for c in &self.churn {
                let _ = writeln!(
                    s,
                    "| {} | {:.0} | {} | {} | {:.2}x | {} |",
                    c.path,
                    c.seconds,
                    number(c.first),
                    number(c.last),
                    c.ratio(),
                    c.failed
                );
            }
        }
        let targets = self.targets();
        if !targets.is_empty() {
            let _ = writeln!(s, "\n### Targets (issues 4 and 11)\n");
            let _ = writeln!(
                s,
                "| figure | target | measured | verdict | reference | rounds met |"
            );
            let _ = writeln!(s, "|---|---|---|---|---|---|");
            for t in targets {
                let verdict = match (t.met, t.ratio) {
                    (Some(true), _) => "met".to_string(),
                    (Some(false), Some(r)) => format!("missed ({})", miss(&t.target, r)),
                    _ => "not measured".to_string(),
                };
                let measured = t.ratio.map_or("–".to_string(), |r| format!("{r:.2}x"));
                let rounds = t
                    .rounds
                    .map_or("–".to_string(), |(met, of)| format!("{met} of {of}"));
                let _ = writeln!(
                    s,
                    "| {} | {} | {measured} | {verdict} | {} | {rounds} |",
                    t.what, t.target, t.reference
                );
            }
        }
        let notes: Vec<String> = self
            .paths
            .iter()
            .flat_map(|p| p.notes.iter().map(move |n| format!("{}: {n}", p.name)))
            .chain(self.notes.iter().cloned())
            .collect();
        if !notes.is_empty() {
            let _ = writeln!(s, "\n### Notes\n");
            for n in notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        s
    }

    /// The absolute and ratio tables of the paths on `network`, appended to `s`.
    fn network_tables(&self, s: &mut String, network: Network) {
        let _ = writeln!(
            s,
            "\n### {} topology: absolute figures\n\n{}\n",
            network.name(),
            network_blurb(network)
        );
        header(s, "path");
        let paths: Vec<&PathReport> = self.paths.iter().filter(|p| p.network == network).collect();
        for p in &paths {
            let _ = write!(s, "| {} |", p.name);
            if let Some(reason) = &p.skipped {
                let _ = writeln!(
                    s,
                    " skipped: {} |{}",
                    reason,
                    " |".repeat(Metric::ALL.len() - 1)
                );
                continue;
            }
            figure_cells(s, &p.figures);
            for r in &p.paired {
                let _ = write!(s, "| ↳ {} beside {} |", r.name, p.name);
                figure_cells(s, &r.figures);
            }
        }
        for (title, f) in [
            (
                format!("Ratio to `{}`", direct_name(network)),
                Report::ratio_to_direct as fn(&Report, &PathReport, Metric) -> Option<f64>,
            ),
            (
                "Ratio to the best peer".to_string(),
                Report::ratio_to_best_peer,
            ),
        ] {
            let _ = writeln!(
                s,
                "\n#### {} topology: {title} (value / reference; ↑ higher is better, ↓ lower is better)\n",
                network.name()
            );
            let paired_direct = paths
                .iter()
                .any(|p| p.paired_run(direct_name(network)).is_some());
            let paired_peers = paths.iter().any(|p| p.paired_peers().next().is_some());
            if title.starts_with("Ratio to `") && paired_direct {
                let _ = writeln!(
                    s,
                    "Paths with a `↳ {}` row above are divided by that paired run, measured in \
                     rounds interleaved with theirs; the others by the topology's own `{}` \
                     runs.\n",
                    direct_name(network),
                    direct_name(network)
                );
            }
            if title.starts_with("Ratio to the best") && paired_peers {
                let _ = writeln!(
                    s,
                    "Paths with peers' `↳` rows above are divided by the best of those paired \
                     runs, measured in rounds interleaved with theirs; the others by the best \
                     of the topology's own peer runs (listed below the table).\n"
                );
            }
            header(s, "path");
            for p in paths.iter().filter(|p| p.skipped.is_none()) {
                let _ = write!(s, "| {} |", p.name);
                for metric in Metric::ALL {
                    let cell = f(self, p, metric).map_or("–".to_string(), |r| format!("{r:.2}x"));
                    let _ = write!(s, " {cell} |");
                }
                s.push('\n');
            }
        }
        let best: Vec<String> = Metric::ALL
            .into_iter()
            .filter_map(|metric| {
                let (p, v) = self.best_peer(network, metric)?;
                Some(format!(
                    "- {}: {} ({})",
                    metric.heading(),
                    p.name,
                    number(v)
                ))
            })
            .collect();
        if !best.is_empty() {
            let _ = writeln!(
                s,
                "\nBest peer per figure ({} topology):\n{}",
                network.name(),
                best.join("\n")
            );
        }
    }
}

/// Appends one table row's figure cells (median and min–max, `failed`, `n/a`) to `s`.
fn figure_cells(s: &mut String, figures: &BTreeMap<Metric, Figure>) {
    for metric in Metric::ALL {
        let cell = match figures.get(&metric).and_then(|f| f.summary) {
            Some(x) => format!("{} ({}–{})", number(x.median), number(x.min), number(x.max)),
            None if figures.contains_key(&metric) => "failed".into(),
            None => "n/a".into(),
        };
        let _ = write!(s, " {cell} |");
    }
    s.push('\n');
}

/// The name of `network`'s no-balancer baseline (`direct`, `direct-bridge`).
pub fn direct_name(network: Network) -> &'static str {
    Case {
        path: Path::Direct,
        network,
    }
    .name()
}

/// One line on how the backends of `network` are attached, above its tables.
fn network_blurb(network: Network) -> &'static str {
    match network {
        Network::Veth => "Each backend on its own veth pair to the balancer.",
        Network::Bridge => {
            "The backends' veths enslaved to the bridge br0 in the balancer's namespace (as \
             Docker attaches containers); the client on its own veth. No XDP paths: \
             XDP_REDIRECT cannot send into a bridge."
        }
    }
}

/// How far `ratio` is from the target `">= 1.25x"` / `"<= 0.5x"`, in percent of the target.
fn miss(target: &str, ratio: f64) -> String {
    let goal: f64 = target
        .trim_start_matches([' ', '>', '<', '='])
        .trim_end_matches('x')
        .trim()
        .parse()
        .unwrap_or(f64::NAN);
    format!(
        "by {:.0}% of the target",
        ((ratio - goal) / goal * 100.0).abs()
    )
}

fn header(s: &mut String, first: &str) {
    let _ = write!(s, "| {first} |");
    for metric in Metric::ALL {
        let arrow = if metric.higher_is_better() {
            "↑"
        } else {
            "↓"
        };
        let _ = write!(s, " {} {arrow} |", metric.heading());
    }
    let _ = writeln!(s, "\n|---|{}", "---|".repeat(Metric::ALL.len()));
}

/// A figure with 3 significant digits, in plain notation.
pub fn number(x: f64) -> String {
    let a = x.abs();
    if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(name: &str, kind: PathKind, figures: &[(Metric, &[f64])]) -> PathReport {
        PathReport {
            name: name.into(),
            network: if name.ends_with("-bridge") {
                Network::Bridge
            } else {
                Network::Veth
            },
            kind,
            skipped: None,
            figures: figures
                .iter()
                .map(|(m, v)| (*m, Figure::new(v.to_vec())))
                .collect(),
            notes: vec![],
            paired: vec![],
        }
    }

    /// `r`'s path named `name`, to change.
    fn path_mut<'r>(r: &'r mut Report, name: &str) -> &'r mut PathReport {
        r.paths.iter_mut().find(|p| p.name == name).expect(name)
    }

    /// A run named `name` measured beside a path, with one sample per round of each figure.
    fn paired(name: &str, kind: PathKind, figures: &[(Metric, Vec<f64>)]) -> PairedReference {
        PairedReference {
            name: name.into(),
            kind,
            figures: figures
                .iter()
                .map(|(m, v)| (*m, Figure::new(v.clone())))
                .collect(),
        }
    }

    fn report() -> Report {
        let mut xdp = path("lb-xdp-nat", PathKind::Ours, &[]);
        xdp.skipped = Some("the BPF object was not found".into());
        Report {
            machine: Machine {
                cpu: "Test CPU".into(),
                cores: 2,
                kernel: "6.18".into(),
                load_before: 0.5,
            },
            command: "cargo xtask bench --quick".into(),
            date_utc: "2026-11-21 15:00".into(),
            rounds: 3,
            seconds_per_test: 2.0,
            paths: vec![
                path(
                    "direct",
                    PathKind::Baseline,
                    &[
                        (Metric::Bulk8, &[10.0, 9.0, 11.0]),
                        (Metric::UdpP99, &[50.0; 3]),
                    ],
                ),
                path(
                    "lb-proxy",
                    PathKind::Ours,
                    &[
                        (Metric::Bulk8, &[6.0, 5.0, 7.0]),
                        (Metric::ConnRate, &[1200.0; 3]),
                        (Metric::UdpP99, &[100.0; 3]),
                    ],
                ),
                path(
                    "haproxy",
                    PathKind::Peer,
                    &[(Metric::Bulk8, &[4.0; 3]), (Metric::ConnRate, &[1100.0; 3])],
                ),
                path(
                    "nginx",
                    PathKind::Peer,
                    &[
                        (Metric::Bulk8, &[3.0; 3]),
                        (Metric::ConnRate, &[900.0; 3]),
                        (Metric::UdpP99, &[300.0, f64::NAN, 200.0]),
                    ],
                ),
                xdp,
                path(
                    "direct-bridge",
                    PathKind::Baseline,
                    &[
                        (Metric::Bulk8, &[20.0; 3]),
                        (Metric::PacketRate, &[400_000.0; 3]),
                    ],
                ),
                path(
                    "lb-tc-nat-bridge",
                    PathKind::Ours,
                    &[
                        (Metric::Bulk8, &[21.0; 3]),
                        (Metric::PacketRate, &[300_000.0; 3]),
                    ],
                ),
                path(
                    "nginx-bridge",
                    PathKind::Peer,
                    &[(Metric::Bulk8, &[7.0; 3])],
                ),
            ],
            churn: vec![Churn::from_windows(
                "lb-xdp-nat",
                Duration::from_secs(10),
                &[
                    Rate {
                        done: 200_000,
                        failed: 0,
                        seconds: 10.0,
                    },
                    Rate {
                        done: 190_000,
                        failed: 2,
                        seconds: 10.0,
                    },
                ],
            )],
            notes: vec!["other work was running".into()],
        }
    }

    #[test]
    fn ratios_compare_medians_with_direct_and_with_the_best_peer() {
        let r = report();
        let lb = r.path("lb-proxy").expect("lb-proxy path");
        assert_eq!(r.ratio_to_direct(lb, Metric::Bulk8), Some(0.6));
        let (best, v) = r
            .best_peer(Network::Veth, Metric::Bulk8)
            .expect("a peer measured bulk 8");
        assert_eq!((best.name.as_str(), v), ("haproxy", 4.0));
        assert_eq!(r.ratio_to_best_peer(lb, Metric::Bulk8), Some(1.5));
        // Lower is better for latency: the best peer is the one with the smaller p99.
        let (best, v) = r
            .best_peer(Network::Veth, Metric::UdpP99)
            .expect("nginx measured UDP");
        assert_eq!((best.name.as_str(), v), ("nginx", 250.0));
        assert_eq!(
            r.ratio_to_direct(lb, Metric::KeepAliveRate),
            None,
            "a figure nobody measured has no ratio"
        );
    }

    #[test]
    fn targets_say_which_are_met_and_which_missed() {
        let r = report();
        let t = r.targets();
        let find = |what: &str| t.iter().find(|c| c.what.contains(what)).expect(what);
        let bulk = find("lb-proxy bulk 8 flows");
        assert_eq!((bulk.ratio, bulk.met), (Some(1.5), Some(true)));
        let conn = find("lb-proxy new conn/s");
        assert_eq!(conn.met, Some(false), "1200 vs 1100 is below 1.2x");
        let p99 = find("lb-proxy UDP p99");
        assert_eq!((p99.ratio, p99.met), (Some(0.4), Some(true)));
        let xdp = find("lb-xdp-nat bulk 8 flows");
        assert_eq!(xdp.met, None, "a skipped path's targets are not measured");
    }

    #[test]
    fn a_paired_reference_is_what_its_path_is_compared_with() {
        let mut r = report();
        // The topology's own runs had 20 Gbit/s and 400k pkt/s; the run beside it 25 and 250k.
        path_mut(&mut r, "lb-tc-nat-bridge").paired = vec![paired(
            "direct-bridge",
            PathKind::Baseline,
            &[
                (Metric::Bulk8, vec![20.0, 25.0, 26.0]),
                (Metric::PacketRate, vec![250_000.0, f64::NAN, 250_000.0]),
            ],
        )];
        let tc = r.path("lb-tc-nat-bridge").expect("the tc path");
        assert_eq!(r.ratio_to_direct(tc, Metric::Bulk8), Some(21.0 / 25.0));
        let md = r.to_markdown();
        let t = r.targets();
        let find = |what: &str| t.iter().find(|c| c.what == what).expect(what);
        let bulk = find("lb-tc-nat-bridge bulk 8 flows Gbit/s vs direct-bridge");
        assert_eq!(
            (bulk.met, bulk.paired(), bulk.rounds),
            (Some(false), true, Some((1, 3))),
            "21 against the paired 25; 21 against 20 in round 1"
        );
        let pps = find("lb-tc-nat-bridge 64-byte pkt/s vs direct-bridge");
        assert_eq!(
            (pps.ratio, pps.met, pps.paired(), pps.rounds),
            (Some(1.2), Some(true), true, Some((2, 2))),
            "the reference's failed round 2 is no round of the pair"
        );
        let p99 = find("lb-tc-nat-bridge UDP p99 µs vs direct-bridge");
        assert_eq!(
            (p99.met, p99.rounds),
            (None, Some((0, 0))),
            "measured by neither"
        );
        let row = "| lb-tc-nat-bridge bulk 8 flows Gbit/s vs direct-bridge | >= 1.0x | 0.84x | \
                   missed (by 16% of the target) | paired (↳ row) | 1 of 3 |";
        assert!(md.contains(row), "{md}");
        // A path without one still goes by the topology's own runs.
        let lb = r.path("lb-proxy").expect("lb-proxy");
        assert_eq!(r.ratio_to_direct(lb, Metric::Bulk8), Some(0.6));
        assert!(
            md.contains("| ↳ direct-bridge beside lb-tc-nat-bridge | n/a | 25.0 (20.0–26.0) |"),
            "the paired run has its own row: {md}"
        );
        assert!(
            md.contains("| lb-tc-nat-bridge | – | 0.84x |"),
            "its ratio is to the paired run: {md}"
        );
        assert!(
            md.contains("Paths with a `↳ direct-bridge` row above"),
            "{md}"
        );
        assert!(
            !md.contains("Paths with a `↳ direct` row above"),
            "no veth path is paired with direct: {md}"
        );
        assert!(
            md.contains("reference (`↳` rows) measured beside them"),
            "{md}"
        );
        assert!(
            !md.contains("measured beside it the same way"),
            "lb-proxy has no paired peers here: {md}"
        );
    }

    #[test]
    fn a_peer_without_a_paired_run_is_read_from_its_own_run_and_rounds_are_not_counted() {
        let mut r = report();
        // Only nginx ran beside it (HAProxy's twin failed): HAProxy's own run (1,100 conn/s)
        // is still the best peer, and a round's best cannot be told without HAProxy's.
        path_mut(&mut r, "lb-proxy").paired = vec![paired(
            "nginx",
            PathKind::Peer,
            &[(Metric::ConnRate, vec![800.0; 3])],
        )];
        let lb = r.path("lb-proxy").expect("lb-proxy");
        assert_eq!(
            r.ratio_to_best_peer(lb, Metric::ConnRate),
            Some(1200.0 / 1100.0)
        );
        let t = r.targets();
        let conn = t
            .iter()
            .find(|c| c.what == "lb-proxy new conn/s vs best peer")
            .expect("the target");
        assert_eq!((conn.rounds, conn.reference.as_str()), (None, "its row"));
        r.paths.retain(|p| p.name != "haproxy");
        let lb = r.path("lb-proxy").expect("lb-proxy");
        assert_eq!(
            r.ratio_to_best_peer(lb, Metric::ConnRate),
            Some(1.5),
            "with no run of HAProxy at all, the paired nginx is the best there is"
        );
        let t = r.targets();
        let conn = t
            .iter()
            .find(|c| c.what == "lb-proxy new conn/s vs best peer")
            .expect("the target");
        assert_eq!(
            conn.rounds, None,
            "HAProxy is still missing from every round"
        );
    }

    #[test]
    fn the_best_of_a_round_is_per_metric_and_none_when_a_peer_failed_it() {
        let a: BTreeMap<Metric, Figure> = [
            (Metric::UdpP99, Figure::new(vec![300.0, 200.0, f64::NAN])),
            (Metric::ConnRate, Figure::new(vec![10.0, 30.0, 20.0])),
        ]
        .into();
        let b: BTreeMap<Metric, Figure> = [
            (Metric::UdpP99, Figure::new(vec![250.0, 260.0, 100.0])),
            (Metric::ConnRate, Figure::new(vec![20.0, 25.0, 15.0])),
        ]
        .into();
        let no_udp: BTreeMap<Metric, Figure> =
            [(Metric::ConnRate, Figure::new(vec![5.0; 3]))].into();
        let best = |m| {
            best_per_round(&[&a, &b, &no_udp], m)
                .expect("measured")
                .samples
        };
        assert_eq!(
            best(Metric::ConnRate),
            vec![20.0, 30.0, 20.0],
            "higher is better"
        );
        let p99 = best(Metric::UdpP99);
        assert_eq!(&p99[..2], &[250.0, 200.0], "lower is better");
        assert!(p99[2].is_nan(), "a's round 3 failed: not b's 100 alone");
        assert_eq!(best_per_round(&[&no_udp], Metric::UdpP99), None);
    }

    #[test]
    fn lb_proxy_with_paired_peers_is_checked_against_the_best_of_them_round_by_round() {
        let mut r = report();
        let lb = path_mut(&mut r, "lb-proxy");
        lb.figures
            .insert(Metric::ConnRate, Figure::new(vec![1200.0, 1300.0, 1250.0]));
        // The peers' own runs (haproxy 1,100 conn/s, nginx 900 and a p99 of 250 µs) are
        // not what lb-proxy is compared with once it has runs of them beside it.
        lb.paired = vec![
            paired(
                "haproxy",
                PathKind::Peer,
                &[(Metric::ConnRate, vec![1000.0, 1200.0, 900.0])],
            ),
            paired(
                "nginx",
                PathKind::Peer,
                &[
                    (Metric::ConnRate, vec![950.0, 1050.0, 1100.0]),
                    (Metric::UdpP99, vec![250.0, 150.0, f64::NAN]),
                ],
            ),
        ];
        let lb = r.path("lb-proxy").expect("lb-proxy");
        assert_eq!(
            r.ratio_to_best_peer(lb, Metric::ConnRate),
            Some(1250.0 / 1050.0),
            "its median over the best paired median (nginx's 1,050, not HAProxy's own 1,100)"
        );
        let t = r.targets();
        let find = |what: &str| t.iter().find(|c| c.what == what).expect(what);
        let conn = find("lb-proxy new conn/s vs best peer");
        assert_eq!(
            (conn.met, conn.rounds),
            (Some(false), Some((1, 3))),
            "round by round against the best peer of the round: 1,000, 1,200, 1,100"
        );
        let p99 = find("lb-proxy UDP p99 µs vs nginx");
        assert_eq!(
            (p99.ratio, p99.met, p99.rounds),
            (Some(0.5), Some(true), Some((1, 2))),
            "against the paired nginx; its failed round 3 is no round of the pair"
        );
        let bulk = find("lb-proxy bulk 8 flows Gbit/s vs best peer");
        assert_eq!(
            (bulk.ratio, bulk.rounds),
            (None, Some((0, 0))),
            "the paired peers did not measure it: not measured, not the peers' own runs"
        );
        let md = r.to_markdown();
        assert!(md.contains("| ↳ haproxy beside lb-proxy |"), "{md}");
        assert!(md.contains("| ↳ nginx beside lb-proxy |"), "{md}");
        assert!(
            md.contains("| paired (best ↳ row of each round) | 1 of 3 |"),
            "{md}"
        );
        assert!(
            md.contains("; `lb-proxy`: haproxy and nginx measured beside it"),
            "{md}"
        );
        assert!(
            !md.contains("lb's tc and XDP paths: their targets' reference"),
            "no tc or XDP path is paired here: {md}"
        );
        assert!(
            md.contains("Paths with peers' `↳` rows above are divided by the best"),
            "{md}"
        );
        let nginx = r.path("nginx").expect("nginx");
        assert_eq!(
            r.ratio_to_best_peer(nginx, Metric::ConnRate),
            Some(900.0 / 1100.0),
            "a path without paired peers keeps the topology's"
        );
    }

    #[test]
    fn an_xdp_path_paired_with_direct_xdp_veth_keeps_the_topologys_direct() {
        let mut r = report();
        r.paths.push(path(
            "direct-xdp-veth",
            PathKind::Baseline,
            &[(Metric::Bulk8, &[2.0; 3])],
        ));
        let xdp = path_mut(&mut r, "lb-xdp-nat");
        xdp.skipped = None;
        xdp.figures = [(Metric::Bulk8, Figure::new(vec![5.0; 3]))].into();
        xdp.paired = vec![paired(
            "direct-xdp-veth",
            PathKind::Baseline,
            &[(Metric::Bulk8, vec![4.0; 3])],
        )];
        let xdp = r.path("lb-xdp-nat").expect("the XDP path");
        // Its direct is the topology's (10), not the paired direct-xdp-veth (4).
        assert_eq!(r.ratio_to_direct(xdp, Metric::Bulk8), Some(0.5));
        let t = r.targets();
        let find = |what: &str| t.iter().find(|c| c.what == what).expect(what);
        let direct = find("lb-xdp-nat bulk 8 flows Gbit/s vs direct");
        assert_eq!((direct.ratio, direct.paired()), (Some(0.5), false));
        let pass = find("lb-xdp-nat bulk 8 flows Gbit/s vs direct-xdp-veth");
        assert_eq!(
            (pass.ratio, pass.paired()),
            (Some(1.25), true),
            "5 against the paired 4"
        );
        let md = r.to_markdown();
        assert!(
            md.contains("| ↳ direct-xdp-veth beside lb-xdp-nat |"),
            "{md}"
        );
        assert!(
            !md.contains("Paths with a `↳ direct` row above"),
            "its direct ratio is to the topology's own runs: {md}"
        );
    }

    #[test]
    fn bridge_paths_compare_with_the_bridge_topology_and_its_peers() {
        let r = report();
        let tc = r
            .path("lb-tc-nat-bridge")
            .expect("the tc path on the bridge");
        assert_eq!(r.ratio_to_direct(tc, Metric::Bulk8), Some(1.05));
        assert_eq!(r.ratio_to_best_peer(tc, Metric::Bulk8), Some(3.0));
        assert_eq!(r.networks(), vec![Network::Veth, Network::Bridge]);
        let t = r.targets();
        let find = |what: &str| t.iter().find(|c| c.what == what).expect(what);
        let bulk = find("lb-tc-nat-bridge bulk 8 flows Gbit/s vs direct-bridge");
        assert_eq!(bulk.met, Some(true));
        let pps = find("lb-tc-nat-bridge 64-byte pkt/s vs direct-bridge");
        assert_eq!((pps.ratio, pps.met), (Some(0.75), Some(false)));
        assert!(
            t.iter().all(|c| !c.what.contains("softirq")),
            "softirq time is machine-wide, not a target"
        );
        let md = r.to_markdown();
        assert!(md.contains("### bridge topology: absolute figures"), "{md}");
        assert!(
            md.contains("#### bridge topology: Ratio to `direct-bridge`"),
            "the bridge table has its own baseline: {md}"
        );
        assert!(md.contains("| lb-tc-nat-bridge | – | 1.05x |"), "{md}");
    }

    #[test]
    fn markdown_has_every_path_skips_with_reasons_and_ranges() {
        let md = report().to_markdown();
        assert!(md.contains("| direct | n/a | 10.0 (9.00–11.0) |"), "{md}");
        assert!(
            md.contains("| lb-xdp-nat | skipped: the BPF object was not found |"),
            "a skipped path is listed with its reason: {md}"
        );
        assert!(
            md.contains("| lb-proxy | – | 1.50x |"),
            "ratio to best peer: {md}"
        );
        assert!(md.contains("missed (by 9% of the target)"), "{md}");
        assert!(md.contains("- other work was running"), "{md}");
        assert!(!md.contains("twin topology"), "no path was paired: {md}");
        let json = serde_json::to_string(&report()).expect("report serializes");
        assert!(json.contains("\"bulk8\""), "{json}");
    }
}
