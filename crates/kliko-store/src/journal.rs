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
use crate::error::Result;
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
            let moved = read(&path).ok_or(()).and_then(|j| {
                self.put_result(db, &j.result).map_err(|_| ())?;
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
                Err(()) => {
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

pub(crate) fn read(path: &Path) -> Option<Journaled> {
    let j: Journaled = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
    (j.format == FORMAT).then_some(j)
}
