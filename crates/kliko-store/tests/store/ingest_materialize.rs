//! Ingest then materialize: the tree comes back bit for bit (by digest), the store holds each
//! content once, read-only, and placement never hands out a writable path to a stored blob.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::common::*;
use kliko_core::hash::is_executable;
use kliko_core::Digest;
use kliko_store::{IngestMode, MaterializeMode, ObjectKind, Store, StoreError};

const MODES: [MaterializeMode; 3] = [MaterializeMode::Link, MaterializeMode::Copy, MaterializeMode::Auto];

fn setup() -> (tempfile::TempDir, Store) {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    (t, store)
}

/// Regular files under `root` with their metadata.
fn regular_files(root: &Path) -> Vec<(std::path::PathBuf, fs::Metadata)> {
    walk(root).into_iter().filter(|(_, m)| m.is_file()).collect()
}

#[test]
fn round_trip_in_every_mode() {
    let (t, store) = setup();
    let src = t.path().join("src");
    sample_tree(&src);
    let want = hash_dir(&src);
    let ing = store.ingest(&src, IngestMode::Copy).unwrap();
    assert!(ing.is_dir);
    assert_eq!(ing.digest, want);
    // Copy mode leaves the source alone.
    assert_eq!(hash_dir(&src), want);
    for mode in MODES {
        let out = t.path().join(format!("out-{mode:?}"));
        store.materialize(&want, &out, mode).unwrap();
        assert_eq!(hash_dir(&out), want, "{mode:?} materialized a different tree");
        // Spot checks the digest already implies, spelled out for a reader of a failure.
        assert!(fs::read_link(out.join("dangling")).is_ok());
        assert!(fs::read_dir(out.join("nested/deeper/empty-too")).unwrap().next().is_none());
        assert!(is_executable(&fs::metadata(out.join("run.sh")).unwrap()));
        assert!(!is_executable(&fs::metadata(out.join("a.txt")).unwrap()));
    }
    // An existing empty folder is an acceptable destination too.
    let empty = t.path().join("empty-dest");
    fs::create_dir(&empty).unwrap();
    store.materialize(&want, &empty, MaterializeMode::Copy).unwrap();
    assert_eq!(hash_dir(&empty), want);
}

#[test]
fn identical_contents_are_stored_once() {
    let (t, store) = setup();
    let src = t.path().join("src");
    let contents = sample_tree(&src);
    let ing = store.ingest(&src, IngestMode::Copy).unwrap();
    let blobs: BTreeSet<Digest> = blob_files(&store)
        .iter()
        .map(|p| {
            let shard = p.parent().unwrap().file_name().unwrap().to_str().unwrap();
            format!("{shard}{}", p.file_name().unwrap().to_str().unwrap()).parse().unwrap()
        })
        .collect();
    assert_eq!(blobs, contents, "one blob per distinct content");
    assert_eq!(ing.file_digests.iter().copied().collect::<BTreeSet<_>>(), contents);
    assert_eq!(ing.files, regular_files(&src).len() as u64);
    let trees = tree_files(&store).len() as u64;
    assert_eq!(ing.new_objects, contents.len() as u64 + trees);
    // A second source with the same contents adds nothing but nothing is lost either.
    let src2 = t.path().join("src2");
    sample_tree(&src2);
    let again = store.ingest(&src2, IngestMode::Copy).unwrap();
    assert_eq!(again.digest, ing.digest);
    assert_eq!((again.new_objects, again.new_bytes), (0, 0));
    assert_eq!(blob_files(&store).len(), contents.len());
}

#[test]
fn move_mode_renames_source_files_into_the_store() {
    let (t, store) = setup();
    let src = t.path().join("src");
    sample_tree(&src);
    let want = hash_dir(&src);
    // Which inodes hold which content, before the move.
    let mut inodes: BTreeMap<Digest, BTreeSet<u64>> = BTreeMap::new();
    for (p, m) in regular_files(&src) {
        inodes.entry(Digest::of_bytes(&fs::read(&p).unwrap())).or_default().insert(m.ino());
    }
    let files_before = regular_files(&src).len();
    let ing = store.ingest(&src, IngestMode::Move).unwrap();
    assert_eq!(ing.digest, want);
    for (d, inos) in &inodes {
        let blob = fs::metadata(store.object_path(ObjectKind::Blob, d)).unwrap();
        assert!(inos.contains(&blob.ino()), "blob {d} was copied, not renamed from the source");
        assert_eq!(blob.mode() & 0o7777, 0o444);
    }
    // Exactly one source file per distinct content left the tree.
    assert_eq!(regular_files(&src).len(), files_before - inodes.len());
    let out = t.path().join("out");
    store.materialize(&want, &out, MaterializeMode::Copy).unwrap();
    assert_eq!(hash_dir(&out), want);
}

#[test]
fn stored_objects_are_read_only() {
    let (t, store) = setup();
    let src = t.path().join("src");
    sample_tree(&src);
    store.ingest(&src, IngestMode::Copy).unwrap();
    let src2 = t.path().join("src2");
    sample_tree(&src2);
    fs::write(src2.join("moved-in"), b"moved\n").unwrap();
    store.ingest(&src2, IngestMode::Move).unwrap();
    store.put_bytes(ObjectKind::Blob, b"a log\n").unwrap();
    let objects: Vec<_> = blob_files(&store).into_iter().chain(tree_files(&store)).collect();
    assert!(objects.len() > 10);
    for p in objects {
        let m = fs::symlink_metadata(&p).unwrap();
        assert!(m.is_file(), "{} is not a regular file", p.display());
        assert_eq!(m.mode() & 0o7777, 0o444, "{} is not read-only", p.display());
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn link_mode_links_only_non_executable_files() {
    let (t, store) = setup();
    let src = t.path().join("src");
    sample_tree(&src);
    let d = store.ingest(&src, IngestMode::Copy).unwrap().digest;
    let out = t.path().join("out");
    // Root never gets links it could write through (see the next test); a tree only ever
    // mounted read-only into a container does.
    let mode = if is_root() { MaterializeMode::ReadOnlyMount } else { MaterializeMode::Link };
    store.materialize(&d, &out, mode).unwrap();
    let mut linked = 0;
    for (p, m) in regular_files(&out) {
        let digest = Digest::of_bytes(&fs::read(&p).unwrap());
        let blob = fs::metadata(store.object_path(ObjectKind::Blob, &digest)).unwrap();
        if is_executable(&m) {
            assert_ne!(m.ino(), blob.ino(), "executable {} is a link to a blob", p.display());
            assert_eq!(m.nlink(), 1);
            assert_eq!(m.mode() & 0o777, 0o755);
        } else {
            assert_eq!(m.ino(), blob.ino(), "{} is not a link to its blob", p.display());
            assert_eq!(m.mode() & 0o7777, 0o444);
            linked += 1;
        }
    }
    assert!(linked >= 5);
    // `hello-exec` shares its blob with the linked `a.txt` but must still be a copy.
    let exec = fs::metadata(out.join("hello-exec")).unwrap();
    assert_ne!(exec.ino(), fs::metadata(out.join("a.txt")).unwrap().ino());
}

/// Every regular file is a writable file of its own, and no blob gained a link.
fn assert_private_copies(store: &Store, out: &Path) {
    for (p, m) in regular_files(out) {
        assert_eq!(m.nlink(), 1, "{} shares its inode", p.display());
        assert_ne!(m.mode() & 0o200, 0, "{} is not writable", p.display());
    }
    for b in blob_files(store) {
        assert_eq!(fs::metadata(&b).unwrap().nlink(), 1, "blob {} gained a link", b.display());
    }
}

#[test]
fn copy_mode_gives_writable_private_files_even_though_the_blobs_exist() {
    let (t, store) = setup();
    let src = t.path().join("src");
    sample_tree(&src);
    let d = store.ingest(&src, IngestMode::Copy).unwrap().digest;
    let out = t.path().join("out");
    store.materialize(&d, &out, MaterializeMode::Copy).unwrap();
    assert_private_copies(&store, &out);
    // Writing to the copy leaves the store intact.
    fs::write(out.join("a.txt"), b"edited\n").unwrap();
    fs::write(out.join("big.bin"), b"edited\n").unwrap();
    let report = store.fsck(&Default::default()).unwrap();
    assert!(report.is_clean() && report.corrupt.is_empty(), "{report:?}");
    let again = t.path().join("again");
    store.materialize(&d, &again, MaterializeMode::Copy).unwrap();
    assert_eq!(hash_dir(&again), d);
}

#[test]
fn auto_mode_never_hands_out_a_stored_blob_to_root() {
    let (t, store) = setup();
    let src = t.path().join("src");
    sample_tree(&src);
    let d = store.ingest(&src, IngestMode::Copy).unwrap().digest;
    let out = t.path().join("out");
    store.materialize(&d, &out, MaterializeMode::Auto).unwrap();
    assert_eq!(hash_dir(&out), d);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // Root can write through a 0444 link, so Auto must copy.
        assert_private_copies(&store, &out);
    } else {
        // Same filesystem, not root: links are safe and instant.
        let a = fs::metadata(out.join("a.txt")).unwrap();
        assert!(a.nlink() > 1);
    }
}

#[test]
fn materialize_refuses_a_non_empty_destination() {
    let (t, store) = setup();
    let src = t.path().join("src");
    sample_tree(&src);
    let d = store.ingest(&src, IngestMode::Copy).unwrap().digest;
    let dest = t.path().join("dest");
    fs::create_dir(&dest).unwrap();
    fs::write(dest.join("precious"), b"mine\n").unwrap();
    for mode in MODES {
        let err = store.materialize(&d, &dest, mode).unwrap_err();
        assert!(matches!(err, StoreError::NotEmpty { .. }), "{err}");
    }
    let left: Vec<_> = fs::read_dir(&dest).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("precious")]);
    assert_eq!(fs::read(dest.join("precious")).unwrap(), b"mine\n");
    // A hidden file counts too.
    let hidden = t.path().join("hidden");
    fs::create_dir(&hidden).unwrap();
    fs::write(hidden.join(".x"), b"").unwrap();
    assert!(matches!(store.materialize(&d, &hidden, MaterializeMode::Copy), Err(StoreError::NotEmpty { .. })));
}

#[test]
fn single_file_ingest_and_unknown_tree() {
    let (t, store) = setup();
    let f = t.path().join("one");
    fs::write(&f, b"just a file\n").unwrap();
    let ing = store.ingest(&f, IngestMode::Copy).unwrap();
    assert!(!ing.is_dir);
    assert_eq!(ing.digest, Digest::of_bytes(b"just a file\n"));
    assert_eq!(store.get_bytes(ObjectKind::Blob, &ing.digest).unwrap(), b"just a file\n");
    let missing = Digest::of_bytes(b"never stored");
    let err = store.materialize(&missing, &t.path().join("out"), MaterializeMode::Copy).unwrap_err();
    assert!(matches!(err, StoreError::Missing { digest } if digest == missing), "{err}");
}

#[test]
fn link_mode_gives_root_private_copies() {
    let (t, store) = setup();
    let src = t.path().join("src");
    sample_tree(&src);
    let d = store.ingest(&src, IngestMode::Copy).unwrap().digest;
    let out = t.path().join("out");
    store.materialize(&d, &out, MaterializeMode::Link).unwrap();
    assert_eq!(hash_dir(&out), d);
    if is_root() {
        // Root could write through a read-only link into the store and poison later hits.
        assert_private_copies(&store, &out);
    } else {
        assert!(regular_files(&out).iter().any(|(_, m)| m.nlink() > 1));
    }
}

/// Store a tree with one distinctive file, link it out once (the blob is verified and its mark
/// remembered), then change that blob's bytes the way a careless user could (chmod, write the
/// same number of bytes, chmod back; optionally even putting its modification time back).
fn linked_then_edited(restore_mtime: bool) -> (tempfile::TempDir, Store, Digest, Digest) {
    let (t, store) = setup();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("result.txt"), b"flux 1.25 Jy\n").unwrap();
    fs::write(src.join("other.txt"), b"beam 3 arcsec\n").unwrap();
    let tree = store.ingest(&src, IngestMode::Copy).unwrap().digest;
    let first = t.path().join("first");
    store.materialize(&tree, &first, MaterializeMode::ReadOnlyMount).unwrap();
    let blob_digest = Digest::of_bytes(b"flux 1.25 Jy\n");
    let blob = store.object_path(ObjectKind::Blob, &blob_digest);
    let before = fs::metadata(&blob).unwrap().modified().unwrap();
    fs::set_permissions(&blob, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    fs::write(&blob, b"flux 9.99 Jy\n").unwrap();
    if restore_mtime {
        fs::File::options().write(true).open(&blob).unwrap().set_modified(before).unwrap();
    }
    fs::set_permissions(&blob, std::os::unix::fs::PermissionsExt::from_mode(0o444)).unwrap();
    assert_eq!(fs::metadata(&blob).unwrap().len(), 13, "the edit keeps the size");
    (t, store, tree, blob_digest)
}

#[test]
fn a_blob_edited_after_it_was_linked_is_never_linked_again() {
    for restore_mtime in [false, true] {
        let (t, store, tree, blob) = linked_then_edited(restore_mtime);
        let out = t.path().join("second");
        match store.materialize(&tree, &out, MaterializeMode::ReadOnlyMount) {
            Err(StoreError::Corrupt { expected, .. }) => assert_eq!(expected, blob),
            other => panic!("materialized a corrupt blob (mtime restored: {restore_mtime}): {other:?}"),
        }
        // Nothing with the edited bytes was placed, and the blob is out of the way, so every
        // result that names it is incomplete (a miss) from now on.
        for (p, _) in regular_files(&out) {
            assert_ne!(fs::read(&p).unwrap(), b"flux 9.99 Jy\n", "{} holds the edited bytes", p.display());
        }
        assert!(!store.has_blob(&blob, 13), "the corrupt blob is still in place");
        let quarantined = fs::read_dir(store.root().join("quarantine")).unwrap().count();
        assert_eq!(quarantined, 1);
    }
}

#[test]
fn a_verified_copy_of_an_edited_blob_fails_and_sets_it_aside() {
    let (t, store, tree, blob) = linked_then_edited(false);
    let out = t.path().join("copy");
    assert!(matches!(store.materialize(&tree, &out, MaterializeMode::Copy), Err(StoreError::Corrupt { .. })));
    assert!(!store.has_blob(&blob, 13));
}

#[test]
fn marks_known_from_ingest_catch_an_edit_too() {
    let (t, store) = setup();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a.txt"), b"one\n").unwrap();
    let ing = store.ingest(&src, IngestMode::Copy).unwrap();
    assert_eq!(ing.new_blobs.len(), 1);
    let known = store.marks_of(&ing.new_blobs);
    // Unchanged: placed without the index.
    store.materialize_known(&ing.digest, &t.path().join("ok"), MaterializeMode::ReadOnlyMount, &known).unwrap();
    assert_eq!(hash_dir(&t.path().join("ok")), ing.digest);
    corrupt_in_place(&store.object_path(ObjectKind::Blob, &ing.new_blobs[0]));
    let bad = store.materialize_known(&ing.digest, &t.path().join("bad"), MaterializeMode::ReadOnlyMount, &known);
    assert!(matches!(bad, Err(StoreError::Corrupt { .. })), "{bad:?}");
}

#[test]
fn a_copy_of_a_blob_known_unchanged_is_not_hashed_again() {
    let (t, store) = setup();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a.txt"), b"visibilities\n").unwrap();
    let ing = store.ingest(&src, IngestMode::Copy).unwrap();
    let d = ing.new_blobs[0];
    // Copies verify a blob whose mark is not known, and then know it: the next copy is a
    // plain (kernel) copy, as a link would be.
    store.materialize(&ing.digest, &t.path().join("one"), MaterializeMode::Copy).unwrap();
    store.materialize(&ing.digest, &t.path().join("two"), MaterializeMode::Copy).unwrap();
    assert_eq!(fs::read(t.path().join("two/a.txt")).unwrap(), b"visibilities\n");
    assert_private_copies(&store, &t.path().join("two"));
    // Which is what a trusted mark means: given marks taken after an edit (as if the edit had
    // been verified), the copy is not hashed and carries the edit. The index never holds
    // such a mark: an edit changes the blob's ctime, which no user can set back.
    corrupt_in_place(&store.object_path(ObjectKind::Blob, &d));
    let forged = store.marks_of(&[d]);
    store.materialize_known(&ing.digest, &t.path().join("forged"), MaterializeMode::Copy, &forged).unwrap();
    assert_ne!(fs::read(t.path().join("forged/a.txt")).unwrap(), b"visibilities\n");
    // With the index's marks the edit is caught, and nothing is placed.
    let out = t.path().join("three");
    assert!(matches!(store.materialize(&ing.digest, &out, MaterializeMode::Copy), Err(StoreError::Corrupt { .. })));
    assert!(!store.has_blob(&d, 13));
}
