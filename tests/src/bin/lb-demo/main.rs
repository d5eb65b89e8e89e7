//! `lb-demo`: runs lb-daemon in front of local backends and shows, in a few lines, how it
//! spreads connections and datagrams and how it fails over when a backend stops.
//!
//! `lb-demo --daemon PATH --config PATH [--serve]`. It starts one server per backend in the
//! config (HTTP name servers for TCP services, UDP echoes for UDP services), starts the
//! daemon, sends 300 requests to every service and prints who answered, stops the second
//! backend of every service, waits for the daemon to mark it DOWN, sends again and prints
//! the new counts. Then it stops the daemon with SIGTERM, or with `--serve` keeps everything
//! running until Ctrl-C. `lb-demo --cluster` runs the cluster demo instead (see `cluster.rs`).

mod cluster;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use lb_tests::client::{http_get, udp_request};
use lb_tests::daemon::{daemon_binary, Daemon};
use lb_tests::load::{run, wait_until_each_answers};
use lb_tests::tally::{render_table, Tally};
use lb_tests::{HttpNameServer, UdpEcho};
use nix::sys::signal::{SigSet, Signal};

/// Requests (TCP) or datagrams (UDP) per service per round.
const PER_ROUND: usize = 300;
/// How long the daemon may take to get ready, to mark a backend DOWN or UP.
const WAIT: Duration = Duration::from_secs(15);

#[derive(Parser)]
#[command(
    about = "Runs lb-daemon in front of local backends and shows how it balances and fails over.",
    after_help = "Set LB_TEST_ECHO_DAEMON=1 to see the daemon's own log."
)]
struct Args {
    /// The lb-daemon binary [default: $LB_DAEMON_BIN, else built with cargo]
    #[arg(long, value_name = "PATH")]
    daemon: Option<PathBuf>,
    /// The config to run [default: config/demo.toml in the workspace]
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Keep the daemon and backends running until Ctrl-C, and say how to try them
    #[arg(long)]
    serve: bool,
    /// Run the cluster demo instead: lb nodes behind an ECMP router (needs root and BIRD 2)
    #[arg(long)]
    cluster: bool,
}

/// A service of the config, as far as the demo needs it.
struct Service {
    name: String,
    listen: SocketAddr,
    udp: bool,
    backends: Vec<Backend>,
}

enum Server {
    Http(HttpNameServer),
    Udp(UdpEcho),
}

struct Backend {
    name: String,
    addr: SocketAddr,
    server: Server,
}

impl Backend {
    fn stop(&mut self) {
        match &mut self.server {
            Server::Http(s) => s.stop(),
            Server::Udp(s) => s.stop(),
        }
    }

    fn restart(&mut self) -> Result<()> {
        match &mut self.server {
            Server::Http(s) => s.restart(),
            Server::Udp(s) => s.restart(),
        }
        .with_context(|| format!("restarting {} on {}", self.name, self.addr))
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.cluster {
        if let Some(d) = &args.daemon {
            // lb_tests starts the nodes' daemons from $LB_DAEMON_BIN.
            std::env::set_var("LB_DAEMON_BIN", d);
        }
        return cluster::run();
    }
    if args.serve {
        // Blocked before any thread starts, so every thread inherits it and Ctrl-C is only
        // ever taken by the sigwait at the end. The daemon unblocks them for itself.
        serve_signals()
            .thread_block()
            .context("blocking SIGINT/SIGTERM")?;
    }
    let config = args
        .config
        .unwrap_or_else(|| workspace_root().join("config/demo.toml"));
    let binary = match args.daemon {
        Some(p) => p,
        None => daemon_binary().map_err(anyhow::Error::msg)?,
    };
    println!("lb demo: {} on {}", binary.display(), config.display());

    let mut services = start_backends(&config)?;
    let mut daemon = Daemon::spawn(&binary, &config, WAIT)
        .map_err(|e| anyhow::anyhow!("lb-daemon did not start: {e}"))?;
    println!("lb-daemon is ready (pid {})\n", daemon.pid());
    for s in &services {
        let names: Vec<&str> = s.backends.iter().map(|b| b.name.as_str()).collect();
        if let Err(e) = wait_until_each_answers(&names, WAIT, || ask(s)) {
            bail!("service {} did not come up: {e}", s.name);
        }
    }

    let before: Vec<Tally> = services.iter().map(round).collect();
    for (s, t) in services.iter().zip(&before) {
        print_table(s, &[("answers", t)]);
    }

    // Stop the second backend of each service and wait for the daemon to notice.
    let mut down = Vec::new();
    for s in &mut services {
        if let Some(b) = s.backends.get_mut(1) {
            println!("stopping {} ({}) ...", b.name, b.addr);
            let mark = daemon.log_mark();
            b.stop();
            down.push((s.name.clone(), b.addr, mark));
        }
    }
    for (service, addr, mark) in &down {
        let needle = format!("backend {addr} of service {service} is DOWN");
        match daemon.wait_for_log_after(*mark, &needle, WAIT) {
            Ok((_, line)) => println!("  lb-daemon: {}", from_word(&line, "backend")),
            Err(e) => bail!("the daemon did not mark {addr} DOWN: {e}"),
        }
    }
    println!();

    let after: Vec<Tally> = services.iter().map(round).collect();
    for ((s, b), a) in services.iter().zip(&before).zip(&after) {
        print_table(s, &[("before", b), ("one stopped", a)]);
    }

    if args.serve {
        serve(&mut daemon, &mut services)?;
    }
    let status = daemon.terminate();
    println!("lb-daemon stopped with SIGTERM: {status}");
    if !status.success() {
        bail!("lb-daemon exited with {status}");
    }
    Ok(())
}

/// Starts a server for every backend of every service in `config`.
fn start_backends(config: &Path) -> Result<Vec<Service>> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", config.display()))?;
    let mut services = Vec::new();
    for svc in table
        .get("service")
        .and_then(|s| s.as_array())
        .context("the config has no [[service]]")?
    {
        let name = svc
            .get("name")
            .and_then(|v| v.as_str())
            .context("a service without a name")?
            .to_string();
        let listen: SocketAddr = svc
            .get("listen")
            .and_then(|v| v.as_str())
            .context("a service without `listen`")?
            .parse()
            .with_context(|| format!("service {name}: listen"))?;
        let udp = svc.get("protocol").and_then(|v| v.as_str()) == Some("udp");
        let mut backends = Vec::new();
        for (i, b) in svc
            .get("backend")
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
            .enumerate()
        {
            let addr: SocketAddr = b
                .get("address")
                .and_then(|v| v.as_str())
                .context("a backend without `address`")?
                .parse()
                .with_context(|| format!("service {name}: backend address"))?;
            if !addr.ip().is_loopback() {
                bail!("service {name}: the demo only starts backends on loopback, not {addr}");
            }
            let bname = format!("{name}-{}", i + 1);
            let busy = || format!("cannot listen on {addr} for {bname}: is another demo running?");
            let server = if udp {
                Server::Udp(UdpEcho::start_on(&bname, addr).with_context(busy)?)
            } else {
                Server::Http(HttpNameServer::start_on(&bname, addr).with_context(busy)?)
            };
            backends.push(Backend {
                name: bname,
                addr,
                server,
            });
        }
        let list: Vec<String> = backends
            .iter()
            .map(|b| format!("{} {}", b.name, b.addr))
            .collect();
        println!(
            "{} {listen} ({}): backends {}",
            name,
            if udp { "udp" } else { "tcp" },
            list.join(", ")
        );
        services.push(Service {
            name,
            listen,
            udp,
            backends,
        });
    }
    Ok(services)
}

/// One request to `s` from a new client; returns the answering backend's name.
fn ask(s: &Service) -> Result<String, lb_tests::client::ClientError> {
    if s.udp {
        let reply = udp_request(s.listen, b"hello", Duration::from_secs(1))?;
        let text = String::from_utf8_lossy(&reply).to_string();
        Ok(text.split(':').next().unwrap_or_default().to_string())
    } else {
        http_get(s.listen, "/")
    }
}

/// `PER_ROUND` requests to `s`, each from a new client; failures count as "(failed)".
fn round(s: &Service) -> Tally {
    let report = run(PER_ROUND, 4, Duration::from_secs(60), |_| ask(s));
    let mut t = report.tally;
    for _ in 0..report.failures.len() + report.not_started {
        t.add("(failed)");
    }
    t
}

fn print_table(s: &Service, columns: &[(&str, &Tally)]) {
    let what = if s.udp {
        "UDP datagrams, each from its own client port"
    } else {
        "HTTP requests, one connection each"
    };
    println!("{} {}: {PER_ROUND} {what}", s.name, s.listen);
    let names: Vec<&str> = s.backends.iter().map(|b| b.name.as_str()).collect();
    for line in render_table(&names, columns).lines() {
        println!("  {line}");
    }
    println!();
}

/// `line` from the first occurrence of `word` on (the daemon's message without its
/// timestamp and level), or all of it.
fn from_word<'a>(line: &'a str, word: &str) -> &'a str {
    line.find(word).map_or(line, |i| &line[i..])
}

fn serve_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set
}

/// Brings the stopped backends back, says how to try the services, and waits for Ctrl-C.
fn serve(daemon: &mut Daemon, services: &mut [Service]) -> Result<()> {
    for s in services.iter_mut() {
        if let Some(b) = s.backends.get_mut(1) {
            let mark = daemon.log_mark();
            b.restart()?;
            let needle = format!("backend {} of service {} is UP", b.addr, s.name);
            match daemon.wait_for_log_after(mark, &needle, WAIT) {
                Ok((_, line)) => println!(
                    "restarted {}; lb-daemon: {}",
                    b.name,
                    from_word(&line, "backend")
                ),
                Err(e) => println!(
                    "restarted {}, but the daemon did not mark it UP: {e}",
                    b.name
                ),
            }
        }
    }
    println!("\nServing until Ctrl-C. Try:");
    for s in services.iter() {
        let (cmd, what) = if s.udp {
            (
                format!(
                    "echo hello | nc -u -w1 {} {}",
                    s.listen.ip(),
                    s.listen.port()
                ),
                "a reply signed by the echo backend that answered",
            )
        } else {
            (
                format!("curl -s http://{}/; echo", s.listen),
                "the name of the backend that answered",
            )
        };
        println!("  {cmd:<42} # {}: {what}", s.name);
    }
    let signal = serve_signals().wait().context("waiting for Ctrl-C")?;
    println!("\n{signal:?}: stopping");
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}
