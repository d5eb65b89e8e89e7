//! Criterion micro-benchmarks of the pieces on the per-flow and per-rebuild paths:
//! the Maglev table build (per health or weight change), the table lookup and the flow hash
//! (per new flow, in both data planes), each proxy scheduler's pick (per new connection), and
//! the per-packet cost of the BPF programs `lb_xdp` and `lb_tc` under BPF_PROG_TEST_RUN
//! (`lb_benches::program_cost`; needs root and `LB_EBPF_OBJ`, else skipped with the reason
//! printed).
//!
//! Run with `cargo bench -p lb-benches --bench micro` (only the programs:
//! `... --bench micro -- program_cost`); criterion reports ns per lookup, per packet and ms
//! per build.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use lb_benches::program_cost::{Packet, Program, ProgramLab, RESTORED_REPEAT};
use lb_common::{flow_hash, FlowKey};
use lb_daemon::config::SchedulerKind;
use lb_daemon::maglev::{MaglevBackend, MaglevTable};
use lb_daemon::scheduler::{self, Candidate};
use lb_daemon::snapshot::BackendStats;

fn address(i: usize) -> SocketAddr {
    let i = i as u32;
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8),
        8080,
    ))
}

fn backends(n: usize) -> Vec<MaglevBackend> {
    (0..n)
        .map(|i| MaglevBackend {
            address: address(i),
            weight: 1 + (i as u32 * 7) % 16,
        })
        .collect()
}

fn flows(n: usize) -> Vec<FlowKey> {
    (0..n)
        .map(|i| FlowKey {
            src_addr: [u32::from_ne_bytes([192, 0, 2, (i % 250) as u8]), 0, 0, 0],
            dst_addr: [u32::from_ne_bytes([198, 51, 100, 1]), 0, 0, 0],
            src_port: 10_000 + (i % 50_000) as u16,
            dst_port: 80,
            protocol: 6,
            family: lb_common::maps::FAMILY_V4,
            _pad: [0; 2],
        })
        .collect()
}

fn maglev_build(c: &mut Criterion) {
    let mut g = c.benchmark_group("maglev_build");
    g.sample_size(20);
    for (n, m) in [
        (10, 65_537),
        (100, 65_537),
        (1_000, 65_537),
        (1_000, 655_373),
    ] {
        let set = backends(n);
        g.bench_with_input(
            BenchmarkId::new(format!("M={m}"), format!("{n} backends")),
            &set,
            |b, set| b.iter(|| MaglevTable::build(black_box(set), m).expect("valid set")),
        );
    }
    g.finish();
}

fn maglev_lookup(c: &mut Criterion) {
    let table = MaglevTable::build(&backends(100), 65_537).expect("valid set");
    let keys = flows(4096);
    let mut i = 0;
    c.bench_function("maglev_lookup (hash + slot)", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            table.lookup(flow_hash(black_box(&keys[i])))
        })
    });
    // The table read alone (the hash is shared with conntrack in XDP, so it is paid once per
    // packet either way): what the "lookup under 10 ns" target is about.
    let hashes: Vec<u32> = keys.iter().map(flow_hash).collect();
    let mut i = 0;
    c.bench_function("maglev_lookup (slot only)", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            table.lookup(black_box(hashes[i]))
        })
    });
}

fn hash(c: &mut Criterion) {
    let keys = flows(4096);
    let mut i = 0;
    c.bench_function("flow_hash", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            flow_hash(black_box(&keys[i]))
        })
    });
}

fn scheduler_pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("scheduler_pick (10 backends)");
    let keys = flows(4096);
    for kind in [
        SchedulerKind::Maglev,
        SchedulerKind::RoundRobin,
        SchedulerKind::WeightedRoundRobin,
        SchedulerKind::LeastConn,
        SchedulerKind::RandomTwo,
        SchedulerKind::SourceHash,
    ] {
        let candidates = backends(10)
            .into_iter()
            .enumerate()
            .map(|(id, b)| Candidate {
                id,
                address: b.address,
                weight: b.weight,
                stats: Arc::new(BackendStats::default()),
            })
            .collect();
        let s = scheduler::build(kind, candidates, 65_537, &scheduler::Turn::default())
            .expect("valid set");
        let mut i = 0;
        g.bench_function(format!("{kind:?}"), |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                s.pick(black_box(&keys[i]), &[])
            })
        });
    }
    g.finish();
}

/// ns per packet of `lb_xdp` and `lb_tc` for each case of `program_cost`: each iteration is
/// one BPF_PROG_TEST_RUN on a fresh frame, and the time criterion gets is the kernel's own
/// `duration` of the runs (the program, without the system call and the frame's copy); then
/// the restored cases, where each iteration is one run of 1,000 repetitions, each on the
/// case's own frame, and the time is the kernel's duration per repetition.
fn program_cost(c: &mut Criterion) {
    let mut lab = match ProgramLab::new() {
        Ok(lab) => lab,
        Err(why) => {
            eprintln!("program_cost: skipped: {why}");
            return;
        }
    };
    let mut g = c.benchmark_group("program_cost");
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for program in Program::ALL {
        if let Err(why) = lab.available(program) {
            eprintln!("program_cost: {}: skipped: {why}", program.name());
            continue;
        }
        for case in Packet::ALL {
            if let Err(why) = lab.prepare(program, case) {
                eprintln!(
                    "program_cost: {} {}: skipped: {why}",
                    program.name(),
                    case.name()
                );
                continue;
            }
            g.bench_function(format!("{} {}", program.name(), case.name()), |b| {
                b.iter_custom(|iters| kernel_time(iters, || lab.run(program, case)))
            });
        }
        // The same packets warm, as a stream of them would find the program: 1,000
        // repetitions per run, each on the case's own frame (`lb_benches::restore`). The
        // ARP frame's figure is the harness's own cost plus lb's at once-passed packets.
        for case in Packet::ALL {
            if let Err(why) = lab.prepare_restored(program, case) {
                eprintln!(
                    "program_cost: {} {}, restored: skipped: {why}",
                    program.name(),
                    case.name()
                );
                continue;
            }
            let name = format!(
                "{} {}, restored, repeat {RESTORED_REPEAT}",
                program.name(),
                case.name()
            );
            g.bench_function(name, |b| {
                b.iter_custom(|iters| kernel_time(iters, || lab.run_restored(program, case)))
            });
        }
    }
    g.finish();
}

/// The kernel's durations of `iters` test runs by `run`, summed: the time criterion gets.
/// Each case ran once already when it was prepared, so a failure now is the program changing
/// its answer mid-run, which the figure must not hide: it panics.
fn kernel_time(iters: u64, mut run: impl FnMut() -> Result<Duration, String>) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        match run() {
            Ok(d) => total += d,
            Err(e) => panic!("program_cost: {e}"),
        }
    }
    total
}

criterion_group!(
    benches,
    maglev_build,
    maglev_lookup,
    hash,
    scheduler_pick,
    program_cost
);
criterion_main!(benches);
