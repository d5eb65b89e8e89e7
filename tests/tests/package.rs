//! The Debian package (`cargo xtask package`, which `cargo xtask test` builds and names in
//! `LB_DEB`) installs on this machine: the daemon, the BPF object where the daemon looks for
//! it, the unit, the config as a conffile and the `lb` user; `lb-daemon check` passes on the
//! installed config and `systemd-analyze verify` on the installed unit. The package is purged
//! afterwards (and the user removed when the test created it), also when the test fails.

use std::path::Path;
use std::process::{Command, Output};

/// Runs `program args`, returning its output; panics when it cannot start.
fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn describe(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Whether dpkg has a package `lb` installed (or half-installed).
fn installed() -> bool {
    let out = run("dpkg-query", &["-W", "-f=${Status}", "lb"]);
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("installed")
}

fn user_exists() -> bool {
    run("getent", &["passwd", "lb"]).status.success()
}

/// Purges the package, and removes the `lb` user unless it was there before the test.
struct Uninstall {
    user_was_there: bool,
}

impl Drop for Uninstall {
    fn drop(&mut self) {
        let out = run("dpkg", &["--purge", "lb"]);
        if !out.status.success() {
            eprintln!("dpkg --purge lb failed: {}", describe(&out));
        }
        if !self.user_was_there && user_exists() {
            let _ = run("userdel", &["lb"]);
        }
    }
}

#[test]
fn the_package_installs_and_its_config_and_unit_pass_their_checks() {
    if !lb_tests::require_root("package::the_package_installs") {
        return;
    }
    let deb = match std::env::var("LB_DEB") {
        Ok(d) => d,
        Err(_) if std::env::var_os("LB_REQUIRE_PRIVILEGED").is_some_and(|v| v == "1") => {
            panic!("LB_DEB is not set: `cargo xtask test` builds the package and names it there")
        }
        Err(_) => {
            eprintln!(
                "skipping package::the_package_installs: LB_DEB is not set (cargo xtask \
                 package builds it; cargo xtask test sets it)"
            );
            return;
        }
    };
    assert!(
        !installed(),
        "a package `lb` is already installed on this machine; the test will not replace it"
    );
    let _uninstall = Uninstall {
        user_was_there: user_exists(),
    };

    let out = run("dpkg", &["-i", &deb]);
    assert!(out.status.success(), "dpkg -i {deb}: {}", describe(&out));
    for (path, mode) in [
        ("/usr/bin/lb-daemon", 0o755),
        ("/usr/lib/lb/lb-ebpf", 0o644),
        ("/lib/systemd/system/lb-daemon.service", 0o644),
        ("/etc/lb/lb.toml", 0o640),
    ] {
        let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777,
            mode,
            "{path}'s mode"
        );
    }
    assert!(user_exists(), "postinst did not create the `lb` user");

    let check = run("/usr/bin/lb-daemon", &["check", "-c", "/etc/lb/lb.toml"]);
    assert!(
        check.status.success(),
        "lb-daemon check -c /etc/lb/lb.toml: {}",
        describe(&check)
    );
    if Path::new("/usr/bin/systemd-analyze").exists() {
        let verify = run(
            "systemd-analyze",
            &["verify", "/lib/systemd/system/lb-daemon.service"],
        );
        assert!(
            verify.status.success() && verify.stderr.is_empty(),
            "systemd-analyze verify: {}",
            describe(&verify)
        );
    }

    // The config is a conffile: an administrator's edit survives reinstalling the package.
    let edited = format!(
        "{}\n# edited by the administrator\n",
        std::fs::read_to_string("/etc/lb/lb.toml").expect("read the installed config")
    );
    std::fs::write("/etc/lb/lb.toml", &edited).expect("edit the installed config");
    let again = run("dpkg", &["-i", &deb]);
    assert!(
        again.status.success(),
        "dpkg -i again: {}",
        describe(&again)
    );
    assert_eq!(
        std::fs::read_to_string("/etc/lb/lb.toml").expect("read the config again"),
        edited,
        "reinstalling the package replaced the edited /etc/lb/lb.toml"
    );
}
