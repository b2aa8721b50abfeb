//! Which process on which host: enough to tell, later, whether the process that made
//! something is still alive (a pid alone may have been reused).

/// This machine's host name (empty if it cannot be read).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

/// Field 22 of `/proc/<pid>/stat`: when the process started, in clock ticks since boot;
/// `None` if there is no such process.
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// Whether process `pid`, started at `start` (as [`process_start`] gives it), is still alive.
pub fn is_alive(pid: u32, start: u64) -> bool {
    process_start(pid) == Some(start)
}
