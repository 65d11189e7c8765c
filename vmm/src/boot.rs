//! Everything the VMM writes before the guest's first instruction: the
//! boot-parameter block, the GDT and TSS, identity-mapped page tables, and
//! the vCPU registers for 64-bit long mode. Addresses come from `ftvm_abi`.
//!
//! The guest starts at its ELF entry in long mode with paging on, `rsp =
//! STACK_TOP`, `rdi = BOOT_PARAMS_ADDR`, SSE enabled, interrupts off and no
//! IDT: any exception is a triple fault, which the VMM reports. It starts at
//! CPL 3 ([`Privilege::User`], the default: see `ftvm_abi`'s "Privilege"
//! for why) or CPL 0 ([`Privilege::Kernel`]). Every page is mapped
//! user-accessible; nothing below CPL 3 exists to protect.

use ftvm_abi::{
    BootParams, BOOT_PARAMS_ADDR, GDT_ADDR, PAGE_SIZE, PDPT_ADDR, PD_ADDR, PD_COUNT, PML4_ADDR, STACK_TOP, TSS_ADDR,
};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMem;

/// Errors writing the boot structures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Guest memory is too small for the boot structures.
    #[error("cannot write the {what} at {addr:#x} into guest memory")]
    Write {
        what: &'static str,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// GDT selectors (index × 8).
pub const CODE_SELECTOR: u16 = 0x08;
/// Data segment selector.
pub const DATA_SELECTOR: u16 = 0x10;
/// TSS selector (a 16-byte system descriptor in slots 3 and 4).
pub const TSS_SELECTOR: u16 = 0x18;
/// User (CPL 3) code segment selector, without its RPL.
pub const USER_CODE_SELECTOR: u16 = 0x28;
/// User (CPL 3) data segment selector, without its RPL.
pub const USER_DATA_SELECTOR: u16 = 0x30;

/// The privilege level a guest starts at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Privilege {
    /// CPL 0: may use `in`/`out` and HLT.
    Kernel,
    /// CPL 3, IOPL 0: ports through the MMIO window, halts through the halt port.
    #[default]
    User,
}
/// Size of the TSS minus one.
const TSS_LIMIT: u32 = 0x67;
/// Bytes of the TSS: its limit plus one.
const TSS_LEN: usize = 0x68;
const _: () = assert!(TSS_LEN as u64 == TSS_LIMIT as u64 + 1);
/// Entries of the GDT ([`gdt`]).
const GDT_ENTRIES: usize = 7;
/// GDTR's limit: the GDT's size in bytes less one.
const GDT_LIMIT: u16 = 7 * 8 - 1;
const _: () = assert!(GDT_LIMIT as usize == GDT_ENTRIES * 8 - 1);
/// [`TSS_ADDR`] as a descriptor's 32-bit base.
const TSS_BASE: u32 = 0x2800;
const _: () = assert!(TSS_BASE as u64 == TSS_ADDR);

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Present, writable, user-accessible, accessed.
const PTE_PRESENT_RW: u64 = 0x27;
/// Present, writable, user-accessible, accessed, dirty, 2 MiB page. With
/// accessed and dirty already set the CPU never writes the page tables, so
/// they never show in the dirty log: what a digest hashes is what the
/// guest's execution wrote, identical on both hosts.
const PDE_2M_PAGE: u64 = 0xe7;

/// A GDT entry from base, limit and the access/flags bits (Intel SDM 3.4.5).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (u64::from(base & 0xff00_0000) << 32)
        | (u64::from(flags & 0xf0ff) << 40)
        | (u64::from(limit & 0x000f_0000) << 32)
        | (u64::from(base & 0x00ff_ffff) << 16)
        | u64::from(limit & 0x0000_ffff)
}

/// The GDT: null, 64-bit code, data, the two halves of the TSS descriptor,
/// then 64-bit code and data for CPL 3.
pub fn gdt() -> [u64; GDT_ENTRIES] {
    [
        0,
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x0089, TSS_BASE, TSS_LIMIT),
        0, // upper half of the 16-byte TSS descriptor: base bits 63..32 = 0
        gdt_entry(0xa0fb, 0, 0xfffff),
        gdt_entry(0xc0f3, 0, 0xfffff),
    ]
}

fn write(mem: &GuestMem, what: &'static str, addr: u64, bytes: &[u8]) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(addr)).map_err(|source| BootError::Write { what, addr, source })
}

/// Write the boot-parameter block, GDT, TSS and page tables.
pub fn write_boot_structures(mem: &GuestMem, params: &BootParams) -> Result<(), BootError> {
    write(mem, "boot-parameter block", BOOT_PARAMS_ADDR, params.as_bytes())?;
    let gdt: Vec<u8> = gdt().iter().flat_map(|e| e.to_le_bytes()).collect();
    write(mem, "GDT", GDT_ADDR, &gdt)?;
    write(mem, "TSS", TSS_ADDR, &[0u8; TSS_LEN])?;
    write(mem, "PML4", PML4_ADDR, &(PDPT_ADDR | PTE_PRESENT_RW).to_le_bytes())?;
    // i < PD_COUNT: a few pages above PD_ADDR, nothing saturates.
    let pd = |i: u64| PD_ADDR.saturating_add(i.saturating_mul(PAGE_SIZE));
    let pdpt: Vec<u8> = (0..PD_COUNT).flat_map(|i| (pd(i) | PTE_PRESENT_RW).to_le_bytes()).collect();
    write(mem, "PDPT", PDPT_ADDR, &pdpt)?;
    // 4 page directories × 512 entries × 2 MiB: identity map of 0..4 GiB.
    let pds: Vec<u8> = (0..PD_COUNT * 512).flat_map(|i| ((i << 21) | PDE_2M_PAGE).to_le_bytes()).collect();
    write(mem, "page directories", PD_ADDR, &pds)?;
    Ok(())
}

fn segment(selector: u16, dpl: u8, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: selector | u16::from(dpl),
        type_,
        present: 1,
        dpl,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Special registers for long mode at `privilege`, starting from what KVM
/// reported.
pub fn long_mode_sregs(mut sregs: kvm_sregs, privilege: Privilege) -> kvm_sregs {
    let (code, data, dpl) = match privilege {
        Privilege::Kernel => (CODE_SELECTOR, DATA_SELECTOR, 0),
        Privilege::User => (USER_CODE_SELECTOR, USER_DATA_SELECTOR, 3),
    };
    sregs.cs = segment(code, dpl, 0xb, 1, 0);
    let data = segment(data, dpl, 0x3, 0, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: TSS_ADDR,
        limit: TSS_LIMIT,
        selector: TSS_SELECTOR,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        s: 0,
        ..Default::default()
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = GDT_LIMIT;
    // No IDT: an exception in the guest escalates to a triple fault.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers at entry.
pub fn entry_regs(entry: u64) -> kvm_regs {
    kvm_regs { rip: entry, rsp: STACK_TOP, rbp: STACK_TOP, rdi: BOOT_PARAMS_ADDR, rflags: 0x2, ..Default::default() }
}

/// FPU/SSE state at entry: x87 control word and MXCSR at their reset values.
pub fn entry_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_the_sdm_encoding() {
        let g = gdt();
        assert_eq!(g[1], 0x00af_9b00_0000_ffff);
        assert_eq!(g[2], 0x00cf_9300_0000_ffff);
        assert_eq!(g[5], 0x00af_fb00_0000_ffff);
        assert_eq!(g[6], 0x00cf_f300_0000_ffff);
        let user = long_mode_sregs(kvm_sregs::default(), Privilege::User);
        assert_eq!((user.cs.selector, user.cs.dpl, user.ss.selector), (0x2b, 3, 0x33));
        let kernel = long_mode_sregs(kvm_sregs::default(), Privilege::Kernel);
        assert_eq!((kernel.cs.selector, kernel.cs.dpl), (0x08, 0));
        assert_eq!(g[3] & 0xffff, u64::from(TSS_LIMIT));
    }

    #[test]
    fn page_tables_identity_map_low_4g() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        write_boot_structures(&mem, &BootParams::new(4 << 20)).unwrap();
        let pde: u64 = mem.read_obj(GuestAddress(PD_ADDR + 8 * 1536 + 8 * 255)).unwrap();
        // Entry 1791 maps 1791 × 2 MiB.
        assert_eq!(pde, (1791u64 << 21) | PDE_2M_PAGE);
        let bp: BootParams = {
            let mut b = BootParams::new(0);
            let mut raw = vec![0u8; core::mem::size_of::<BootParams>()];
            mem.read_slice(&mut raw, GuestAddress(BOOT_PARAMS_ADDR)).unwrap();
            assert_eq!(&raw[..], BootParams::new(4 << 20).as_bytes());
            b.mem_size = 4 << 20;
            b
        };
        assert!(bp.is_valid());
    }
}
