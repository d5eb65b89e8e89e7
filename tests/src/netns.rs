//! Network namespaces and veth pairs made by a test, removed when the guards drop (also when
//! the test panics). Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN); callers check with
//! [`crate::require_root`] first.
//!
//! Traffic in these namespaces stays inside them: the addresses a test gives its veth ends
//! exist only there.

use std::fs::File;
use std::io;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// A network namespace named `lbt-<tag>-<pid>-<n>`, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Netns {
    /// Creates a namespace with its loopback up. `tag`: a short word for the role ("client",
    /// "lb", "b1"); the name stays within the kernel's 15-byte interface-name limit when it is
    /// used to name veth ends.
    ///
    /// Returns `Err` when `ip netns add` fails (not root, or no `ip`).
    pub fn new(tag: &str) -> io::Result<Netns> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("lbt-{tag}-{}-{n}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> ARGS`; `Err` with ip's stderr when it fails.
    pub fn ip(&self, args: &[&str]) -> io::Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A `Command` that runs `program` inside the namespace (`ip netns exec`). The caller
    /// owns the child: spawn it, and kill and wait for it when done.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `program ARGS` inside the namespace to completion; `Err` when it fails.
    pub fn run(&self, program: &str, args: &[&str]) -> io::Result<Output> {
        let out = self.command(program).args(args).output()?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(io::Error::other(format!(
                "`{program} {}` in {} failed: {}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    /// The IPv4 and IPv6 packets the namespace's kernel has forwarded so far: `Ip:
    /// ForwDatagrams` of `/proc/net/snmp` and `Ip6OutForwDatagrams` of `/proc/net/snmp6`.
    /// `Err` when a file cannot be read or lacks its counter.
    pub fn forwarded_datagrams(&self) -> io::Result<(u64, u64)> {
        let out = self.run("cat", &["/proc/net/snmp", "/proc/net/snmp6"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        // snmp: two `Ip:` lines, the names, then the values; snmp6: a name and a value a line.
        let mut ip = text.lines().filter(|l| l.starts_with("Ip:"));
        let v4 = ip.next().zip(ip.next()).and_then(|(names, values)| {
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(name, _)| *name == "ForwDatagrams")
                .and_then(|(_, value)| value.parse().ok())
        });
        let v6 = text.lines().find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("Ip6OutForwDatagrams"))
                .then(|| words.next().and_then(|v| v.parse().ok()))
                .flatten()
        });
        v4.zip(v6).ok_or_else(|| {
            io::Error::other(format!(
                "no forwarded-packet counters in {}'s /proc/net/snmp and snmp6",
                self.name
            ))
        })
    }

    /// Sets a sysctl inside the namespace, e.g. `("net.ipv4.ip_forward", "1")`.
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        self.run("sysctl", &["-qw", &format!("{key}={value}")])
            .map(drop)
    }

    /// Runs `f` on a new thread that has entered the namespace, so sockets `f` opens live
    /// there; returns what `f` returns. The calling thread stays where it is.
    ///
    /// Returns `Err` when the namespace cannot be entered; a panic in `f` is passed on.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        let file = File::open(format!("/var/run/netns/{}", self.name))?;
        std::thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Spawns a long-lived thread inside the namespace running `f` (a server, say); the
    /// handle joins it. `Err` when the namespace cannot be entered.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<std::thread::JoinHandle<T>> {
        let file = File::open(format!("/var/run/netns/{}", self.name))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            let entered = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET);
            let ok = entered.is_ok();
            let _ = tx.send(entered.map_err(io::Error::from));
            if !ok {
                // The caller gets the error from the channel; this thread runs nothing.
                std::process::abort();
            }
            f()
        });
        rx.recv()
            .map_err(|_| io::Error::other("namespace thread ended before entering"))??;
        Ok(handle)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace removes its veth ends too (and so their peers).
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Connects namespaces `a` and `b` with a veth pair: `a_if` in `a` with `a_addr`, `b_if` in
/// `b` with `b_addr` (CIDR, e.g. "10.10.1.1/24"), both up. Interface names: at most 15 bytes.
///
/// Returns `Err` with ip's message when any step fails.
pub fn veth(
    a: &Netns,
    a_if: &str,
    a_addr: &str,
    b: &Netns,
    b_if: &str,
    b_addr: &str,
) -> io::Result<()> {
    ip(&[
        "link",
        "add",
        a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        let family = if addr.contains(':') { "-6" } else { "-4" };
        ns.ip(&[family, "addr", "add", addr, "dev", ifname, "nodad"])
            .or_else(|_| ns.ip(&[family, "addr", "add", addr, "dev", ifname]))?;
        ns.ip(&["link", "set", ifname, "up"])?;
    }
    Ok(())
}

fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_namespaces_talk_over_a_veth_pair_and_vanish_on_drop() {
        if !crate::require_root("netns::two_namespaces_talk_over_a_veth_pair") {
            return;
        }
        let a = Netns::new("a").expect("create namespace a");
        let b = Netns::new("b").expect("create namespace b");
        veth(&a, "va", "10.250.0.1/24", &b, "vb", "10.250.0.2/24").expect("veth pair");
        let listener = b
            .enter(|| std::net::TcpListener::bind("10.250.0.2:7000"))
            .expect("enter b")
            .expect("listen in b");
        let sent = a
            .enter(|| {
                use std::io::Write;
                let mut s = std::net::TcpStream::connect("10.250.0.2:7000")?;
                s.write_all(b"hello")
            })
            .expect("enter a");
        sent.expect("a reaches b over the veth pair");
        let (mut conn, _) = listener.accept().expect("b accepts");
        let mut got = Vec::new();
        use std::io::Read;
        conn.read_to_end(&mut got).expect("read");
        assert_eq!(got, b"hello", "bytes sent from namespace a arrive in b");
        let name = a.name().to_string();
        drop(a);
        let listed = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip");
        assert!(
            !String::from_utf8_lossy(&listed.stdout).contains(&name),
            "namespace {name} is still there after its guard dropped"
        );
    }
}
