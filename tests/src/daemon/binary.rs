//! Finding the `lb-daemon` binary: `LB_DAEMON_BIN` when set (as `cargo xtask test` does),
//! else `cargo build -p lb-daemon` in the workspace, once per test process.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The path of `lb-daemon`: `$LB_DAEMON_BIN` if set, else the one `cargo build -p lb-daemon`
/// produces (built at the first call in this process; later calls reuse it).
///
/// Returns `Err(message)` when `LB_DAEMON_BIN` names no file or the build fails.
pub fn daemon_binary() -> Result<PathBuf, String> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY.get_or_init(find_or_build).clone()
}

fn find_or_build() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("LB_DAEMON_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("LB_DAEMON_BIN={} is not a file", p.display()))
        };
    }
    build()
}

/// The workspace root: this crate's parent directory.
pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_path_buf()
}

fn build() -> Result<PathBuf, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = workspace_root();
    eprintln!(
        "LB_DAEMON_BIN is not set; building lb-daemon in {}",
        root.display()
    );
    let out = Command::new(&cargo)
        .args(["build", "-p", "lb-daemon", "--bin", "lb-daemon"])
        .arg("--message-format=json-render-diagnostics")
        .current_dir(&root)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", Path::new(&cargo).display()))?;
    if !out.status.success() {
        return Err(format!(
            "`cargo build -p lb-daemon` failed ({})",
            out.status
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    executable_from_messages(&stdout)
        .or_else(|| {
            let guess = target_dir().join("debug").join("lb-daemon");
            guess.is_file().then_some(guess)
        })
        .ok_or_else(|| "cargo built lb-daemon but did not say where".to_string())
}

/// The `"executable"` of the `lb-daemon` artifact in cargo's JSON messages.
fn executable_from_messages(stdout: &str) -> Option<PathBuf> {
    stdout
        .lines()
        .filter(|l| l.contains("\"compiler-artifact\"") && l.contains("\"name\":\"lb-daemon\""))
        .find_map(|l| {
            let start = l.find("\"executable\":\"")? + "\"executable\":\"".len();
            let len = l[start..].find('"')?;
            Some(PathBuf::from(&l[start..start + len]))
        })
}

/// The target directory: `$CARGO_TARGET_DIR`, else the one this executable was built in,
/// else `<workspace>/target`.
fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        let d = PathBuf::from(d);
        return if d.is_absolute() {
            d
        } else {
            workspace_root().join(d)
        };
    }
    // Test executables live in <target>/<profile>/deps, binaries in <target>/<profile>.
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            let dir = exe.parent()?;
            let profile_dir = if dir.file_name()? == "deps" {
                dir.parent()?
            } else {
                dir
            };
            Some(profile_dir.parent()?.to_path_buf())
        })
        .unwrap_or_else(|| workspace_root().join("target"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_executable_in_cargo_messages() {
        let msgs = concat!(
            r#"{"reason":"compiler-artifact","target":{"name":"lb_daemon","kind":["lib"]},"executable":null}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"lb-daemon"},"executable":"/w/target/debug/lb-daemon","fresh":true}"#,
            "\n",
            r#"{"reason":"build-finished","success":true}"#,
        );
        assert_eq!(
            executable_from_messages(msgs),
            Some(PathBuf::from("/w/target/debug/lb-daemon"))
        );
        assert_eq!(executable_from_messages("{}"), None);
    }
}
