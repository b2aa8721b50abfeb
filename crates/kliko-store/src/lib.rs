//! kliko-store owns the content-addressed store: blob files named by their BLAKE3 digest,
//! encoded trees, and a RocksDB index holding the action cache, the stat cache and the
//! provenance index. It ingests directory trees, materializes them back, checks itself
//! (`fsck`) and reports its size. It is synchronous; async callers use `spawn_blocking`.
//!
//! ```
//! use kliko_store::{Store, IngestMode, MaterializeMode};
//! let root = tempfile::tempdir().unwrap();
//! let store = Store::open(root.path()).unwrap();
//! let src = tempfile::tempdir_in(root.path()).unwrap();
//! std::fs::write(src.path().join("a.txt"), b"hello\n").unwrap();
//! let tree = store.ingest(src.path(), IngestMode::Copy).unwrap();
//! let out = root.path().join("out");
//! store.materialize(&tree.digest, &out, MaterializeMode::Copy).unwrap();
//! assert_eq!(std::fs::read(out.join("a.txt")).unwrap(), b"hello\n");
//! ```
//!
//! Layout and guarantees are specified in `cache-format.md`.

mod blobs;
pub mod db;
mod error;
mod flock;
mod fsck;
mod gc;
mod ingest;
mod journal;
pub mod lease;
pub mod litter;
mod materialize;
mod notes;
pub mod records;
mod recovery;
mod statcache;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

pub use blobs::ObjectKind;
pub use db::Db;
pub use error::{Result, StoreError};
pub use fsck::{FsckOptions, FsckReport, StoreStats};
pub use gc::{remove_tree, GcGuard, GcOptions, GcReport, DEFAULT_GRACE_MS};
pub use ingest::{IngestMode, Ingested};
pub use journal::JOURNAL_DIR;
pub use materialize::{BlobMark, KnownMarks, MaterializeMode};
pub use recovery::{Recovered, RepairReport, INDEX_MARK, RESULTS_DIR};
pub use statcache::DbStatCache;

use error::IoContext;

pub const FORMAT_FILE: &str = "FORMAT";
pub const FORMAT_TEXT: &str = "kliko-store-v1";
pub const BLOBS_DIR: &str = "blobs-v1";
pub const TREES_DIR: &str = "trees-v1";
pub const DB_DIR: &str = "index-v1";
pub const TMP_DIR: &str = "tmp";
pub const SCRATCH_DIR: &str = "scratch";
pub const QUARANTINE_DIR: &str = "quarantine";
pub const LEASES_DIR: &str = "leases";
pub const IMAGES_DIR: &str = "images-v1";

/// A kliko store on disk.
pub struct Store {
    root: PathBuf,
    db: Mutex<Weak<db::DbInner>>,
    /// This handle's own folder in `tmp/`, made on first use (`None` if it could not be).
    tmp: std::sync::OnceLock<Option<litter::OwnedDir>>,
    /// Whether the store's filesystem was mounted read-only when it was opened (asked once:
    /// every index open and lookup consults it).
    read_only: bool,
}

/// Folders in `tmp/` owned by one store handle each: `tmp/proc-<random>/`.
pub const TMP_OWNED_PREFIX: &str = "proc-";

impl Store {
    /// Open (creating if needed) the store at `root`.
    ///
    /// The store decides what later runs reuse, so nobody else may be able to change it: the
    /// folder must belong to the invoking user (root may open any) and must not be writable by
    /// others, nor by its group unless it is set up for sharing (setgid, see `cache-format.md`).
    /// A folder created here is made unwritable by group and others whatever the umask.
    pub fn open(root: &Path) -> Result<Store> {
        let root = std::path::absolute(root).at(root)?;
        let existed = std::fs::symlink_metadata(&root).is_ok();
        fs_err::create_dir_all(&root).at(&root)?;
        if !existed {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&root).at(&root)?.permissions().mode();
            if mode & 0o022 != 0 {
                std::fs::set_permissions(&root, std::fs::Permissions::from_mode(mode & 0o7755)).at(&root)?;
            }
        }
        check_private(&root)?;
        let format = root.join(FORMAT_FILE);
        match std::fs::read_to_string(&format) {
            Ok(found) if found.trim() == FORMAT_TEXT => {}
            Ok(found) => {
                return Err(StoreError::Format {
                    path: root,
                    found: found.trim().to_string(),
                    expected: FORMAT_TEXT.into(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                blobs::write_atomic(&root.join(TMP_DIR), &format, format!("{FORMAT_TEXT}\n").as_bytes(), 0o644)?;
            }
            Err(e) => return Err(e).at(&format),
        }
        for d in [BLOBS_DIR, TREES_DIR, TMP_DIR, SCRATCH_DIR, QUARANTINE_DIR, LEASES_DIR, IMAGES_DIR, JOURNAL_DIR] {
            let p = root.join(d);
            fs_err::create_dir_all(&p).at(&p)?;
        }
        // Temporary files of processes that died (killed mid-ingest, say) go at once: their
        // folders' locks are free. One `read_dir` and a lock probe per live process.
        litter::remove_dead(&root.join(TMP_DIR), is_owned_tmp);
        let read_only = read_only_fs(&root);
        Ok(Store { root, db: Mutex::new(Weak::new()), tmp: std::sync::OnceLock::new(), read_only })
    }

    /// The default store location: `$KLIKO_STORE`, else `$XDG_CACHE_HOME/kliko`, else
    /// `$HOME/.cache/kliko`; `None` when none of them is set. There is deliberately no
    /// fallback to a shared folder such as `/tmp`, where another user could create the store
    /// first and own it.
    pub fn default_root() -> Option<PathBuf> {
        let var = |name: &str| std::env::var_os(name).filter(|p| !p.is_empty()).map(PathBuf::from);
        var("KLIKO_STORE")
            .or_else(|| var("XDG_CACHE_HOME").map(|p| p.join("kliko")))
            .or_else(|| var("HOME").map(|p| p.join(".cache").join("kliko")))
    }

    /// The leases of this store's keys, for the processes that share its filesystem.
    pub fn leases(&self) -> lease::FlockLeases {
        lease::FlockLeases::new(self.root.join(LEASES_DIR))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn db_path(&self) -> PathBuf {
        self.root.join(DB_DIR)
    }

    /// A handle on the index, opening it (and waiting for other processes to let go of it) if
    /// this process has no handle yet.
    pub fn db(&self) -> Result<Db> {
        if self.is_read_only() {
            // Nothing can be written: a read-only view serves every reader.
            return self.db_nowait();
        }
        let mut slot = self.db.lock().expect("db slot lock");
        if let Some(inner) = slot.upgrade() {
            let db = Db(inner);
            if !db.is_read_only() {
                return Ok(db);
            }
        }
        let inner = Arc::new(db::open(self)?);
        *slot = Arc::downgrade(&inner);
        self.just_opened(inner)
    }

    /// A handle on the index that never waits for another process: the index for writing
    /// when nobody else has it open, else a read-only view of it whose writes (records of use
    /// only: access times, history, stat cache, blob marks) are left for the next writer.
    /// Results are never written through it (they go through the journal, which lookups
    /// read). Shares the handle this process already has, if any.
    pub fn db_nowait(&self) -> Result<Db> {
        let mut slot = self.db.lock().expect("db slot lock");
        if let Some(inner) = slot.upgrade() {
            return Ok(Db(inner));
        }
        let inner = Arc::new(db::open_nowait(self)?);
        *slot = Arc::downgrade(&inner);
        self.just_opened(inner)
    }

    /// [`Store::db_nowait`] for a process that mostly reads (a run that may be a hit): a
    /// read-only view even when nobody else has the index open, unless a writer would have
    /// something worth applying (journaled results, notes that carry stat-cache records or
    /// blob marks, which a view cannot see, or many notes files). A read-only view opens in
    /// about a millisecond; opening for writing replays the log and writes a new manifest and
    /// options file, several milliseconds. Its records of use are left as notes and applied
    /// by the next writer, as when another process has the index.
    pub fn db_for_lookup(&self) -> Result<Db> {
        {
            let slot = self.db.lock().expect("db slot lock");
            if let Some(inner) = slot.upgrade() {
                return Ok(Db(inner));
            }
        }
        if self.read_only || !db::exists(&self.root) || self.worth_applying() {
            return self.db_nowait();
        }
        let mut slot = self.db.lock().expect("db slot lock");
        if let Some(inner) = slot.upgrade() {
            return Ok(Db(inner));
        }
        match db::open_view_now(self)? {
            Some(inner) => {
                let inner = Arc::new(inner);
                *slot = Arc::downgrade(&inner);
                kliko_core::trace::mark("index opened read-only (nothing to apply)");
                Ok(Db(inner))
            }
            None => {
                drop(slot);
                self.db_nowait()
            }
        }
    }

    /// The index opened under a gc.lock the caller holds exclusively (for gc).
    fn db_under(&self, gc: GcGuard) -> Result<Db> {
        let mut slot = self.db.lock().expect("db slot lock");
        let inner = Arc::new(db::open_locked(self, Some(gc))?);
        *slot = Arc::downgrade(&inner);
        self.just_opened(inner)
    }

    /// Every open, before anyone reads the index: results journaled since the last one go in.
    fn just_opened(&self, inner: Arc<db::DbInner>) -> Result<Db> {
        let db = Db(inner);
        if db.is_read_only() {
            // Someone else has it open for writing, and imports for us.
            return Ok(db);
        }
        self.import_journal(&db)?;
        self.import_notes(&db);
        // Bookkeeping for a repair some day: never a reason for the index not to open.
        let _ = self.after_index_open(&db);
        Ok(db)
    }

    /// Whether the store is on a read-only filesystem: it then serves hits, provenance and
    /// history through a read-only view of its index, and records nothing.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Whether an index has ever been created here (then opening it either works or says
    /// that it was lost).
    pub fn has_index(&self) -> bool {
        db::exists(&self.root) || self.index_expected()
    }

    /// A new private folder for one run, inside the store's filesystem (so ingest can move
    /// files), owned by this process (see [`litter`]): removed when the value is dropped, and
    /// by the next gc as soon as this process is dead, however young the folder is.
    pub fn run_folder(&self, prefix: &str) -> Result<litter::OwnedDir> {
        let dir = self.root.join(SCRATCH_DIR);
        litter::OwnedDir::create(&dir, prefix).at(&dir)
    }

    /// A new private folder inside the store's filesystem that is not locked (web uploads kept
    /// between requests): gc removes it once it is a day old.
    pub fn scratch(&self, prefix: &str) -> Result<tempfile::TempDir> {
        let dir = self.root.join(SCRATCH_DIR);
        tempfile::Builder::new().prefix(prefix).tempdir_in(&dir).at(&dir)
    }

    /// Where this handle writes temporary files: its own locked folder inside `tmp/` (same
    /// filesystem as the objects), removed when the handle is dropped, and by the next store
    /// open or gc once this process is dead. Falls back to `tmp/` itself if the folder cannot
    /// be made.
    pub fn tmp_dir(&self) -> PathBuf {
        let tmp = self.root.join(TMP_DIR);
        match self.tmp.get_or_init(|| litter::OwnedDir::create(&tmp, TMP_OWNED_PREFIX).ok()) {
            Some(owned) => owned.path().to_path_buf(),
            None => tmp,
        }
    }
}

/// Whether a name in `tmp/` is a store handle's own folder.
fn is_owned_tmp(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes().starts_with(TMP_OWNED_PREFIX.as_bytes())
}

/// Whether `path` is on a filesystem mounted read-only.
fn read_only_fs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: a NUL-terminated path and a zeroed struct for statvfs to fill.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statvfs(c.as_ptr(), &mut s) == 0 && s.f_flag & libc::ST_RDONLY != 0 }
}

/// Refuses a store folder that someone other than the invoking user could change (see
/// [`Store::open`]).
fn check_private(root: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(root).at(root)?;
    // SAFETY: geteuid cannot fail and touches no memory.
    let me = unsafe { libc::geteuid() };
    let mode = meta.mode();
    let problem = if me != 0 && meta.uid() != me {
        format!(
            "it belongs to uid {}, not to you (uid {me}): its owner could change what kliko reuses; use a store of \
             your own (`--store DIR` or `KLIKO_STORE`)",
            meta.uid()
        )
    } else if mode & 0o002 != 0 {
        format!(
            "it is writable by every user (mode {:o}): anyone could change what kliko reuses; make it private \
             (`chmod o-w`) or use another store",
            mode & 0o7777
        )
    } else if mode & 0o020 != 0 && mode & 0o2000 == 0 {
        format!(
            "it is writable by its group (mode {:o}) without being set up for sharing: make it private (`chmod g-w`) \
             or, to share it with the group on purpose, set the setgid bit (`chmod g+s`)",
            mode & 0o7777
        )
    } else {
        return Ok(());
    };
    Err(StoreError::Io {
        path: root.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, format!("refusing this store: {problem}")),
    })
}
