//! The leader's path: run the container in its sandbox, then store its output and logs,
//! record the result and place the output.

use std::path::Path;
use std::sync::{Arc, Mutex};

use kliko_core::trace::mark;
use kliko_runtime::{LogChunk, Outcome};
use kliko_spec::IoMode;
use kliko_store::lease::{Failure, Holder, Lease, Release};
use kliko_store::records::{now_ms, ActionResult};
use kliko_store::{IngestMode, MaterializeMode};
use tokio::sync::mpsc;

use super::logs::{RunLogs, Tail};
use super::report::{params_given, HistoryKind};
use super::{release, sandbox, RunCtx};
use crate::error::{blocking, EngineError, Result};
use crate::fsutil;
use crate::{Engine, Event, Input, RunReport, Status, UserChoice};

impl Engine {
    /// Lead the run: we hold its lease. The lease is released on every path, saying how the
    /// run ended, so that waiters learn of a failure instead of running it again in turn.
    pub(super) async fn lead(&self, ctx: &RunCtx<'_>, mut lease: Box<dyn Lease>) -> Result<RunReport> {
        if self.store.root().to_str().is_none() {
            // Every folder the container gets lives in the store: refuse before anything runs.
            release(lease, Release::Abandoned).await;
            return Err(EngineError::StoreNotUtf8 { path: self.store.root().to_path_buf() });
        }
        let heartbeat = Heartbeat::start(&*lease);
        // Owned by this process until the run ends: gc removes it at once if we are killed.
        let scratch = match self.store.run_folder("run-") {
            Ok(s) => s,
            Err(e) => {
                drop(heartbeat);
                release(lease, Release::Abandoned).await;
                return Err(e.into());
            }
        };
        let scratch_path = scratch.path().to_path_buf();
        // Waiters show the logs from here while the container runs.
        let (lease, announced) = {
            let dir = scratch_path.clone();
            tokio::task::spawn_blocking(move || {
                let r = lease.announce_logs(&dir);
                (lease, r)
            })
            .await
            .map_err(|e| EngineError::Join(e.to_string()))?
        };
        let _ = announced;
        let result = self.run_container(ctx, &scratch_path).await;
        if lease.inherited() {
            // The dead holder's create request may have reached the daemon only after the
            // check before this run; by now it has landed. (Ours is gone already.)
            self.remove_orphans(&ctx.prep.key).await;
        }
        // Dropping it removes the folder (a container may have left read-only folders in it).
        let _ = tokio::task::spawn_blocking(move || drop(scratch)).await;
        match result {
            Ok((report, None)) if report.publishing => {
                // Published in the background, still holding the lease (and renewing it), so
                // that a machine waiting on it finds the result when it is let go.
                let (remote, store, result) = (self.remote.clone(), self.store.clone(), report.result.clone());
                let (key, image) = (ctx.prep.key, report.image_ref.clone());
                let task = tokio::spawn(async move {
                    let outcome = match (remote, result) {
                        (Some(r), Some(res)) => r.publish(&store, &res).await.map_err(|e| crate::error::chain(&e)),
                        _ => Err("nothing to publish".to_string()),
                    };
                    drop(heartbeat);
                    release(lease, Release::Succeeded).await;
                    crate::Background { key, image, outcome }
                });
                let mut bg = self.background.lock().unwrap_or_else(|p| p.into_inner());
                bg.retain(|h| !h.is_finished());
                bg.push(task);
                Ok(report)
            }
            Ok((report, None)) => {
                drop(heartbeat);
                let how = if report.status == Status::Cancelled { Release::Abandoned } else { Release::Succeeded };
                release(lease, how).await;
                Ok(report)
            }
            Ok((report, Some(failure))) => {
                drop(heartbeat);
                release(lease, Release::Failed(failure)).await;
                Ok(report)
            }
            Err(e) => {
                drop(heartbeat);
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
                release(lease, Release::Failed(failure)).await;
                Err(e)
            }
        }
    }

    /// Build the sandbox, run the container, and deal with its outcome.
    async fn run_container(&self, ctx: &RunCtx<'_>, scratch: &Path) -> Result<(RunReport, Option<Failure>)> {
        let sandbox = {
            let (store, req, prep, dir) =
                (self.store.clone(), ctx.req.clone(), ctx.prep.clone(), scratch.to_path_buf());
            blocking(move || sandbox::build(&store, &req, &prep, &dir)).await?
        };
        let logs = RunLogs {
            stdout: scratch.join("stdout.log"),
            stderr: scratch.join("stderr.log"),
            tail: Arc::new(Mutex::new(Tail::default())),
        };
        let (tx, rx) = mpsc::channel::<LogChunk>(256);
        let log_task = logs.pump(rx, ctx.obs.clone());
        ctx.obs.event(&Event::Starting);
        let runtime = self.runtime_for(ctx.req.runtime).await?;
        mark("scratch ready");
        let ran = runtime.run_until_exit(&sandbox.spec, tx, ctx.cancel.clone()).await;
        let logs_ok = RunLogs::finished(log_task).await;
        // On an error the runtime has removed the container already.
        let (outcome, removal) = ran?;
        // The container is removed in the background while its output is stored; the run is
        // over only when it is gone, whatever happened meanwhile.
        let result = match logs_ok {
            Ok(()) => self.after_exit(ctx, &sandbox.output_dir, outcome, logs).await,
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
    async fn after_exit(
        &self,
        ctx: &RunCtx<'_>,
        output_dir: &Path,
        outcome: kliko_runtime::RunOutcome,
        logs: RunLogs,
    ) -> Result<(RunReport, Option<Failure>)> {
        let (req, prep, target, obs) = (ctx.req, ctx.prep, ctx.target, ctx.obs);
        let io = prep.image.spec.io;
        let store = self.store.clone();
        let started = outcome.started_at;
        let tail_lines = logs.tail.lock().unwrap_or_else(|p| p.into_inner()).lines();
        let (status, exit_code) = match outcome.outcome {
            Outcome::Exited(0) => (Status::Succeeded, 0),
            Outcome::Exited(n) => (Status::Failed, n),
            Outcome::TimedOut => (Status::TimedOut, 124),
            Outcome::Cancelled => (Status::Cancelled, 130),
        };
        let run_ms = outcome.finished_at.duration_since(outcome.started_at).map(|d| d.as_millis() as u64).unwrap_or(0);
        if status != Status::Succeeded {
            obs.event(&Event::Finished { status, exit_code });
            let mut report = ctx.base_report(status, exit_code);
            report.log_tail = tail_lines.clone();
            if status != Status::Cancelled {
                self.history(ctx.history_entry(HistoryKind::Failed, report.wall_ms, 0, Some(exit_code))).await;
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
            runtime: self.runtime_for(req.runtime).await.ok().map(|r| r.describe()),
            gpus: req.gpus.as_ref().map(|g| g.to_string()),
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
            let history = ctx.history_entry(HistoryKind::Miss, ctx.t0.elapsed().as_millis() as u64, 0, Some(0));
            blocking(move || {
                if let Some(p) = changed_input {
                    let probe = s.tmp_dir();
                    let hasher = kliko_core::hash::Hasher {
                        cache: &*stat,
                        clock_probe_dir: Some(&probe),
                        ..kliko_core::hash::Hasher::default()
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
                    let placed = self.place(ctx, &result.output, t, from, Some(known.clone())).await;
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
        // Warnings are said to the observer; `run_with` puts every one in the report.
        // Published before the run is reported done (and before its lease is let go), so
        // a machine waiting on it finds the result; still under gc.lock, so gc cannot take
        // an object from under the upload.
        let mut published = None;
        let usable = self.remote_ready.get().is_none_or(|(ready, _)| *ready);
        let publish = self.remote.as_ref().filter(|r| recorded && usable && !r.is_read_only());
        let in_background = publish.is_some() && self.remote_async;
        if let Some(remote) = publish.filter(|_| !in_background) {
            match remote.publish(&store, &result).await {
                Ok(p) => {
                    mark("published");
                    published = Some(p);
                }
                Err(e) => {
                    let w = format!(
                        "the result is stored here, but publishing it to the shared tier failed ({})",
                        crate::error::chain(&e)
                    );
                    obs.event(&Event::Warning(w));
                }
            }
        }
        drop(gc_guard);
        if !recorded {
            let w = "the input folder changed while the container ran: the output is kept but not cached".to_string();
            obs.event(&Event::Warning(w));
        }
        obs.event(&Event::Finished { status: Status::Succeeded, exit_code: 0 });
        let mut report = ctx.base_report(Status::Succeeded, 0);
        report.output = Some(result.output);
        report.output_path = target.clone();
        report.recorded = recorded;
        report.published = published;
        report.publishing = in_background;
        report.result = Some(result);
        Ok((report, None))
    }
}

/// Renews a lease while a run goes on; stops when dropped, so a dropped run future never
/// leaves a heartbeat renewing a lease nobody holds.
struct Heartbeat(tokio::task::JoinHandle<()>);

impl Heartbeat {
    fn start(lease: &dyn Lease) -> Heartbeat {
        let renew: Arc<dyn Fn() + Send + Sync> = Arc::from(lease.renewer());
        let every = lease.heartbeat();
        Heartbeat(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let r = renew.clone();
                let _ = tokio::task::spawn_blocking(move || r()).await;
            }
        }))
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}
