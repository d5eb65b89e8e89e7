//! A config with a mistake is refused before anything starts, with a message that sends the
//! user to the right line and key: `lb-daemon check` exits 2 with `{file}:{line}:{col}:
//! {field}: {message}`, and `lb-daemon run` exits 2 too.
//!
//! Each case marks the line the error must point at with `# <-`. A setting that is allowed
//! but works otherwise than it reads is warned of when the service starts.

use std::time::Duration;

use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::daemon::{check_config, is_ready_line, run_on_file, run_to_end, Outcome};
use lb_tests::ports::free_addr;
use lb_tests::{Daemon, HttpNameServer};

/// A valid config using every key, with two services.
const GOOD: &str = r#"
[global]
workers = 2
drain_timeout = "5s"

[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
scheduler = "weighted_round_robin"
dataplane = "proxy"
connect_timeout = "1s"
idle_timeout = "60s"
retries = 2
table_size = 65537

[service.health]
kind = "http"
interval = "500ms"
timeout = "200ms"
rise = 2
fall = 3
path = "/health"
expect_status = 200

[[service.backend]]
address = "127.0.0.1:19001"
weight = 1

[[service.backend]]
address = "127.0.0.1:19002"
weight = 3

[[service]]
name = "dns"
listen = "127.0.0.1:18053"
protocol = "udp"
scheduler = "source_hash"
dataplane = "proxy"

[service.health]
kind = "udp"
send = "ping"
expect = "pong"

[[service.backend]]
address = "127.0.0.1:19101"
"#;

/// One broken config: what is wrong, the text, and the field the message must name.
struct Case {
    what: &'static str,
    toml: &'static str,
    /// `None` where there is no key to name (the file is not TOML at all).
    field: Option<&'static str>,
}

const CASES: &[Case] = &[
    Case {
        what: "a misspelled service key",
        toml: r#"
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocl = "tcp"   # <-
[[service.backend]]
address = "127.0.0.1:19001"
"#,
        field: Some("service[0].protocl"),
    },
    Case {
        what: "an unknown [global] key",
        toml: r#"
[global]
threads = 4   # <-
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[[service.backend]]
address = "127.0.0.1:19001"
"#,
        field: Some("global.threads"),
    },
    Case {
        what: "two services with the same name",
        toml: r#"
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[[service.backend]]
address = "127.0.0.1:19001"
[[service]]
name = "web"   # <-
listen = "127.0.0.1:18081"
protocol = "tcp"
[[service.backend]]
address = "127.0.0.1:19002"
"#,
        field: Some("service[1].name"),
    },
    Case {
        what: "two TCP services on the same listen address",
        toml: r#"
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[[service.backend]]
address = "127.0.0.1:19001"
[[service]]
name = "api"
listen = "127.0.0.1:18080"   # <-
protocol = "tcp"
[[service.backend]]
address = "127.0.0.1:19002"
"#,
        field: Some("service[1].listen"),
    },
    Case {
        what: "a service without backends",
        toml: r#"
[[service]]   # <-
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
"#,
        field: Some("service[0].backend"),
    },
    Case {
        what: "a weight above 256",
        toml: r#"
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[[service.backend]]
address = "127.0.0.1:19001"
[[service.backend]]
address = "127.0.0.1:19002"
weight = 300   # <-
"#,
        field: Some("service[0].backend[1].weight"),
    },
    Case {
        what: "a negative weight",
        toml: r#"
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[[service.backend]]
address = "127.0.0.1:19001"
weight = -1   # <-
"#,
        field: Some("service[0].backend[0].weight"),
    },
    Case {
        what: "every backend at weight 0",
        toml: r#"
[[service]]   # <-
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[[service.backend]]
address = "127.0.0.1:19001"
weight = 0
[[service.backend]]
address = "127.0.0.1:19002"
weight = 0
"#,
        field: Some("service[0].backend"),
    },
    Case {
        what: "a duration that is not one",
        toml: r#"
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
connect_timeout = "1 fortnight"   # <-
[[service.backend]]
address = "127.0.0.1:19001"
"#,
        field: Some("service[0].connect_timeout"),
    },
    Case {
        what: "a zero drain timeout",
        toml: r#"
[global]
drain_timeout = "0s"   # <-
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[[service.backend]]
address = "127.0.0.1:19001"
"#,
        field: Some("global.drain_timeout"),
    },
    Case {
        what: "a relative pin directory",
        toml: r#"
[global]
bpf_pin_dir = "bpf/lb"   # <-
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[[service.backend]]
address = "127.0.0.1:19001"
"#,
        field: Some("global.bpf_pin_dir"),
    },
    Case {
        what: "a relative upgrade socket",
        toml: r#"
[global]
upgrade_socket = "lb/upgrade.sock"   # <-
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[[service.backend]]
address = "127.0.0.1:19001"
"#,
        field: Some("global.upgrade_socket"),
    },
    Case {
        what: "a Maglev table size that is not prime",
        toml: r#"
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
table_size = 65536   # <-
[[service.backend]]
address = "127.0.0.1:19001"
"#,
        field: Some("service[0].table_size"),
    },
    Case {
        what: "a backend address without a port",
        toml: r#"
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[[service.backend]]
address = "127.0.0.1"   # <-
"#,
        field: Some("service[0].backend[0].address"),
    },
    Case {
        what: "a backend IPv4 address with a part over 255 (not a DNS name either)",
        toml: r#"
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[[service.backend]]
address = "10.0.0.256:80"   # <-
"#,
        field: Some("service[0].backend[0].address"),
    },
    Case {
        what: "a backend IPv4 address with a leading zero (the resolver would read it as octal)",
        toml: r#"
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[[service.backend]]
address = "127.0.0.010:19001"   # <-
"#,
        field: Some("service[0].backend[0].address"),
    },
    Case {
        what: "a backend address with port 0",
        toml: r#"
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[[service.backend]]
address = "127.0.0.1:0"   # <-
"#,
        field: Some("service[0].backend[0].address"),
    },
    Case {
        what: "a TCP service on the admin API's default address (the start would fail on it)",
        toml: r#"
[[service]]
name = "web"
listen = "0.0.0.0:9100"   # <-
protocol = "tcp"
[[service.backend]]
address = "127.0.0.1:19001"
"#,
        field: Some("service[0].listen"),
    },
    Case {
        what: "a backend that is the admin API (clients would reach it through the service)",
        toml: r#"
[admin]
listen = "127.0.0.1:19100"
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[[service.backend]]
address = "127.0.0.1:19100"   # <-
"#,
        field: Some("service[0].backend[0].address"),
    },
    Case {
        what: "a backend named localhost at the admin API's default port",
        toml: r#"
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[[service.backend]]
address = "localhost:9100"   # <-
"#,
        field: Some("service[0].backend[0].address"),
    },
    Case {
        what: "the same backend twice",
        toml: r#"
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[[service.backend]]
address = "127.0.0.1:19001"
[[service.backend]]
address = "127.0.0.1:19001"   # <-
"#,
        field: Some("service[0].backend[1].address"),
    },
    Case {
        what: "a number written as a string",
        toml: r#"
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
retries = "two"   # <-
[[service.backend]]
address = "127.0.0.1:19001"
"#,
        field: Some("service[0].retries"),
    },
    Case {
        what: "an unknown scheduler",
        toml: r#"
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
scheduler = "fastest"   # <-
[[service.backend]]
address = "127.0.0.1:19001"
"#,
        field: Some("service[0].scheduler"),
    },
    Case {
        what: "a UDP health check on a TCP service",
        toml: r#"
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[service.health]
kind = "udp"   # <-
[[service.backend]]
address = "127.0.0.1:19001"
"#,
        field: Some("service[0].health.kind"),
    },
    Case {
        what: "a TCP health check on a UDP service",
        toml: r#"
[[service]]
name = "dns"
listen = "127.0.0.1:18053"
protocol = "udp"
[service.health]
kind = "tcp"   # <-
[[service.backend]]
address = "127.0.0.1:19101"
"#,
        field: Some("service[0].health.kind"),
    },
    Case {
        what: "rise = 0",
        toml: r#"
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[service.health]
rise = 0   # <-
[[service.backend]]
address = "127.0.0.1:19001"
"#,
        field: Some("service[0].health.rise"),
    },
    Case {
        what: "an HTTP check path without a leading slash",
        toml: r#"
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[service.health]
kind = "http"
path = "health"   # <-
[[service.backend]]
address = "127.0.0.1:19001"
"#,
        field: Some("service[0].health.path"),
    },
    Case {
        what: "an HTTP check Host with a space (it would split the header)",
        toml: r#"
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[service.health]
kind = "http"
host = "app example"   # <-
[[service.backend]]
address = "127.0.0.1:19001"
"#,
        field: Some("service[0].health.host"),
    },
    Case {
        what: "a Host for a TCP check",
        toml: r#"
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[service.health]
kind = "tcp"
host = "app.example"   # <-
[[service.backend]]
address = "127.0.0.1:19001"
"#,
        field: Some("service[0].health.host"),
    },
    Case {
        what: "a duration of 10^12 seconds (would overflow the timers' clock arithmetic)",
        toml: r#"
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
idle_timeout = "1000000000000s"   # <-
[[service.backend]]
address = "127.0.0.1:19001"
"#,
        field: Some("service[0].idle_timeout"),
    },
    Case {
        what: "a health check interval over a year",
        toml: r#"
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[service.health]
interval = "400d"   # <-
[[service.backend]]
address = "127.0.0.1:19001"
"#,
        field: Some("service[0].health.interval"),
    },
    Case {
        what: "a backend that is the service's own listen address",
        toml: r#"
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[[service.backend]]
address = "127.0.0.1:19001"
[[service.backend]]
address = "127.0.0.1:18080"   # <-
"#,
        field: Some("service[0].backend[1].address"),
    },
    Case {
        what: "a backend on loopback at the port of a wildcard listen of a later service",
        toml: r#"
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[[service.backend]]
address = "127.0.0.1:18443"   # <-
[[service]]
name = "tls"
listen = "0.0.0.0:18443"
protocol = "tcp"
[[service.backend]]
address = "127.0.0.1:19002"
"#,
        field: Some("service[0].backend[0].address"),
    },
    Case {
        what: "a service name with a space",
        toml: r#"
[[service]]
name = "web site"   # <-
listen = "127.0.0.1:18080"
protocol = "tcp"
[[service.backend]]
address = "127.0.0.1:19001"
"#,
        field: Some("service[0].name"),
    },
    Case {
        what: "a service name of 65 characters",
        toml: r#"
[[service]]
name = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"   # <-
listen = "127.0.0.1:18080"
protocol = "tcp"
[[service.backend]]
address = "127.0.0.1:19001"
"#,
        field: Some("service[0].name"),
    },
    Case {
        what: "an admin API on a non-loopback address without a token",
        toml: r#"
[admin]
listen = "0.0.0.0:9100"   # <-
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[[service.backend]]
address = "127.0.0.1:19001"
"#,
        field: Some("admin.listen"),
    },
    Case {
        what: "an admin API with neither a TCP address nor a socket",
        toml: r#"
[admin]
listen = ""   # <-
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[[service.backend]]
address = "127.0.0.1:19001"
"#,
        field: Some("admin.listen"),
    },
    Case {
        what: "an admin socket group without a socket",
        toml: r#"
[admin]
listen = "127.0.0.1:9100"
group = "root"   # <-
[[service]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "tcp"
[[service.backend]]
address = "127.0.0.1:19001"
"#,
        field: Some("admin.group"),
    },
    Case {
        what: "no service at all",
        toml: r#"[global]   # <-
workers = 1
"#,
        field: Some("service"),
    },
    Case {
        what: "a line that is not TOML",
        toml: r#"
[[service]]
name = "web"
retries =   # <-
"#,
        field: None,
    },
];

/// The 1-based line marked `# <-`.
fn marked_line(toml: &str) -> usize {
    toml.lines()
        .position(|l| l.contains("# <-"))
        .expect("every case marks its line")
        + 1
}

fn describe(out: &Outcome) -> String {
    format!(
        "exit code {:?}, stderr:\n{}",
        out.code(),
        if out.stderr.is_empty() {
            "(empty)"
        } else {
            &out.stderr
        }
    )
}

#[test]
fn check_refuses_each_mistake_naming_its_line_and_field() {
    let mut problems = Vec::new();
    for case in CASES {
        let out = check_config(case.toml);
        let file = out.config_path.display().to_string();
        let at = format!("{file}:{}:", marked_line(case.toml));
        if out.code() != Some(2) {
            problems.push(format!(
                "{}: `lb-daemon check` should exit 2; {}",
                case.what,
                describe(&out)
            ));
            continue;
        }
        if !out.stderr.contains(&at) {
            problems.push(format!(
                "{}: the message should point at line {} (`{at}`); {}",
                case.what,
                marked_line(case.toml),
                describe(&out)
            ));
        }
        if let Some(field) = case.field {
            let named = out
                .stderr
                .lines()
                .any(|l| l.contains(&format!(" {field}: ")));
            if !named {
                problems.push(format!(
                    "{}: the message should name the field `{field}`; {}",
                    case.what,
                    describe(&out)
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {} broken configs were not reported as a user needs:\n\n{}",
        problems.len(),
        CASES.len(),
        problems.join("\n\n")
    );
}

#[test]
fn check_accepts_a_good_config() {
    let out = check_config(GOOD);
    assert_eq!(
        out.code(),
        Some(0),
        "`lb-daemon check` refused a valid config; {}",
        describe(&out)
    );
}

#[test]
fn check_refuses_a_missing_file() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let missing = dir.path().join("no-such-config.toml");
    let out = run_on_file("check", &missing, Duration::from_secs(30));
    assert_eq!(
        out.code(),
        Some(2),
        "`lb-daemon check` on a file that does not exist should exit 2; {}",
        describe(&out)
    );
    assert!(
        out.stderr.contains(&missing.display().to_string()),
        "the message for a missing config should name the file; {}",
        describe(&out)
    );
}

#[test]
fn run_refuses_a_bad_config_with_exit_2_and_starts_nothing() {
    let case = CASES
        .iter()
        .find(|c| c.what == "two services with the same name")
        .expect("the duplicate-name case");
    let out = run_to_end("run", case.toml, Duration::from_secs(30));
    assert!(
        out.status.is_some(),
        "`lb-daemon run` kept running for 30 s with a config that names `web` twice"
    );
    assert_eq!(
        out.code(),
        Some(2),
        "`lb-daemon run` with a bad config should exit 2; {}",
        describe(&out)
    );
    let at = format!("{}:{}:", out.config_path.display(), marked_line(case.toml));
    assert!(
        out.stderr.contains(&at),
        "`lb-daemon run` should say which file and line are wrong (`{at}`); {}",
        describe(&out)
    );
    assert!(
        !out.stderr
            .lines()
            .chain(out.stdout.lines())
            .any(is_ready_line),
        "`lb-daemon run` said it was ready with a bad config; {}",
        describe(&out)
    );
}

/// A health `timeout` longer than the `interval` is allowed (HAProxy allows a `timeout check`
/// above `inter`) but makes checks of a silent backend run back to back: the service says
/// so when it starts, and a service whose timeout fits says nothing.
#[test]
fn a_health_timeout_longer_than_the_interval_is_warned_of() {
    let h = HttpNameServer::start("h1").expect("backend starts");
    let service = |name: &str, timeout: &str| {
        ServiceConfig::tcp(name, free_addr())
            .health("kind", "tcp")
            .health("interval", "1s")
            .health("timeout", timeout)
            .backend(h.addr(), 1)
    };
    let daemon = Daemon::start(
        &DaemonConfig::new()
            .service(service("slow", "3s"))
            .service(service("fits", "1s"))
            .to_toml(),
    );
    let line = daemon
        .wait_for_log("health.timeout", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("no warning of the long health timeout: {e}"));
    assert!(
        line.contains("WARN") && line.contains("service slow:") && line.contains("(3s)"),
        "the warning should name the service and its timeout: {line}"
    );
    let about_fits = (daemon.logs().iter())
        .filter(|l| l.contains("health.timeout") && l.contains("service fits:"))
        .count();
    assert_eq!(
        about_fits, 0,
        "a timeout equal to the interval is not warned of"
    );
}
