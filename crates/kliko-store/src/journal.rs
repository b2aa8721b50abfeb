//! The result journal: how a finished run records its result without opening the index.
//!
//! Opening RocksDB takes milliseconds (it replays its log and writes a new manifest with
//! several fsyncs), and a run that opened it before its container must not keep it open
//! while the container runs (other processes would wait). So a run records its result as one
//! file, `journal-v1/<key>.json`, written to a temporary name, synced, renamed into place
//! and the folder synced, after the objects it names are durable. The next process to open
//! the index moves every journaled result into it (one synced batch each, then the file is
//! removed), before anyone reads the index; a lookup through an index handle that was
//! already open also reads the journal. `cache-format.md` specifies the file.

use std::fs;
use std::path::{Path, PathBuf};

use kliko_core::Digest;
use serde::{Deserialize, Serialize};

use crate::blobs::{sync_dir, write_atomic};
use crate::db::Db;
use crate::error::{Result, StoreError};
use crate::records::{ActionResult, HistoryEntry};
use crate::Store;

pub const JOURNAL_DIR: &str = "journal-v1";

/// One journaled result, with the history entry of the run that produced it.
#[derive(Serialize, Deserialize)]
pub(crate) struct Journaled {
    format: String,
    pub(crate) result: ActionResult,
    pub(crate) history: Option<HistoryEntry>,
    /// When the run ended (milliseconds since the epoch): the history entry's place in order.
    pub(crate) at_ms: u64,
}

/// A result (and its run's history entry) as a journal or result file holds it.
pub(crate) fn encode(result: &ActionResult, history: Option<&HistoryEntry>) -> Vec<u8> {
    let entry = Journaled {
        format: FORMAT.into(),
        result: result.clone(),
        history: history.cloned(),
        at_ms: crate::records::now_ms(),
    };
    serde_json::to_vec(&entry).unwrap_or_default()
}

const FORMAT: &str = "kliko-journal-v1";

impl Store {
    fn journal_path(&self, key: &Digest) -> PathBuf {
        self.root().join(JOURNAL_DIR).join(format!("{key}.json"))
    }

    /// Record `result` (and the run's history entry) durably without the index. Call only
    /// after every object it names is durable (ingest does that), holding gc.lock shared.
    pub fn journal_result(&self, result: &ActionResult, history: Option<&HistoryEntry>) -> Result<()> {
        write_atomic(&self.tmp_dir(), &self.journal_path(&result.key), &encode(result, history), 0o644)
    }

    /// The journaled result for `key`, if any (not checked for completeness).
    pub(crate) fn journaled(&self, key: &Digest) -> Option<ActionResult> {
        read(&self.journal_path(key)).map(|j| j.result)
    }

    /// Move every journaled result into the index. Runs under the index lock, right after
    /// each open. A file that cannot be read as a journaled result (from a newer kliko, or
    /// damaged), or whose record cannot be written, is moved to `quarantine/` and left out;
    /// losing it only costs a re-run, and it never stops the index from opening.
    pub(crate) fn import_journal(&self, db: &Db) -> Result<usize> {
        let dir = self.root().join(JOURNAL_DIR);
        // An unreadable journal folder leaves its results out (lookups cannot read them
        // either); it must not make the index unusable.
        let Ok(entries) = fs::read_dir(&dir) else { return Ok(0) };
        let mut imported = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let moved = read(&path).ok_or(None).and_then(|j| {
                match self.put_result(db, &j.result) {
                    Ok(()) => {}
                    // The index refused the write (a full disk): the record is fine, it waits
                    // in the journal for an open that can write (gc frees space without it).
                    Err(e @ StoreError::Db { .. }) => return Err(Some(e)),
                    Err(_) => return Err(None),
                }
                if let Some(h) = &j.history {
                    // The history is a convenience: the result is what matters.
                    let _ = self.append_history_at(db, h, j.at_ms);
                }
                Ok(())
            });
            match moved {
                Ok(()) => {
                    imported += 1;
                    // Kept as the result's file, from which a lost index can be rebuilt.
                    // Failing to move it only means importing it again (the same batch).
                    let key = read(&path).map(|j| j.result.key);
                    if key.is_none_or(|k| fs::rename(&path, self.result_file(&k)).is_err()) {
                        let _ = fs::remove_file(&path);
                    }
                }
                Err(Some(_)) => break,
                Err(None) => {
                    // Unreadable, or naming objects that cannot be read: never let it stop
                    // the index from opening.
                    let to = self.root().join(crate::QUARANTINE_DIR).join(entry.file_name());
                    let _ = fs::rename(&path, &to);
                }
            }
        }
        if imported > 0 {
            // Only so the removals last; a removal lost in a crash means one more import.
            let _ = sync_dir(&dir);
        }
        Ok(imported)
    }
}

impl Store {
    /// Every readable journaled result, as it is on disk (for gc when the index cannot be
    /// written: these results are recorded, so their objects are live).
    pub(crate) fn journaled_results(&self) -> Vec<ActionResult> {
        let Ok(entries) = fs::read_dir(self.root().join(JOURNAL_DIR)) else { return Vec::new() };
        entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| read(&e.path()))
            .map(|j| j.result)
            .collect()
    }
}

pub(crate) fn read(path: &Path) -> Option<Journaled> {
    let j: Journaled = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
    (j.format == FORMAT).then_some(j)
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::io::Write;

    use super::*;

    /// A journaled result whose import fails because the disk is full stays in the journal
    /// (it is fine; only the index could not take it), and goes in once there is room.
    #[test]
    fn a_journal_file_the_full_index_cannot_take_waits_for_the_next_open() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting a small tmpfs needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let disk = t.path().join("disk");
        fs::create_dir_all(&disk).unwrap();
        let c = |s: &str| CString::new(s).unwrap();
        let target = c(disk.to_str().unwrap());
        // SAFETY: valid NUL-terminated strings that outlive the calls.
        assert_eq!(
            unsafe {
                libc::mount(c("tmpfs").as_ptr(), target.as_ptr(), c("tmpfs").as_ptr(), 0, c("size=8m").as_ptr().cast())
            },
            0
        );
        struct Unmount(CString);
        impl Drop for Unmount {
            fn drop(&mut self) {
                // SAFETY: a valid NUL-terminated path.
                unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
            }
        }
        let _unmount = Unmount(target);

        let store = Store::open(&disk.join("store")).unwrap();
        // Many files: many provenance entries, a batch larger than a page.
        let src = t.path().join("src");
        fs::create_dir_all(&src).unwrap();
        for i in 0..300 {
            fs::write(src.join(format!("f{i}")), format!("{i}\n")).unwrap();
        }
        let out = store.ingest(&src, crate::IngestMode::Copy).unwrap().digest;
        let stdout = store.put_bytes(crate::ObjectKind::Blob, b"").unwrap();
        let preimage: kliko_core::key::ActionPreimage = serde_json::from_value(serde_json::json!({
            "format": kliko_core::key::ACTION_FORMAT, "image_id": "sha256:0", "io": "split", "cmd": ["/kliko"],
            "env": {}, "parameters_format": 1, "parameters": {}, "input": null, "salt": "full"
        }))
        .unwrap();
        let r = ActionResult {
            key: preimage.key(),
            preimage,
            output: out,
            output_files: 300,
            output_bytes: 0,
            exit_code: 0,
            stdout,
            stderr: stdout,
            stdout_bytes: 0,
            stderr_bytes: 0,
            started_at: String::new(),
            finished_at: String::new(),
            wall_ms: 0,
            image_ref: String::new(),
            image_id: String::new(),
            repo_tags: vec![],
            repo_digests: vec![],
            input_path: None,
            parameters_given: serde_json::json!({}),
            host: String::new(),
            user: String::new(),
            kliko_version: String::new(),
            runtime: None,
            gpus: None,
        };
        let db = store.db().unwrap();
        store.journal_result(&r, None).unwrap();
        // Fill the disk to the last byte.
        let filler = disk.join("filler");
        let mut f = fs::File::create(&filler).unwrap();
        while f.write(&[0u8; 65536]).is_ok_and(|n| n > 0) {}
        while f.write(&[0u8]).is_ok_and(|n| n == 1) {}
        drop(f);

        assert_eq!(store.import_journal(&db).unwrap(), 0);
        assert!(store.journal_path(&r.key).exists(), "the journal file was lost");
        assert_eq!(fs::read_dir(store.root().join(crate::QUARANTINE_DIR)).unwrap().count(), 0);
        drop(db);
        fs::remove_file(&filler).unwrap();
        let db = store.db().unwrap();
        assert!(store.get_result(&db, &r.key).unwrap().is_some(), "imported once there is room");
        assert!(!store.journal_path(&r.key).exists());
    }
}
