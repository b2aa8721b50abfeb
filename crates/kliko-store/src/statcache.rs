//! The persistent stat cache, kept in the `stat` column family: directory path bytes →
//! [`DirRecord`] (each regular file's device, inode, size, mtime, ctime, executable bit,
//! digest and hashing time).

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use kliko_core::hash::{DirRecord, Hashed, Hasher, MemoryCache, Progress, StatCache, Tee};

use crate::db::{Db, CF_STAT};
use crate::error::Result;
use crate::Store;

/// A [`StatCache`] backed by the store's index.
pub struct DbStatCache {
    db: Db,
}

impl DbStatCache {
    pub fn new(db: Db) -> Self {
        DbStatCache { db }
    }
}

impl StatCache for DbStatCache {
    fn load(&self, dir: &Path) -> Option<DirRecord> {
        let bytes = self.db.get_pinned_cf(self.db.cf(CF_STAT), dir.as_os_str().as_bytes()).ok()??;
        DirRecord::decode(&bytes)
    }

    fn save(&self, dir: &Path, record: &DirRecord) {
        // The stat cache is advisory: losing a write only costs a re-hash later.
        let _ = self.db.put_or_defer(CF_STAT, dir.as_os_str().as_bytes(), &record.encode());
    }
}

impl Store {
    /// Hash a host path using (and updating) the stat cache.
    pub fn hash_path(&self, path: &Path, progress: &dyn Progress) -> Result<Hashed> {
        let cache = DbStatCache::new(self.db_nowait()?);
        let probe = self.tmp_dir();
        Ok(Hasher { cache: &cache, progress, clock_probe_dir: Some(&probe), ..Hasher::default() }.hash_path(path)?)
    }

    /// [`Store::hash_path`], keeping a copy of the stat records it used in `copy`, so the
    /// same tree can be checked again later without the index.
    pub fn hash_path_remembering(&self, path: &Path, progress: &dyn Progress, copy: &MemoryCache) -> Result<Hashed> {
        let cache = DbStatCache::new(self.db_nowait()?);
        let tee = Tee { cache: &cache, copy };
        let probe = self.tmp_dir();
        Ok(Hasher { cache: &tee, progress, clock_probe_dir: Some(&probe), ..Hasher::default() }.hash_path(path)?)
    }
}
