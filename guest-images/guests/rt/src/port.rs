//! x86 port I/O (`in`/`out`), the guest's only way to reach ftvm's devices.
//!
//! Each access is an exit: the VMM handles it before the next instruction.
//! The asm deliberately does not claim `nomem`: a device may read or write
//! guest memory while it handles the access (a virtio notify), so the
//! compiler must finish earlier memory writes before it and reload memory
//! after it.

use core::arch::asm;

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
    // SAFETY: `in` touches no guest memory by itself; what the device does
    // is the caller's contract.
    unsafe { asm!("in al, dx", out("al") value, in("dx") port, options(nostack, preserves_flags)) };
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
    // SAFETY: `in` touches no guest memory by itself; what the device does
    // is the caller's contract.
    unsafe {
        asm!("in eax, dx", out("eax") value, in("dx") port, options(nostack, preserves_flags))
    };
    value
}

/// Writes a byte to `port`.
///
/// # Safety
///
/// As for [`inb`].
#[inline]
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: `out` touches no guest memory by itself; what the device does
    // is the caller's contract.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nostack, preserves_flags)) };
}

/// Writes 32 bits to `port`.
///
/// # Safety
///
/// As for [`inb`].
#[inline]
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: `out` touches no guest memory by itself; what the device does
    // is the caller's contract.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
    };
}
