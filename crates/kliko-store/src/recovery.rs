//! Losing the index must never go unnoticed, and must cost as little as possible.
//!
//! Every result is also kept as a plain file, `results-v1/<key>.json` (the journal file it
//! was recorded with, moved there once its result is in the index), so the index can be
//! rebuilt from those files and the objects. A store whose index was created once has the
//! file `index-v1.created`: opening such a store whose index has gone (its `CURRENT` file
//! removed, the folder deleted) is an error, [`StoreError::IndexLost`], instead of the
//! silent creation of an empty index. [`Store::repair_index`] rebuilds it.

use std::fs;
use std::path::PathBuf;

use kliko_core::Digest;
use rocksdb::IteratorMode;

use crate::blobs::{sync_dir, write_atomic};
use crate::db::{Db, CF_ACTIONS, CF_HISTORY, CF_PINS};
use crate::error::{IoContext, Result, StoreError};
use crate::journal::{self, JOURNAL_DIR};
use crate::records::now_ms;
use crate::{Store, QUARANTINE_DIR};

/// One file per recorded result (the journal's format), kept while the result is.
pub const RESULTS_DIR: &str = "results-v1";
/// Present once an index has been created in this store.
pub const INDEX_MARK: &str = "index-v1.created";

/// How [`Store::repair_index`] got an index back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Recovered {
    /// The old index opens (once its `CURRENT` file was written again, if that was what was
    /// missing): nothing in it was lost.
    #[default]
    Whole,
    /// RocksDB's repair rebuilt it from its table and log files: what was only in the
    /// damaged parts is gone.
    Rebuilt,
    /// Nothing of the old index could be read: a new one holds the results from their files.
    New,
}

/// What [`Store::repair_index`] did.
#[derive(Debug, Default, serde::Serialize)]
pub struct RepairReport {
    /// Where the index as it was found was copied before the repair, if there was one.
    pub saved_copy: Option<PathBuf>,
    pub recovered: Recovered,
    /// Results the index holds after the repair.
    pub results: u64,
    /// Of those, how many were recorded again from their result files.
    pub restored: u64,
    /// Result files that could not be read (moved to `quarantine/`).
    pub unreadable: u64,
    pub pins: u64,
    pub history: u64,
    /// What could not be rebuilt, in words.
    pub lost: Vec<String>,
}

impl Store {
    fn results_dir(&self) -> PathBuf {
        self.root().join(RESULTS_DIR)
    }

    pub(crate) fn result_file(&self, key: &Digest) -> PathBuf {
        self.results_dir().join(format!("{key}.json"))
    }

    /// The result kept in `results-v1/` for `key`, if any (not checked for completeness).
    pub(crate) fn result_from_file(&self, key: &Digest) -> Option<crate::records::ActionResult> {
        journal::read(&self.result_file(key)).map(|j| j.result).filter(|r| r.key == *key)
    }

    /// Whether this store ever had an index (so a missing one was lost, not never made).
    pub(crate) fn index_expected(&self) -> bool {
        self.root().join(INDEX_MARK).exists()
    }

    /// Right after an index opened: say that one exists, and (once, for a store made before
    /// result files existed) write a result file for every result it holds.
    pub(crate) fn after_index_open(&self, db: &Db) -> Result<()> {
        let mark = self.root().join(INDEX_MARK);
        if !mark.exists() {
            write_atomic(&self.tmp_dir(), &mark, format!("{}\n", now_ms()).as_bytes(), 0o644)?;
        }
        let dir = self.results_dir();
        if dir.exists() {
            return Ok(());
        }
        // Written in a folder of its own and renamed into place: `results-v1/` exists only
        // complete.
        let staging = tempfile::Builder::new().prefix(".results-").tempdir_in(self.tmp_dir()).at(self.tmp_dir())?;
        for r in self.results(db)? {
            let path = staging.path().join(format!("{}.json", r.key));
            fs::write(&path, journal::encode(&r, None)).at(&path)?;
        }
        sync_dir(staging.path())?;
        let staged = staging.keep();
        fs::rename(&staged, &dir).at(&dir)?;
        sync_dir(self.root())
    }

    /// Rebuild a lost or damaged index. Takes gc.lock exclusively (no other kliko may use the
    /// store meanwhile). First a copy of whatever is left of the index goes to `quarantine/`;
    /// then the old index is opened (with its `CURRENT` file written again where that is what
    /// is missing), else rebuilt by RocksDB's repair from its table and log files, else a new
    /// index is made ([`Recovered`]). Either way every result file (and journaled result) whose
    /// result the index lacks is recorded again, with its provenance. Pins, the history of hits
    /// and failures, access times, the stat cache and blob marks live only in the index: they
    /// come back only with the old index.
    pub fn repair_index(&self) -> Result<RepairReport> {
        if self.is_read_only() {
            return Err(StoreError::ReadOnly {
                path: self.root().to_path_buf(),
                what: "its index cannot be repaired".into(),
            });
        }
        let guard = self.gc_exclusive()?;
        let mut report = RepairReport { recovered: Recovered::New, ..Default::default() };
        let path = self.db_path();
        // Let the opens below create an index where none can be read.
        let _ = fs::remove_file(self.root().join(INDEX_MARK));
        let mut guard = Some(guard);
        let mut db = None;
        if path.exists() {
            let copy = self.root().join(QUARANTINE_DIR).join(format!("index-v1-{}", now_ms()));
            copy_dir(&path, &copy)?;
            report.saved_copy = Some(copy);
            // `CURRENT` only names the newest manifest: where it is all that is missing,
            // writing it again gives back the whole index.
            if !path.join("CURRENT").exists() {
                if let Some(m) = newest_manifest(&path) {
                    fs::write(path.join("CURRENT"), format!("{m}\n")).at(path.join("CURRENT"))?;
                }
            }
            if path.join("CURRENT").exists() {
                match self.db_under(guard.take().expect("one guard")) {
                    Ok(d) => {
                        report.recovered = Recovered::Whole;
                        db = Some(d);
                    }
                    Err(StoreError::Db { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            if db.is_none() {
                let guard = match guard.take() {
                    Some(g) => g,
                    None => self.gc_exclusive()?,
                };
                // Rebuilds the manifest (and `CURRENT`) from the table and log files.
                if rocksdb::DB::repair(&crate::db::options(), &path).is_ok() {
                    match self.db_under(guard) {
                        Ok(d) => {
                            report.recovered = Recovered::Rebuilt;
                            db = Some(d);
                        }
                        Err(StoreError::Db { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            if db.is_none() {
                let aside = self.root().join(QUARANTINE_DIR).join(format!("index-v1-unreadable-{}", now_ms()));
                fs::rename(&path, &aside).at(&path)?;
            }
        }
        let db = match db {
            Some(d) => d,
            None => {
                let guard = match guard.take() {
                    Some(g) => g,
                    None => self.gc_exclusive()?,
                };
                self.db_under(guard)?
            }
        };
        let mut files: Vec<PathBuf> = Vec::new();
        for dir in [self.results_dir(), self.root().join(JOURNAL_DIR)] {
            if let Ok(rd) = fs::read_dir(&dir) {
                files.extend(rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "json")));
            }
        }
        for f in files {
            let Some(j) = journal::read(&f) else {
                report.unreadable += 1;
                let to = self.root().join(QUARANTINE_DIR).join(f.file_name().unwrap_or_default());
                let _ = fs::rename(&f, &to);
                continue;
            };
            if self.get_result(&db, &j.result.key)?.is_some() {
                continue;
            }
            // A result whose tree is gone cannot be recorded (its provenance cannot be
            // written); it would be a miss anyway.
            if self.put_result(&db, &j.result).is_ok() {
                report.restored += 1;
                if let Some(h) = &j.history {
                    let _ = self.append_history_at(&db, h, j.at_ms);
                }
            }
        }
        report.results = db.iterator_cf(db.cf(CF_ACTIONS), IteratorMode::Start).count() as u64;
        report.pins = db.iterator_cf(db.cf(CF_PINS), IteratorMode::Start).count() as u64;
        report.history = db.iterator_cf(db.cf(CF_HISTORY), IteratorMode::Start).count() as u64;
        report.lost = match report.recovered {
            Recovered::Whole => Vec::new(),
            Recovered::Rebuilt => vec!["whatever was only in the damaged parts of the old index (results \
                 come back from their files; pins and history may be incomplete)"
                .into()],
            Recovered::New => vec![
                "pins (pin the results you need again: `kliko pin KEY`)".into(),
                "the history of cache hits and failed runs".into(),
                "last-access times (gc's least-recently-used order starts afresh)".into(),
                "the stat cache (unchanged inputs are read once more)".into(),
            ],
        };
        Ok(report)
    }
}

/// The name of the newest `MANIFEST-<n>` file in the index folder.
fn newest_manifest(dir: &std::path::Path) -> Option<String> {
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n: u64 = name.strip_prefix("MANIFEST-")?.parse().ok()?;
            Some((n, name))
        })
        .max()
        .map(|(_, name)| name)
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    fs::create_dir_all(to).at(to)?;
    for entry in fs::read_dir(from).at(from)? {
        let entry = entry.at(from)?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().at(&src)?.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            fs::copy(&src, &dst).at(&src)?;
        }
    }
    Ok(())
}
