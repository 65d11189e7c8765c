//! Digests of the guest's state, compared between primary and secondary to
//! detect divergence (DESIGN.md, "The lockstep contract", rule 4).
//!
//! Every N exits both hosts compute, at the same exit index, three 64-bit
//! XXH3 hashes: of the vCPU registers ([`VcpuState`]), of every device's
//! saved state (bus order), and of the guest pages that changed since the
//! last digest: among those KVM's dirty log reports (guest writes) and those
//! the VMM wrote itself (device DMA, tracked by vm-memory's bitmap), the
//! ones whose contents differ from the last digest's (each page's XXH3 is
//! kept, [`DirtyPages`]), page address and page hash, in ascending page
//! order. The boot page tables are built with their accessed and dirty bits
//! already set, so the CPU never writes them.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};
use xxhash_rust::xxh3::Xxh3;

use crate::bus::Bus;
use crate::dirty::DirtyLog;
/// The digest type lives with the hook that carries it (so `hook` depends
/// on nothing); it is named here too, where it is computed.
pub use crate::hook::StateDigest;
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
    #[error(transparent)]
    DirtyLog(#[from] crate::dirty::DirtyLogError),
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
const PAGE_SIZE: usize = crate::dirty::PAGE_SIZE;
const _: () = assert!(PAGE_SIZE as u64 == ftvm_abi::PAGE_SIZE);

/// Collects the pages that changed since the last call, and hashes them.
///
/// Which pages to look at comes from KVM's dirty log and the VMM's own
/// write bitmap (through the shared [`DirtyLog`]); whether a page changed
/// is decided by its contents: each page's XXH3 at the previous digest is
/// kept (8 bytes per 4 KiB page), and a page whose hash is unchanged is
/// left out. The dirty log alone is not enough: KVM may report a page the
/// guest only read (a shadow MMU maps a page whose guest PTE is already
/// dirty as writable on first touch, and logs it), and which pages a VM
/// touches first depends on when it was created, so a VM restored from a
/// checkpoint would report other pages than the original at the same exit.
/// Contents are the same on both.
pub struct DirtyPages {
    log: DirtyLog,
    /// Each page's XXH3 as of the last digest (or the rebase).
    hashes: Vec<u64>,
}

impl DirtyPages {
    /// Track the memory of `log`, whose memslots are registered with
    /// `KVM_MEM_LOG_DIRTY_PAGES`, taking every page as zero until
    /// [`DirtyPages::rebase`].
    pub fn new(log: DirtyLog) -> Self {
        let zero = xxhash_rust::xxh3::xxh3_64(&[0u8; PAGE_SIZE]);
        let hashes = vec![zero; log.pages()];
        DirtyPages { log, hashes }
    }

    /// The changed pages among those the log reports, hashes updated.
    fn changed(&mut self) -> Result<Vec<(u64, u64)>, DigestError> {
        let mut buf = vec![0u8; PAGE_SIZE];
        let dirty = self.log.take_for_digest().map_err(DigestError::DirtyLog)?;
        let mut changed = Vec::new();
        for page in dirty.iter() {
            // A page of guest memory: never saturates (and a saturated
            // address fails the read).
            let addr = (page as u64).saturating_mul(PAGE_SIZE as u64);
            self.log
                .memory()
                .read_slice(&mut buf, GuestAddress(addr))
                .map_err(|source| DigestError::Memory { page: addr, source })?;
            let hash = xxhash_rust::xxh3::xxh3_64(&buf);
            if let Some(old) = self.hashes.get_mut(page) {
                if *old != hash {
                    *old = hash;
                    changed.push((addr, hash));
                }
            }
        }
        Ok(changed)
    }

    /// Take memory as it is now as the starting point: the pages written
    /// since the previous call (the image and boot block, or a checkpoint's
    /// pages) get their hashes, and no digest is made of them.
    pub fn rebase(&mut self) -> Result<(), DigestError> {
        self.changed().map(|_| ())
    }

    /// Hash of the pages that changed since the previous call, and how many
    /// there were: page addresses and page hashes, ascending.
    pub fn hash_and_reset(&mut self) -> Result<(u64, u64), DigestError> {
        let changed = self.changed()?;
        let mut h = Xxh3::new();
        for (addr, hash) in &changed {
            h.update(&addr.to_le_bytes());
            h.update(&hash.to_le_bytes());
        }
        Ok((h.digest(), changed.len() as u64))
    }
}
