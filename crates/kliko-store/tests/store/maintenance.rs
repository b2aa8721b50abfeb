//! The store's maintenance side under stress: fsck while gc deletes, gc on a full disk,
//! fsck of the cached image files, `--repair` of stray files, and the litter of processes
//! that died (their `tmp/` folders).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::common::*;
use kliko_core::Digest;
use kliko_store::{
    FsckOptions, GcOptions, IngestMode, ObjectKind, Store, BLOBS_DIR, IMAGES_DIR, QUARANTINE_DIR, TMP_DIR,
};

fn write_files(dir: &Path, n: usize, seed: &str) {
    fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        fs::write(dir.join(format!("f{i}")), format!("{seed} file {i}\n").repeat(1 + i % 7)).unwrap();
    }
}

fn record(store: &Store, output: Digest, salt: &str) -> kliko_store::records::ActionResult {
    let r = result_for(store, output, salt);
    let db = store.db().unwrap();
    store.put_result(&db, &r).unwrap();
    r
}

#[test]
fn fsck_while_gc_deletes_objects_reports_no_damage_and_still_finds_a_missing_blob() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("store");
    let (checker, collector) = (Store::open(&root).unwrap(), Store::open(&root).unwrap());
    // A result whose objects gc must keep, and fsck must find intact, every time.
    let src = t.path().join("kept");
    sample_tree(&src);
    let kept = checker.ingest(&src, IngestMode::Copy).unwrap().digest;
    let r = record(&checker, kept, "kept");

    let opts = GcOptions { grace_ms: 0, ..Default::default() };
    let (mut vanished, mut overlapped) = (0, 0);
    for round in 0..4 {
        // Objects no result names, which the gc below deletes while fsck reads them.
        let garbage = t.path().join(format!("garbage-{round}"));
        write_files(&garbage.join("small"), 600, &format!("round {round}"));
        for i in 0..8 {
            fs::write(garbage.join(format!("big{i}")), format!("round {round} big {i}\n").repeat(200_000)).unwrap();
        }
        let stored = collector.ingest(&garbage, IngestMode::Copy).unwrap();
        // gc sweeps in directory order: the first garbage blob in that order goes first.
        let first = walkdir::WalkDir::new(root.join(BLOBS_DIR))
            .min_depth(2)
            .into_iter()
            .flatten()
            .map(|e| e.into_path())
            .find(|p| stored.file_digests.iter().any(|d| checker.object_path(ObjectKind::Blob, d) == *p))
            .unwrap();
        std::thread::scope(|s| {
            let gc = s.spawn(|| collector.gc(&opts).unwrap());
            // Start fsck once gc has begun deleting (or is done): the event, not a delay.
            while first.exists() && !gc.is_finished() {
                std::thread::yield_now();
            }
            let report = checker.fsck(&FsckOptions::default()).unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert!(report.is_clean(), "round {round}: {report:?}");
            assert!(report.incomplete_results.is_empty(), "round {round}: {report:?}");
            vanished += report.vanished;
            overlapped += u64::from(report.vanished > 0);
            assert!(gc.join().unwrap().objects_deleted > 0);
        });
    }
    eprintln!("fsck overlapped gc's deletions in {overlapped} of 4 rounds; {vanished} objects vanished under it");
    // Without an overlap this test would prove nothing.
    assert!(overlapped > 0, "fsck never ran while gc deleted");

    // A result's blob really missing is still reported.
    let victim = Digest::of_bytes(b"latin-1 name\n");
    fs::remove_file(checker.object_path(ObjectKind::Blob, &victim)).unwrap();
    let report = checker.fsck(&FsckOptions::default()).unwrap();
    assert!(!report.is_clean());
    assert_eq!(report.incomplete_results.len(), 1, "{report:?}");
    assert!(report.incomplete_results[0].contains(&victim.to_hex()), "{report:?}");
    assert!(report.incomplete_results[0].starts_with(&r.key.to_hex()), "{report:?}");
}

fn check_yml(path: &str, bytes: &[u8]) -> Result<(), String> {
    if path == "/kliko.yml" && !bytes.starts_with(b"schema_version:") {
        return Err("not a kliko.yml".into());
    }
    Ok(())
}

#[test]
fn fsck_checks_the_cached_image_files_and_repair_quarantines_the_bad_ones() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    let id = |n: u8| format!("sha256:{}", format!("{n:02x}").repeat(32));
    store.put_image_file(&id(1), "/kliko.yml", b"schema_version: 3\nio: join\nsections: []\n").unwrap();
    store.put_image_file(&id(2), "/kliko.yml", b"\x00\x01 not yaml at all").unwrap();
    let images = store.root().join(IMAGES_DIR);
    fs::write(images.join("left-by-someone"), b"?").unwrap();
    let opts = |repair| FsckOptions { repair, check_image_file: Some(check_yml) };

    let r = store.fsck(&opts(false)).unwrap();
    assert!(!r.is_clean());
    assert_eq!(r.image_files, 3);
    let mut bad = r.bad_image_files.clone();
    bad.sort();
    assert_eq!(bad.len(), 2, "{r:?}");
    assert!(bad[0].contains(&"02".repeat(32)) && bad[0].ends_with("not a kliko.yml"), "{bad:?}");
    assert!(bad[1].contains("left-by-someone") && bad[1].contains("not named"), "{bad:?}");
    // Without a content check, only the name is wrong.
    let r = store.fsck(&FsckOptions::default()).unwrap();
    assert_eq!(r.bad_image_files.len(), 1, "{r:?}");

    let r = store.fsck(&opts(true)).unwrap();
    assert_eq!(r.removed_image_files, 2, "{r:?}");
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(fs::read_dir(store.root().join(QUARANTINE_DIR)).unwrap().count(), 2);
    assert!(store.image_file(&id(2), "/kliko.yml").unwrap().is_none(), "read from the image again next time");
    assert!(store.image_file(&id(1), "/kliko.yml").unwrap().is_some());
    let r = store.fsck(&opts(false)).unwrap();
    assert!(r.is_clean() && r.bad_image_files.is_empty(), "{r:?}");
}

#[test]
fn repair_moves_what_it_reports_as_stray_to_quarantine() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    let src = t.path().join("src");
    sample_tree(&src);
    store.ingest(&src, IngestMode::Copy).unwrap();
    let blobs = store.root().join(BLOBS_DIR);
    let shard = fs::read_dir(&blobs).unwrap().next().unwrap().unwrap().path();
    fs::write(shard.join("garbage"), b"junk").unwrap();
    fs::create_dir(shard.join("a-folder")).unwrap();
    fs::write(blobs.join("README"), b"junk at the top").unwrap();

    let r = store.fsck(&FsckOptions { repair: true, ..Default::default() }).unwrap();
    assert_eq!(r.stray.len(), 3, "{r:?}");
    assert_eq!(r.removed_stray, 3, "{r:?}");
    assert!(r.is_clean(), "{r:?}");
    assert!(!shard.join("garbage").exists() && !shard.join("a-folder").exists() && !blobs.join("README").exists());
    assert_eq!(fs::read_dir(store.root().join(QUARANTINE_DIR)).unwrap().count(), 3);
    let r = store.fsck(&FsckOptions::default()).unwrap();
    assert!(r.is_clean() && r.stray.is_empty(), "{r:?}");
}

#[test]
fn temporary_files_live_in_a_folder_of_their_own_removed_once_their_owner_is_gone() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("store");
    let store = Store::open(&root).unwrap();
    let mine = store.tmp_dir();
    assert_eq!(mine.parent().unwrap(), root.join(TMP_DIR));
    fs::write(mine.join(".c-in-progress"), b"half a blob").unwrap();
    // Another handle (another process) opening the store, or gc, leaves a live owner's files.
    let other = Store::open(&root).unwrap();
    other.gc(&GcOptions { grace_ms: 0, ..Default::default() }).unwrap_or_else(|e| panic!("{e}"));
    assert!(mine.join(".c-in-progress").exists());
    let r = other.fsck(&FsckOptions { repair: true, ..Default::default() }).unwrap();
    assert_eq!(r.temp_files, 0, "a live owner's folder is not litter: {r:?}");
    assert!(mine.join(".c-in-progress").exists());
    // Dropping the handle removes its folder.
    drop(store);
    assert!(!mine.exists());
    drop(other);
    assert_eq!(fs::read_dir(root.join(TMP_DIR)).unwrap().count(), 0);
}

#[test]
fn gc_removes_a_run_folder_whose_owner_was_killed_while_naming_its_lock() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    // What a run killed between creating `.kliko-lock.new` and renaming it leaves: the
    // folder's name says whose it was (a pid that cannot exist, on this host).
    let host = kliko_core::Digest::of_bytes(kliko_core::process::host_name().as_bytes()).to_hex()[..8].to_string();
    let dead = store.root().join("scratch").join(format!("run-o4194304.5.{host}-abc"));
    fs::create_dir_all(&dead).unwrap();
    fs::write(dead.join(".kliko-lock.new"), b"").unwrap();
    fs::write(dead.join("parameters.json"), b"{}").unwrap();
    // A live run's folder beside it stays.
    let live = store.run_folder("run-").unwrap();
    store.gc(&GcOptions { grace_ms: 0, ..Default::default() }).unwrap_or_else(|e| panic!("{e}"));
    assert!(!dead.exists(), "the dead run's folder is litter");
    assert!(live.path().exists());
}

/// A tmpfs mounted for one test, unmounted (lazily) when dropped, even if the test fails.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        fs::create_dir_all(dir).unwrap();
        let c = |s: &str| std::ffi::CString::new(s).unwrap();
        let target = c(dir.to_str().unwrap());
        let opts = c(&format!("size={size}"));
        // SAFETY: valid NUL-terminated strings that outlive the call.
        let rc =
            unsafe { libc::mount(c("tmpfs").as_ptr(), target.as_ptr(), c("tmpfs").as_ptr(), 0, opts.as_ptr().cast()) };
        (rc == 0).then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(self.0.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

fn free_bytes(p: &Path) -> u64 {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: zeroed statvfs is a valid out-parameter; the path is NUL-terminated.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    s.f_bavail as u64 * s.f_frsize as u64
}

/// Fill the filesystem holding `dir` until a write fails for lack of space.
fn fill(dir: &Path) {
    let mut f = fs::File::create(dir.join("filler")).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("{e}"),
        }
    }
    // Byte by byte, the last partial page.
    while f.write(&[0]).is_ok_and(|n| n == 1) {}
}

#[test]
fn gc_frees_space_on_a_full_disk() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(&t.path().join("disk"), "16m") else {
        panic!("cannot mount a tmpfs at {}: {}", t.path().display(), std::io::Error::last_os_error());
    };
    let root = disk.0.join("store");
    let store = Store::open(&root).unwrap();
    // Two results of about 2 MiB each: one in the index, one still in the journal.
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    for (dir, seed) in [(&a, "a"), (&b, "b")] {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("big"), seed.repeat(2 << 20)).unwrap();
        write_files(&dir.join("small"), 20, seed);
    }
    let out_a = store.ingest(&a, IngestMode::Copy).unwrap().digest;
    record(&store, out_a, "a");
    let out_b = store.ingest(&b, IngestMode::Copy).unwrap().digest;
    let rb = result_for(&store, out_b, "b");
    store.journal_result(&rb, None).unwrap();
    // No litter to free first: only gc's own work can make room.
    drop(store);

    fill(&disk.0);
    assert!(free_bytes(&disk.0) < 4096, "{} bytes free", free_bytes(&disk.0));
    let store = Store::open(&root).unwrap();
    // The index cannot be opened for writing: this is the state a user is in.
    let e = store.db().err().expect("the index opened on a full disk: this test proves nothing");
    assert!(format!("{e:?}").contains("No space left"), "{e:?}");

    let r = store
        .gc(&GcOptions { max_bytes: Some(0), grace_ms: 0, ..Default::default() })
        .unwrap_or_else(|e| panic!("gc on a full disk: {e}: {:?}", std::error::Error::source(&e)));
    eprintln!("{r:?}");
    assert!(r.bytes_deleted >= 4 << 20, "{r:?}");
    assert_eq!((r.bytes_before, r.bytes_after), (r.bytes_deleted, 0), "{r:?}");
    assert_eq!(r.evicted.len(), 2, "{r:?}");
    assert!(free_bytes(&disk.0) >= 4 << 20, "{} bytes free after gc", free_bytes(&disk.0));
    assert!(!r.index_not_updated, "{r:?}");
    // Both results are gone from the index (the journaled one was imported, then evicted),
    // and nothing is left pointing at deleted objects.
    let db = store.db().unwrap();
    assert!(store.results(&db).unwrap().is_empty());
    drop(db);
    let f = store.fsck(&FsckOptions::default()).unwrap();
    assert!(f.is_clean() && f.incomplete_results.is_empty() && f.blobs == 0, "{f:?}");
    drop(store);
    drop(disk);
}

#[test]
fn resolving_a_prefix_never_panics_on_odd_input_or_a_damaged_index() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    let src = t.path().join("src");
    sample_tree(&src);
    let out = store.ingest(&src, IngestMode::Copy).unwrap().digest;
    let r = record(&store, out, "x");
    let db = store.db().unwrap();
    // Keys of the wrong length, as a damaged index (or another version) could hold.
    db.put_cf(db.cf(kliko_store::db::CF_ACTIONS), b"a", b"{}").unwrap();
    db.put_cf(db.cf(kliko_store::db::CF_PROV), b"ab", b"").unwrap();
    for odd in ["aé", "é", "a", "6", "61", "zz", ""] {
        let _ = store.resolve_prefix(&db, odd).unwrap();
    }
    let found = store.resolve_prefix(&db, &r.key.to_hex()[..10]).unwrap();
    assert_eq!(found, vec![(r.key, "key")]);
}

#[test]
fn a_store_on_a_read_only_filesystem_serves_hits_and_refuses_changes_clearly() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(&t.path().join("snapshot"), "16m") else {
        panic!("cannot mount a tmpfs at {}: {}", t.path().display(), std::io::Error::last_os_error());
    };
    let root = disk.0.join("store");
    let (key, tree) = {
        let store = Store::open(&root).unwrap();
        let src = disk.0.join("src");
        sample_tree(&src);
        let tree = store.ingest(&src, IngestMode::Copy).unwrap().digest;
        let r = result_for(&store, tree, "snapshot");
        store.journal_result(&r, None).unwrap();
        let db = store.db().unwrap();
        store.set_pin(&db, &r.key, true).unwrap();
        (r.key, tree)
    };
    let target = std::ffi::CString::new(disk.0.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path; remounting the tmpfs read-only.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "remount read-only: {}", std::io::Error::last_os_error());

    let store = Store::open(&root).unwrap();
    assert!(store.is_read_only());
    // Hits and provenance: lookup, placement (by copy: the store's filesystem cannot take a link).
    let db = store.db().unwrap();
    assert!(db.is_read_only());
    assert_eq!(store.lookup(&db, &key).unwrap().map(|r| r.output), Some(tree));
    assert!(store.is_pinned(&db, &key).unwrap());
    assert!(!store.provenance_of(&db, &tree).unwrap().is_empty());
    let out = t.path().join("out");
    store.materialize(&tree, &out, kliko_store::MaterializeMode::Auto).unwrap();
    assert_eq!(hash_dir(&out), tree);
    // What would change it says so.
    for e in [
        store.set_pin(&db, &key, false).unwrap_err(),
        store.gc(&GcOptions { max_bytes: Some(0), ..Default::default() }).unwrap_err(),
        store.repair_index().unwrap_err(),
    ] {
        assert!(matches!(e, kliko_store::StoreError::ReadOnly { .. }), "{e}");
        assert!(e.to_string().contains("read-only"), "{e}");
    }
}
