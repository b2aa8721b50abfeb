//! Folders owned by a live process, and their removal once the owner is provably dead.
//!
//! A process that writes temporary files (the store's `tmp/`, a placement's staging folder
//! beside the user's output) writes them inside a folder of its own that holds a lock file,
//! [`OWNER_LOCK`], `flock`ed exclusively for as long as the folder is in use. The kernel
//! releases a `flock` when its holder dies (on NFSv4 the server does, when the client's lease
//! expires), so anyone who can take the lock knows the owner is gone and may remove the
//! folder, however young it is.
//!
//! The lock file is created under another name ([`OWNER_LOCK_NEW`]), locked, and only then
//! renamed to [`OWNER_LOCK`]: a file named [`OWNER_LOCK`] has been locked since it got that
//! name, so there is no moment at which a cleaner could take the lock of a live owner. A
//! folder without the lock file belongs to an owner that died between creating the folder and
//! renaming its lock into it (or is being set up right now); it is removed only once it is
//! older than [`UNLOCKED_GRACE`].

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::flock::{self, Mode};

/// The lock file inside an owned folder.
pub const OWNER_LOCK: &str = ".kliko-lock";
/// The lock file while its owner is taking it (never a cleaner's business).
pub const OWNER_LOCK_NEW: &str = ".kliko-lock.new";
/// A folder without its lock file is left alone for this long.
pub const UNLOCKED_GRACE: Duration = Duration::from_secs(3600);

/// A folder that belongs to this process while the value lives; removed (with what it holds)
/// on drop, then unlocked.
#[derive(Debug)]
pub struct OwnedDir {
    path: PathBuf,
    /// `None` once released. `Drop` removes the folder while the lock is still held.
    lock: Option<File>,
}

impl OwnedDir {
    /// Create `parent/<prefix><random>` holding a locked [`OWNER_LOCK`].
    pub fn create(parent: &Path, prefix: &str) -> io::Result<OwnedDir> {
        // The owner is in the name too, for the moment before the lock file has its name.
        let path = tempfile::Builder::new().prefix(&format!("{prefix}{}", owner_tag())).tempdir_in(parent)?.keep();
        match lock_new(&path) {
            Ok(lock) => Ok(OwnedDir { path, lock: Some(lock) }),
            Err(e) => {
                let _ = fs::remove_dir_all(&path);
                Err(e)
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Give up ownership without removing the folder's content (the lock is released, so the
    /// next cleaner removes the folder).
    pub fn release(mut self) {
        self.lock = None;
    }
}

impl Drop for OwnedDir {
    fn drop(&mut self) {
        if self.lock.is_some() {
            crate::remove_tree(&self.path);
        }
    }
}

fn lock_new(dir: &Path) -> io::Result<File> {
    let new = dir.join(OWNER_LOCK_NEW);
    let f = File::options().create_new(true).write(true).open(&new)?;
    flock::lock(&f, Mode::Exclusive)?;
    fs::rename(&new, dir.join(OWNER_LOCK))?;
    Ok(f)
}

/// `o<pid>.<start>.<host>-`: this process (its pid, its start time and a short hash of the
/// host name), as an owned folder's name carries it.
fn owner_tag() -> String {
    let pid = std::process::id();
    let start = kliko_core::process::process_start(pid).unwrap_or(0);
    format!("o{pid}.{start}.{}-", host_hash())
}

fn host_hash() -> String {
    kliko_core::Digest::of_bytes(kliko_core::process::host_name().as_bytes()).to_hex()[..8].to_string()
}

/// For a folder name carrying an [`owner_tag`]: whether that owner is gone (`None` when the
/// name has no tag, or names another host, whose processes cannot be seen from here).
fn tagged_owner_gone(name: &str) -> Option<bool> {
    // The tag follows the prefix; try each `o` (a prefix may hold one too).
    let (pid, start, host) = name.match_indices('o').find_map(|(i, _)| {
        let (tag, _) = name[i + 1..].split_once('-')?;
        let mut parts = tag.split('.');
        let pid = parts.next()?.parse::<u32>().ok()?;
        let start = parts.next()?.parse::<u64>().ok()?;
        let host = parts.next()?;
        (parts.next().is_none() && host.len() == 8).then(|| (pid, start, host.to_string()))
    })?;
    (host == host_hash()).then(|| !kliko_core::process::is_alive(pid, start))
}

/// Whether a folder name carries an owner tag (an [`OwnedDir`] made it).
pub fn is_owned_name(name: &OsStr) -> bool {
    name.to_str().and_then(tagged_owner_gone).is_some()
}

/// The state of a folder that may be owned.
#[derive(Debug, PartialEq, Eq)]
pub enum Owner {
    /// Its lock is held: the owner is alive.
    Alive,
    /// Its lock could be taken: the owner is dead (the returned file holds the lock now).
    Dead,
    /// No lock file (and not older than [`UNLOCKED_GRACE`]): perhaps being set up.
    Unknown,
}

/// Take the lock of `dir` if its owner is dead; hold the returned file while removing it.
fn probe(dir: &Path) -> (Owner, Option<File>) {
    match File::options().write(true).open(dir.join(OWNER_LOCK)) {
        Ok(f) => {
            if flock::try_lock(&f, Mode::Exclusive).unwrap_or(false) {
                (Owner::Dead, Some(f))
            } else {
                (Owner::Alive, None)
            }
        }
        Err(_) => {
            // No lock file yet: its owner (named in the folder's name) died while setting it
            // up, or is setting it up now.
            let gone = dir.file_name().and_then(|n| n.to_str()).and_then(tagged_owner_gone);
            let old = fs::symlink_metadata(dir)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t < SystemTime::now() - UNLOCKED_GRACE);
            (if gone == Some(true) || old { Owner::Dead } else { Owner::Unknown }, None)
        }
    }
}

/// Whether the owner of `dir` is alive, dead, or unknown.
pub fn owner(dir: &Path) -> Owner {
    probe(dir).0
}

/// Remove every folder in `parent` whose name `matches` and whose owner is dead; returns how
/// many were removed and the bytes their files held.
pub fn remove_dead(parent: &Path, matches: impl Fn(&OsStr) -> bool) -> (u64, u64) {
    remove_dead_with(parent, matches, |_| {})
}

/// [`remove_dead`], calling `salvage` on each dead folder (holding its lock) before removing it.
fn remove_dead_with(parent: &Path, matches: impl Fn(&OsStr) -> bool, salvage: impl Fn(&Path)) -> (u64, u64) {
    let (mut removed, mut bytes) = (0, 0);
    let Ok(rd) = fs::read_dir(parent) else { return (0, 0) };
    for e in rd.flatten() {
        if !matches(&e.file_name()) || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = e.path();
        let (state, _held) = probe(&dir);
        if state != Owner::Dead {
            continue;
        }
        salvage(&dir);
        let size = file_bytes(&dir);
        if crate::remove_tree(&dir) {
            removed += 1;
            bytes += size;
        }
    }
    (removed, bytes)
}

/// The bytes the files under `dir` hold.
pub(crate) fn file_bytes(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// The marker in the name of a placement's staging folder: `.<name>.kliko-new-<random>`.
pub const STAGING_MARK: &str = ".kliko-new-";

/// A staging folder for replacing `target`, beside it (same filesystem, so the result is
/// renamed into place): `.<name>.kliko-new-<random>`, owned by this process. Staging folders
/// in the same parent left by placements that died are removed first.
pub fn staging_beside(target: &Path) -> io::Result<OwnedDir> {
    let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    // Once per parent folder and process: a pipeline places many outputs side by side, and
    // the parent may be large.
    static CLEANED: std::sync::Mutex<Option<std::collections::HashSet<PathBuf>>> = std::sync::Mutex::new(None);
    let first = CLEANED.lock().map(|mut c| c.get_or_insert_with(Default::default).insert(parent.to_path_buf()));
    if first.unwrap_or(true) {
        remove_dead_staging(parent);
    }
    OwnedDir::create(parent, &format!(".{name}{STAGING_MARK}"))
}

/// Remove the staging folders in `parent` whose placement died (putting back a previous
/// content it had moved aside); returns how many.
pub fn remove_dead_staging(parent: &Path) -> u64 {
    remove_dead_with(parent, is_staging, |dir| restore_old(parent, dir)).0
}

/// A placement killed between moving the previous content of its target aside (into
/// `old`) and renaming the new one in leaves the target absent: put the previous content
/// back rather than lose it with the staging folder.
fn restore_old(parent: &Path, dir: &Path) {
    let Some(target) = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix('.'))
        .and_then(|n| n.rsplit_once(STAGING_MARK))
        .map(|(name, _)| parent.join(name))
    else {
        return;
    };
    let old = dir.join("old");
    if fs::symlink_metadata(&old).is_ok() && fs::symlink_metadata(&target).is_err() {
        let _ = fs::rename(&old, &target);
    }
}

/// Whether a file name is a placement's staging folder (`.<name>.kliko-new-<random>`).
pub fn is_staging(name: &OsStr) -> bool {
    let n = name.as_encoded_bytes();
    n.first() == Some(&b'.') && n.windows(STAGING_MARK.len()).any(|w| w == STAGING_MARK.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_whose_owner_died_before_locking_it_is_dead_at_once() {
        let t = tempfile::tempdir().unwrap();
        // As a process killed between making the folder and naming its lock file leaves it.
        let dead = t.path().join(format!(".out.kliko-new-o4194304.5.{}-abc", host_hash()));
        fs::create_dir(&dead).unwrap();
        assert_eq!(owner(&dead), Owner::Dead);
        // This process, still setting its folder up: not judged.
        let mine = t.path().join(format!(".out.kliko-new-{}abc", owner_tag()));
        fs::create_dir(&mine).unwrap();
        assert_eq!(owner(&mine), Owner::Unknown);
        // Another host's: not judged either.
        let other = t.path().join(".out.kliko-new-o4194304.5.00000000-abc");
        fs::create_dir(&other).unwrap();
        assert_eq!(owner(&other), Owner::Unknown);
        assert_eq!(remove_dead_staging(t.path()), 1);
        assert!(!dead.exists() && mine.exists() && other.exists());
    }

    #[test]
    fn a_run_folder_killed_while_naming_its_lock_is_judged_by_its_name() {
        let t = tempfile::tempdir().unwrap();
        // Killed after creating `.kliko-lock.new`, before renaming it.
        let dead = t.path().join(format!("run-o4194304.5.{}-abc", host_hash()));
        fs::create_dir(&dead).unwrap();
        fs::write(dead.join(OWNER_LOCK_NEW), b"").unwrap();
        assert!(is_owned_name(dead.file_name().unwrap()));
        assert!(!is_owned_name(OsStr::new("upload-abc")));
        assert_eq!(owner(&dead), Owner::Dead);
        let (removed, _) = remove_dead(t.path(), is_owned_name);
        assert_eq!(removed, 1);
        assert!(!dead.exists());
    }

    #[test]
    fn a_live_owners_folder_stays_and_a_released_one_goes() {
        let t = tempfile::tempdir().unwrap();
        let live = OwnedDir::create(t.path(), "x-").unwrap();
        fs::write(live.path().join("data"), b"12345").unwrap();
        let dead = OwnedDir::create(t.path(), "x-").unwrap();
        fs::write(dead.path().join("data"), b"123").unwrap();
        let dead_path = dead.path().to_path_buf();
        dead.release();
        // A folder being set up (no lock file yet) is young: left alone.
        fs::create_dir(t.path().join("x-setup")).unwrap();
        // Not matching the pattern: never touched.
        let other = OwnedDir::create(t.path(), "y-").unwrap();
        other.release();

        assert_eq!(owner(live.path()), Owner::Alive);
        assert_eq!(owner(&dead_path), Owner::Dead);
        assert_eq!(remove_dead(t.path(), |n| n.to_string_lossy().starts_with("x-")), (1, 3));
        assert!(live.path().join("data").exists());
        assert!(!dead_path.exists());
        assert!(t.path().join("x-setup").exists());
        let live_path = live.path().to_path_buf();
        drop(live);
        assert!(!live_path.exists(), "dropping the owner removes its folder");
    }

    #[test]
    fn a_placement_removes_the_staging_folders_of_dead_placements_beside_it() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("out");
        let first = staging_beside(&target).unwrap();
        assert!(first.path().file_name().unwrap().to_string_lossy().starts_with(".out.kliko-new-"));
        let dead = OwnedDir::create(t.path(), ".out.kliko-new-").unwrap();
        fs::write(dead.path().join("half"), b"part of an output").unwrap();
        let dead_path = dead.path().to_path_buf();
        dead.release();
        let live = OwnedDir::create(t.path(), ".other.kliko-new-").unwrap();
        assert!(is_staging(dead_path.file_name().unwrap()));
        assert!(!is_staging(OsStr::new("out")));

        assert_eq!(remove_dead_staging(t.path()), 1);
        assert!(!dead_path.exists(), "the dead placement's staging folder is still there");
        assert!(live.path().exists() && first.path().exists(), "a live placement's staging folder was removed");
    }

    #[test]
    fn a_placement_killed_with_the_previous_output_aside_gets_it_back() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("out");
        let dead = OwnedDir::create(t.path(), ".out.kliko-new-").unwrap();
        // Killed after `rename(target, old)`, before the new content was renamed in.
        fs::create_dir_all(dead.path().join("old")).unwrap();
        fs::write(dead.path().join("old/previous.txt"), b"previous").unwrap();
        fs::create_dir_all(dead.path().join("t")).unwrap();
        dead.release();
        assert_eq!(remove_dead_staging(t.path()), 1);
        assert_eq!(fs::read(target.join("previous.txt")).unwrap(), b"previous");
    }
}
