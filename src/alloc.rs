//! glibc malloc settings for libtorch's large, short-lived tensors.
//!
//! On the CPU libtorch has no caching allocator: every activation is a fresh `malloc`. glibc
//! serves large requests with a fresh `mmap` and hands them back with `munmap` on free, so each
//! forward pass page-faults its whole working set in again (measured, detector at 800×1216
//! fp32: 0.9M minor faults and about a quarter of the time per pass). Keeping freed memory in
//! the heap (no mmap threshold, no trimming) lets the next pass reuse pages that are already
//! mapped. The price: memory freed after a peak stays with the process (the peak is what a
//! deployment is sized for anyway), and fragmentation raises that peak a little (measured,
//! server with the detector: 1.25 → 1.45 GB). Limiting glibc to one arena cost another
//! 0.3 GB for no speed, so each worker thread keeps its own.

use std::sync::OnceLock;

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

/// Applies the settings unless the environment already carries malloc settings. Call it first
/// thing in `main`, before libtorch allocates.
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

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> Tuning {
    // Values are C ints; i32::MAX bytes (2 GiB) is "never" for both thresholds here.
    let settings = [
        (libc::M_MMAP_THRESHOLD, i32::MAX),
        (libc::M_TRIM_THRESHOLD, i32::MAX),
    ];
    // SAFETY: mallopt only changes allocator parameters; it runs before other threads exist.
    let ok = settings
        .iter()
        .all(|&(param, value)| unsafe { libc::mallopt(param, value) } == 1);
    if ok {
        Tuning::Applied
    } else {
        Tuning::Unavailable
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> Tuning {
    Tuning::Unavailable
}
