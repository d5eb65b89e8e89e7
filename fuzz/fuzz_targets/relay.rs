//! Fuzz target `relay`: see `lb_daemon::fuzzing::relay` for the properties it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lb_daemon::fuzzing::relay(data));
