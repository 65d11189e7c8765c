//! The guest's heap: segregated free lists for small blocks in front of a
//! first-fit free list (`linked_list_allocator`) over the RAM between the end
//! of the image and the end of guest memory.
//!
//! # Why not first-fit alone
//!
//! A first-fit allocator walks its address-ordered list of holes on every
//! allocation and every free. A server that keeps what it is sent (kvstore:
//! every SET keeps a key and a value, and frees the request's other
//! buffers) leaves small holes behind that later requests do not fit, so the
//! list grows with the data held and each allocation costs time in
//! proportion to it. With first-fit alone, `redis-cli --pipe` of 40 000 new
//! keys slowed from 6 700 SETs/s at the start to 630/s at the end on this
//! project's machines, and 100 000 took 207 s; TCP then sat window-limited
//! behind a guest that took hundreds of milliseconds to read its socket.
//!
//! # How
//!
//! A request of at most [`MAX_SMALL`] bytes with an alignment of at most
//! [`SMALL_ALIGN`] gets a block of its size class (multiples of 16 up to 256
//! bytes, then powers of two): popped from that class's free list, or cut
//! from a fresh [`CHUNK`] taken from the first-fit heap when the list is
//! empty. A freed small block goes back on its class's list. Both are O(1),
//! whatever the heap holds. Small blocks are never merged or given back to
//! the first-fit heap: memory a class once held stays with that class (a
//! peak of small allocations is not available to large ones afterwards).
//! Larger or more aligned requests (socket buffers, NIC buffers, growing
//! vectors) go to the first-fit heap, whose list stays short because small
//! blocks never enter it.
//!
//! Deterministic: the same requests in the same order give the same
//! addresses, as lockstep replay requires.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::{self, NonNull};

use ftvm_abi::{PAGE_SIZE, RAM_LIMIT};

/// Largest request served from a size class.
pub const MAX_SMALL: usize = 4096;
/// Largest alignment a size class guarantees (every block is a multiple of
/// 16 bytes from a 16-byte aligned chunk).
pub const SMALL_ALIGN: usize = 16;
/// Bytes taken from the first-fit heap to refill a class (a class whose
/// blocks are larger takes one block's worth).
pub const CHUNK: usize = 16 * 1024;
/// Size classes: 16, 32, ..., 256 (16 classes), then 512, 1024, 2048, 4096.
const CLASSES: usize = 20;

/// The class of a `size`-byte request (`1..=MAX_SMALL`).
const fn class_of(size: usize) -> usize {
    if size <= 256 {
        // 1..=16 -> 0, 17..=32 -> 1, ..., 241..=256 -> 15.
        size.saturating_sub(1) / 16
    } else {
        // 257..=512 -> 16, ..., 2049..=4096 -> 19.
        let bits = usize::BITS - (size - 1).leading_zeros();
        16 + (bits as usize).saturating_sub(9)
    }
}

/// Bytes of each block of class `class`.
const fn class_size(class: usize) -> usize {
    if class < 16 {
        (class + 1) * 16
    } else {
        512 << (class - 16)
    }
}

/// A free small block: its first word links to the next one of its class.
struct FreeBlock {
    next: *mut FreeBlock,
}

struct Inner {
    large: linked_list_allocator::Heap,
    free: [*mut FreeBlock; CLASSES],
}

/// The global allocator. Not a lock: see the `Sync` impl.
pub struct GuestHeap {
    inner: UnsafeCell<Inner>,
}

// SAFETY: a guest has one vCPU, takes no interrupts and runs no threads, so
// the allocator is never entered from two places at once; GlobalAlloc's
// methods below do not call each other re-entrantly through the global
// allocator either (the first-fit heap allocates nothing itself).
unsafe impl Sync for GuestHeap {}

#[global_allocator]
static HEAP: GuestHeap = GuestHeap {
    inner: UnsafeCell::new(Inner { large: linked_list_allocator::Heap::empty(), free: [ptr::null_mut(); CLASSES] }),
};

impl Inner {
    fn alloc_small(&mut self, class: usize) -> *mut u8 {
        let Some(slot) = self.free.get_mut(class) else {
            return ptr::null_mut();
        };
        if slot.is_null() {
            let size = class_size(class);
            let chunk = CHUNK.max(size);
            let Ok(layout) = Layout::from_size_align(chunk, SMALL_ALIGN) else {
                return ptr::null_mut();
            };
            let Ok(base) = self.large.allocate_first_fit(layout) else {
                return ptr::null_mut();
            };
            // Thread the chunk's blocks into a list, first block first.
            let base = base.as_ptr();
            let count = chunk / size;
            let mut next: *mut FreeBlock = ptr::null_mut();
            for i in (0..count).rev() {
                // SAFETY: block i lies inside the chunk just allocated
                // (i * size + size <= chunk), 16-byte aligned (base is and
                // size is a multiple of 16), and nothing else refers to it.
                unsafe {
                    let block = base.add(i * size).cast::<FreeBlock>();
                    block.write(FreeBlock { next });
                    next = block;
                }
            }
            *slot = next;
        }
        let block = *slot;
        // SAFETY: a non-null list entry is a free block of this class that
        // this allocator threaded; its first word is the link.
        *slot = unsafe { (*block).next };
        block.cast()
    }

    /// # Safety
    ///
    /// `ptr` was returned by `alloc_small(class)` and is not used any more.
    unsafe fn free_small(&mut self, ptr: *mut u8, class: usize) {
        let Some(slot) = self.free.get_mut(class) else { return };
        let block = ptr.cast::<FreeBlock>();
        // SAFETY: the block is at least 16 bytes, 16-byte aligned and no
        // longer the caller's (the caller's contract).
        unsafe { block.write(FreeBlock { next: *slot }) };
        *slot = block;
    }
}

fn small_class(layout: &Layout) -> Option<usize> {
    (layout.size() <= MAX_SMALL && layout.align() <= SMALL_ALIGN).then(|| class_of(layout.size().max(1)))
}

// SAFETY: alloc returns null or a block of at least layout.size() bytes at
// layout.align(): a class block (class size >= size, 16-byte aligned, only
// for align <= 16) or the first-fit heap's own answer; a block is handed out
// once until dealloc gives it back with the same layout, which maps it to
// the same class (or to the first-fit heap) again.
unsafe impl GlobalAlloc for GuestHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: single vCPU, no re-entry (see the Sync impl): this is the
        // only reference to the inner state while it lives.
        let inner = unsafe { &mut *self.inner.get() };
        match small_class(&layout) {
            Some(class) => inner.alloc_small(class),
            None => inner.large.allocate_first_fit(layout).map_or(ptr::null_mut(), NonNull::as_ptr),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as in alloc.
        let inner = unsafe { &mut *self.inner.get() };
        match small_class(&layout) {
            // SAFETY: GlobalAlloc's contract: ptr came from alloc with this
            // layout, so from this class.
            Some(class) => unsafe { inner.free_small(ptr, class) },
            None => {
                if let Some(ptr) = NonNull::new(ptr) {
                    // SAFETY: ptr came from the first-fit heap with this layout.
                    unsafe { inner.large.deallocate(ptr, layout) };
                }
            }
        }
    }
}

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
    // below 1 MiB. `init` runs once, from start_rust, before any allocation,
    // as `Heap::init` requires; nothing else holds the inner state then.
    unsafe { (*HEAP.inner.get()).large.init(start as *mut u8, size) };
}

/// Compile-time check of the class arithmetic (rt is freestanding and has
/// no test harness): every size maps to a class whose blocks hold it and are
/// a multiple of the alignment, and no smaller class would do.
const _: () = {
    let mut size = 1;
    while size <= MAX_SMALL {
        let class = class_of(size);
        assert!(class < CLASSES);
        assert!(class_size(class) >= size);
        assert!(class_size(class) % SMALL_ALIGN == 0);
        assert!(class == 0 || class_size(class - 1) < size);
        size += 1;
    }
};
