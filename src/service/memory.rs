//! What a model version costs in resident memory: the process's peak RSS over a load or a
//! warm-up, above the RSS before it (Linux's /proc). Measurements hold one lock, so two loads
//! (or a load and another model's warm-up) never count each other's memory; requests served
//! meanwhile by other models can still add to a figure, which is therefore an upper bound.

use std::sync::Mutex;

static MEASURING: Mutex<()> = Mutex::new(());

/// A field of /proc/self/status in bytes (`VmRSS`, `VmHWM`).
fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resident memory now.
pub fn rss() -> Option<u64> {
    status_bytes("VmRSS:")
}

/// The process's peak resident memory so far, in MiB (`detectd bench` reports it).
pub fn peak_rss_mb() -> Option<u64> {
    status_bytes("VmHWM:").map(|b| b >> 20)
}

/// Runs `f` and returns, with its result, how far the peak RSS rose above the RSS before it
/// (None where /proc cannot tell).
pub fn measured<T>(f: impl FnOnce() -> T) -> (T, Option<u64>) {
    let _one_at_a_time = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    // Free heap pages kept from earlier work (the allocator holds them for tensors) go back
    // first: reused, they would make this load look free.
    crate::alloc::release_free_memory();
    // "5" resets the peak (VmHWM) to the current RSS (Linux 4.0+).
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before = rss();
    let out = f();
    let cost = match (reset, before, status_bytes("VmHWM:")) {
        (true, Some(before), Some(peak)) => Some(peak.saturating_sub(before)),
        _ => None,
    };
    (out, cost)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_allocation_is_counted() {
        let (len, cost) = measured(|| {
            let v = vec![1u8; 64 << 20];
            std::hint::black_box(&v).len()
        });
        assert_eq!(len, 64 << 20);
        if let Some(cost) = cost {
            assert!(cost >= 60 << 20, "{cost}");
        }
    }
}
