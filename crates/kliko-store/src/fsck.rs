//! `fsck`: re-hash every stored object, quarantine corrupt ones, find results that name
//! missing objects, and report leftovers of interrupted writes.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use kliko_core::Digest;
use rayon::prelude::*;
use serde::Serialize;

use crate::blobs::ObjectKind;
use crate::error::{IoContext, Result};
use crate::{Store, QUARANTINE_DIR};

/// One object file as fsck saw it: path, the digest its name gives (if any), whether its
/// content matches, its size.
type Checked = (PathBuf, Option<Digest>, bool, u64);

#[derive(Clone, Debug, Default)]
pub struct FsckOptions {
    /// Delete results that name missing objects, and temporary files older than an hour.
    pub repair: bool,
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
    /// `key: missing object` for each result that is not complete.
    pub incomplete_results: Vec<String>,
    /// Results deleted by `--repair`.
    pub removed_results: u64,
    /// Files in `tmp/` (left by interrupted writes; harmless).
    pub temp_files: u64,
    pub removed_temp_files: u64,
}

impl FsckReport {
    /// Clean: nothing corrupt, stray or incomplete (leftover temporary files are harmless).
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty() && self.stray.is_empty() && self.incomplete_results.len() as u64 == self.removed_results
    }
}

impl Store {
    pub fn fsck(&self, opts: &FsckOptions) -> Result<FsckReport> {
        let mut report = FsckReport::default();
        for kind in [ObjectKind::Blob, ObjectKind::Tree] {
            let dir = self.root().join(kind.dir());
            let mut paths = Vec::new();
            for e in walkdir::WalkDir::new(&dir).min_depth(1).max_depth(2) {
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
                        return Ok((p, None, false, 0));
                    };
                    let ok = match kind {
                        ObjectKind::Blob => {
                            let meta = fs::symlink_metadata(&p).at(&p)?;
                            let (actual, _) = kliko_core::hash::hash_file_stable(&p, &meta)?;
                            actual == expected
                        }
                        ObjectKind::Tree => {
                            let bytes = fs::read(&p).at(&p)?;
                            kind.digest_of(&bytes) == expected && kliko_core::tree::Tree::decode(&bytes).is_ok()
                        }
                    };
                    let size = fs::symlink_metadata(&p).map(|m| m.len()).unwrap_or(0);
                    Ok((p, Some(expected), ok, size))
                })
                .collect();
            for c in checked {
                let (path, digest, ok, size) = c?;
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
                    fs::rename(&path, &q).at(&path)?;
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
        let tmp = self.tmp_dir();
        let hour_ago = SystemTime::now() - Duration::from_secs(3600);
        for e in fs::read_dir(&tmp).at(&tmp)? {
            let e = e.at(&tmp)?;
            report.temp_files += 1;
            let old = e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t < hour_ago);
            if opts.repair && old && fs::remove_file(e.path()).is_ok() {
                report.removed_temp_files += 1;
            }
        }
        Ok(report)
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
        s.index_bytes = walkdir::WalkDir::new(self.db_path())
            .into_iter()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum();
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
