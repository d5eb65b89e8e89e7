//! The program-cost lab's restored runs (`lb_benches::restore`): each repetition of a
//! 1,000-repetition test run must be lb's program answering the case's own packet. Were the
//! frame not written back, the program would from the second repetition on see its own output
//! (a translated or encapsulated packet, not for a VIP) and pass it, and the run's check,
//! which compares the last repetition with one plain run, would fail. Root and
//! `LB_EBPF_OBJ` (`cargo xtask test` sets both).

use lb_benches::program_cost::{Packet, Program, ProgramLab};
use lb_tests::privileged::require_root;

#[test]
fn every_restored_case_repeats_the_programs_answer_to_its_own_packet() {
    if !require_root("program_cost restored runs") {
        return;
    }
    let mut lab = ProgramLab::new().expect("the program-cost lab");
    for program in Program::ALL {
        for case in Packet::ALL {
            let expected_to_repeat = match case {
                Packet::NewSyn | Packet::PassedRepeated => false,
                Packet::DsrEncap => program == Program::Xdp,
                Packet::Established | Packet::NatReply | Packet::Passed => true,
            };
            let prepared = lab.prepare_restored(program, case);
            if !expected_to_repeat {
                assert!(
                    prepared.is_err(),
                    "{} {}: has no restored form, yet prepared",
                    program.name(),
                    case.name()
                );
                continue;
            }
            if let Err(e) = prepared {
                panic!("{} {}: {e}", program.name(), case.name());
            }
            for _ in 0..3 {
                let d = lab
                    .run_restored(program, case)
                    .unwrap_or_else(|e| panic!("{} {}: {e}", program.name(), case.name()));
                assert!(
                    d.as_nanos() > 0,
                    "{} {}: no duration",
                    program.name(),
                    case.name()
                );
            }
        }
    }
}
