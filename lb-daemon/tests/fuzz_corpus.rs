//! Every input in the fuzz targets' corpora (`fuzz/corpus/<target>/`, the seeds and what
//! `cargo xtask fuzz` kept) and every crash it saved and was fixed (`fuzz/regressions/<target>/`)
//! runs through the target's body on stable Rust, so `cargo test` keeps what fuzzing found.

use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        if let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) {
            files.extend(entries.filter_map(|e| Some(e.ok()?.path())));
        }
    }
    files.sort();
    files
}

fn run(target: &str, body: fn(&[u8])) {
    let files = inputs(target);
    assert!(
        !files.is_empty(),
        "fuzz/corpus/{target} is empty: the seeds belong in git"
    );
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let outcome = std::panic::catch_unwind(|| body(&data));
        assert!(
            outcome.is_ok(),
            "{target}: {} broke a property",
            f.display()
        );
    }
}

#[test]
fn the_config_corpus_passes() {
    run("config", lb_daemon::fuzzing::config);
}

#[test]
fn the_admin_request_corpus_passes() {
    run("admin_request", lb_daemon::fuzzing::admin_request);
}

#[test]
fn the_relay_corpus_passes() {
    run("relay", lb_daemon::fuzzing::relay);
}
