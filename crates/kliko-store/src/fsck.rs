//! `fsck`: re-hash every stored object, quarantine corrupt ones, find results that name
//! missing objects, check the cached image files, and report leftovers of interrupted writes.
//!
//! fsck runs while other processes use the store, gc included, and does not lock gc out
//! (re-hashing a large store takes minutes, and gc would wait that long). Instead it tells a
//! concurrent deletion from damage: only gc deletes objects (under gc.lock, held exclusively),
//! so an object that was listed and is gone when fsck opens it was collected, not lost, and
//! is skipped. Losing an object that a result still needs is damage, and is found by the
//! result check, which runs with the index open, and so holding gc.lock shared: no gc runs
//! while it checks, and a missing object it finds is missing for real.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use kliko_core::Digest;
use rayon::prelude::*;
use serde::Serialize;

use crate::blobs::ObjectKind;
use crate::error::{IoContext, Result};
use crate::{Store, QUARANTINE_DIR};

/// One object file as fsck saw it: path, the digest its name gives (if any), whether its
/// content matches, its size. `None`: it vanished between listing and reading (gc).
type Checked = Option<(PathBuf, Option<Digest>, bool, u64)>;

/// Checks the content of a cached image file (`images-v1/`): given the file's path in the
/// image (`/kliko.yml`) and its bytes, why it is unusable, if it is. The store does not know
/// the formats (kliko-spec does), so the caller provides this.
pub type ImageFileCheck = fn(&str, &[u8]) -> std::result::Result<(), String>;

#[derive(Clone, Debug, Default)]
pub struct FsckOptions {
    /// Delete results that name missing objects, move stray files and unusable image files
    /// to `quarantine/`, and remove temporary files of dead processes (and loose ones older
    /// than an hour).
    pub repair: bool,
    /// How to check a cached image file's content (only its name and readability if `None`).
    pub check_image_file: Option<ImageFileCheck>,
}

#[derive(Debug, Default, Serialize)]
pub struct FsckReport {
    pub blobs: u64,
    pub trees: u64,
    pub bytes: u64,
    pub results: u64,
    /// Objects whose content does not match their name, now in `quarantine/`.
    pub corrupt: Vec<String>,
    /// Files in the object folders that are not named like objects.
    pub stray: Vec<PathBuf>,
    /// Stray files `--repair` moved to `quarantine/`.
    pub removed_stray: u64,
    /// Cached image files (`images-v1/`) checked.
    pub image_files: u64,
    /// `path: why` for each cached image file that is unusable (a bad name, unreadable, or
    /// content that does not parse); kliko reads it from the image again once it is gone.
    pub bad_image_files: Vec<String>,
    /// Bad image files `--repair` moved to `quarantine/`.
    pub removed_image_files: u64,
    /// Objects listed that gc deleted before fsck could read them (not damage).
    pub vanished: u64,
    /// `key: missing object` for each result that is not complete.
    pub incomplete_results: Vec<String>,
    /// Results deleted by `--repair`.
    pub removed_results: u64,
    /// Leftovers in `tmp/` of interrupted writes (dead processes' folders, loose files;
    /// harmless, and removed by the next store open or gc).
    pub temp_files: u64,
    pub removed_temp_files: u64,
}

impl FsckReport {
    /// Clean: nothing corrupt, stray or incomplete (leftover temporary files are harmless).
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty()
            && self.stray.len() as u64 == self.removed_stray
            && self.bad_image_files.len() as u64 == self.removed_image_files
            && self.incomplete_results.len() as u64 == self.removed_results
    }
}

impl Store {
    pub fn fsck(&self, opts: &FsckOptions) -> Result<FsckReport> {
        let mut report = FsckReport::default();
        for kind in [ObjectKind::Blob, ObjectKind::Tree] {
            let dir = self.root().join(kind.dir());
            let mut paths = Vec::new();
            for e in walkdir::WalkDir::new(&dir).min_depth(1).max_depth(2) {
                if e.as_ref().err().and_then(|e| e.io_error()).is_some_and(|e| e.kind() == io::ErrorKind::NotFound) {
                    report.vanished += 1;
                    continue;
                }
                let e = e.map_err(|e| {
                    let path = e.path().map(|p| p.to_path_buf()).unwrap_or_else(|| dir.clone());
                    crate::StoreError::Io { path, source: e.into() }
                })?;
                // Only shard folders beside the shards, only regular files inside them; anything
                // else (a symlink could point anywhere) is stray, not hashed.
                let ft = e.file_type();
                if e.depth() == 1 && ft.is_dir() {
                    continue;
                }
                if e.depth() == 1 || !ft.is_file() {
                    report.stray.push(e.into_path());
                    continue;
                }
                paths.push(e.into_path());
            }
            let checked: Vec<Result<Checked>> = paths
                .into_par_iter()
                .map(|p| {
                    let name = p
                        .parent()
                        .and_then(|s| s.file_name())
                        .zip(p.file_name())
                        .map(|(a, b)| format!("{}{}", a.to_string_lossy(), b.to_string_lossy()));
                    let Some(expected) = name.and_then(|n| n.parse::<Digest>().ok()) else {
                        return Ok(Some((p, None, false, 0)));
                    };
                    // Only gc deletes objects: one gone since the listing was collected.
                    let gone = |e: &std::io::Error| e.kind() == io::ErrorKind::NotFound;
                    let ok = match kind {
                        ObjectKind::Blob => {
                            let meta = match fs::symlink_metadata(&p) {
                                Ok(m) => m,
                                Err(e) if gone(&e) => return Ok(None),
                                Err(e) => return Err(e).at(&p),
                            };
                            match kliko_core::hash::hash_file_stable(&p, &meta) {
                                Ok((actual, _)) => actual == expected,
                                Err(kliko_core::hash::HashError::Io { source, .. }) if gone(&source) => {
                                    return Ok(None)
                                }
                                Err(e) => return Err(e.into()),
                            }
                        }
                        ObjectKind::Tree => {
                            let bytes = match fs::read(&p) {
                                Ok(b) => b,
                                Err(e) if gone(&e) => return Ok(None),
                                Err(e) => return Err(e).at(&p),
                            };
                            kind.digest_of(&bytes) == expected && kliko_core::tree::Tree::decode(&bytes).is_ok()
                        }
                    };
                    let size = fs::symlink_metadata(&p).map(|m| m.len()).unwrap_or(0);
                    Ok(Some((p, Some(expected), ok, size)))
                })
                .collect();
            for c in checked {
                let Some((path, digest, ok, size)) = c? else {
                    report.vanished += 1;
                    continue;
                };
                let Some(digest) = digest else {
                    report.stray.push(path);
                    continue;
                };
                match kind {
                    ObjectKind::Blob => report.blobs += 1,
                    ObjectKind::Tree => report.trees += 1,
                }
                report.bytes += size;
                if !ok {
                    let q = self.root().join(QUARANTINE_DIR).join(format!(
                        "{}-{}-{}",
                        kind.dir(),
                        digest.to_hex(),
                        crate::records::now_ms()
                    ));
                    match fs::rename(&path, &q) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {
                            report.vanished += 1;
                            continue;
                        }
                        Err(e) => return Err(e).at(&path),
                    }
                    report.corrupt.push(format!("{} {} (moved to `{}`)", kind.dir(), digest, q.display()));
                }
            }
        }
        if self.has_index() {
            let db = self.db()?;
            for r in self.results(&db)? {
                report.results += 1;
                if let Some(missing) = self.first_missing(&r) {
                    report.incomplete_results.push(format!("{}: {missing}", r.key));
                    if opts.repair {
                        self.delete_result(&db, &r)?;
                        report.removed_results += 1;
                    }
                }
            }
        }
        self.fsck_image_files(opts, &mut report)?;
        if opts.repair {
            for path in &report.stray {
                if quarantine(self, "stray", path).is_ok() {
                    report.removed_stray += 1;
                }
            }
        }
        // Leftovers in tmp/: folders of dead processes (the store's open removed those it
        // found; more may have died since), and loose files (older kliko versions).
        let tmp = self.root().join(crate::TMP_DIR);
        let hour_ago = SystemTime::now() - Duration::from_secs(3600);
        for e in fs::read_dir(&tmp).at(&tmp)? {
            let e = e.at(&tmp)?;
            let path = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                if crate::litter::owner(&path) == crate::litter::Owner::Dead {
                    report.temp_files += 1;
                }
                continue;
            }
            report.temp_files += 1;
            let old = e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t < hour_ago);
            if opts.repair && old && fs::remove_file(&path).is_ok() {
                report.removed_temp_files += 1;
            }
        }
        if opts.repair {
            report.removed_temp_files += crate::litter::remove_dead(&tmp, crate::is_owned_tmp).0;
        }
        Ok(report)
    }

    /// Check every cached image file: named `<64 hex>-<path>`, a readable regular file, and
    /// (given a check) usable content. There is no digest to compare: the file is the image's
    /// own, read once by image ID.
    fn fsck_image_files(&self, opts: &FsckOptions, report: &mut FsckReport) -> Result<()> {
        let dir = self.root().join(crate::IMAGES_DIR);
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).at(&dir),
        };
        for e in rd {
            let e = e.at(&dir)?;
            let path = e.path();
            report.image_files += 1;
            let name = e.file_name().to_string_lossy().into_owned();
            let in_image = name
                .split_once('-')
                .filter(|(id, rest)| {
                    id.len() == 64
                        && id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                        && !rest.is_empty()
                })
                .map(|(_, rest)| format!("/{}", rest.replace('%', "/")));
            let problem = match (in_image, fs::symlink_metadata(&path)) {
                (_, Err(e)) if e.kind() == io::ErrorKind::NotFound => {
                    report.image_files -= 1;
                    continue;
                }
                (None, _) => Some("not named `<image id>-<path>`".to_string()),
                (_, Ok(m)) if !m.is_file() => Some("not a regular file".to_string()),
                (_, Err(e)) => Some(format!("unreadable: {e}")),
                (Some(in_image), Ok(_)) => match fs::read(&path) {
                    Err(e) => Some(format!("unreadable: {e}")),
                    Ok(bytes) => opts.check_image_file.and_then(|check| check(&in_image, &bytes).err()),
                },
            };
            if let Some(why) = problem {
                report.bad_image_files.push(format!("{}: {why}", path.display()));
                if opts.repair && quarantine(self, "image", &path).is_ok() {
                    report.removed_image_files += 1;
                }
            }
        }
        Ok(())
    }

    /// The first object of a result that is missing or damaged, described.
    fn first_missing(&self, r: &crate::records::ActionResult) -> Option<String> {
        let (_, files) = match self.walk_tree(&r.output) {
            Ok(x) => x,
            Err(e) => return Some(format!("output tree unreadable: {e}")),
        };
        let logs = [(r.stdout, r.stdout_bytes), (r.stderr, r.stderr_bytes)];
        files
            .iter()
            .chain(logs.iter())
            .find(|(d, size)| !self.has_blob(d, *size))
            .map(|(d, _)| format!("blob `{d}` missing"))
    }
}

/// Sizes of what a store holds.
#[derive(Debug, Default, Serialize)]
pub struct StoreStats {
    pub root: PathBuf,
    pub blobs: u64,
    pub blob_bytes: u64,
    pub trees: u64,
    pub tree_bytes: u64,
    pub results: u64,
    pub pinned: u64,
    pub history_entries: u64,
    pub stat_cache_dirs: u64,
    pub index_bytes: u64,
    pub scratch_entries: u64,
    pub quarantined: u64,
}

impl Store {
    pub fn stats(&self) -> Result<StoreStats> {
        let mut s = StoreStats { root: self.root().to_path_buf(), ..Default::default() };
        for kind in [ObjectKind::Blob, ObjectKind::Tree] {
            let dir = self.root().join(kind.dir());
            for e in walkdir::WalkDir::new(&dir).min_depth(2).max_depth(2).into_iter().flatten() {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                match kind {
                    ObjectKind::Blob => (s.blobs += 1, s.blob_bytes += len),
                    ObjectKind::Tree => (s.trees += 1, s.tree_bytes += len),
                };
            }
        }
        s.index_bytes = crate::litter::file_bytes(&self.db_path());
        s.scratch_entries = count_entries(&self.root().join(crate::SCRATCH_DIR));
        s.quarantined = count_entries(&self.root().join(QUARANTINE_DIR));
        if self.has_index() {
            let db = self.db()?;
            let count = |cf: &str| db.iterator_cf(db.cf(cf), rocksdb::IteratorMode::Start).count() as u64;
            s.results = count(crate::db::CF_ACTIONS);
            s.pinned = count(crate::db::CF_PINS);
            s.history_entries = count(crate::db::CF_HISTORY);
            s.stat_cache_dirs = count(crate::db::CF_STAT);
        }
        Ok(s)
    }
}

fn count_entries(dir: &std::path::Path) -> u64 {
    fs::read_dir(dir).map(|it| it.count() as u64).unwrap_or(0)
}

/// Move `path` into `quarantine/` (named by `what`, its file name and the time).
fn quarantine(store: &Store, what: &str, path: &Path) -> std::io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let q = store.root().join(QUARANTINE_DIR).join(format!("{what}-{name}-{}", crate::records::now_ms()));
    fs::rename(path, q)
}
