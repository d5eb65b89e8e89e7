//! BIRD 2 in a test's network namespace: started from a config text, stopped (or killed, as
//! a failing node's would be) on demand and on drop, with its log kept for failures.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::netns::Netns;

/// A `bird` running in the foreground inside a namespace.
pub struct Bird {
    name: String,
    child: Option<Child>,
    control: PathBuf,
    log: PathBuf,
}

impl Bird {
    /// Writes `config` to `dir/<name>.conf` (its `log` line pointed at `dir/<name>.log`) and
    /// runs `bird -f` on it inside `ns`.
    ///
    /// Panics with the parser's message when BIRD refuses the config, or when it cannot be
    /// started: a cluster test cannot go on without it.
    pub fn start(ns: &Netns, name: &str, config: &str, dir: &Path) -> Bird {
        let conf = dir.join(format!("{name}.conf"));
        let log = dir.join(format!("{name}.log"));
        let control = dir.join(format!("{name}.ctl"));
        let config = config.replace(
            "log syslog all;",
            &format!("log \"{}\" all;", log.display()),
        );
        std::fs::write(&conf, config).expect("write the BIRD config");
        let check = std::process::Command::new("bird")
            .arg("-p")
            .arg("-c")
            .arg(&conf)
            .output()
            .expect("bird (Debian bird2) runs");
        assert!(
            check.status.success(),
            "BIRD refuses {}: {}",
            conf.display(),
            String::from_utf8_lossy(&check.stderr)
        );
        let child = ns
            .command("bird")
            .arg("-f")
            .arg("-c")
            .arg(&conf)
            .arg("-s")
            .arg(&control)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("bird starts");
        Bird {
            name: name.to_string(),
            child: Some(child),
            control,
            log,
        }
    }

    /// Whether it runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Its process id (for SIGSTOP: a hung node). Panics once it was killed.
    pub fn pid(&self) -> nix::unistd::Pid {
        let id = self.child.as_ref().expect("bird runs").id();
        nix::unistd::Pid::from_raw(i32::try_from(id).expect("a pid fits in i32"))
    }

    /// SIGKILL, as a node that dies: its BGP sessions drop with it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `birdc show protocols` (or the error), for failure messages.
    pub fn protocols(&self) -> String {
        match std::process::Command::new("birdc")
            .arg("-s")
            .arg(&self.control)
            .args(["show", "protocols"])
            .output()
        {
            Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
            Err(e) => format!("birdc: {e}"),
        }
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits up to `timeout` for `birdc show protocols` to show `protocol` Established.
    pub fn wait_established(&self, protocol: &str, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self
                .protocols()
                .lines()
                .any(|l| l.starts_with(protocol) && l.contains("Established"))
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            eprintln!(
                "---- BIRD {} ----\n{}\n{}\n---- end of BIRD {} ----",
                self.name,
                self.protocols(),
                self.log_tail(30),
                self.name
            );
        }
        self.kill();
    }
}
