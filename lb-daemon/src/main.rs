//! The `lb-daemon` binary: `run` the balancer, `check` a config like `nginx -t`, talk to a
//! running daemon's admin API (`status`, `drain`, `enable`, `weight`, `reload`,
//! `drain-node`, `enable-node`), or `decap`
//! DSR traffic on a backend host.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hyper::Method;
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
    /// Runs the balancer in the foreground until SIGTERM or SIGINT (SIGHUP reloads the
    /// config, SIGQUIT exits leaving the eBPF plane, SIGUSR2 upgrades in place).
    Run {
        /// The config file.
        #[arg(short, long, default_value = "/etc/lb/lb.toml")]
        config: PathBuf,
    },
    /// Replaces the running daemon without a gap: runs the balancer as `run` does, taking the
    /// listening sockets of the daemon serving `[global] upgrade_socket` and adopting its
    /// pinned eBPF data plane; once this one is ready, the old one stops accepting, lets its
    /// connections finish (up to `drain_timeout`) and exits. (A running daemon's SIGUSR2
    /// starts this itself, handing over on the descriptor `$LB_UPGRADE_FD` names.)
    Upgrade {
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
    /// Shows every service and backend of a running daemon: health, weights, connections, bytes.
    Status {
        #[command(flatten)]
        admin: AdminArg,
        /// Prints the API's JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Drains a backend: no new connections or sessions, open ones finish.
    Drain {
        #[command(flatten)]
        admin: AdminArg,
        /// The service's name.
        service: String,
        /// The backend's address, ip:port.
        backend: String,
    },
    /// Ends a drain: the backend takes new connections again (ramping up with slow_start).
    Enable {
        #[command(flatten)]
        admin: AdminArg,
        /// The service's name.
        service: String,
        /// The backend's address, ip:port.
        backend: String,
    },
    /// Sets a backend's weight (0..=256; 0 drains) until a reload changes its configured weight.
    Weight {
        #[command(flatten)]
        admin: AdminArg,
        /// The service's name.
        service: String,
        /// The backend's address, ip:port.
        backend: String,
        /// The new weight.
        weight: u32,
    },
    /// Makes the daemon re-read its config file; prints what changed, or why it was refused.
    Reload {
        #[command(flatten)]
        admin: AdminArg,
    },
    /// Withdraws every VIP this node announces (`[announce]`) so that the router sends their
    /// flows to the other nodes, and announces none until `enable-node`; returns once the
    /// routes are gone. Open connections go on.
    DrainNode {
        #[command(flatten)]
        admin: AdminArg,
    },
    /// Ends `drain-node`: VIPs are announced again as they can be served.
    EnableNode {
        #[command(flatten)]
        admin: AdminArg,
    },
    /// On a DSR backend host: strips the balancer's IPIP/IP6IP6 header from packets arriving
    /// on IFACE for one of this host's addresses from one of the `--from` balancers (XDP
    /// program `lb_decap`) until SIGTERM or SIGINT; tunnels from anyone else are dropped. Put
    /// the VIP on `lo`.
    Decap {
        /// The interface the encapsulated packets arrive on.
        #[arg(long)]
        iface: String,
        /// The hook: `xdp` for a NIC, `tc` for a veth or a bridge port (a container's
        /// interface), where XDP would take GSO from the interface's peer.
        #[arg(long, value_enum, default_value = "xdp")]
        hook: lb_daemon::dataplane::xdp::decap::DecapHook,
        /// A balancer's `local_address` (the tunnels' outer source); repeat for each balancer.
        #[arg(long = "from", value_name = "ADDR", required = true)]
        from: Vec<std::net::IpAddr>,
        /// The BPF object; default: $LB_EBPF_OBJ, `lb-ebpf` next to this executable,
        /// target/bpf/bpfel-unknown-none/release/lb-ebpf, /usr/lib/lb/lb-ebpf.
        #[arg(long)]
        bpf_object: Option<PathBuf>,
    },
}

/// Where the running daemon's admin API is.
#[derive(clap::Args)]
struct AdminArg {
    /// The admin API: host:port ([admin] listen) or the path of its unix socket.
    #[arg(long, env = "LB_ADMIN", default_value = "127.0.0.1:9100")]
    admin: String,
    /// A file holding the API's bearer token ([admin] token_file), when it requires one.
    #[arg(long, env = "LB_ADMIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

/// Exit status for a config that cannot be used, as `nginx -t` and HAProxy `-c` do.
const EXIT_BAD_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let daemon = matches!(cli.command, Command::Run { .. } | Command::Upgrade { .. });
    // Dropped last: the daemon's final lines are written before the process ends.
    let _log = init_logging(daemon);
    match cli.command {
        Command::Run { config } => run(&config, false),
        Command::Upgrade { config } => run(&config, true),
        Command::Check { config } => check(&config),
        Command::Status { admin, json } => status(&admin, json),
        Command::Drain {
            admin,
            service,
            backend,
        } => drain(&admin, &service, &backend),
        Command::Enable {
            admin,
            service,
            backend,
        } => enable(&admin, &service, &backend),
        Command::Weight {
            admin,
            service,
            backend,
            weight,
        } => set_weight(&admin, &service, &backend, weight),
        Command::Reload { admin } => reload(&admin),
        Command::DrainNode { admin } => node(&admin, "drain"),
        Command::EnableNode { admin } => node(&admin, "enable"),
        Command::Decap {
            iface,
            hook,
            bpf_object,
            from,
        } => decap(&iface, hook, bpf_object.as_deref(), &from),
    }
}

/// `run` (and `upgrade`, with `take_over`): loads `config` (exit 2 when it cannot be used)
/// and runs the balancer until a signal.
fn run(config: &Path, take_over: bool) -> ExitCode {
    let cfg = match config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    tracing::info!("config {} loaded", config.display());
    match lb_daemon::daemon::run(cfg, config, take_over) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}

/// `check`: loads `config` and says how many services, backends and backend DNS names it
/// has, or why not (exit 2).
fn check(config: &Path) -> ExitCode {
    match config::load(config) {
        Ok(c) => {
            let count = |n: usize, what: &str| match n {
                1 => format!("1 {what}"),
                n => format!("{n} {what}s"),
            };
            let names: usize = c.services.iter().map(|s| s.discovered.len()).sum();
            let backends: usize = c.services.iter().map(|s| s.backends.len()).sum();
            println!(
                "{}: ok ({}, {}{})",
                config.display(),
                count(c.services.len(), "service"),
                count(backends, "backend"),
                match names {
                    0 => String::new(),
                    n => format!(", {}", count(n, "backend DNS name")),
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
    }
}

/// `status`: `/status` as a table, or its JSON as is with `json` (or when it does not parse).
fn status(admin: &AdminArg, json: bool) -> ExitCode {
    admin_call(admin, Method::GET, "/status".into(), None, |body| {
        if json {
            body.to_string()
        } else {
            match serde_json::from_str(body) {
                Ok(v) => lb_daemon::admin::client::status_table(&v),
                Err(_) => body.to_string(),
            }
        }
    })
}

/// `drain`: no new flows to `backend` of `service`.
fn drain(admin: &AdminArg, service: &str, backend: &str) -> ExitCode {
    admin_call(
        admin,
        Method::POST,
        backend_path(service, backend, "drain"),
        None,
        |_| format!("{backend} of {service}: draining (no new flows; open ones finish)"),
    )
}

/// `enable`: ends a drain of `backend` of `service`.
fn enable(admin: &AdminArg, service: &str, backend: &str) -> ExitCode {
    admin_call(
        admin,
        Method::POST,
        backend_path(service, backend, "enable"),
        None,
        |_| format!("{backend} of {service}: enabled"),
    )
}

/// `weight`: sets the weight of `backend` of `service`.
fn set_weight(admin: &AdminArg, service: &str, backend: &str, weight: u32) -> ExitCode {
    admin_call(
        admin,
        Method::POST,
        backend_path(service, backend, "weight"),
        Some(serde_json::json!({ "weight": weight }).to_string()),
        |_| format!("{backend} of {service}: weight {weight}"),
    )
}

/// `reload`: prints what the reload applied (the body itself when it has no `applied`).
fn reload(admin: &AdminArg) -> ExitCode {
    admin_call(admin, Method::POST, "/reload".into(), None, |body| {
        let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        format!(
            "reloaded: {}",
            v.get("applied").and_then(|a| a.as_str()).unwrap_or(body)
        )
    })
}

/// `drain-node` (`action` `drain`) and `enable-node` (`enable`): prints which VIPs are
/// announced after it.
fn node(admin: &AdminArg, action: &str) -> ExitCode {
    admin_call(
        admin,
        Method::POST,
        format!("/node/{action}"),
        None,
        |body| {
            let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            let vips = v
                .get("vips")
                .and_then(|a| a.as_array())
                .cloned()
                .unwrap_or_default();
            let announced: Vec<String> = vips
                .iter()
                .filter(|v| v.get("announced").and_then(|a| a.as_bool()) == Some(true))
                .filter_map(|v| v.get("vip").and_then(|a| a.as_str()).map(String::from))
                .collect();
            let state = if action == "drain" {
                "node draining: every VIP withdrawn"
            } else {
                "node enabled"
            };
            if announced.is_empty() {
                format!("{state}; announced now: none")
            } else {
                format!("{state}; announced now: {}", announced.join(", "))
            }
        },
    )
}

/// `decap`: strips the balancers' tunnels on `iface` until a signal.
fn decap(
    iface: &str,
    hook: lb_daemon::dataplane::xdp::decap::DecapHook,
    bpf_object: Option<&Path>,
    from: &[std::net::IpAddr],
) -> ExitCode {
    match lb_daemon::dataplane::xdp::decap::run(iface, hook, bpf_object, from) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}

/// Exit status when the daemon refused an admin request (unknown backend, bad reload...).
const EXIT_REFUSED: u8 = 1;
/// Exit status when the admin API could not be reached at all.
const EXIT_UNREACHABLE: u8 = 3;

fn backend_path(service: &str, backend: &str, action: &str) -> String {
    use lb_daemon::admin::client::path_segment;
    format!(
        "/services/{}/backends/{}/{action}",
        path_segment(service),
        path_segment(backend)
    )
}

/// Sends one admin request and prints `show(body)` on success, the daemon's reason on a
/// refusal (exit 1), or why the API could not be reached (exit 3).
fn admin_call(
    admin: &AdminArg,
    method: Method,
    path: String,
    body: Option<String>,
    show: impl FnOnce(&str) -> String,
) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let token = match &admin.token_file {
        None => None,
        Some(file) => match std::fs::read_to_string(file) {
            Ok(text) => Some(text.trim().to_string()),
            Err(e) => {
                eprintln!("cannot read the admin token from {}: {e}", file.display());
                return ExitCode::from(EXIT_UNREACHABLE);
            }
        },
    };
    let reply = rt.block_on(lb_daemon::admin::client::request(
        &admin.admin,
        method,
        &path,
        body,
        token.as_deref(),
    ));
    match reply {
        Ok(r) if r.ok() => {
            println!("{}", show(&r.body).trim_end());
            ExitCode::SUCCESS
        }
        Ok(r) => {
            eprintln!("refused ({}): {}", r.status, r.error_message());
            ExitCode::from(EXIT_REFUSED)
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_UNREACHABLE)
        }
    }
}

/// Logs to stderr: the daemon (`daemon`) through [`lb_daemon::log_writer`]'s queue once its
/// start-up is done, so that a stalled reader stalls none of its threads; the other commands
/// in place. Returns the guard that writes the daemon's queued lines at exit.
fn init_logging(daemon: bool) -> Option<lb_daemon::log_writer::LogGuard> {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logger = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal());
    if daemon {
        let (writer, guard) = lb_daemon::log_writer::start();
        logger.with_writer(writer).init();
        return Some(guard);
    }
    logger.with_writer(std::io::stderr).init();
    None
}
