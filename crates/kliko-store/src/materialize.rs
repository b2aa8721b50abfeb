//! Materialize: recreate a stored tree in a host folder.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use kliko_core::tree::Entry;
use kliko_core::Digest;
use rayon::prelude::*;

use crate::blobs::ObjectKind;
use crate::error::{IoContext, Result, StoreError};
use crate::Store;

/// How files are placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MaterializeMode {
    /// Hard links to the read-only blobs: instant, no space used. Executable files are
    /// copied (a link would share the blob's read-only, non-executable mode).
    Link,
    /// Writable files of their own: a reflink where the filesystem supports it, else a copy;
    /// either way the content is verified against its digest.
    Copy,
    /// `Link` when it is safe (same filesystem, and not running as root, who could write
    /// through a read-only link into the store), otherwise `Copy`.
    #[default]
    Auto,
}

impl Store {
    /// Recreate tree `tree` at `dest`, which must not exist or be an empty folder.
    pub fn materialize(&self, tree: &Digest, dest: &Path, mode: MaterializeMode) -> Result<()> {
        match fs::read_dir(dest) {
            Ok(mut it) => {
                if it.next().is_some() {
                    return Err(StoreError::NotEmpty { path: dest.to_path_buf() });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs_err::create_dir_all(dest).at(dest)?,
            Err(e) => return Err(e).at(dest),
        }
        let mode = self.placement(dest, mode)?;
        self.materialize_dir(tree, dest, mode)
    }

    /// What `mode` means for files placed in the existing folder `dest`: `Link` or `Copy`
    /// (`Auto` links only on the store's filesystem and never for root).
    pub fn placement(&self, dest: &Path, mode: MaterializeMode) -> Result<MaterializeMode> {
        Ok(match mode {
            MaterializeMode::Auto => {
                let same_fs = fs::metadata(dest).at(dest)?.dev() == fs::metadata(self.root()).at(self.root())?.dev();
                // SAFETY: geteuid has no preconditions.
                let root_user = unsafe { libc::geteuid() } == 0;
                if same_fs && !root_user {
                    MaterializeMode::Link
                } else {
                    MaterializeMode::Copy
                }
            }
            m => m,
        })
    }

    fn materialize_dir(&self, tree: &Digest, dest: &Path, mode: MaterializeMode) -> Result<()> {
        let tree = self.get_tree(tree)?;
        let entries: Vec<(&Vec<u8>, &Entry)> = tree.entries.iter().collect();
        entries.par_iter().try_for_each(|(name, entry)| {
            let path = dest.join(OsStr::from_bytes(name));
            match entry {
                Entry::Dir { digest } => {
                    fs::create_dir(&path).at(&path)?;
                    self.materialize_dir(digest, &path, mode)
                }
                Entry::Symlink { target } => std::os::unix::fs::symlink(OsStr::from_bytes(target), &path).at(&path),
                Entry::File { executable, digest, .. } => self.place_file(digest, *executable, &path, mode),
            }
        })
    }

    fn place_file(&self, d: &Digest, executable: bool, dest: &Path, mode: MaterializeMode) -> Result<()> {
        let perm = if executable { 0o755 } else { 0o644 };
        let src = self.object_path(ObjectKind::Blob, d);
        if mode == MaterializeMode::Link && !executable {
            return match fs::hard_link(&src, dest) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::Missing { digest: *d }),
                // Cross-device or too many links: fall back to a verified copy.
                Err(_) => self.copy_blob_verified(d, dest, perm),
            };
        }
        self.copy_blob_verified(d, dest, perm)
    }
}
