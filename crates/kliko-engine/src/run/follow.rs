//! Following a run that another machine leads: a cluster job a dispatcher handed the run to.
//! The dispatcher never leads it here; it learns the outcome from the shared tier (the result
//! record, or the failure record the leader leaves), shows the leader's logs from the tier as
//! they grow, and hears from its caller when the job ended without either (the scheduler
//! knows that, the tier does not).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kliko_core::trace::mark;
use tokio_util::sync::CancellationToken;

use super::wait::LeaderLogs;
use super::{output_target, RunCtx};
use crate::error::{blocking, Result};
use crate::{Cache, Engine, Event, ImageMeta, Observer, Prepared, RunReport, RunRequest, Status};

/// How a followed run ended, as the tier tells it.
#[derive(Debug)]
pub enum Followed {
    /// Its result is recorded (by the machine it ran on) and is now in this store too. The
    /// report is a miss: the run happened, elsewhere.
    Recorded(RunReport),
    /// Its leader recorded a failure: exit code, outcome and log tail are in the report.
    Failed(RunReport),
    /// Cancelled here, before either.
    Cancelled(RunReport),
    /// The caller said the job ended, and the tier holds neither a result nor a failure for
    /// it (asked again after): the job died before it could say (the caller knows why).
    Ended(RunReport),
}

/// Ask the tier every second at first, then less often: a long run in a queue of hundreds
/// should not cost the tier several requests a second each.
fn interval(polls: u32) -> Duration {
    if polls < 30 {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(3)
    }
}

/// Looks after the job ended: a record written just before may take a moment to be seen.
const LAST_LOOKS: u32 = 3;

impl Engine {
    /// Compute the key of `req` and look its result up (here, then on the shared tier),
    /// running nothing: `(prepared, Some(hit))`, or `(prepared, None)` for a miss (or when
    /// the request says `no_cache`).
    pub async fn lookup(
        &self,
        req: &RunRequest,
        image: Option<ImageMeta>,
        obs: &Arc<dyn Observer>,
    ) -> Result<(Prepared, Option<RunReport>)> {
        let t0 = Instant::now();
        let image = match image {
            Some(i) => i,
            None => self.image_in(&req.image, req.runtime).await?,
        };
        let prep = self.prepare_with(req, image).await?;
        obs.event(&Event::Prepared { key: prep.key });
        if req.no_cache {
            return Ok((prep, None));
        }
        let target = output_target(req, &prep);
        let cancel = CancellationToken::new();
        let ctx = RunCtx { req, prep: &prep, target: &target, obs, cancel: &cancel, t0 };
        let hit = self.try_hit(&ctx, None).await?;
        Ok((prep, hit))
    }

    /// Wait for the outcome of run `prep` that another machine leads (see the module docs),
    /// showing its logs to `obs` as they reach the tier. `since_ms`: when it was handed over
    /// (a failure recorded before is not this attempt's). `ended`: cancelled by the caller
    /// when the job is over, whatever the tier says. `cancel`: stop waiting (Ctrl-C).
    pub async fn follow(
        &self,
        req: &RunRequest,
        prep: &Prepared,
        since_ms: u64,
        obs: &Arc<dyn Observer>,
        cancel: &CancellationToken,
        ended: &CancellationToken,
    ) -> Result<Followed> {
        let t0 = Instant::now();
        let target = output_target(req, prep);
        let ctx = RunCtx { req, prep, target: &target, obs, cancel, t0 };
        let mut logs = LeaderLogs::default();
        let (mut polls, mut after_end) = (0u32, 0u32);
        loop {
            if let Some(mut r) = self.take_result(&ctx, None, true).await? {
                mark("followed run recorded");
                r.cache = Cache::Miss;
                r.saved_ms = 0;
                return Ok(Followed::Recorded(r));
            }
            let (leases, key) = (self.leases().clone(), prep.key);
            let (failure, chunks, l) = blocking(move || {
                // Asked first: it tells the lease backend where the leader's logs are.
                let _ = leases.is_free(&key);
                let chunks = logs.read(&*leases, &key);
                Ok((leases.failure_since(&key, since_ms), chunks, logs))
            })
            .await?;
            logs = l;
            for (stream, bytes) in chunks {
                obs.log(stream, &bytes);
            }
            if let Some(f) = failure {
                let status = match f.outcome.as_str() {
                    "timed out" => Status::TimedOut,
                    "cancelled" => Status::Cancelled,
                    _ => Status::Failed,
                };
                let mut r = ctx.base_report(status, f.exit_code);
                r.log_tail = f.log_tail;
                r.reason = Some(format!("on `{}`: {}", f.holder.host, f.outcome));
                obs.event(&Event::Finished { status, exit_code: f.exit_code });
                return Ok(Followed::Failed(r));
            }
            if ended.is_cancelled() {
                if after_end >= LAST_LOOKS {
                    return Ok(Followed::Ended(ctx.base_report(Status::Failed, -1)));
                }
                after_end += 1;
            }
            polls += 1;
            tokio::select! {
                _ = cancel.cancelled() => return Ok(Followed::Cancelled(ctx.cancelled_report(None))),
                _ = ended.cancelled(), if after_end == 0 => {}
                _ = tokio::time::sleep(interval(polls)) => {}
            }
        }
    }
}

impl Engine {
    /// If another process or machine leads `prep`'s key now (its lease is held: here, or on
    /// the shared tier, judged alive on this machine's clock), follow that run as
    /// [`Engine::follow`] does, until its outcome, or until its lease is let go or judged
    /// dead without one ([`Followed::Ended`]: look again, and lead it if nobody does).
    /// `None` when nobody leads it: the caller may start the run (a dispatcher submits it).
    pub async fn follow_in_flight(
        &self,
        req: &RunRequest,
        prep: &Prepared,
        obs: &Arc<dyn Observer>,
        cancel: &CancellationToken,
    ) -> Result<Option<Followed>> {
        let (leases, key) = (self.leases().clone(), prep.key);
        let (free, holder) = blocking(move || Ok((leases.is_free(&key), leases.holder(&key)))).await?;
        if free {
            return Ok(None);
        }
        mark("another run of this key is in flight: following it");
        if let Some(holder) = holder {
            obs.event(&Event::Waiting { holder });
        }
        // The run is over for us once its lease is free again: asked every second or two (a
        // lease on the tier is asked at most once a second however often this polls).
        let ended = CancellationToken::new();
        let watch = {
            let (leases, ended) = (self.leases().clone(), ended.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    let l = leases.clone();
                    if tokio::task::spawn_blocking(move || l.is_free(&key)).await.unwrap_or(true) {
                        ended.cancel();
                        return;
                    }
                }
            })
        };
        let since = kliko_store::records::now_ms();
        let followed = self.follow(req, prep, since, obs, cancel, &ended).await;
        watch.abort();
        followed.map(Some)
    }
}
