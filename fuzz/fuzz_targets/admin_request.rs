//! Fuzz target `admin_request`: see `lb_daemon::fuzzing::admin_request` for the properties it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lb_daemon::fuzzing::admin_request(data));
