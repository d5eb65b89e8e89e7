//! The `lb-daemon` binary: `run` the balancer, `check` a config (like `nginx -t`), or `decap`
//! DSR traffic on a backend host.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lb_daemon::config;

/// lb: an L4 (TCP and UDP) load balancer.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the balancer in the foreground until SIGTERM or SIGINT.
    Run {
        /// The config file.
        #[arg(short, long, default_value = "/etc/lb/lb.toml")]
        config: PathBuf,
    },
    /// Validates a config file: exit 0 when valid, 2 with the file, line and field when not.
    Check {
        /// The config file.
        #[arg(short, long, default_value = "/etc/lb/lb.toml")]
        config: PathBuf,
    },
    /// On a DSR backend host: strips the balancer's IPIP/IP6IP6 header from packets arriving
    /// on IFACE (XDP program `lb_decap`) until SIGTERM or SIGINT. Put the VIP on `lo`.
    Decap {
        /// The interface the encapsulated packets arrive on.
        #[arg(long)]
        iface: String,
        /// The BPF object; default: $LB_EBPF_OBJ, `lb-ebpf` next to this executable,
        /// target/bpf/bpfel-unknown-none/release/lb-ebpf, /usr/lib/lb/lb-ebpf.
        #[arg(long)]
        bpf_object: Option<PathBuf>,
    },
}

/// Exit status for a config that cannot be used, as `nginx -t` and HAProxy `-c` do.
const EXIT_BAD_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Decap { iface, bpf_object } => {
            match lb_daemon::dataplane::xdp::decap::run(&iface, bpf_object.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{:#}", anyhow::Error::from(e));
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { config } => match config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} services, {} backends)",
                    config.display(),
                    c.services.len(),
                    c.services.iter().map(|s| s.backends.len()).sum::<usize>()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Run { config } => {
            let cfg = match config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            tracing::info!("config {} loaded", config.display());
            match lb_daemon::daemon::run(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{:#}", anyhow::Error::from(e));
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
