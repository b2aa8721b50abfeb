//! Properties of the tree format, checked on real directories.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;

use kliko_core::hash::{DirRecord, Hasher, StatCache};
use kliko_core::Digest;

fn digest(p: &Path) -> Digest {
    Hasher::default().hash_path(p).unwrap().digest
}

/// The example trees listed in cache-format.md ("Golden vectors").
fn example_1(root: &Path) {
    fs::write(root.join("hello.txt"), b"hello\n").unwrap();
}

fn example_2(root: &Path) {
    fs::create_dir(root.join("a")).unwrap();
    fs::write(root.join("a/b.txt"), b"b\n").unwrap();
    fs::write(root.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    symlink("a/b.txt", root.join("link")).unwrap();
    fs::create_dir(root.join("empty")).unwrap();
}

#[test]
fn golden_vectors() {
    let t = tempfile::tempdir().unwrap();
    assert_eq!(digest(t.path()).to_hex(), "f4069c038369f94c7d0fe580331e5e87650f54860704d7c2c89ce0b9a3ac9dd4");
    let t1 = tempfile::tempdir().unwrap();
    example_1(t1.path());
    assert_eq!(digest(t1.path()).to_hex(), GOLDEN_1);
    let t2 = tempfile::tempdir().unwrap();
    example_2(t2.path());
    assert_eq!(digest(t2.path()).to_hex(), GOLDEN_2);
    // A non-UTF-8 name.
    let t3 = tempfile::tempdir().unwrap();
    fs::write(t3.path().join(std::ffi::OsStr::from_bytes(b"caf\xe9")), b"").unwrap();
    assert_eq!(digest(t3.path()).to_hex(), GOLDEN_3);
}

const GOLDEN_1: &str = "684e54fac0c7320e0864f46739615db85107ec7e08038a0ac9d494ab2dc08cc3";
const GOLDEN_2: &str = "17fa09a6de333899e91f722826119a9026d08895ba09a6fa0d7ff20190c3eacd";
const GOLDEN_3: &str = "6a325cde5e8af04324d17da4acca1615d560c67a355c970f7e9669074ec0a89f";

#[test]
fn file_digest_matches_b3sum() {
    let t = tempfile::tempdir().unwrap();
    let small = t.path().join("small");
    fs::write(&small, b"hello\n").unwrap();
    let big = t.path().join("big");
    // Above the memory-mapped, multithreaded threshold.
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
    fs::write(&big, &data).unwrap();
    assert_eq!(digest(&small), Digest::of_bytes(b"hello\n"));
    assert_eq!(digest(&big), Digest::of_bytes(&data));
}

#[test]
fn same_tree_in_two_places_gives_one_digest() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    example_2(a.path());
    example_2(b.path());
    assert_eq!(digest(a.path()), digest(b.path()));
}

#[test]
fn metadata_outside_the_format_changes_nothing() {
    let t = tempfile::tempdir().unwrap();
    example_2(t.path());
    let before = digest(t.path());
    let st = Command::new("touch").args(["-d", "2001-01-01"]).arg(t.path().join("a/b.txt")).status().unwrap();
    assert!(st.success());
    // Mode bits other than the owner's execute bit stay out.
    fs::set_permissions(t.path().join("a/b.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(t.path().join("a"), fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(digest(t.path()), before);
}

#[test]
fn each_change_in_the_format_changes_the_digest() {
    let t = tempfile::tempdir().unwrap();
    example_2(t.path());
    let mut seen = vec![digest(t.path())];
    let mut check = |what: &str| {
        let d = digest(t.path());
        assert!(!seen.contains(&d), "{what} did not change the digest");
        seen.push(d);
    };
    fs::set_permissions(t.path().join("a/b.txt"), fs::Permissions::from_mode(0o744)).unwrap();
    check("chmod +x");
    fs::rename(t.path().join("a/b.txt"), t.path().join("a/c.txt")).unwrap();
    check("rename");
    fs::create_dir(t.path().join("a/new-empty")).unwrap();
    check("an added empty directory");
    fs::remove_file(t.path().join("link")).unwrap();
    symlink("a/c.txt", t.path().join("link")).unwrap();
    check("a changed symlink target");
    fs::write(t.path().join("a/c.txt"), b"c\n").unwrap();
    check("changed content of the same size");
    fs::remove_file(t.path().join("link")).unwrap();
    fs::write(t.path().join("link"), b"a/c.txt").unwrap();
    check("a symlink replaced by a file holding its target");
}

#[test]
fn symlinks_are_not_followed() {
    let t = tempfile::tempdir().unwrap();
    symlink("/nonexistent/target", t.path().join("dangling")).unwrap();
    symlink("/etc", t.path().join("etc")).unwrap();
    let h = Hasher::default().hash_path(t.path()).unwrap();
    assert_eq!(h.stats.files.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[test]
fn a_fifo_is_a_clear_error_naming_its_path() {
    let t = tempfile::tempdir().unwrap();
    fs::create_dir(t.path().join("sub")).unwrap();
    let fifo = t.path().join("sub/pipe");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let err = Hasher::default().hash_path(t.path()).unwrap_err().to_string();
    assert!(err.contains("fifo") && err.contains(&*fifo.to_string_lossy()), "{err}");
}

/// An in-memory stat cache for the tests.
#[derive(Default)]
struct MemCache(
    std::sync::Mutex<std::collections::HashMap<std::path::PathBuf, DirRecord>>,
    std::sync::atomic::AtomicU64,
);

impl StatCache for MemCache {
    fn load(&self, dir: &Path) -> Option<DirRecord> {
        self.0.lock().unwrap().get(dir).cloned()
    }
    fn save(&self, dir: &Path, record: &DirRecord) {
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.0.lock().unwrap().insert(dir.to_path_buf(), record.clone());
    }
}

/// Make every cached record look hashed long after the files were last written, so the
/// racy-timestamp guard does not force a re-read (the tests run faster than its window).
fn age_records(cache: &MemCache) {
    for rec in cache.0.lock().unwrap().values_mut() {
        for f in &mut rec.files {
            f.hashed_at_ns += 10_000_000_000;
        }
    }
}

fn hash_with(cache: &MemCache, p: &Path) -> (Digest, u64) {
    let h = Hasher { cache, ..Hasher::default() }.hash_path(p).unwrap();
    (h.digest, h.stats.bytes_read.load(std::sync::atomic::Ordering::Relaxed))
}

#[test]
fn stat_cache_skips_unchanged_files_and_sees_changes() {
    let t = tempfile::tempdir().unwrap();
    example_2(t.path());
    let cache = MemCache::default();
    let (d0, read0) = hash_with(&cache, t.path());
    assert!(read0 > 0);
    age_records(&cache);
    let (d1, read1) = hash_with(&cache, t.path());
    assert_eq!((d1, read1), (d0, 0), "warm re-hash must read nothing");

    // Same size, mtime restored: ctime still moves, so the change is seen.
    let f = t.path().join("a/b.txt");
    let st = Command::new("touch").args(["-d", "2001-01-01"]).arg(&f).status().unwrap();
    assert!(st.success());
    let (_, _) = hash_with(&cache, t.path());
    age_records(&cache);
    fs::write(&f, b"x\n").unwrap();
    assert!(Command::new("touch").args(["-d", "2001-01-01"]).arg(&f).status().unwrap().success());
    let (d2, read2) = hash_with(&cache, t.path());
    assert_ne!(d2, d0);
    assert_eq!(read2, 2);

    // Replaced by rename (new inode), same size and mtime.
    age_records(&cache);
    let other = t.path().join("other");
    fs::write(&other, b"y\n").unwrap();
    assert!(Command::new("touch").args(["-d", "2001-01-01"]).arg(&other).status().unwrap().success());
    fs::rename(&other, &f).unwrap();
    let (d3, _) = hash_with(&cache, t.path());
    assert_ne!(d3, d2);
    assert_eq!(d3, {
        let fresh = tempfile::tempdir().unwrap();
        example_2(fresh.path());
        fs::write(fresh.path().join("a/b.txt"), b"y\n").unwrap();
        digest(fresh.path())
    });
}

#[test]
fn racy_files_are_hashed_again() {
    let t = tempfile::tempdir().unwrap();
    fs::write(t.path().join("f"), b"1\n").unwrap();
    let cache = MemCache::default();
    hash_with(&cache, t.path());
    // Written just now: within the racy window, so the next pass reads it again even though
    // nothing about its stat changed.
    let (_, read) = hash_with(&cache, t.path());
    assert_eq!(read, 2);
}

/// This machine's clock an hour ahead of the filesystem's (a file server whose clock is
/// behind ours, as the issue of network filesystems goes).
fn an_hour_ahead() -> i64 {
    kliko_core::hash::now_ns() + 3_600_000_000_000
}

#[test]
fn a_clock_ahead_of_the_filesystem_does_not_make_a_just_written_file_trusted() {
    let t = tempfile::tempdir().unwrap();
    let probe = tempfile::tempdir().unwrap();
    fs::write(t.path().join("f"), b"1\n").unwrap();
    let cache = MemCache::default();
    // "Now" read from the filesystem (a probe file on the same filesystem, as the store's
    // tmp/ is): the record says the file was hashed just after it was written, so it is racy.
    let skewed = Hasher { cache: &cache, clock_probe_dir: Some(probe.path()), now: an_hour_ahead, ..Hasher::default() };
    skewed.hash_path(t.path()).unwrap();
    let rec = cache.0.lock().unwrap().get(t.path()).unwrap().files[0].clone();
    let meta = fs::metadata(t.path().join("f")).unwrap();
    assert!(!rec.still_valid(&meta), "a file written a moment ago is not trusted, whatever our clock says");
    let again = skewed.hash_path(t.path()).unwrap();
    let read = again.stats.bytes_read.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(read, 2, "read again");

    // Without a way to read the filesystem's clock, our skewed clock would be believed: the
    // same record would be trusted (this is what the probe prevents).
    let cache2 = MemCache::default();
    Hasher { cache: &cache2, now: an_hour_ahead, ..Hasher::default() }.hash_path(t.path()).unwrap();
    let rec2 = cache2.0.lock().unwrap().get(t.path()).unwrap().files[0].clone();
    assert!(rec2.still_valid(&meta), "a local filesystem is stamped by our own clock: believed");
}
