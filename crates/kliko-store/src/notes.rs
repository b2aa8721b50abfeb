//! Deferred writes of read-only index handles.
//!
//! A process that finds the index open for writing by another process does not wait for it:
//! it opens a read-only view ([`crate::Store::db_nowait`]). What such a process would write is
//! a record of use (a result's last access, a history entry, a pipeline run, stat-cache records,
//! blob marks),
//! never a result (results go through the journal). It keeps those writes and, when its
//! handle closes, leaves them in one file, `journal-v1/notes-<pid>-<ns>.kv`; the next process
//! that opens the index for writing applies and removes every such file, as it does the
//! journal. `cache-format.md` specifies the file.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::db::{Db, CF_ACCESS, CF_HISTORY, CF_MARKS, CF_PIPELINE_RUNS, CF_STAT};
use crate::journal::JOURNAL_DIR;
use crate::Store;

const MAGIC: &[u8] = b"kliko-notes-v1\n";
/// The column families a notes file may write to.
const ALLOWED: &[&str] = &[CF_ACCESS, CF_HISTORY, CF_STAT, CF_MARKS, CF_PIPELINE_RUNS];

/// The writes a read-only handle keeps, encoded as they will be written.
pub(crate) struct Deferred {
    dir: PathBuf,
    tmp: PathBuf,
    buf: Mutex<Vec<u8>>,
}

impl Deferred {
    pub(crate) fn new(store: &Store) -> Deferred {
        Deferred { dir: store.root().join(JOURNAL_DIR), tmp: store.tmp_dir(), buf: Mutex::new(Vec::new()) }
    }

    /// `cf-len:u8 cf key-len:u32le key value-len:u32le value`.
    pub(crate) fn push(&self, cf: &'static str, key: &[u8], value: &[u8]) {
        let mut b = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        b.push(cf.len() as u8);
        b.extend_from_slice(cf.as_bytes());
        b.extend_from_slice(&(key.len() as u32).to_le_bytes());
        b.extend_from_slice(key);
        b.extend_from_slice(&(value.len() as u32).to_le_bytes());
        b.extend_from_slice(value);
    }

    /// Leave the writes for the next writer. Not synced: losing them in a crash loses only
    /// records of use (a history line, a stat record that costs a re-hash).
    pub(crate) fn write(&self) {
        let b = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        if b.is_empty() {
            return;
        }
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let name = format!("notes-{}-{nanos}.kv", std::process::id());
        let tmp = self.tmp.join(format!(".{name}"));
        let mut all = MAGIC.to_vec();
        all.extend_from_slice(&b);
        // Written whole under another name, then renamed: the reader never sees half of it.
        if fs::write(&tmp, &all).is_ok() && fs::rename(&tmp, self.dir.join(&name)).is_err() {
            let _ = fs::remove_file(&tmp);
        }
    }
}

/// One deferred write: column family, key, value.
type Write<'a> = (&'static str, &'a [u8], &'a [u8]);

/// The writes of one notes file; `None` if it is not one (or is damaged: then none of it).
fn decode(bytes: &[u8]) -> Option<Vec<Write<'_>>> {
    let mut rest = bytes.strip_prefix(MAGIC)?;
    let mut out = Vec::new();
    fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if rest.len() < n {
            return None;
        }
        let (a, b) = rest.split_at(n);
        *rest = b;
        Some(a)
    }
    fn len(rest: &mut &[u8]) -> Option<usize> {
        Some(u32::from_le_bytes(take(rest, 4)?.try_into().ok()?) as usize)
    }
    while !rest.is_empty() {
        let n = *take(&mut rest, 1)?.first()? as usize;
        let cf = take(&mut rest, n)?;
        let cf = *ALLOWED.iter().find(|a| a.as_bytes() == cf)?;
        let k = len(&mut rest)?;
        let key = take(&mut rest, k)?;
        let v = len(&mut rest)?;
        let value = take(&mut rest, v)?;
        out.push((cf, key, value));
    }
    Some(out)
}

impl Store {
    /// Apply and remove every notes file (under the index lock, right after each open for
    /// writing). A damaged one is removed unapplied: it held only records of use.
    pub(crate) fn import_notes(&self, db: &Db) {
        let dir = self.root().join(JOURNAL_DIR);
        let Ok(entries) = fs::read_dir(&dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if !is_notes(&path) {
                continue;
            }
            if let Ok(bytes) = fs::read(&path) {
                if let Some(writes) = decode(&bytes) {
                    let mut batch = rocksdb::WriteBatch::default();
                    for (cf, k, v) in writes {
                        batch.put_cf(db.cf(cf), k, v);
                    }
                    if db.write(batch).is_err() {
                        continue;
                    }
                }
            }
            let _ = fs::remove_file(&path);
        }
    }
}

/// Notes files past this many make the next lookup open the index for writing and apply them.
const MANY_NOTES: usize = 16;

impl Store {
    /// Whether opening the index for writing would apply something a read-only view misses:
    /// a journaled result (lookups read the journal, but the index stays behind), stat-cache
    /// records or blob marks left as notes (a view would hash or verify again what they
    /// vouch for), or [`MANY_NOTES`] notes files.
    pub(crate) fn worth_applying(&self) -> bool {
        let Ok(entries) = fs::read_dir(self.root().join(JOURNAL_DIR)) else { return false };
        let mut notes = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                return true;
            }
            if !is_notes(&path) {
                continue;
            }
            notes += 1;
            if notes >= MANY_NOTES {
                return true;
            }
            let Ok(bytes) = fs::read(&path) else { return true };
            if decode(&bytes).is_some_and(|w| w.iter().any(|(cf, _, _)| *cf == CF_STAT || *cf == CF_MARKS)) {
                return true;
            }
        }
        false
    }
}

fn is_notes(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("notes-") && n.ends_with(".kv"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_round_trip_and_damage_is_refused_whole() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path()).unwrap();
        let d = Deferred::new(&store);
        d.push(CF_ACCESS, b"key", b"value");
        d.push(CF_STAT, b"/some/dir", &[1, 2, 3]);
        let mut all = MAGIC.to_vec();
        all.extend_from_slice(&d.buf.lock().unwrap());
        let w = decode(&all).unwrap();
        assert_eq!(w, vec![(CF_ACCESS, &b"key"[..], &b"value"[..]), (CF_STAT, &b"/some/dir"[..], &[1u8, 2, 3][..])]);
        assert!(decode(&all[..all.len() - 1]).is_none(), "a truncated file applies nothing");
        let mut other = MAGIC.to_vec();
        other.extend_from_slice(&[7]);
        other.extend_from_slice(b"actions");
        other.extend_from_slice(&[0; 8]);
        assert!(decode(&other).is_none(), "a notes file may not write results");
    }
}
