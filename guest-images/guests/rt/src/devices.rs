//! ftvm's paravirtual devices, as the ABI defines them ([`ftvm_abi`]): clock,
//! entropy, timer, health, power, pvpanic and the test device.
//!
//! Every value the guest reads here is an input that the primary records
//! and the secondary replays at the same exit; that is why guests take time
//! and randomness only from these ports, never from RDTSC or RDRAND.

use ftvm_abi::{
    CLOCK_HI_PORT, CLOCK_LO_PORT, ENTROPY_PORT, HEALTH_PORT, POWER_PORT, PVPANIC_PANICKED, PVPANIC_PORT,
    TESTDEV_MMIO_ADDR, TESTDEV_PORT, TIMER_HI_PORT, TIMER_LO_PORT,
};

use crate::port::{inb, inl, outb, outl};

/// The guest's monotonic clock: nanoseconds since it booted.
pub fn clock_ns() -> u64 {
    // The low half takes the reading; the high half is the same reading's,
    // so the two halves are always consistent.
    // SAFETY: the clock device only returns a value; it touches no guest
    // memory.
    let lo = unsafe { inl(CLOCK_LO_PORT) };
    // SAFETY: as above.
    let hi = unsafe { inl(CLOCK_HI_PORT) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// 32 random bits from the entropy device.
pub fn random_u32() -> u32 {
    // SAFETY: the entropy device only returns a value; it touches no guest
    // memory.
    unsafe { inl(ENTROPY_PORT) }
}

/// 64 random bits from the entropy device.
pub fn random_u64() -> u64 {
    (u64::from(random_u32()) << 32) | u64::from(random_u32())
}

/// Fills `buf` with random bytes from the entropy device.
pub fn fill_random(buf: &mut [u8]) {
    let mut chunks = buf.chunks_exact_mut(4);
    for chunk in &mut chunks {
        chunk.copy_from_slice(&random_u32().to_le_bytes());
    }
    for byte in chunks.into_remainder() {
        // SAFETY: the entropy device only returns a value; it touches no
        // guest memory.
        *byte = unsafe { inb(ENTROPY_PORT) };
    }
}

/// Arms the timer: the next [`halt`] returns by `deadline_ns` (guest clock)
/// at the latest. A deadline of 0 disarms it, so that `halt` waits for an
/// event alone.
pub fn set_timer(deadline_ns: u64) {
    // Truncation is the point: the deadline goes out in two halves.
    let lo = deadline_ns as u32;
    let hi = (deadline_ns >> 32) as u32;
    // SAFETY: the low half is only staged by the timer device; it touches no
    // guest memory.
    unsafe { outl(TIMER_LO_PORT, lo) };
    // SAFETY: writing the high half arms the timer; it touches no guest
    // memory.
    unsafe { outl(TIMER_HI_PORT, hi) };
}

/// Halts until the armed deadline passes or an event arrives (the VMM
/// sleeps meanwhile). May return early: check the clock afterwards.
pub fn halt() {
    if crate::port::user_mode() {
        // SAFETY: a write of the halt port halts exactly as HLT does; the
        // asm behind it has no `nomem` (see `port`).
        unsafe { outl(ftvm_abi::HALT_PORT, 0) };
        return;
    }
    // SAFETY: HLT stops the vCPU until the VMM resumes it. No `nomem`: while
    // the guest is halted the VMM may write guest memory (a received frame
    // into a posted buffer), which the compiler must not cache across it.
    unsafe { core::arch::asm!("hlt", options(nostack, preserves_flags)) };
}

/// Sleeps until the guest clock reads at least `deadline_ns`.
pub fn sleep_until(deadline_ns: u64) {
    // A deadline of 0 (or one in the past) returns at once, before it could
    // be written to the timer, where 0 would mean "disarmed".
    while clock_ns() < deadline_ns {
        set_timer(deadline_ns);
        halt();
    }
}

/// Tells the VMM that the application is healthy; `value` is free-form (a
/// counter, a state).
pub fn health(value: u32) {
    // SAFETY: the health device only records the write; it touches no guest
    // memory.
    unsafe { outl(HEALTH_PORT, value) };
}

/// Powers the guest off with `status` (0 = success). Never returns.
pub fn power_off(status: u32) -> ! {
    // SAFETY: the power device stops the guest; it touches no guest memory.
    unsafe { outl(POWER_PORT, status) };
    // The VMM does not resume a guest that powered off; should it anyway,
    // halt rather than run on.
    loop {
        halt();
    }
}

/// Reports a guest panic through pvpanic (the panic handler calls this).
pub fn pvpanic() {
    // SAFETY: pvpanic only records the event; it touches no guest memory.
    unsafe { outb(PVPANIC_PORT, PVPANIC_PANICKED) };
}

/// One 32-bit write to the test device's port, which counts and discards it.
pub fn testdev_write(value: u32) {
    // SAFETY: the test device counts and discards writes; it touches no
    // guest memory.
    unsafe { outl(TESTDEV_PORT, value) };
}

/// One volatile 32-bit write to the test device's MMIO slot, which counts
/// and discards it.
pub fn testdev_mmio_write(value: u32) {
    let register = TESTDEV_MMIO_ADDR as *mut u32;
    // SAFETY: TESTDEV_MMIO_ADDR is in the MMIO window above all RAM, where
    // no Rust object lives; the VMM's page tables identity-map it and it is
    // 4-byte aligned. The write is an exit to the test device, which counts
    // and discards it.
    unsafe { register.write_volatile(value) };
}
