//! Garbage collection and the lock that makes it safe while other processes run.
//!
//! `gc.lock` in the store is held *shared* by every section that creates or reads objects a
//! result will name (ingest → record; lookup → materialize) and *exclusively* by `gc`, so gc
//! never sees a blob that is published but not yet recorded, and never deletes a blob that a
//! reader is placing. The lock is always taken before the index (`db.lock`), never after, so
//! the two cannot deadlock. Results are deleted before their objects.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::Path;

use kliko_core::Digest;
use serde::Serialize;

use crate::blobs::ObjectKind;
use crate::error::{IoContext, Result};
use crate::records::{now_ms, ActionResult};
use crate::Store;

/// A held `gc.lock` (shared or exclusive); released on drop.
pub struct GcGuard {
    _file: File,
}

fn lock(path: &Path, op: i32) -> Result<GcGuard> {
    // Read and write: on NFS a shared flock is emulated by a read lock, which needs a file
    // opened for reading.
    let file = File::options().create(true).truncate(false).read(true).write(true).open(path).at(path)?;
    loop {
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(GcGuard { _file: file });
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e).at(path);
        }
    }
}

#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Evict least recently used results until the objects of the remaining ones fit.
    pub max_bytes: Option<u64>,
    /// Evict results not used for this many milliseconds.
    pub older_than_ms: Option<u64>,
    /// Report, delete nothing.
    pub dry_run: bool,
    /// Objects whose ctime is newer than this many milliseconds are never swept, even when no
    /// result names them: they may be a run's work in progress (a pipeline's composed input,
    /// a join run's stored work folder) that no result names yet.
    pub grace_ms: u64,
}

/// The default [`GcOptions::grace_ms`]: one hour.
pub const DEFAULT_GRACE_MS: u64 = 3_600_000;

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions { max_bytes: None, older_than_ms: None, dry_run: false, grace_ms: DEFAULT_GRACE_MS }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub results_before: u64,
    pub evicted: Vec<Digest>,
    pub pinned_kept: u64,
    pub objects_deleted: u64,
    pub bytes_deleted: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub dry_run: bool,
    /// Scratch folders of runs that died (their lock was free).
    pub scratch_removed: u64,
}

/// The lock file a run holds inside its scratch folder.
pub const SCRATCH_LOCK: &str = ".kliko-lock";

/// Lock a run's scratch folder for as long as the returned file lives (None if it cannot be
/// locked: the folder is then only collected once it is a day old).
pub fn lock_scratch(dir: &Path) -> Option<File> {
    let p = dir.join(SCRATCH_LOCK);
    let f = File::options().create(true).truncate(false).write(true).open(p).ok()?;
    // SAFETY: flock on an fd we own.
    (unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0).then_some(f)
}

impl Store {
    /// Hold `gc.lock` shared: gc waits until this guard is dropped.
    pub fn gc_shared(&self) -> Result<GcGuard> {
        lock(&self.root().join("gc.lock"), libc::LOCK_SH)
    }

    pub(crate) fn gc_exclusive(&self) -> Result<GcGuard> {
        lock(&self.root().join("gc.lock"), libc::LOCK_EX)
    }

    /// Every object a result needs: its output trees and blobs, its logs, and its input tree
    /// (with what it holds) when that is stored.
    /// An I/O error aborts gc: guessing would sweep a live result's objects. A missing or
    /// corrupt tree only makes the result incomplete (a miss); its other objects are counted
    /// through the results that share them.
    fn objects_of(&self, r: &ActionResult) -> Result<Vec<(ObjectKind, Digest, u64)>> {
        let mut out = Vec::new();
        let add_tree = |d: &Digest, out: &mut Vec<(ObjectKind, Digest, u64)>| -> Result<()> {
            match self.walk_tree(d) {
                Ok((trees, files)) => {
                    for t in trees {
                        let size = fs::metadata(self.object_path(ObjectKind::Tree, &t)).map(|m| m.len()).unwrap_or(0);
                        out.push((ObjectKind::Tree, t, size));
                    }
                    out.extend(files.into_iter().map(|(f, s)| (ObjectKind::Blob, f, s)));
                    Ok(())
                }
                Err(e @ crate::StoreError::Io { .. }) => Err(e),
                Err(_) => Ok(()),
            }
        };
        add_tree(&r.output, &mut out)?;
        if let Some(input) = r.preimage.input {
            if self.has_object(ObjectKind::Tree, &input) {
                add_tree(&input, &mut out)?;
            }
        }
        out.push((ObjectKind::Blob, r.stdout, r.stdout_bytes));
        out.push((ObjectKind::Blob, r.stderr, r.stderr_bytes));
        Ok(out)
    }

    /// Collect garbage. Call it with no index handle alive in this process (gc takes
    /// gc.lock exclusively, and an open index holds it shared).
    pub fn gc(&self, opts: &GcOptions) -> Result<GcReport> {
        let guard = self.gc_exclusive()?;
        // The index under our exclusive gc.lock (the usual way takes it shared).
        let db = self.db_under(guard)?;
        let results = self.results(&db)?;
        let mut report = GcReport { results_before: results.len() as u64, dry_run: opts.dry_run, ..Default::default() };

        // Reference counts of every object that some result needs.
        let mut refs: HashMap<(ObjectKind, Digest), (u64, u64)> = HashMap::new();
        let mut per_result = Vec::with_capacity(results.len());
        for r in &results {
            let objs: BTreeSet<(ObjectKind, Digest, u64)> = self.objects_of(r)?.into_iter().collect();
            for (k, d, s) in &objs {
                refs.entry((*k, *d)).or_insert((*s, 0)).1 += 1;
            }
            let access = self.last_access_ms(&db, &r.key)?.unwrap_or(0);
            let pinned = self.is_pinned(&db, &r.key)?;
            per_result.push((access, pinned, r, objs));
        }
        let stored: Vec<(ObjectKind, Digest, u64, std::path::PathBuf)> = self.all_objects();
        report.bytes_before = stored.iter().map(|o| o.2).sum();
        let mut live_bytes: u64 = refs.values().map(|(s, _)| *s).sum();

        // Least recently used first.
        per_result.sort_by_key(|(access, _, r, _)| (*access, r.key));
        let now = now_ms();
        let mut evict = Vec::new();
        for (access, pinned, r, objs) in &per_result {
            let too_old = opts.older_than_ms.is_some_and(|age| now.saturating_sub(*access) > age);
            let too_big = opts.max_bytes.is_some_and(|max| live_bytes > max);
            if !(too_old || too_big) {
                continue;
            }
            if *pinned {
                report.pinned_kept += 1;
                continue;
            }
            for (k, d, _) in objs {
                if let Some(e) = refs.get_mut(&(*k, *d)) {
                    e.1 -= 1;
                    if e.1 == 0 {
                        live_bytes -= e.0;
                    }
                }
            }
            evict.push(*r);
        }
        for r in &evict {
            report.evicted.push(r.key);
            if !opts.dry_run {
                self.delete_result(&db, r)?;
            }
        }
        // Sweep: every object no remaining result needs, unless it is young.
        let young = std::time::SystemTime::now() - std::time::Duration::from_millis(opts.grace_ms);
        for (kind, d, size, path) in stored {
            let live = refs.get(&(kind, d)).is_some_and(|(_, n)| *n > 0);
            if live || ctime(&path).is_some_and(|t| t > young) {
                continue;
            }
            report.objects_deleted += 1;
            report.bytes_deleted += size;
            if !opts.dry_run {
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e).at(&path),
                }
            }
        }
        report.bytes_after = report.bytes_before - report.bytes_deleted;
        if !opts.dry_run {
            self.clean_tmp(24 * 3600 * 1000);
            report.scratch_removed = self.clean_scratch(24 * 3600 * 1000);
        }
        Ok(report)
    }

    fn all_objects(&self) -> Vec<(ObjectKind, Digest, u64, std::path::PathBuf)> {
        let mut out = Vec::new();
        for kind in [ObjectKind::Blob, ObjectKind::Tree] {
            let dir = self.root().join(kind.dir());
            for e in walkdir::WalkDir::new(&dir).min_depth(2).max_depth(2).into_iter().flatten() {
                let p = e.path();
                let name = format!(
                    "{}{}",
                    p.parent().and_then(|s| s.file_name()).map(|s| s.to_string_lossy()).unwrap_or_default(),
                    p.file_name().map(|s| s.to_string_lossy()).unwrap_or_default()
                );
                if let Ok(d) = name.parse::<Digest>() {
                    let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                    out.push((kind, d, size, p.to_path_buf()));
                }
            }
        }
        out
    }

    /// Remove scratch folders left by runs that died: those whose lock is free, and those
    /// without a lock older than `age_ms`. Returns how many were removed.
    fn clean_scratch(&self, age_ms: u64) -> u64 {
        let cutoff = std::time::SystemTime::now() - std::time::Duration::from_millis(age_ms);
        let mut removed = 0;
        let Ok(rd) = fs::read_dir(self.root().join(crate::SCRATCH_DIR)) else { return 0 };
        for e in rd.flatten() {
            let dir = e.path();
            let lock = dir.join(SCRATCH_LOCK);
            let orphan = if let Ok(m) = fs::metadata(&lock) {
                // A minute's grace covers a run between creating its lock file and locking it.
                let settled =
                    m.modified().is_ok_and(|t| t < std::time::SystemTime::now() - std::time::Duration::from_secs(60));
                settled && lock_scratch(&dir).is_some()
            } else {
                e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t < cutoff)
            };
            if orphan && remove_tree(&dir) {
                removed += 1;
            }
        }
        removed
    }

    /// Remove temporary files older than `age_ms` (left by interrupted writes).
    fn clean_tmp(&self, age_ms: u64) {
        let cutoff = std::time::SystemTime::now() - std::time::Duration::from_millis(age_ms);
        if let Ok(rd) = fs::read_dir(self.tmp_dir()) {
            for e in rd.flatten() {
                if e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t < cutoff) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
}

/// Remove a folder tree, making read-only folders (a container may leave them) writable.
pub fn remove_tree(dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    if fs::remove_dir_all(dir).is_ok() {
        return true;
    }
    for e in walkdir::WalkDir::new(dir).into_iter().flatten() {
        if e.file_type().is_dir() {
            let _ = fs::set_permissions(e.path(), fs::Permissions::from_mode(0o700));
        }
    }
    fs::remove_dir_all(dir).is_ok()
}

fn ctime(path: &Path) -> Option<std::time::SystemTime> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::symlink_metadata(path).ok()?;
    let secs = u64::try_from(m.ctime()).ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::new(secs, m.ctime_nsec() as u32))
}
