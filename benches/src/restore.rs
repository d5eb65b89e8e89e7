//! A frame-restoring harness, so a BPF_PROG_TEST_RUN with `repeat` runs lb's program on the
//! case's own packet every time.
//!
//! The kernel hands the same buffer to every repetition of a test run, and lb's programs
//! rewrite it (NAT addresses and ports, an outer header for DSR); from the second repetition
//! on the program would see its own output, which it passes on at once. The harness is a
//! small program of the same type that runs first in each repetition: it brings the buffer
//! back to the case's length (`bpf_xdp_adjust_head` / `bpf_skb_adjust_room`), writes the
//! case's bytes over it (`bpf_xdp_store_bytes` / `bpf_skb_store_bytes`, from a one-element
//! array map) and tail-calls lb's program, which then answers for the repetition. The
//! harness's own cost is measured the same way on a frame lb passes at once (an ARP frame),
//! and is part of every figure taken through it.
//!
//! aya loads programs only from an object, and this one is fifteen instructions, so it is
//! assembled here and loaded with bpf(2) directly (`BPF_MAP_CREATE`, `BPF_PROG_LOAD`,
//! `BPF_MAP_UPDATE_ELEM`, `BPF_PROG_TEST_RUN`; uapi `linux/bpf.h`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// The hook the harness runs at, which is the type of the program it tail-calls: XDP (an
/// `xdp_md`) or tc (`sched_cls`, a `__sk_buff`).
pub use lb_tests::xdp::testrun::Hook;

/// bpf(2) commands.
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// Map types: a plain array (the frame), a program array (the tail call's target).
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;
/// Program types, and the XDP attach type aya loads `lb_xdp` with (the tail call's target
/// must match the harness in both).
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
/// Helpers the harness calls.
const HELPER_SKB_STORE_BYTES: i32 = 9;
const HELPER_TAIL_CALL: i32 = 12;
const HELPER_XDP_ADJUST_HEAD: i32 = 44;
const HELPER_SKB_ADJUST_ROOM: i32 = 50;
const HELPER_XDP_STORE_BYTES: i32 = 190;
/// `BPF_ADJ_ROOM_MAC`: room changed right after the Ethernet header.
const BPF_ADJ_ROOM_MAC: i32 = 1;
/// What the harness answers when it cannot restore the frame or the tail call fails
/// (`XDP_ABORTED`, `TC_ACT_TRAP`): lb's programs answer neither.
const XDP_HARNESS_FAILED: u32 = 0;
const TC_HARNESS_FAILED: u32 = 8;

/// A loaded harness for one frame and one target program.
pub struct Harness {
    prog: OwnedFd,
    frame: Vec<u8>,
    // The program holds its own references to the maps; these keep them for the update.
    _frame_map: OwnedFd,
    _targets: OwnedFd,
}

/// One test run's outcome: the action of the last repetition, its output frame, and the
/// kernel's duration per repetition.
#[derive(Debug)]
pub struct Outcome {
    /// The program's return value.
    pub action: u32,
    /// The frame as the last repetition left it.
    pub frame: Vec<u8>,
    /// The kernel's `duration`: the whole run's time divided by `repeat`, in ns.
    pub per_packet: Duration,
}

impl Harness {
    /// Loads a harness that restores `frame` before every repetition and tail-calls `target`
    /// (a loaded program of `hook`'s type). `Err` when a bpf(2) call fails, with the
    /// verifier's log for a refused load.
    pub fn new(hook: Hook, frame: &[u8], target: BorrowedFd<'_>) -> io::Result<Harness> {
        let len = i32::try_from(frame.len()).map_err(|_| invalid("frame too long"))?;
        if frame.is_empty() {
            return Err(invalid("empty frame"));
        }
        let frame_map = map_create(BPF_MAP_TYPE_ARRAY, 4, frame.len() as u32, 1)?;
        map_update(frame_map.as_fd(), &0u32.to_ne_bytes(), frame)?;
        let targets = map_create(BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 1)?;
        let insns = program(hook, len, frame_map.as_raw_fd(), targets.as_raw_fd());
        let (prog_type, attach_type) = match hook {
            Hook::Xdp => (BPF_PROG_TYPE_XDP, BPF_XDP),
            Hook::Tc => (BPF_PROG_TYPE_SCHED_CLS, 0),
        };
        let prog = prog_load(prog_type, attach_type, &insns)?;
        map_update(
            targets.as_fd(),
            &0u32.to_ne_bytes(),
            &(target.as_raw_fd() as u32).to_ne_bytes(),
        )?;
        Ok(Harness {
            prog,
            frame: frame.to_vec(),
            _frame_map: frame_map,
            _targets: targets,
        })
    }

    /// Runs the harness (and through it the target) `repeat` times on the frame, with `ctx`
    /// as the context (`xdp_md` or `__sk_buff` bytes, as for the target alone). Call it in
    /// the namespace the target must route in.
    pub fn run(&self, ctx: &[u8], repeat: u32) -> io::Result<Outcome> {
        let mut out = vec![0u8; self.frame.len() + 256];
        let mut attr = [0u8; 80];
        put32(&mut attr, 0, self.prog.as_raw_fd() as u32);
        put32(&mut attr, 8, self.frame.len() as u32);
        put32(&mut attr, 12, out.len() as u32);
        put64(&mut attr, 16, self.frame.as_ptr() as u64);
        put64(&mut attr, 24, out.as_mut_ptr() as u64);
        put32(&mut attr, 32, repeat);
        put32(&mut attr, 40, ctx.len() as u32);
        put64(&mut attr, 48, ctx.as_ptr() as u64);
        bpf(BPF_PROG_TEST_RUN, &mut attr)?;
        let action = get32(&attr, 4);
        out.truncate(get32(&attr, 12) as usize);
        Ok(Outcome {
            action,
            frame: out,
            per_packet: Duration::from_nanos(u64::from(get32(&attr, 36))),
        })
    }
}

/// The harness's instructions (registers: r1 the context, r6 a copy of it).
fn program(hook: Hook, len: i32, frame_map: i32, targets: i32) -> Vec<Insn> {
    use Insn as I;
    let mut p = vec![I::mov64_reg(6, 1)];
    match hook {
        Hook::Xdp => {
            // delta = (data_end - data) - len; adjust_head(ctx, delta) when not zero. The
            // verifier allows subtracting packet pointers to a program loaded with
            // CAP_PERFMON.
            p.push(I::ldx_w(2, 6, 4));
            p.push(I::ldx_w(3, 6, 0));
            p.push(I::sub64_reg(2, 3));
            p.push(I::add64_imm(2, -len));
            p.push(I::jeq_imm(2, 0, 3));
            p.push(I::mov64_reg(1, 6));
            p.push(I::call(HELPER_XDP_ADJUST_HEAD));
            p.push(I::jne_imm(0, 0, FAIL));
            // xdp_store_bytes(ctx, 0, frame, len)
            p.push(I::mov64_reg(1, 6));
            p.push(I::mov64_imm(2, 0));
            p.extend(I::ld_map_value(3, frame_map));
            p.push(I::mov64_imm(4, len));
            p.push(I::call(HELPER_XDP_STORE_BYTES));
        }
        Hook::Tc => {
            // len_diff = len - skb->len; adjust_room(skb, len_diff, MAC, 0) when not zero.
            p.push(I::ldx_w(2, 6, 0));
            p.push(I::mov64_imm(3, len));
            p.push(I::sub64_reg(3, 2));
            p.push(I::jeq_imm(3, 0, 6));
            p.push(I::mov64_reg(1, 6));
            p.push(I::mov64_reg(2, 3));
            p.push(I::mov64_imm(3, BPF_ADJ_ROOM_MAC));
            p.push(I::mov64_imm(4, 0));
            p.push(I::call(HELPER_SKB_ADJUST_ROOM));
            p.push(I::jne_imm(0, 0, FAIL));
            // skb_store_bytes(skb, 0, frame, len, 0)
            p.push(I::mov64_reg(1, 6));
            p.push(I::mov64_imm(2, 0));
            p.extend(I::ld_map_value(3, frame_map));
            p.push(I::mov64_imm(4, len));
            p.push(I::mov64_imm(5, 0));
            p.push(I::call(HELPER_SKB_STORE_BYTES));
        }
    }
    p.push(I::jne_imm(0, 0, FAIL));
    // tail_call(ctx, targets, 0); on return it failed.
    p.push(I::mov64_reg(1, 6));
    p.extend(I::ld_map_fd(2, targets));
    p.push(I::mov64_imm(3, 0));
    p.push(I::call(HELPER_TAIL_CALL));
    let failed = match hook {
        Hook::Xdp => XDP_HARNESS_FAILED,
        Hook::Tc => TC_HARNESS_FAILED,
    };
    let fail_at = p.len();
    p.push(I::mov64_imm(0, failed as i32));
    p.push(I::exit());
    // Point every `FAIL` jump at the exit block.
    for (i, insn) in p.iter_mut().enumerate() {
        if insn.off == FAIL {
            insn.off = (fail_at - i - 1) as i16;
        }
    }
    p
}

/// A placeholder jump offset, patched to the harness's failure exit.
const FAIL: i16 = i16::MIN;

/// One BPF instruction (`struct bpf_insn`).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct Insn {
    code: u8,
    /// `dst_reg` in the low nibble, `src_reg` in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        Insn {
            code,
            regs: (src << 4) | dst,
            off,
            imm,
        }
    }
    fn mov64_reg(dst: u8, src: u8) -> Insn {
        Insn::new(0xbf, dst, src, 0, 0)
    }
    fn mov64_imm(dst: u8, imm: i32) -> Insn {
        Insn::new(0xb7, dst, 0, 0, imm)
    }
    fn add64_imm(dst: u8, imm: i32) -> Insn {
        Insn::new(0x07, dst, 0, 0, imm)
    }
    fn sub64_reg(dst: u8, src: u8) -> Insn {
        Insn::new(0x1f, dst, src, 0, 0)
    }
    /// `dst = *(u32 *)(src + off)`.
    fn ldx_w(dst: u8, src: u8, off: i16) -> Insn {
        Insn::new(0x61, dst, src, off, 0)
    }
    fn jeq_imm(dst: u8, imm: i32, off: i16) -> Insn {
        Insn::new(0x15, dst, 0, off, imm)
    }
    fn jne_imm(dst: u8, imm: i32, off: i16) -> Insn {
        Insn::new(0x55, dst, 0, off, imm)
    }
    fn call(helper: i32) -> Insn {
        Insn::new(0x85, 0, 0, 0, helper)
    }
    fn exit() -> Insn {
        Insn::new(0x95, 0, 0, 0, 0)
    }
    /// `dst = map` (`BPF_PSEUDO_MAP_FD`), two instruction slots.
    fn ld_map_fd(dst: u8, fd: i32) -> [Insn; 2] {
        [Insn::new(0x18, dst, 1, 0, fd), Insn::new(0, 0, 0, 0, 0)]
    }
    /// `dst = &map[0]` (`BPF_PSEUDO_MAP_VALUE`, offset 0), two instruction slots.
    fn ld_map_value(dst: u8, fd: i32) -> [Insn; 2] {
        [Insn::new(0x18, dst, 2, 0, fd), Insn::new(0, 0, 0, 0, 0)]
    }
}

fn map_create(map_type: u32, key: u32, value: u32, entries: u32) -> io::Result<OwnedFd> {
    let mut attr = [0u8; 72];
    put32(&mut attr, 0, map_type);
    put32(&mut attr, 4, key);
    put32(&mut attr, 8, value);
    put32(&mut attr, 12, entries);
    fd(bpf(BPF_MAP_CREATE, &mut attr)?)
}

fn map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = [0u8; 32];
    put32(&mut attr, 0, map.as_raw_fd() as u32);
    put64(&mut attr, 8, key.as_ptr() as u64);
    put64(&mut attr, 16, value.as_ptr() as u64);
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

fn prog_load(prog_type: u32, attach_type: u32, insns: &[Insn]) -> io::Result<OwnedFd> {
    let license = b"GPL\0";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, prog_type);
    put32(&mut attr, 4, insns.len() as u32);
    put64(&mut attr, 8, insns.as_ptr() as u64);
    put64(&mut attr, 16, license.as_ptr() as u64);
    put32(&mut attr, 24, 1); // log_level
    put32(&mut attr, 28, log.len() as u32);
    put64(&mut attr, 32, log.as_mut_ptr() as u64);
    let name = b"lb_restore";
    attr[48..48 + name.len()].copy_from_slice(name);
    put32(&mut attr, 68, attach_type);
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(n) => fd(n),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            Err(io::Error::new(
                e.kind(),
                format!(
                    "loading the restoring harness: {e}: {}",
                    String::from_utf8_lossy(&log[..end])
                ),
            ))
        }
    }
}

/// bpf(2) with `attr` as the command's attribute block; the return value on success.
fn bpf(cmd: libc::c_long, attr: &mut [u8]) -> io::Result<i64> {
    // SAFETY: `attr` is a zeroed, writable block as large as the command reads, and every
    // pointer in it refers to a buffer the caller keeps alive for the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn fd(n: i64) -> io::Result<OwnedFd> {
    let raw = i32::try_from(n).map_err(|_| invalid("bpf(2) returned no fd"))?;
    // SAFETY: a successful BPF_MAP_CREATE / BPF_PROG_LOAD returns a new fd that nothing
    // else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.to_string())
}

fn put32(attr: &mut [u8], at: usize, v: u32) {
    attr[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put64(attr: &mut [u8], at: usize, v: u64) {
    attr[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

fn get32(attr: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&attr[at..at + 4]);
    u32::from_ne_bytes(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_jump_lands_on_the_exit_block() {
        for hook in [Hook::Xdp, Hook::Tc] {
            let p = program(hook, 54, 3, 4);
            let exit_block = p.len() - 2;
            assert_eq!(p[exit_block].code, 0xb7, "r0 = failure code");
            assert_eq!(p[exit_block + 1].code, 0x95, "exit");
            for (i, insn) in p.iter().enumerate() {
                if insn.code == 0x55 {
                    let to = i as i64 + 1 + i64::from(insn.off);
                    assert_eq!(to, exit_block as i64, "{hook:?}: jne at {i}");
                }
            }
        }
    }

    #[test]
    fn the_length_check_skips_exactly_the_resize_call() {
        for hook in [Hook::Xdp, Hook::Tc] {
            let p = program(hook, 54, 3, 4);
            let (at, jeq) = p
                .iter()
                .enumerate()
                .find(|(_, i)| i.code == 0x15)
                .expect("a jeq");
            let to = at + 1 + jeq.off as usize;
            // It lands right after the resize's own failure check.
            assert_eq!(p[to - 1].code, 0x55, "{hook:?}");
            assert_eq!(p[to - 2].code, 0x85, "{hook:?}");
        }
    }
}
