//! Blob and tree files: `blobs-v1/ab/cdef…` (file contents) and `trees-v1/ab/cdef…` (encoded
//! trees), each written to `tmp/`, fsynced, made read-only and renamed into place.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kliko_core::tree::Tree;
use kliko_core::Digest;

use crate::error::{IoContext, Result, StoreError};
use crate::{Store, BLOBS_DIR, TREES_DIR};

/// Which kind of stored object a digest names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    /// File content; its digest is plain BLAKE3.
    Blob,
    /// An encoded tree; its digest is BLAKE3 with the tree context.
    Tree,
}

impl ObjectKind {
    pub fn dir(self) -> &'static str {
        match self {
            ObjectKind::Blob => BLOBS_DIR,
            ObjectKind::Tree => TREES_DIR,
        }
    }
    pub fn digest_of(self, bytes: &[u8]) -> Digest {
        match self {
            ObjectKind::Blob => Digest::of_bytes(bytes),
            ObjectKind::Tree => Tree::digest_of_encoding(bytes),
        }
    }
}

/// `aa/bbbb…`: two hex characters of shard, then the other 62.
pub fn rel_path(d: &Digest) -> PathBuf {
    let h = d.to_hex();
    PathBuf::from(&h[..2]).join(&h[2..])
}

/// Write `bytes` to `dest` atomically: temporary file in `tmp_dir` (same filesystem), fsync,
/// chmod, rename, fsync of the destination folder.
pub(crate) fn write_atomic(tmp_dir: &Path, dest: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    fs_err::create_dir_all(tmp_dir).at(tmp_dir)?;
    let mut tmp = tempfile::Builder::new().prefix(".w-").tempfile_in(tmp_dir).at(tmp_dir)?;
    tmp.write_all(bytes).at(tmp.path())?;
    tmp.as_file().sync_all().at(tmp.path())?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(mode)).at(tmp.path())?;
    let parent = dest.parent().expect("object paths have a parent");
    fs_err::create_dir_all(parent).at(parent)?;
    tmp.persist(dest).map_err(|e| StoreError::Io { path: dest.to_path_buf(), source: e.error })?;
    sync_dir(parent)
}

/// Share `src`'s blocks with the empty file `dest` (`FICLONE`: btrfs, XFS, bcachefs...);
/// false where the filesystem cannot.
fn clone_file(src: &File, dest: &File) -> bool {
    use std::os::fd::AsRawFd;
    /// `_IOW(0x94, 9, int)` from `linux/fs.h`.
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: both descriptors are open files we own for the duration of the call.
    unsafe { libc::ioctl(dest.as_raw_fd(), FICLONE as _, src.as_raw_fd()) == 0 }
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).at(dir)
}

impl Store {
    pub fn object_path(&self, kind: ObjectKind, d: &Digest) -> PathBuf {
        self.root().join(kind.dir()).join(rel_path(d))
    }

    /// Whether a blob is present with the expected size and still read-only (cheap checks that
    /// catch truncation, and a blob made writable through a hard link, which may have been
    /// edited: such a blob is treated as absent, and the next ingest replaces it).
    pub fn has_blob(&self, d: &Digest, size: u64) -> bool {
        use std::os::unix::fs::PermissionsExt;
        fs::symlink_metadata(self.object_path(ObjectKind::Blob, d))
            .is_ok_and(|m| m.is_file() && m.len() == size && m.permissions().mode() & 0o222 == 0)
    }

    /// Move a corrupt object out of the way (to `quarantine/`), so that results naming it are
    /// incomplete (misses) from now on; where it cannot be moved, it is removed.
    pub(crate) fn quarantine(&self, kind: ObjectKind, d: &Digest) -> Option<PathBuf> {
        let path = self.object_path(kind, d);
        let q = self.root().join(crate::QUARANTINE_DIR).join(format!(
            "{}-{}-{}",
            kind.dir(),
            d.to_hex(),
            crate::records::now_ms()
        ));
        match fs::rename(&path, &q) {
            Ok(()) => Some(q),
            Err(_) => {
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    pub fn has_object(&self, kind: ObjectKind, d: &Digest) -> bool {
        fs::symlink_metadata(self.object_path(kind, d)).is_ok_and(|m| m.is_file())
    }

    /// Store small bytes (a log, a tree) under their digest; returns it.
    pub fn put_bytes(&self, kind: ObjectKind, bytes: &[u8]) -> Result<Digest> {
        let d = kind.digest_of(bytes);
        let path = self.object_path(kind, &d);
        if !self.has_object(kind, &d) {
            write_atomic(&self.tmp_dir(), &path, bytes, 0o444)?;
        }
        Ok(d)
    }

    /// Read a whole object, verifying its digest.
    pub fn get_bytes(&self, kind: ObjectKind, d: &Digest) -> Result<Vec<u8>> {
        let path = self.object_path(kind, d);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::Missing { digest: *d }),
            Err(e) => return Err(e).at(&path),
        };
        let actual = kind.digest_of(&bytes);
        if actual != *d {
            return Err(StoreError::Corrupt { expected: *d, actual });
        }
        Ok(bytes)
    }

    /// Take `files` (written in [`Store::tmp_dir`], each one's content already checked to
    /// have its digest and its data already flushed to disk: blobs fetched from a shared
    /// tier) as blobs: each made read-only and renamed into place, then the filesystem synced
    /// once for the renames. A blob already present is kept and its file dropped.
    pub fn adopt_blobs(&self, files: Vec<(tempfile::TempPath, Digest)>) -> Result<()> {
        let files: Vec<_> = files.into_iter().filter(|(_, d)| !self.has_object(ObjectKind::Blob, d)).collect();
        if files.is_empty() {
            return Ok(());
        }
        let mut adopted = Vec::with_capacity(files.len());
        for (tmp, d) in files {
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444)).at(&tmp)?;
            let dest = self.object_path(ObjectKind::Blob, &d);
            let parent = dest.parent().expect("object paths have a parent");
            fs_err::create_dir_all(parent).at(parent)?;
            tmp.persist(&dest).map_err(|e| StoreError::Io { path: dest.clone(), source: e.error })?;
            adopted.push(d);
        }
        crate::ingest::syncfs(self.root())?;
        // Each was hashed as it arrived: its mark, so that placing it (a link, or a copy) need
        // not hash it again. A mark not written only costs that hash.
        let marks = self.marks_of(&adopted);
        if let Ok(db) = self.db_nowait() {
            for (d, m) in &marks {
                let _ = db.put_or_defer(crate::db::CF_MARKS, d.as_bytes(), &m.encode());
            }
        }
        Ok(())
    }

    pub fn get_tree(&self, d: &Digest) -> Result<Tree> {
        let bytes = self.get_bytes(ObjectKind::Tree, d)?;
        Tree::decode(&bytes).map_err(|source| StoreError::BadTree { digest: *d, source })
    }

    /// Blob `d`'s file, open for reading (a missing one is [`StoreError::Missing`]).
    fn open_blob(&self, d: &Digest) -> Result<(PathBuf, File)> {
        let src = self.object_path(ObjectKind::Blob, d);
        match File::open(&src) {
            Ok(f) => Ok((src, f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::Missing { digest: *d }),
            Err(e) => Err(e).at(&src),
        }
    }

    /// Copy a blob already known to hold its content (its mark unchanged since it was last
    /// verified) to `dest` (created with `mode`, must not exist): a reflink where the
    /// filesystem can share the blocks, else a copy in the kernel (`copy_file_range`),
    /// without hashing it again.
    pub(crate) fn copy_blob_trusted(&self, d: &Digest, dest: &Path, mode: u32) -> Result<()> {
        let (_, mut input) = self.open_blob(d)?;
        let mut out = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(dest).at(dest)?;
        if !clone_file(&input, &out) {
            io::copy(&mut input, &mut out).at(dest)?;
        }
        out.set_permissions(fs::Permissions::from_mode(mode)).at(dest)
    }

    /// Copy a blob to `dest` (created with `mode`, must not exist), verified: a reflink where
    /// the filesystem can share the blocks (then the copy is re-read and hashed), otherwise a
    /// copy hashed as it is written. On a digest mismatch `dest` is removed and the blob
    /// reported corrupt. `dest` is created exactly once: file creation is the dearest part of
    /// copying small files on some filesystems.
    pub fn copy_blob_verified(&self, d: &Digest, dest: &Path, mode: u32) -> Result<()> {
        let (src, mut input) = self.open_blob(d)?;
        let size = input.metadata().at(&src)?.len();
        let mut out = fs::OpenOptions::new().read(true).write(true).create_new(true).mode(mode).open(dest).at(dest)?;
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; (size as usize).clamp(1, 256 * 1024)];
        // A clone is verified by reading it back; a copy is hashed as it is written.
        let cloned = size > 0 && clone_file(&input, &out);
        loop {
            let n = if cloned { out.read(&mut buf).at(dest)? } else { input.read(&mut buf).at(&src)? };
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            if !cloned {
                out.write_all(&buf[..n]).at(dest)?;
            }
        }
        let actual = Digest::from(h.finalize());
        if actual != *d {
            drop(out);
            let _ = fs::remove_file(dest);
            self.quarantine(ObjectKind::Blob, d);
            return Err(StoreError::Corrupt { expected: *d, actual });
        }
        // The umask may have narrowed the mode given at creation.
        out.set_permissions(fs::Permissions::from_mode(mode)).at(dest)
    }
}
