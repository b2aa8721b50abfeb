//! Ingest: hash a tree, then make every blob and tree durable in the store.
//!
//! Order (see `cache-format.md`, "Durability"): every new object is first staged (copied to
//! `tmp/`, or, in move mode, left where it is on the same filesystem), made read-only, then
//! the filesystem is synced (`syncfs`), then the objects are renamed into place, then the
//! filesystem is synced again. An object is therefore never visible under its digest before
//! its bytes are durable, and a process killed at any point leaves only stray files in `tmp/`
//! or in the source tree, never a partial object.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kliko_core::hash::{HashError, Hasher, NoCache, Progress};
use kliko_core::Digest;
use rayon::prelude::*;

use crate::blobs::ObjectKind;
use crate::error::{IoContext, Result, StoreError};
use crate::Store;

/// How files get into the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngestMode {
    /// Rename files into the store (falling back to a copy across filesystems). Only for
    /// trees kliko owns, such as a finished container's output: the source loses its files.
    Move,
    /// Copy files, verifying each copy's digest. The source is left untouched.
    Copy,
}

/// What an ingest stored.
#[derive(Clone, Debug)]
pub struct Ingested {
    /// The tree digest (for a directory) or file digest.
    pub digest: Digest,
    pub is_dir: bool,
    pub files: u64,
    pub bytes: u64,
    pub new_objects: u64,
    pub new_bytes: u64,
    /// Every distinct file digest in the tree.
    pub file_digests: Vec<Digest>,
    /// Every tree digest in the tree, the root last.
    pub tree_digests: Vec<Digest>,
    /// The file digests whose blobs this ingest added to the store.
    pub new_blobs: Vec<Digest>,
}

struct Staged {
    from: PathBuf,
    to: PathBuf,
    /// Remove `from` if it cannot be renamed (a staged temporary file).
    temporary: bool,
}

impl Store {
    /// Ingest the tree (or single file) at `path`.
    pub fn ingest(&self, path: &Path, mode: IngestMode) -> Result<Ingested> {
        self.ingest_with_progress(path, mode, &kliko_core::hash::NoProgress)
    }

    pub fn ingest_with_progress(&self, path: &Path, mode: IngestMode, progress: &dyn Progress) -> Result<Ingested> {
        let (ingested, staged) = self.stage(path, mode, progress)?;
        self.publish(staged)?;
        Ok(ingested)
    }

    /// Ingest several trees or files with one publication (one pair of filesystem syncs for
    /// all of them: a run's output and its two logs).
    pub fn ingest_many(&self, paths: &[(&Path, IngestMode)]) -> Result<Vec<Ingested>> {
        let mut all = Vec::new();
        let mut out = Vec::with_capacity(paths.len());
        for (p, mode) in paths {
            match self.stage(p, *mode, &kliko_core::hash::NoProgress) {
                Ok((ingested, staged)) => {
                    out.push(ingested);
                    all.extend(staged);
                }
                Err(e) => {
                    for s in all.iter().filter(|s| s.temporary) {
                        let _ = fs::remove_file(&s.from);
                    }
                    return Err(e);
                }
            }
        }
        self.publish(all)?;
        Ok(out)
    }

    /// Hash `path` and stage every object the store lacks (not yet visible).
    fn stage(&self, path: &Path, mode: IngestMode, progress: &dyn Progress) -> Result<(Ingested, Vec<Staged>)> {
        let hashed = Hasher { cache: &NoCache, progress, collect: true, ..Hasher::default() }.hash_path(path)?;
        let root_dev = fs::metadata(self.root()).at(self.root())?;
        let tmp = self.tmp_dir();

        // Unique new file blobs (one source per digest).
        let mut seen = HashSet::new();
        let mut todo = Vec::new();
        let (mut files, mut bytes) = (0u64, 0u64);
        for f in &hashed.files {
            files += 1;
            bytes += f.size;
            if seen.insert(f.digest) && !self.has_blob(&f.digest, f.size) {
                todo.push(f);
            }
        }
        let staged: Vec<Result<Staged>> = todo
            .par_iter()
            .map(|f| {
                let to = self.object_path(ObjectKind::Blob, &f.digest);
                if mode == IngestMode::Move && same_device(&f.path, &root_dev) {
                    fs::set_permissions(&f.path, fs::Permissions::from_mode(0o444)).at(&f.path)?;
                    return Ok(Staged { from: f.path.clone(), to, temporary: false });
                }
                let from = copy_to_tmp(&f.path, &tmp, &f.digest)?;
                Ok(Staged { from, to, temporary: true })
            })
            .collect();
        let mut staged_ok = Vec::with_capacity(staged.len());
        let mut first_err = None;
        for s in staged {
            match s {
                Ok(s) => staged_ok.push(s),
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        let new_bytes: u64 = todo.iter().map(|f| f.size).sum();
        // Trees, children first (the hasher lists them that way).
        let mut tree_digests = Vec::with_capacity(hashed.trees.len());
        // Identical subtrees (every empty folder, say) are staged once.
        let mut trees_seen = HashSet::new();
        if first_err.is_none() {
            for (d, enc) in &hashed.trees {
                tree_digests.push(*d);
                if !trees_seen.insert(*d) || self.has_object(ObjectKind::Tree, d) {
                    continue;
                }
                match write_tmp(&tmp, enc) {
                    Ok(from) => {
                        staged_ok.push(Staged { from, to: self.object_path(ObjectKind::Tree, d), temporary: true })
                    }
                    Err(e) => {
                        first_err = Some(e);
                        break;
                    }
                }
            }
        }
        if let Some(e) = first_err {
            for s in staged_ok.iter().filter(|s| s.temporary) {
                let _ = fs::remove_file(&s.from);
            }
            return Err(e);
        }
        let new_objects = staged_ok.len() as u64;
        let ingested = Ingested {
            digest: hashed.digest,
            is_dir: hashed.is_dir,
            files,
            bytes,
            new_objects,
            new_bytes,
            file_digests: seen.into_iter().collect(),
            tree_digests,
            new_blobs: todo.iter().map(|f| f.digest).collect(),
        };
        Ok((ingested, staged_ok))
    }

    /// Make staged objects durable and visible: syncfs, rename each, fsync the touched
    /// shard folders (and syncfs once more).
    fn publish(&self, staged: Vec<Staged>) -> Result<()> {
        if staged.is_empty() {
            return Ok(());
        }
        syncfs(self.root())?;
        let mut shards = HashSet::new();
        for s in &staged {
            let parent = s.to.parent().expect("object path has a parent");
            if shards.insert(parent.to_path_buf()) {
                fs_err::create_dir_all(parent).at(parent)?;
            }
        }
        let results: Vec<Result<()>> = staged
            .par_iter()
            .map(|s| match fs::rename(&s.from, &s.to) {
                Ok(()) => Ok(()),
                Err(e) => {
                    if s.temporary {
                        let _ = fs::remove_file(&s.from);
                    }
                    Err(e).at(&s.to)
                }
            })
            .collect();
        results.into_iter().collect::<Result<Vec<()>>>()?;
        syncfs(self.root())
    }
}

fn same_device(path: &Path, root: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(path).is_ok_and(|m| m.dev() == root.dev())
}

fn write_tmp(tmp: &Path, bytes: &[u8]) -> Result<PathBuf> {
    let mut f = tempfile::Builder::new().prefix(".t-").tempfile_in(tmp).at(tmp)?;
    f.write_all(bytes).at(f.path())?;
    fs::set_permissions(f.path(), fs::Permissions::from_mode(0o444)).at(f.path())?;
    let (_, path) = f.keep().map_err(|e| StoreError::Io { path: tmp.to_path_buf(), source: e.error })?;
    Ok(path)
}

/// Copy `src` into a new file in `tmp`, checking the copy has digest `expected`.
fn copy_to_tmp(src: &Path, tmp: &Path, expected: &Digest) -> Result<PathBuf> {
    let mut input = File::open(src).at(src)?;
    let mut out = tempfile::Builder::new().prefix(".c-").tempfile_in(tmp).at(tmp)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = input.read(&mut buf).at(src)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n]).at(out.path())?;
    }
    if Digest::from(h.finalize()) != *expected {
        return Err(StoreError::Hash(HashError::Unstable { path: src.to_path_buf() }));
    }
    fs::set_permissions(out.path(), fs::Permissions::from_mode(0o444)).at(out.path())?;
    let (_, path) = out.keep().map_err(|e| StoreError::Io { path: tmp.to_path_buf(), source: e.error })?;
    Ok(path)
}

pub(crate) fn syncfs(path: &Path) -> Result<()> {
    let f = File::open(path).at(path)?;
    // SAFETY: syncfs on an fd we own.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error()).at(path);
    }
    Ok(())
}
