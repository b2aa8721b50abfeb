//! Small filesystem and host helpers.

use std::fs;
use std::path::Path;

use crate::error::{IoContext, Result};

/// Remove a folder tree even where a container left read-only folders in it.
pub fn force_remove(dir: &Path) {
    kliko_store::remove_tree(dir);
}

/// Whether `dir` is absent or an empty folder.
pub fn absent_or_empty(dir: &Path) -> Result<bool> {
    match fs::read_dir(dir) {
        Ok(mut it) => Ok(it.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => Ok(false),
        Err(e) => Err(e).at(dir),
    }
}

/// Fill `target` with what `fill` writes into a fresh sibling folder, so that `target` never
/// shows a partial result: an absent or empty `target` is replaced by one rename; a non-empty
/// one is renamed aside, the new one renamed in, the old one removed. A crash leaves both
/// copies, never neither, and the next placement into the same folder removes them.
pub fn replace_dir(target: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    // Locked by this process while it places, so that the next placement beside it can tell
    // a killed placement's leftovers (which it removes) from one in progress.
    let staging = kliko_store::litter::staging_beside(target).at(parent)?;
    let new = staging.path().join("t");
    fill(&new)?;
    // rename(2) replaces an empty folder atomically; a non-empty one is swapped.
    if absent_or_empty(target)? {
        fs::rename(&new, target).at(target)?;
    } else {
        let old = staging.path().join("old");
        fs::rename(target, &old).at(target)?;
        if let Err(e) = fs::rename(&new, target) {
            let _ = fs::rename(&old, target);
            return Err(e).at(target);
        }
        force_remove(&old);
    }
    Ok(())
}

/// Rename the folder `from` to `to` (which must not exist), first giving every file the mode a
/// materialized copy would have (0755 if its owner may execute it, else 0644) and every folder
/// 0755. Fails, leaving `from` in place, when the two are on different filesystems.
pub fn hand_over(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![from.to_path_buf()];
    while let Some(dir) = stack.pop() {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).at(&dir)?;
        for entry in fs::read_dir(&dir).at(&dir)? {
            let entry = entry.at(&dir)?;
            let kind = entry.file_type().at(entry.path())?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                let path = entry.path();
                let meta = fs::symlink_metadata(&path).at(&path)?;
                // The stored tree's executable bit, and the mode materialize gives it.
                let want = if kliko_core::hash::is_executable(&meta) { 0o755 } else { 0o644 };
                if meta.permissions().mode() & 0o7777 != want {
                    fs::set_permissions(&path, fs::Permissions::from_mode(want)).at(&path)?;
                }
            }
        }
    }
    fs::rename(from, to).at(to)
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer outlives the call and its length is passed.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// `name (uid:gid)` of the invoking user.
pub fn invoking_user() -> String {
    let name = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_default();
    let (uid, gid) = uid_gid();
    if name.is_empty() {
        format!("{uid}:{gid}")
    } else {
        format!("{name} ({uid}:{gid})")
    }
}

pub fn uid_gid() -> (u32, u32) {
    // SAFETY: getuid/getgid cannot fail.
    unsafe { (libc::getuid(), libc::getgid()) }
}

pub fn now_rfc3339() -> String {
    rfc3339(std::time::SystemTime::now())
}

pub fn rfc3339(t: std::time::SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown".into())
}
