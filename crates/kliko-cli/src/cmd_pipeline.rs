//! `kliko pipeline run|show FILE`: live status per step on stderr, a summary table at the end,
//! `--json` for scripts.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use kliko_engine::Engine;
use kliko_pipeline::{Options, Pipeline, PipelineReport, Progress, Reporter, StepCache, StepState, Stream};
use tokio_util::sync::CancellationToken;

use crate::cli::{ExecutorChoice, PipelineCommand};
use crate::cmd_run::human_ms;

pub fn run(store_root: &Path, cmd: PipelineCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PipelineCommand::Run { file, jobs, keep_going, json, verbose, executor, ro_crate } => {
            // A cluster runs many at once; the limit is the number of jobs in flight.
            let default = match executor {
                ExecutorChoice::Local => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
                ExecutorChoice::Slurm | ExecutorChoice::Srun => 256,
            };
            let jobs = jobs.unwrap_or(default).max(1);
            run_pipeline(store_root, &file, Options { jobs, keep_going }, json, verbose, executor, ro_crate)
        }
        PipelineCommand::Show { file, json } => show(store_root, &file, json),
        PipelineCommand::History { file, limit, json } => history(store_root, file.as_deref(), limit, json),
    }
}

fn history(store_root: &Path, file: Option<&Path>, limit: usize, json: bool) -> anyhow::Result<ExitCode> {
    // The same file however it was named: runs are recorded under its canonical path.
    let file = match file {
        Some(f) => Some(
            std::fs::canonicalize(f)
                .with_context(|| format!("cannot read the pipeline file `{}`", f.display()))?
                .display()
                .to_string(),
        ),
        None => None,
    };
    // Only the store's index is read: no container runtime, no shared tier.
    let store = Arc::new(
        kliko_store::Store::open(store_root)
            .with_context(|| format!("cannot open the store at `{}`", store_root.display()))?,
    );
    let rt = crate::runtime()?;
    let runs = rt.block_on(kliko_pipeline::history::runs(&store, file, limit))?;
    let mut out = std::io::stdout().lock();
    if json {
        for r in &runs {
            writeln!(out, "{}", serde_json::to_string(r)?)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if runs.is_empty() {
        eprintln!("kliko: no pipeline run is recorded in this store");
        return Ok(ExitCode::SUCCESS);
    }
    for r in &runs {
        let result = if r.cancelled {
            "cancelled"
        } else if r.ok {
            "ok"
        } else {
            "failed"
        };
        writeln!(
            out,
            "{}  {result:<9}  {}  {} container(s), {} wall, {} saved  {} via {}  {}@{}",
            r.at,
            r.file,
            r.containers,
            human_ms(r.wall_ms),
            human_ms(r.saved_ms),
            r.executor,
            r.via,
            r.user,
            r.host
        )?;
        for s in &r.steps {
            let keys: Vec<String> = s.keys.iter().take(3).map(|k| k.short(12)).collect();
            let more = if s.keys.len() > 3 { format!(" (+{})", s.keys.len() - 3) } else { String::new() };
            writeln!(out, "    {:<20} {:<10} {}{more}", s.name, s.state, keys.join(" "))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn open(store_root: &Path) -> anyhow::Result<Arc<Engine>> {
    let store = kliko_store::Store::open(store_root)
        .with_context(|| format!("cannot open the store at `{}`", store_root.display()))?;
    Ok(Arc::new(crate::engine(Arc::new(store))?))
}

fn run_pipeline(
    store_root: &Path,
    file: &Path,
    opts: Options,
    json: bool,
    verbose: bool,
    executor: ExecutorChoice,
    ro_crate: Option<std::path::PathBuf>,
) -> anyhow::Result<ExitCode> {
    let pipeline = Pipeline::load(file)?;
    let rt = crate::runtime()?;
    rt.block_on(async move {
        let engine = open(store_root)?;
        let checked = kliko_pipeline::check(&engine, &pipeline).await?;
        let executor: Arc<dyn kliko_pipeline::StepExecutor> = match executor {
            ExecutorChoice::Local => Arc::new(kliko_pipeline::InProcess::new(engine.clone())),
            ExecutorChoice::Slurm | ExecutorChoice::Srun => {
                use kliko_pipeline::slurm;
                let mode = if executor == ExecutorChoice::Slurm { slurm::Mode::Batch } else { slurm::Mode::Srun };
                // Everything checked before anything is submitted.
                slurm::preflight(&engine, &pipeline).await?;
                Arc::new(slurm::Slurm::new(engine.clone(), slurm::SlurmOptions::from_env(mode, &pipeline.dir)?)?)
            }
        };
        let cancel = CancellationToken::new();
        crate::cancel_on_signal(
            cancel.clone(),
            "kliko: stopping: running containers are being stopped and removed (cluster jobs cancelled); finished steps stay cached",
        );
        let names: Vec<String> = pipeline.steps.iter().map(|s| s.name.clone()).collect();
        let term = Arc::new(Term::new(names, verbose));
        let (at, executor_name) = (kliko_engine::now_rfc3339(), executor.name().to_string());
        let report = kliko_pipeline::run(executor, &pipeline, &checked, opts, term.clone(), cancel).await?;
        term.finish();
        summary(&report);
        // The history of pipeline runs (the web lists it too); losing it loses no result.
        let entry = kliko_pipeline::history::entry(&pipeline, &report, &executor_name, "cli", at.clone());
        if let Err(e) = kliko_pipeline::history::record(engine.store(), entry).await {
            eprintln!("kliko: warning: the pipeline run was not added to the history: {:#}", anyhow::Error::from(e));
        }
        // Uploads left in the background (`--remote-async`) end before the command does.
        crate::finish_background(&engine).await;
        if let Some(out) = &ro_crate {
            write_crate(&engine, &pipeline, &report, out, at)?;
        }
        if json {
            println!("{}", serde_json::to_string(&report)?);
        }
        Ok(if report.cancelled {
            ExitCode::from(130)
        } else if report.ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    })
}

/// The RO-Crate of a pipeline run (see `kliko_pipeline::history::ro_crate`).
fn write_crate(engine: &Engine, p: &Pipeline, report: &PipelineReport, out: &Path, at: String) -> anyhow::Result<()> {
    let (prov, opts, failed) = kliko_pipeline::history::ro_crate(engine.store(), p, report, at)?;
    let written = crate::cmd_cache::write_crate(engine.store(), &prov, out, &opts)?;
    let left = if failed > 0 { format!("; {failed} run(s) that did not succeed are not in it") } else { String::new() };
    eprintln!(
        "kliko: wrote the RO-Crate `{}`: {} run(s), {} file(s){left}",
        out.display(),
        written.runs,
        written.files
    );
    Ok(())
}

/// Live status on stderr: a table redrawn in place on a terminal, else a line per change.
struct Term {
    rows: Mutex<Rows>,
    tty: bool,
    verbose: bool,
}

struct Rows {
    steps: Vec<(String, StepState, Progress)>,
    /// Per step: its cluster jobs and each one's last state.
    jobs: HashMap<String, BTreeMap<String, String>>,
    drawn: usize,
    width: usize,
}

impl Rows {
    /// Redraw the table in place.
    fn draw(&mut self) {
        let width = self.width;
        let mut out = String::new();
        if self.drawn > 0 {
            out.push_str(&format!("\x1b[{}A", self.drawn));
        }
        for (n, s, p) in &self.steps {
            let jobs = match self.jobs.get(n) {
                Some(j) if *s == StepState::Running => jobs_text(j),
                _ => String::new(),
            };
            out.push_str(&format!("\x1b[2K  {n:<width$}  {}{jobs}\n", status_text(*s, p)));
        }
        self.drawn = self.steps.len();
        let _ = std::io::stderr().lock().write_all(out.as_bytes());
    }
}

/// A running step's cluster jobs, for its row: `  jobs 41_0 41_1 +3: 2 pending, 3 running`.
fn jobs_text(jobs: &BTreeMap<String, String>) -> String {
    let live: Vec<(&String, &String)> = jobs
        .iter()
        .filter(|(_, s)| matches!(s.as_str(), "pending" | "running" | "configuring" | "completing"))
        .collect();
    if live.is_empty() {
        return String::new();
    }
    let mut ids: Vec<&str> = live.iter().take(2).map(|(id, _)| id.as_str()).collect();
    let more = live.len().saturating_sub(2);
    let more = if more > 0 { format!(" +{more}") } else { String::new() };
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, s) in &live {
        *counts.entry(s.as_str()).or_default() += 1;
    }
    let counts: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
    let what = if live.len() == 1 { "job" } else { "jobs" };
    ids.dedup();
    format!("  {what} {}{more}: {}", ids.join(" "), counts.join(", "))
}

impl Term {
    fn new(names: Vec<String>, verbose: bool) -> Term {
        let width = names.iter().map(|n| n.len()).max().unwrap_or(4).max(4);
        let steps = names.into_iter().map(|n| (n, StepState::Waiting, Progress::default())).collect();
        // Logs interleave with a redrawn table badly: with `--verbose`, lines only.
        let tty = std::io::stderr().is_terminal() && !verbose;
        Term { rows: Mutex::new(Rows { steps, jobs: HashMap::new(), drawn: 0, width }), tty, verbose }
    }

    fn finish(&self) {
        let mut rows = self.rows.lock().expect("rows lock");
        rows.drawn = 0;
    }
}

fn status_text(state: StepState, p: &Progress) -> String {
    state.describe(p)
}

impl Reporter for Term {
    fn update(&self, step: &str, state: StepState, progress: Progress) {
        let mut rows = self.rows.lock().expect("rows lock");
        let Some(i) = rows.steps.iter().position(|(n, _, _)| n == step) else { return };
        let changed = status_text(rows.steps[i].1, &rows.steps[i].2) != status_text(state, &progress);
        rows.steps[i].1 = state;
        rows.steps[i].2 = progress;
        if self.tty {
            rows.draw();
        } else if changed && state != StepState::Waiting {
            let _ = writeln!(std::io::stderr().lock(), "kliko: {step}: {}", status_text(state, &progress));
        }
    }

    fn job(&self, step: &str, entry: Option<&str>, id: &str, state: &str) {
        if self.tty {
            // The step's row says its live jobs; a line per change would scroll the table away.
            let mut rows = self.rows.lock().expect("rows lock");
            rows.jobs.entry(step.to_string()).or_default().insert(id.to_string(), state.to_string());
            rows.draw();
            return;
        }
        let what = entry.map(|e| format!(" entry `{e}`")).unwrap_or_default();
        let _ = writeln!(std::io::stderr().lock(), "kliko: {step}{what}: job {id} {state}");
    }

    fn log(&self, step: &str, entry: Option<&str>, _stream: Stream, bytes: &[u8]) {
        if !self.verbose {
            return;
        }
        let prefix = match entry {
            Some(e) => format!("[{step} {e}] "),
            None => format!("[{step}] "),
        };
        let text = String::from_utf8_lossy(bytes);
        let mut err = std::io::stderr().lock();
        for line in text.lines() {
            let _ = writeln!(err, "{prefix}{line}");
        }
    }
}

fn summary(r: &PipelineReport) {
    let width = r.steps.iter().map(|s| s.name.len()).max().unwrap_or(4).max(4);
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "\n  {:<width$}  {:<10}  {:<16}  {:>9}  {:>9}", "step", "state", "runs", "took", "saved");
    for s in &r.steps {
        let hits = s.runs.iter().filter(|x| x.cache == Some(kliko_engine::Cache::Hit)).count();
        let runs = match (s.runs.len(), hits) {
            (0, _) => "-".to_string(),
            (n, 0) => format!("{n}"),
            (n, h) if h == n => format!("{n} (cached)"),
            (n, h) => format!("{n} ({h} cached)"),
        };
        let saved = if s.saved_ms > 0 { human_ms(s.saved_ms) } else { "-".into() };
        let took = if s.runs.is_empty() { "-".into() } else { human_ms(s.wall_ms) };
        let _ = writeln!(e, "  {:<width$}  {:<10}  {:<16}  {:>9}  {:>9}", s.name, s.state.as_str(), runs, took, saved);
    }
    let cached = r.steps.iter().filter(|s| s.cache == Some(StepCache::Hit)).count();
    let _ = writeln!(
        e,
        "kliko: {} steps, {} fully cached; {} container{} started; {} (saved {})",
        r.steps.len(),
        cached,
        r.containers,
        if r.containers == 1 { "" } else { "s" },
        human_ms(r.wall_ms),
        human_ms(r.saved_ms)
    );
    for s in &r.steps {
        if let Some(p) = &s.output_path {
            let _ = writeln!(e, "kliko: `{}` output in `{}`", s.name, p.display());
        }
    }
    for s in r.steps.iter().filter(|s| s.state == StepState::Failed || s.state == StepState::Skipped) {
        let _ = writeln!(
            e,
            "{}: step `{}` {}: {}",
            if s.state == StepState::Failed { "error" } else { "note" },
            s.name,
            s.state.as_str(),
            s.reason.as_deref().unwrap_or("?")
        );
        for run in s.runs.iter().filter(|x| !x.log_tail.is_empty()) {
            let _ = writeln!(
                e,
                "  last log lines{}:",
                run.entry.as_ref().map(|n| format!(" of `{n}`")).unwrap_or_default()
            );
            for l in &run.log_tail {
                let _ = writeln!(e, "  | {l}");
            }
        }
    }
}

fn show(store_root: &Path, file: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let pipeline = Pipeline::load(file)?;
    let rt = crate::runtime()?;
    rt.block_on(async move {
        let engine = open(store_root)?;
        let checked = kliko_pipeline::check(&engine, &pipeline).await?;
        let plans = kliko_pipeline::show(&engine, &pipeline, &checked).await?;
        if json {
            println!("{}", serde_json::json!({ "file": pipeline.file, "steps": plans }));
            return Ok(ExitCode::SUCCESS);
        }
        println!("pipeline `{}`: {} steps", file.display(), plans.len());
        for p in &plans {
            println!("\n{} (line {}): image `{}` (io {})", p.name, p.line, p.image, p.io);
            if !p.depends_on.is_empty() {
                println!("  after: {}", p.depends_on.iter().map(|d| format!("`{d}`")).collect::<Vec<_>>().join(", "));
            }
            if let Some(f) = &p.foreach {
                println!("  foreach: {f}");
            }
            println!("  input: {}", p.input);
            if let Some(o) = &p.output {
                println!("  output: `{}`", o.display());
            }
            match (&p.runs, &p.unknown) {
                (Some(runs), _) => {
                    if runs.is_empty() {
                        println!("  no entries");
                    }
                    for r in runs {
                        let what = if r.hit { "cached" } else { "would run" };
                        match &r.entry {
                            Some(e) => println!("  {e}: key {} {what}", r.key.short(16)),
                            None => println!("  key {} {what}", r.key.short(16)),
                        }
                    }
                }
                (None, Some(why)) => println!("  key: not known yet: {why}"),
                (None, None) => {}
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_steps_row_names_its_live_jobs() {
        let jobs = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
        };
        assert_eq!(jobs_text(&jobs(&[("41", "pending")])), "  job 41: 1 pending");
        assert_eq!(
            jobs_text(&jobs(&[
                ("41_0", "running"),
                ("41_1", "completed"),
                ("41_2", "pending"),
                ("41_3", "running"),
                ("41_4", "running")
            ])),
            "  jobs 41_0 41_2 +2: 1 pending, 3 running"
        );
        assert_eq!(jobs_text(&jobs(&[("41", "completed"), ("42", "timeout")])), "");
    }
}
