//! Damage in the store is found, quarantined and never served: corrupt blobs, truncated or
//! undecodable trees, garbage in the object folders, and results whose objects are gone.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use crate::common::*;
use kliko_core::Digest;
use kliko_store::{
    FsckOptions, IngestMode, MaterializeMode, ObjectKind, Store, StoreError, BLOBS_DIR, QUARANTINE_DIR, TREES_DIR,
};

fn setup() -> (tempfile::TempDir, Store, Digest) {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    let src = t.path().join("src");
    sample_tree(&src);
    fs::write(src.join("victim.txt"), b"the bytes that will rot\n").unwrap();
    let d = store.ingest(&src, IngestMode::Copy).unwrap().digest;
    (t, store, d)
}

fn fsck(store: &Store, repair: bool) -> kliko_store::FsckReport {
    store.fsck(&FsckOptions { repair, ..Default::default() }).unwrap()
}

fn quarantined(store: &Store) -> usize {
    fs::read_dir(store.root().join(QUARANTINE_DIR)).unwrap().count()
}

#[test]
fn a_clean_store_is_clean() {
    let (_t, store, _) = setup();
    let r = fsck(&store, false);
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.blobs as usize, blob_files(&store).len());
    assert_eq!(r.trees as usize, tree_files(&store).len());
}

#[test]
fn corrupt_blob_is_never_copied_out_and_is_quarantined() {
    let (t, store, d) = setup();
    let victim = Digest::of_bytes(b"the bytes that will rot\n");
    let blob = store.object_path(ObjectKind::Blob, &victim);
    corrupt_in_place(&blob);
    // Same size: the cheap presence check passes, so only verification on read can catch it.
    assert!(store.has_blob(&victim, 24));

    let out = t.path().join("out");
    let err = store.materialize(&d, &out, MaterializeMode::Copy).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { expected, .. } if expected == victim), "{err}");
    assert!(fs::symlink_metadata(out.join("victim.txt")).is_err(), "a corrupt copy was left behind");
    // The copy that found it set it aside at once: every result naming it is a miss now.
    assert!(!blob.exists(), "the corrupt blob is still in place");
    assert_eq!(quarantined(&store), 1);
    assert!(matches!(store.get_bytes(ObjectKind::Blob, &victim), Err(StoreError::Missing { .. })));
    let again = fsck(&store, false);
    assert!(again.is_clean() && again.corrupt.is_empty(), "{again:?}");
    // Now it is missing rather than corrupt, and ingesting the content again heals the store.
    let out2 = t.path().join("out2");
    assert!(matches!(store.materialize(&d, &out2, MaterializeMode::Copy), Err(StoreError::Missing { .. })));
    let heal = t.path().join("heal");
    fs::create_dir(&heal).unwrap();
    fs::write(heal.join("v"), b"the bytes that will rot\n").unwrap();
    store.ingest(&heal, IngestMode::Copy).unwrap();
    let out3 = t.path().join("out3");
    store.materialize(&d, &out3, MaterializeMode::Copy).unwrap();
    assert_eq!(hash_dir(&out3), d);
}

#[test]
fn result_with_a_missing_blob_is_a_miss_and_repair_deletes_it() {
    let (_t, store, d) = setup();
    let r = result_for(&store, d, "missing");
    let db = store.db().unwrap();
    store.put_result(&db, &r).unwrap();
    assert_eq!(store.lookup(&db, &r.key).unwrap().as_ref(), Some(&r));
    assert!(fsck(&store, false).is_clean());

    let victim = Digest::of_bytes(b"the bytes that will rot\n");
    fs::remove_file(store.object_path(ObjectKind::Blob, &victim)).unwrap();
    assert_eq!(store.lookup(&db, &r.key).unwrap(), None, "an incomplete result was served");
    assert!(!store.is_complete(&r));

    let report = fsck(&store, false);
    assert!(!report.is_clean());
    assert_eq!(report.results, 1);
    assert_eq!(report.incomplete_results.len(), 1, "{report:?}");
    assert!(report.incomplete_results[0].contains(&r.key.to_hex()));
    assert!(report.incomplete_results[0].contains(&victim.to_hex()));
    assert!(store.get_result(&db, &r.key).unwrap().is_some(), "fsck without --repair deleted a result");

    let repaired = fsck(&store, true);
    assert_eq!(repaired.removed_results, 1);
    assert!(repaired.is_clean());
    assert_eq!(store.get_result(&db, &r.key).unwrap(), None);
    let after = fsck(&store, false);
    assert!(after.is_clean() && after.results == 0, "{after:?}");
}

#[test]
fn result_with_a_missing_log_or_tree_is_a_miss() {
    let (_t, store, d) = setup();
    let db = store.db().unwrap();
    let r = result_for(&store, d, "log");
    store.put_result(&db, &r).unwrap();
    fs::remove_file(store.object_path(ObjectKind::Blob, &r.stdout)).unwrap();
    assert_eq!(store.lookup(&db, &r.key).unwrap(), None);

    // A result whose output tree's subtree is gone.
    let (_t2, store2, d2) = setup();
    let db2 = store2.db().unwrap();
    let r2 = result_for(&store2, d2, "tree");
    store2.put_result(&db2, &r2).unwrap();
    let sub = match store2.get_tree(&d2).unwrap().entries.get(&b"dup"[..]) {
        Some(kliko_core::tree::Entry::Dir { digest }) => *digest,
        other => panic!("unexpected {other:?}"),
    };
    fs::remove_file(store2.object_path(ObjectKind::Tree, &sub)).unwrap();
    assert_eq!(store2.lookup(&db2, &r2.key).unwrap(), None);
    assert_eq!(fsck(&store2, false).incomplete_results.len(), 1);
}

#[test]
fn corrupt_blob_of_a_result_is_quarantined_and_the_result_reported_in_one_pass() {
    let (_t, store, d) = setup();
    let db = store.db().unwrap();
    let r = result_for(&store, d, "corrupt");
    store.put_result(&db, &r).unwrap();
    corrupt_in_place(&store.object_path(ObjectKind::Blob, &Digest::of_bytes(b"the bytes that will rot\n")));
    let report = fsck(&store, false);
    assert_eq!(report.corrupt.len(), 1, "{report:?}");
    assert_eq!(report.incomplete_results.len(), 1, "{report:?}");
    assert_eq!(store.lookup(&db, &r.key).unwrap(), None);
}

fn first_subtree(store: &Store, d: &Digest) -> Digest {
    store
        .get_tree(d)
        .unwrap()
        .entries
        .values()
        .find_map(|e| match e {
            kliko_core::tree::Entry::Dir { digest } if *digest != kliko_core::tree::Tree::new().digest() => {
                Some(*digest)
            }
            _ => None,
        })
        .unwrap()
}

#[test]
fn truncated_tree_is_reported_and_not_materialized() {
    let (t, store, d) = setup();
    let sub = first_subtree(&store, &d);
    let path = store.object_path(ObjectKind::Tree, &sub);
    let bytes = fs::read(&path).unwrap();
    fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();

    let err = store.materialize(&d, &t.path().join("out"), MaterializeMode::Copy).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { expected, .. } if expected == sub), "{err}");
    let r = fsck(&store, false);
    assert_eq!(r.corrupt.len(), 1, "{r:?}");
    assert!(r.corrupt[0].contains(TREES_DIR) && r.corrupt[0].contains(&sub.to_hex()), "{r:?}");
    assert!(!path.exists());
    assert!(fsck(&store, false).is_clean());
}

#[test]
fn undecodable_tree_with_a_matching_name_is_reported() {
    let (_t, store, _) = setup();
    // Named by its own digest, so only decoding can tell it is not a tree.
    let bogus = store.put_bytes(ObjectKind::Tree, b"not a tree at all").unwrap();
    assert!(matches!(store.get_tree(&bogus), Err(StoreError::BadTree { .. })));
    let r = fsck(&store, false);
    assert_eq!(r.corrupt.len(), 1, "{r:?}");
    assert!(r.corrupt[0].contains(&bogus.to_hex()));
}

fn stray_names(r: &kliko_store::FsckReport) -> Vec<String> {
    r.stray.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect()
}

#[test]
fn garbage_in_the_object_folders_is_reported() {
    let (_t, store, _) = setup();
    let blobs = store.root().join(BLOBS_DIR);
    let shard = fs::read_dir(&blobs).unwrap().next().unwrap().unwrap().path();
    // Not named like an object, inside a shard.
    fs::write(shard.join("garbage"), b"junk").unwrap();
    // Named like an object, with other content.
    let fake = Digest::of_bytes(b"what the name promises");
    let fake_path = store.object_path(ObjectKind::Blob, &fake);
    fs::create_dir_all(fake_path.parent().unwrap()).unwrap();
    fs::write(&fake_path, b"something else").unwrap();
    let r = fsck(&store, false);
    assert!(!r.is_clean());
    assert_eq!(stray_names(&r), vec!["garbage".to_string()], "{r:?}");
    assert_eq!(r.corrupt.len(), 1, "{r:?}");
    assert!(r.corrupt[0].contains(&fake.to_hex()));
    // Stray files are reported, not deleted: they may be someone's.
    assert!(shard.join("garbage").exists());
}

#[test]
fn garbage_beside_the_shards_is_reported() {
    let (_t, store, _) = setup();
    let blobs = store.root().join(BLOBS_DIR);
    fs::write(blobs.join("README"), b"junk at the top").unwrap();
    fs::write(store.root().join(TREES_DIR).join("junk"), b"").unwrap();
    let r = fsck(&store, false);
    assert!(!r.is_clean(), "{r:?}");
    let mut names = stray_names(&r);
    names.sort();
    assert_eq!(names, vec!["README".to_string(), "junk".to_string()]);
}

#[test]
fn non_files_in_the_object_folders_are_reported_not_fatal() {
    let (_t, store, _) = setup();
    let blobs = store.root().join(BLOBS_DIR);
    let shard = fs::read_dir(&blobs).unwrap().next().unwrap().unwrap().path();
    fs::create_dir(shard.join("a-folder")).unwrap();
    // A symlink named like an object would hand out whatever it points to.
    let d = Digest::of_bytes(b"linked");
    let p = store.object_path(ObjectKind::Blob, &d);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    let target = store.root().join("elsewhere");
    fs::write(&target, b"linked").unwrap();
    symlink(&target, &p).unwrap();
    let r = fsck(&store, false);
    assert!(!r.is_clean(), "{r:?}");
    let mut names = stray_names(&r);
    names.sort();
    let mut want = vec!["a-folder".to_string(), p.file_name().unwrap().to_string_lossy().into_owned()];
    want.sort();
    assert_eq!(names, want);
}

#[test]
fn leftover_temporary_files_are_harmless() {
    let (_t, store, _) = setup();
    // A loose file in `tmp/` (outside the per-process folders: from an older kliko).
    let loose = store.root().join(kliko_store::TMP_DIR).join(".c-interrupted");
    fs::write(&loose, b"half a bl").unwrap();
    let r = fsck(&store, true);
    assert!(r.is_clean());
    assert_eq!(r.temp_files, 1);
    // Younger than an hour: kept (another process may be writing it).
    assert_eq!(r.removed_temp_files, 0);
    assert!(Path::new(&loose).exists());
}
