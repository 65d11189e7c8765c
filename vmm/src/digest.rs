//! Digests of the guest's state, compared between primary and secondary to
//! detect divergence (DESIGN.md, "The lockstep contract", rule 4).
//!
//! Every N exits both hosts compute, at the same exit index, three 64-bit
//! XXH3 hashes: of the vCPU registers ([`VcpuState`]), of every device's
//! saved state (bus order), and of the guest pages written since the last
//! digest: those KVM's dirty log reports (guest writes) and those the VMM
//! wrote itself (device DMA, tracked by vm-memory's bitmap), page number and
//! contents, in ascending page order. The boot page tables are built with
//! their accessed and dirty bits already set, so the CPU never writes them:
//! what is hashed is only what the guest's execution wrote.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use xxhash_rust::xxh3::Xxh3;

use crate::bus::Bus;
/// The digest type lives with the hook that carries it (so `hook` depends
/// on nothing); it is named here too, where it is computed.
pub use crate::hook::StateDigest;
use crate::memory::GuestMem;
use crate::state::StateVersion;

/// Errors computing a digest.
#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    /// Reading vCPU registers failed.
    #[error("cannot read the vCPU's {what}")]
    Registers {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Reading KVM's dirty log failed.
    #[error("cannot read KVM's dirty-page log")]
    DirtyLog(#[source] kvm_ioctls::Error),
    /// Reading guest memory failed.
    #[error("cannot read guest page {page:#x}")]
    Memory {
        page: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// The architectural state of the vCPU that execution depends on, as plain
/// data: general registers, control registers, EFER, and the x87/SSE state.
/// Hidden and host-specific fields (descriptor caches' padding, the APIC
/// base, pending-interrupt bitmaps) are left out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8..r15, rip, rflags.
    pub gprs: Vec<u64>,
    /// cr0, cr2, cr3, cr4, cr8, efer.
    pub control: Vec<u64>,
    /// cs, ds, es, fs, gs, ss selectors.
    pub selectors: Vec<u16>,
    /// x87 registers, 8 × 16 bytes.
    pub fpr: Vec<u8>,
    /// fcw, fsw, ftwx, last opcode.
    pub fpu_control: Vec<u16>,
    /// xmm0..15, 16 × 16 bytes.
    pub xmm: Vec<u8>,
    /// MXCSR.
    pub mxcsr: u32,
}

impl VcpuState {
    /// Identity and version of this state.
    pub const VERSION: StateVersion = StateVersion { kind: "vcpu", major: 1, minor: 0 };

    /// Build from KVM's structures.
    pub fn from_kvm(r: &kvm_regs, s: &kvm_sregs, f: &kvm_fpu) -> Self {
        VcpuState {
            gprs: vec![
                r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14,
                r.r15, r.rip, r.rflags,
            ],
            control: vec![s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer],
            selectors: vec![s.cs.selector, s.ds.selector, s.es.selector, s.fs.selector, s.gs.selector, s.ss.selector],
            fpr: f.fpr.iter().flatten().copied().collect(),
            fpu_control: vec![f.fcw, f.fsw, u16::from(f.ftwx), f.last_opcode],
            xmm: f.xmm.iter().flatten().copied().collect(),
            mxcsr: f.mxcsr,
        }
    }

    /// Read the state of `vcpu`.
    pub fn read(vcpu: &VcpuFd) -> Result<Self, DigestError> {
        let regs = vcpu.get_regs().map_err(|source| DigestError::Registers { what: "registers", source })?;
        let sregs = vcpu.get_sregs().map_err(|source| DigestError::Registers { what: "special registers", source })?;
        let fpu = vcpu.get_fpu().map_err(|source| DigestError::Registers { what: "FPU state", source })?;
        Ok(VcpuState::from_kvm(&regs, &sregs, &fpu))
    }

    /// XXH3 of the encoded state.
    pub fn hash(&self) -> u64 {
        xxhash_rust::xxh3::xxh3_64(&crate::state::encode(Self::VERSION, self))
    }
}

/// XXH3 over every device's snapshot, PIO bus then MMIO bus, address order.
pub fn devices_hash(pio: &Bus, mmio: &Bus) -> u64 {
    let mut h = Xxh3::new();
    for (base, device) in pio.devices().chain(mmio.devices()) {
        h.update(&base.to_le_bytes());
        h.update(&device.snapshot());
    }
    h.digest()
}

/// Bytes of a guest page, as the dirty log counts them.
const PAGE_SIZE: usize = 0x1000;
const _: () = assert!(PAGE_SIZE as u64 == ftvm_abi::PAGE_SIZE);

/// Whether bit `bit` of a bitmap stored as little-endian 64-bit words (KVM's
/// dirty log) is set; bits past the end are clear.
fn bit_set(words: &[u64], bit: usize) -> bool {
    words.get(bit / 64).is_some_and(|w| (w >> (bit % 64)) & 1 == 1)
}

/// Collects the pages written since the last call, from KVM's dirty log and
/// from the VMM's own write bitmap, and hashes them.
pub struct DirtyPages {
    mem: GuestMem,
}

impl DirtyPages {
    /// Track `mem`, whose regions are memslots 0, 1, ... in order, registered
    /// with `KVM_MEM_LOG_DIRTY_PAGES`.
    pub fn new(mem: GuestMem) -> Self {
        DirtyPages { mem }
    }

    /// Hash of the pages written since the previous call (or since the
    /// memslots were registered), and how many there were. Resets both logs.
    pub fn hash_and_reset(&self, vm: &VmFd) -> Result<(u64, u64), DigestError> {
        let mut h = Xxh3::new();
        let mut pages = 0u64;
        let mut buf = vec![0u8; PAGE_SIZE];
        for (slot, region) in self.mem.iter().enumerate() {
            // One memslot per region, numbered in order (Vm::new).
            let slot = u32::try_from(slot).unwrap_or(u32::MAX);
            let len = usize::try_from(region.len()).unwrap_or(usize::MAX);
            let kvm_dirty = vm.get_dirty_log(slot, len).map_err(DigestError::DirtyLog)?;
            // The mapping's own bitmap (the region-level `bitmap()` is a slice view).
            let vmm_dirty = std::ops::Deref::deref(region).bitmap();
            for (page, offset) in (0..len).step_by(PAGE_SIZE).enumerate() {
                if !(bit_set(&kvm_dirty, page) || vmm_dirty.is_addr_set(offset)) {
                    continue;
                }
                // Inside the region, which lies in the guest's address space:
                // never saturates (and a saturated address fails the read).
                let addr = region.start_addr().0.saturating_add(offset as u64);
                self.mem
                    .read_slice(&mut buf, GuestAddress(addr))
                    .map_err(|source| DigestError::Memory { page: addr, source })?;
                h.update(&addr.to_le_bytes());
                h.update(&buf);
                pages = pages.saturating_add(1);
            }
            vmm_dirty.reset();
        }
        Ok((h.digest(), pages))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_log_bits_are_read_per_word_and_past_the_end_is_clear() {
        let words = [0b101u64, 1 << 63];
        assert!(bit_set(&words, 0) && !bit_set(&words, 1) && bit_set(&words, 2));
        assert!(bit_set(&words, 127) && !bit_set(&words, 64));
        assert!(!bit_set(&words, 128) && !bit_set(&words, usize::MAX));
    }
}
