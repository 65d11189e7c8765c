//! The C memory functions the compiler calls on its own (`memcpy`, `memmove`,
//! `memset`, `memcmp`, `bcmp`): a freestanding guest has no libc to supply
//! them, and `compiler_builtins` leaves them to libc on this target.
//!
//! `#![no_builtins]` stops LLVM from recognising these very loops as a
//! `memcpy` and compiling them into a call to themselves. Such a crate is kept
//! out of LTO and linked on its own, and rustc only links a crate that some
//! other crate names: `rt` does so with `extern crate mem`.
//!
//! Byte loops: the guests copy frames of about a kilobyte at most, and each
//! copy is far cheaper than the exit that usually follows it.
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
    let mut i = 0;
    while i < n {
        // SAFETY: i < n, and the caller guarantees both ranges are valid for
        // n bytes and disjoint.
        unsafe { *dest.add(i) = *src.add(i) };
        i += 1;
    }
    dest
}

/// Copies `n` bytes from `src` to `dest`, which may overlap, and returns `dest`.
///
/// # Safety
///
/// C's contract: `src` is valid for reads and `dest` for writes of `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) <= (src as usize) {
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
    let mut i = 0;
    while i < n {
        // SAFETY: i < n, and the caller guarantees dest is valid for n bytes.
        unsafe { *dest.add(i) = byte };
        i += 1;
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
