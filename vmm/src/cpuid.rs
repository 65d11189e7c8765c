//! The fixed CPUID template every ftvm guest sees, on every host.
//!
//! Not host pass-through: two hosts with different CPUs must show the guest
//! the same CPU, or a replayed guest could take another path. The template
//! hides every feature that is a source of nondeterminism the VMM cannot log
//! (RDRAND, RDSEED, RDTSCP, the TSC itself, TSC-deadline, x2APIC, MONITOR)
//! and everything lockstep guests do not need (AVX/XSAVE state, VMX). Each
//! feature the template shows must be supported by the host's KVM, or the VM
//! is refused: silently dropping a bit would make the two hosts differ.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// Errors building the CPUID of a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// KVM would not report what it supports.
    #[error("cannot read KVM's supported CPUID")]
    Supported(#[source] kvm_ioctls::Error),
    /// The host's KVM lacks a feature the template shows.
    #[error("this host's KVM does not support CPUID leaf {leaf:#x} {register} bits {missing:#010x}, which the fixed CPUID template requires")]
    Missing { leaf: u32, register: &'static str, missing: u32 },
    /// The template did not fit KVM's CPUID container.
    #[error("cannot build the CPUID table")]
    Build,
}

/// Leaf 1 EDX: FPU, PSE, MSR, PAE, CX8, PGE, CMOV, PAT, CLFSH, MMX, FXSR, SSE, SSE2.
pub const LEAF1_EDX: u32 = (1 << 0)
    | (1 << 3)
    | (1 << 5)
    | (1 << 6)
    | (1 << 8)
    | (1 << 13)
    | (1 << 15)
    | (1 << 16)
    | (1 << 19)
    | (1 << 23)
    | (1 << 24)
    | (1 << 25)
    | (1 << 26);
/// Leaf 1 ECX: CX16 only. The template is the x86-64 baseline (what the
/// guests are compiled for): some KVM backends (kvm_pvm, measured) offer no
/// SSE3/SSSE3/SSE4/POPCNT, and a template must work on every host of a pair.
/// Not RDRAND (bit 30), TSC-deadline (24), x2APIC (21), XSAVE/OSXSAVE/AVX
/// (26-28), MONITOR (3).
pub const LEAF1_ECX: u32 = 1 << 13;
/// Leaf 1 ECX bit 31: running under a hypervisor (always set, never checked
/// against the host: KVM sets it itself).
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 0x8000_0001 EDX: SYSCALL, NX, LM. Not RDTSCP (bit 27).
pub const EXT1_EDX: u32 = (1 << 11) | (1 << 20) | (1 << 29);
/// Leaf 0x8000_0001 ECX: LAHF/SAHF in long mode.
pub const EXT1_ECX: u32 = 1 << 0;

/// Vendor string: neither Intel nor AMD, so no guest takes a vendor-specific
/// path that could differ between hosts.
pub const VENDOR: &[u8; 12] = b"FTVMFTVMFTVM";
/// Brand string of leaves 0x8000_0002..4.
pub const BRAND: &[u8; 48] = b"ftvm lockstep virtual CPU\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";

fn entry(function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 { function, index: 0, flags: 0, eax, ebx, ecx, edx, ..Default::default() }
}

/// `bytes` as `N` little-endian 32-bit words (zeros past its end).
fn words<const N: usize>(bytes: &[u8]) -> [u32; N] {
    let mut out = [0; N];
    for (word, chunk) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *word = chunk.try_into().map_or(0, u32::from_le_bytes);
    }
    out
}

/// The template, independent of the host.
pub fn template() -> Vec<kvm_cpuid_entry2> {
    let [v0, v1, v2] = words(VENDOR);
    let [b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11] = words(BRAND);
    // Family 6, model 0x3a, stepping 9. EBX: CLFLUSH line 8 quadwords, one
    // logical processor, APIC ID 0.
    let leaf1_eax = 0x0003_06a9;
    let leaf1_ebx = 8 << 8 | 1 << 16;
    let mut leaf7 = entry(7, 0, 0, 0, 0);
    leaf7.flags = kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
    vec![
        // Max basic leaf 7; vendor in EBX, EDX, ECX order.
        entry(0, 7, v0, v2, v1),
        entry(1, leaf1_eax, leaf1_ebx, LEAF1_ECX | LEAF1_ECX_HYPERVISOR, LEAF1_EDX),
        // Leaf 7 subleaf 0: no structured extended features at all (hides
        // RDSEED, FSGSBASE, AVX2, SGX, ...).
        leaf7,
        entry(0x8000_0000, 0x8000_0008, 0, 0, 0),
        entry(0x8000_0001, 0, 0, EXT1_ECX, EXT1_EDX),
        entry(0x8000_0002, b0, b1, b2, b3),
        entry(0x8000_0003, b4, b5, b6, b7),
        entry(0x8000_0004, b8, b9, b10, b11),
        // 40 physical and 48 linear address bits.
        entry(0x8000_0008, 0x3028, 0, 0, 0),
    ]
}

/// The template as a KVM CPUID table, after checking the host's KVM supports
/// every feature it shows.
pub fn build(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(CpuidError::Supported)?;
    let find = |leaf: u32| supported.as_slice().iter().find(|e| e.function == leaf && e.index == 0).copied();
    type Register = fn(&kvm_cpuid_entry2) -> u32;
    let checks: [(u32, &'static str, u32, Register); 4] = [
        (1, "EDX", LEAF1_EDX, |e| e.edx),
        (1, "ECX", LEAF1_ECX, |e| e.ecx),
        (0x8000_0001, "EDX", EXT1_EDX, |e| e.edx),
        (0x8000_0001, "ECX", EXT1_ECX, |e| e.ecx),
    ];
    for (leaf, register, wanted, get) in checks {
        let have = find(leaf).map(|e| get(&e)).unwrap_or(0);
        let missing = wanted & !have;
        if missing != 0 {
            return Err(CpuidError::Missing { leaf, register, missing });
        }
    }
    CpuId::from_entries(&template()).map_err(|_| CpuidError::Build)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_hides_nondeterministic_features() {
        let t = template();
        let leaf = |f: u32| t.iter().find(|e| e.function == f).copied().unwrap();
        assert_eq!(leaf(1).ecx & (1 << 30), 0, "RDRAND shown");
        assert_eq!(leaf(1).edx & (1 << 4), 0, "TSC shown");
        assert_eq!(leaf(7).ebx & (1 << 18), 0, "RDSEED shown");
        assert_eq!(leaf(0x8000_0001).edx & (1 << 27), 0, "RDTSCP shown");
        assert_eq!(leaf(1).ecx & (1 << 26), 0, "XSAVE shown");
    }

    #[test]
    fn template_is_the_same_every_time() {
        let a = template();
        let b = template();
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(
                (x.function, x.index, x.eax, x.ebx, x.ecx, x.edx),
                (y.function, y.index, y.eax, y.ebx, y.ecx, y.edx)
            );
        }
    }

    #[test]
    fn kvm_host_supports_the_template() {
        if !crate::testing::kvm_available() {
            return;
        }
        let kvm = Kvm::new().unwrap();
        build(&kvm).unwrap();
    }
}
