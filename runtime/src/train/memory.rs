//! What this machine has: the memory it can give a run now, and the peak
//! this process has taken. What a run needs is the cost model's
//! (`cost::memory::cpu_training_bytes`), checked by the driver
//! (`driver::compile_training`) before any pass runs.

/// Memory the system can give this process now (`MemAvailable`), if known.
pub fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// This process's peak resident memory so far (`VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}
