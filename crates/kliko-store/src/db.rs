//! The RocksDB index. RocksDB lets one process open a database at a time, and kliko runs as
//! many processes on one store, so a process holds the database only while it needs it:
//! [`Store::db`] waits for the store-wide `db.lock` (a blocking `flock`, released by the
//! kernel if the holder dies), opens the database and shares the handle between the threads
//! of the process; when the last handle is dropped the database is closed and the lock freed.
//! Never hold a handle while waiting for another process (a lease, a container).
//! Opening the index also takes `gc.lock` shared (first), so the two locks are always taken
//! in the same order and gc cannot start while a process has the index open.

use std::fs::File;
use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamily, Options, WriteOptions, DB};

use crate::error::{IoContext, Result, StoreError};
use crate::flock::{self, Mode};
use crate::Store;

/// Column families of the index; `cache-format.md` describes each.
pub const CF_ACTIONS: &str = "actions";
pub const CF_STAT: &str = "stat";
pub const CF_PROV: &str = "provenance";
pub const CF_ACCESS: &str = "access";
pub const CF_HISTORY: &str = "history";
pub const CF_PINS: &str = "pins";
/// Blob digest → the blob file's mark when its content was last verified ([`crate::BlobMark`]).
pub const CF_MARKS: &str = "blob-marks";
/// The history of pipeline runs ([`crate::records::PipelineRun`]).
pub const CF_PIPELINE_RUNS: &str = "pipeline-runs";
pub const ALL_CFS: &[&str] =
    &[CF_ACTIONS, CF_STAT, CF_PROV, CF_ACCESS, CF_HISTORY, CF_PINS, CF_MARKS, CF_PIPELINE_RUNS];
/// Column families added after the index's first format: an index written only by an older
/// kliko lacks them, and readers through a read-only view reach them with `Db::cf_if`.
const LATER_CFS: &[&str] = &[CF_MARKS, CF_PIPELINE_RUNS];

pub struct DbInner {
    // Field order matters: the database closes, then db.lock is released, then gc.lock.
    db: DB,
    /// db.lock, held exclusively; `None` for a read-only handle.
    _lock: Option<File>,
    /// gc.lock, shared, taken before db.lock: a process that has the index open can never be
    /// waiting for gc.lock while gc (holding it exclusively) waits for the index. `None` only
    /// for gc itself, which holds gc.lock exclusively.
    _gc: Option<crate::GcGuard>,
    /// For a read-only handle: its writes, kept for whoever next opens the index for writing.
    deferred: Option<crate::notes::Deferred>,
}

impl Drop for DbInner {
    fn drop(&mut self) {
        if let Some(d) = &self.deferred {
            d.write();
        }
    }
}

/// A shared, open handle on the store's index.
#[derive(Clone)]
pub struct Db(pub(crate) Arc<DbInner>);

impl Deref for Db {
    type Target = DB;
    fn deref(&self) -> &DB {
        &self.0.db
    }
}

impl Db {
    pub fn cf(&self, name: &str) -> &ColumnFamily {
        self.0.db.cf_handle(name).expect("column family created at open")
    }

    /// A column family a read-only view may lack: one this kliko version added, in an index
    /// no process of it has opened for writing yet (a writer creates every one).
    pub fn cf_if(&self, name: &str) -> Option<&ColumnFamily> {
        self.0.db.cf_handle(name)
    }

    pub fn err(&self, store: &Store) -> impl Fn(rocksdb::Error) -> StoreError {
        let path = store.db_path();
        move |source| StoreError::Db { path: path.clone(), source }
    }

    /// Whether this handle was opened read-only, beside another process that has the index
    /// open for writing (see [`Store::db_nowait`]).
    pub fn is_read_only(&self) -> bool {
        self.0.deferred.is_some()
    }

    /// Put `value` under `key` in column family `cf`; a read-only handle keeps the write for
    /// the next process that opens the index for writing. Only for what a run writes that is
    /// a record of use, not of results: access times, history, the stat cache, blob marks.
    pub fn put_or_defer(&self, cf: &'static str, key: &[u8], value: &[u8]) -> std::result::Result<(), rocksdb::Error> {
        match &self.0.deferred {
            Some(d) => {
                d.push(cf, key, value);
                Ok(())
            }
            None => self.0.db.put_cf(self.cf(cf), key, value),
        }
    }
}

/// Options for writes that must survive a crash (results, pins).
pub fn durable() -> WriteOptions {
    let mut w = WriteOptions::default();
    w.set_sync(true);
    w
}

pub(crate) fn open(store: &Store) -> Result<DbInner> {
    let gc = store.gc_shared()?;
    open_locked(store, Some(gc))
}

fn lock_file(store: &Store) -> Result<(File, std::path::PathBuf)> {
    let lock_path = store.root().join("db.lock");
    let lock = File::options().create(true).truncate(false).write(true).open(&lock_path).at(&lock_path)?;
    Ok((lock, lock_path))
}

/// Open the index under a gc.lock the caller already holds (gc, exclusively).
pub(crate) fn open_locked(store: &Store, gc: Option<crate::GcGuard>) -> Result<DbInner> {
    let (lock, lock_path) = lock_file(store)?;
    kliko_core::trace::mark("waiting for the index lock");
    flock::lock(&lock, Mode::Exclusive).at(&lock_path)?;
    kliko_core::trace::mark("index lock taken");
    open_with(store, lock, gc)
}

/// The index for writing if no other process has it open, else at once a read-only view of
/// it (RocksDB admits any number of read-only instances beside its one writer) whose writes
/// are deferred: a run never queues behind another process's use of the index. Where there
/// is no index yet, or the read-only view cannot be opened, this waits for the index.
pub(crate) fn open_nowait(store: &Store) -> Result<DbInner> {
    let gc = store.gc_shared()?;
    if store.is_read_only() {
        if !exists(store.root()) {
            return Err(StoreError::ReadOnly { path: store.root().to_path_buf(), what: "it has no index yet".into() });
        }
        // Its writes have nowhere to go: they are dropped (records of use only).
        return open_view(store, gc).map_err(|(source, _)| StoreError::Db { path: store.db_path(), source });
    }
    let (lock, _) = lock_file(store)?;
    if flock::try_lock(&lock, Mode::Exclusive).unwrap_or(false) {
        return open_with(store, lock, Some(gc));
    }
    drop(lock);
    if exists(store.root()) {
        match open_view(store, gc) {
            Ok(view) => {
                kliko_core::trace::mark("index in use by another process: opened read-only");
                return Ok(view);
            }
            Err((_, gc)) => drop(gc),
        }
    } else {
        drop(gc);
    }
    open(store)
}

/// A read-only view of an existing index (under gc.lock, shared); `None` if RocksDB cannot
/// open one at the moment (the caller then opens the index as usual).
pub(crate) fn open_view_now(store: &Store) -> Result<Option<DbInner>> {
    let gc = store.gc_shared()?;
    Ok(open_view(store, gc).ok())
}

/// A read-only RocksDB instance of the index, whose writes are deferred; on failure the
/// error, and gc.lock given back.
fn open_view(store: &Store, gc: crate::GcGuard) -> std::result::Result<DbInner, (rocksdb::Error, crate::GcGuard)> {
    let (opts, path) = (options(), store.db_path());
    // An index written by an older kliko may lack the later column families, and a view
    // cannot create them: it opens without them (their readers find them empty; see
    // `Db::cf_if`). One that lacks any other is being created right now: asking for every
    // column family makes the open fail, and the caller waits for the index instead.
    let cfs = match DB::list_cf(&opts, &path) {
        Ok(listed) if ALL_CFS.iter().all(|c| LATER_CFS.contains(c) || listed.iter().any(|l| l == c)) => listed,
        _ => column_families(&opts, &path),
    };
    match DB::open_cf_for_read_only(&opts, &path, &cfs, false) {
        Ok(db) => Ok(DbInner { db, _lock: None, _gc: Some(gc), deferred: Some(crate::notes::Deferred::new(store)) }),
        Err(e) => Err((e, gc)),
    }
}

/// Every column family: this build's, and those of other kliko versions (RocksDB refuses to
/// open a database without all of them).
fn column_families(opts: &Options, path: &Path) -> Vec<String> {
    let mut cfs: Vec<String> = ALL_CFS.iter().map(|s| s.to_string()).collect();
    if let Ok(existing) = DB::list_cf(opts, path) {
        for cf in existing {
            if !cfs.contains(&cf) {
                cfs.push(cf);
            }
        }
    }
    cfs
}

fn open_with(store: &Store, lock: File, gc: Option<crate::GcGuard>) -> Result<DbInner> {
    let path = store.db_path();
    if !exists(store.root()) && store.index_expected() {
        return Err(StoreError::IndexLost { path });
    }
    let opts = options();
    let cfs = column_families(&opts, &path);
    let db = DB::open_cf(&opts, &path, &cfs).map_err(|source| StoreError::Db { path: path.clone(), source })?;
    keep_log_short(&db, &path, &cfs).map_err(|source| StoreError::Db { path: path.clone(), source })?;
    Ok(DbInner { db, _lock: Some(lock), _gc: gc, deferred: None })
}

/// How kliko opens its index.
pub(crate) fn options() -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_max_open_files(512);
    // kliko opens the index once per process, so opening must be cheap: no statistics pass
    // over the table files, one thread to open them, no options dump into the info log.
    opts.set_skip_stats_update_on_db_open(true);
    // Replaying the log into memory is cheaper than flushing it to a new table file at every
    // open; RocksDB flushes when the memtable fills, as usual. (Not in the Rust API: set
    // through RocksDB's option string; if that fails, the defaults are merely slower.)
    if let Ok(o) = opts.get_options_from_string("avoid_flush_during_recovery=true") {
        opts = o;
    }
    opts.set_max_file_opening_threads(1);
    // No `LOG` file: RocksDB would rename the old one, create a new one and write its whole
    // configuration (about 90 KiB) into it at every open, on every run. Its errors reach the
    // caller as errors; the ones it only logs go to standard error.
    opts.set_info_logger(rocksdb::InfoLogger::new_callback_logger(rocksdb::LogLevel::Error, |level, msg| {
        if matches!(level, rocksdb::LogLevel::Error | rocksdb::LogLevel::Fatal) {
            eprintln!("kliko: the store's index (RocksDB) reports: {}", msg.trim_end());
        }
    }));
    opts
}

/// Write-ahead log files kept before the memtables are flushed to table files.
const MAX_LOG_FILES: usize = 32;
/// Level-0 table files in one column family before they are compacted into one.
const MAX_L0_FILES: u64 = 4;

/// Every open starts a new write-ahead log file and (with `avoid_flush_during_recovery`)
/// keeps the older ones, whose records are still only in memory; every open replays them
/// all. Left alone, opening would get slower with every run (about 1.3 ms per 100 opens
/// here). So once there are more than [`MAX_LOG_FILES`], flush every column family to a
/// table file (which retires the logs) and compact a column family whose level-0 files pile
/// up (short-lived processes exit before RocksDB's own background compaction finishes).
/// One open in about thirty pays a few milliseconds for this.
fn keep_log_short(db: &DB, path: &Path, cfs: &[String]) -> std::result::Result<(), rocksdb::Error> {
    let logs = std::fs::read_dir(path)
        .map(|rd| rd.flatten().filter(|e| e.file_name().as_encoded_bytes().ends_with(b".log")).count())
        .unwrap_or(0);
    if logs <= MAX_LOG_FILES {
        return Ok(());
    }
    for name in cfs {
        if let Some(cf) = db.cf_handle(name) {
            db.flush_cf(cf)?;
        }
    }
    for name in cfs {
        if let Some(cf) = db.cf_handle(name) {
            let l0 = db.property_int_value_cf(cf, "rocksdb.num-files-at-level0")?.unwrap_or(0);
            if l0 > MAX_L0_FILES {
                db.compact_range_cf::<&[u8], &[u8]>(cf, None, None);
            }
        }
    }
    Ok(())
}

pub(crate) fn exists(root: &Path) -> bool {
    root.join(crate::DB_DIR).join("CURRENT").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_with_column_families_this_build_does_not_know_still_opens() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        {
            let mut opts = Options::default();
            opts.create_if_missing(true);
            opts.create_missing_column_families(true);
            let mut cfs: Vec<&str> = ALL_CFS.to_vec();
            cfs.push("from-another-version");
            DB::open_cf(&opts, store.db_path(), cfs).unwrap();
        }
        let db = store.db().unwrap();
        db.put_cf(db.cf(CF_PINS), b"k", b"").unwrap();
    }

    #[test]
    fn opening_again_and_again_keeps_the_log_short_and_loses_nothing() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let logs = || {
            std::fs::read_dir(store.db_path())
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
                .count()
        };
        for i in 0..(3 * MAX_LOG_FILES as u32) {
            let db = store.db().unwrap();
            db.put_cf(db.cf(CF_PINS), i.to_be_bytes(), b"x").unwrap();
            drop(db);
            // One new log per open; a flush retires them all once there are too many.
            assert!(logs() <= MAX_LOG_FILES + 1, "{} log files after {} opens", logs(), i + 1);
        }
        let db = store.db().unwrap();
        for i in 0..(3 * MAX_LOG_FILES as u32) {
            assert!(db.get_cf(db.cf(CF_PINS), i.to_be_bytes()).unwrap().is_some(), "write {i} lost");
        }
        let l0 = db.property_int_value_cf(db.cf(CF_PINS), "rocksdb.num-files-at-level0").unwrap().unwrap();
        assert!(l0 <= MAX_L0_FILES + 1, "{l0} level-0 files");
    }
}
