//! CPU time and memory of the processes in a network namespace, from /proc.
//!
//! A process belongs to the balancer when `/proc/<pid>/ns/net` is the balancer namespace:
//! that catches HAProxy's threads, nginx's master and workers, and lb-daemon alike. Softirq
//! time (where the kernel does most packet work) cannot be split by namespace from /proc, so
//! it is read machine-wide from /proc/stat and reported separately.

use std::fs;
use std::os::unix::fs::MetadataExt;

/// CPU seconds (user + system) of every process in the namespace whose bind mount is
/// `/var/run/netns/<name>`, and the sum of their peak RSS (VmHWM) in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// User + system CPU seconds of the namespace's processes (all their threads).
    pub cpu_seconds: f64,
    /// Sum of the processes' VmHWM, bytes.
    pub peak_rss: u64,
    /// How many processes were found.
    pub processes: usize,
}

/// Reads [`Usage`] of namespace `name`. Processes that exit while being read are skipped.
pub fn usage(name: &str) -> Usage {
    let Ok(meta) = fs::metadata(format!("/var/run/netns/{name}")) else {
        return Usage::default();
    };
    let want = format!("net:[{}]", meta.ino());
    let tick = ticks_per_second();
    let mut u = Usage::default();
    let Ok(dir) = fs::read_dir("/proc") else {
        return u;
    };
    for entry in dir.flatten() {
        let pid = entry.file_name();
        let Some(pid) = pid
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let same =
            fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|l| l.to_string_lossy() == want);
        if !same {
            continue;
        }
        let Some(ticks) = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| cpu_ticks(&s))
        else {
            continue;
        };
        u.cpu_seconds += ticks as f64 / tick;
        u.peak_rss += fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| vm_hwm(&s))
            .unwrap_or(0);
        u.processes += 1;
    }
    u
}

/// Machine-wide softirq CPU seconds so far (all CPUs), from /proc/stat.
pub fn softirq_seconds() -> f64 {
    let ticks = fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("cpu "))?.to_string();
            // cpu user nice system idle iowait irq softirq ...
            line.split_whitespace().nth(7)?.parse::<u64>().ok()
        })
        .unwrap_or(0);
    ticks as f64 / ticks_per_second()
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime from a `/proc/<pid>/stat` line (fields 14 and 15; the command name in
/// parentheses may contain spaces, so fields are counted after the last `)`).
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    // After ')': state(3) ppid(4) ... utime is field 14, the 12th after ')'.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// VmHWM in bytes from `/proc/<pid>/status`.
fn vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_after_a_command_name_with_spaces() {
        let stat = "42 (my (odd) cmd) S 1 42 42 0 -1 4194560 100 0 0 0 17 5 0 0 20 0 1 0 5 0 0";
        assert_eq!(cpu_ticks(stat), Some(22), "utime 17 + stime 5");
        assert_eq!(cpu_ticks("garbage"), None);
    }

    #[test]
    fn peak_rss_comes_from_vm_hwm_in_kib() {
        let status = "Name:\tx\nVmPeak:\t 9000 kB\nVmHWM:\t    1234 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(vm_hwm(status), Some(1234 * 1024));
    }

    #[test]
    fn this_process_is_found_in_its_own_namespace_reading() {
        // Reading our own stat must give a CPU figure (sanity of the field positions).
        let stat = fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
        assert!(cpu_ticks(&stat).is_some(), "parse /proc/self/stat: {stat}");
    }
}
