//! Where a pipeline's runs execute: the seam between the pipeline's scheduling (which runs
//! are ready, how many at once, what a failure stops) and the place a run happens.
//!
//! [`InProcess`] runs each one through this process's [`Engine`] (lookup → lease → container
//! → record), as `kliko pipeline run` always has. A cluster executor (Slurm) implements the
//! same trait: it decides hits locally with [`Engine::prepare`] and the store, and hands only
//! misses to the scheduler, whose job runs the same engine path on a node.

use std::sync::Arc;

use async_trait::async_trait;
use kliko_engine::{Engine, EngineError, ImageMeta, Observer, RunReport, RunRequest};
use tokio_util::sync::CancellationToken;

use crate::file::Step;

/// One run a pipeline asks for: a step, or one entry of a `foreach` step.
pub struct StepRun {
    /// The step it belongs to (its resources, its name for labels and job names).
    pub step: Arc<Step>,
    /// The `foreach` entry, if any.
    pub entry: Option<String>,
    /// The folder the step's relative file parameters start in (the pipeline file's).
    pub params_dir: std::path::PathBuf,
    /// What to run: image, input tree, parameters, timeout, labels (always `store_only`:
    /// the pipeline places outputs itself).
    pub request: RunRequest,
    /// The image as the pipeline's check resolved it: every run uses that image ID.
    pub image: Option<ImageMeta>,
    /// Events and logs, for the pipeline's live report.
    pub observer: Arc<dyn Observer>,
    /// Cancelled on Ctrl-C: the run stops and records nothing.
    pub cancel: CancellationToken,
}

/// Runs a pipeline's runs.
#[async_trait]
pub trait StepExecutor: Send + Sync {
    /// A short name for reports and errors (`local`, `slurm`).
    fn name(&self) -> &str;

    /// The engine whose store holds the pipeline's data: input trees are stored in it, step
    /// outputs are read from it and placed on the host from it.
    fn engine(&self) -> &Arc<Engine>;

    /// Run (or reuse) one run and report how it ended. A failed container is a report
    /// (`Status::Failed`), not an error; an error means the run could not be attempted.
    async fn execute(&self, run: StepRun) -> Result<RunReport, EngineError>;
}

/// Every run in this process, through its engine.
pub struct InProcess {
    engine: Arc<Engine>,
}

impl InProcess {
    pub fn new(engine: Arc<Engine>) -> InProcess {
        InProcess { engine }
    }
}

#[async_trait]
impl StepExecutor for InProcess {
    fn name(&self) -> &str {
        "local"
    }

    fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    async fn execute(&self, run: StepRun) -> Result<RunReport, EngineError> {
        self.engine.run_with(run.request, run.image, None, run.observer, run.cancel).await
    }
}
