//! Port I/O, the guest's only way to reach ftvm's devices.
//!
//! At CPL 0 this is `in`/`out`; at CPL 3 (how ftvm starts lockstep guests,
//! see `ftvm_abi`'s "Privilege") those instructions fault, and the same
//! access goes through the MMIO port window at `PIO_WINDOW_BASE + port`.
//! [`init`] reads the CPL once at entry. Each access is an exit: the VMM
//! handles it before the next instruction. The asm deliberately does not
//! claim `nomem`: a device may read or write guest memory while it handles
//! the access (or while the guest is halted), so the compiler must finish
//! earlier memory writes before it and reload memory after it.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};

use ftvm_abi::PIO_WINDOW_BASE;

static USER_MODE: AtomicBool = AtomicBool::new(false);

/// Reads the CPL from CS and picks the access method. Called once by the
/// entry code before any device access.
pub fn init() {
    let cs: u16;
    // SAFETY: reading CS is allowed at every privilege level and touches no
    // memory.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    USER_MODE.store(cs & 3 == 3, Ordering::Relaxed);
}

/// Whether the guest runs at CPL 3 (ports through the MMIO window).
pub fn user_mode() -> bool {
    USER_MODE.load(Ordering::Relaxed)
}

fn window(port: u16) -> u64 {
    PIO_WINDOW_BASE + u64::from(port)
}

/// Reads a byte from `port`.
///
/// # Safety
///
/// The device behind `port` may act on guest memory or on the guest itself;
/// the caller must know that this access breaks no invariant of memory the
/// program uses.
#[inline]
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    if user_mode() {
        // SAFETY: the window address is outside RAM (an MMIO exit the VMM
        // serves, never real memory); the device's effects are the caller's
        // contract.
        unsafe {
            asm!("mov {0}, byte ptr [{1}]", out(reg_byte) value, in(reg) window(port), options(nostack, preserves_flags))
        };
    } else {
        // SAFETY: `in` touches no guest memory by itself; what the device
        // does is the caller's contract.
        unsafe { asm!("in al, dx", out("al") value, in("dx") port, options(nostack, preserves_flags)) };
    }
    value
}

/// Reads 32 bits from `port`.
///
/// # Safety
///
/// As for [`inb`].
#[inline]
pub unsafe fn inl(port: u16) -> u32 {
    let value: u32;
    if user_mode() {
        // SAFETY: as in `inb`.
        unsafe {
            asm!("mov {0:e}, dword ptr [{1}]", out(reg) value, in(reg) window(port), options(nostack, preserves_flags))
        };
    } else {
        // SAFETY: as in `inb`.
        unsafe { asm!("in eax, dx", out("eax") value, in("dx") port, options(nostack, preserves_flags)) };
    }
    value
}

/// Writes a byte to `port`.
///
/// # Safety
///
/// As for [`inb`].
#[inline]
pub unsafe fn outb(port: u16, value: u8) {
    if user_mode() {
        // SAFETY: as in `inb`.
        unsafe {
            asm!("mov byte ptr [{0}], {1}", in(reg) window(port), in(reg_byte) value, options(nostack, preserves_flags))
        };
    } else {
        // SAFETY: as in `inb`.
        unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nostack, preserves_flags)) };
    }
}

/// Writes 32 bits to `port`.
///
/// # Safety
///
/// As for [`inb`].
#[inline]
pub unsafe fn outl(port: u16, value: u32) {
    if user_mode() {
        // SAFETY: as in `inb`.
        unsafe {
            asm!("mov dword ptr [{0}], {1:e}", in(reg) window(port), in(reg) value, options(nostack, preserves_flags))
        };
    } else {
        // SAFETY: as in `inb`.
        unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags)) };
    }
}
