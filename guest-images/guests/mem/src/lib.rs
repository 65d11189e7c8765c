//! The C memory functions the compiler calls on its own (`memcpy`, `memmove`,
//! `memset`, `memcmp`, `bcmp`): a freestanding guest has no libc to supply
//! them, and `compiler_builtins` leaves them to libc on this target.
//!
//! `#![no_builtins]` stops LLVM from recognising these very loops as a
//! `memcpy` and compiling them into a call to themselves. Such a crate is kept
//! out of LTO and linked on its own, and rustc only links a crate that some
//! other crate names: `rt` does so with `extern crate mem`.
//!
//! Copies and fills use `rep movsb` / `rep stosb` (one instruction whatever
//! the length, which matters where the guest's instructions are emulated:
//! kvstore copies every value, request and reply several times, 4 KiB each
//! under `redis-benchmark -d 4096`); a memmove whose ranges overlap copies
//! byte by byte, since `rep movsb` may move several bytes at a time.
#![no_std]
#![no_builtins]

/// Copies `n` bytes from `src` to `dest` and returns `dest`.
///
/// # Safety
///
/// C's contract: `src` is valid for reads and `dest` for writes of `n`
/// bytes, and the two ranges do not overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid for n bytes and
    // disjoint, which is all rep movsb needs (the direction flag is clear,
    // as the ABI guarantees at every call).
    unsafe { rep_movsb(dest, src, n) };
    dest
}

/// `rep movsb`: copies `n` bytes upwards from `src` to `dest`.
///
/// # Safety
///
/// `src` is valid for reads and `dest` for writes of `n` bytes, and the
/// ranges do not overlap.
unsafe fn rep_movsb(dest: *mut u8, src: *const u8, n: usize) {
    // SAFETY: the caller's contract; rep movsb touches exactly
    // [src, src + n) and [dest, dest + n).
    unsafe {
        core::arch::asm!(
            "rep movsb",
            inout("rdi") dest => _,
            inout("rsi") src => _,
            inout("rcx") n => _,
            options(nostack, preserves_flags)
        );
    }
}

/// Copies `n` bytes from `src` to `dest`, which may overlap, and returns `dest`.
///
/// # Safety
///
/// C's contract: `src` is valid for reads and `dest` for writes of `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    let (d, s) = (dest as usize, src as usize);
    if d.abs_diff(s) >= n {
        // Disjoint: a plain copy.
        // SAFETY: both ranges are valid for n bytes (the caller's contract)
        // and do not overlap (checked just above).
        unsafe { rep_movsb(dest, src, n) };
    } else if d <= s {
        // Copying upwards never overwrites a source byte not yet read.
        let mut i = 0;
        while i < n {
            // SAFETY: i < n, and the caller guarantees both ranges are valid
            // for n bytes; dest <= src, so byte i of src is read before any
            // write can reach it.
            unsafe { *dest.add(i) = *src.add(i) };
            i += 1;
        }
    } else {
        // dest is above src: copy downwards for the same reason.
        let mut i = n;
        while i > 0 {
            i -= 1;
            // SAFETY: i < n, and the caller guarantees both ranges are valid
            // for n bytes; dest > src, so byte i of src is read before any
            // write can reach it.
            unsafe { *dest.add(i) = *src.add(i) };
        }
    }
    dest
}

/// Fills `n` bytes at `dest` with the low byte of `value` and returns `dest`.
///
/// # Safety
///
/// C's contract: `dest` is valid for writes of `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, n: usize) -> *mut u8 {
    // C converts the value to unsigned char: truncation is the contract.
    let byte = value as u8;
    // SAFETY: the caller guarantees dest is valid for n bytes; rep stosb
    // writes exactly [dest, dest + n) upwards (direction flag clear).
    unsafe {
        core::arch::asm!(
            "rep stosb",
            inout("rdi") dest => _,
            inout("rcx") n => _,
            in("al") byte,
            options(nostack, preserves_flags)
        );
    }
    dest
}

/// Compares `n` bytes as unsigned chars: negative, zero or positive as `a`
/// sorts before, equal to or after `b`.
///
/// # Safety
///
/// C's contract: `a` and `b` are valid for reads of `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n, and the caller guarantees both ranges are valid for
        // n bytes.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// Zero when the `n` bytes at `a` and `b` are equal, non-zero otherwise.
///
/// # Safety
///
/// C's contract: `a` and `b` are valid for reads of `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the same contract as memcmp's, which the caller upholds.
    unsafe { memcmp(a, b, n) }
}
