//! `lb-bench`: the side-by-side throughput harness (run it through `cargo xtask bench`, which
//! builds lb-daemon and installs HAProxy and nginx first). Needs root: it creates network
//! namespaces. Writes `report.md`, `report.json` and `ratios.svg` to `--out`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

use lb_benches::balancer::{Case, Programs};
use lb_benches::{chart, harness, stop};

/// Measure direct, lb, HAProxy and nginx on the same namespace topologies (backends on
/// veths, and on a bridge).
#[derive(Parser)]
#[command(name = "lb-bench")]
struct Args {
    /// The lb-daemon binary to measure (a release build).
    #[arg(long)]
    daemon: PathBuf,
    /// Where the report, chart, configs and logs go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// A short run: 3 rounds of 2 s tests (default: 5 rounds of 5 s).
    #[arg(long)]
    quick: bool,
    /// Rounds (overrides the default; at least 3).
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds per test (overrides the default).
    #[arg(long)]
    seconds: Option<f64>,
    /// Seconds of the churn test of lb-xdp-nat (new connections at full speed on the balancer
    /// that ran the rounds; 0 skips it).
    #[arg(long, default_value_t = 60)]
    churn_seconds: u64,
    /// Only these paths (comma-separated names, e.g. `direct,lb-tc-nat,lb-tc-dsr`; the bridge
    /// topology's end in `-bridge`: `direct-bridge,lb-tc-nat-bridge`). `--paths` is the same.
    #[arg(long, alias = "paths", value_delimiter = ',')]
    only: Vec<String>,
    /// The command line to record in the report (xtask passes its own).
    #[arg(long)]
    command: Option<String>,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("lb-bench needs root: it creates network namespaces and veth pairs");
    }
    stop::install();
    let rounds = args.rounds.unwrap_or(if args.quick { 3 } else { 5 });
    if rounds < 3 {
        bail!("--rounds {rounds}: at least 3 rounds are needed for a median with a range");
    }
    let seconds = args.seconds.unwrap_or(if args.quick { 2.0 } else { 5.0 });
    if !(seconds > 0.0 && seconds <= 120.0) {
        bail!("--seconds {seconds}: expected more than 0 and at most 120");
    }
    if args.churn_seconds != 0 && !(20..=3600).contains(&args.churn_seconds) {
        bail!(
            "--churn-seconds {}: expected 0 or 20 to 3600 (two 10 s windows at least)",
            args.churn_seconds
        );
    }
    let paths = if args.only.is_empty() {
        Case::all()
    } else {
        args.only
            .iter()
            .map(|n| {
                Case::named(n).with_context(|| {
                    let names: Vec<&str> = Case::all().into_iter().map(Case::name).collect();
                    format!("--only: no path named {n:?} (paths: {})", names.join(", "))
                })
            })
            .collect::<Result<_>>()?
    };
    let which = |name: &str| lb_tests_which(name);
    let programs = Programs {
        daemon: args.daemon.clone(),
        haproxy: which("haproxy"),
        nginx: which("nginx"),
        nginx_stream: [
            "/usr/lib/nginx/modules/ngx_stream_module.so",
            "/usr/lib64/nginx/modules/ngx_stream_module.so",
        ]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file()),
        // The end-to-end tests' lookup: $LB_EBPF_OBJ, else the workspace's release object.
        bpf_object: lb_benches::xdp::quietly(lb_tests::xdp::bpf_object),
    };
    if !programs.daemon.is_file() {
        bail!("--daemon {}: no such file", programs.daemon.display());
    }
    // The XDP paths' decapsulators (`lb_tests::xdp::Decap`) run this same binary; set before
    // any thread starts.
    std::env::set_var("LB_DAEMON_BIN", &programs.daemon);
    let command = args
        .command
        .clone()
        .unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" "));
    let plan = harness::Plan {
        programs,
        rounds,
        test_time: Duration::from_secs_f64(seconds),
        out: args.out.clone(),
        command,
        paths,
        churn_time: Duration::from_secs(args.churn_seconds),
    };
    let report = harness::run(&plan)?;
    std::fs::create_dir_all(&args.out)?;
    let md = format!(
        "# lb benchmark report\n\n{}\n![ratio to direct](ratios.svg)\n",
        report.to_markdown()
    );
    std::fs::write(args.out.join("report.md"), &md)?;
    std::fs::write(
        args.out.join("report.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    let svg = chart::ratios_svg(&report).map_err(anyhow::Error::msg)?;
    std::fs::write(args.out.join("ratios.svg"), svg)?;
    print!("{md}");
    eprintln!(
        "lb-bench: wrote {}/report.md, report.json and ratios.svg",
        args.out.display()
    );
    Ok(())
}

/// Finds `name` on `$PATH` (plus the sbin directories a non-login root shell may lack).
fn lb_tests_which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
