//! The process's resident memory on Linux (`/proc/self/status`), for the memory figures of
//! `misp train`'s metrics and of the benchmarks; `None` elsewhere.

/// A field of `/proc/self/status` (`VmRSS:` now, `VmHWM:` the peak) in MiB.
fn status_mib(field: &str) -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Resident memory now, MiB.
pub fn current_mib() -> Option<f64> {
    status_mib("VmRSS:")
}

/// Peak resident memory since the start or the last [`reset_peak`], MiB.
pub fn peak_mib() -> Option<f64> {
    status_mib("VmHWM:")
}

/// Resets the peak so that the next [`peak_mib`] covers only what follows (Linux >= 4.0:
/// writing 5 to `/proc/self/clear_refs`). `false` where that is not possible.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}
