//! Steps dispatched through Slurm (`kliko pipeline run --executor slurm|srun`).
//!
//! The dispatcher (this process) decides hits itself, with its own store and the shared tier:
//! a hit submits nothing. A miss becomes a [`Plan`] (the run, fully resolved: image ID,
//! input tree, parameters, the key it must have), its input tree goes to the shared tier, and
//! one job runs `kliko run-plan` on a node: the same lookup → lease → run → record path, with
//! the node's own local store and the shared tier. The misses of one `foreach` step submitted
//! together are one job array.
//!
//! Completion is read from the shared tier (the result record, or the failure record a leader
//! leaves), never from Slurm. Slurm is asked only to notice jobs that vanished: one `squeue`
//! for every job in flight every [`SlurmOptions::poll`], and `scontrol show job` only for a
//! job that left the queue without a record; then the report says why (time limit, out of
//! memory, node failure, preempted, cancelled) with the job's log. Ctrl-C cancels every job
//! in flight with one `scancel`, and a cancelled job records nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use kliko_core::Digest;
use kliko_engine::{Engine, EngineError, Event, Followed, Input, RunReport, RunRequest};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::executor::{StepExecutor, StepRun};
use crate::file::{Pipeline, Problem, Resources};
use crate::PipelineError;

/// The plan format's version.
pub const PLAN_VERSION: u32 = 1;

/// One run, fully resolved, as a job on a node runs it (`kliko run-plan`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub kliko_plan: u32,
    /// The key the dispatcher computed: the node refuses to run anything else.
    pub key: Digest,
    pub step: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<String>,
    /// The image as the pipeline names it, and the content ID the dispatcher resolved.
    pub image: String,
    pub image_id: String,
    /// The input tree, on the shared tier.
    pub input: Digest,
    /// The step's parameters as written, and the folder relative file parameters start in.
    pub params: serde_json::Map<String, serde_json::Value>,
    pub params_dir: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The container runtime the node uses (`docker`, `podman`): the dispatcher's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// The GPUs the container gets (`--gpus` form), besides the job's `--gres`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<String>,
    /// The shared tier (credentials come from the job's environment).
    pub remote: String,
    /// The file parameters by content, for a node that does not see the dispatcher's files:
    /// a tree on the tier holding each file under its digest (hex), and each file parameter's
    /// path (as the dispatcher resolved it) with its digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param_files: Option<ParamFiles>,
}

/// See [`Plan::param_files`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ParamFiles {
    pub tree: Digest,
    pub files: BTreeMap<PathBuf, Digest>,
}

impl Plan {
    /// The file parameters this node cannot read as the dispatcher did (the file is missing
    /// here, or has other contents): path → digest. Empty when every one is here unchanged
    /// (a shared filesystem), or the run has none.
    pub fn unseen_param_files(&self) -> BTreeMap<PathBuf, Digest> {
        let Some(pf) = &self.param_files else { return BTreeMap::new() };
        pf.files
            .iter()
            .filter(|(path, digest)| {
                let same = std::fs::metadata(path)
                    .ok()
                    .filter(|m| m.is_file())
                    .and_then(|m| kliko_core::hash::hash_file_stable(path, &m).ok().map(|(d, _)| d == **digest));
                same != Some(true)
            })
            .map(|(p, d)| (p.clone(), *d))
            .collect()
    }

    /// The plan with each of the `unseen` file parameters pointed at its copy under `copies`
    /// (a folder holding the `param_files` tree: each file named by its digest).
    pub fn with_param_copies(mut self, copies: &Path, unseen: &BTreeMap<PathBuf, Digest>) -> Plan {
        let moved: BTreeMap<&PathBuf, PathBuf> = unseen.iter().map(|(p, d)| (p, copies.join(d.to_hex()))).collect();
        let dir = self.params_dir.clone();
        let swap = |v: &mut serde_json::Value| {
            if let serde_json::Value::String(s) = v {
                if let Some(to) = moved.get(&dir.join(&*s)) {
                    *s = to.display().to_string();
                }
            }
        };
        for v in self.params.values_mut() {
            match v {
                serde_json::Value::Array(items) => items.iter_mut().for_each(swap),
                other => swap(other),
            }
        }
        self
    }

    /// The request a node makes of its engine.
    pub fn request(&self) -> Result<RunRequest, String> {
        let mut req = RunRequest::new(self.image_id.clone(), Input::Tree(self.input), None);
        req.store_only = true;
        req.params = vec![crate::check::param_layer(&self.params_dir, &self.step, &self.params)];
        req.timeout = self.timeout_ms.map(Duration::from_millis);
        req.labels = self.labels.clone();
        req.gpus = self.gpus.as_deref().map(kliko_engine::Gpus::parse).transpose()?;
        Ok(req)
    }
}

/// How steps reach Slurm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `sbatch --parsable`, one job per miss (a job array per foreach step).
    Batch,
    /// `srun` per miss, inside the allocation this process runs in.
    Srun,
}

/// Settings of the Slurm executor.
#[derive(Clone, Debug)]
pub struct SlurmOptions {
    pub mode: Mode,
    /// The kliko the jobs run (a path the nodes see).
    pub kliko: PathBuf,
    /// Where the jobs' output files go (a folder the nodes and this process see).
    pub logs: PathBuf,
    /// How often `squeue` is asked about the jobs in flight.
    pub poll: Duration,
    /// `KLIKO_SLURM_ARGS`: site options for every job, after the pipeline's own.
    pub site_args: Vec<String>,
}

impl SlurmOptions {
    /// The defaults, for a pipeline in `dir`, from the environment: `KLIKO_SLURM_ARGS`
    /// (split as a shell would), `KLIKO_SLURM_POLL` (a duration; default 30 s),
    /// `KLIKO_SLURM_LOGS` (default `<pipeline folder>/.kliko/slurm`).
    pub fn from_env(mode: Mode, dir: &Path) -> Result<SlurmOptions, PipelineError> {
        let kliko = std::env::current_exe().map_err(|e| {
            PipelineError::Slurm(format!("cannot tell where this kliko is, for the jobs to run it: {e}"))
        })?;
        let site_args = match std::env::var("KLIKO_SLURM_ARGS") {
            Ok(s) => shlex::split(&s).ok_or_else(|| {
                PipelineError::Slurm(format!("`KLIKO_SLURM_ARGS` is not a list of arguments a shell could split: {s}"))
            })?,
            Err(_) => Vec::new(),
        };
        let poll = match std::env::var("KLIKO_SLURM_POLL") {
            Ok(s) => kliko_core::units::parse_duration(&s)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| PipelineError::Slurm(format!("`KLIKO_SLURM_POLL={s}` is not a duration (say `30s`)")))?,
            Err(_) => Duration::from_secs(30),
        };
        let logs =
            std::env::var_os("KLIKO_SLURM_LOGS").map(PathBuf::from).unwrap_or_else(|| dir.join(".kliko").join("slurm"));
        Ok(SlurmOptions { mode, kliko, logs, poll, site_args })
    }
}

/// A job as the scheduler last told of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobState {
    /// Slurm's word: `PENDING`, `RUNNING`, `COMPLETED`, `TIMEOUT`, ... (empty: not asked yet).
    pub state: String,
    /// Why it waits, or why it ended (`Priority`, `NonZeroExitCode`, ...).
    pub reason: String,
    /// `ExitCode` as Slurm gives it (`exit:signal`), once it ended.
    pub exit: Option<String>,
}

impl JobState {
    /// Whether the job is over.
    pub fn ended(&self) -> bool {
        !matches!(
            self.state.as_str(),
            "" | "PENDING"
                | "RUNNING"
                | "CONFIGURING"
                | "COMPLETING"
                | "SUSPENDED"
                | "REQUEUED"
                | "RESIZING"
                | "STAGE_OUT"
                | "SIGNALING"
                | "REQUEUE_HOLD"
                | "REQUEUE_FED"
        )
    }

    /// In the words of a report: why a job that recorded nothing ended.
    pub fn explain(&self, job: &str, res: &Resources) -> String {
        let exit = self.exit.as_deref().map(|e| format!(", exit code {e}")).unwrap_or_default();
        match self.state.as_str() {
            "TIMEOUT" | "DEADLINE" => format!(
                "Slurm stopped job {job} at its time limit{}",
                res.time.map(|t| format!(" (`time: {}`)", slurm_time(t))).unwrap_or_default()
            ),
            "OUT_OF_MEMORY" => format!(
                "job {job} ran out of memory{}",
                res.memory.map(|m| format!(" (`memory: {}M`)", m.div_ceil(1 << 20))).unwrap_or_default()
            ),
            "NODE_FAIL" => format!("the node running job {job} failed"),
            "PREEMPTED" => format!("job {job} was preempted by Slurm"),
            "CANCELLED" => format!("job {job} was cancelled (`scancel`){exit}"),
            "BOOT_FAIL" => format!("the node for job {job} failed to boot"),
            "" | "GONE" => format!("job {job} vanished from Slurm without recording a result"),
            s => format!("job {job} ended {s} without recording a result{exit}"),
        }
    }
}

/// `--time` as Slurm reads it: `D-HH:MM:SS`.
pub fn slurm_time(d: Duration) -> String {
    let s = d.as_secs().max(1);
    format!("{}-{:02}:{:02}:{:02}", s / 86400, (s / 3600) % 24, (s / 60) % 60, s % 60)
}

/// The job options for a run of a step with resources `r`.
pub fn resource_args(r: &Resources) -> Vec<String> {
    let mut a = Vec::new();
    if let Some(c) = r.cpus {
        a.push(format!("--cpus-per-task={c}"));
    }
    if let Some(m) = r.memory {
        a.push(format!("--mem={}M", m.div_ceil(1 << 20)));
    }
    if let Some(t) = r.time {
        a.push(format!("--time={}", slurm_time(t)));
    }
    if let Some(g) = r.gpus {
        a.push(format!("--gres=gpu:{g}"));
    }
    for (flag, v) in [("partition", &r.partition), ("account", &r.account), ("qos", &r.qos)] {
        if let Some(v) = v {
            a.push(format!("--{flag}={v}"));
        }
    }
    a.extend(r.extra.iter().cloned());
    a
}

/// The job id in what `sbatch --parsable` printed: `id` or `id;cluster`.
pub fn parse_parsable(out: &str) -> Option<String> {
    let first = out.lines().map(str::trim).find(|l| !l.is_empty())?;
    let id = first.split(';').next()?.trim();
    (!id.is_empty() && id.chars().all(|c| c.is_ascii_digit())).then(|| id.to_string())
}

/// `squeue -h -o '%i|%T|%r'` lines: job id → state.
pub fn parse_squeue(out: &str) -> HashMap<String, JobState> {
    out.lines()
        .filter_map(|l| {
            let mut f = l.trim().splitn(3, '|');
            let (id, state, reason) = (f.next()?, f.next()?, f.next().unwrap_or(""));
            (!id.is_empty()).then(|| {
                (id.to_string(), JobState { state: state.to_string(), reason: reason.to_string(), exit: None })
            })
        })
        .collect()
}

/// One job of `scontrol show job -o` (`Key=Value` pairs on one line).
pub fn parse_scontrol(out: &str) -> Option<JobState> {
    let line = out.lines().find(|l| l.contains("JobState="))?;
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .map(str::to_string)
    };
    Some(JobState { state: field("JobState")?, reason: field("Reason").unwrap_or_default(), exit: field("ExitCode") })
}

/// Quote for a POSIX shell.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The batch script of a job (or a job array, one plan per task): the plan is in the script
/// itself, so the node needs no file of the dispatcher's.
pub fn batch_script(kliko: &Path, plans: &[String]) -> String {
    let mut s = String::from("#!/bin/sh\n# A kliko pipeline run (see `kliko run-plan --help`).\n");
    if plans.len() == 1 {
        s.push_str(&format!("plan={}\n", sh_quote(&plans[0])));
    } else {
        s.push_str("case \"$SLURM_ARRAY_TASK_ID\" in\n");
        for (i, p) in plans.iter().enumerate() {
            s.push_str(&format!("{i}) plan={} ;;\n", sh_quote(p)));
        }
        s.push_str("*) echo \"kliko: no plan for array task $SLURM_ARRAY_TASK_ID\" >&2; exit 2 ;;\nesac\n");
    }
    s.push_str(&format!("exec {} run-plan --plan-json \"$plan\"\n", sh_quote(&kliko.to_string_lossy())));
    s
}

/// Run a Slurm command, with its output; a clear error when it is not installed.
async fn slurm_cmd(program: &str, args: &[String], stdin: Option<&str>) -> Result<String, String> {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    cmd.stdin(if stdin.is_some() { std::process::Stdio::piped() } else { std::process::Stdio::null() });
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            format!("`{program}` is not installed here (it is not on PATH): the Slurm executor needs Slurm's commands")
        }
        _ => format!("cannot start `{program}`: {e}"),
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).await.map_err(|e| format!("cannot write to `{program}`: {e}"))?;
        drop(pipe);
    }
    let out = child.wait_with_output().await.map_err(|e| format!("`{program}` failed: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(format!(
            "`{program}` failed ({}): {}",
            out.status,
            if err.is_empty() { "it said nothing".into() } else { err }
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Before anything is submitted: Slurm answers, the pipeline has a shared tier, and every
/// partition a step names is one Slurm knows. Every problem with its step and line.
pub async fn preflight(engine: &Engine, p: &Pipeline) -> Result<(), PipelineError> {
    if engine.remote().is_none() {
        return Err(PipelineError::Slurm(
            "the Slurm executor needs a shared tier (`--remote URL` or `KLIKO_REMOTE`): without one the nodes cannot \
             see the inputs, nor each other's results"
                .into(),
        ));
    }
    let out = slurm_cmd("sinfo", &["--noheader".into(), "--format=%R".into()], None)
        .await
        .map_err(|e| PipelineError::Slurm(format!("Slurm does not answer: {e}")))?;
    let known: Vec<&str> = out.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let mut problems = Vec::new();
    for s in &p.steps {
        if let Some(part) = &s.resources.partition {
            if !known.contains(&part.as_str()) {
                problems.push(Problem {
                    line: Some(s.resources.partition_line),
                    step: Some(s.name.clone()),
                    message: format!(
                        "Slurm knows no partition `{part}` (it has {})",
                        known.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
                    ),
                });
            }
        }
    }
    if !problems.is_empty() {
        return Err(PipelineError::Invalid { file: p.file.clone(), problems });
    }
    Ok(())
}

/// A job being followed: what the watcher last saw, and a token cancelled once it ended.
struct Tracked {
    state: tokio::sync::watch::Sender<JobState>,
    ended: CancellationToken,
}

/// A run waiting to be submitted (batched with the others of its step).
struct Submission {
    step: String,
    args: Vec<String>,
    plan: String,
    reply: oneshot::Sender<Result<String, String>>,
}

/// How long the submitter waits for more runs of the same step, to make them one array.
const BATCH_WINDOW: Duration = Duration::from_millis(200);
/// At most one `sbatch` this often: a pipeline of thousands must not flood the controller.
const SUBMIT_GAP: Duration = Duration::from_millis(100);
/// The log lines a failure report quotes.
const TAIL: usize = 20;

/// The Slurm executor (see the module docs).
pub struct Slurm {
    engine: Arc<Engine>,
    opts: SlurmOptions,
    jobs: Arc<Mutex<HashMap<String, Tracked>>>,
    submit: mpsc::UnboundedSender<Submission>,
    /// One task cancels every job in flight on Ctrl-C.
    on_cancel: OnceLock<()>,
}

impl Slurm {
    /// The executor; [`preflight`] first. Starts its submitter and its watcher.
    pub fn new(engine: Arc<Engine>, opts: SlurmOptions) -> Result<Slurm, PipelineError> {
        std::fs::create_dir_all(&opts.logs).map_err(|source| PipelineError::Io { path: opts.logs.clone(), source })?;
        let jobs: Arc<Mutex<HashMap<String, Tracked>>> = Arc::default();
        let (tx, rx) = mpsc::unbounded_channel();
        if opts.mode == Mode::Batch {
            tokio::spawn(submitter(rx, opts.clone()));
            tokio::spawn(watcher(jobs.clone(), opts.poll));
        }
        Ok(Slurm { engine, opts, jobs, submit: tx, on_cancel: OnceLock::new() })
    }

    fn track(&self, id: &str) -> (tokio::sync::watch::Receiver<JobState>, CancellationToken) {
        let (tx, rx) = tokio::sync::watch::channel(JobState::default());
        let ended = CancellationToken::new();
        self.jobs.lock().expect("jobs lock").insert(id.to_string(), Tracked { state: tx, ended: ended.clone() });
        (rx, ended)
    }

    fn untrack(&self, id: &str) {
        self.jobs.lock().expect("jobs lock").remove(id);
    }

    /// On the first run: when the pipeline is cancelled, `scancel` every job in flight, once.
    fn cancel_all_on(&self, cancel: &CancellationToken) {
        if self.on_cancel.set(()).is_err() || self.opts.mode != Mode::Batch {
            return;
        }
        let (jobs, cancel) = (self.jobs.clone(), cancel.clone());
        tokio::spawn(async move {
            cancel.cancelled().await;
            let ids: Vec<String> = jobs.lock().expect("jobs lock").keys().cloned().collect();
            if !ids.is_empty() {
                let _ = slurm_cmd("scancel", &ids, None).await;
            }
        });
    }

    /// The last lines of a job's output file.
    fn log_tail(&self, step: &str, id: &str) -> Vec<String> {
        let path = self.opts.logs.join(format!("{step}-{id}.out"));
        let text = std::fs::read(&path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        lines[lines.len().saturating_sub(TAIL)..].to_vec()
    }

    /// Submit one run: its job id.
    async fn submit_batch(&self, step: &str, args: Vec<String>, plan: String) -> Result<String, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.submit
            .send(Submission { step: step.to_string(), args, plan, reply })
            .map_err(|_| EngineError::Scheduler("the Slurm submitter stopped".into()))?;
        rx.await
            .map_err(|_| EngineError::Scheduler("the Slurm submitter stopped".into()))?
            .map_err(EngineError::Scheduler)
    }

    /// Start `srun` for one run: its id (`srun-N`), and the task that says when it ended.
    fn start_srun(
        &self,
        step: &str,
        args: Vec<String>,
        plan: String,
        cancel: &CancellationToken,
    ) -> Result<String, EngineError> {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = format!("srun-{}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let mut cmd = tokio::process::Command::new("srun");
        cmd.args(&args)
            .arg(format!("--job-name=kliko-{step}"))
            .arg(format!("--output={}", self.opts.logs.join(format!("{step}-{id}.out")).display()))
            .arg("--ntasks=1")
            .arg(&self.opts.kliko)
            .args(["run-plan", "--plan-json", &plan])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            EngineError::Scheduler(match e.kind() {
                std::io::ErrorKind::NotFound => "`srun` is not installed here (it is not on PATH)".into(),
                _ => format!("cannot start `srun`: {e}"),
            })
        })?;
        let (state, _) = self.track(&id);
        let (jobs, key, cancel) = (self.jobs.clone(), id.clone(), cancel.clone());
        drop(state);
        tokio::spawn(async move {
            let set = |s: JobState| {
                if let Some(t) = jobs.lock().expect("jobs lock").get(&key) {
                    let _ = t.state.send(s);
                }
            };
            set(JobState { state: "RUNNING".into(), ..Default::default() });
            let status = tokio::select! {
                s = child.wait() => s.ok(),
                _ = cancel.cancelled() => {
                    let _ = child.start_kill();
                    child.wait().await.ok()
                }
            };
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = tokio::io::AsyncReadExt::read_to_string(&mut e, &mut stderr).await;
            }
            let code = status.and_then(|s| s.code());
            let state = if code == Some(0) { "COMPLETED" } else { "FAILED" };
            set(JobState {
                state: state.into(),
                reason: stderr.lines().last().unwrap_or("").to_string(),
                exit: code.map(|c| c.to_string()),
            });
            if let Some(t) = jobs.lock().expect("jobs lock").get(&key) {
                t.ended.cancel();
            }
        });
        Ok(id)
    }
}

#[async_trait]
impl StepExecutor for Slurm {
    fn name(&self) -> &str {
        match self.opts.mode {
            Mode::Batch => "slurm",
            Mode::Srun => "srun",
        }
    }

    fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    async fn execute(&self, run: StepRun) -> Result<RunReport, EngineError> {
        self.cancel_all_on(&run.cancel);
        let (prep, hit) = self.engine.lookup(&run.request, run.image.clone(), &run.observer).await?;
        if let Some(h) = hit {
            return Ok(h);
        }
        let remote = self.engine.remote().cloned().ok_or_else(|| {
            EngineError::Scheduler("the Slurm executor needs a shared tier (`--remote URL` or `KLIKO_REMOTE`)".into())
        })?;
        // Someone leads this key now (another dispatcher's job, a colleague's run on another
        // machine): follow that run rather than queue a job that would only wait for it. If
        // it ends without a result (its holder died, or was stopped), look again, and submit
        // once nobody leads it.
        loop {
            match self.engine.follow_in_flight(&run.request, &prep, &run.observer, &run.cancel).await? {
                None => break,
                Some(Followed::Ended(_)) => continue,
                Some(Followed::Failed(r)) if r.status == kliko_engine::Status::Cancelled => continue,
                Some(Followed::Recorded(r) | Followed::Failed(r) | Followed::Cancelled(r)) => return Ok(r),
            }
        }
        let input = match &run.request.input {
            Input::Tree(t) => *t,
            Input::None => prep.input_digest,
            // A host folder goes into the store (the node reads it from the tier), unchanged
            // since its key was computed.
            Input::Path(p) => {
                let (store, path) = (self.engine.store().clone(), p.clone());
                let got = tokio::task::spawn_blocking(move || store.ingest(&path, kliko_store::IngestMode::Copy))
                    .await
                    .map_err(|e| EngineError::Join(e.to_string()))??;
                if got.digest != prep.input_digest {
                    return Err(EngineError::WorkChangedBeforeRun { path: p.clone() });
                }
                got.digest
            }
        };
        if run.request.input == Input::None {
            // The empty tree, so the node finds it on the tier like any other input.
            let store = self.engine.store().clone();
            let empty = tokio::task::spawn_blocking(move || {
                store.put_bytes(kliko_store::ObjectKind::Tree, &kliko_core::tree::Tree::new().encode())
            })
            .await
            .map_err(|e| EngineError::Join(e.to_string()))??;
            debug_assert_eq!(empty, input);
        }
        // The node fetches the input from the tier; a failure recorded by an earlier attempt
        // must not be taken for this one's.
        remote.push_tree(self.engine.store(), &input).await?;
        let param_files = self.push_param_files(&remote, &prep).await?;
        remote.forget_failure(&prep.key).await?;
        let plan = Plan {
            kliko_plan: PLAN_VERSION,
            key: prep.key,
            step: run.step.name.clone(),
            entry: run.entry.clone(),
            image: run.step.image.clone(),
            image_id: prep.image.info.id.clone(),
            input,
            params: run.step.params.clone(),
            params_dir: run.params_dir.clone(),
            timeout_ms: run.request.timeout.map(|t| t.as_millis() as u64),
            labels: run.request.labels.clone(),
            gpus: run.request.gpus.as_ref().map(|g| g.to_string()),
            runtime: Some(run.request.runtime.unwrap_or(self.engine.runtime_kind()).name().to_string()),
            remote: remote.url().to_string(),
            param_files,
        };
        let plan = serde_json::to_string(&plan).map_err(|e| EngineError::Internal(e.to_string()))?;
        let mut args = resource_args(&run.step.resources);
        args.extend(self.opts.site_args.iter().cloned());
        if run.cancel.is_cancelled() {
            return Ok(RunReport::unfinished(&run.request, &prep, kliko_engine::Status::Cancelled, 130));
        }
        let since = kliko_store::records::now_ms();
        let id = match self.opts.mode {
            Mode::Batch => self.submit_batch(&run.step.name, args, plan).await?,
            Mode::Srun => self.start_srun(&run.step.name, args, plan, &run.cancel)?,
        };
        let (mut state_rx, ended) = match self.opts.mode {
            Mode::Batch => self.track(&id),
            Mode::Srun => {
                let jobs = self.jobs.lock().expect("jobs lock");
                let t = jobs.get(&id).expect("an srun is tracked from its start");
                (t.state.subscribe(), t.ended.clone())
            }
        };
        run.observer.event(&Event::Job { id: id.clone(), state: "pending".into() });
        // Say each change of the job's state.
        let (obs, job) = (run.observer.clone(), id.clone());
        let said = tokio::spawn(async move {
            while state_rx.changed().await.is_ok() {
                let s = state_rx.borrow_and_update().clone();
                if !s.state.is_empty() {
                    obs.event(&Event::Job { id: job.clone(), state: s.state.to_lowercase() });
                }
            }
        });
        let followed = self.engine.follow(&run.request, &prep, since, &run.observer, &run.cancel, &ended).await;
        let last = self.jobs.lock().expect("jobs lock").get(&id).map(|t| t.state.borrow().clone());
        let report = match followed {
            Ok(Followed::Recorded(r)) => Ok(r),
            Ok(Followed::Cancelled(r)) => {
                if self.opts.mode == Mode::Batch {
                    let _ = slurm_cmd("scancel", std::slice::from_ref(&id), None).await;
                }
                Ok(r)
            }
            Ok(Followed::Failed(mut r)) => {
                // A job stopped by Slurm (time limit, scancel) says `cancelled` from inside:
                // Slurm knows why.
                if r.status == kliko_engine::Status::Cancelled {
                    let state = self.final_state(&id, &ended, last).await;
                    r.status = kliko_engine::Status::Failed;
                    r.reason = Some(state.explain(&id, &run.step.resources));
                    r.log_tail = self.log_tail(&run.step.name, &id);
                }
                Ok(r)
            }
            Ok(Followed::Ended(mut r)) => {
                let state = last.unwrap_or_default();
                r.reason = Some(state.explain(&id, &run.step.resources));
                r.log_tail = self.log_tail(&run.step.name, &id);
                Ok(r)
            }
            Err(e) => Err(e),
        };
        said.abort();
        self.untrack(&id);
        report
    }
}

impl Slurm {
    /// The run's file parameters onto the tier, as one tree of the files named by their
    /// digests, so a node that does not see this machine's files still runs the same key.
    async fn push_param_files(
        &self,
        remote: &Arc<kliko_remote::Remote>,
        prep: &kliko_engine::Prepared,
    ) -> Result<Option<ParamFiles>, EngineError> {
        if prep.file_digests.is_empty() {
            return Ok(None);
        }
        let (store, files) = (self.engine.store().clone(), prep.file_digests.clone());
        let (tree, files) =
            tokio::task::spawn_blocking(move || -> Result<(Digest, BTreeMap<PathBuf, Digest>), EngineError> {
                let stage = store.run_folder("param-files")?;
                let dir = stage.path().join("files");
                std::fs::create_dir(&dir).map_err(|e| EngineError::Io { path: dir.clone(), source: e })?;
                for (path, digest) in &files {
                    let copy = dir.join(digest.to_hex());
                    if !copy.exists() {
                        std::fs::copy(path, &copy).map_err(|e| EngineError::Io { path: path.clone(), source: e })?;
                    }
                }
                let got = store.ingest(&dir, kliko_store::IngestMode::Copy)?;
                // Each copy was hashed as it was stored: one whose contents are not what its name
                // says changed since the key was computed (the node would run another key).
                let stored = store.get_tree(&got.digest)?;
                for (path, digest) in &files {
                    match stored.entries.get(digest.to_hex().as_bytes()) {
                        Some(kliko_core::tree::Entry::File { digest: d, .. }) if d == digest => {}
                        _ => return Err(EngineError::ParamFileChanged { path: path.clone() }),
                    }
                }
                Ok((got.digest, files))
            })
            .await
            .map_err(|e| EngineError::Join(e.to_string()))??;
        remote.push_tree(self.engine.store(), &tree).await?;
        Ok(Some(ParamFiles { tree, files }))
    }

    /// The state a job ended in, waiting (a few polls at most) for the watcher to see it end.
    async fn final_state(&self, id: &str, ended: &CancellationToken, last: Option<JobState>) -> JobState {
        let wait = self.opts.poll * 2 + Duration::from_secs(10);
        let _ = tokio::time::timeout(wait, ended.cancelled()).await;
        self.jobs.lock().expect("jobs lock").get(id).map(|t| t.state.borrow().clone()).or(last).unwrap_or_default()
    }
}

/// Submits runs as they come, the runs of one step that arrive together as one job array.
async fn submitter(mut rx: mpsc::UnboundedReceiver<Submission>, opts: SlurmOptions) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + BATCH_WINDOW;
        while let Ok(Some(s)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            batch.push(s);
        }
        // Group by step and options, in arrival order.
        let mut groups: Vec<Vec<Submission>> = Vec::new();
        for s in batch {
            match groups.iter_mut().find(|g| g[0].step == s.step && g[0].args == s.args) {
                Some(g) => g.push(s),
                None => groups.push(vec![s]),
            }
        }
        for g in groups {
            let plans: Vec<String> = g.iter().map(|s| s.plan.clone()).collect();
            let step = g[0].step.clone();
            let mut args = vec!["--parsable".to_string(), format!("--job-name=kliko-{step}")];
            let out = if plans.len() == 1 { format!("{step}-%j.out") } else { format!("{step}-%A_%a.out") };
            args.push(format!("--output={}", opts.logs.join(out).display()));
            if plans.len() > 1 {
                args.push(format!("--array=0-{}", plans.len() - 1));
            }
            args.extend(g[0].args.iter().cloned());
            let script = batch_script(&opts.kliko, &plans);
            let got = slurm_cmd("sbatch", &args, Some(&script)).await.and_then(|out| {
                parse_parsable(&out).ok_or_else(|| format!("`sbatch --parsable` printed no job id: {}", out.trim()))
            });
            let many = g.len() > 1;
            for (i, s) in g.into_iter().enumerate() {
                let reply = match &got {
                    Ok(id) if many => Ok(format!("{id}_{i}")),
                    Ok(id) => Ok(id.clone()),
                    Err(e) => Err(format!("Slurm refused the job: {e}")),
                };
                let _ = s.reply.send(reply);
            }
            tokio::time::sleep(SUBMIT_GAP).await;
        }
    }
}

/// Every `poll`: one `squeue` for every job in flight; `scontrol show job` for one that left
/// the queue. Tells each job's follower its state, and when it ended.
async fn watcher(jobs: Arc<Mutex<HashMap<String, Tracked>>>, poll: Duration) {
    // The first look comes soon: a job refused at once is said at once.
    let mut wait = Duration::from_secs(2).min(poll);
    loop {
        tokio::time::sleep(wait).await;
        wait = poll;
        let ids: Vec<String> = jobs.lock().expect("jobs lock").keys().cloned().collect();
        if ids.is_empty() {
            continue;
        }
        // Array tasks are asked by their array's id.
        let mut ask: Vec<String> = ids.iter().map(|i| i.split('_').next().unwrap_or(i).to_string()).collect();
        ask.sort();
        ask.dedup();
        let args = vec![
            "--noheader".to_string(),
            "--array".into(),
            "--states=all".into(),
            format!("--jobs={}", ask.join(",")),
            "--format=%i|%T|%r".into(),
        ];
        // A failed squeue (one id already purged, the controller busy) is asked job by job.
        let seen = slurm_cmd("squeue", &args, None).await.map(|o| parse_squeue(&o)).unwrap_or_default();
        for id in ids {
            let state = match seen.get(&id) {
                Some(s) => s.clone(),
                None => {
                    match slurm_cmd("scontrol", &["show".into(), "job".into(), "-o".into(), id.clone()], None).await {
                        Ok(out) => {
                            parse_scontrol(&out).unwrap_or(JobState { state: "GONE".into(), ..Default::default() })
                        }
                        Err(e) if e.contains("Invalid job id") => {
                            JobState { state: "GONE".into(), ..Default::default() }
                        }
                        Err(_) => continue,
                    }
                }
            };
            let ended = state.ended();
            // `scontrol` has the exit code of a job that ended.
            let state = if ended && state.exit.is_none() {
                match slurm_cmd("scontrol", &["show".into(), "job".into(), "-o".into(), id.clone()], None).await {
                    Ok(out) => parse_scontrol(&out).unwrap_or(state),
                    Err(_) => state,
                }
            } else {
                state
            };
            let jobs = jobs.lock().expect("jobs lock");
            if let Some(t) = jobs.get(&id) {
                t.state.send_if_modified(|s| {
                    let changed = *s != state;
                    *s = state.clone();
                    changed
                });
                if ended {
                    t.ended.cancel();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sbatch_parsable_output_with_and_without_a_cluster() {
        assert_eq!(parse_parsable("1234\n").as_deref(), Some("1234"));
        assert_eq!(parse_parsable("1234;cluster-a\n").as_deref(), Some("1234"));
        assert_eq!(parse_parsable("sbatch: error: x\n"), None);
        assert_eq!(parse_parsable(""), None);
    }

    #[test]
    fn squeue_and_scontrol_lines() {
        let q = parse_squeue("12|PENDING|Priority\n13_0|RUNNING|None\n13_1|COMPLETED|None\n");
        assert_eq!(q["12"].state, "PENDING");
        assert_eq!(q["13_0"].reason, "None");
        assert!(!q["13_0"].ended());
        assert!(q["13_1"].ended());
        let s = parse_scontrol(
            "JobId=7 JobName=kliko-a UserId=root(0) JobState=TIMEOUT Reason=TimeLimit Dependency=(null) ExitCode=0:15",
        )
        .unwrap();
        assert_eq!(s, JobState { state: "TIMEOUT".into(), reason: "TimeLimit".into(), exit: Some("0:15".into()) });
        let res = Resources { time: Some(Duration::from_secs(60)), ..Default::default() };
        assert_eq!(s.explain("7", &res), "Slurm stopped job 7 at its time limit (`time: 0-00:01:00`)");
        assert_eq!(parse_scontrol("slurm_load_jobs error: Invalid job id specified"), None);
    }

    #[test]
    fn resources_become_job_options() {
        let r = Resources {
            cpus: Some(4),
            memory: Some(3 << 30),
            time: Some(Duration::from_secs(90 * 60 + 1)),
            gpus: Some(2),
            partition: Some("gpu".into()),
            partition_line: 3,
            account: Some("radio".into()),
            qos: None,
            extra: vec!["--constraint=avx2".into()],
        };
        assert_eq!(
            resource_args(&r),
            [
                "--cpus-per-task=4",
                "--mem=3072M",
                "--time=0-01:30:01",
                "--gres=gpu:2",
                "--partition=gpu",
                "--account=radio",
                "--constraint=avx2"
            ]
        );
        assert!(resource_args(&Resources::default()).is_empty());
        assert_eq!(slurm_time(Duration::from_secs(2 * 86400 + 5)), "2-00:00:05");
    }

    #[test]
    fn only_the_file_parameters_a_node_lacks_are_pointed_at_the_tiers_copies() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("pipeline");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("here.txt"), "seen\n").unwrap();
        let digest = |bytes: &[u8]| Digest::of_bytes(bytes);
        let (here, gone, changed) = (digest(b"seen\n"), digest(b"gone\n"), digest(b"was\n"));
        std::fs::write(dir.join("changed.txt"), "is now\n").unwrap();
        let mut params = serde_json::Map::new();
        params.insert("a".into(), serde_json::json!("here.txt"));
        params.insert("b".into(), serde_json::json!(["gone.txt", "here.txt"]));
        params.insert("c".into(), serde_json::json!("changed.txt"));
        params.insert("n".into(), serde_json::json!(3));
        let files = BTreeMap::from([
            (dir.join("here.txt"), here),
            (dir.join("gone.txt"), gone),
            (dir.join("changed.txt"), changed),
        ]);
        let plan = Plan {
            kliko_plan: PLAN_VERSION,
            key: here,
            step: "s".into(),
            entry: None,
            image: "img".into(),
            image_id: "sha256:0".into(),
            input: here,
            params,
            params_dir: dir.clone(),
            timeout_ms: None,
            labels: BTreeMap::new(),
            runtime: None,
            gpus: None,
            remote: "/tier".into(),
            param_files: Some(ParamFiles { tree: here, files }),
        };
        let unseen = plan.unseen_param_files();
        assert_eq!(unseen, BTreeMap::from([(dir.join("gone.txt"), gone), (dir.join("changed.txt"), changed)]));
        let copies = t.path().join("copies");
        let moved = plan.with_param_copies(&copies, &unseen);
        let at = |d: Digest| serde_json::json!(copies.join(d.to_hex()).display().to_string());
        assert_eq!(moved.params["a"], "here.txt", "a file seen here unchanged stays where it is");
        assert_eq!(moved.params["b"], serde_json::json!([at(gone), "here.txt"]));
        assert_eq!(moved.params["c"], at(changed));
        assert_eq!(moved.params["n"], 3);
    }

    #[test]
    fn a_batch_script_carries_its_plans_quoted() {
        let one = batch_script(Path::new("/opt/kliko"), &[r#"{"a":"it's"}"#.to_string()]);
        assert!(one.contains(r#"plan='{"a":"it'\''s"}'"#), "{one}");
        assert!(one.ends_with("exec '/opt/kliko' run-plan --plan-json \"$plan\"\n"));
        let two = batch_script(Path::new("/k"), &["p0".into(), "p1".into()]);
        assert!(two.contains("0) plan='p0' ;;\n1) plan='p1' ;;"), "{two}");
        // The script runs in a shell as written: each task gets its own plan.
        for (task, want) in [("0", "p0"), ("1", "p1")] {
            let probe = two.replace("exec '/k' run-plan --plan-json \"$plan\"", "printf %s \"$plan\"");
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(&probe)
                .env("SLURM_ARRAY_TASK_ID", task)
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), want);
        }
    }
}
