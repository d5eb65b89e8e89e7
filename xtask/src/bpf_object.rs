//! Checks that a built object is what the daemon will load: a BPF ELF with the XDP program and
//! the maps it expects.

use lb_common::maps;
use std::{fs, path::Path};

use anyhow::{bail, Context, Result};
use object::{Object, ObjectSection, ObjectSymbol};

/// ELF `e_machine` of eBPF objects (`EM_BPF` in the ELF specification's machine list).
const EM_BPF: u16 = 247;
/// Offset of `e_machine` in the ELF header (after the 16 ident bytes and the 2-byte `e_type`).
const E_MACHINE_OFFSET: usize = 18;

/// Programs that must be present, as (section, function symbol).
const PROGRAMS: &[(&str, &str)] = &[
    ("xdp", maps::PROG_BALANCER),
    ("classifier", maps::PROG_TC),
    ("xdp", maps::PROG_DECAP),
    ("classifier", maps::PROG_DECAP_TC),
];
/// Maps that must be present, by symbol name in the `maps` section.
const MAPS: &[&str] = &[
    maps::VIPS,
    maps::SERVICES,
    maps::BACKENDS,
    maps::TABLES,
    maps::CONNTRACK,
    maps::NAT_REVERSE,
    maps::DEVMAP,
    maps::VETH_PEERS,
    maps::BRIDGE_FDB,
    maps::BRIDGE_PORTS,
    maps::BRIDGES,
    maps::LIMITS,
    maps::CLIENTS,
    maps::DECAP_ADDRS,
    maps::DECAP_SOURCES,
    maps::VIP_ADDRS,
    maps::VIP_PORTS,
    maps::LOCAL_ADDRS,
    maps::STATS,
    maps::SERVICE_STATS,
    maps::BACKEND_STATS,
];

/// Reads the object at `path` and checks it: little-endian 64-bit ELF, machine BPF, each entry
/// of `PROGRAMS` and `MAPS` present. Returns a one-line summary (path, size, what was found), or
/// `Err` saying what is wrong.
pub fn verify(path: &Path) -> Result<String> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let machine = elf_machine(&bytes)
        .with_context(|| format!("{} is not a 64-bit little-endian ELF", path.display()))?;
    if machine != EM_BPF {
        bail!(
            "{} is an ELF for machine {machine}, not BPF ({EM_BPF})",
            path.display()
        );
    }
    let file = object::File::parse(&*bytes)
        .with_context(|| format!("parsing {} as ELF", path.display()))?;

    for (section, function) in PROGRAMS {
        let found = file.section_by_name(section).with_context(|| {
            format!(
                "{} has no `{section}` section (sections: {})",
                path.display(),
                section_names(&file)
            )
        })?;
        let in_section = file
            .symbols()
            .any(|s| s.name() == Ok(*function) && s.section_index() == Some(found.index()));
        if !in_section {
            bail!(
                "{}: no function `{function}` in section `{section}`",
                path.display()
            );
        }
    }
    let maps_section = file
        .section_by_name("maps")
        .with_context(|| format!("{} has no `maps` section", path.display()))?;
    for map in MAPS {
        let in_maps = file
            .symbols()
            .any(|s| s.name() == Ok(*map) && s.section_index() == Some(maps_section.index()));
        if !in_maps {
            bail!("{}: no map `{map}` in section `maps`", path.display());
        }
    }

    let programs: Vec<String> = PROGRAMS.iter().map(|(s, f)| format!("{s}:{f}")).collect();
    Ok(format!(
        "{} ({} bytes, BPF ELF, programs {}, maps {})",
        path.display(),
        bytes.len(),
        programs.join(","),
        MAPS.join(",")
    ))
}

/// `e_machine` of a 64-bit little-endian ELF, or `None` if `bytes` is not one.
fn elf_machine(bytes: &[u8]) -> Option<u16> {
    const ELFCLASS64: u8 = 2;
    const ELFDATA2LSB: u8 = 1;
    let header = bytes.get(..E_MACHINE_OFFSET + 2)?;
    if &header[..4] != b"\x7fELF" || header[4] != ELFCLASS64 || header[5] != ELFDATA2LSB {
        return None;
    }
    Some(u16::from_le_bytes([
        header[E_MACHINE_OFFSET],
        header[E_MACHINE_OFFSET + 1],
    ]))
}

fn section_names(file: &object::File<'_>) -> String {
    let names: Vec<&str> = file
        .sections()
        .filter_map(|s| s.name().ok())
        .filter(|n| !n.is_empty() && !n.starts_with(".debug") && !n.starts_with(".rel"))
        .collect();
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_machine_reads_the_header_field() {
        let mut header = vec![0u8; 64];
        header[..4].copy_from_slice(b"\x7fELF");
        header[4] = 2;
        header[5] = 1;
        header[E_MACHINE_OFFSET..E_MACHINE_OFFSET + 2].copy_from_slice(&EM_BPF.to_le_bytes());
        assert_eq!(
            elf_machine(&header),
            Some(EM_BPF),
            "a BPF header reads as BPF"
        );
        header[E_MACHINE_OFFSET] = 62; // EM_X86_64
        assert_eq!(
            elf_machine(&header),
            Some(62),
            "an x86-64 header reads as x86-64"
        );
    }

    #[test]
    fn elf_machine_rejects_what_is_not_a_64_bit_little_endian_elf() {
        assert_eq!(
            elf_machine(b"\x7fELF"),
            None,
            "a truncated header is refused"
        );
        assert_eq!(
            elf_machine(&[0u8; 64]),
            None,
            "bytes without the ELF magic are refused"
        );
        let mut big_endian = vec![0u8; 64];
        big_endian[..4].copy_from_slice(b"\x7fELF");
        big_endian[4] = 2;
        big_endian[5] = 2;
        assert_eq!(
            elf_machine(&big_endian),
            None,
            "a big-endian ELF is refused"
        );
    }

    #[test]
    fn verify_refuses_a_host_binary() {
        // The running test binary is an ELF for the host, not BPF.
        let me = std::env::current_exe().expect("the test binary knows its path");
        let error = verify(&me).expect_err("a host binary is not a BPF object");
        assert!(
            error.to_string().contains("not BPF"),
            "the error says the machine is wrong: {error:#}"
        );
    }

    #[test]
    fn verify_accepts_the_built_lb_ebpf_object() {
        // Set by `cargo xtask test` to the object build-ebpf just made and checked; a plain
        // `cargo test` has no object to look at.
        let Some(path) = std::env::var_os("LB_EBPF_OBJ") else {
            eprintln!("LB_EBPF_OBJ unset (run `cargo xtask test`): not checking a real object");
            return;
        };
        let summary = verify(Path::new(&path))
            .unwrap_or_else(|e| panic!("the lb-ebpf object should pass the check: {e:#}"));
        assert!(
            summary.contains("xdp:lb_xdp") && summary.contains("STATS"),
            "the summary names the program and the map: {summary}"
        );
    }
}
