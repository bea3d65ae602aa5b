//! glibc malloc settings for libtorch's large, short-lived tensors.
//!
//! On the CPU libtorch has no caching allocator: every activation is a fresh `malloc`. glibc
//! serves large requests with a fresh `mmap` and hands them back with `munmap` on free, so each
//! forward pass page-faults its whole working set in again (measured, detector at 800×1216
//! fp32: 0.9M minor faults and about a quarter of the time per pass). With no mmap threshold
//! and no trimming, freed memory stays in the heap and the next pass reuses pages that are
//! already mapped. One arena: other threads' arenas hold at most 64 MB per heap and give whole
//! heaps back when they empty, which the models' worker threads would hit on every pass.
//!
//! The price is memory that stays with the process after a burst, so the model workers call
//! [`release_free_memory`] after a quiet second. Measured with both models in one server under
//! load: peak RSS 1.6–1.85 GB against 1.8 GB with glibc's defaults. Settings are applied after
//! the weights are loaded, so loading's short-lived copies go back to the OS as before.
//!
//! Only what a model's pass needs stays in the heap: allocations larger than the largest
//! activation of any loaded model ([`keep_in_heap`]) get a mapping of their own, returned to
//! the OS when freed. Those are the decoding path's buffers of large photos (a 45-megapixel
//! image is 135 MB of RGB8 and 540 MB of f32). With no mmap threshold at all they went to the
//! heap between forward passes and fragmented it: a burst of 32 clients each sending one
//! 45-megapixel PNG left the heap 3–7 GB larger, growing with the number of clients though
//! decoding ran one image at a time.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

static TUNING: OnceLock<Tuning> = OnceLock::new();

/// What was applied, for the start-up log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tuning {
    /// The heap keeps freed pages (see the module doc).
    Applied,
    /// `GLIBC_TUNABLES` or a `MALLOC_*` variable is set: the user's settings stand.
    UserSettings,
    /// Not glibc, or glibc refused a setting.
    Unavailable,
}

/// Applies the settings unless the environment already carries malloc settings; once per
/// process. Call it after loading weights: loading makes large short-lived copies that
/// would otherwise stay with the process.
pub fn tune_for_tensors() -> Tuning {
    *TUNING.get_or_init(decide)
}

/// What `tune_for_tensors` did, if it ran.
pub fn tuning() -> Option<Tuning> {
    TUNING.get().copied()
}

fn decide() -> Tuning {
    let user = std::env::vars_os().any(|(k, _)| {
        let k = k.to_string_lossy();
        k == "GLIBC_TUNABLES" || k.starts_with("MALLOC_")
    });
    if user {
        return Tuning::UserSettings;
    }
    apply()
}

/// Below this, allocations stay in the heap whatever the models say: glibc's own largest
/// dynamic threshold, so nothing is mapped that glibc's defaults would have kept.
const MIN_HEAP_LIMIT: usize = 32 << 20;

/// The mmap threshold in force (0 before tuning).
static HEAP_LIMIT: AtomicUsize = AtomicUsize::new(0);
static RAISE: Mutex<()> = Mutex::new(());

/// Tunes the heap (once per process) and keeps a model's largest activation, `bytes`, in it,
/// with half as much again for oneDNN's blocked copies and scratch beside it. Measured on the
/// detector at 800×1216 (fp32, 2 threads, AMD EPYC Zen 4): ~16k more minor faults per pass than
/// with no mmap threshold at all (glibc's defaults: ~440k), the pass time within its noise.
pub fn tune_for_model(largest_activation: usize) -> Tuning {
    let tuning = tune_for_tensors();
    keep_in_heap(largest_activation.saturating_add(largest_activation / 2));
    tuning
}

/// Keeps allocations of up to `bytes` (a model's largest activation, with room to spare) in
/// the heap, where the next pass reuses their pages; larger ones are mapped on their own and
/// returned on free. Raised as models load, never lowered.
pub fn keep_in_heap(bytes: usize) {
    if tuning() != Some(Tuning::Applied) {
        return;
    }
    let _one_at_a_time = RAISE.lock().unwrap_or_else(|e| e.into_inner());
    let wanted = bytes.clamp(MIN_HEAP_LIMIT, i32::MAX as usize);
    if wanted > HEAP_LIMIT.load(Ordering::SeqCst) && set_mmap_threshold(wanted) {
        HEAP_LIMIT.store(wanted, Ordering::SeqCst);
        tracing::info!(
            mb = wanted >> 20,
            "allocations larger than this are mapped on their own"
        );
    }
}

/// The largest allocation kept in the heap, in bytes (None before tuning).
pub fn heap_limit() -> Option<usize> {
    Some(HEAP_LIMIT.load(Ordering::SeqCst)).filter(|&b| b > 0)
}

/// Hands the pages of freed memory back to the OS. The model workers call it after a quiet
/// second, so a burst's memory is kept while the burst lasts and returned after it.
pub fn release_free_memory() {
    if tuning() == Some(Tuning::Applied) {
        trim();
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only releases free chunks, under each arena's lock.
    unsafe { libc::malloc_trim(0) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> Tuning {
    // Values are C ints; i32::MAX bytes (2 GiB) is "never" for trimming. The top pad keeps a
    // heap that has emptied from being unmapped between passes. The mmap threshold starts at
    // glibc's largest dynamic one; each model raises it to its activations (`keep_in_heap`).
    let settings = [
        (libc::M_MMAP_THRESHOLD, MIN_HEAP_LIMIT as i32),
        (libc::M_TRIM_THRESHOLD, i32::MAX),
        (libc::M_TOP_PAD, 64 << 20),
        (libc::M_ARENA_MAX, 1),
    ];
    // SAFETY: mallopt only changes allocator parameters, under the allocator's own lock.
    let ok = settings
        .iter()
        .all(|&(param, value)| unsafe { libc::mallopt(param, value) } == 1);
    if ok {
        HEAP_LIMIT.store(MIN_HEAP_LIMIT, Ordering::SeqCst);
        Tuning::Applied
    } else {
        Tuning::Unavailable
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_mmap_threshold(bytes: usize) -> bool {
    let value = i32::try_from(bytes).unwrap_or(i32::MAX);
    // SAFETY: as in `apply`.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, value) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> Tuning {
    Tuning::Unavailable
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_mmap_threshold(_bytes: usize) -> bool {
    false
}

/// Rust-side buffers at least this large (a decoded photo, a request body, an image waiting in
/// a model's queue) get a mapping of their own, returned to the OS when freed: they come and
/// go with requests, and in the heap they would sit between the model's activations.
const MAPPED_MIN: usize = 4 << 20;

/// The global allocator: the system's, except that large blocks are mapped on their own
/// whatever glibc's mmap threshold says (which `tune_for_tensors` raises for libtorch's
/// activations).
pub struct Mapped;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod mapped {
    use std::alloc::{GlobalAlloc, Layout, System};

    use super::{Mapped, MAPPED_MIN};

    const PAGE: usize = 4096;

    fn mapped(layout: &Layout) -> bool {
        layout.size() >= MAPPED_MIN && layout.align() <= PAGE
    }

    // SAFETY: blocks are mapped or taken from the system allocator by their layout alone, and
    // freed the same way, so every block goes back to where it came from.
    unsafe impl GlobalAlloc for Mapped {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            if !mapped(&layout) {
                return System.alloc(layout);
            }
            let p = libc::mmap(
                std::ptr::null_mut(),
                layout.size(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                std::ptr::null_mut()
            } else {
                p.cast()
            }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            if mapped(&layout) {
                // Anonymous mappings are zeroed already.
                self.alloc(layout)
            } else {
                System.alloc_zeroed(layout)
            }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            if mapped(&layout) {
                libc::munmap(ptr.cast(), layout.size());
            } else {
                System.dealloc(ptr, layout);
            }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let new = Layout::from_size_align_unchecked(new_size, layout.align());
            if !mapped(&layout) && !mapped(&new) {
                return System.realloc(ptr, layout, new_size);
            }
            if mapped(&layout) && mapped(&new) {
                let p = libc::mremap(ptr.cast(), layout.size(), new_size, libc::MREMAP_MAYMOVE);
                return if p == libc::MAP_FAILED {
                    std::ptr::null_mut()
                } else {
                    p.cast()
                };
            }
            let p = self.alloc(new);
            if !p.is_null() {
                std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            p
        }
    }

    #[global_allocator]
    static GLOBAL: Mapped = Mapped;
}

#[cfg(test)]
mod tests {
    #[test]
    fn large_blocks_are_mapped_and_grow_and_shrink_across_the_threshold() {
        let mut v: Vec<u8> = Vec::with_capacity(16);
        for i in 0..(9u32 << 20) {
            v.push(i as u8);
        }
        assert!(v.iter().enumerate().all(|(i, &b)| b == i as u8));
        v.truncate(100);
        v.shrink_to_fit();
        assert_eq!(v.len(), 100);
        assert!(v.iter().enumerate().all(|(i, &b)| b == i as u8));
        let zeros = vec![0u64; 1 << 20];
        assert!(zeros.iter().all(|&z| z == 0));
    }
}
