//! Fuzz target `config`: see `lb_daemon::fuzzing::config` for the properties it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lb_daemon::fuzzing::config(data));
