//! The guest's heap: a first-fit free list (`linked_list_allocator`) over
//! the RAM between the end of the image and the end of guest memory.

use ftvm_abi::{PAGE_SIZE, RAM_LIMIT};
use linked_list_allocator::LockedHeap;

// One vCPU and no interrupts: the lock is never contended. It is there
// because a global allocator must be `Sync`, and it costs no exit.
#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

extern "C" {
    /// End of the image, page-aligned (`ftvm-guest.ld`).
    static _end: u8;
}

/// Hands the RAM from `_end` to `mem_size` to the allocator. Called once, by
/// `start_rust`, before the guest's main.
pub(crate) fn init(mem_size: u64) {
    let image_end = (&raw const _end) as u64;
    // The linker script aligns _end already; rounding keeps that true if
    // the script changes.
    let start = image_end.next_multiple_of(PAGE_SIZE);
    // The MMIO window starts at RAM_LIMIT: never hand it out as memory.
    let end = mem_size.min(RAM_LIMIT);
    let Some(size) = end.checked_sub(start).filter(|size| *size > 0) else {
        // No RAM above the image: every allocation will fail (and panic).
        return;
    };
    // RAM_LIMIT is 3 GiB, so the size fits in usize on x86_64.
    let size = usize::try_from(size).unwrap_or(usize::MAX);
    // SAFETY: [start, end) is guest RAM: it lies below mem_size, the RAM the
    // VMM gave this guest, and below the MMIO window, and it is identity
    // mapped. Nothing else uses it: the image (code, data, bss) ends at
    // _end <= start, and the stack, page tables and boot parameters are all
    // below 1 MiB. `init` runs once, from start_rust, on the empty heap, as
    // `Heap::init` requires.
    unsafe { HEAP.lock().init(start as *mut u8, size) };
}
