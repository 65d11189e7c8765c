//! Guest memory: one anonymous mapping from guest-physical 0, with a bitmap
//! of the pages the VMM itself writes (device DMA), which KVM's dirty log
//! does not see.

use vm_memory::bitmap::AtomicBitmap;

/// Guest memory as every part of the VMM sees it. Cheap to clone (the
/// regions are shared).
pub type GuestMem = vm_memory::GuestMemoryMmap<AtomicBitmap>;
