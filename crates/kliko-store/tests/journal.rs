//! A run records its result in the journal (one file) instead of opening the index; the next
//! open of the index moves it in. Nothing may be lost or hidden on the way: a journaled
//! result is a hit at once, is in the history, is protected from gc, and a damaged journal
//! file never stops the store from opening.

mod common;

use std::fs;

use common::*;
use kliko_store::records::HistoryEntry;
use kliko_store::{GcOptions, IngestMode, Store, JOURNAL_DIR, QUARANTINE_DIR};

fn journal_files(store: &Store) -> usize {
    fs::read_dir(store.root().join(JOURNAL_DIR)).unwrap().count()
}

fn history_entry(r: &kliko_store::records::ActionResult) -> HistoryEntry {
    HistoryEntry {
        key: r.key,
        cache: "miss".into(),
        image_ref: "test:latest".into(),
        image_id: "sha256:0".into(),
        at: "2026-01-01T00:00:01Z".into(),
        wall_ms: 1000,
        saved_ms: 0,
        exit_code: Some(0),
        host: "test".into(),
        user: "test".into(),
    }
}

/// A store at `<tmp>/store` holding the sample tree, and that tree's digest.
fn fresh() -> (tempfile::TempDir, std::path::PathBuf, Store, kliko_core::Digest) {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("store");
    let store = Store::open(&root).unwrap();
    let src = t.path().join("src");
    sample_tree(&src);
    let out = store.ingest(&src, IngestMode::Copy).unwrap().digest;
    (t, root, store, out)
}

#[test]
fn a_journaled_result_moves_into_the_index_at_the_next_open() {
    let (_t, root, store, out) = fresh();
    let r = result_for(&store, out, "journal");
    store.journal_result(&r, Some(&history_entry(&r))).unwrap();
    assert_eq!(journal_files(&store), 1);
    drop(store);

    // Another process (here: another Store on the same folder) opens the index.
    let other = Store::open(&root).unwrap();
    let db = other.db().unwrap();
    assert_eq!(journal_files(&other), 0, "the open imported and removed the journal file");
    assert_eq!(other.get_result(&db, &r.key).unwrap().as_ref(), Some(&r));
    assert_eq!(other.lookup(&db, &r.key).unwrap().map(|x| x.output), Some(out));
    let history = other.history(&db, 10).unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].key, r.key);
    assert!(other.provenance_of(&db, &out).unwrap().contains(&(b'o', r.key)), "provenance entries were written");
}

#[test]
fn a_lookup_through_an_index_opened_before_the_journal_was_written_finds_it() {
    let (_t, _root, store, out) = fresh();
    let r = result_for(&store, out, "late");
    let db = store.db().unwrap();
    assert!(store.lookup(&db, &r.key).unwrap().is_none());
    store.journal_result(&r, None).unwrap();
    assert_eq!(store.lookup(&db, &r.key).unwrap().map(|x| x.key), Some(r.key));
}

#[test]
fn a_journaled_result_whose_objects_are_gone_is_a_miss() {
    let (_t, _root, store, out) = fresh();
    let mut r = result_for(&store, out, "incomplete");
    r.stdout = kliko_core::Digest::of_bytes(b"never stored");
    let db = store.db().unwrap();
    store.journal_result(&r, None).unwrap();
    assert!(store.lookup(&db, &r.key).unwrap().is_none());
}

#[test]
fn a_damaged_journal_file_is_quarantined_and_the_store_still_opens() {
    let (_t, root, store, out) = fresh();
    let good = result_for(&store, out, "good");
    store.journal_result(&good, None).unwrap();
    let bad = store.root().join(JOURNAL_DIR).join(format!("{}.json", "ab".repeat(32)));
    fs::write(&bad, b"{\"format\":\"kliko-journal-v1\",\"result\":").unwrap();
    drop(store);

    let store = Store::open(&root).unwrap();
    let db = store.db().unwrap();
    assert!(store.get_result(&db, &good.key).unwrap().is_some());
    assert_eq!(journal_files(&store), 0);
    let quarantined: Vec<_> =
        fs::read_dir(store.root().join(QUARANTINE_DIR)).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(quarantined, vec![bad.file_name().unwrap().to_owned()]);
}

#[test]
fn gc_keeps_the_objects_of_a_journaled_result() {
    let (t, _root, store, out) = fresh();
    let r = result_for(&store, out, "kept");
    store.journal_result(&r, None).unwrap();
    // No grace period: only being named by a result keeps an object.
    let report = store.gc(&GcOptions { grace_ms: 0, ..Default::default() }).unwrap();
    assert_eq!(report.objects_deleted, 0, "{report:?}");
    let db = store.db().unwrap();
    assert!(store.lookup(&db, &r.key).unwrap().is_some());
    let dest = t.path().join("out");
    store.materialize(&out, &dest, kliko_store::MaterializeMode::Copy).unwrap();
}

/// Property: whatever bytes a journal file holds (a valid record damaged at random: bit
/// flips, truncation, overwritten bytes), opening the index never panics and never fails;
/// the file is either imported (the damage left a valid record) or quarantined. 150 cases,
/// the seed printed on failure.
#[test]
fn journal_files_of_arbitrary_bytes_never_stop_the_index_from_opening() {
    let (_t, root, store, out) = fresh();
    let r = result_for(&store, out, "fuzzed");
    store.journal_result(&r, Some(&history_entry(&r))).unwrap();
    let path = store.root().join(JOURNAL_DIR).join(format!("{}.json", r.key));
    let valid = fs::read(&path).unwrap();
    fs::remove_file(&path).unwrap();
    drop(store);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut x = seed;
    let mut next = move || {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) as usize
    };
    let store = Store::open(&root).unwrap();
    for case in 0..150 {
        let mut bytes = valid.clone();
        for _ in 0..=next() % 3 {
            let at = next() % bytes.len().max(1);
            match next() % 3 {
                0 if !bytes.is_empty() => bytes[at] ^= 1 << (next() % 8),
                1 => bytes.truncate(at),
                _ if !bytes.is_empty() => bytes[at] = next() as u8,
                _ => {}
            }
        }
        fs::write(&path, &bytes).unwrap();
        let db = store.db().unwrap_or_else(|e| panic!("case {case} (seed {seed:#x}): {e} on {bytes:?}"));
        assert_eq!(journal_files(&store), 0, "case {case} (seed {seed:#x})");
        drop(db);
    }
}
