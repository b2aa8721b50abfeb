//! kliko-pipeline owns pipelines: a YAML file naming several kliko images whose outputs feed
//! each other's inputs. Every step (and every entry of a `foreach` step) is one
//! [`Engine::run`](kliko_engine::Engine::run), so it is memoized and deduplicated like any
//! other run: re-running an unchanged pipeline starts no container, and changing one input
//! re-runs only the steps that read it, directly or through other steps. Intermediate outputs
//! stay in the store and reach the next step as [`Input::Tree`](kliko_engine::Input::Tree);
//! only steps with `output:` are written to the host.
//!
//! The file format is documented in this crate's `README.md`; `docs/pipeline.schema.json` is
//! its JSON Schema, for editors.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kliko_pipeline::PipelineError> {
//! use std::sync::Arc;
//! use kliko_pipeline::{InProcess, Pipeline, Options, NoReporter};
//! let store = Arc::new(kliko_store::Store::open("/tmp/kliko-store".as_ref())?);
//! let engine = Arc::new(kliko_engine::Engine::new(store));
//! let pipeline = Pipeline::load("pipeline.yml".as_ref())?;
//! // Every problem (cycles, unknown steps or parameters, missing images or paths) at once:
//! let checked = kliko_pipeline::check(&engine, &pipeline).await?;
//! let report = kliko_pipeline::run(
//!     Arc::new(InProcess::new(engine)), &pipeline, &checked, Options { jobs: 2, keep_going: false },
//!     Arc::new(NoReporter), Default::default(),
//! ).await?;
//! for step in &report.steps {
//!     println!("{}: {:?} ({:?})", step.name, step.state, step.cache);
//! }
//! # Ok(()) }
//! ```

mod check;
mod exec;
mod executor;
mod file;
pub mod history;
mod inputs;
mod show;
pub mod slurm;
pub(crate) use kliko_spec::yaml;

use std::path::PathBuf;

pub use check::{check, Checked};
pub use exec::{
    run, NoReporter, Options, PipelineReport, Progress, Reporter, RunOutcome, RunStatus, StepCache, StepReport,
    StepState, Stream, PIPELINE_LABEL, STEP_LABEL,
};
pub use executor::{InProcess, StepExecutor, StepRun};
pub use file::{
    is_path_like, parse_duration, InputSpec, Item, Named, Pipeline, Problem, Source, Step, PIPELINE_VERSION,
};
pub use show::{show, PlannedRun, StepPlan};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("`{}` has {} problem{}:\n{}", file.display(), problems.len(), if problems.len() == 1 { "" } else { "s" }, problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid { file: PathBuf, problems: Vec<Problem> },
    #[error("i/o error on `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Engine(#[from] kliko_engine::EngineError),
    #[error(transparent)]
    Store(#[from] kliko_store::StoreError),
    #[error("entry `{}` of `{}` has a name that is not UTF-8", name, of)]
    EntryName { name: String, of: String },
    #[error("a background task failed: {0}")]
    Join(String),
    /// The Slurm executor cannot be used here (said before anything is submitted).
    #[error("{0}")]
    Slurm(String),
}

pub type Result<T, E = PipelineError> = std::result::Result<T, E>;

/// Run blocking store work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| PipelineError::Join(e.to_string()))?
}
