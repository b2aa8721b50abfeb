//! Index records: the action cache (key → [`ActionResult`]), the provenance index
//! (object digest → keys of results whose output contains it, or whose input it was), last
//! access times and the run history.

use std::collections::BTreeSet;

use kliko_core::key::ActionPreimage;
use kliko_core::tree::Entry;
use kliko_core::Digest;
use rocksdb::{Direction, IteratorMode, WriteBatch};
use serde::{Deserialize, Serialize};

use crate::blobs::ObjectKind;
use crate::db::{self, Db, CF_ACCESS, CF_ACTIONS, CF_HISTORY, CF_PINS, CF_PIPELINE_RUNS, CF_PROV};
use crate::error::{Result, StoreError};
use crate::Store;

/// What one successful run produced, and everything needed to say where it came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActionResult {
    pub key: Digest,
    pub preimage: ActionPreimage,
    /// The output (split) or resulting work (join) tree.
    pub output: Digest,
    pub output_files: u64,
    pub output_bytes: u64,
    pub exit_code: i64,
    pub stdout: Digest,
    pub stderr: Digest,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    /// RFC 3339 UTC.
    pub started_at: String,
    pub finished_at: String,
    pub wall_ms: u64,
    /// The reference the user gave (`name:tag`), and what the image was known as.
    pub image_ref: String,
    pub image_id: String,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    /// The host path of the input (or work) tree at the time, for provenance only.
    pub input_path: Option<String>,
    /// Parameters as the user gave them (file parameters as host paths), for provenance only.
    pub parameters_given: serde_json::Value,
    pub host: String,
    pub user: String,
    pub kliko_version: String,
    /// The container runtime that ran it (`docker 20.10.24`, `podman 4.3.1 (rootless)`):
    /// provenance only, never part of the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// The GPUs it was given (`all`, `2`, `device=0`): provenance only, never part of the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<String>,
}

/// A run as the history lists it: a hit or a miss, what it cost, what it saved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub key: Digest,
    /// `hit`, `miss` or `failed`.
    pub cache: String,
    pub image_ref: String,
    pub image_id: String,
    pub at: String,
    /// Wall time of this invocation.
    pub wall_ms: u64,
    /// For a hit: the wall time of the run it reused.
    pub saved_ms: u64,
    pub exit_code: Option<i64>,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub user: String,
}

/// A pipeline run as the history of pipeline runs lists it (`kliko pipeline run` and the web).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PipelineRun {
    /// The pipeline file, absolute, and the digest of its bytes when it ran.
    pub file: String,
    pub file_digest: Digest,
    /// RFC 3339 UTC, when it started.
    pub at: String,
    /// `local`, `slurm` or `srun`.
    pub executor: String,
    /// Who started it: `cli` or `web`.
    pub via: String,
    pub ok: bool,
    pub cancelled: bool,
    pub wall_ms: u64,
    pub saved_ms: u64,
    /// Runs that started a container.
    pub containers: usize,
    pub host: String,
    pub user: String,
    /// In file order.
    pub steps: Vec<PipelineRunStep>,
}

/// One step of a [`PipelineRun`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PipelineRunStep {
    pub name: String,
    pub image: String,
    /// `cached`, `done`, `failed`, `skipped`, `not run` or `cancelled`.
    pub state: String,
    /// The keys of its runs that made a result (one, or one per `foreach` entry).
    pub keys: Vec<Digest>,
    pub output: Option<Digest>,
    /// Why it failed or was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Every tree digest under a tree (the root included), and every file digest with its size.
pub type TreeObjects = (BTreeSet<Digest>, BTreeSet<(Digest, u64)>);

/// Why a provenance entry points at a result.
pub const PROV_OUTPUT: u8 = b'o';
pub const PROV_INPUT: u8 = b'i';

fn prov_key(object: &Digest, role: u8, key: &Digest) -> Vec<u8> {
    let mut k = Vec::with_capacity(65);
    k.extend_from_slice(object.as_bytes());
    k.push(role);
    k.extend_from_slice(key.as_bytes());
    k
}

impl Store {
    /// Every tree and file digest under `tree` (trees including the root).
    pub fn walk_tree(&self, tree: &Digest) -> Result<TreeObjects> {
        let mut trees = BTreeSet::new();
        let mut files = BTreeSet::new();
        let mut stack = vec![*tree];
        while let Some(t) = stack.pop() {
            if !trees.insert(t) {
                continue;
            }
            for e in self.get_tree(&t)?.entries.values() {
                match e {
                    Entry::Dir { digest } => stack.push(*digest),
                    Entry::File { size, digest, .. } => {
                        files.insert((*digest, *size));
                    }
                    Entry::Symlink { .. } => {}
                }
            }
        }
        Ok((trees, files))
    }

    /// Whether every object a result names is present (trees readable and intact, blobs with
    /// the right size). A result that is not complete must be treated as a miss.
    pub fn is_complete(&self, r: &ActionResult) -> bool {
        let Ok((_, files)) = self.walk_tree(&r.output) else { return false };
        files.iter().all(|(d, size)| self.has_blob(d, *size))
            && self.has_blob(&r.stdout, r.stdout_bytes)
            && self.has_blob(&r.stderr, r.stderr_bytes)
    }

    /// Record a result. Call only after every object it names is durable (ingest does that).
    /// Writes the action entry, its provenance entries and its access time in one synced batch.
    pub fn put_result(&self, db: &Db, r: &ActionResult) -> Result<()> {
        let (trees, files) = self.walk_tree(&r.output)?;
        let mut batch = WriteBatch::default();
        let value = serde_json::to_vec(r).expect("result is plain data");
        batch.put_cf(db.cf(CF_ACTIONS), r.key.as_bytes(), value);
        for t in &trees {
            batch.put_cf(db.cf(CF_PROV), prov_key(t, PROV_OUTPUT, &r.key), b"");
        }
        for (f, _) in &files {
            batch.put_cf(db.cf(CF_PROV), prov_key(f, PROV_OUTPUT, &r.key), b"");
        }
        if let Some(input) = r.preimage.input {
            batch.put_cf(db.cf(CF_PROV), prov_key(&input, PROV_INPUT, &r.key), b"");
        }
        batch.put_cf(db.cf(CF_ACCESS), r.key.as_bytes(), now_ms().to_le_bytes());
        db.write_opt(batch, &db::durable()).map_err(db.err(self))
    }

    pub fn get_result(&self, db: &Db, key: &Digest) -> Result<Option<ActionResult>> {
        let Some(bytes) = db.get_pinned_cf(db.cf(CF_ACTIONS), key.as_bytes()).map_err(db.err(self))? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|source| StoreError::BadRecord { key: key.to_hex(), source })
    }

    /// A complete result for `key`, recording the access; `None` on a miss (including a
    /// result whose objects are gone).
    pub fn lookup(&self, db: &Db, key: &Digest) -> Result<Option<ActionResult>> {
        // A result journaled after this handle was opened is not in the index yet; one that a
        // writer has moved from the journal into the index since (a read-only view does not
        // see it) has its result file. The journal is read first: a result being moved is in
        // one of the two folders at every moment.
        let found = match self.get_result(db, key)? {
            Some(r) => Some(r),
            None => self.journaled(key).or_else(|| self.result_from_file(key)),
        };
        match found {
            Some(r) if self.is_complete(&r) => {
                self.touch(db, key)?;
                Ok(Some(r))
            }
            _ => Ok(None),
        }
    }

    pub fn touch(&self, db: &Db, key: &Digest) -> Result<()> {
        db.put_or_defer(CF_ACCESS, key.as_bytes(), &now_ms().to_le_bytes()).map_err(db.err(self))
    }

    /// Every result, in key order.
    pub fn results(&self, db: &Db) -> Result<Vec<ActionResult>> {
        let mut out = Vec::new();
        for item in db.iterator_cf(db.cf(CF_ACTIONS), IteratorMode::Start) {
            let (k, v) = item.map_err(db.err(self))?;
            let r =
                serde_json::from_slice(&v).map_err(|source| StoreError::BadRecord { key: hex::encode(&k), source })?;
            out.push(r);
        }
        Ok(out)
    }

    /// Remove a result and its provenance and access entries (its objects stay until gc).
    pub fn delete_result(&self, db: &Db, r: &ActionResult) -> Result<()> {
        self.delete_result_with(db, r, self.walk_tree(&r.output).ok().as_ref())
    }

    /// [`Store::delete_result`] given the objects of its output, walked earlier (gc walks
    /// them before it deletes them).
    pub(crate) fn delete_result_with(&self, db: &Db, r: &ActionResult, output: Option<&TreeObjects>) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.delete_cf(db.cf(CF_ACTIONS), r.key.as_bytes());
        batch.delete_cf(db.cf(CF_ACCESS), r.key.as_bytes());
        if let Some((trees, files)) = output {
            for t in trees {
                batch.delete_cf(db.cf(CF_PROV), prov_key(t, PROV_OUTPUT, &r.key));
            }
            for (f, _) in files {
                batch.delete_cf(db.cf(CF_PROV), prov_key(f, PROV_OUTPUT, &r.key));
            }
        }
        if let Some(input) = r.preimage.input {
            batch.delete_cf(db.cf(CF_PROV), prov_key(&input, PROV_INPUT, &r.key));
        }
        db.write_opt(batch, &db::durable()).map_err(db.err(self))?;
        match std::fs::remove_file(self.result_file(&r.key)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(StoreError::Io { path: self.result_file(&r.key), source: e })
            }
            _ => Ok(()),
        }
    }

    /// Keys of results whose output contains `object` (role `o`) or whose input was it (`i`).
    pub fn provenance_of(&self, db: &Db, object: &Digest) -> Result<Vec<(u8, Digest)>> {
        let mut out = Vec::new();
        let cf = db.cf(CF_PROV);
        for item in db.iterator_cf(cf, IteratorMode::From(object.as_bytes(), Direction::Forward)) {
            let (k, _) = item.map_err(db.err(self))?;
            if !k.starts_with(object.as_bytes()) || k.len() != 65 {
                break;
            }
            out.push((k[32], Digest::from_slice(&k[33..]).expect("32 bytes")));
        }
        Ok(out)
    }

    /// Every digest known to the index (result keys, and objects in the provenance index)
    /// that starts with the hex `prefix`, with what it is: `key`, `tree` or `blob`.
    pub fn resolve_prefix(&self, db: &Db, prefix: &str) -> Result<Vec<(Digest, &'static str)>> {
        let prefix = prefix.to_ascii_lowercase();
        if !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            // Not hex (`é` would even split a character below): it names nothing.
            return Ok(Vec::new());
        }
        let even = &prefix[..prefix.len() - prefix.len() % 2];
        let Ok(start) = hex::decode(even) else { return Ok(Vec::new()) };
        let mut out: Vec<(Digest, &'static str)> = Vec::new();
        for item in db.iterator_cf(db.cf(CF_ACTIONS), IteratorMode::From(&start, Direction::Forward)) {
            let (k, _) = item.map_err(db.err(self))?;
            if !k.starts_with(&start) {
                break;
            }
            // A key of another length (a damaged index) names nothing.
            let Some(d) = Digest::from_slice(&k) else { continue };
            if d.to_hex().starts_with(&prefix) {
                out.push((d, "key"));
            }
        }
        for item in db.iterator_cf(db.cf(CF_PROV), IteratorMode::From(&start, Direction::Forward)) {
            let (k, _) = item.map_err(db.err(self))?;
            if !k.starts_with(&start) {
                break;
            }
            let Some(d) = k.get(..32).and_then(Digest::from_slice) else { continue };
            if !d.to_hex().starts_with(&prefix) || out.iter().any(|(o, _)| *o == d) {
                continue;
            }
            let kind = if self.has_object(ObjectKind::Tree, &d) { "tree" } else { "blob" };
            out.push((d, kind));
        }
        Ok(out)
    }

    pub fn last_access_ms(&self, db: &Db, key: &Digest) -> Result<Option<u64>> {
        let v = db.get_pinned_cf(db.cf(CF_ACCESS), key.as_bytes()).map_err(db.err(self))?;
        Ok(v.and_then(|b| b.as_ref().try_into().ok().map(u64::from_le_bytes)))
    }

    pub fn append_history(&self, db: &Db, e: &HistoryEntry) -> Result<()> {
        self.append_history_at(db, e, now_ms())
    }

    /// [`Store::append_history`] for an entry that happened at `at_ms` (ms since the epoch).
    pub fn append_history_at(&self, db: &Db, e: &HistoryEntry, at_ms: u64) -> Result<()> {
        let mut k = at_ms.to_be_bytes().to_vec();
        k.extend_from_slice(&e.key.as_bytes()[..8]);
        k.extend_from_slice(&std::process::id().to_be_bytes());
        db.put_or_defer(CF_HISTORY, &k, &serde_json::to_vec(e).unwrap_or_default()).map_err(db.err(self))
    }

    /// History, newest first.
    pub fn history(&self, db: &Db, limit: usize) -> Result<Vec<HistoryEntry>> {
        let mut out = Vec::new();
        for item in db.iterator_cf(db.cf(CF_HISTORY), IteratorMode::End) {
            let (_, v) = item.map_err(db.err(self))?;
            if let Ok(e) = serde_json::from_slice(&v) {
                out.push(e);
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Add a pipeline run to the history of pipeline runs (deferred on a read-only handle,
    /// like [`Store::append_history`]).
    pub fn append_pipeline_run(&self, db: &Db, run: &PipelineRun) -> Result<()> {
        let mut k = now_ms().to_be_bytes().to_vec();
        k.extend_from_slice(&run.file_digest.as_bytes()[..8]);
        k.extend_from_slice(&std::process::id().to_be_bytes());
        db.put_or_defer(CF_PIPELINE_RUNS, &k, &serde_json::to_vec(run).unwrap_or_default()).map_err(db.err(self))
    }

    /// Pipeline runs, newest first; only those of the pipeline file `file` when given.
    pub fn pipeline_runs(&self, db: &Db, file: Option<&str>, limit: usize) -> Result<Vec<PipelineRun>> {
        let mut out = Vec::new();
        // A view of an index older than pipeline runs has none.
        let Some(cf) = db.cf_if(CF_PIPELINE_RUNS) else { return Ok(out) };
        for item in db.iterator_cf(cf, IteratorMode::End) {
            if out.len() >= limit {
                break;
            }
            let (_, v) = item.map_err(db.err(self))?;
            // A record this version cannot read (a later format) is skipped, not an error.
            let Ok(run) = serde_json::from_slice::<PipelineRun>(&v) else { continue };
            if file.is_none_or(|f| run.file == f) {
                out.push(run);
            }
        }
        Ok(out)
    }

    pub fn set_pin(&self, db: &Db, key: &Digest, pinned: bool) -> Result<()> {
        if db.is_read_only() && self.is_read_only() {
            return Err(StoreError::ReadOnly { path: self.root().to_path_buf(), what: "pins cannot change".into() });
        }
        let cf = db.cf(CF_PINS);
        let r = if pinned { db.put_cf(cf, key.as_bytes(), b"") } else { db.delete_cf(cf, key.as_bytes()) };
        r.map_err(db.err(self))
    }

    pub fn is_pinned(&self, db: &Db, key: &Digest) -> Result<bool> {
        Ok(db.get_pinned_cf(db.cf(CF_PINS), key.as_bytes()).map_err(db.err(self))?.is_some())
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Store {
    fn image_file_path(&self, image_id: &str, path: &str) -> std::path::PathBuf {
        let id = image_id.strip_prefix("sha256:").unwrap_or(image_id);
        let name: String = path.trim_start_matches('/').chars().map(|c| if c == '/' { '%' } else { c }).collect();
        self.root().join(crate::IMAGES_DIR).join(format!("{id}-{name}"))
    }

    /// A file read out of an image earlier (`/kliko.yml`), by image ID. Kept as a plain file
    /// (`images-v1/<id>-<path>`), so reading it needs no index.
    pub fn image_file(&self, image_id: &str, path: &str) -> Result<Option<Vec<u8>>> {
        let p = self.image_file_path(image_id, path);
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io { path: p, source }),
        }
    }

    pub fn put_image_file(&self, image_id: &str, path: &str, bytes: &[u8]) -> Result<()> {
        crate::blobs::write_atomic(&self.tmp_dir(), &self.image_file_path(image_id, path), bytes, 0o444)
    }
}
