//! Garbage collection and the lock that makes it safe while other processes run.
//!
//! `gc.lock` in the store is held *shared* by every section that creates or reads objects a
//! result will name (ingest → record; lookup → materialize) and *exclusively* by `gc`, so gc
//! never sees a blob that is published but not yet recorded, and never deletes a blob that a
//! reader is placing. The lock is always taken before the index (`db.lock`), never after, so
//! the two cannot deadlock. Results are deleted before their objects.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::path::Path;

use kliko_core::Digest;
use serde::Serialize;

use crate::blobs::ObjectKind;
use crate::error::{IoContext, Result};
use crate::flock::{self, Mode};
use crate::records::{now_ms, ActionResult, TreeObjects};
use crate::Store;

/// A held `gc.lock` (shared or exclusive); released on drop.
pub struct GcGuard {
    _file: File,
}

fn lock(path: &Path, mode: Mode) -> Result<GcGuard> {
    // Read and write: on NFS a shared flock is emulated by a read lock, which needs a file
    // opened for reading.
    let file = match File::options().create(true).truncate(false).read(true).write(true).open(path) {
        Ok(f) => f,
        // A store on a read-only filesystem (a snapshot, a read-only export of a shared cache):
        // nothing can change it, and a lock on a descriptor opened for reading still works.
        Err(e) if e.kind() == std::io::ErrorKind::ReadOnlyFilesystem => File::open(path).at(path)?,
        Err(e) => return Err(e).at(path),
    };
    flock::lock(&file, mode).at(path)?;
    Ok(GcGuard { _file: file })
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
    /// `tmp/` folders of processes that died, and the bytes they held.
    pub tmp_removed: u64,
    pub tmp_bytes_removed: u64,
    /// The disk was too full to write the index even after the sweep: the evicted results'
    /// objects are deleted, but the results are still listed (as incomplete: misses).
    pub index_not_updated: bool,
}

/// A result as gc weighs it.
struct Candidate {
    access: u64,
    pinned: bool,
    /// False for a journaled result read while the index cannot be written.
    evictable: bool,
    result: ActionResult,
}

#[derive(Default)]
struct Plan {
    results: u64,
    pinned_kept: u64,
    /// Results to evict, with their output's objects.
    evict: Vec<(ActionResult, Option<TreeObjects>)>,
    /// Object → (size, how many kept results need it).
    refs: HashMap<(ObjectKind, Digest), (u64, u64)>,
}

/// Whether an error means the disk (or quota) is full.
fn out_of_space(e: &crate::StoreError) -> bool {
    match e {
        crate::StoreError::Io { source, .. } => matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)),
        crate::StoreError::Db { source, .. } => {
            let m = source.to_string();
            m.contains("No space left on device") || m.contains("Disk quota exceeded")
        }
        _ => false,
    }
}

/// Less than 1 MiB available to this user on the store's filesystem (opening the index
/// writes a few KiB; a RocksDB write that fails for space leaves it read-only until reopened).
fn low_on_space(root: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(root.as_os_str().as_bytes()) else { return false };
    // SAFETY: a zeroed statvfs is a valid out-parameter; the path is NUL-terminated.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return false;
    }
    (s.f_bavail as u64).saturating_mul(s.f_frsize as u64) < 1 << 20
}

impl Store {
    /// Hold `gc.lock` shared: gc waits until this guard is dropped.
    pub fn gc_shared(&self) -> Result<GcGuard> {
        lock(&self.root().join("gc.lock"), Mode::Shared)
    }

    pub(crate) fn gc_exclusive(&self) -> Result<GcGuard> {
        lock(&self.root().join("gc.lock"), Mode::Exclusive)
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
    ///
    /// gc must work on a full disk, since it is what frees space, and opening the index
    /// writes (RocksDB starts a new log and manifest at every open; the journal goes into
    /// the index). So it first removes the litter of dead processes (their `tmp/` folders and
    /// scratch folders: no index needed), and if the index still cannot be opened for lack
    /// of space it reads the index read-only (which writes nothing), deletes the objects no
    /// kept result needs, including those of the results it evicts, and then opens the index
    /// again, now with room, to delete the evicted results. Deleting objects before their
    /// result is safe: gc holds gc.lock exclusively, so nobody is reading, and a result whose
    /// objects are gone is a miss (lookups check completeness).
    pub fn gc(&self, opts: &GcOptions) -> Result<GcReport> {
        if self.is_read_only() {
            return Err(crate::StoreError::ReadOnly {
                path: self.root().to_path_buf(),
                what: "gc cannot delete anything".into(),
            });
        }
        let guard = self.gc_exclusive()?;
        let mut report = GcReport { dry_run: opts.dry_run, ..Default::default() };
        if !opts.dry_run {
            self.clean_litter(&mut report);
        }
        // With (almost) no space left, opening for writing would fail (and RocksDB would
        // log the failure at length): free space first.
        let mut held = Some(guard);
        let opened = match held.take_if(|_| !low_on_space(self.root())) {
            Some(guard) => self.db_under(guard).map_err(|e| if out_of_space(&e) { None } else { Some(e) }),
            None => Err(None),
        };
        let (db, evicted_first, freed_first) = match opened {
            Ok(db) => (db, Vec::new(), false),
            Err(Some(e)) => return Err(e),
            Err(None) => {
                // Take the lock again if a failed open let go of it (what anyone did in
                // between is seen by the read below).
                let guard = match held.take() {
                    Some(guard) => guard,
                    None => self.gc_exclusive()?,
                };
                let evicted = self.gc_read_only(opts, &mut report)?;
                if opts.dry_run {
                    return Ok(report);
                }
                match self.db_under(guard) {
                    Ok(db) => (db, evicted, true),
                    Err(e) if out_of_space(&e) => {
                        // Space was freed, but not enough for the index: the evicted results
                        // stay in it, incomplete (misses), until a gc that evicts them again
                        // or `fsck --repair` deletes them.
                        report.index_not_updated = true;
                        return Ok(report);
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        for (r, output) in &evicted_first {
            if self.get_result(&db, &r.key)?.is_some() {
                self.delete_result_with(&db, r, output.as_ref())?;
            }
        }
        let results = self.results(&db)?;
        let mut entries = Vec::with_capacity(results.len());
        for r in results {
            let access = self.last_access_ms(&db, &r.key)?.unwrap_or(0);
            let pinned = self.is_pinned(&db, &r.key)?;
            entries.push(Candidate { access, pinned, evictable: true, result: r });
        }
        let first_pass = evicted_first.len() as u64;
        let plan = self.plan(entries, opts)?;
        report.results_before = first_pass + plan.results;
        report.pinned_kept = plan.pinned_kept;
        for (r, _) in &plan.evict {
            report.evicted.push(r.key);
            if !opts.dry_run {
                self.delete_result(&db, r)?;
            }
        }
        let before = report.bytes_before;
        self.sweep(&plan, opts, &mut report)?;
        if freed_first {
            report.bytes_before = before;
        }
        report.bytes_after = report.bytes_before.saturating_sub(report.bytes_deleted);
        Ok(report)
    }

    /// gc without writing to the index (it cannot be opened for writing: the disk is full):
    /// read it read-only, count journaled results as kept, and sweep. Returns the results it
    /// evicted, with their output's objects (walked before they were deleted), for deletion
    /// from the index once it can be written.
    fn gc_read_only(
        &self,
        opts: &GcOptions,
        report: &mut GcReport,
    ) -> Result<Vec<(ActionResult, Option<TreeObjects>)>> {
        let mut entries = Vec::new();
        if crate::db::exists(self.root()) {
            let path = self.db_path();
            let err = |source| crate::StoreError::Db { path: path.clone(), source };
            let mut ro_opts = rocksdb::Options::default();
            ro_opts.set_info_logger(rocksdb::InfoLogger::new_callback_logger(rocksdb::LogLevel::Fatal, |_, _| {}));
            let cfs = rocksdb::DB::list_cf(&ro_opts, &path).map_err(err)?;
            // Read-only: no log, manifest, options or lock file is written. RocksDB's own lock
            // is not needed: no process has the index open while gc holds gc.lock exclusively.
            let ro = rocksdb::DB::open_cf_for_read_only(&ro_opts, &path, &cfs, false).map_err(err)?;
            let (access_cf, pins_cf) = (ro.cf_handle(crate::db::CF_ACCESS), ro.cf_handle(crate::db::CF_PINS));
            if let Some(actions) = ro.cf_handle(crate::db::CF_ACTIONS) {
                for item in ro.iterator_cf(actions, rocksdb::IteratorMode::Start) {
                    let (k, v) = item.map_err(err)?;
                    let result: ActionResult = serde_json::from_slice(&v)
                        .map_err(|source| crate::StoreError::BadRecord { key: hex::encode(&k), source })?;
                    let access = match access_cf {
                        Some(cf) => ro.get_cf(cf, &k).map_err(err)?.and_then(|b| b.as_slice().try_into().ok()),
                        None => None,
                    };
                    let pinned = match pins_cf {
                        Some(cf) => ro.get_cf(cf, &k).map_err(err)?.is_some(),
                        None => false,
                    };
                    let access = access.map(u64::from_le_bytes).unwrap_or(0);
                    entries.push(Candidate { access, pinned, evictable: true, result });
                }
            }
        }
        // Journaled results are recorded but not yet in the index: they are kept.
        for result in self.journaled_results() {
            entries.push(Candidate { access: u64::MAX, pinned: false, evictable: false, result });
        }
        let plan = self.plan(entries, opts)?;
        report.results_before = plan.results;
        report.pinned_kept = plan.pinned_kept;
        report.evicted = plan.evict.iter().map(|(r, _)| r.key).collect();
        self.sweep(&plan, opts, report)?;
        report.bytes_after = report.bytes_before.saturating_sub(report.bytes_deleted);
        Ok(plan.evict)
    }

    /// Which results to evict (least recently used first), and what the others need.
    fn plan(&self, mut entries: Vec<Candidate>, opts: &GcOptions) -> Result<Plan> {
        // Reference counts of every object that some result needs.
        let mut refs: HashMap<(ObjectKind, Digest), (u64, u64)> = HashMap::new();
        let mut per_result = Vec::with_capacity(entries.len());
        entries.sort_by_key(|c| (c.access, c.result.key));
        for c in entries {
            let objs: BTreeSet<(ObjectKind, Digest, u64)> = self.objects_of(&c.result)?.into_iter().collect();
            for (k, d, s) in &objs {
                refs.entry((*k, *d)).or_insert((*s, 0)).1 += 1;
            }
            per_result.push((c, objs));
        }
        let mut plan = Plan { results: per_result.len() as u64, ..Default::default() };
        let mut live_bytes: u64 = refs.values().map(|(s, _)| *s).sum();
        let now = now_ms();
        for (c, objs) in per_result {
            let too_old = opts.older_than_ms.is_some_and(|age| now.saturating_sub(c.access) > age);
            let too_big = opts.max_bytes.is_some_and(|max| live_bytes > max);
            if !(too_old || too_big) || !c.evictable {
                continue;
            }
            if c.pinned {
                plan.pinned_kept += 1;
                continue;
            }
            for (k, d, _) in &objs {
                if let Some(e) = refs.get_mut(&(*k, *d)) {
                    e.1 -= 1;
                    if e.1 == 0 {
                        live_bytes -= e.0;
                    }
                }
            }
            let output = self.walk_tree(&c.result.output).ok();
            plan.evict.push((c.result, output));
        }
        plan.refs = refs;
        Ok(plan)
    }

    /// Delete every object no kept result needs, unless it is young.
    fn sweep(&self, plan: &Plan, opts: &GcOptions, report: &mut GcReport) -> Result<()> {
        let stored: Vec<(ObjectKind, Digest, u64, std::path::PathBuf)> = self.all_objects();
        report.bytes_before = stored.iter().map(|o| o.2).sum();
        let young = std::time::SystemTime::now() - std::time::Duration::from_millis(opts.grace_ms);
        for (kind, d, size, path) in stored {
            let live = plan.refs.get(&(kind, d)).is_some_and(|(_, n)| *n > 0);
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
        Ok(())
    }

    /// Remove what dead processes left: their `tmp/` folders (whatever their age), loose
    /// temporary files older than a day, and scratch folders whose lock is free.
    fn clean_litter(&self, report: &mut GcReport) {
        let (n, bytes) = crate::litter::remove_dead(&self.root().join(crate::TMP_DIR), crate::is_owned_tmp);
        report.tmp_removed += n;
        report.tmp_bytes_removed += bytes;
        self.clean_tmp(24 * 3600 * 1000);
        report.scratch_removed = self.clean_scratch(24 * 3600 * 1000);
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
        let scratch = self.root().join(crate::SCRATCH_DIR);
        // A run's folder holds its lock from before the folder had its lock file's name
        // (`Store::run_folder`): one whose lock can be taken belongs to a dead run, whatever
        // its age.
        // A folder whose name names its owner, without its lock file yet (the owner was killed
        // between making the folder and naming the lock), is judged by that name.
        let (mut removed, _) = crate::litter::remove_dead(&scratch, |name| {
            scratch.join(name).join(crate::litter::OWNER_LOCK).exists() || crate::litter::is_owned_name(name)
        });
        // An unlocked folder (a web upload kept between requests) only once it is old.
        let cutoff = std::time::SystemTime::now() - std::time::Duration::from_millis(age_ms);
        let Ok(rd) = fs::read_dir(&scratch) else { return removed };
        for e in rd.flatten() {
            let dir = e.path();
            if dir.join(crate::litter::OWNER_LOCK).exists() || dir.join(crate::litter::OWNER_LOCK_NEW).exists() {
                continue;
            }
            if e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t < cutoff) && remove_tree(&dir) {
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
