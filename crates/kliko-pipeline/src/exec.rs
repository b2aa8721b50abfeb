//! Running a checked pipeline: steps start as soon as the steps they read have succeeded, at
//! most `jobs` runs at once (a foreach entry is one run), every run through a [`StepExecutor`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kliko_core::Digest;
use kliko_engine::{Cache, Event, Observer, Status};
pub use kliko_runtime::Stream;
use kliko_store::{MaterializeMode, Store};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::check::Checked;
use crate::executor::{StepExecutor, StepRun};
use crate::file::{Pipeline, Step};
use crate::inputs::{EntryRef, Resolver, Stage};
use crate::{blocking, PipelineError, Result};

/// How a pipeline runs.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Runs (steps, or foreach entries) at once.
    pub jobs: usize,
    /// After a failure, keep running the steps that do not depend on it.
    pub keep_going: bool,
}

/// Where a step is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// For the steps it reads.
    Waiting,
    Running,
    /// Finished, every run a cache hit.
    Cached,
    /// Finished, at least one run ran a container.
    Done,
    Failed,
    /// A step it reads did not succeed.
    Skipped,
    /// Not started: the pipeline stopped after a failure (without `--keep-going`).
    NotRun,
    Cancelled,
}

impl StepState {
    pub fn succeeded(self) -> bool {
        matches!(self, StepState::Cached | StepState::Done)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Waiting => "waiting",
            StepState::Running => "running",
            StepState::Cached => "cached",
            StepState::Done => "done",
            StepState::Failed => "failed",
            StepState::Skipped => "skipped",
            StepState::NotRun => "not run",
            StepState::Cancelled => "cancelled",
        }
    }

    /// The state in words, with the counts of a step of several runs (`running (3/10, 2
    /// cached, 1 running)`).
    pub fn describe(self, p: &Progress) -> String {
        let mut s = self.as_str().to_string();
        if p.total > 1 || (p.total == 1 && self == StepState::Running && p.running > 0) {
            let mut parts = vec![format!("{}/{}", p.done, p.total)];
            if p.cached > 0 {
                parts.push(format!("{} cached", p.cached));
            }
            if p.running > 0 {
                parts.push(format!("{} running", p.running));
            }
            if p.failed > 0 {
                parts.push(format!("{} failed", p.failed));
            }
            s.push_str(&format!(" ({})", parts.join(", ")));
        }
        s
    }
}

/// Counts of a step's runs (one, or one per foreach entry).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub total: usize,
    pub done: usize,
    pub cached: usize,
    /// Containers running now.
    pub running: usize,
    pub failed: usize,
}

/// Receives every change of a step's state, and the containers' logs.
pub trait Reporter: Send + Sync {
    fn update(&self, _step: &str, _state: StepState, _progress: Progress) {}
    /// A run went to a cluster's scheduler: its job, and each change of the job's state.
    fn job(&self, _step: &str, _entry: Option<&str>, _id: &str, _state: &str) {}
    fn log(&self, _step: &str, _entry: Option<&str>, _stream: Stream, _bytes: &[u8]) {}
}

pub struct NoReporter;
impl Reporter for NoReporter {}

/// Whether a finished step reused results.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepCache {
    /// Every run was a hit.
    Hit,
    /// Every run ran a container.
    Miss,
    /// Some of each (a foreach step with new entries).
    Partial,
}

/// One run of a step (the step itself, or one foreach entry).
#[derive(Clone, Debug, Serialize)]
pub struct RunOutcome {
    /// The foreach entry.
    pub entry: Option<String>,
    pub key: Option<Digest>,
    pub cache: Option<Cache>,
    pub status: RunStatus,
    pub exit_code: Option<i64>,
    /// Whether this run started a container (here, or as a cluster job).
    pub container: bool,
    /// The cluster job that ran it (`--executor slurm`).
    pub job: Option<String>,
    pub wall_ms: u64,
    pub saved_ms: u64,
    /// Of the container that made the result (for a hit: the earlier run), RFC 3339.
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub output: Option<Digest>,
    pub log_tail: Vec<String>,
    pub error: Option<String>,
}

/// How one run of a step ended (in JSON: `succeeded`, `failed`, `timed_out`, `cancelled`,
/// `leader_failed`, `error` or `not_run`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Succeeded,
    /// The container exited with a non-zero code.
    Failed,
    TimedOut,
    Cancelled,
    /// It waited on an identical run that failed.
    LeaderFailed,
    /// It could not run at all (its error says why).
    Error,
    /// The pipeline stopped before it started.
    NotRun,
}

impl From<Status> for RunStatus {
    fn from(s: Status) -> RunStatus {
        match s {
            Status::Succeeded => RunStatus::Succeeded,
            Status::Failed => RunStatus::Failed,
            Status::TimedOut => RunStatus::TimedOut,
            Status::Cancelled => RunStatus::Cancelled,
            Status::LeaderFailed => RunStatus::LeaderFailed,
        }
    }
}

impl RunOutcome {
    fn not_run(entry: Option<String>, status: RunStatus) -> RunOutcome {
        RunOutcome {
            entry,
            key: None,
            cache: None,
            status,
            exit_code: None,
            container: false,
            job: None,
            wall_ms: 0,
            saved_ms: 0,
            started_at: None,
            finished_at: None,
            output: None,
            log_tail: Vec::new(),
            error: None,
        }
    }

    pub fn succeeded(&self) -> bool {
        self.status == RunStatus::Succeeded
    }
}

/// What one step did.
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    pub name: String,
    pub image: String,
    pub state: StepState,
    pub cache: Option<StepCache>,
    pub depends_on: Vec<String>,
    pub foreach: bool,
    /// The step's output tree (a foreach step: one subfolder per entry).
    pub output: Option<Digest>,
    pub output_path: Option<PathBuf>,
    pub wall_ms: u64,
    /// Container time the hits did not spend again.
    pub saved_ms: u64,
    pub runs: Vec<RunOutcome>,
    /// Why the step failed or was skipped.
    pub reason: Option<String>,
}

/// What a pipeline run did.
#[derive(Clone, Debug, Serialize)]
pub struct PipelineReport {
    pub file: PathBuf,
    pub ok: bool,
    pub cancelled: bool,
    pub wall_ms: u64,
    pub saved_ms: u64,
    /// Containers started (runs that were not cache hits).
    pub containers: usize,
    /// In file order.
    pub steps: Vec<StepReport>,
}

impl StepReport {
    /// The keys of the step's runs that made (or reused) a result.
    pub fn result_keys(&self) -> Vec<Digest> {
        self.runs.iter().filter(|r| r.succeeded()).filter_map(|r| r.key).collect()
    }

    fn unstarted(step: &Step, state: StepState, reason: Option<String>) -> StepReport {
        StepReport {
            name: step.name.clone(),
            image: step.image.clone(),
            state,
            cache: None,
            depends_on: step.deps().into_iter().map(str::to_string).collect(),
            foreach: step.foreach.is_some(),
            output: None,
            output_path: None,
            wall_ms: 0,
            saved_ms: 0,
            runs: Vec::new(),
            reason,
        }
    }
}

/// Label on every container a pipeline starts: the pipeline file.
pub const PIPELINE_LABEL: &str = "io.kliko.pipeline";
/// Label on every container a pipeline starts: the step.
pub const STEP_LABEL: &str = "io.kliko.step";

/// Everything a step's task needs.
#[derive(Clone)]
struct Ctx {
    executor: Arc<dyn StepExecutor>,
    resolver: Arc<Resolver>,
    sem: Arc<Semaphore>,
    /// Cancelled to stop launching runs (a failure without `--keep-going`, or Ctrl-C).
    stop: CancellationToken,
    /// Cancelled on Ctrl-C: running containers are stopped too.
    cancel: CancellationToken,
    keep_going: bool,
    reporter: Arc<dyn Reporter>,
    pipeline_file: PathBuf,
    pipeline_dir: PathBuf,
    step: Arc<Step>,
    /// The step's image as the check resolved it: every run of the pipeline uses that image
    /// ID (a tag moved meanwhile changes nothing) and none inspects it again.
    image: Option<kliko_engine::ImageMeta>,
    outputs: Arc<HashMap<String, Digest>>,
    progress: Arc<Mutex<Progress>>,
    keeper: Arc<DbKeeper>,
}

/// Keeps the store's index open between runs. Every store access opens and closes RocksDB
/// unless a handle is alive (tens of milliseconds each time), which would dominate an
/// all-cached pipeline. But the index is one process's at a time and must never be held
/// while waiting for another process, so the handle is let go as soon as any run starts a
/// container or waits for another's lease, and taken again when none does.
struct DbKeeper {
    store: Arc<Store>,
    /// Runs now running a container or waiting on a lease; the handle while there are none.
    state: Mutex<(usize, Option<kliko_store::Db>)>,
}

impl DbKeeper {
    fn block(&self) {
        let old = {
            let mut s = self.state.lock().expect("keeper lock");
            s.0 += 1;
            s.1.take()
        };
        drop(old);
    }

    fn unblock(&self) {
        let mut s = self.state.lock().expect("keeper lock");
        s.0 = s.0.saturating_sub(1);
    }

    fn release(&self) {
        let old = self.state.lock().expect("keeper lock").1.take();
        drop(old);
    }

    /// Take a handle if no run is blocked (may wait for another process's use of the index).
    async fn hold(self: Arc<Self>) {
        if self.state.lock().expect("keeper lock").0 > 0 {
            return;
        }
        let store = self.store.clone();
        let Ok(Ok(db)) = tokio::task::spawn_blocking(move || store.db()).await else { return };
        let mut s = self.state.lock().expect("keeper lock");
        if s.0 == 0 && s.1.is_none() {
            s.1 = Some(db);
        }
    }
}

impl Ctx {
    fn report(&self, state: StepState) {
        let p = *self.progress.lock().expect("progress lock");
        self.reporter.update(&self.step.name, state, p);
    }
}

/// Run a checked pipeline. Returns when every step has finished, failed or been skipped.
pub async fn run(
    executor: Arc<dyn StepExecutor>,
    p: &Pipeline,
    checked: &Checked,
    opts: Options,
    reporter: Arc<dyn Reporter>,
    cancel: CancellationToken,
) -> Result<PipelineReport> {
    let t0 = Instant::now();
    let engine = executor.engine().clone();
    let keeper = Arc::new(DbKeeper { store: engine.store().clone(), state: Mutex::new((0, None)) });
    keeper.clone().hold().await;
    let resolver = Arc::new(Resolver::new(engine.store().clone(), Stage::Store));
    let sem = Arc::new(Semaphore::new(opts.jobs.max(1)));
    let stop = cancel.child_token();
    let n = p.steps.len();
    let index: HashMap<&str, usize> = p.steps.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
    let mut reports: Vec<Option<StepReport>> = vec![None; n];
    let mut launched = vec![false; n];
    let mut outputs: HashMap<String, Digest> = HashMap::new();
    for s in &p.steps {
        reporter.update(&s.name, StepState::Waiting, Progress::default());
    }
    let mut tasks: JoinSet<(usize, StepReport)> = JoinSet::new();
    loop {
        // In dependency order, so a skip propagates down the graph in one pass.
        for &i in &checked.order {
            if launched[i] || reports[i].is_some() {
                continue;
            }
            let step = &p.steps[i];
            let deps: Vec<usize> = step.deps().iter().map(|d| index[d]).collect();
            let failed_dep = deps.iter().find_map(|&d| reports[d].as_ref().filter(|r| !r.state.succeeded()));
            if let Some(dep) = failed_dep {
                let why = format!("step `{}` {}", dep.name, dep.state.as_str());
                reporter.update(&step.name, StepState::Skipped, Progress::default());
                reports[i] = Some(StepReport::unstarted(step, StepState::Skipped, Some(why)));
                continue;
            }
            if stop.is_cancelled() || !deps.iter().all(|&d| reports[d].is_some()) {
                continue;
            }
            launched[i] = true;
            let ctx = Ctx {
                executor: executor.clone(),
                resolver: resolver.clone(),
                sem: sem.clone(),
                stop: stop.clone(),
                cancel: cancel.clone(),
                keep_going: opts.keep_going,
                reporter: reporter.clone(),
                pipeline_file: p.file.clone(),
                pipeline_dir: p.dir.clone(),
                step: Arc::new(step.clone()),
                image: checked.images.get(&step.name).cloned(),
                outputs: Arc::new(outputs.clone()),
                progress: Arc::default(),
                keeper: keeper.clone(),
            };
            tasks.spawn(async move { (i, run_step(ctx).await) });
        }
        match tasks.join_next().await {
            None => break,
            Some(Ok((i, rep))) => {
                if let (true, Some(out)) = (rep.state.succeeded(), rep.output) {
                    outputs.insert(rep.name.clone(), out);
                } else if !opts.keep_going {
                    stop.cancel();
                }
                reports[i] = Some(rep);
            }
            Some(Err(e)) => return Err(PipelineError::Join(e.to_string())),
        }
    }
    let state = if cancel.is_cancelled() { StepState::Cancelled } else { StepState::NotRun };
    let steps: Vec<StepReport> = reports
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap_or_else(|| {
                reporter.update(&p.steps[i].name, state, Progress::default());
                StepReport::unstarted(&p.steps[i], state, Some("the pipeline stopped after a failure".into()))
            })
        })
        .collect();
    keeper.release();
    Ok(PipelineReport {
        file: p.file.clone(),
        ok: steps.iter().all(|s| s.state.succeeded()),
        cancelled: cancel.is_cancelled(),
        wall_ms: t0.elapsed().as_millis() as u64,
        saved_ms: steps.iter().map(|s| s.saved_ms).sum(),
        containers: steps.iter().flat_map(|s| &s.runs).filter(|r| r.container).count(),
        steps,
    })
}

async fn run_step(ctx: Ctx) -> StepReport {
    let t0 = Instant::now();
    let step = ctx.step.clone();
    let mut rep = StepReport::unstarted(&step, StepState::Running, None);
    ctx.report(StepState::Running);
    let entries: Vec<Option<(String, EntryRef)>> = match &step.foreach {
        None => vec![None],
        Some(src) => {
            let (r, src, outs) = (ctx.resolver.clone(), src.clone(), ctx.outputs.clone());
            match blocking(move || r.entries(&src, &outs)).await {
                Ok(es) => es.into_iter().map(Some).collect(),
                Err(e) => return fail(&ctx, rep, t0, error_chain(&e)),
            }
        }
    };
    ctx.progress.lock().expect("progress lock").total = entries.len();
    ctx.report(StepState::Running);
    let mut runs: JoinSet<(usize, RunOutcome)> = JoinSet::new();
    let names: Vec<Option<String>> = entries.iter().map(|e| e.as_ref().map(|(n, _)| n.clone())).collect();
    for (k, entry) in entries.into_iter().enumerate() {
        let ctx = ctx.clone();
        runs.spawn(async move { (k, run_one(ctx, entry).await) });
    }
    let mut outcomes: Vec<Option<RunOutcome>> = vec![None; names.len()];
    while let Some(r) = runs.join_next().await {
        match r {
            Ok((k, o)) => outcomes[k] = Some(o),
            Err(e) => return fail(&ctx, rep, t0, format!("a background task failed: {e}")),
        }
    }
    rep.runs = outcomes
        .into_iter()
        .enumerate()
        .map(|(k, o)| o.unwrap_or_else(|| RunOutcome::not_run(names[k].clone(), RunStatus::NotRun)))
        .collect();
    rep.saved_ms = rep.runs.iter().map(|r| r.saved_ms).sum();
    let hits = rep.runs.iter().filter(|r| r.cache == Some(Cache::Hit)).count();
    let ran = rep.runs.iter().filter(|r| r.container).count();
    rep.cache = match (hits, ran) {
        (0, 0) => None,
        (_, 0) => Some(StepCache::Hit),
        (0, _) => Some(StepCache::Miss),
        _ => Some(StepCache::Partial),
    };
    let bad = rep.runs.iter().filter(|r| !r.succeeded()).collect::<Vec<_>>();
    if !bad.is_empty() {
        let failed: Vec<&&RunOutcome> =
            bad.iter().filter(|r| !matches!(r.status, RunStatus::NotRun | RunStatus::Cancelled)).collect();
        let state = if !failed.is_empty() {
            StepState::Failed
        } else if bad.iter().any(|r| r.status == RunStatus::Cancelled) {
            StepState::Cancelled
        } else {
            StepState::NotRun
        };
        rep.reason = failed.first().map(|r| {
            let what = r.error.clone().unwrap_or_else(|| match r.status {
                RunStatus::TimedOut => "timed out".into(),
                RunStatus::LeaderFailed => "the identical run it waited on failed".into(),
                _ => format!("exited with code {}", r.exit_code.unwrap_or(-1)),
            });
            match &r.entry {
                Some(e) => format!("entry `{e}`: {what}"),
                None => what,
            }
        });
        if state == StepState::NotRun {
            rep.reason = Some("the pipeline stopped after a failure".into());
        }
        rep.state = state;
        rep.wall_ms = t0.elapsed().as_millis() as u64;
        ctx.report(state);
        return rep;
    }
    // Every run succeeded: the step's output.
    let output = if step.foreach.is_some() {
        let named: Vec<(String, Digest)> = rep
            .runs
            .iter()
            .map(|r| (r.entry.clone().unwrap_or_default(), r.output.expect("a succeeded run has an output")))
            .collect();
        let r = ctx.resolver.clone();
        match blocking(move || r.gather(&named)).await {
            Ok(d) => d,
            Err(e) => return fail(&ctx, rep, t0, error_chain(&e)),
        }
    } else {
        rep.runs[0].output.expect("a succeeded run has an output")
    };
    rep.output = Some(output);
    if let Some(target) = step.output.clone() {
        let store = ctx.executor.engine().store().clone();
        let t = target.clone();
        if let Err(e) = blocking(move || place_output(&store, &output, &t)).await {
            return fail(
                &ctx,
                rep,
                t0,
                format!("cannot write the output to `{}`: {}", target.display(), error_chain(&e)),
            );
        }
        rep.output_path = Some(target);
    }
    rep.state = if ran == 0 { StepState::Cached } else { StepState::Done };
    rep.wall_ms = t0.elapsed().as_millis() as u64;
    ctx.report(rep.state);
    rep
}

fn fail(ctx: &Ctx, mut rep: StepReport, t0: Instant, reason: String) -> StepReport {
    rep.state = StepState::Failed;
    rep.reason = Some(reason);
    rep.wall_ms = t0.elapsed().as_millis() as u64;
    ctx.report(StepState::Failed);
    rep
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(&format!(": {c}"));
        src = c.source();
    }
    s
}

/// Per-run observer: counts running containers, forwards logs.
struct RunObs {
    ctx: Ctx,
    entry: Option<String>,
    started: AtomicBool,
    /// Whether this run made the [`DbKeeper`] let go.
    blocked: AtomicBool,
    /// The cluster job that runs it.
    job: Mutex<Option<String>>,
}

impl Observer for RunObs {
    fn log(&self, stream: Stream, bytes: &[u8]) {
        self.ctx.reporter.log(&self.ctx.step.name, self.entry.as_deref(), stream, bytes);
    }
    fn event(&self, event: &Event) {
        match event {
            Event::Waiting { .. } if !self.blocked.swap(true, Ordering::SeqCst) => self.ctx.keeper.block(),
            Event::Starting => {
                if !self.blocked.swap(true, Ordering::SeqCst) {
                    self.ctx.keeper.block();
                }
                self.started.store(true, Ordering::SeqCst);
                self.ctx.progress.lock().expect("progress lock").running += 1;
                self.ctx.report(StepState::Running);
            }
            // A cluster job: the container runs on a node (this process keeps the index).
            Event::Job { id, state } => {
                let first = self.job.lock().expect("job lock").replace(id.clone()).is_none();
                if first && !self.started.swap(true, Ordering::SeqCst) {
                    self.ctx.progress.lock().expect("progress lock").running += 1;
                    self.ctx.report(StepState::Running);
                }
                self.ctx.reporter.job(&self.ctx.step.name, self.entry.as_deref(), id, state);
            }
            Event::Finished { .. } if self.started.load(Ordering::SeqCst) => {
                let mut p = self.ctx.progress.lock().expect("progress lock");
                p.running = p.running.saturating_sub(1);
            }
            _ => {}
        }
    }
}

async fn run_one(ctx: Ctx, entry: Option<(String, EntryRef)>) -> RunOutcome {
    let name = entry.as_ref().map(|(n, _)| n.clone());
    let permit = tokio::select! {
        p = ctx.sem.clone().acquire_owned() => match p {
            Ok(p) => p,
            Err(_) => return RunOutcome::not_run(name, RunStatus::NotRun),
        },
        _ = ctx.stop.cancelled() => return RunOutcome::not_run(name, if ctx.cancel.is_cancelled() { RunStatus::Cancelled } else { RunStatus::NotRun }),
    };
    if ctx.stop.is_cancelled() {
        return RunOutcome::not_run(
            name,
            if ctx.cancel.is_cancelled() { RunStatus::Cancelled } else { RunStatus::NotRun },
        );
    }
    let t0 = Instant::now();
    let outcome = run_one_inner(&ctx, entry, name.clone(), t0).await;
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            let mut o = RunOutcome::not_run(name, RunStatus::Error);
            o.error = Some(error_chain(&e));
            o.wall_ms = t0.elapsed().as_millis() as u64;
            o
        }
    };
    {
        let mut p = ctx.progress.lock().expect("progress lock");
        p.done += 1;
        if outcome.cache == Some(Cache::Hit) {
            p.cached += 1;
        }
        if !outcome.succeeded() {
            p.failed += 1;
        }
    }
    ctx.report(StepState::Running);
    // Stop launching before this run's slot is free, so no queued run slips in after a failure.
    if !outcome.succeeded() && !ctx.keep_going {
        ctx.stop.cancel();
    }
    drop(permit);
    outcome
}

async fn run_one_inner(
    ctx: &Ctx,
    entry: Option<(String, EntryRef)>,
    name: Option<String>,
    t0: Instant,
) -> Result<RunOutcome> {
    let step = ctx.step.clone();
    let input = {
        let (r, s, outs) = (ctx.resolver.clone(), step.clone(), ctx.outputs.clone());
        blocking(move || r.run_input(&s, entry.as_ref(), &outs)).await?
    };
    let mut req = crate::check::step_request(&ctx.pipeline_dir, &step, input);
    req.labels.insert(PIPELINE_LABEL.into(), ctx.pipeline_file.display().to_string());
    req.labels.insert(STEP_LABEL.into(), step.name.clone());
    let obs = Arc::new(RunObs {
        ctx: ctx.clone(),
        entry: name.clone(),
        started: AtomicBool::new(false),
        blocked: AtomicBool::new(false),
        job: Mutex::new(None),
    });
    let run = StepRun {
        step: step.clone(),
        entry: name.clone(),
        params_dir: ctx.pipeline_dir.clone(),
        request: req,
        image: ctx.image.clone(),
        observer: obs.clone(),
        cancel: ctx.cancel.clone(),
    };
    let report = ctx.executor.execute(run).await;
    if obs.blocked.load(Ordering::SeqCst) {
        ctx.keeper.unblock();
        ctx.keeper.clone().hold().await;
    }
    let report = report?;
    let job = obs.job.lock().expect("job lock").clone();
    Ok(RunOutcome {
        entry: name,
        key: Some(report.key),
        cache: Some(report.cache),
        status: report.status.into(),
        exit_code: Some(report.exit_code),
        container: obs.started.load(Ordering::SeqCst),
        job,
        wall_ms: t0.elapsed().as_millis() as u64,
        saved_ms: report.saved_ms,
        started_at: report.result.as_ref().map(|r| r.started_at.clone()),
        finished_at: report.result.as_ref().map(|r| r.finished_at.clone()),
        output: report.output,
        log_tail: report.log_tail,
        error: report.reason,
    })
}

/// Put stored tree `tree` at `target`, replacing what is there only once the new copy is
/// complete; nothing is written when `target` already holds exactly that tree.
fn place_output(store: &Store, tree: &Digest, target: &Path) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PipelineError::Io { path, source }
    };
    let is_empty = match std::fs::read_dir(target) {
        Ok(mut it) => it.next().is_none(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(io(target)(e)),
    };
    if is_empty {
        store.materialize(tree, target, MaterializeMode::Auto)?;
        return Ok(());
    }
    if target.is_dir() && store.hash_path(target, &kliko_core::hash::NoProgress).is_ok_and(|h| h.digest == *tree) {
        return Ok(());
    }
    let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    // Locked while in use: the next placement here removes it if this process is killed.
    let staging = kliko_store::litter::staging_beside(target).map_err(io(parent))?;
    let new = staging.path().join("new");
    store.materialize(tree, &new, MaterializeMode::Auto)?;
    let old = staging.path().join("old");
    std::fs::rename(target, &old).map_err(io(target))?;
    if let Err(e) = std::fs::rename(&new, target) {
        let _ = std::fs::rename(&old, target);
        return Err(io(target)(e));
    }
    Ok(())
}
