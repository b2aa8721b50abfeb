//! A stored result served: looked up, its output placed, the hit recorded in the history.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kliko_core::trace::mark;
use kliko_core::Digest;
use kliko_store::{IngestMode, KnownMarks, StoreError};

use super::report::HistoryKind;
use super::{in_place, RunCtx};
use crate::error::{blocking, EngineError, Result};
use crate::fsutil;
use crate::{Cache, Engine, Event, Holder, RunReport, Status, Tier};

impl Engine {
    /// The stored result of this run, placed at its target, if there is a complete one.
    pub(super) async fn try_hit(&self, ctx: &RunCtx<'_>, waited_on: Option<Holder>) -> Result<Option<RunReport>> {
        self.take_result(ctx, waited_on, false).await
    }

    /// [`Engine::try_hit`]; `followed`: the result is that of a run handed to another machine
    /// for this request (a cluster job), so the history says the run happened (a miss, run
    /// elsewhere), not that a stored result was reused.
    pub(super) async fn take_result(
        &self,
        ctx: &RunCtx<'_>,
        waited_on: Option<Holder>,
        followed: bool,
    ) -> Result<Option<RunReport>> {
        let (req, prep) = (ctx.req, ctx.prep);
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
        let (found, from) = match found {
            Some(r) => (Some(r), Tier::Local),
            None => (self.fetch_remote(ctx).await?, Tier::Remote),
        };
        let Some(result) = found else { return Ok(None) };
        if let Some(t) = ctx.target {
            match self.place(ctx, &result.output, t, None, None).await {
                Ok(()) => {}
                // A stored file no longer matches its digest (or vanished): it is quarantined,
                // nothing was placed, and the result is now incomplete: a miss.
                Err(EngineError::Store(e @ (StoreError::Corrupt { .. } | StoreError::Missing { .. }))) => {
                    ctx.obs.event(&Event::Warning(format!(
                        "a stored result for this run is damaged ({e}); it is set aside and the run happens again"
                    )));
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
        if !followed {
            ctx.obs.event(&Event::Hit { key });
        }
        mark("placed");
        drop(guard);
        let wall_ms = ctx.t0.elapsed().as_millis() as u64;
        let entry = if followed {
            ctx.history_entry(HistoryKind::Miss, wall_ms, 0, Some(result.exit_code))
        } else {
            ctx.history_entry(HistoryKind::Hit, wall_ms, result.wall_ms, Some(result.exit_code))
        };
        self.history(entry).await;
        ctx.obs.event(&Event::Finished { status: Status::Succeeded, exit_code: 0 });
        Ok(Some(RunReport {
            key,
            cache: Cache::Hit,
            status: Status::Succeeded,
            exit_code: result.exit_code,
            output: Some(result.output),
            output_path: ctx.target.clone(),
            image_ref: req.image.clone(),
            image_id: prep.image.info.id.clone(),
            wall_ms,
            saved_ms: result.wall_ms,
            waited_on,
            log_tail: Vec::new(),
            recorded: true,
            hit_from: Some(from),
            published: None,
            publishing: false,
            warnings: Vec::new(),
            reason: None,
            result: Some(result),
        }))
    }

    /// After a local miss: the shared tier's result for this key, if it has a usable one,
    /// fetched into the local store and looked up there. A tier that fails or holds a broken
    /// result is a warning and a miss, never an error: correctness never depends on it.
    async fn fetch_remote(&self, ctx: &RunCtx<'_>) -> Result<Option<kliko_store::records::ActionResult>> {
        let Some(remote) = self.usable_remote(&**ctx.obs).await? else { return Ok(None) };
        if self.store.is_read_only() {
            return Ok(None);
        }
        let key = ctx.prep.key;
        match remote.fetch(&self.store, &key).await {
            Ok(kliko_remote::Fetched::Hit { .. }) => {
                mark("fetched from the shared tier");
                let store = self.store.clone();
                blocking(move || Ok(store.lookup(&store.db_nowait()?, &key)?)).await
            }
            Ok(kliko_remote::Fetched::Absent) => Ok(None),
            Ok(kliko_remote::Fetched::Ignored { reason }) => {
                ctx.obs.event(&Event::Warning(format!(
                    "the shared tier `{}` has a result for this run that is not used: {reason}; the run happens here",
                    remote.url()
                )));
                Ok(None)
            }
            Ok(kliko_remote::Fetched::Unusable { reason }) => {
                ctx.obs.event(&Event::Warning(format!(
                    "the shared tier `{}` has a result for this run that cannot be used ({reason}); the run happens here",
                    remote.url()
                )));
                Ok(None)
            }
            Err(e) => {
                ctx.obs.event(&Event::Warning(format!(
                    "the shared tier could not be used ({}); going on without it",
                    crate::error::chain(&e)
                )));
                Ok(None)
            }
        }
    }

    /// The shared tier, once its first request has answered: a configuration the user must
    /// fix (no such bucket, refused credentials, a folder they may not write) is an error
    /// before anything runs; a tier that does not answer is one warning (said to the first
    /// observer that asks), and this engine goes on without it.
    pub(crate) async fn usable_remote(&self, obs: &dyn crate::Observer) -> Result<Option<&Arc<kliko_remote::Remote>>> {
        let Some((remote, ready, warning)) = self.checked_remote().await? else { return Ok(None) };
        if let Some(w) = warning {
            if !self.remote_warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                obs.event(&Event::Warning(w.clone()));
            }
        }
        Ok(ready.then_some(remote))
    }

    /// [`Engine::usable_remote`] without saying its warning: the tier, whether it answered,
    /// and the warning when it did not.
    pub(crate) async fn checked_remote(&self) -> Result<Option<(&Arc<kliko_remote::Remote>, bool, Option<&String>)>> {
        let Some(remote) = &self.remote else { return Ok(None) };
        let (ready, warning) = self
            .remote_ready
            .get_or_try_init(|| async {
                match remote.preflight().await? {
                    None => Ok::<_, EngineError>((true, None)),
                    Some(warning) => {
                        if let Some(t) = &self.tier_leases {
                            t.disable();
                        }
                        Ok((false, Some(warning)))
                    }
                }
            })
            .await?;
        Ok(Some((remote, *ready, warning.as_ref())))
    }

    /// Put stored tree `tree` at `target`, which shows either its old contents or the
    /// complete new ones, never a partial tree.
    ///
    /// `hand_over`: a folder holding exactly that tree (a finished container's output, already
    /// stored by copy), renamed into place instead of materializing the tree again, when it is
    /// on the target's filesystem.
    pub(super) async fn place(
        &self,
        ctx: &RunCtx<'_>,
        tree: &Digest,
        target: &Path,
        hand_over: Option<PathBuf>,
        known: Option<Arc<KnownMarks>>,
    ) -> Result<()> {
        let store = self.store.clone();
        let (tree, target, mode) = (*tree, target.to_path_buf(), ctx.req.materialize);
        let in_place = in_place(ctx.req, ctx.prep, &target);
        let (overwrite, input) = (ctx.req.overwrite, ctx.prep.input_digest);
        blocking(move || {
            if in_place {
                // The work folder is about to be replaced: store what it holds now, and
                // replace it only if that is exactly the tree this run started from.
                let now = store.ingest(&target, IngestMode::Copy)?;
                if now.digest != input {
                    return Err(EngineError::WorkFolderChanged { path: target, result: tree, now: now.digest });
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
}
