//! The one reader of KVM's dirty-page log, shared by everything that wants
//! to know which guest pages changed: the state digest (pages written since
//! the last digest point) and a live state transfer (pages written since
//! the last pre-copy round).
//!
//! KVM's log is destructive: `KVM_GET_DIRTY_LOG` returns the pages written
//! since the previous call and clears them. Two readers calling it each
//! would steal each other's pages, so every read goes through
//! [`DirtyLog::fetch`], which ORs what KVM (and the VMM's own write bitmap,
//! for device DMA) reports into every subscriber's bitmap; each subscriber
//! then takes its own bitmap when it wants it.
//!
//! Logging is on from the start when the VM computes digests; a transfer
//! turns it on for its own duration otherwise (flipping
//! `KVM_MEM_LOG_DIRTY_PAGES` on the live memslot, which KVM allows).
//! Guest memory is one region from guest-physical 0, memslot 0 (`Vm::new`).

use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMem;

/// Bytes of a guest page, as the dirty log counts them.
pub const PAGE_SIZE: usize = 0x1000;

/// A bitmap of guest pages, one bit per page, little-endian 64-bit words as
/// KVM returns it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageBitmap {
    words: Vec<u64>,
    pages: usize,
}

impl PageBitmap {
    /// An empty bitmap for `pages` pages.
    pub fn new(pages: usize) -> PageBitmap {
        PageBitmap { words: vec![0; pages.div_ceil(64)], pages }
    }

    /// Whether page `page` is set (pages past the end are clear).
    pub fn is_set(&self, page: usize) -> bool {
        self.words.get(page / 64).is_some_and(|w| (w >> (page % 64)) & 1 == 1)
    }

    /// Set page `page` (ignored past the end).
    pub fn set(&mut self, page: usize) {
        if page < self.pages {
            if let Some(w) = self.words.get_mut(page / 64) {
                *w |= 1 << (page % 64);
            }
        }
    }

    /// OR KVM's words into this bitmap.
    fn or_words(&mut self, words: &[u64]) {
        for (dst, src) in self.words.iter_mut().zip(words) {
            *dst |= *src;
        }
    }

    /// How many pages are set.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The set pages, ascending.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(i, w)| {
            let w = *w;
            (0..64).filter(move |b| (w >> b) & 1 == 1).map(move |b| i.saturating_mul(64).saturating_add(b))
        })
    }

    /// Pages the bitmap covers.
    pub fn pages(&self) -> usize {
        self.pages
    }
}

/// Errors reading or switching the dirty log.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// `KVM_GET_DIRTY_LOG` failed.
    #[error("cannot read KVM's dirty-page log")]
    Read(#[source] kvm_ioctls::Error),
    /// Turning logging on or off on the memslot failed.
    #[error("cannot switch dirty-page logging on the guest memory slot")]
    Switch(#[source] kvm_ioctls::Error),
}

struct Inner {
    /// Whether the memslot has `KVM_MEM_LOG_DIRTY_PAGES`.
    logging: bool,
    /// Logging stays on for the digests whatever a transfer does.
    for_digests: bool,
    digest: Option<PageBitmap>,
    transfer: Option<PageBitmap>,
}

/// The shared reader of the dirty log. Cheap to clone.
#[derive(Clone)]
pub struct DirtyLog(Arc<Shared>);

struct Shared {
    vm: Arc<VmFd>,
    mem: GuestMem,
    pages: usize,
    inner: Mutex<Inner>,
}

impl DirtyLog {
    /// The log of `vm`'s memory `mem`, registered as memslot 0 with
    /// `KVM_MEM_LOG_DIRTY_PAGES` set when `digests` is.
    pub fn new(vm: Arc<VmFd>, mem: GuestMem, digests: bool) -> DirtyLog {
        let len =
            mem.iter().map(|r| usize::try_from(r.len()).unwrap_or(usize::MAX)).fold(0usize, usize::saturating_add);
        let pages = len / PAGE_SIZE;
        let inner = Inner {
            logging: digests,
            for_digests: digests,
            digest: digests.then(|| PageBitmap::new(pages)),
            transfer: None,
        };
        DirtyLog(Arc::new(Shared { vm, mem, pages, inner: Mutex::new(inner) }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain bitmaps: still usable.
        self.0.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Guest memory this log covers.
    pub fn memory(&self) -> &GuestMem {
        &self.0.mem
    }

    /// Pages of guest memory.
    pub fn pages(&self) -> usize {
        self.0.pages
    }

    /// Read KVM's log and the VMM's write bitmap (clearing both) into every
    /// subscriber's bitmap.
    fn fetch(&self, inner: &mut Inner) -> Result<(), DirtyLogError> {
        for (slot, region) in self.0.mem.iter().enumerate() {
            let slot = u32::try_from(slot).unwrap_or(u32::MAX);
            let len = usize::try_from(region.len()).unwrap_or(usize::MAX);
            let first_page = usize::try_from(region.start_addr().0).unwrap_or(usize::MAX) / PAGE_SIZE;
            if inner.logging {
                let kvm = self.0.vm.get_dirty_log(slot, len).map_err(DirtyLogError::Read)?;
                // One region from 0 (Vm::new): its page numbers are the
                // guest's, so KVM's words line up with the bitmaps'.
                if first_page == 0 {
                    for bitmap in [&mut inner.digest, &mut inner.transfer].into_iter().flatten() {
                        bitmap.or_words(&kvm);
                    }
                }
            }
            // The mapping's own bitmap (the region-level `bitmap()` is a
            // slice view): pages the VMM wrote (device DMA).
            let vmm = std::ops::Deref::deref(region).bitmap();
            if first_page == 0 && vmm.len() == len / PAGE_SIZE {
                // One bit per 4 KiB page from guest page 0: KVM's layout,
                // taken and cleared a word at a time.
                let words = vmm.get_and_reset();
                for bitmap in [&mut inner.digest, &mut inner.transfer].into_iter().flatten() {
                    bitmap.or_words(&words);
                }
                continue;
            }
            for (page, offset) in (0..len).step_by(PAGE_SIZE).enumerate() {
                if vmm.is_addr_set(offset) {
                    let page = first_page.saturating_add(page);
                    for bitmap in [&mut inner.digest, &mut inner.transfer].into_iter().flatten() {
                        bitmap.set(page);
                    }
                }
            }
            vmm.reset();
        }
        Ok(())
    }

    /// The pages written since the previous call (or since logging began),
    /// for the digest.
    pub fn take_for_digest(&self) -> Result<PageBitmap, DirtyLogError> {
        let mut inner = self.lock();
        self.fetch(&mut inner)?;
        let fresh = PageBitmap::new(self.0.pages);
        Ok(inner.digest.replace(fresh).unwrap_or_else(|| PageBitmap::new(self.0.pages)))
    }

    /// Forget every page written so far (a restored VM: the pages its
    /// checkpoint wrote are not guest writes).
    pub fn clear(&self) -> Result<(), DirtyLogError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        self.fetch(inner)?;
        for bitmap in [&mut inner.digest, &mut inner.transfer].into_iter().flatten() {
            *bitmap = PageBitmap::new(self.0.pages);
        }
        Ok(())
    }

    fn set_logging(&self, inner: &mut Inner, on: bool) -> Result<(), DirtyLogError> {
        if inner.logging == on {
            return Ok(());
        }
        for (slot, region) in self.0.mem.iter().enumerate() {
            let desc = kvm_bindings::kvm_userspace_memory_region {
                slot: u32::try_from(slot).unwrap_or(u32::MAX),
                flags: if on { kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the same slot, guest range and host mapping Vm::new
            // registered (only the flags change), and `mem`, held by this
            // log, keeps the mapping alive as long as the VM fd (also held).
            unsafe { self.0.vm.set_user_memory_region(desc) }.map_err(DirtyLogError::Switch)?;
        }
        inner.logging = on;
        Ok(())
    }

    /// Start following writes for a transfer: from now on every written
    /// page shows in [`DirtyLog::take_for_transfer`]. Turns logging on if
    /// the digests had not. A transfer already following is restarted.
    pub fn start_transfer(&self) -> Result<(), DirtyLogError> {
        let mut inner = self.lock();
        self.set_logging(&mut inner, true)?;
        // What was written before now is covered by the first full pass.
        self.fetch(&mut inner)?;
        inner.transfer = Some(PageBitmap::new(self.0.pages));
        Ok(())
    }

    /// The pages written since the previous call (or since
    /// [`DirtyLog::start_transfer`]). Empty when no transfer follows.
    pub fn take_for_transfer(&self) -> Result<PageBitmap, DirtyLogError> {
        let mut inner = self.lock();
        self.fetch(&mut inner)?;
        let fresh = inner.transfer.is_some().then(|| PageBitmap::new(self.0.pages));
        Ok(std::mem::replace(&mut inner.transfer, fresh).unwrap_or_else(|| PageBitmap::new(self.0.pages)))
    }

    /// Stop following writes for a transfer; logging goes off unless the
    /// digests need it.
    pub fn stop_transfer(&self) -> Result<(), DirtyLogError> {
        let mut inner = self.lock();
        inner.transfer = None;
        let keep = inner.for_digests;
        self.set_logging(&mut inner, keep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_bits_and_iteration() {
        let mut b = PageBitmap::new(130);
        b.set(0);
        b.set(65);
        b.set(129);
        b.set(130);
        assert!(b.is_set(0) && b.is_set(65) && b.is_set(129) && !b.is_set(130) && !b.is_set(1));
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, 65, 129]);
        assert_eq!(b.count(), 3);
        b.or_words(&[0b10, 0, 0, 7]);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, 1, 65, 129]);
        assert!(!b.is_set(usize::MAX) && !b.is_set(192));
    }
}
