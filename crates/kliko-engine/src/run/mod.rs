//! The run lifecycle, in named stages:
//!
//! | stage | file |
//! | --- | --- |
//! | the key: image, parameters, digests | `prepare.rs` |
//! | a stored result served and placed | `hit.rs` |
//! | the leader: container, ingest, record | `leader.rs` |
//! | the container's sandbox and spec | `sandbox.rs` |
//! | waiting on another leader's lease | `wait.rs` |
//! | following a run another machine leads (a cluster job) | `follow.rs` |
//! | logs: files, tail, live | `logs.rs` |
//! | reports and history entries | `report.rs` |
//!
//! This file holds the state machine that ties them: hit → lease → (lead | wait → hit again).

mod follow;
mod hit;
mod leader;
mod logs;
mod prepare;
mod report;
mod sandbox;
mod wait;

pub use follow::Followed;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use kliko_core::trace::mark;
use kliko_core::Digest;
use kliko_spec::IoMode;
use kliko_store::lease::{Attempt, Holder};
use kliko_store::records::now_ms;
use tokio_util::sync::CancellationToken;

use crate::error::{blocking, EngineError, Result};
use crate::fsutil;
use crate::{Engine, Event, Input, Observer, Prepared, RunReport, RunRequest, KEY_LABEL, STORE_LABEL};

/// The index kept open across the steps of a run that each use it (image, hashing, lookup,
/// history): opening RocksDB replays its log and writes a new manifest, milliseconds each
/// time. It is opened with `store.db_for_lookup()`: a read-only view (about a millisecond)
/// unless a writer has something to apply, then for writing if no other process has it, else
/// read-only at once (a run never queues behind another process's use of the index).
/// A writer excludes other writers, so a hold is dropped before a container runs and before
/// waiting on another process's lease. An open index holds gc.lock (shared) itself, so gc
/// cannot start meanwhile.
pub struct IndexHold {
    _db: kliko_store::Db,
}

/// What every stage of one run shares.
/// Passes everything on, and keeps the warnings.
struct CollectWarnings {
    inner: Arc<dyn Observer>,
    said: std::sync::Mutex<Vec<String>>,
}

impl Observer for CollectWarnings {
    fn log(&self, stream: crate::Stream, bytes: &[u8]) {
        self.inner.log(stream, bytes);
    }
    fn event(&self, event: &Event) {
        if let Event::Warning(w) = event {
            self.said.lock().expect("warnings lock").push(w.clone());
        }
        self.inner.event(event);
    }
}

pub(crate) struct RunCtx<'a> {
    pub req: &'a RunRequest,
    pub prep: &'a Prepared,
    /// Where the output goes on the host, if anywhere.
    pub target: &'a Option<PathBuf>,
    pub obs: &'a Arc<dyn Observer>,
    pub cancel: &'a CancellationToken,
    pub t0: Instant,
}

impl Engine {
    /// Run (or reuse) one invocation.
    pub async fn run(&self, req: RunRequest, obs: Arc<dyn Observer>, cancel: CancellationToken) -> Result<RunReport> {
        self.run_with(req, None, None, obs, cancel).await
    }

    /// Holds the index open (see [`IndexHold`]) until released: while it lives, every
    /// `store.db_nowait()` in this process shares one handle instead of opening RocksDB again.
    pub async fn hold_index(&self) -> Result<IndexHold> {
        let store = self.store.clone();
        let hold = blocking(move || Ok(IndexHold { _db: store.db_for_lookup()? })).await;
        mark("index open");
        hold
    }

    /// [`Engine::run`] with what the caller already has: the image resolved by
    /// [`Engine::image`] (the run then uses exactly that image ID and kliko.yml, for example
    /// the one the command line built its flags from) and an [`IndexHold`] (taken, say, while
    /// the image was being resolved). A hold is released before a container runs or the run
    /// waits for another. Without them, the image is resolved and the index opened at the
    /// same time (a runtime request takes milliseconds; opening RocksDB about as long).
    pub async fn run_with(
        &self,
        req: RunRequest,
        image: Option<crate::ImageMeta>,
        hold: Option<IndexHold>,
        obs: Arc<dyn Observer>,
        cancel: CancellationToken,
    ) -> Result<RunReport> {
        // Every warning said during the run is in its report too (and in `--json`).
        let collect = Arc::new(CollectWarnings { inner: obs, said: std::sync::Mutex::new(Vec::new()) });
        let mut report = self.run_observed(req, image, hold, collect.clone(), cancel).await?;
        for w in collect.said.lock().expect("warnings lock").drain(..) {
            if !report.warnings.contains(&w) {
                report.warnings.push(w);
            }
        }
        Ok(report)
    }

    async fn run_observed(
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
                let (image, hold) = tokio::join!(self.image_in(&req.image, req.runtime), held);
                (image?, hold?)
            }
        };
        mark("image resolved, index open");
        let mut hold = Some(hold);
        let prep = self.prepare_with(&req, image).await?;
        mark("key computed");
        obs.event(&Event::Prepared { key: prep.key });
        let target = output_target(&req, &prep);
        if let Some(t) = &target {
            if !req.overwrite && !in_place(&req, &prep, t) && !fsutil::absent_or_empty(t)? {
                return Err(EngineError::OutputNotEmpty { path: t.clone() });
            }
        }
        let ctx = RunCtx { req: &req, prep: &prep, target: &target, obs: &obs, cancel: &cancel, t0 };
        let me = Holder::this_process(fsutil::now_rfc3339(), None);
        let mut waited_on: Option<Holder> = None;
        let mut wait_since = 0u64;
        let mut retried = false;
        loop {
            if !req.no_cache {
                if let Some(report) = self.try_hit(&ctx, waited_on.clone()).await? {
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
            // The tier's first request before its leases are used (a `--no-cache` run has not
            // looked it up): a misconfigured tier is an error before anything runs.
            self.usable_remote(&*obs).await?;
            let attempt = {
                let (leases, key, me) = (self.leases().clone(), prep.key, me.clone());
                blocking(move || leases.try_acquire(&key, &me).map_err(|source| EngineError::Lease { key, source }))
                    .await?
            };
            if let Some(w) = self.tier_leases.as_ref().and_then(|t| t.take_warning()) {
                obs.event(&Event::Warning(w));
            }
            match attempt {
                Attempt::Leader(lease) => {
                    mark("lease taken");
                    // A leader that died (SIGKILL) leaves its container running with nobody
                    // to remove it. We hold the key's lease now, so any container labelled
                    // with the key is such an orphan.
                    if lease.inherited() {
                        self.remove_orphans(&prep.key).await;
                        mark("orphans checked");
                    }
                    if !req.no_cache {
                        if let Some(report) = self.try_hit(&ctx, waited_on.clone()).await? {
                            release(lease, kliko_store::lease::Release::Abandoned).await;
                            return Ok(report);
                        }
                    }
                    // Closing RocksDB takes a moment: let it happen while the container starts.
                    if let Some(h) = hold.take() {
                        tokio::task::spawn_blocking(move || drop(h));
                    }
                    let mut report = self.lead(&ctx, lease).await?;
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
                    if let Some(h) = hold.take() {
                        blocking(move || {
                            drop(h);
                            Ok(())
                        })
                        .await?;
                    }
                    self.wait_for_lease(&prep.key, &cancel, &obs).await?;
                    if cancel.is_cancelled() {
                        return Ok(ctx.cancelled_report(waited_on));
                    }
                    // A result first: a leader can record its result and still fail after (its
                    // own output folder refused, say); its waiters need only the result.
                    if !req.no_cache {
                        if let Some(report) = self.try_hit(&ctx, waited_on.clone()).await? {
                            return Ok(report);
                        }
                    }
                    let failure = {
                        let (leases, key) = (self.leases().clone(), prep.key);
                        blocking(move || Ok(leases.failure_since(&key, wait_since))).await?
                    };
                    if let Some(f) = failure {
                        if !req.retry_failed || retried {
                            return Ok(ctx.leader_failed_report(waited_on, f));
                        }
                        retried = true;
                        obs.event(&Event::Warning(format!(
                            "the run we waited on failed ({}); running it again here, as asked",
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
        let Ok(runtime) = self.runtime().await else { return };
        let Some(store) = self.store.root().to_str() else { return };
        if let Ok(found) = runtime.labelled_containers(STORE_LABEL, store).await {
            let key = key.to_hex();
            for c in found.iter().filter(|c| c.labels.get(KEY_LABEL) == Some(&key)) {
                let _ = runtime.remove(&c.id).await;
            }
        }
    }

    /// Remove every container made with this store whose run is over (its key's lease is free,
    /// so the process that created it has ended), and every container made to read a file out
    /// of an image by a process on this host that is gone. Normally each process removes its
    /// own; one killed at the wrong moment cannot. `kliko gc` calls this. Returns the ids removed.
    pub async fn remove_dead_containers(&self) -> Result<Vec<String>> {
        let Some(store) = self.store.root().to_str() else { return Ok(Vec::new()) };
        let runtime = self.runtime().await?;
        let mut removed = Vec::new();
        // Containers made only to read a file out of an image, by a process now gone.
        for c in runtime.labelled_containers(kliko_runtime::MANAGED_LABEL, "true").await? {
            if c.labels.get(kliko_runtime::OWNER_LABEL).is_some_and(|o| kliko_runtime::owner_is_gone(o)) {
                runtime.remove(&c.id).await?;
                removed.push(c.id);
            }
        }
        for c in runtime.labelled_containers(STORE_LABEL, store).await? {
            let Some(key) = c.labels.get(KEY_LABEL).and_then(|k| k.parse::<Digest>().ok()) else { continue };
            let leases = self.leases().clone();
            if blocking(move || Ok(leases.is_free(&key))).await? {
                runtime.remove(&c.id).await?;
                removed.push(c.id);
            }
        }
        Ok(removed)
    }
}

/// Let go of a lease off the async threads.
async fn release(lease: Box<dyn kliko_store::lease::Lease>, how: kliko_store::lease::Release) {
    let _ = tokio::task::spawn_blocking(move || lease.release(how)).await;
}

fn output_target(req: &RunRequest, prep: &Prepared) -> Option<PathBuf> {
    if req.store_only {
        return None;
    }
    match (&req.output, prep.image.spec.io, &req.input) {
        (Some(o), _, _) => Some(o.clone()),
        (None, IoMode::Join, Input::Path(work)) => Some(work.clone()),
        _ => None,
    }
}

/// A join run whose result goes back into its own work folder.
fn in_place(req: &RunRequest, prep: &Prepared, target: &Path) -> bool {
    prep.image.spec.io == IoMode::Join && matches!(&req.input, Input::Path(p) if p == target)
}
