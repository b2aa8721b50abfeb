//! A run records its result in the journal (one file) instead of opening the index; the next
//! open of the index moves it in. Nothing may be lost or hidden on the way: a journaled
//! result is a hit at once, is in the history, is protected from gc, and a damaged journal
//! file never stops the store from opening.

use std::fs;

use crate::common::*;
use kliko_store::records::HistoryEntry;
use kliko_store::{GcOptions, IngestMode, Store, StoreError, DB_DIR, JOURNAL_DIR, QUARANTINE_DIR};

fn journal_files(store: &Store) -> usize {
    fs::read_dir(store.root().join(JOURNAL_DIR)).unwrap().count()
}

/// Remove column families from the index at `root` (closed), with RocksDB itself.
fn drop_column_families(root: &std::path::Path, names: &[&str]) {
    let path = root.join(DB_DIR);
    let opts = rocksdb::Options::default();
    let cfs = rocksdb::DB::list_cf(&opts, &path).unwrap();
    let mut db = rocksdb::DB::open_cf(&opts, &path, &cfs).unwrap();
    for name in names {
        db.drop_cf(name).unwrap();
    }
}

/// Notes files waiting in the journal folder for the next writer.
fn notes_files(root: &std::path::Path) -> usize {
    fs::read_dir(root.join(JOURNAL_DIR))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("notes-"))
        .count()
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

/// A store with two results: one recorded straight into the index before result files existed
/// (an older store), one through the journal; the first is pinned.
fn store_with_history() -> (tempfile::TempDir, std::path::PathBuf, kliko_core::Digest, kliko_core::Digest) {
    let (t, root, store, out) = fresh();
    let old = result_for(&store, out, "old");
    let new = result_for(&store, out, "new");
    {
        let db = store.db().unwrap();
        store.put_result(&db, &old).unwrap();
        store.set_pin(&db, &old.key, true).unwrap();
    }
    // As in a store made before result files existed.
    fs::remove_dir_all(root.join(kliko_store::RESULTS_DIR)).unwrap();
    store.journal_result(&new, Some(&history_entry(&new))).unwrap();
    // The next open imports the journal and keeps a result file for each result.
    drop(store.db().unwrap());
    (t, root, old.key, new.key)
}

#[test]
fn a_lost_index_is_an_error_and_never_silently_replaced() {
    for remove in ["CURRENT", ""] {
        let (_t, root, old, new) = store_with_history();
        let store = Store::open(&root).unwrap();
        let index = root.join(DB_DIR);
        if remove.is_empty() {
            fs::remove_dir_all(&index).unwrap();
        } else {
            fs::remove_file(index.join(remove)).unwrap();
        }
        match store.db() {
            Err(StoreError::IndexLost { path }) => assert_eq!(path, index),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("an empty index replaced the lost one (removed: `{remove}`)"),
        }
        // Still an error the second time: nothing was created meanwhile.
        assert!(matches!(store.db(), Err(StoreError::IndexLost { .. })));

        let report = store.repair_index().unwrap();
        let db = store.db().unwrap();
        for key in [old, new] {
            assert!(store.lookup(&db, &key).unwrap().is_some(), "result {key} lost (removed: `{remove}`)");
        }
        assert_eq!(report.results, 2, "{report:?}");
        if remove.is_empty() {
            // Nothing of the index was left: results come back from their files, pins do not,
            // and the report says so.
            assert_eq!(report.recovered, kliko_store::Recovered::New);
            assert_eq!(report.restored, 2);
            assert!(!store.is_pinned(&db, &old).unwrap());
            assert!(report.lost.iter().any(|l| l.contains("pins")), "{report:?}");
        } else {
            // Only the file naming the manifest was gone: the whole index comes back.
            assert_eq!(report.recovered, kliko_store::Recovered::Whole, "{report:?}");
            assert!(store.is_pinned(&db, &old).unwrap());
            assert!(report.lost.is_empty());
            assert!(report.saved_copy.as_ref().is_some_and(|c| c.exists()));
        }
    }
}

#[test]
fn gc_removes_an_evicted_results_file() {
    let (_t, root, old, new) = store_with_history();
    let store = Store::open(&root).unwrap();
    let file = |k: &kliko_core::Digest| root.join(kliko_store::RESULTS_DIR).join(format!("{k}.json"));
    assert!(file(&old).exists() && file(&new).exists());
    store.gc(&GcOptions { max_bytes: Some(0), grace_ms: 0, ..Default::default() }).unwrap();
    // The pinned one stays; the other is gone, with its file.
    assert!(file(&old).exists());
    assert!(!file(&new).exists());
}

#[test]
fn a_lookup_never_waits_for_another_process_that_has_the_index_open() {
    let (_t, root, store, out) = fresh();
    let r = result_for(&store, out, "nowait");
    store.journal_result(&r, Some(&history_entry(&r))).unwrap();
    // "Another process" (another Store on the same folder) has the index open for writing.
    let writer = store.db().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (root2, key) = (root.clone(), r.key);
    let out = r.output;
    std::thread::spawn(move || {
        let other = Store::open(&root2).unwrap();
        let db = other.db_nowait().unwrap();
        let found = other.lookup(&db, &key).unwrap().map(|x| x.key);
        let mut hit = history_entry(&other.get_result(&db, &key).unwrap().unwrap());
        hit.cache = "hit".into();
        other.append_history(&db, &hit).unwrap();
        // Placing the output through the view verifies its blobs and defers their new marks.
        let dest = root2.join("placed-through-the-view");
        other.materialize(&out, &dest, kliko_store::MaterializeMode::ReadOnlyMount).unwrap();
        let read_only = db.is_read_only();
        // Closing the handle leaves its writes for the next writer.
        drop(db);
        tx.send((read_only, found)).unwrap();
    });
    let (read_only, found) =
        rx.recv_timeout(std::time::Duration::from_secs(60)).expect("the lookup waited for the other process");
    assert!(read_only, "it cannot have had the index for writing");
    assert_eq!(found, Some(r.key));
    // Its history entry waits in a notes file for the next writer, which applies it.
    let notes = || notes_files(&root);
    assert_eq!(notes(), 1);
    drop(writer);
    let db = store.db().unwrap();
    assert_eq!(notes(), 0);
    let kinds: Vec<String> = store.history(&db, 10).unwrap().into_iter().map(|h| h.cache).collect();
    assert_eq!(kinds, vec!["hit".to_string(), "miss".to_string()]);
}

#[test]
fn a_read_only_view_finds_a_result_moved_into_the_index_after_it_opened() {
    let (_t, root, store, out) = fresh();
    let r = result_for(&store, out, "moved");
    let writer = store.db().unwrap();
    let reader = Store::open(&root).unwrap();
    let view = reader.db_nowait().unwrap();
    assert!(view.is_read_only());
    store.journal_result(&r, None).unwrap();
    drop(writer);
    // The next writer moves the journaled result into the index, which the view cannot see.
    let next = Store::open(&root).unwrap();
    drop(next.db().unwrap());
    assert_eq!(journal_files(&store), 0);
    assert_eq!(reader.lookup(&view, &r.key).unwrap().map(|x| x.key), Some(r.key), "a recorded result was a miss");
}

#[test]
fn a_lookup_opens_a_read_only_view_unless_a_writer_has_something_to_apply() {
    let (t, root, store, out) = fresh();
    let r = result_for(&store, out, "lookup-view");
    store.journal_result(&r, Some(&history_entry(&r))).unwrap();
    drop(store);
    let notes = || notes_files(&root);
    // A journaled result: the index is opened for writing and the result moved in.
    let s = Store::open(&root).unwrap();
    let db = s.db_for_lookup().unwrap();
    assert!(!db.is_read_only(), "a journaled result is applied first");
    // A copy of the output verifies its blobs and records their marks.
    s.materialize(&r.output, &t.path().join("first-copy"), kliko_store::MaterializeMode::Copy).unwrap();
    drop(db);
    assert_eq!(journal_files(&s) - notes(), 0);

    // Nothing to apply: a read-only view, which serves the hit and defers its records of use.
    let db = s.db_for_lookup().unwrap();
    assert!(db.is_read_only());
    assert_eq!(s.lookup(&db, &r.key).unwrap().map(|x| x.key), Some(r.key));
    let mut hit = history_entry(&r);
    hit.cache = "hit".into();
    s.append_history(&db, &hit).unwrap();
    // A copy of the output through the view changes no blob's mark, so it defers none.
    s.materialize(&r.output, &t.path().join("copied"), kliko_store::MaterializeMode::Copy).unwrap();
    drop(db);
    assert_eq!(notes(), 1);
    // Notes of history and access times alone do not need a writer yet.
    let db = s.db_for_lookup().unwrap();
    assert!(db.is_read_only());
    // Stat-cache records taken through the view (of files old enough to be remembered) do:
    // a view cannot see them, and would hash those files again.
    let input = t.path().join("input");
    fs::create_dir(&input).unwrap();
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    for i in 0..3 {
        let f = input.join(format!("f{i}"));
        fs::write(&f, format!("file {i}")).unwrap();
        fs::File::options().write(true).open(&f).unwrap().set_modified(old).unwrap();
    }
    let mem = kliko_core::hash::MemoryCache::default();
    s.hash_path_remembering(&input, &kliko_core::hash::NoProgress, &mem).unwrap();
    drop(db);
    assert_eq!(notes(), 2);
    let db = s.db_for_lookup().unwrap();
    assert!(!db.is_read_only(), "stat-cache records are applied before the next lookup");
    assert_eq!(notes(), 0);
    let kinds: Vec<String> = s.history(&db, 10).unwrap().into_iter().map(|h| h.cache).collect();
    assert_eq!(kinds, vec!["hit".to_string(), "miss".to_string()]);
    drop(db);

    // Many notes files make a writer too, so they never pile up.
    let mut views = 0;
    for _ in 0..40 {
        let db = s.db_for_lookup().unwrap();
        if !db.is_read_only() {
            break;
        }
        views += 1;
        s.append_history(&db, &hit).unwrap();
    }
    assert_eq!(notes(), 0);
    assert!((8..40).contains(&views), "{views} read-only views before a writer applied their notes");
}

#[test]
fn a_read_only_view_opens_an_index_that_lacks_the_newer_column_families() {
    let (t, root, store, out) = fresh();
    let r = result_for(&store, out, "older-index");
    store.journal_result(&r, Some(&history_entry(&r))).unwrap();
    drop(store.db().unwrap());
    drop(store);
    // As an older kliko left it: no blob marks, no pipeline runs.
    drop_column_families(&root, &["blob-marks", "pipeline-runs"]);
    let s = Store::open(&root).unwrap();
    let db = s.db_for_lookup().unwrap();
    assert!(db.is_read_only(), "a view, though the index lacks column families this version has");
    assert_eq!(s.lookup(&db, &r.key).unwrap().map(|x| x.key), Some(r.key));
    assert!(s.pipeline_runs(&db, None, 10).unwrap().is_empty());
    // Without marks every blob is hashed as it is placed: the output is still exact.
    let dest = t.path().join("placed");
    s.materialize(&r.output, &dest, kliko_store::MaterializeMode::Copy).unwrap();
    assert_eq!(s.hash_path(&dest, &kliko_core::hash::NoProgress).unwrap().digest, r.output);
    drop(db);
    // The next writer creates them and applies what the view deferred.
    let db = s.db().unwrap();
    assert!(db.cf_if("blob-marks").is_some() && db.cf_if("pipeline-runs").is_some());
    assert!(!s.history(&db, 10).unwrap().is_empty());
}

#[test]
fn an_index_lacking_an_original_column_family_is_never_opened_as_a_view_without_it() {
    // As an index looks while another process creates it: some column families made, not all.
    let (_t, root, store, _out) = fresh();
    drop(store.db().unwrap());
    drop(store);
    drop_column_families(&root, &["history", "pipeline-runs"]);
    let s = Store::open(&root).unwrap();
    let db = s.db_for_lookup().unwrap();
    // Not a view without `history` (whose readers expect it): the index opened for writing,
    // which makes every column family.
    assert!(!db.is_read_only());
    assert!(s.history(&db, 10).unwrap().is_empty());
    assert!(db.cf_if("pipeline-runs").is_some());
}
