//! `kliko pipeline show`: the graph, and for every step whose inputs are known (host paths,
//! or upstream steps whose results are stored) its keys and whether a run would hit. Nothing
//! runs and nothing is copied into the store.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kliko_core::Digest;
use kliko_engine::Engine;
use serde::Serialize;

use crate::check::Checked;
use crate::file::{InputSpec, Item, Pipeline, Source};
use crate::inputs::{Resolver, Stage};
use crate::{blocking, Result};

/// One run a step would make.
#[derive(Clone, Debug, Serialize)]
pub struct PlannedRun {
    pub entry: Option<String>,
    pub key: Digest,
    /// A complete result is stored: running it would start no container.
    pub hit: bool,
}

/// One step of the graph.
#[derive(Clone, Debug, Serialize)]
pub struct StepPlan {
    pub name: String,
    pub line: usize,
    pub image: String,
    pub image_id: String,
    pub io: String,
    pub depends_on: Vec<String>,
    /// What `foreach` iterates over, in words.
    pub foreach: Option<String>,
    /// What `/input` holds, in words.
    pub input: String,
    pub output: Option<PathBuf>,
    /// `None` when the keys cannot be known yet (see `unknown`).
    pub runs: Option<Vec<PlannedRun>>,
    pub unknown: Option<String>,
}

fn rel(p: &Path, dir: &Path) -> String {
    match p.strip_prefix(dir) {
        Ok(r) if r.as_os_str().is_empty() => "./".into(),
        Ok(r) => format!("{}/", r.display()),
        Err(_) => format!("{}/", p.display()),
    }
}

fn describe_item(i: &Item, dir: &Path) -> String {
    match i {
        Item::Path(p) => format!("`{}`", rel(p, dir)),
        Item::Step(s) => format!("the output of `{s}`"),
        Item::Each => "the entry".into(),
    }
}

fn describe_input(i: &Option<InputSpec>, dir: &Path) -> String {
    match i {
        None => "nothing".into(),
        Some(InputSpec::One(item)) => describe_item(item, dir),
        Some(InputSpec::Gather(items)) => items
            .iter()
            .map(|n| format!("/input/{}: {}", n.name, describe_item(&n.item, dir)))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

pub async fn show(engine: &Arc<Engine>, p: &Pipeline, checked: &Checked) -> Result<Vec<StepPlan>> {
    let resolver = Arc::new(Resolver::new(engine.store().clone(), Stage::DigestOnly));
    let mut outputs: HashMap<String, Digest> = HashMap::new();
    let mut plans: Vec<Option<StepPlan>> = vec![None; p.steps.len()];
    // Nothing here waits for another process: keep the index open throughout.
    let db = {
        let store = engine.store().clone();
        blocking(move || Ok(store.db()?)).await?
    };
    for &i in &checked.order {
        let step = &p.steps[i];
        let meta = &checked.images[&step.name];
        let mut plan = StepPlan {
            name: step.name.clone(),
            line: step.line,
            image: step.image.clone(),
            image_id: meta.info.id.clone(),
            io: meta.spec.io.to_string(),
            depends_on: step.deps().into_iter().map(str::to_string).collect(),
            foreach: step.foreach.as_ref().map(|f| match f {
                Source::Path(d) => format!("the entries of `{}`", rel(d, &p.dir)),
                Source::Step(s) => format!("the entries of the output of `{s}`"),
            }),
            input: describe_input(&step.input, &p.dir),
            output: step.output.clone(),
            runs: None,
            unknown: None,
        };
        if let Some(missing) = plan.depends_on.iter().find(|d| !outputs.contains_key(*d)) {
            plan.unknown = Some(format!("`{missing}` has no stored result for its current inputs yet"));
            plans[i] = Some(plan);
            continue;
        }
        let outs = Arc::new(outputs.clone());
        let entries = match &step.foreach {
            None => vec![None],
            Some(src) => {
                let (r, src, o) = (resolver.clone(), src.clone(), outs.clone());
                blocking(move || r.entries(&src, &o)).await?.into_iter().map(Some).collect()
            }
        };
        let mut runs = Vec::new();
        let mut run_outputs = Vec::new();
        for entry in entries {
            let name = entry.as_ref().map(|(n, _)| n.clone());
            let (r, s, o) = (resolver.clone(), Arc::new(step.clone()), outs.clone());
            let input = blocking(move || r.run_input(&s, entry.as_ref(), &o)).await?;
            let req = crate::check::step_request(&p.dir, step, input);
            let prep = engine.prepare(&req).await?;
            let stored = engine.store().get_result(&db, &prep.key)?.filter(|r| engine.store().is_complete(r));
            if let Some(r) = &stored {
                run_outputs.push((name.clone().unwrap_or_default(), r.output));
            }
            runs.push(PlannedRun { entry: name, key: prep.key, hit: stored.is_some() });
        }
        if runs.iter().all(|r| r.hit) {
            let out = if step.foreach.is_some() {
                let r = resolver.clone();
                blocking(move || r.gather(&run_outputs)).await?
            } else {
                run_outputs[0].1
            };
            outputs.insert(step.name.clone(), out);
        }
        plan.runs = Some(runs);
        plans[i] = Some(plan);
    }
    Ok(plans.into_iter().flatten().collect())
}
