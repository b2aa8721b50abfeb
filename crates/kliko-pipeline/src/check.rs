//! Validation before anything runs: the graph (unknown steps, cycles), host paths, images and
//! their parameters. Every problem is reported at once, each with its step and line.

use std::collections::{BTreeMap, HashMap};

use kliko_engine::{Engine, ImageMeta};
use kliko_spec::{IoMode, ParamLayer, Params};

use crate::file::{Pipeline, Problem, Source};
use crate::{PipelineError, Result};

/// A pipeline that passed every check.
#[derive(Clone, Debug)]
pub struct Checked {
    /// Step indices, every step after the steps it reads.
    pub order: Vec<usize>,
    /// Each step's image (by step name), resolved under the step's runtime, with its kliko.yml.
    pub images: HashMap<String, ImageMeta>,
    /// Each step's resolved parameters (for display; runs resolve them again).
    pub params: BTreeMap<String, Params>,
}

/// The parameter layer of step `step`: its values as written, file paths relative to the
/// pipeline's folder `dir`.
pub(crate) fn param_layer(
    dir: &std::path::Path,
    step: &str,
    params: &serde_json::Map<String, serde_json::Value>,
) -> ParamLayer {
    ParamLayer::json(params).with_origin(format!("step `{step}`")).with_base_dir(dir)
}

/// The request of one run of `step` (of the pipeline in folder `dir`) on `input`: the one
/// place that says what a step's run is, so a plan's keys are the keys a run will have.
pub(crate) fn step_request(
    dir: &std::path::Path,
    step: &crate::Step,
    input: kliko_engine::Input,
) -> kliko_engine::RunRequest {
    let mut req = kliko_engine::RunRequest::new(step.image.clone(), input, None);
    req.store_only = true;
    req.params = vec![param_layer(dir, &step.name, &step.params)];
    req.timeout = step.timeout;
    req.gpus = step.resources.gpus.map(kliko_engine::Gpus::Count);
    req.runtime = step.runtime;
    req
}

pub async fn check(engine: &Engine, p: &Pipeline) -> Result<Checked> {
    let mut problems = Vec::new();
    let mut add = |line: usize, step: &str, message: String| {
        problems.push(Problem { line: Some(line), step: Some(step.to_string()), message });
    };

    // The graph.
    let names: Vec<&str> = p.steps.iter().map(|s| s.name.as_str()).collect();
    for s in &p.steps {
        for (r, line) in s.step_refs() {
            if r == s.name {
                add(line, &s.name, "a step cannot read its own output".into());
            } else if p.step(r).is_none() {
                let hint = match suggest(r, &names) {
                    Some(m) => format!("; did you mean `{m}`?"),
                    None => format!("; a host folder is written with a `/` (`{r}/`) or as `{{path: {r}}}`"),
                };
                add(line, &s.name, format!("unknown step `{r}`{hint}"));
            }
        }
    }
    let order = match topo_order(p) {
        Ok(o) => o,
        Err(cycles) => {
            for cycle in cycles {
                let first = &p.steps[cycle[0]];
                let path: Vec<String> =
                    cycle.iter().map(|&i| format!("`{}` (line {})", p.steps[i].name, p.steps[i].line)).collect();
                add(
                    first.line,
                    &first.name,
                    format!(
                        "the steps form a cycle: {} reads {}",
                        path.join(" reads "),
                        format_args!("`{}`", first.name)
                    ),
                );
            }
            Vec::new()
        }
    };

    // Host paths.
    for s in &p.steps {
        for (path, line) in s.host_paths() {
            match std::fs::metadata(path) {
                Err(_) => add(line, &s.name, format!("`{}` does not exist", path.display())),
                Ok(m) if !m.is_dir() && matches!(&s.foreach, Some(Source::Path(f)) if f == path) => {
                    add(line, &s.name, format!("`foreach` needs a folder, and `{}` is not one", path.display()))
                }
                Ok(_) => {}
            }
        }
    }
    let mut outputs: HashMap<&std::path::Path, &str> = HashMap::new();
    for s in &p.steps {
        if let Some(o) = &s.output {
            if let Some(other) = outputs.insert(o, &s.name) {
                add(s.output_line, &s.name, format!("step `{other}` writes its output to `{}` too", o.display()));
            }
            if o == &p.dir || p.dir.starts_with(o) {
                add(
                    s.output_line,
                    &s.name,
                    format!("`output: {}` would replace the folder holding the pipeline", o.display()),
                );
            }
        }
    }

    // Images and their parameters. Nothing here waits for another process: keep the index
    // open throughout rather than reopening it per image.
    let _db = {
        let store = engine.store().clone();
        crate::blocking(move || Ok(store.db()?)).await?
    };
    // Each image once per runtime: (image, runtime) → its metadata, or what is wrong with it.
    type ImageAt = (String, Option<&'static str>);
    let at = |s: &crate::Step| -> ImageAt { (s.image.clone(), s.runtime.map(|r| r.name())) };
    let mut resolved: HashMap<ImageAt, ImageMeta> = HashMap::new();
    let mut bad_images: HashMap<ImageAt, String> = HashMap::new();
    for s in &p.steps {
        if s.image.is_empty() || resolved.contains_key(&at(s)) || bad_images.contains_key(&at(s)) {
            continue;
        }
        match engine.image_in(&s.image, s.runtime).await {
            Ok(m) => {
                resolved.insert(at(s), m);
            }
            Err(e) => {
                let mut msg = e.to_string();
                let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
                while let Some(c) = src {
                    msg.push_str(&format!(": {c}"));
                    src = c.source();
                }
                bad_images.insert(at(s), msg);
            }
        }
    }
    let mut params = BTreeMap::new();
    let mut images = HashMap::new();
    for s in &p.steps {
        if let Some(msg) = bad_images.get(&at(s)) {
            let under = s.runtime.map(|r| format!(" under {}", r.name())).unwrap_or_default();
            add(s.image_line, &s.name, format!("cannot use image `{}`{under}: {msg}", s.image));
            continue;
        }
        let Some(meta) = resolved.get(&at(s)) else { continue };
        images.insert(s.name.clone(), meta.clone());
        if meta.spec.io == IoMode::Join && s.input.is_none() {
            add(
                s.line,
                &s.name,
                format!("image `{}` changes `/work` in place (io `join`): give the step an `input`", s.image),
            );
        }
        match meta.spec.resolve(&[param_layer(&p.dir, &s.name, &s.params)]) {
            Err(errors) => {
                for e in errors.iter() {
                    let line = e.field().and_then(|f| s.param_lines.get(f)).copied().unwrap_or(s.line);
                    add(line, &s.name, format!("{e} (image `{}`)", s.image));
                }
            }
            Ok(resolved) => {
                for (host, _) in resolved.file_placements() {
                    if !host.is_file() {
                        let line = resolved
                            .iter()
                            .find(|(_, v)| serde_json::to_string(v).is_ok_and(|j| j.contains(&*host.to_string_lossy())))
                            .and_then(|(n, _)| s.param_lines.get(n))
                            .copied()
                            .unwrap_or(s.line);
                        add(line, &s.name, format!("the file parameter `{}` is not a file", host.display()));
                    }
                }
                params.insert(s.name.clone(), resolved);
            }
        }
    }

    if !problems.is_empty() {
        problems.sort_by_key(|p| p.line);
        return Err(PipelineError::Invalid { file: p.file.clone(), problems });
    }
    Ok(Checked { order, images, params })
}

/// Steps in an order that puts each after the steps it reads; on failure, the cycles.
fn topo_order(p: &Pipeline) -> std::result::Result<Vec<usize>, Vec<Vec<usize>>> {
    let index: HashMap<&str, usize> = p.steps.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
    let deps: Vec<Vec<usize>> = p
        .steps
        .iter()
        .map(|s| s.deps().iter().filter(|d| **d != s.name).filter_map(|d| index.get(d).copied()).collect())
        .collect();
    let mut done = vec![false; p.steps.len()];
    let mut order = Vec::new();
    loop {
        let before = order.len();
        for i in 0..p.steps.len() {
            if !done[i] && deps[i].iter().all(|&d| done[d]) {
                done[i] = true;
                order.push(i);
            }
        }
        if order.len() == p.steps.len() {
            return Ok(order);
        }
        if order.len() == before {
            break;
        }
    }
    // What is left is on a cycle or behind one: walk dependencies until a step repeats.
    let mut cycles: Vec<Vec<usize>> = Vec::new();
    let mut reported = vec![false; p.steps.len()];
    for start in 0..p.steps.len() {
        if done[start] || reported[start] {
            continue;
        }
        let mut path = vec![start];
        let mut cur = start;
        while let Some(&next) = deps[cur].iter().find(|&&d| !done[d]) {
            if let Some(pos) = path.iter().position(|&x| x == next) {
                let cycle: Vec<usize> = path[pos..].to_vec();
                if !cycle.iter().any(|&c| reported[c]) {
                    for &c in &cycle {
                        reported[c] = true;
                    }
                    // Start at the step that comes first in the file.
                    let k = cycle.iter().enumerate().min_by_key(|(_, &c)| c).map(|(k, _)| k).unwrap_or(0);
                    let mut rotated = cycle[k..].to_vec();
                    rotated.extend_from_slice(&cycle[..k]);
                    cycles.push(rotated);
                }
                break;
            }
            path.push(next);
            cur = next;
        }
    }
    Err(cycles)
}

/// The closest name, if it is close enough to be a typo.
fn suggest<'a>(given: &str, names: &[&'a str]) -> Option<&'a str> {
    let limit = (given.chars().count() / 3).max(1);
    names.iter().map(|n| (distance(given, n), *n)).filter(|(d, _)| *d <= limit).min_by_key(|(d, _)| *d).map(|(_, n)| n)
}

fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn cycles_are_found_and_named() {
        let p = Pipeline::parse(
            Path::new("/p/x.yml"),
            Path::new("/p"),
            "version: 1\nsteps:\n  a:\n    image: i\n    input: c\n  b:\n    image: i\n    input: a\n  c:\n    image: i\n    input: [b]\n  d:\n    image: i\n    input: c\n",
        )
        .unwrap();
        let cycles = topo_order(&p).unwrap_err();
        assert_eq!(cycles, vec![vec![0, 2, 1]]);
    }

    #[test]
    fn order_puts_readers_after() {
        let p = Pipeline::parse(
            Path::new("/p/x.yml"),
            Path::new("/p"),
            "version: 1\nsteps:\n  z:\n    image: i\n    input: [a, b]\n  a:\n    image: i\n  b:\n    image: i\n    foreach: {step: a}\n",
        )
        .unwrap();
        assert_eq!(topo_order(&p).unwrap(), vec![1, 2, 0]);
        assert_eq!(suggest("calibrat", &["calibrate", "combine"]), Some("calibrate"));
    }
}
