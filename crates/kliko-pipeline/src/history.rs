//! The history of pipeline runs: one record per `kliko pipeline run` (or run from the web),
//! in the store's index beside the history of single runs, so either front end lists the
//! other's.

use std::sync::Arc;

use kliko_store::records::{PipelineRun, PipelineRunStep};
use kliko_store::Store;

use crate::exec::PipelineReport;
use crate::file::Pipeline;
use crate::{blocking, Result};

/// The record of `report`, a run of `p` through the executor named `executor`, started by
/// `via` (`cli`, `web`) at `at` (RFC 3339).
pub fn entry(p: &Pipeline, report: &PipelineReport, executor: &str, via: &str, at: String) -> PipelineRun {
    PipelineRun {
        // Canonical, so the CLI's `./p.yml` and the web's path name the same file.
        file: std::fs::canonicalize(&p.file).unwrap_or_else(|_| p.file.clone()).display().to_string(),
        file_digest: p.digest,
        at,
        executor: executor.to_string(),
        via: via.to_string(),
        ok: report.ok,
        cancelled: report.cancelled,
        wall_ms: report.wall_ms,
        saved_ms: report.saved_ms,
        containers: report.containers,
        host: kliko_engine::hostname(),
        user: kliko_engine::invoking_user(),
        steps: report
            .steps
            .iter()
            .map(|s| PipelineRunStep {
                name: s.name.clone(),
                image: s.image.clone(),
                state: s.state.as_str().to_string(),
                keys: s.result_keys(),
                output: s.output,
                reason: s.reason.clone(),
            })
            .collect(),
    }
}

/// Add `run` to the store's history of pipeline runs.
pub async fn record(store: &Arc<Store>, run: PipelineRun) -> Result<()> {
    let store = store.clone();
    blocking(move || {
        let db = store.db()?;
        Ok(store.append_pipeline_run(&db, &run)?)
    })
    .await
}

/// Pipeline runs, newest first (only those of `file` when given).
pub async fn runs(store: &Arc<Store>, file: Option<String>, limit: usize) -> Result<Vec<PipelineRun>> {
    let store = store.clone();
    blocking(move || {
        if !store.has_index() {
            return Ok(Vec::new());
        }
        let db = store.db()?;
        Ok(store.pipeline_runs(&db, file.as_deref(), limit)?)
    })
    .await
}
