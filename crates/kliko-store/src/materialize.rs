//! Materialize: recreate a stored tree in a host folder.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use kliko_core::tree::Entry;
use kliko_core::Digest;
use rayon::prelude::*;

use crate::blobs::ObjectKind;
use crate::db::{Db, CF_MARKS};
use crate::error::{IoContext, Result, StoreError};
use crate::Store;

/// How files are placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MaterializeMode {
    /// Hard links to the read-only blobs: instant, no space used. Executable files are
    /// copied (a link would share the blob's read-only, non-executable mode). Never for root,
    /// who could write through a read-only link into the store: root gets `Copy`.
    Link,
    /// Writable files of their own: a reflink where the filesystem supports it, else a copy;
    /// either way the content is verified against its digest.
    Copy,
    /// `Link` when it is safe (same filesystem, and not running as root), otherwise `Copy`.
    #[default]
    Auto,
    /// Hard links even for root: only for a tree that nothing but a read-only mount into a
    /// container ever sees (the kernel refuses writes through such a mount).
    ReadOnlyMount,
}

/// What a blob file looked like (inode, size, modification and change times) when its
/// content was last seen to match its digest. Any write to a file changes its change time
/// (ctime), which no program can set back, so a blob whose mark still matches has not been
/// written since; one whose mark differs (also after a chmod, or a link made by someone else)
/// is hashed again before it is linked anywhere (see `cache-format.md`, "Hits are verified").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobMark {
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

const MARK_LEN: usize = 48;

impl BlobMark {
    pub fn of(meta: &fs::Metadata) -> BlobMark {
        BlobMark {
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
        }
    }

    pub(crate) fn encode(&self) -> [u8; MARK_LEN] {
        let mut b = [0u8; MARK_LEN];
        b[..8].copy_from_slice(&self.ino.to_le_bytes());
        b[8..16].copy_from_slice(&self.size.to_le_bytes());
        b[16..32].copy_from_slice(&self.mtime_ns.to_le_bytes());
        b[32..48].copy_from_slice(&self.ctime_ns.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<BlobMark> {
        if b.len() != MARK_LEN {
            return None;
        }
        Some(BlobMark {
            ino: u64::from_le_bytes(b[..8].try_into().ok()?),
            size: u64::from_le_bytes(b[8..16].try_into().ok()?),
            mtime_ns: i128::from_le_bytes(b[16..32].try_into().ok()?),
            ctime_ns: i128::from_le_bytes(b[32..48].try_into().ok()?),
        })
    }
}

/// Blob marks known without the index: those of the blobs an ingest just published.
pub type KnownMarks = HashMap<Digest, BlobMark>;

/// Where linked blobs' marks come from.
enum Trust<'a> {
    /// The index, which also learns the marks of blobs verified now.
    Index(Db),
    /// Marks known in memory; a blob not among them is hashed.
    Known(&'a KnownMarks),
}

/// The blobs one materialization has verified: each is checked once, however many files
/// share it (each link it gets changes its ctime).
struct Verifier<'a> {
    trust: Trust<'a>,
    /// Each verified blob's mark when it was verified, and whether the index held exactly
    /// that mark (it was trusted by it, not hashed).
    done: std::sync::Mutex<HashMap<Digest, (BlobMark, bool)>>,
}

impl Store {
    /// Recreate tree `tree` at `dest`, which must not exist or be an empty folder. A blob is
    /// linked, or copied without hashing, only once it is known unchanged since it was last
    /// verified (its mark, in the index); otherwise it is hashed (a copy as it is written). A
    /// blob found corrupt is quarantined and the call fails with [`StoreError::Corrupt`]:
    /// nothing wrong is ever placed.
    pub fn materialize(&self, tree: &Digest, dest: &Path, mode: MaterializeMode) -> Result<()> {
        let mode = self.prepare_dest(dest, mode)?;
        let v = Verifier { trust: Trust::Index(self.db_nowait()?), done: Default::default() };
        self.materialize_dir(tree, dest, mode, Some(&v))?;
        self.remember_marks(&v)
    }

    /// After linking: the verified blobs' marks as they are now (each link changed its ctime).
    fn remember_marks(&self, v: &Verifier) -> Result<()> {
        let Trust::Index(db) = &v.trust else { return Ok(()) };
        let mut batch = rocksdb::WriteBatch::default();
        for (d, (then, recorded)) in v.done.lock().expect("verified set").iter() {
            let Ok(m) = fs::symlink_metadata(self.object_path(ObjectKind::Blob, d)) else { continue };
            let now = BlobMark::of(&m);
            // The index has it already (a copy changes nothing): no write, and no notes for a
            // read-only view (which would make the next lookup open a writer).
            if *recorded && now == *then {
                continue;
            }
            // Only links since: a write meanwhile would have changed the modification time
            // (and then the next use hashes it again).
            if (now.ino, now.size, now.mtime_ns) == (then.ino, then.size, then.mtime_ns) {
                if db.is_read_only() {
                    db.put_or_defer(CF_MARKS, d.as_bytes(), &now.encode()).map_err(db.err(self))?;
                } else {
                    batch.put_cf(db.cf(CF_MARKS), d.as_bytes(), now.encode());
                }
            }
        }
        if db.is_read_only() {
            // Its marks were deferred above; a read-only database refuses even an empty batch.
            return Ok(());
        }
        // A cache of work done: no sync needed (a lost mark only costs a hash).
        db.write(batch).map_err(db.err(self))
    }

    /// [`Store::materialize`] trusting the marks in `known` (blobs just published by this
    /// process) instead of the index: other blobs are verified by hashing. Does not open the
    /// index.
    pub fn materialize_known(
        &self,
        tree: &Digest,
        dest: &Path,
        mode: MaterializeMode,
        known: &KnownMarks,
    ) -> Result<()> {
        let mode = self.prepare_dest(dest, mode)?;
        let v = Verifier { trust: Trust::Known(known), done: Default::default() };
        self.materialize_dir(tree, dest, mode, Some(&v))
    }

    /// The marks of blobs as they are now: for the blobs an ingest has just published.
    pub fn marks_of(&self, digests: &[Digest]) -> KnownMarks {
        digests
            .iter()
            .filter_map(|d| {
                let m = fs::symlink_metadata(self.object_path(ObjectKind::Blob, d)).ok()?;
                Some((*d, BlobMark::of(&m)))
            })
            .collect()
    }

    fn prepare_dest(&self, dest: &Path, mode: MaterializeMode) -> Result<MaterializeMode> {
        match fs::read_dir(dest) {
            Ok(mut it) => {
                if it.next().is_some() {
                    return Err(StoreError::NotEmpty { path: dest.to_path_buf() });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs_err::create_dir_all(dest).at(dest)?,
            Err(e) => return Err(e).at(dest),
        }
        self.placement(dest, mode)
    }

    /// What `mode` means for files placed in the existing folder `dest`: `Link` or `Copy`
    /// (`Auto` links only on the store's filesystem; root never gets links it could write
    /// through).
    pub fn placement(&self, dest: &Path, mode: MaterializeMode) -> Result<MaterializeMode> {
        // SAFETY: geteuid has no preconditions.
        let root_user = unsafe { libc::geteuid() } == 0;
        Ok(match mode {
            MaterializeMode::Auto => {
                let same_fs = fs::metadata(dest).at(dest)?.dev() == fs::metadata(self.root()).at(self.root())?.dev();
                if same_fs && !root_user {
                    MaterializeMode::Link
                } else {
                    MaterializeMode::Copy
                }
            }
            MaterializeMode::Link if root_user => MaterializeMode::Copy,
            MaterializeMode::ReadOnlyMount => MaterializeMode::Link,
            m => m,
        })
    }

    fn materialize_dir(
        &self,
        tree: &Digest,
        dest: &Path,
        mode: MaterializeMode,
        trust: Option<&Verifier>,
    ) -> Result<()> {
        let tree = self.get_tree(tree)?;
        let entries: Vec<(&Vec<u8>, &Entry)> = tree.entries.iter().collect();
        entries.par_iter().try_for_each(|(name, entry)| {
            let path = dest.join(OsStr::from_bytes(name));
            match entry {
                Entry::Dir { digest } => {
                    fs::create_dir(&path).at(&path)?;
                    self.materialize_dir(digest, &path, mode, trust)
                }
                Entry::Symlink { target } => std::os::unix::fs::symlink(OsStr::from_bytes(target), &path).at(&path),
                Entry::File { executable, digest, .. } => self.place_file(digest, *executable, &path, mode, trust),
            }
        })
    }

    /// Check that blob `d` still holds its content before it is linked: by its mark when the
    /// file is unchanged since it was last verified, else by hashing it (and remembering the
    /// new mark). A blob that does not match goes to `quarantine/`.
    fn verify_blob(&self, d: &Digest, v: &Verifier) -> Result<()> {
        if self.is_trusted(d, v)? {
            return Ok(());
        }
        let path = self.object_path(ObjectKind::Blob, d);
        let meta = fs::symlink_metadata(&path).at(&path)?;
        let (actual, _) = kliko_core::hash::hash_file_stable(&path, &meta)?;
        if actual != *d {
            self.quarantine(ObjectKind::Blob, d);
            return Err(StoreError::Corrupt { expected: *d, actual });
        }
        v.done.lock().expect("verified set").insert(*d, (BlobMark::of(&meta), false));
        Ok(())
    }

    /// Whether blob `d` is known to hold its content without reading it: verified earlier in
    /// this call, or unchanged (its mark) since it was last verified, and not writable.
    fn is_trusted(&self, d: &Digest, v: &Verifier) -> Result<bool> {
        if v.done.lock().expect("verified set").contains_key(d) {
            return Ok(true);
        }
        let path = self.object_path(ObjectKind::Blob, d);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::Missing { digest: *d }),
            Err(e) => return Err(e).at(&path),
        };
        let trusted = match &v.trust {
            Trust::Index(db) => {
                // An index older than marks has none: every blob is hashed.
                match db.cf_if(CF_MARKS) {
                    Some(cf) => db.get_cf(cf, d.as_bytes()).map_err(db.err(self))?.and_then(|b| BlobMark::decode(&b)),
                    None => None,
                }
            }
            Trust::Known(m) => m.get(d).copied(),
        };
        let unchanged = trusted == Some(BlobMark::of(&meta)) && meta.permissions().mode() & 0o222 == 0;
        if unchanged {
            v.done.lock().expect("verified set").insert(*d, (BlobMark::of(&meta), true));
        }
        Ok(unchanged)
    }

    fn place_file(
        &self,
        d: &Digest,
        executable: bool,
        dest: &Path,
        mode: MaterializeMode,
        trust: Option<&Verifier>,
    ) -> Result<()> {
        let perm = if executable { 0o755 } else { 0o644 };
        let src = self.object_path(ObjectKind::Blob, d);
        if let (MaterializeMode::Link, false, Some(trust)) = (mode, executable, trust) {
            self.verify_blob(d, trust)?;
            return match fs::hard_link(&src, dest) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::Missing { digest: *d }),
                // Cross-device or too many links: fall back to a verified copy.
                Err(_) => self.copy_blob_verified(d, dest, perm),
            };
        }
        // A copy of a blob known unchanged since it was verified needs no hashing (the same
        // guarantee as a link); any other copy is hashed as it is written, and then the blob
        // counts as verified.
        if let Some(trust) = trust {
            if self.is_trusted(d, trust)? {
                return self.copy_blob_trusted(d, dest, perm);
            }
            self.copy_blob_verified(d, dest, perm)?;
            if let Ok(meta) = fs::symlink_metadata(&src) {
                trust.done.lock().expect("verified set").insert(*d, (BlobMark::of(&meta), false));
            }
            return Ok(());
        }
        self.copy_blob_verified(d, dest, perm)
    }
}
