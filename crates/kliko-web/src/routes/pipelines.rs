//! Pipelines in the browser: the pipeline files under the data folders, a page per pipeline
//! (its graph, each step's state — would hit, would run — and its history), and runs of
//! whole pipelines with the command line's executors, their graph and logs live.
//!
//! A pipeline names host folders and files of its own (inputs, `foreach` folders, outputs,
//! file parameters). The browser may only use those inside the data folders, exactly as for
//! a single run: a pipeline that names anything else is shown, never run.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::extract::{Form, Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use futures_util::stream::Stream;
use kliko_pipeline::{
    Checked, Options, Pipeline, PipelineError, PipelineReport, Progress, Reporter, RunStatus, StepPlan, StepState,
};
use kliko_store::records::PipelineRun;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::{check_csrf, crate_zip, explain, internal, rfc3339, CsrfForm, PageError, St};
use crate::html::{self, badge, esc, page, url_path, Nav};
use crate::{auth, AppState};

/// Bounds of the search for pipeline files: folders deep, entries looked at, file size.
const WALK_DEPTH: usize = 6;
const WALK_ENTRIES: usize = 20_000;
const MAX_FILE: u64 = 1 << 20;
/// Log bytes a pipeline run keeps for its page (the full logs are in the store).
const LOG_KEEP: usize = 2 << 20;

// ---------------------------------------------------------------- finding pipeline files

/// A pipeline file under the data roots (by its first lines: `version:` and `steps:` at the
/// top level), at most `WALK_ENTRIES` entries looked at; hidden folders and symlinks skipped.
fn find_pipelines(roots: &[PathBuf]) -> (Vec<PathBuf>, bool) {
    let mut out = Vec::new();
    let mut seen = 0usize;
    for root in roots {
        let mut stack = vec![(root.clone(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else { continue };
            let mut children = Vec::new();
            for e in rd.flatten() {
                seen += 1;
                if seen > WALK_ENTRIES {
                    out.sort();
                    return (out, true);
                }
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with('.') {
                    continue;
                }
                let Ok(t) = e.file_type() else { continue };
                if t.is_dir() && depth < WALK_DEPTH {
                    children.push(e.path());
                } else if t.is_file() && (name.ends_with(".yml") || name.ends_with(".yaml")) && name != "kliko.yml" {
                    let path = e.path();
                    if e.metadata().is_ok_and(|m| m.len() <= MAX_FILE) && looks_like_pipeline(&path) {
                        out.push(path);
                    }
                }
            }
            children.sort();
            stack.extend(children.into_iter().rev().map(|c| (c, depth + 1)));
        }
    }
    out.sort();
    (out, false)
}

fn looks_like_pipeline(path: &FsPath) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else { return false };
    let top = |key: &str| text.lines().any(|l| l.starts_with(key));
    top("version:") && top("steps:")
}

/// `/pipelines`: every pipeline file under the data folders, and the latest pipeline runs.
pub async fn list(State(st): St) -> Result<Html<String>, PageError> {
    let roots = st.roots.roots().to_vec();
    let (files, truncated) = tokio::task::spawn_blocking(move || find_pipelines(&roots))
        .await
        .map_err(|e| PageError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    // Newest first: the recent runs, and each file's last run among them.
    let recent = kliko_pipeline::history::runs(st.engine.store(), None, 1000).await.map_err(internal)?;
    let mut b = String::from(
        "<h1>Pipelines</h1><p class=\"sub\">Pipeline files in the data folders. Each step is a memoized run: an unchanged step is never computed again.</p>",
    );
    if st.roots.roots().is_empty() {
        b.push_str("<div class=\"alert warn\">This server has no data folder, so it has no pipelines to show.</div>");
    } else if files.is_empty() {
        b.push_str("<div class=\"card\">No pipeline file (a YAML file with <code>version:</code> and <code>steps:</code>) in the data folders.</div>");
    } else {
        b.push_str("<table id=\"pipelines\"><tr><th>file</th><th>steps</th><th>last run</th></tr>");
        for f in &files {
            let summary = match Pipeline::load(f) {
                Ok(p) => {
                    let names: Vec<String> = p.steps.iter().map(|s| format!("<code>{}</code>", esc(&s.name))).collect();
                    names.join(" → ")
                }
                Err(PipelineError::Invalid { problems, .. }) => badge(
                    "failed",
                    &format!("{} problem{}", problems.len(), if problems.len() == 1 { "" } else { "s" }),
                ),
                Err(e) => badge("failed", &kliko_core::error_chain(&e)),
            };
            let file = f.display().to_string();
            let last = recent.iter().find(|r| r.file == file).map(run_summary).unwrap_or_default();
            b.push_str(&format!(
                "<tr><td><a href=\"/pipeline{}\"><code>{}</code></a></td><td>{summary}</td><td>{last}</td></tr>",
                url_path(&file),
                esc(&shown_path(&st, f)),
            ));
        }
        b.push_str("</table>");
        if truncated {
            b.push_str(&format!(
                "<p class=\"meta\">The data folders hold more than {WALK_ENTRIES} entries: only the first were searched.</p>"
            ));
        }
    }
    if !recent.is_empty() {
        b.push_str("<h2>Recent pipeline runs</h2>");
        b.push_str(&history_table(&st, &recent[..recent.len().min(50)], true));
    }
    Ok(Html(page("Pipelines", Nav::Pipelines, &b)))
}

/// A path as the user knows it: relative to its data folder when there is only one.
fn shown_path(st: &AppState, p: &FsPath) -> String {
    match st.roots.roots() {
        [one] => p.strip_prefix(one).map(|r| r.display().to_string()).unwrap_or_else(|_| p.display().to_string()),
        _ => p.display().to_string(),
    }
}

/// How a pipeline run ended, as a badge.
fn outcome_badge(r: &PipelineRun) -> String {
    if r.cancelled {
        badge("warn", "cancelled")
    } else if r.ok {
        badge("ok", "succeeded")
    } else {
        badge("failed", "failed")
    }
}

fn run_summary(r: &PipelineRun) -> String {
    format!("{} <span class=\"meta\">{}</span>", outcome_badge(r), esc(&r.at))
}

fn history_table(st: &AppState, runs: &[PipelineRun], with_file: bool) -> String {
    let mut b = String::from("<table class=\"pipeline-history\"><tr><th>when</th>");
    if with_file {
        b.push_str("<th>file</th>");
    }
    b.push_str("<th>result</th><th>steps</th><th class=\"num\">containers</th><th class=\"num\">wall</th><th class=\"num\">saved</th><th>executor</th><th>who</th></tr>");
    for r in runs {
        b.push_str(&format!("<tr><td>{}</td>", esc(&r.at)));
        if with_file {
            b.push_str(&format!(
                "<td><a href=\"/pipeline{}\"><code>{}</code></a></td>",
                url_path(&r.file),
                esc(&shown_path(st, FsPath::new(&r.file)))
            ));
        }
        let steps: Vec<String> = r
            .steps
            .iter()
            .map(|s| {
                let name = esc(&s.name);
                let shown = match s.keys.as_slice() {
                    [one] => format!("<a href=\"/provenance/{one}\">{name}</a>"),
                    _ => name,
                };
                format!("{shown} {}", badge(state_badge(&s.state), &s.state))
            })
            .collect();
        b.push_str(&format!(
            "<td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
            outcome_badge(r),
            steps.join("<br>"),
            r.containers,
            esc(&html::duration_ms(r.wall_ms)),
            if r.saved_ms > 0 { esc(&html::duration_ms(r.saved_ms)) } else { String::new() },
            esc(&format!("{} ({})", r.executor, r.via)),
            esc(&format!("{}@{}", r.user, r.host)),
        ));
    }
    b.push_str("</table>");
    b
}

/// The badge class of a step state (`StepState::as_str`, or a plan's `would hit`).
fn state_badge(state: &str) -> &'static str {
    match state {
        "cached" | "would hit" => "hit",
        "done" => "ok",
        "failed" | "cancelled" => "failed",
        "running" => "running",
        "skipped" | "not run" => "warn",
        _ => "muted",
    }
}

/// The CSS class of a step state on the graph.
fn state_class(state: &str) -> String {
    format!("st-{}", state.split(' ').collect::<Vec<_>>().join("-"))
}

// ---------------------------------------------------------------- one pipeline

/// The pipeline file a URL names: inside the data folders, an existing file.
fn resolve_file(st: &AppState, path: &str) -> Result<PathBuf, PageError> {
    let typed = format!("/{}", path.trim_start_matches('/'));
    let file = st.roots.resolve(&typed).map_err(|why| PageError::new(StatusCode::FORBIDDEN, why))?;
    if !file.is_file() {
        return Err(PageError::new(StatusCode::NOT_FOUND, format!("there is no pipeline file `{typed}`")));
    }
    Ok(file)
}

/// Every host path the pipeline would read or write that lies outside the data folders,
/// with the step that names it. `checked` adds the file parameters.
fn outside_roots(st: &AppState, p: &Pipeline, checked: Option<&Checked>) -> Vec<String> {
    let mut out = Vec::new();
    for step in &p.steps {
        let mut paths: Vec<(PathBuf, &str)> =
            step.host_paths().into_iter().map(|(p, _)| (p.to_path_buf(), "reads")).collect();
        if let Some(o) = &step.output {
            paths.push((o.clone(), "writes"));
        }
        if let Some(params) = checked.and_then(|c| c.params.get(&step.name)) {
            paths.extend(params.file_placements().into_iter().map(|(host, _)| (host, "reads the file parameter")));
        }
        for (path, what) in paths {
            let inside = path.to_str().is_some_and(|s| st.roots.resolve(s).is_ok());
            if !inside {
                out.push(format!("step `{}` {what} `{}`", step.name, path.display()));
            }
        }
    }
    out
}

/// What stops a pipeline from being run here, in words (`None`: it can run).
struct Loaded {
    pipeline: Option<Pipeline>,
    checked: Option<Checked>,
    problems: Vec<String>,
    /// The paths outside the data folders.
    outside: Vec<String>,
}

async fn load(st: &AppState, file: &FsPath) -> Loaded {
    let mut l = Loaded { pipeline: None, checked: None, problems: Vec::new(), outside: Vec::new() };
    let p = match Pipeline::load(file) {
        Ok(p) => p,
        Err(PipelineError::Invalid { problems, .. }) => {
            l.problems = problems.iter().map(|p| p.to_string()).collect();
            return l;
        }
        Err(e) => {
            l.problems = vec![kliko_core::error_chain(&e)];
            return l;
        }
    };
    // The paths written in the file are judged before anything looks at them.
    l.outside = outside_roots(st, &p, None);
    if l.outside.is_empty() {
        match kliko_pipeline::check(&st.engine, &p).await {
            Ok(c) => {
                l.outside = outside_roots(st, &p, Some(&c));
                l.checked = Some(c);
            }
            Err(PipelineError::Invalid { problems, .. }) => {
                l.problems = problems.iter().map(|p| p.to_string()).collect()
            }
            Err(PipelineError::Engine(e)) => l.problems = vec![explain(&e)],
            Err(e) => l.problems = vec![kliko_core::error_chain(&e)],
        }
    }
    l.pipeline = Some(p);
    l
}

/// The graph of `p`: a box per step with its state (`states`: by step name, a state word and
/// the text shown), an arrow from each step to the steps that read it.
/// The graph of `p`, and a legend of the states in `legend`.
fn graph(
    p: &Pipeline,
    states: &HashMap<String, (String, String)>,
    links: &HashMap<String, String>,
    legend: &[&str],
) -> String {
    use kliko_core::svg::Node;
    let index: HashMap<&str, usize> = p.steps.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
    let nodes: Vec<Node> = p
        .steps
        .iter()
        .map(|s| {
            let (state, text) = states.get(&s.name).cloned().unwrap_or_else(|| ("unknown".into(), "unknown".into()));
            Node {
                href: links.get(&s.name).cloned(),
                title: format!("step {}: {} ({text})", s.name, s.image),
                lines: vec![s.name.clone(), s.image.clone()],
                round: false,
                outlined: false,
                id: Some(format!("step-{}", s.name)),
                class: Some(format!("step {}", state_class(&state))),
            }
        })
        .collect();
    let mut edges = Vec::new();
    for (i, s) in p.steps.iter().enumerate() {
        for d in s.deps() {
            if let Some(&j) = index.get(d) {
                edges.push((j, i));
            }
        }
    }
    let legend: String =
        legend.iter().map(|l| format!("<span class=\"{}\">{}</span>", state_class(l), esc(l))).collect();
    format!(
        "<div class=\"lineage-wrap\">{}</div><div class=\"legend\">{legend}</div>",
        kliko_core::svg::layered(&nodes, &edges, "pipeline-graph", "pipeline graph")
    )
}

fn plan_state(plan: &StepPlan) -> (String, String) {
    match &plan.runs {
        None => ("unknown".into(), plan.unknown.clone().unwrap_or_else(|| "not known yet".into())),
        Some(runs) if runs.iter().all(|r| r.hit) => {
            let n = runs.len();
            ("would hit".into(), if n == 1 { "would hit".into() } else { format!("would hit ({n} of {n})") })
        }
        Some(runs) => {
            let hits = runs.iter().filter(|r| r.hit).count();
            let text = if runs.len() == 1 {
                "would run".to_string()
            } else {
                format!("would run {} of {}", runs.len() - hits, runs.len())
            };
            ("would run".into(), text)
        }
    }
}

/// `/pipeline/{path}`: the graph with what a run would do, the run form, the history.
pub async fn pipeline_page(State(st): St, Path(path): Path<String>) -> Result<Response, PageError> {
    let file = resolve_file(&st, &path)?;
    let body = pipeline_body(&st, &file, None).await?;
    Ok(Html(page("Pipeline", Nav::Pipelines, &body)).into_response())
}

async fn pipeline_body(st: &AppState, file: &FsPath, error: Option<&str>) -> Result<String, PageError> {
    let l = load(st, file).await;
    let mut b = format!("<h1>Pipeline <code>{}</code></h1>", esc(&shown_path(st, file)));
    if let Some(p) = &l.pipeline {
        b.push_str(&format!(
            "<p class=\"sub\">{} step{} · file digest <code>{}</code></p>",
            p.steps.len(),
            if p.steps.len() == 1 { "" } else { "s" },
            esc(&p.digest.short(12))
        ));
    }
    if let Some(e) = error {
        b.push_str(&format!("<div class=\"alert bad\" id=\"run-error\">{}</div>", esc(e).replace('\n', "<br>")));
    }
    if !l.problems.is_empty() {
        b.push_str("<div class=\"alert bad\" id=\"problems\"><b>This pipeline cannot run:</b><ul>");
        for p in &l.problems {
            b.push_str(&format!("<li>{}</li>", esc(p).replace('\n', "<br>")));
        }
        b.push_str("</ul></div>");
    }
    if !l.outside.is_empty() {
        b.push_str("<div class=\"alert bad\" id=\"outside\"><b>This pipeline names folders or files outside the data folders this server may use, so it cannot run from the browser:</b><ul>");
        for o in &l.outside {
            b.push_str(&format!("<li>{}</li>", esc(o)));
        }
        b.push_str("</ul></div>");
    }
    let Some(p) = &l.pipeline else { return Ok(b) };
    let mut states: HashMap<String, (String, String)> = HashMap::new();
    let mut links: HashMap<String, String> = HashMap::new();
    let mut plans: Vec<StepPlan> = Vec::new();
    if let (Some(checked), true) = (&l.checked, l.outside.is_empty()) {
        match kliko_pipeline::show(&st.engine, p, checked).await {
            Ok(ps) => plans = ps,
            Err(e) => b.push_str(&format!(
                "<div class=\"alert warn\">What a run would reuse cannot be told: {}</div>",
                esc(&kliko_core::error_chain(&e))
            )),
        }
    }
    for plan in &plans {
        states.insert(plan.name.clone(), plan_state(plan));
        if let Some([one]) = plan.runs.as_deref() {
            if one.hit {
                links.insert(plan.name.clone(), format!("/provenance/{}", one.key));
            }
        }
    }
    b.push_str(&graph(p, &states, &links, &["would hit", "would run", "unknown"]));
    b.push_str("<table id=\"steps\"><tr><th>step</th><th>image</th><th>input</th><th>a run would</th></tr>");
    for step in &p.steps {
        let plan = plans.iter().find(|x| x.name == step.name);
        let input = plan.map(|x| x.input.clone()).unwrap_or_default();
        let foreach = plan
            .and_then(|x| x.foreach.clone())
            .map(|f| format!("<br><span class=\"meta\">for each of {}</span>", esc(&f)))
            .unwrap_or_default();
        let (state, text) = states.get(&step.name).cloned().unwrap_or_else(|| ("unknown".into(), "unknown".into()));
        let keys = plan
            .and_then(|x| x.runs.as_ref())
            .map(|runs| {
                runs.iter()
                    .filter(|r| r.hit)
                    .take(20)
                    .map(|r| format!(" <a href=\"/provenance/{}\"><code>{}</code></a>", r.key, esc(&r.key.short(8))))
                    .collect::<String>()
            })
            .unwrap_or_default();
        b.push_str(&format!(
            "<tr id=\"row-{}\"><td><b>{}</b></td><td><code>{}</code></td><td>{}{foreach}</td><td>{}{keys}</td></tr>",
            esc(&step.name),
            esc(&step.name),
            esc(&step.image),
            esc(&input),
            badge(state_badge(&state), &text)
        ));
    }
    b.push_str("</table>");

    // Runs of this file going on in this server.
    for run in st.pipelines.all().iter().filter(|r| r.file == file && !r.is_finished()) {
        b.push_str(&format!(
            "<div class=\"alert ok\">A run of this pipeline is going on: <a href=\"/pipeline-run/{}\">follow it</a>.</div>",
            url_path(&run.id)
        ));
    }
    if l.problems.is_empty() && l.outside.is_empty() {
        b.push_str(&run_form(st, file));
    }
    let runs = kliko_pipeline::history::runs(st.engine.store(), Some(file.display().to_string()), 100)
        .await
        .map_err(internal)?;
    b.push_str("<h2>History</h2>");
    if runs.is_empty() {
        b.push_str("<div class=\"card\">This pipeline has not run yet.</div>");
    } else {
        b.push_str(&history_table(st, &runs, false));
    }
    Ok(b)
}

fn run_form(st: &AppState, file: &FsPath) -> String {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let slurm = if st.engine.remote().is_some() {
        String::from("<option value=\"slurm\">the cluster, one Slurm job per run (sbatch)</option><option value=\"srun\">this Slurm allocation (srun)</option>")
    } else {
        String::from("<option value=\"slurm\" disabled>the cluster (Slurm): needs a shared cache, which this server has not</option>")
    };
    format!(
        "<h2>Run</h2><form method=\"post\" action=\"/pipeline{}\" class=\"card\" id=\"run-form\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
<div class=\"field\"><label for=\"executor\">Where the steps run</label><select id=\"executor\" name=\"executor\"><option value=\"local\" selected>this machine</option>{slurm}</select></div>\
<div class=\"field\"><label for=\"jobs\">Runs at once</label><input type=\"number\" id=\"jobs\" name=\"jobs\" min=\"1\" max=\"4096\" value=\"{cores}\"><div class=\"help\">On this machine: containers at once. On the cluster: jobs in flight.</div></div>\
<div class=\"field\"><label class=\"check\"><input type=\"checkbox\" name=\"keep_going\" value=\"1\">After a failure, go on with the steps that do not depend on it</label></div>\
<div class=\"actions\"><button type=\"submit\" class=\"primary\">Run pipeline</button><span class=\"meta\">Steps whose result is stored are reused, not run.</span></div></form>",
        url_path(&file.display().to_string()),
        esc(&st.csrf)
    )
}

/// The pipeline's page again, with why it was not run (422).
async fn refuse(st: &AppState, file: &FsPath, msg: String) -> Result<Response, PageError> {
    let body = pipeline_body(st, file, Some(&msg)).await?;
    Ok((StatusCode::UNPROCESSABLE_ENTITY, Html(page("Pipeline", Nav::Pipelines, &body))).into_response())
}

/// The run form of a pipeline.
#[derive(serde::Deserialize)]
pub struct RunForm {
    csrf: Option<String>,
    executor: Option<String>,
    jobs: Option<String>,
    keep_going: Option<String>,
}

/// `POST /pipeline/{path}`: start a run of the pipeline; to its page.
pub async fn submit(State(st): St, Path(path): Path<String>, Form(f): Form<RunForm>) -> Result<Response, PageError> {
    check_csrf(&st, f.csrf.as_deref())?;
    let file = resolve_file(&st, &path)?;
    let executor = f.executor.unwrap_or_else(|| "local".into());
    let jobs_given = f.jobs.filter(|j| !j.trim().is_empty());
    let jobs = match jobs_given.as_deref().map(|j| j.trim().parse::<usize>()) {
        None => None,
        Some(Ok(n)) if (1..=4096).contains(&n) => Some(n),
        Some(_) => return refuse(&st, &file, "“Runs at once” must be a whole number from 1 to 4096.".into()).await,
    };
    let keep_going = f.keep_going.is_some();
    let l = load(&st, &file).await;
    if !l.outside.is_empty() || !l.problems.is_empty() {
        return refuse(&st, &file, "The pipeline was not run.".into()).await;
    }
    let (Some(p), Some(checked)) = (l.pipeline, l.checked) else {
        return refuse(&st, &file, "The pipeline was not run.".into()).await;
    };
    let engine = st.engine.clone();
    let exec: Arc<dyn kliko_pipeline::StepExecutor> = match executor.as_str() {
        "local" => Arc::new(kliko_pipeline::InProcess::new(engine.clone())),
        "slurm" | "srun" => {
            use kliko_pipeline::slurm;
            // Raw scheduler options could make a job read or write anywhere the server's user
            // may (`--output`, `--chdir`, …): from the browser, only the resources kliko knows.
            let raw: Vec<String> = p
                .steps
                .iter()
                .map(|s| (s, s.resources.over(&p.resources)))
                .filter(|(_, r)| !r.extra.is_empty())
                .map(|(s, r)| format!("`{}` ({})", s.name, r.extra.join(" ")))
                .collect();
            if !raw.is_empty() {
                return refuse(&st, &file, format!(
                    "Steps {} give their own Slurm options (`sbatch:`). From the browser a pipeline goes to the cluster only with the resources kliko knows (cpus, memory, time, gpus, partition, account, qos): raw options could make a job read or write outside the data folders. Nothing was run.",
                    raw.join(", ")
                ))
                .await;
            }
            if engine.remote().is_none() {
                return refuse(&st, &file, "Running on the cluster needs a cache shared by its machines, and this server has none: whoever runs it must give it one. Nothing was run.".into()).await;
            }
            let mode = if executor == "slurm" { slurm::Mode::Batch } else { slurm::Mode::Srun };
            let made = match slurm::preflight(&engine, &p).await {
                Ok(()) => {
                    slurm::SlurmOptions::from_env(mode, &p.dir).and_then(|o| slurm::Slurm::new(engine.clone(), o))
                }
                Err(e) => Err(e),
            };
            match made {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    return refuse(&st, &file, format!("The cluster cannot be used: {}", kliko_core::error_chain(&e)))
                        .await
                }
            }
        }
        other => return refuse(&st, &file, format!("There is no executor “{other}”.")).await,
    };
    let default_jobs =
        if executor == "local" { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) } else { 256 };
    let opts = Options { jobs: jobs.unwrap_or(default_jobs), keep_going };
    let id = auth::random_hex(8);
    let entry = Arc::new(PipelineEntry::new(id.clone(), file, &p, exec.name().to_string()));
    st.pipelines.insert(entry.clone());
    tokio::spawn(async move {
        let at = kliko_engine::now_rfc3339();
        let reporter = Arc::new(LiveReporter(entry.clone()));
        let result = kliko_pipeline::run(exec.clone(), &p, &checked, opts, reporter, entry.cancel.clone()).await;
        let result = match result {
            Ok(report) => {
                let record = kliko_pipeline::history::entry(&p, &report, exec.name(), "web", at);
                if let Err(e) = kliko_pipeline::history::record(engine.store(), record).await {
                    entry.warn(format!("The run was not added to the history: {}", kliko_core::error_chain(&e)));
                }
                Ok(report)
            }
            Err(PipelineError::Engine(e)) => Err(explain(&e)),
            Err(e) => Err(kliko_core::error_chain(&e)),
        };
        entry.finish(result);
    });
    Ok(Redirect::to(&format!("/pipeline-run/{id}")).into_response())
}

// ---------------------------------------------------------------- pipeline runs

/// What a live viewer of a pipeline run is sent.
#[derive(Clone, Debug)]
enum Msg {
    Step { name: String, state: String, text: String },
    Log(String),
    Done,
}

struct RunView {
    /// By step: the state word and the text shown.
    steps: BTreeMap<String, (String, String)>,
    report: Option<PipelineReport>,
    error: Option<String>,
    warnings: Vec<String>,
    finished: bool,
    log: String,
    dropped: bool,
}

/// A pipeline run started by this server.
pub struct PipelineEntry {
    pub id: String,
    pub file: PathBuf,
    pub executor: String,
    pub started: SystemTime,
    /// The pipeline as it was run (its graph).
    pipeline: Pipeline,
    view: Mutex<RunView>,
    tx: broadcast::Sender<Msg>,
    done_tx: watch::Sender<bool>,
    pub cancel: CancellationToken,
}

impl PipelineEntry {
    fn new(id: String, file: PathBuf, p: &Pipeline, executor: String) -> PipelineEntry {
        let (tx, _) = broadcast::channel(1024);
        let (done_tx, _) = watch::channel(false);
        let steps = p.steps.iter().map(|s| (s.name.clone(), ("waiting".to_string(), "waiting".to_string()))).collect();
        PipelineEntry {
            id,
            file,
            executor,
            started: SystemTime::now(),
            pipeline: p.clone(),
            view: Mutex::new(RunView {
                steps,
                report: None,
                error: None,
                warnings: Vec::new(),
                finished: false,
                log: String::new(),
                dropped: false,
            }),
            tx,
            done_tx,
            cancel: CancellationToken::new(),
        }
    }

    pub fn is_finished(&self) -> bool {
        self.view.lock().expect("view lock").finished
    }

    /// Until the run has ended.
    pub async fn wait(&self) {
        let mut rx = self.done_tx.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// The report, once the run ended without an error.
    pub fn report(&self) -> Option<PipelineReport> {
        self.view.lock().expect("view lock").report.clone()
    }

    fn warn(&self, w: String) {
        self.view.lock().expect("view lock").warnings.push(w);
    }

    fn finish(&self, result: Result<PipelineReport, String>) {
        {
            let mut v = self.view.lock().expect("view lock");
            match result {
                Ok(r) => {
                    for s in &r.steps {
                        let text = s.state.as_str().to_string();
                        v.steps.insert(s.name.clone(), (text.clone(), text));
                    }
                    v.report = Some(r);
                }
                Err(e) => v.error = Some(e),
            }
            v.finished = true;
            let _ = self.tx.send(Msg::Done);
        }
        self.done_tx.send_replace(true);
    }
}

/// Pipeline runs started by this server, by id.
#[derive(Default)]
pub struct Registry(Mutex<HashMap<String, Arc<PipelineEntry>>>);

impl Registry {
    fn insert(&self, e: Arc<PipelineEntry>) {
        self.0.lock().expect("registry lock").insert(e.id.clone(), e);
    }

    pub fn get(&self, id: &str) -> Option<Arc<PipelineEntry>> {
        self.0.lock().expect("registry lock").get(id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<PipelineEntry>> {
        self.0.lock().expect("registry lock").values().cloned().collect()
    }
}

struct LiveReporter(Arc<PipelineEntry>);

impl Reporter for LiveReporter {
    fn update(&self, step: &str, state: StepState, progress: Progress) {
        let text = state.describe(&progress);
        let word = state.as_str().to_string();
        let mut v = self.0.view.lock().expect("view lock");
        if v.steps.get(step).is_some_and(|(w, t)| *w == word && *t == text) {
            return;
        }
        v.steps.insert(step.to_string(), (word.clone(), text.clone()));
        let _ = self.0.tx.send(Msg::Step { name: step.to_string(), state: word, text });
    }

    fn job(&self, step: &str, entry: Option<&str>, id: &str, state: &str) {
        let what = entry.map(|e| format!(" {e}")).unwrap_or_default();
        self.push_log(format!("[{step}{what}] cluster job {id}: {state}\n"));
    }

    fn log(&self, step: &str, entry: Option<&str>, _stream: kliko_pipeline::Stream, bytes: &[u8]) {
        let prefix = match entry {
            Some(e) => format!("[{step} {e}] "),
            None => format!("[{step}] "),
        };
        let text = String::from_utf8_lossy(bytes);
        let mut out = String::with_capacity(text.len() + prefix.len());
        for line in text.split_inclusive('\n') {
            out.push_str(&prefix);
            out.push_str(line);
        }
        if !out.ends_with('\n') {
            out.push('\n');
        }
        self.push_log(out);
    }
}

impl LiveReporter {
    fn push_log(&self, text: String) {
        let mut v = self.0.view.lock().expect("view lock");
        v.log.push_str(&text);
        if v.log.len() > LOG_KEEP {
            let mut cut = v.log.len() - LOG_KEEP / 2;
            while !v.log.is_char_boundary(cut) {
                cut += 1;
            }
            v.log.drain(..cut);
            v.dropped = true;
        }
        let _ = self.0.tx.send(Msg::Log(text));
    }
}

fn get_run(st: &AppState, id: &str) -> Result<Arc<PipelineEntry>, PageError> {
    st.pipelines.get(id).ok_or_else(|| {
        PageError::new(
            StatusCode::NOT_FOUND,
            format!("no pipeline run `{id}` on this server (runs are kept while it runs; see the pipeline's history for older ones)"),
        )
    })
}

/// `/pipeline-run/{id}`: the graph with each step's state, live; each step's runs with links
/// to their records and logs once known; the logs.
pub async fn run_page(State(st): St, Path(id): Path<String>) -> Result<Html<String>, PageError> {
    let run = get_run(&st, &id)?;
    let (steps, report, error, warnings, finished, log, dropped) = {
        let v = run.view.lock().expect("view lock");
        (v.steps.clone(), v.report.clone(), v.error.clone(), v.warnings.clone(), v.finished, v.log.clone(), v.dropped)
    };
    let p = &run.pipeline;
    let status = match (&report, &error, finished) {
        (_, _, false) => badge("running", "running"),
        (Some(r), _, _) if r.cancelled => badge("warn", "cancelled"),
        (Some(r), _, _) if r.ok => badge("ok", "succeeded"),
        _ => badge("failed", "failed"),
    };
    let mut b = format!(
        "<h1>Pipeline run <code>{}</code></h1><p class=\"sub\">pipeline <a href=\"/pipeline{}\"><code>{}</code></a> · on {} · started {}</p>",
        esc(&run.id),
        url_path(&run.file.display().to_string()),
        esc(&shown_path(&st, &run.file)),
        esc(&run.executor),
        esc(&rfc3339(run.started))
    );
    b.push_str(&format!(
        "<div class=\"card status\"><div><div class=\"label\">status</div><div class=\"big\" id=\"status\">{status}</div></div>"
    ));
    if let Some(r) = &report {
        b.push_str(&format!(
            "<div><div class=\"label\">containers</div><div class=\"big\" id=\"containers\">{}</div></div>\
             <div><div class=\"label\">wall time</div><div class=\"big\">{}</div></div>\
             <div><div class=\"label\">saved</div><div class=\"big\">{}</div></div>",
            r.containers,
            esc(&html::duration_ms(r.wall_ms)),
            esc(&html::duration_ms(r.saved_ms))
        ));
    }
    if !finished {
        b.push_str(&format!(
            "<form method=\"post\" action=\"/pipeline-run/{}/cancel\" style=\"margin-left:auto\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><button type=\"submit\">Cancel</button></form>",
            url_path(&run.id),
            esc(&st.csrf)
        ));
    }
    b.push_str("</div>");
    if report.is_some() {
        b.push_str(&format!(
            "<p class=\"meta\" id=\"crate\"><a href=\"/pipeline-run/{}/ro-crate\" download>Download this run as an RO-Crate</a> \
(the pipeline, its steps and every run that made a result, by digest).</p>",
            url_path(&run.id)
        ));
    }
    if let Some(e) = &error {
        b.push_str(&format!("<div class=\"alert bad\" id=\"run-error\">{}</div>", esc(e).replace('\n', "<br>")));
    }
    for w in &warnings {
        b.push_str(&format!("<div class=\"alert warn\">{}</div>", esc(w)));
    }
    // A step with one run links to that run's record.
    let mut links = HashMap::new();
    if let Some(r) = &report {
        for s in &r.steps {
            if let [one] = s.runs.as_slice() {
                if let (Some(k), RunStatus::Succeeded) = (one.key, one.status) {
                    links.insert(s.name.clone(), format!("/provenance/{k}"));
                }
            }
        }
    }
    let states: HashMap<String, (String, String)> = steps.clone().into_iter().collect();
    b.push_str(&graph(p, &states, &links, &["waiting", "running", "cached", "done", "failed", "skipped"]));
    b.push_str("<table id=\"steps\"><tr><th>step</th><th>image</th><th>state</th><th>runs</th></tr>");
    for step in &p.steps {
        let (state, text) = steps.get(&step.name).cloned().unwrap_or_default();
        let mut runs = String::new();
        if let Some(sr) = report.as_ref().and_then(|r| r.steps.iter().find(|s| s.name == step.name)) {
            for r in sr.runs.iter().take(200) {
                let entry = r.entry.as_deref().map(|e| format!("<code>{}</code> ", esc(e))).unwrap_or_default();
                let what = match (r.status, r.cache) {
                    (RunStatus::Succeeded, Some(kliko_engine::Cache::Hit)) => badge("hit", "cache hit"),
                    (RunStatus::Succeeded, _) => badge("miss", "computed"),
                    (s, _) => badge("failed", &format!("{s:?}").to_lowercase()),
                };
                let key = match r.key {
                    Some(k) if r.status == RunStatus::Succeeded => format!(
                        " <a href=\"/provenance/{k}\"><code>{}</code></a> · logs <a href=\"/result/{k}/log/stdout\">stdout</a> <a href=\"/result/{k}/log/stderr\">stderr</a>",
                        esc(&k.short(12))
                    ),
                    Some(k) => format!(" <code>{}</code>", esc(&k.short(12))),
                    None => String::new(),
                };
                let err = r
                    .error
                    .as_deref()
                    .map(|e| format!("<br><span class=\"meta\">{}</span>", esc(e)))
                    .unwrap_or_default();
                runs.push_str(&format!("<div>{entry}{what}{key}{err}</div>"));
            }
            if let Some(reason) = &sr.reason {
                runs.push_str(&format!("<div class=\"meta\">{}</div>", esc(reason)));
            }
            if let Some(out) = &sr.output_path {
                runs.push_str(&format!(
                    "<div class=\"meta\">written to <code>{}</code></div>",
                    esc(&shown_path(&st, out))
                ));
            }
        }
        b.push_str(&format!(
            "<tr id=\"row-{n}\"><td><b>{n}</b></td><td><code>{}</code></td><td class=\"state\">{}</td><td>{runs}</td></tr>",
            esc(&step.image),
            badge(state_badge(&state), &text),
            n = esc(&step.name),
        ));
    }
    b.push_str("</table><h2>Logs</h2>");
    let mut shown = String::new();
    if dropped {
        shown.push_str("[older lines dropped; every run's full logs are in the store]\n");
    }
    shown.push_str(&log);
    b.push_str(&format!("<pre class=\"log\" id=\"log\">{}</pre>", esc(&shown)));
    if !finished {
        b.push_str(&html::script(&format!(
            r#"(function () {{
  var log = document.getElementById('log');
  var es = new EventSource('/pipeline-run/{id}/events');
  var kinds = {{'cached':'hit','done':'ok','failed':'failed','cancelled':'failed','running':'running','skipped':'warn','not run':'warn'}};
  es.addEventListener('step', function (e) {{
    var s = JSON.parse(e.data);
    var node = document.getElementById('step-' + s.name);
    if (node) node.setAttribute('class', 'step st-' + s.state.split(' ').join('-'));
    var row = document.getElementById('row-' + s.name);
    if (row) {{
      var cell = row.querySelector('td.state');
      var b = document.createElement('span');
      b.className = 'badge ' + (kinds[s.state] || 'muted');
      b.textContent = s.text;
      cell.replaceChildren(b);
    }}
  }});
  es.addEventListener('log', function (e) {{
    var atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.append(document.createTextNode(JSON.parse(e.data)));
    if (atEnd) log.scrollTop = log.scrollHeight;
  }});
  es.addEventListener('done', function () {{ es.close(); location.reload(); }});
}})();"#,
            id = url_path(&run.id)
        )));
    }
    Ok(Html(page("Pipeline run", Nav::Pipelines, &b)))
}

/// `/pipeline-run/{id}/ro-crate`: a finished run as an RO-Crate (a Provenance Run Crate: the
/// pipeline file as the workflow, its steps, and every run that made a result), zipped: the
/// crate `kliko pipeline run FILE --ro-crate FILE.zip` writes.
pub async fn run_crate(State(st): St, Path(id): Path<String>) -> Result<Response, PageError> {
    let run = get_run(&st, &id)?;
    let Some(report) = run.view.lock().expect("view lock").report.clone() else {
        return Err(PageError::new(
            StatusCode::CONFLICT,
            "This pipeline run has not finished: its crate is made when it has.",
        ));
    };
    let started = rfc3339(run.started);
    let name = format!("kliko-pipeline-run-{}", run.id);
    crate_zip(st.engine.store().clone(), name, move |store| {
        let (prov, opts, _) =
            kliko_pipeline::history::ro_crate(store, &run.pipeline, &report, started).map_err(internal)?;
        Ok((prov, opts))
    })
    .await
}

/// `/pipeline-run/{id}/events`: each step's state as it changes, the logs, then `done`.
pub async fn run_events(
    State(st): St,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, PageError> {
    let run = get_run(&st, &id)?;
    // The current states, and a receiver for what follows: taken under the view's lock, which
    // every change is sent under, so nothing falls between them.
    let (first, rx) = {
        let v = run.view.lock().expect("view lock");
        let rx = run.tx.subscribe();
        let mut first: Vec<Msg> = v
            .steps
            .iter()
            .map(|(n, (s, t))| Msg::Step { name: n.clone(), state: s.clone(), text: t.clone() })
            .collect();
        if v.finished {
            first.push(Msg::Done);
        }
        (first, rx)
    };
    Ok(crate::live::sse(first, rx, st.shutdown.clone()))
}

impl crate::live::Live for Msg {
    fn is_done(&self) -> bool {
        matches!(self, Msg::Done)
    }
    fn lagged(n: u64) -> Self {
        Msg::Log(format!("[{n} updates skipped]\n"))
    }
    fn event(self) -> SseEvent {
        match self {
            Msg::Step { name, state, text } => SseEvent::default()
                .event("step")
                .data(serde_json::json!({"name": name, "state": state, "text": text}).to_string()),
            Msg::Log(text) => SseEvent::default().event("log").data(serde_json::Value::String(text).to_string()),
            Msg::Done => SseEvent::default().event("done").data("{}"),
        }
    }
}

/// `POST /pipeline-run/{id}/cancel`: stop the run (its containers and cluster jobs too);
/// finished steps stay cached.
pub async fn run_cancel(State(st): St, Path(id): Path<String>, Form(f): Form<CsrfForm>) -> Result<Response, PageError> {
    check_csrf(&st, f.csrf.as_deref())?;
    let run = get_run(&st, &id)?;
    run.cancel.cancel();
    Ok(Redirect::to(&format!("/pipeline-run/{}", url_path(&id))).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipeline_files_are_found_under_the_roots_and_nothing_else() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("a/b")).unwrap();
        std::fs::create_dir_all(r.join(".hidden")).unwrap();
        let pipeline = "version: 1\nsteps:\n  s:\n    image: x\n";
        std::fs::write(r.join("a/b/pipeline.yml"), pipeline).unwrap();
        std::fs::write(r.join("top.yaml"), pipeline).unwrap();
        std::fs::write(r.join(".hidden/p.yml"), pipeline).unwrap();
        std::fs::write(r.join("a/kliko.yml"), pipeline).unwrap();
        std::fs::write(r.join("a/other.yml"), "name: not a pipeline\nsteps: 3\n").unwrap();
        std::fs::write(r.join("a/notes.txt"), pipeline).unwrap();
        let (found, truncated) = find_pipelines(&[r.to_path_buf()]);
        assert_eq!(found, vec![r.join("a/b/pipeline.yml"), r.join("top.yaml")]);
        assert!(!truncated);
    }

    #[test]
    fn state_words_become_css_classes_and_badges() {
        assert_eq!(state_class("would hit"), "st-would-hit");
        assert_eq!(state_class("not run"), "st-not-run");
        assert_eq!(state_badge("cached"), "hit");
        assert_eq!(state_badge("would run"), "muted");
    }
}
