//! The guard for tests that need root (network namespaces, veth, XDP).

/// What a privileged test should do.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    Run,
    Skip,
    Fail,
}

fn decide(is_root: bool, require_privileged: Option<&str>) -> Decision {
    match (is_root, require_privileged) {
        (true, _) => Decision::Run,
        (false, Some("1")) => Decision::Fail,
        (false, _) => Decision::Skip,
    }
}

/// Whether `test_name`, which needs root, can run. As root: `true`. Otherwise it prints
/// why the test is skipped and returns `false`, unless `LB_REQUIRE_PRIVILEGED=1`, when it
/// panics instead: CI must never pass by skipping.
///
/// Use as `if !require_root("xdp_nat") { return; }`.
pub fn require_root(test_name: &str) -> bool {
    let uid = nix::unistd::geteuid();
    let env = std::env::var("LB_REQUIRE_PRIVILEGED").ok();
    match decide(uid.is_root(), env.as_deref()) {
        Decision::Run => true,
        Decision::Fail => panic!(
            "{test_name} needs root (network namespaces, XDP) but runs as uid {uid}; \
             LB_REQUIRE_PRIVILEGED=1 forbids skipping it"
        ),
        Decision::Skip => {
            eprintln!(
                "skipping {test_name}: it needs root (network namespaces, XDP) and runs as uid \
                 {uid}; run it as root, or set LB_REQUIRE_PRIVILEGED=1 to make this a failure"
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_runs_others_skip_unless_required() {
        assert_eq!(decide(true, None), Decision::Run);
        assert_eq!(decide(true, Some("1")), Decision::Run);
        assert_eq!(decide(false, None), Decision::Skip);
        assert_eq!(decide(false, Some("0")), Decision::Skip);
        assert_eq!(decide(false, Some("1")), Decision::Fail);
    }
}
