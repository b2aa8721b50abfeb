//! Helpers shared by the store's integration tests: a sample tree with every kind of entry,
//! and walks over the store's object folders.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use kliko_core::hash::Hasher;
use kliko_core::key::{ActionPreimage, ACTION_FORMAT};
use kliko_core::Digest;
use kliko_store::records::ActionResult;
use kliko_store::ObjectKind;
use kliko_store::{Store, BLOBS_DIR, TREES_DIR};

/// Content above the memory-mapped hashing threshold, so both hashing paths are exercised.
pub fn big_content() -> Vec<u8> {
    (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

/// A tree with plain files, duplicate contents, an executable (sharing its content with a
/// plain file), an empty file, symlinks (relative, absolute, dangling), empty folders and
/// non-UTF-8 names. Returns the set of distinct file contents' digests.
pub fn sample_tree(root: &Path) -> BTreeSet<Digest> {
    let mut contents = BTreeSet::new();
    let mut file = |rel: &[u8], data: &[u8], mode: u32| {
        let p = root.join(OsStr::from_bytes(rel));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, data).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        contents.insert(Digest::of_bytes(data));
    };
    file(b"a.txt", b"hello\n", 0o644);
    file(b"dup/a-again.txt", b"hello\n", 0o600);
    file(b"dup/deeper/a-third.txt", b"hello\n", 0o644);
    file(b"run.sh", b"#!/bin/sh\necho hi\n", 0o755);
    // Same bytes as a.txt, but executable: one blob, placed two ways.
    file(b"hello-exec", b"hello\n", 0o755);
    file(b"zero", b"", 0o644);
    file(b"big.bin", &big_content(), 0o644);
    file(b"caf\xe9.txt", b"latin-1 name\n", 0o644);
    file(b"\xff\xfe/inner", b"inside a non-UTF-8 folder\n", 0o644);
    symlink("a.txt", root.join("link")).unwrap();
    symlink("does/not/exist", root.join("dangling")).unwrap();
    symlink("/nonexistent/absolute", root.join("dup/abs-dangling")).unwrap();
    symlink(OsStr::from_bytes(b"caf\xe9.txt"), root.join(OsStr::from_bytes(b"link-\xe9"))).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    fs::create_dir_all(root.join("nested/deeper/empty-too")).unwrap();
    contents
}

/// The tree digest of a host path, read without any cache.
pub fn hash_dir(p: &Path) -> Digest {
    Hasher::default().hash_path(p).unwrap().digest
}

/// Every file under `blobs-v1/` or `trees-v1/`.
pub fn object_files(store: &Store, dir: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in walk(&store.root().join(dir)) {
        if !e.1.is_dir() {
            out.push(e.0);
        }
    }
    out
}

pub fn blob_files(store: &Store) -> Vec<PathBuf> {
    object_files(store, BLOBS_DIR)
}

pub fn tree_files(store: &Store) -> Vec<PathBuf> {
    object_files(store, TREES_DIR)
}

/// Every entry under `root` (not following symlinks), with its metadata.
pub fn walk(root: &Path) -> Vec<(PathBuf, fs::Metadata)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p.clone());
            }
            out.push((p, m));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Make a read-only stored object writable and replace its bytes (same length).
pub fn corrupt_in_place(path: &Path) {
    let len = fs::metadata(path).unwrap().len() as usize;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = fs::read(path).unwrap();
    assert_eq!(bytes.len(), len);
    if bytes.is_empty() {
        bytes.push(b'!');
    } else {
        for b in &mut bytes {
            *b ^= 0x5a;
        }
    }
    fs::write(path, &bytes).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o444)).unwrap();
}

/// A result record for `output` (its logs stored), keyed by `salt`.
pub fn result_for(store: &Store, output: Digest, salt: &str) -> ActionResult {
    let stdout = store.put_bytes(ObjectKind::Blob, b"stdout of the run\n").unwrap();
    let stderr = store.put_bytes(ObjectKind::Blob, b"").unwrap();
    let preimage = ActionPreimage {
        format: ACTION_FORMAT.to_string(),
        image_id: "sha256:0000000000000000000000000000000000000000000000000000000000000000".into(),
        io: "split".into(),
        cmd: vec!["run".into()],
        env: BTreeMap::new(),
        parameters_format: 1,
        parameters: serde_json::json!({}),
        input: None,
        salt: Some(salt.into()),
    };
    ActionResult {
        key: preimage.key(),
        preimage,
        output,
        output_files: 0,
        output_bytes: 0,
        exit_code: 0,
        stdout,
        stderr,
        stdout_bytes: 18,
        stderr_bytes: 0,
        started_at: "2026-01-01T00:00:00Z".into(),
        finished_at: "2026-01-01T00:00:01Z".into(),
        wall_ms: 1000,
        image_ref: "test:latest".into(),
        image_id: "sha256:0".into(),
        repo_tags: vec![],
        repo_digests: vec![],
        input_path: None,
        parameters_given: serde_json::json!({}),
        host: "test".into(),
        user: "test".into(),
        kliko_version: "test".into(),
        runtime: None,
        gpus: None,
    }
}
