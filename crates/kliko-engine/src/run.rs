//! prepare (key) → lookup → lease → run → ingest → record → place the output.

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kliko_core::key::{ActionPreimage, ACTION_FORMAT};
use kliko_core::trace::mark;
use kliko_core::tree::Tree;
use kliko_core::Digest;
use kliko_runtime::{ContainerSpec, LogChunk, Mount, Outcome, Stream};
use kliko_spec::{IoMode, CANONICAL_PARAMS_FORMAT};
use kliko_store::records::{now_ms, ActionResult, HistoryEntry};
use kliko_store::{IngestMode, KnownMarks, MaterializeMode, ObjectKind, StoreError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::{blocking, EngineError, IoContext, Result};
use crate::fsutil;
use crate::lease::{self, Attempt, Failure, Holder, Lease};
use crate::{
    Cache, Engine, Event, Input, Observer, Prepared, RunReport, RunRequest, Status, UserChoice, KEY_LABEL, KLIKO_CMD,
    STORE_LABEL,
};

/// Log lines kept for the message of a failed run.
const TAIL_LINES: usize = 20;

/// The index kept open across the steps of a run that each use it (image, hashing, lookup,
/// history): opening RocksDB replays its log and writes a new manifest, milliseconds each
/// time. It is opened with `store.db_nowait()`: for writing if no other process has it,
/// else read-only at once (a run never queues behind another process's use of the index).
/// A writer excludes other writers, so a hold is dropped before a container runs and before
/// waiting on another process's lease. An open index holds gc.lock (shared) itself, so gc
/// cannot start meanwhile.
pub struct IndexHold {
    _db: kliko_store::Db,
}

/// The environment every kliko container gets (the in-image kliko library reads it).
pub fn base_env() -> Vec<(String, String)> {
    [
        ("INPUT", "/input"),
        ("OUTPUT", "/output"),
        ("WORK", "/work"),
        ("PARAM_FILES", "/param_files"),
        ("PARAM_FILE", "/parameters.json"),
        ("KLIKO_FILE", "/kliko.yml"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

impl Engine {
    /// Everything up to the key: image, parameters, digests of the input and file parameters.
    pub async fn prepare(&self, req: &RunRequest) -> Result<Prepared> {
        let image = self.image(&req.image).await?;
        self.prepare_with(req, image).await
    }

    /// [`Engine::prepare`] for an image already resolved.
    pub async fn prepare_with(&self, req: &RunRequest, image: crate::ImageMeta) -> Result<Prepared> {
        let io = image.spec.io;
        if let Some(flags) = req.io_flags {
            if flags != io {
                let what = match io {
                    IoMode::Split => {
                        "it reads `/input` and writes `/output`, so give `--input DIR --output DIR`, not `--work`"
                    }
                    IoMode::Join => "it changes `/work` in place, so give `--work DIR`, not `--input`/`--output`",
                };
                return Err(EngineError::IoMode { image: req.image.clone(), mode: io.to_string(), what: what.into() });
            }
        }
        if io == IoMode::Join && req.input == Input::None {
            return Err(EngineError::IoMode {
                image: req.image.clone(),
                mode: "join".into(),
                what: "it needs a work folder: give `--work DIR`".into(),
            });
        }
        let params = image
            .spec
            .resolve(&req.params)
            .map_err(|errors| EngineError::Params { image: req.image.clone(), errors })?;

        let store = self.store.clone();
        let input = req.input.clone();
        let (checked, image_ref) = (params.clone(), req.image.clone());
        let input_stat = Arc::new(kliko_core::hash::MemoryCache::default());
        let stat_copy = input_stat.clone();
        let (input_digest, file_digests) = blocking(move || {
            let mut digests = BTreeMap::new();
            // Each file parameter as given, and the regular file it resolves to (links followed).
            let files = checked.resolve_files().map_err(|errors| EngineError::Params { image: image_ref, errors })?;
            for (f, real) in files {
                let meta = fs::metadata(&real).at(&real)?;
                let (d, _) = kliko_core::hash::hash_file_stable(&real, &meta).map_err(kliko_store::StoreError::from)?;
                digests.insert(f, d);
            }
            let input_digest = match input {
                Input::None => store.put_bytes(ObjectKind::Tree, &Tree::new().encode())?,
                Input::Tree(d) => d,
                Input::Path(p) => {
                    let m = fs::metadata(&p).map_err(|_| EngineError::NoSuchPath { path: p.clone() })?;
                    if !m.is_dir() {
                        return Err(EngineError::NotADir { path: p });
                    }
                    store.hash_path_remembering(&p, &kliko_core::hash::NoProgress, &stat_copy)?.digest
                }
            };
            Ok((input_digest, digests))
        })
        .await?;

        let canonical = params
            .canonical_key_json(|p: &Path| file_digests.get(p).map(|d| d.to_hex()).ok_or(()))
            .map_err(|_| EngineError::Invalid { what: "file parameter".into(), message: "not hashed".into() })?;
        let mut env: BTreeMap<String, String> = base_env().into_iter().collect();
        for (k, v) in &req.env {
            env.insert(k.clone(), v.clone());
        }
        let preimage = ActionPreimage {
            format: ACTION_FORMAT.to_string(),
            image_id: image.info.id.clone(),
            io: io.to_string(),
            cmd: vec![KLIKO_CMD.to_string()],
            env: env.clone(),
            parameters_format: CANONICAL_PARAMS_FORMAT,
            parameters: serde_json::from_slice(&canonical)
                .map_err(|e| EngineError::Invalid { what: "canonical parameters".into(), message: e.to_string() })?,
            input: Some(input_digest),
            salt: req.salt.clone(),
        };
        let key = preimage.key();
        Ok(Prepared {
            image,
            params,
            preimage,
            key,
            input_digest,
            file_digests,
            env: env.into_iter().collect(),
            input_stat,
        })
    }

    /// Run (or reuse) one invocation.
    pub async fn run(&self, req: RunRequest, obs: Arc<dyn Observer>, cancel: CancellationToken) -> Result<RunReport> {
        self.run_with(req, None, None, obs, cancel).await
    }

    /// Holds the index open (see [`IndexHold`]) until released: while it lives, every
    /// `store.db_nowait()` in this process shares one handle instead of opening RocksDB again.
    pub async fn hold_index(&self) -> Result<IndexHold> {
        let store = self.store.clone();
        let hold = blocking(move || Ok(IndexHold { _db: store.db_nowait()? })).await;
        mark("index open");
        hold
    }

    /// [`Engine::run`] with what the caller already has: the image resolved by
    /// [`Engine::image`] (the run then uses exactly that image ID and kliko.yml, for example
    /// the one the command line built its flags from) and an [`IndexHold`] (taken, say, while
    /// the image was being resolved). A hold is released before a container runs or the run
    /// waits for another. Without them, the image is resolved and the index opened at the
    /// same time (a Docker request takes milliseconds; opening RocksDB about as long).
    pub async fn run_with(
        &self,
        req: RunRequest,
        image: Option<crate::ImageMeta>,
        hold: Option<IndexHold>,
        obs: Arc<dyn Observer>,
        cancel: CancellationToken,
    ) -> Result<RunReport> {
        let t0 = Instant::now();
        let (image, hold) = match (image, hold) {
            (Some(i), Some(h)) => (i, h),
            (Some(i), None) => (i, self.hold_index().await?),
            (None, hold) => {
                let held = async {
                    match hold {
                        Some(h) => Ok(h),
                        None => self.hold_index().await,
                    }
                };
                let (image, hold) = tokio::join!(self.image(&req.image), held);
                (image?, hold?)
            }
        };
        mark("image resolved, index open");
        let mut hold = Some(hold);
        let prep = self.prepare_with(&req, image).await?;
        mark("key computed");
        obs.event(&Event::Prepared { key: prep.key });
        let target = self.output_target(&req, &prep);
        if let Some(t) = &target {
            if !req.overwrite && !in_place(&req, &prep, t) && !fsutil::absent_or_empty(t)? {
                return Err(EngineError::OutputNotEmpty { path: t.clone() });
            }
        }
        let leases = self.store.root().join(kliko_store::LEASES_DIR);
        let me = Holder::this_process(fsutil::now_rfc3339(), None);
        let mut waited_on: Option<Holder> = None;
        let mut wait_since = 0u64;
        let mut retried = false;
        loop {
            if !req.no_cache {
                if let Some(report) = self.try_hit(&req, &prep, &target, t0, &obs, waited_on.clone()).await? {
                    return Ok(report);
                }
            }
            if self.store.is_read_only() {
                // It serves hits; a run it does not hold could not be recorded.
                return Err(EngineError::Store(kliko_store::StoreError::ReadOnly {
                    path: self.store.root().to_path_buf(),
                    what: format!(
                        "it holds no result for this run (key `{}`), and a new one cannot be recorded",
                        prep.key
                    ),
                }));
            }
            let attempt = {
                let (dir, key, me) = (leases.clone(), prep.key, me.clone());
                blocking(move || lease::try_acquire(&dir, &key, &me).at(dir)).await?
            };
            match attempt {
                Attempt::Leader(lease) => {
                    // A leader that died (SIGKILL) leaves its container running with nobody
                    // to remove it. We hold the key's lease now, so any container labelled
                    // with the key is such an orphan.
                    mark("lease taken");
                    if lease.inherited() {
                        self.remove_orphans(&prep.key).await;
                        mark("orphans checked");
                    }
                    if !req.no_cache {
                        if let Some(report) = self.try_hit(&req, &prep, &target, t0, &obs, waited_on.clone()).await? {
                            lease.release();
                            return Ok(report);
                        }
                    }
                    // Closing RocksDB takes a moment: let it happen while the container starts.
                    if let Some(h) = hold.take() {
                        tokio::task::spawn_blocking(move || drop(h));
                    }
                    let mut report = self.execute(&req, &prep, &target, lease, &obs, &cancel, t0).await?;
                    report.waited_on = waited_on;
                    return Ok(report);
                }
                Attempt::Busy(holder) => {
                    if waited_on.is_none() {
                        wait_since = now_ms();
                    }
                    if waited_on.as_ref() != Some(&holder) {
                        obs.event(&Event::Waiting { holder: holder.clone() });
                    }
                    waited_on = Some(holder);
                    // The leader needs the index to record its result.
                    drop(hold.take());
                    self.wait_for_lease(&leases, &prep.key, &cancel, &obs).await?;
                    if cancel.is_cancelled() {
                        return Ok(self.cancelled_report(&req, &prep, t0, waited_on));
                    }
                    // A result first: a leader can record its result and still fail after (its
                    // own output folder refused, say); its waiters need only the result.
                    if !req.no_cache {
                        if let Some(report) = self.try_hit(&req, &prep, &target, t0, &obs, waited_on.clone()).await? {
                            return Ok(report);
                        }
                    }
                    if let Some(f) = lease::failure_since(&leases, &prep.key, wait_since) {
                        if !req.retry_failed || retried {
                            return Ok(self.leader_failed_report(&req, &prep, t0, waited_on, f));
                        }
                        retried = true;
                        obs.event(&Event::Warning(format!(
                            "the run we waited on failed ({}); running it again here (`--retry-failed`)",
                            f.outcome
                        )));
                    }
                }
            }
        }
    }

    /// Remove the containers of `key` made with this store: called, holding the key's lease,
    /// by a leader that inherited it from a holder that died, before and after its own run.
    async fn remove_orphans(&self, key: &Digest) {
        let Ok(docker) = self.docker().await else { return };
        let Some(store) = self.store.root().to_str() else { return };
        if let Ok(found) = docker.labelled_containers(STORE_LABEL, store).await {
            let key = key.to_hex();
            for c in found.iter().filter(|c| c.labels.get(KEY_LABEL) == Some(&key)) {
                let _ = docker.remove(&c.id).await;
            }
        }
    }

    /// Remove every container made with this store whose run is over (its key's lease is free,
    /// so the process that created it has ended), and every container made to read a file out
    /// of an image by a process on this host that is gone. Normally each process removes its
    /// own; one killed at the wrong moment cannot. `kliko gc` calls this. Returns the ids removed.
    pub async fn remove_dead_containers(&self) -> Result<Vec<String>> {
        let Some(store) = self.store.root().to_str() else { return Ok(Vec::new()) };
        let docker = self.docker().await?;
        let mut removed = Vec::new();
        // Containers made only to read a file out of an image, by a process now gone.
        for c in docker.labelled_containers(kliko_runtime::MANAGED_LABEL, "true").await? {
            if c.labels.get(kliko_runtime::OWNER_LABEL).is_some_and(|o| kliko_runtime::owner_is_gone(o)) {
                docker.remove(&c.id).await?;
                removed.push(c.id);
            }
        }
        let found = docker.labelled_containers(STORE_LABEL, store).await?;
        let leases = self.store.root().join(kliko_store::LEASES_DIR);
        for c in found {
            let Some(key) = c.labels.get(KEY_LABEL).and_then(|k| k.parse::<Digest>().ok()) else { continue };
            let (dir, k) = (leases.clone(), key);
            if blocking(move || Ok(lease::is_free(&dir, &k))).await? {
                docker.remove(&c.id).await?;
                removed.push(c.id);
            }
        }
        Ok(removed)
    }

    /// Wait until nobody holds the lease (or we are cancelled), showing the leader's logs as
    /// they grow. Never holds the index.
    async fn wait_for_lease(
        &self,
        dir: &Path,
        key: &Digest,
        cancel: &CancellationToken,
        obs: &Arc<dyn Observer>,
    ) -> Result<()> {
        let mut logs = LeaderLogs::default();
        loop {
            let (d, k) = (dir.to_path_buf(), *key);
            let (free, chunks, l) = blocking(move || {
                let free = lease::is_free(&d, &k);
                // After the probe, so the last lines are read once the leader is done.
                let chunks = logs.read_new(lease::holder(&d, &k));
                Ok((free, chunks, logs))
            })
            .await?;
            logs = l;
            for (stream, bytes) in chunks {
                obs.log(stream, &bytes);
            }
            if free {
                return Ok(());
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(lease::POLL) => {}
            }
        }
    }

    fn output_target(&self, req: &RunRequest, prep: &Prepared) -> Option<PathBuf> {
        if req.store_only {
            return None;
        }
        match (&req.output, prep.image.spec.io, &req.input) {
            (Some(o), _, _) => Some(o.clone()),
            (None, IoMode::Join, Input::Path(work)) => Some(work.clone()),
            _ => None,
        }
    }

    async fn try_hit(
        &self,
        req: &RunRequest,
        prep: &Prepared,
        target: &Option<PathBuf>,
        t0: Instant,
        obs: &Arc<dyn Observer>,
        waited_on: Option<Holder>,
    ) -> Result<Option<RunReport>> {
        let store = self.store.clone();
        let key = prep.key;
        // gc.lock (shared) from lookup until the output is placed: gc cannot delete what
        // we are about to hand out.
        let (guard, found) = blocking(move || {
            let guard = store.gc_shared()?;
            let db = store.db_nowait()?;
            Ok((guard, store.lookup(&db, &key)?))
        })
        .await?;
        mark("looked up");
        let Some(result) = found else { return Ok(None) };
        if let Some(t) = target {
            match self.place(req, prep, &result.output, t, None, None).await {
                Ok(()) => {}
                // A stored file no longer matches its digest (or vanished): it is quarantined,
                // nothing was placed, and the result is now incomplete: a miss.
                Err(EngineError::Store(e @ (StoreError::Corrupt { .. } | StoreError::Missing { .. }))) => {
                    obs.event(&Event::Warning(format!(
                        "a stored result for this run is damaged ({e}); it is set aside and the run happens again"
                    )));
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
        obs.event(&Event::Hit { key });
        mark("placed");
        drop(guard);
        let wall_ms = t0.elapsed().as_millis() as u64;
        let entry = HistoryEntry {
            key,
            cache: "hit".into(),
            image_ref: req.image.clone(),
            image_id: prep.image.info.id.clone(),
            at: fsutil::now_rfc3339(),
            wall_ms,
            saved_ms: result.wall_ms,
            exit_code: Some(result.exit_code),
            host: fsutil::hostname(),
            user: fsutil::invoking_user(),
        };
        self.history(entry).await;
        obs.event(&Event::Finished { status: Status::Succeeded, exit_code: 0 });
        Ok(Some(RunReport {
            key,
            cache: Cache::Hit,
            status: Status::Succeeded,
            exit_code: result.exit_code,
            output: Some(result.output),
            output_path: target.clone(),
            image_ref: req.image.clone(),
            image_id: prep.image.info.id.clone(),
            wall_ms,
            saved_ms: result.wall_ms,
            waited_on,
            log_tail: Vec::new(),
            recorded: true,
            warnings: Vec::new(),
            result: Some(result),
        }))
    }

    /// Put stored tree `tree` at `target`, which shows either its old contents or the
    /// complete new ones, never a partial tree.
    ///
    /// `hand_over`: a folder holding exactly that tree (a finished container's output, already
    /// stored by copy), renamed into place instead of materializing the tree again, when it is
    /// on the target's filesystem.
    async fn place(
        &self,
        req: &RunRequest,
        prep: &Prepared,
        tree: &Digest,
        target: &Path,
        hand_over: Option<PathBuf>,
        known: Option<Arc<KnownMarks>>,
    ) -> Result<()> {
        let store = self.store.clone();
        let (tree, target, mode) = (*tree, target.to_path_buf(), req.materialize);
        let in_place = in_place(req, prep, &target);
        let (overwrite, input) = (req.overwrite, prep.input_digest);
        blocking(move || {
            if in_place {
                // The work folder is about to be replaced: store what it holds now, and
                // replace it only if that is exactly the tree this run started from.
                let now = store.ingest(&target, IngestMode::Copy)?;
                if now.digest != input {
                    return Err(EngineError::Invalid {
                        what: target.display().to_string(),
                        message: format!(
                            "the work folder changed while the run went on, so it was left as it is; the result is \
                             stored as tree `{tree}` (`kliko store materialize {tree} DIR` writes it out), and the \
                             folder's current contents as tree `{}`",
                            now.digest
                        ),
                    });
                }
            } else if !overwrite && !fsutil::absent_or_empty(&target)? {
                // Someone wrote into the output folder while the run went on.
                return Err(EngineError::OutputNotEmpty { path: target });
            }
            fsutil::replace_dir(&target, |new| {
                if let Some(from) = &hand_over {
                    if fsutil::hand_over(from, new).is_ok() {
                        return Ok(());
                    }
                }
                match &known {
                    Some(k) => store.materialize_known(&tree, new, mode, k)?,
                    None => store.materialize(&tree, new, mode)?,
                }
                Ok(())
            })
        })
        .await
    }

    async fn history(&self, entry: HistoryEntry) {
        let store = self.store.clone();
        // History is a convenience: a failure to write it must not fail the run.
        let _ = blocking(move || {
            let db = store.db_nowait()?;
            Ok(store.append_history(&db, &entry)?)
        })
        .await;
    }

    fn base_report(&self, req: &RunRequest, prep: &Prepared, t0: Instant, status: Status, exit_code: i64) -> RunReport {
        RunReport {
            key: prep.key,
            cache: Cache::Miss,
            status,
            exit_code,
            output: None,
            output_path: None,
            image_ref: req.image.clone(),
            image_id: prep.image.info.id.clone(),
            wall_ms: t0.elapsed().as_millis() as u64,
            saved_ms: 0,
            waited_on: None,
            log_tail: Vec::new(),
            recorded: false,
            warnings: Vec::new(),
            result: None,
        }
    }

    fn cancelled_report(&self, req: &RunRequest, prep: &Prepared, t0: Instant, waited_on: Option<Holder>) -> RunReport {
        let mut r = self.base_report(req, prep, t0, Status::Cancelled, 130);
        r.waited_on = waited_on;
        r
    }

    fn leader_failed_report(
        &self,
        req: &RunRequest,
        prep: &Prepared,
        t0: Instant,
        waited_on: Option<Holder>,
        f: Failure,
    ) -> RunReport {
        let mut r = self.base_report(req, prep, t0, Status::LeaderFailed, f.exit_code);
        r.waited_on = waited_on;
        r.log_tail = f.log_tail;
        r.warnings.push(format!(
            "the identical run by pid {} on `{}` that this one waited on {}; pass `--retry-failed` to run it again here",
            f.holder.pid, f.holder.host, f.outcome
        ));
        r
    }

    /// The leader's path: run the container and record its result.
    #[allow(clippy::too_many_arguments)]
    async fn execute(
        &self,
        req: &RunRequest,
        prep: &Prepared,
        target: &Option<PathBuf>,
        mut lease: Lease,
        obs: &Arc<dyn Observer>,
        cancel: &CancellationToken,
        t0: Instant,
    ) -> Result<RunReport> {
        let leases = self.store.root().join(kliko_store::LEASES_DIR);
        if self.store.root().to_str().is_none() {
            // Every folder the container gets lives in the store: refuse before anything runs.
            lease.release();
            return Err(EngineError::StoreNotUtf8 { path: self.store.root().to_path_buf() });
        }
        let heartbeat = lease_heartbeat(&lease);
        // Owned by this process until the run ends: gc removes it at once if we are killed.
        let scratch = match self.store.run_folder("run-") {
            Ok(s) => s,
            Err(e) => {
                heartbeat.abort();
                lease.release();
                return Err(e.into());
            }
        };
        let scratch_path = scratch.path().to_path_buf();
        // Waiters show the logs from here while the container runs.
        let _ = lease.announce_logs(&scratch_path);
        let result = self.execute_in(req, prep, target, &scratch_path, obs, cancel, t0).await;
        if lease.inherited() {
            // The dead holder's create request may have reached the daemon only after the
            // check before this run; by now it has landed. (Ours is gone already.)
            self.remove_orphans(&prep.key).await;
        }
        heartbeat.abort();
        // Dropping it removes the folder (a container may have left read-only folders in it).
        let _ = tokio::task::spawn_blocking(move || drop(scratch)).await;
        match result {
            Ok((report, None)) => {
                if report.status == Status::Cancelled {
                    lease.release();
                } else {
                    lease.release_ok(&leases, &prep.key);
                }
                Ok(report)
            }
            Ok((report, Some(failure))) => {
                lease.release_failed(&leases, &prep.key, &failure);
                Ok(report)
            }
            Err(e) => {
                // Its waiters would meet the same trouble (a full disk, an output the store
                // refuses): tell them, as for a failed container, instead of letting each run
                // it again in turn.
                let failure = Failure {
                    holder: Holder::this_process(fsutil::now_rfc3339(), None),
                    at_ms: now_ms(),
                    outcome: format!("failed: {e}"),
                    exit_code: 2,
                    log_tail: Vec::new(),
                };
                lease.release_failed(&leases, &prep.key, &failure);
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn execute_in(
        &self,
        req: &RunRequest,
        prep: &Prepared,
        target: &Option<PathBuf>,
        scratch: &Path,
        obs: &Arc<dyn Observer>,
        cancel: &CancellationToken,
        t0: Instant,
    ) -> Result<(RunReport, Option<Failure>)> {
        let io = prep.image.spec.io;
        let store = self.store.clone();
        // Parameters and parameter files, private to this run.
        let params_json = scratch.join("parameters.json");
        fs::write(&params_json, prep.params.container_json()).at(&params_json)?;
        let param_files = scratch.join("param_files");
        fs::create_dir(&param_files).at(&param_files)?;
        for (host, rel) in prep.params.file_placements() {
            let dest = param_files.join(&rel);
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent).at(parent)?;
            }
            fs::copy(&host, &dest).at(&host)?;
            let meta = fs::metadata(&dest).at(&dest)?;
            let (d, _) = kliko_core::hash::hash_file_stable(&dest, &meta).map_err(kliko_store::StoreError::from)?;
            if prep.file_digests.get(&host) != Some(&d) {
                return Err(EngineError::ParamFileChanged { path: host });
            }
        }
        let mut mounts = vec![
            Mount { host: params_json.clone(), container: "/parameters.json".into(), read_only: true },
            Mount { host: param_files.clone(), container: "/param_files".into(), read_only: true },
        ];
        let output_dir = match io {
            IoMode::Split => scratch.join("output"),
            IoMode::Join => scratch.join("work"),
        };
        let image_user = !matches!(req.user, UserChoice::Invoker);
        match io {
            IoMode::Split => {
                let input_mount = match &req.input {
                    Input::Path(p) => {
                        let abs = std::path::absolute(p).at(p)?;
                        if abs.to_str().is_some() {
                            abs
                        } else {
                            // The runtime's API carries paths as UTF-8 strings: mount a name
                            // in the run folder that leads to the folder we hashed.
                            let link = scratch.join("input-link");
                            std::os::unix::fs::symlink(&abs, &link).at(&link)?;
                            link
                        }
                    }
                    Input::None | Input::Tree(_) => {
                        let dir = scratch.join("input");
                        let (s, d, dir2) = (store.clone(), prep.input_digest, dir.clone());
                        blocking(move || {
                            let _gc = s.gc_shared()?;
                            Ok(s.materialize(&d, &dir2, MaterializeMode::ReadOnlyMount)?)
                        })
                        .await?;
                        dir
                    }
                };
                mounts.push(Mount { host: input_mount, container: "/input".into(), read_only: true });
                fs::create_dir(&output_dir).at(&output_dir)?;
            }
            IoMode::Join => {
                // The container changes its work tree in place: give it a private copy, made
                // from the store so that what it sees is exactly the tree the key names (and
                // the user's original stays recoverable by digest).
                let (s, input, d, dir) = (store.clone(), req.input.clone(), prep.input_digest, output_dir.clone());
                blocking(move || {
                    let _gc = s.gc_shared()?;
                    if let Input::Path(p) = &input {
                        let ingested = s.ingest(p, IngestMode::Copy)?;
                        if ingested.digest != d {
                            return Err(EngineError::Invalid {
                                what: p.display().to_string(),
                                message: "the work folder changed while the run was being prepared".into(),
                            });
                        }
                    }
                    Ok(s.materialize(&d, &dir, MaterializeMode::Copy)?)
                })
                .await?;
            }
        }
        mounts.push(Mount {
            host: output_dir.clone(),
            container: format!("/{}", if io == IoMode::Split { "output" } else { "work" }),
            read_only: false,
        });
        if image_user {
            // Another uid must be able to write the output folder.
            for e in walk_dirs(&output_dir) {
                let _ = fs::set_permissions(&e, fs::Permissions::from_mode(0o777));
            }
        }
        let user = match &req.user {
            UserChoice::Invoker => {
                let (u, g) = fsutil::uid_gid();
                Some(format!("{u}:{g}"))
            }
            UserChoice::Image => None,
            UserChoice::Explicit(u) => Some(u.clone()),
        };
        let mut labels = req.labels.clone();
        labels.insert(KEY_LABEL.into(), prep.key.to_hex());
        if let Some(root) = self.store.root().to_str() {
            labels.insert(STORE_LABEL.into(), root.to_string());
        }
        labels.insert("io.kliko.image".into(), req.image.clone());
        let spec = ContainerSpec {
            image_id: prep.image.info.id.clone(),
            cmd: vec![KLIKO_CMD.to_string()],
            env: prep.env.clone(),
            mounts,
            user,
            network: req.network.clone(),
            memory_bytes: req.memory_bytes,
            nano_cpus: req.nano_cpus,
            timeout: req.timeout,
            labels,
            name: None,
            workdir: None,
        };

        // Logs: to the observer live, to files for the store, and a tail for messages.
        let stdout_path = scratch.join("stdout.log");
        let stderr_path = scratch.join("stderr.log");
        let (tx, rx) = mpsc::channel::<LogChunk>(256);
        let tail = Arc::new(Mutex::new(Tail::default()));
        let log_task = tokio::spawn(pump_logs(rx, obs.clone(), stdout_path.clone(), stderr_path.clone(), tail.clone()));
        obs.event(&Event::Starting);
        let docker = self.docker().await?;
        mark("scratch ready");
        let ran = docker.run_until_exit(&spec, tx, cancel.clone()).await;
        let logs_ok = log_task.await.map_err(|e| EngineError::Join(e.to_string())).and_then(|r| r);
        // On an error the runtime has removed the container already.
        let (outcome, removal) = ran?;
        // The container is removed in the background while its output is stored; the run is
        // over only when it is gone, whatever happened meanwhile.
        let result = match logs_ok {
            Ok(()) => {
                let logs = RunLogs { stdout: stdout_path, stderr: stderr_path, tail };
                self.after_exit(req, prep, target, &output_dir, outcome, logs, obs, t0).await
            }
            Err(e) => Err(e),
        };
        let removed = removal.finish().await;
        mark("container removed");
        match (result, removed) {
            (Ok((mut report, failure)), Err(e)) => {
                report.warnings.push(format!("the run's container was not removed: {e}"));
                Ok((report, failure))
            }
            (result, _) => result,
        }
    }

    /// After the container stopped: a failure is reported (never cached); a success has its
    /// output and logs stored, its result recorded and its output placed.
    #[allow(clippy::too_many_arguments)]
    async fn after_exit(
        &self,
        req: &RunRequest,
        prep: &Prepared,
        target: &Option<PathBuf>,
        output_dir: &Path,
        outcome: kliko_runtime::RunOutcome,
        logs: RunLogs,
        obs: &Arc<dyn Observer>,
        t0: Instant,
    ) -> Result<(RunReport, Option<Failure>)> {
        let io = prep.image.spec.io;
        let store = self.store.clone();
        let started = outcome.started_at;
        let tail_lines = logs.tail.lock().expect("tail lock").lines();
        let (status, exit_code) = match outcome.outcome {
            Outcome::Exited(0) => (Status::Succeeded, 0),
            Outcome::Exited(n) => (Status::Failed, n),
            Outcome::TimedOut => (Status::TimedOut, 124),
            Outcome::Cancelled => (Status::Cancelled, 130),
        };
        let run_ms = outcome.finished_at.duration_since(outcome.started_at).map(|d| d.as_millis() as u64).unwrap_or(0);
        if status != Status::Succeeded {
            obs.event(&Event::Finished { status, exit_code });
            let mut report = self.base_report(req, prep, t0, status, exit_code);
            report.log_tail = tail_lines.clone();
            if status != Status::Cancelled {
                self.history(HistoryEntry {
                    key: prep.key,
                    cache: "failed".into(),
                    image_ref: req.image.clone(),
                    image_id: prep.image.info.id.clone(),
                    at: fsutil::now_rfc3339(),
                    wall_ms: report.wall_ms,
                    saved_ms: 0,
                    exit_code: Some(exit_code),
                    host: fsutil::hostname(),
                    user: fsutil::invoking_user(),
                })
                .await;
            }
            let failure = (status != Status::Cancelled).then(|| Failure {
                holder: Holder::this_process(fsutil::rfc3339(started), None),
                at_ms: now_ms(),
                outcome: match status {
                    Status::TimedOut => "timed out".into(),
                    _ => format!("exited with code {exit_code}"),
                },
                exit_code,
                log_tail: tail_lines,
            });
            return Ok((report, failure));
        }

        obs.event(&Event::Ingesting);
        // Where the output would be placed by copying (as root, on another filesystem, or
        // with `--materialize copy`), the store keeps copies and the user gets the container's
        // own files, renamed into place: the same bytes, created once instead of twice.
        let hand_over = match (io, target) {
            (IoMode::Split, Some(t)) if req.user == UserChoice::Invoker => {
                let parent = t.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
                matches!(store.placement(parent, req.materialize), Ok(MaterializeMode::Copy))
            }
            _ => false,
        };
        let output_mode = if hand_over { IngestMode::Copy } else { IngestMode::Move };
        let (s, out, so, se) = (store.clone(), output_dir.to_path_buf(), logs.stdout.clone(), logs.stderr.clone());
        // gc.lock (shared) from the first published object until the result is recorded and
        // placed: gc never sees published-but-unrecorded objects. The index (for the input
        // re-check, the record and the history) opens meanwhile.
        let ingest = blocking(move || {
            let guard = s.gc_shared()?;
            let paths =
                [(out.as_path(), output_mode), (so.as_path(), IngestMode::Move), (se.as_path(), IngestMode::Move)];
            let mut all = s.ingest_many(&paths)?.into_iter();
            let (ingested, stdout, stderr) = (all.next(), all.next(), all.next());
            let (Some(ingested), Some(stdout), Some(stderr)) = (ingested, stdout, stderr) else {
                unreachable!("ingest_many returns one result per path")
            };
            // What the blobs this run added look like now: placing the output trusts these
            // (and hashes any other blob) instead of opening the index.
            let known = s.marks_of(&ingested.new_blobs);
            Ok((guard, ingested, stdout, stderr, known))
        });
        let (gc_guard, ingested, stdout, stderr, known) = ingest.await?;
        let known = Arc::new(known);
        mark("ingested");
        let result = ActionResult {
            key: prep.key,
            preimage: prep.preimage.clone(),
            output: ingested.digest,
            output_files: ingested.files,
            output_bytes: ingested.bytes,
            exit_code: 0,
            stdout: stdout.digest,
            stderr: stderr.digest,
            stdout_bytes: stdout.bytes,
            stderr_bytes: stderr.bytes,
            started_at: fsutil::rfc3339(outcome.started_at),
            finished_at: fsutil::rfc3339(outcome.finished_at),
            wall_ms: run_ms,
            image_ref: req.image.clone(),
            image_id: prep.image.info.id.clone(),
            repo_tags: prep.image.info.repo_tags.clone(),
            repo_digests: prep.image.info.repo_digests.clone(),
            input_path: match &req.input {
                Input::Path(p) => Some(std::path::absolute(p).unwrap_or_else(|_| p.clone()).display().to_string()),
                _ => None,
            },
            parameters_given: params_given(prep),
            host: fsutil::hostname(),
            user: fsutil::invoking_user(),
            kliko_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        // Recording and placing the output are independent: do both at once. The result is
        // recorded in the store's journal (see `kliko_store::JOURNAL_DIR`): this run does not
        // open the index again after its container.
        let record = async {
            // A split input is mounted from the user's folder: if it changed during the run,
            // the output may not belong to the key's input. Keep the output, but do not cache
            // it. The stat records from hashing it before the run make this check cheap.
            let changed_input = match (io, &req.input) {
                (IoMode::Split, Input::Path(p)) => Some(p.clone()),
                _ => None,
            };
            let (s, r, expected, stat) = (store.clone(), result.clone(), prep.input_digest, prep.input_stat.clone());
            let history = HistoryEntry {
                key: prep.key,
                cache: "miss".into(),
                image_ref: req.image.clone(),
                image_id: prep.image.info.id.clone(),
                at: fsutil::now_rfc3339(),
                wall_ms: t0.elapsed().as_millis() as u64,
                saved_ms: 0,
                exit_code: Some(0),
                host: fsutil::hostname(),
                user: fsutil::invoking_user(),
            };
            blocking(move || {
                if let Some(p) = changed_input {
                    let hasher = kliko_core::hash::Hasher {
                        cache: &*stat,
                        progress: &kliko_core::hash::NoProgress,
                        collect: false,
                    };
                    let now = hasher.hash_path(&p).map_err(kliko_store::StoreError::from)?;
                    if now.digest != expected {
                        // Not cached, but it did run: it goes into the history all the same.
                        let _ = s.db_nowait().and_then(|db| s.append_history(&db, &history));
                        return Ok(false);
                    }
                }
                s.journal_result(&r, Some(&history))?;
                mark("journaled");
                Ok(true)
            })
            .await
        };
        let place = async {
            match target {
                Some(t) => {
                    let from = hand_over.then(|| output_dir.to_path_buf());
                    let placed = self.place(req, prep, &result.output, t, from, Some(known.clone())).await;
                    mark("placed");
                    placed
                }
                None => Ok(()),
            }
        };
        let (recorded, placed) = tokio::join!(record, place);
        let recorded = recorded?;
        placed?;
        mark("recorded and placed");
        drop(gc_guard);
        let mut warnings = Vec::new();
        if !recorded {
            let w = "the input folder changed while the container ran: the output is kept but not cached".to_string();
            obs.event(&Event::Warning(w.clone()));
            warnings.push(w);
        }
        obs.event(&Event::Finished { status: Status::Succeeded, exit_code: 0 });
        let mut report = self.base_report(req, prep, t0, Status::Succeeded, 0);
        report.output = Some(result.output);
        report.output_path = target.clone();
        report.recorded = recorded;
        report.warnings = warnings;
        report.result = Some(result);
        Ok((report, None))
    }
}

/// A waiter's view of the leader's log files: what it has read of each so far.
#[derive(Default)]
struct LeaderLogs {
    dir: Option<PathBuf>,
    /// Open log files; an open file keeps being readable after ingest moves it into the store.
    files: Vec<(Stream, fs::File)>,
}

impl LeaderLogs {
    /// Whatever the leader's logs gained since the last call (a new leader starts afresh).
    fn read_new(&mut self, holder: Option<Holder>) -> Vec<(Stream, Vec<u8>)> {
        use std::io::Read;
        if let Some(dir) = holder.and_then(|h| h.logs) {
            if self.dir.as_ref() != Some(&dir) {
                self.dir = Some(dir);
                self.files.clear();
            }
        }
        let Some(dir) = &self.dir else { return Vec::new() };
        for (stream, name) in [(Stream::Stdout, "stdout.log"), (Stream::Stderr, "stderr.log")] {
            if !self.files.iter().any(|(s, _)| *s == stream) {
                if let Ok(f) = fs::File::open(dir.join(name)) {
                    self.files.push((stream, f));
                }
            }
        }
        let mut out = Vec::new();
        for (stream, f) in &mut self.files {
            let mut buf = Vec::new();
            if f.read_to_end(&mut buf).is_ok() && !buf.is_empty() {
                out.push((*stream, buf));
            }
        }
        out
    }
}

/// Where a run's logs went.
struct RunLogs {
    stdout: PathBuf,
    stderr: PathBuf,
    tail: Arc<Mutex<Tail>>,
}

/// A join run whose result goes back into its own work folder.
fn in_place(req: &RunRequest, prep: &Prepared, target: &Path) -> bool {
    prep.image.spec.io == IoMode::Join && matches!(&req.input, Input::Path(p) if p == target)
}

fn walk_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(rd) = fs::read_dir(&out[i]) {
            out.extend(rd.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
        }
        i += 1;
    }
    out
}

/// Parameters as given, host paths included, for provenance.
fn params_given(prep: &Prepared) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (name, v) in prep.params.iter() {
        m.insert(name.to_string(), serde_json::to_value(v).unwrap_or(serde_json::Value::Null));
    }
    serde_json::Value::Object(m)
}

/// Aborts its task when dropped, so a dropped run future never leaves a heartbeat renewing a
/// lease nobody holds.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    fn abort(&self) {
        self.0.abort();
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn lease_heartbeat(lease: &Lease) -> AbortOnDrop {
    let beat = lease.heartbeat_handle();
    AbortOnDrop(tokio::spawn(async move {
        let mut tick = tokio::time::interval(lease::HEARTBEAT);
        loop {
            tick.tick().await;
            if let Some(f) = &beat {
                let _ = f.set_modified(std::time::SystemTime::now());
            }
        }
    }))
}

#[derive(Default)]
struct Tail {
    lines: VecDeque<String>,
    partial: [Vec<u8>; 2],
}

impl Tail {
    fn push(&mut self, stream: Stream, bytes: &[u8]) {
        let buf = &mut self.partial[stream as usize];
        buf.extend_from_slice(bytes);
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            self.lines.push_back(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
            if self.lines.len() > TAIL_LINES {
                self.lines.pop_front();
            }
        }
    }

    fn lines(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lines.iter().cloned().collect();
        for p in &self.partial {
            if !p.is_empty() {
                v.push(String::from_utf8_lossy(p).into_owned());
            }
        }
        let skip = v.len().saturating_sub(TAIL_LINES);
        v.into_iter().skip(skip).collect()
    }
}

async fn pump_logs(
    mut rx: mpsc::Receiver<LogChunk>,
    obs: Arc<dyn Observer>,
    stdout: PathBuf,
    stderr: PathBuf,
    tail: Arc<Mutex<Tail>>,
) -> Result<()> {
    let mut out = fs::File::create(&stdout).at(&stdout)?;
    let mut err = fs::File::create(&stderr).at(&stderr)?;
    while let Some(chunk) = rx.recv().await {
        obs.log(chunk.stream, &chunk.bytes);
        tail.lock().expect("tail lock").push(chunk.stream, &chunk.bytes);
        match chunk.stream {
            Stream::Stdout => out.write_all(&chunk.bytes).at(&stdout)?,
            Stream::Stderr => err.write_all(&chunk.bytes).at(&stderr)?,
        }
    }
    out.sync_all().at(&stdout)?;
    err.sync_all().at(&stderr)?;
    Ok(())
}
