//! What a run says about itself: its report, and its entry in the history.

use kliko_store::lease::{Failure, Holder};
use kliko_store::records::HistoryEntry;

use super::RunCtx;
use crate::error::blocking;
use crate::fsutil;
use crate::{Engine, Prepared, RunReport, Status};

/// What kind of invocation a history entry records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HistoryKind {
    /// A stored result was reused.
    Hit,
    /// The container ran and succeeded.
    Miss,
    /// The container ran and failed (or timed out).
    Failed,
}

impl HistoryKind {
    /// The word the store's history keeps (see cache-format.md).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            HistoryKind::Hit => "hit",
            HistoryKind::Miss => "miss",
            HistoryKind::Failed => "failed",
        }
    }
}

impl RunCtx<'_> {
    /// This run's history entry, as of now.
    pub(super) fn history_entry(
        &self,
        kind: HistoryKind,
        wall_ms: u64,
        saved_ms: u64,
        exit_code: Option<i64>,
    ) -> HistoryEntry {
        HistoryEntry {
            key: self.prep.key,
            cache: kind.as_str().into(),
            image_ref: self.req.image.clone(),
            image_id: self.prep.image.info.id.clone(),
            at: fsutil::now_rfc3339(),
            wall_ms,
            saved_ms,
            exit_code,
            host: fsutil::hostname(),
            user: fsutil::invoking_user(),
        }
    }

    /// A report for a run that did not (or not yet) produce a result.
    pub(super) fn base_report(&self, status: Status, exit_code: i64) -> RunReport {
        let mut r = RunReport::unfinished(self.req, self.prep, status, exit_code);
        r.wall_ms = self.t0.elapsed().as_millis() as u64;
        r
    }

    pub(super) fn cancelled_report(&self, waited_on: Option<Holder>) -> RunReport {
        let mut r = self.base_report(Status::Cancelled, 130);
        r.waited_on = waited_on;
        r
    }

    /// The report of a run whose leader failed: the leader's exit code and log tail. (Front
    /// ends say how to run it again: [`Status::LeaderFailed`].)
    pub(super) fn leader_failed_report(&self, waited_on: Option<Holder>, f: Failure) -> RunReport {
        let mut r = self.base_report(Status::LeaderFailed, f.exit_code);
        r.waited_on = waited_on;
        r.log_tail = f.log_tail;
        r.warnings.push(format!(
            "the identical run by pid {} on `{}` that this one waited on {}",
            f.holder.pid, f.holder.host, f.outcome
        ));
        r
    }
}

impl Engine {
    /// Append to the history. History is a convenience: a failure to write it must not fail
    /// the run.
    pub(super) async fn history(&self, entry: HistoryEntry) {
        let store = self.store.clone();
        let _ = blocking(move || {
            let db = store.db_nowait()?;
            Ok(store.append_history(&db, &entry)?)
        })
        .await;
    }
}

/// Parameters as given, host paths included, for provenance.
pub(super) fn params_given(prep: &Prepared) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (name, v) in prep.params.iter() {
        m.insert(name.to_string(), serde_json::to_value(v).unwrap_or(serde_json::Value::Null));
    }
    serde_json::Value::Object(m)
}
