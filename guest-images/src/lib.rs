//! ftvm's guests, built from source (`guests/`, a freestanding workspace) by
//! this crate's build script and embedded as static ELF images.
//!
//! Each image follows the guest ABI of `ftvm-abi`: a static, non-PIE x86_64
//! ELF linked at `KERNEL_LOAD_ADDR` (1 MiB), entered in long mode at `_start`
//! with `rdi` pointing at the boot parameters. The guests obey the lockstep
//! contract: time, randomness and sleep come from ftvm's ports, never from
//! RDTSC or RDRAND (a unit test disassembles every image to check).
//!
//! The images are release builds; what each one prints on COM1 and the
//! status it powers off with are in its description and in its
//! `guests/<name>/src/main.rs`.
//!
//! Adding a guest: a directory `guests/<name>` holding a package
//! `guest-<name>` whose one binary is `<name>` (copy `guests/hello`), a line
//! in the guests' workspace members, and an entry in [`GUESTS`] (a unit test
//! fails when a built guest is not listed).
#![forbid(unsafe_code)]

/// One embedded guest image.
#[derive(Debug)]
pub struct Guest {
    /// What `--guest NAME` selects.
    pub name: &'static str,
    /// One line for `ftvm guests`.
    pub description: &'static str,
    /// A test or benchmark guest, not meant for users (`ftvm guests` may
    /// hide it).
    pub test_only: bool,
    /// Start the guest at CPL 0 rather than CPL 3 (`ftvm_abi`, "Privilege"):
    /// only for a guest that must execute `in`/`out` itself.
    pub kernel_mode: bool,
    /// The static ELF image, as the VMM's loader reads it.
    pub elf: &'static [u8],
}

/// The image build.rs left for guest `$name`.
macro_rules! elf {
    ($name:literal) => {
        include_bytes!(concat!(env!("OUT_DIR"), "/elf/", $name))
    };
}

/// Every embedded guest, users' first.
pub static GUESTS: &[Guest] = &[
    Guest {
        name: "hello",
        description: "Prints \"Hello from ftvm!\" and powers off.",
        test_only: false,
        kernel_mode: false,
        elf: elf!("hello"),
    },
    Guest {
        name: "streamer",
        description: "Streams 1316-byte UDP datagrams (u64 LE sequence number, u64 LE guest clock ns) from port 5000 to --param dest=IP:PORT at --param rate=PPS (default 1000); needs a NIC.",
        test_only: false,
        kernel_mode: false,
        elf: elf!("streamer"),
    },
    Guest {
        name: "kvstore",
        description: "Redis-protocol key-value server on TCP port 6379 for redis-cli and redis-benchmark (--param clients=N, default 64); needs a NIC and 21 MiB or more.",
        test_only: false,
        kernel_mode: false,
        elf: elf!("kvstore"),
    },
    Guest {
        name: "devices",
        description: "Test: checks clock, timer sleep, entropy, heap and health; prints \"devices ok\", powers off with 0 (1 on a failed check).",
        test_only: true,
        kernel_mode: false,
        elf: elf!("devices"),
    },
    Guest {
        name: "triple-fault",
        description: "Test: prints a line, loads an empty IDT and executes ud2, so the CPU triple-faults.",
        test_only: true,
        kernel_mode: false,
        elf: elf!("triple-fault"),
    },
    Guest {
        name: "panic",
        description: "Test: panics with \"deliberate panic\"; the runtime prints it and reports through pvpanic.",
        test_only: true,
        kernel_mode: false,
        elf: elf!("panic"),
    },
    Guest {
        name: "bad-port",
        description: "Test: prints a line, writes to port 0x1234 (no device), and powers off with 0 if it is let go on.",
        test_only: true,
        kernel_mode: false,
        elf: elf!("bad-port"),
    },
    Guest {
        name: "bad-virtio",
        description: "Test: a hostile NIC driver that posts a TX buffer outside guest memory (--param case=outside|loop|size).",
        test_only: true,
        kernel_mode: false,
        elf: elf!("bad-virtio"),
    },
    Guest {
        name: "rdtsc",
        description: "Test: breaks the lockstep contract on purpose (RDTSC into memory), so replay diverges.",
        test_only: true,
        kernel_mode: false,
        elf: elf!("rdtsc"),
    },
    Guest {
        name: "crunch",
        description: "Benchmark: CPU-bound (--param rounds=N of 10^6 xorshift steps, default 4000), then powers off.",
        test_only: true,
        kernel_mode: false,
        elf: elf!("crunch"),
    },
    Guest {
        name: "dirty",
        description: "Benchmark: fills --param fill_mib=N MiB (default 16), then each round writes --param pages=P pages (default 64) and sleeps to --param period_us=U (default 1000); --param rounds=R (default 1000, 0 forever); prints a checksum.",
        test_only: true,
        kernel_mode: false,
        elf: elf!("dirty"),
    },
    Guest {
        name: "spin",
        description: "Test: prints \"spinning\", then loops forever without a single exit.",
        test_only: true,
        kernel_mode: false,
        elf: elf!("spin"),
    },
    Guest {
        name: "pio-loop",
        description: "Benchmark: --param count=N (default 1000000) 32-bit port writes to the test device, then powers off.",
        test_only: true,
        kernel_mode: true,
        elf: elf!("pio-loop"),
    },
    Guest {
        name: "mmio-loop",
        description: "Benchmark: --param count=N (default 1000000) 32-bit MMIO writes to the test device, then powers off.",
        test_only: true,
        kernel_mode: false,
        elf: elf!("mmio-loop"),
    },
];

/// The guest called `name`, if one is embedded.
pub fn find(name: &str) -> Option<&'static Guest> {
    GUESTS.iter().find(|guest| guest.name == name)
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, fs, process::Command};

    use ftvm_abi::{KERNEL_LOAD_ADDR, MIN_MEMORY_MIB};

    use super::*;

    const ET_EXEC: u16 = 2;
    const EM_X86_64: u16 = 62;
    const PT_LOAD: u32 = 1;
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    const PF_X: u32 = 1;
    const SHT_RELA: u32 = 4;
    const SHT_DYNAMIC: u32 = 6;
    const SHT_REL: u32 = 9;
    const SHT_DYNSYM: u32 = 11;

    fn u16_at(bytes: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap())
    }
    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    }
    fn u64_at(bytes: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
    }
    fn usize_at(bytes: &[u8], at: usize) -> usize {
        usize::try_from(u64_at(bytes, at)).unwrap()
    }

    /// A program header: (type, flags, offset, paddr, vaddr, filesz, memsz).
    struct Segment {
        kind: u32,
        flags: u32,
        offset: u64,
        vaddr: u64,
        paddr: u64,
        filesz: u64,
        memsz: u64,
    }

    /// Checks the ELF header and returns the entry point, the program
    /// headers and the section header types.
    fn parse(name: &str, elf: &[u8]) -> (u64, Vec<Segment>, Vec<u32>) {
        assert!(elf.len() >= 64, "{name}: too short for an ELF header");
        assert_eq!(&elf[..4], b"\x7fELF", "{name}: not an ELF file");
        assert_eq!(elf[4], 2, "{name}: not ELF64");
        assert_eq!(elf[5], 1, "{name}: not little-endian");
        assert_eq!(u16_at(elf, 16), ET_EXEC, "{name}: not a static executable (ET_EXEC)");
        assert_eq!(u16_at(elf, 18), EM_X86_64, "{name}: not x86_64");
        let entry = u64_at(elf, 24);
        let (phoff, shoff) = (usize_at(elf, 32), usize_at(elf, 40));
        let (phentsize, phnum) = (usize::from(u16_at(elf, 54)), usize::from(u16_at(elf, 56)));
        let (shentsize, shnum) = (usize::from(u16_at(elf, 58)), usize::from(u16_at(elf, 60)));
        assert_eq!(phentsize, 56, "{name}: program header size");
        let segments = (0..phnum)
            .map(|i| {
                let at = phoff + i * phentsize;
                Segment {
                    kind: u32_at(elf, at),
                    flags: u32_at(elf, at + 4),
                    offset: u64_at(elf, at + 8),
                    vaddr: u64_at(elf, at + 16),
                    paddr: u64_at(elf, at + 24),
                    filesz: u64_at(elf, at + 32),
                    memsz: u64_at(elf, at + 40),
                }
            })
            .collect();
        let sections = (0..shnum).map(|i| u32_at(elf, shoff + i * shentsize + 4)).collect();
        (entry, segments, sections)
    }

    #[test]
    fn every_guest_is_a_static_x86_64_elf_loaded_at_1_mib() {
        let ram_end = MIN_MEMORY_MIB << 20;
        for guest in GUESTS {
            let name = guest.name;
            let (entry, segments, sections) = parse(name, guest.elf);
            assert!(entry >= KERNEL_LOAD_ADDR, "{name}: entry {entry:#x} below 1 MiB");
            for kind in [PT_INTERP, PT_DYNAMIC] {
                assert!(
                    segments.iter().all(|s| s.kind != kind),
                    "{name}: has a program header of type {kind} (interpreter or dynamic)"
                );
            }
            for kind in [SHT_RELA, SHT_REL, SHT_DYNAMIC, SHT_DYNSYM] {
                assert!(
                    !sections.contains(&kind),
                    "{name}: has a section of type {kind} (relocations or dynamic linking)"
                );
            }
            let loads: Vec<&Segment> = segments.iter().filter(|s| s.kind == PT_LOAD).collect();
            assert!(!loads.is_empty(), "{name}: nothing to load");
            for s in &loads {
                assert_eq!(s.vaddr, s.paddr, "{name}: segment not identity-mapped");
                assert!(s.paddr >= KERNEL_LOAD_ADDR, "{name}: segment at {:#x} below 1 MiB", s.paddr);
                assert!(
                    s.paddr + s.memsz <= ram_end,
                    "{name}: segment {:#x}+{:#x} does not fit the smallest guest RAM",
                    s.paddr,
                    s.memsz
                );
                assert!(s.filesz <= s.memsz, "{name}: segment file size exceeds memory size");
                assert!(s.offset + s.filesz <= guest.elf.len() as u64, "{name}: segment runs past the end of the file");
            }
            assert!(
                loads.iter().any(|s| s.flags & PF_X != 0 && (s.vaddr..s.vaddr + s.filesz).contains(&entry)),
                "{name}: entry {entry:#x} is not in an executable loaded segment"
            );
        }
    }

    #[test]
    fn names_are_unique_and_found() {
        let names: BTreeSet<&str> = GUESTS.iter().map(|g| g.name).collect();
        assert_eq!(names.len(), GUESTS.len(), "duplicate guest names");
        for guest in GUESTS {
            assert!(std::ptr::eq(find(guest.name).unwrap(), guest));
            assert!(!guest.description.is_empty() && !guest.description.contains('\n'));
        }
        assert!(find("no-such-guest").is_none());
    }

    #[test]
    fn users_guests_come_first_and_the_rest_are_tests() {
        const FOR_USERS: [&str; 3] = ["hello", "streamer", "kvstore"];
        for guest in GUESTS {
            assert_eq!(guest.test_only, !FOR_USERS.contains(&guest.name), "{}", guest.name);
        }
        let first: Vec<&str> = GUESTS.iter().take(FOR_USERS.len()).map(|g| g.name).collect();
        assert_eq!(first, FOR_USERS, "users' guests are listed first");
    }

    #[test]
    fn every_built_guest_is_listed() {
        let built: BTreeSet<&str> = env!("FTVM_GUESTS_BUILT").split(',').collect();
        let listed: BTreeSet<&str> = GUESTS.iter().map(|g| g.name).collect();
        assert_eq!(built, listed, "guests/ and GUESTS disagree");
    }

    /// The mnemonics of `objdump -d -M intel --no-show-raw-insn` output that
    /// the lockstep contract forbids, with their lines.
    fn forbidden_instructions(disassembly: &str) -> Vec<String> {
        const FORBIDDEN: &[&str] = &["rdtsc", "rdtscp", "rdrand", "rdseed"];
        disassembly
            .lines()
            .filter(|line| {
                // Instruction lines are "  addr:\tmnemonic operands".
                let Some((address, insn)) = line.split_once(":\t") else {
                    return false;
                };
                if address.trim().is_empty() || address.trim().contains(' ') {
                    return false;
                }
                let mnemonic = insn.split_whitespace().next().unwrap_or("");
                FORBIDDEN.contains(&mnemonic)
            })
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn forbidden_instruction_filter_finds_them() {
        let sample = "\n0000000000100000 <_start>:\n  100000:\tcld\n  100001:\trdtsc\n  \
                      100003:\trdrand eax\n  100006:\tcall   0x10069e <rdtscp_helper>\n  \
                      100008:\trdseed rax\n  10000c:\trdtscp\n";
        assert_eq!(
            forbidden_instructions(sample),
            ["  100001:\trdtsc", "  100003:\trdrand eax", "  100008:\trdseed rax", "  10000c:\trdtscp"]
        );
    }

    /// The lockstep contract: guests take time and randomness from ftvm's
    /// ports, so no image may contain RDTSC, RDTSCP, RDRAND or RDSEED.
    #[test]
    fn no_guest_reads_tsc_or_hardware_random() {
        let dir = std::env::temp_dir().join(format!("ftvm-guest-images-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        // `rdtsc` breaks the contract on purpose: it is how the divergence
        // detector is tested. It must be the only one, and it must contain it.
        for guest in GUESTS {
            let path = dir.join(guest.name);
            fs::write(&path, guest.elf).unwrap();
            let output = Command::new("objdump")
                .args(["-d", "-M", "intel", "--no-show-raw-insn"])
                .arg(&path)
                .output()
                .expect("objdump (binutils) must be installed to check the guests");
            assert!(output.status.success(), "objdump failed on {}", guest.name);
            let text = String::from_utf8(output.stdout).unwrap();
            // Guards against a vacuous pass (no disassembly at all).
            assert!(text.contains("<_start>:"), "{}: no _start in the disassembly", guest.name);
            let found = forbidden_instructions(&text);
            if guest.name == "rdtsc" {
                assert!(guest.test_only && !found.is_empty(), "the rdtsc test guest lost its RDTSC");
                continue;
            }
            assert!(found.is_empty(), "{} uses forbidden instructions: {found:#?}", guest.name);
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
