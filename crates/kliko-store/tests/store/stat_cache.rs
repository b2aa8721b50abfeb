//! The persistent stat cache (`DbStatCache`, the `stat` column family): unchanged files are not
//! read again, across processes (store reopened), and every kind of change is still seen.
//!
//! The racy-timestamp guard trusts a record only once the file is older than
//! `RACY_WINDOW_NS` at hashing time. Tests do not sleep, so [`age_records`] rewrites the stored
//! records as if they had been made later: exactly what a hash run two seconds later would
//! have stored.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use crate::common::hash_dir;
use kliko_core::hash::{DirRecord, Hasher, NoProgress, RACY_WINDOW_NS};
use kliko_core::Digest;
use kliko_store::db::CF_STAT;
use kliko_store::{DbStatCache, Store};

/// A raw index entry.
type KeyValue = (Box<[u8]>, Box<[u8]>);

struct Run {
    digest: Digest,
    read: u64,
    cached: u64,
}

fn hash(store: &Store, p: &Path) -> Run {
    let h = store.hash_path(p, &NoProgress).unwrap();
    Run {
        digest: h.digest,
        read: h.stats.bytes_read.load(Ordering::Relaxed),
        cached: h.stats.bytes_cached.load(Ordering::Relaxed),
    }
}

/// Rewrite every stat-cache record as if it had been made after the racy window.
fn age_records(store: &Store) -> usize {
    let db = store.db().unwrap();
    let cf = db.cf(CF_STAT);
    let mut n = 0;
    let all: Vec<KeyValue> = db.iterator_cf(cf, rocksdb::IteratorMode::Start).map(|kv| kv.unwrap()).collect();
    for (k, v) in all {
        let mut rec = DirRecord::decode(&v).expect("a readable record");
        for f in &mut rec.files {
            f.hashed_at_ns = f.mtime_ns.max(f.ctime_ns) + RACY_WINDOW_NS + 1_000_000_000;
            n += 1;
        }
        db.put_cf(cf, k, rec.encode()).unwrap();
    }
    n
}

fn ctime_ns(m: &fs::Metadata) -> i64 {
    m.ctime() * 1_000_000_000 + m.ctime_nsec()
}

/// Wait until the filesystem's timestamps have moved past `t_ns` (its clock is coarse: a
/// change in the same tick would leave ctime as it was, the racy case the guard exists for).
fn wait_for_fs_clock_after(scratch: &Path, t_ns: i64) {
    let probe = scratch.join("clock-probe");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        fs::write(&probe, b"tick").unwrap();
        if ctime_ns(&fs::metadata(&probe).unwrap()) > t_ns {
            return;
        }
        assert!(Instant::now() < deadline, "the filesystem clock did not advance");
        std::thread::yield_now();
    }
}

fn set_mtime(p: &Path, t: SystemTime) {
    fs::File::options().write(true).open(p).unwrap().set_modified(t).unwrap();
}

fn old_time() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000)
}

/// A tree of a few files, with mtimes far in the past.
fn tree(root: &Path) -> u64 {
    fs::create_dir_all(root.join("sub/deeper")).unwrap();
    let files: [(&str, Vec<u8>); 4] = [
        ("a.txt", vec![b'a'; 1000]),
        ("b.txt", vec![b'b'; 2000]),
        ("sub/c.txt", vec![b'c'; 3000]),
        ("sub/deeper/big", (0..2_000_000u32).map(|i| (i % 253) as u8).collect()),
    ];
    let mut total = 0;
    for (name, data) in files {
        let p = root.join(name);
        fs::write(&p, &data).unwrap();
        set_mtime(&p, old_time());
        total += data.len() as u64;
    }
    total
}

#[test]
fn fresh_files_are_read_again() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    let src = t.path().join("src");
    let total = tree(&src);
    let first = hash(&store, &src);
    assert_eq!((first.read, first.cached), (total, 0));
    // Just written (ctime is now): inside the racy window, so not trusted yet.
    let second = hash(&store, &src);
    assert_eq!((second.digest, second.read, second.cached), (first.digest, total, 0));
}

#[test]
fn warm_rehash_reads_nothing_and_survives_reopening() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("store");
    let src = t.path().join("src");
    let total = tree(&src);
    let want = hash_dir(&src);
    {
        let store = Store::open(&root).unwrap();
        assert_eq!(hash(&store, &src).read, total);
        assert_eq!(age_records(&store), 4);
        let warm = hash(&store, &src);
        assert_eq!((warm.digest, warm.read, warm.cached), (want, 0, total));
    }
    // A new Store (as a new process would): the records are on disk.
    let store = Store::open(&root).unwrap();
    let warm = hash(&store, &src);
    assert_eq!((warm.digest, warm.read, warm.cached), (want, 0, total));
    // The Hasher with a DbStatCache directly: same thing.
    let cache = DbStatCache::new(store.db().unwrap());
    let h = Hasher { cache: &cache, ..Hasher::default() }.hash_path(&src).unwrap();
    assert_eq!((h.digest, h.stats.bytes_read.load(Ordering::Relaxed)), (want, 0));
}

#[test]
fn changes_are_seen_through_a_warm_cache() {
    let t = tempfile::tempdir().unwrap();
    let scratch = t.path().join("scratch");
    fs::create_dir(&scratch).unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    let src = t.path().join("src");
    tree(&src);
    let d0 = hash(&store, &src).digest;
    age_records(&store);
    assert_eq!(hash(&store, &src).read, 0);

    // 1. Content changed, size kept, mtime put back: only ctime tells.
    let a = src.join("a.txt");
    let before = fs::metadata(&a).unwrap();
    wait_for_fs_clock_after(&scratch, ctime_ns(&before));
    fs::write(&a, vec![b'A'; 1000]).unwrap();
    set_mtime(&a, old_time());
    let after = fs::metadata(&a).unwrap();
    assert_eq!((after.len(), after.mtime(), after.mtime_nsec()), (before.len(), before.mtime(), before.mtime_nsec()));
    let r1 = hash(&store, &src);
    assert_eq!(r1.read, 1000, "only the changed file is read");
    assert_ne!(r1.digest, d0);
    assert_eq!(r1.digest, hash_dir(&src));

    // 2. Replaced by a rename (a new inode), same size and mtime.
    age_records(&store);
    let b = src.join("sub/c.txt");
    let new = scratch.join("c.new");
    fs::write(&new, vec![b'C'; 3000]).unwrap();
    set_mtime(&new, old_time());
    fs::rename(&new, &b).unwrap();
    let r2 = hash(&store, &src);
    assert_eq!(r2.read, 3000);
    assert_ne!(r2.digest, r1.digest);
    assert_eq!(r2.digest, hash_dir(&src));

    // 3. Only chmod +x: re-read, and the tree changes.
    age_records(&store);
    let big = src.join("sub/deeper/big");
    fs::set_permissions(&big, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let r3 = hash(&store, &src);
    assert_eq!(r3.read, 2_000_000);
    assert_ne!(r3.digest, r2.digest);
    assert_eq!(r3.digest, hash_dir(&src));

    // 4. A file added, one removed.
    age_records(&store);
    fs::write(src.join("sub/new"), b"new\n").unwrap();
    fs::remove_file(src.join("b.txt")).unwrap();
    let r4 = hash(&store, &src);
    assert_eq!(r4.read, 4);
    assert_eq!(r4.digest, hash_dir(&src));

    // And after all that, warm again reads nothing and agrees with an uncached hash.
    age_records(&store);
    let r5 = hash(&store, &src);
    assert_eq!((r5.digest, r5.read), (hash_dir(&src), 0));
}

#[test]
fn a_torn_record_is_just_a_miss() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    let src = t.path().join("src");
    let total = tree(&src);
    let d = hash(&store, &src).digest;
    let db = store.db().unwrap();
    let key = std::path::absolute(&src).unwrap();
    let key = std::os::unix::ffi::OsStrExt::as_bytes(key.as_os_str()).to_vec();
    let v = db.get_cf(db.cf(CF_STAT), &key).unwrap().expect("a record for the root folder");
    db.put_cf(db.cf(CF_STAT), &key, &v[..v.len() / 2]).unwrap();
    drop(db);
    age_records_tolerant(&store);
    let r = hash(&store, &src);
    assert_eq!(r.digest, d);
    // The root folder's two files are read again; the subfolders' records still hold.
    assert_eq!(r.read, 3000);
    assert!(r.read < total);
}

/// [`age_records`] that skips records it cannot decode.
fn age_records_tolerant(store: &Store) {
    let db = store.db().unwrap();
    let cf = db.cf(CF_STAT);
    let all: Vec<KeyValue> = db.iterator_cf(cf, rocksdb::IteratorMode::Start).map(|kv| kv.unwrap()).collect();
    for (k, v) in all {
        if let Some(mut rec) = DirRecord::decode(&v) {
            for f in &mut rec.files {
                f.hashed_at_ns = f.mtime_ns.max(f.ctime_ns) + RACY_WINDOW_NS + 1_000_000_000;
            }
            db.put_cf(cf, k, rec.encode()).unwrap();
        }
    }
}
