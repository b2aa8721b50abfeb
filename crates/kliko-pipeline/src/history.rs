//! The history of pipeline runs: one record per `kliko pipeline run` (or run from the web),
//! in the store's index beside the history of single runs, so either front end lists the
//! other's.

use std::sync::Arc;

use kliko_store::records::{PipelineRun, PipelineRunStep};
use kliko_store::Store;

use crate::exec::PipelineReport;
use crate::file::Pipeline;
use crate::{blocking, Result};

/// What the RO-Crate of `report` (a run of `p` started at `started_at`, RFC 3339) describes:
/// every run that made a result (hits included: they made what the pipeline now holds), and
/// the pipeline as the workflow with its steps (a Provenance Run Crate). Also how many runs
/// are left out because they did not succeed. Write it with `kliko_engine::rocrate`.
pub fn ro_crate(
    store: &Store,
    p: &Pipeline,
    report: &PipelineReport,
    started_at: String,
) -> Result<(kliko_engine::provenance::Provenance, kliko_engine::rocrate::CrateOptions, usize)> {
    use kliko_engine::rocrate::{CrateOptions, WorkflowRun, WorkflowStep};
    let steps: Vec<WorkflowStep> =
        report.steps.iter().map(|s| WorkflowStep { name: s.name.clone(), runs: s.result_keys() }).collect();
    let keys: Vec<kliko_core::Digest> = steps.iter().flat_map(|s| s.runs.iter().copied()).collect();
    let query = p.file.display().to_string();
    let prov = kliko_engine::provenance::of_runs(store, &query, p.digest, "pipeline", &keys)?;
    let workflow = WorkflowRun {
        file: p.file.clone(),
        started_at,
        finished_at: kliko_engine::now_rfc3339(),
        ok: report.ok,
        steps,
    };
    let failed = report.steps.iter().flat_map(|s| &s.runs).count() - keys.len();
    Ok((prov, CrateOptions { workflow: Some(workflow), ..Default::default() }, failed))
}

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
