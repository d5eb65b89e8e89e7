//! `cargo xtask`: builds the BPF program, runs the whole test suite, the demo and the
//! benchmark harness, installing what a fresh
//! machine lacks on the way (see `.cargo/config.toml` for the alias).

mod bench;
mod bpf_object;
mod build_ebpf;
mod demo;
mod fuzz;
mod fuzz_xdp;
mod package;
mod soak;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// lb's developer tasks.
#[derive(Parser)]
#[command(bin_name = "cargo xtask", about = "lb's build, test and demo tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build and check the XDP program (lb-ebpf); print the object's path.
    ///
    /// Builds with the nightly into target/bpf, installing rust-src and bpf-linker 0.10.4 first
    /// if they are missing, and checks the object is a BPF ELF with its programs and maps.
    BuildEbpf {
        /// Use the release profile (target/bpf/bpfel-unknown-none/release/lb-ebpf).
        #[arg(long)]
        release: bool,
    },
    /// Run everything CI runs (`.ci/run`).
    ///
    /// Installs missing packages, then build-ebpf, fmt, clippy, builds the daemon and the
    /// Debian package (for the test that installs it) and runs `cargo test --workspace`. Arguments after `--` go to `cargo test` (a filter,
    /// `-- --nocapture`).
    Test {
        /// Passed to `cargo test --workspace` as they are.
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Build lb-daemon and lb-demo, then run the demo with config/demo.toml.
    ///
    /// Exits with the demo's exit code.
    Demo {
        /// Keep the demo's services running until Ctrl-C (passed to lb-demo).
        #[arg(long)]
        serve: bool,
        /// Three lb nodes behind an ECMP router (BIRD, BGP, BFD) in network namespaces, and
        /// 300 long-lived flows through a node loss, a new node and a node drain (root).
        #[arg(long)]
        cluster: bool,
    },
    /// Run the throughput harness: direct, lb, HAProxy and nginx side by side (needs root).
    ///
    /// Installs haproxy, nginx and libnginx-mod-stream when missing, builds lb-daemon and
    /// lb-bench in release, and writes target/bench/report.md, report.json and ratios.svg.
    Bench {
        /// A short run (3 rounds of 2 s tests) instead of the full one (5 rounds of 5 s).
        #[arg(long)]
        quick: bool,
        /// Only these paths, comma-separated (lb-bench's `--only`), e.g.
        /// `direct,lb-tc-nat,lb-tc-dsr`.
        #[arg(long)]
        paths: Option<String>,
    },
    /// Run the XDP program on generated frames (BPF_PROG_TEST_RUN) and check every outcome
    /// (needs root); CI runs 100,000 of them in `cargo xtask test`.
    FuzzXdp {
        /// How many frames.
        #[arg(long, default_value_t = 1_000_000)]
        frames: u64,
        /// The generator's seed (default: the test's fixed seed).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Run one daemon on the tc data plane and the proxy under mixed TCP/UDP load, with a
    /// reload every 10 s and a backend stopped every 30 s (needs root); prints failed
    /// connections, lost datagrams, resident memory and descriptors over time, and a verdict.
    Soak {
        /// How long, in minutes.
        #[arg(long, default_value_t = 30)]
        minutes: u64,
    },
    /// Run the cargo-fuzz targets of fuzz/ (config, admin_request, relay) with libFuzzer, N
    /// minutes each (installs the nightly and cargo-fuzz when missing).
    Fuzz {
        /// Minutes per target.
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
    },
    /// Build the Debian package target/package/lb_<version>_<arch>.deb (lb-daemon, the BPF
    /// object, the systemd unit, /etc/lb/lb.toml); print its path.
    ///
    /// Install it with `apt install ./target/package/lb_*.deb`.
    Package,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::BuildEbpf { release } => build_ebpf::run(release).map(|object| {
            // Alone on stdout, so `OBJ=$(cargo xtask build-ebpf)` works.
            println!("{}", object.display());
            ExitCode::SUCCESS
        }),
        Task::Test { cargo_test_args } => test::run(&cargo_test_args),
        Task::Demo { serve, cluster } => demo::run(serve, cluster),
        Task::Bench { quick, paths } => bench::run(quick, paths.as_deref()),
        Task::FuzzXdp { frames, seed } => fuzz_xdp::run(frames, seed),
        Task::Soak { minutes } => soak::run(minutes),
        Task::Fuzz { minutes, target } => fuzz::run(minutes, target.as_deref()),
        Task::Package => package::run().map(|deb| {
            println!("{}", deb.display());
            ExitCode::SUCCESS
        }),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
