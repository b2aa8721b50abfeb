//! The pipeline file: parsing and the checks that need nothing but the file itself.
//! Every problem carries its line; all problems are collected, not just the first.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::yaml::{self, Node};
use crate::PipelineError;

/// The only pipeline file version so far.
pub const PIPELINE_VERSION: u32 = 1;

/// A parsed pipeline file. Host paths are absolute (relative ones are taken relative to
/// the file's folder).
#[derive(Clone, Debug)]
pub struct Pipeline {
    pub file: PathBuf,
    /// The folder relative paths are resolved against.
    pub dir: PathBuf,
    /// In file order.
    pub steps: Vec<Step>,
    /// Pipeline-wide `resources:` (each step's own override them field by field).
    pub resources: Resources,
    /// Pipeline-wide `runtime:` (a step's own overrides it; `None`: the command line's).
    pub runtime: Option<kliko_engine::RuntimeKind>,
    /// The digest of the file's bytes as they were parsed.
    pub digest: kliko_core::Digest,
}

/// One step: one image, run once, or once per entry with `foreach`.
#[derive(Clone, Debug)]
pub struct Step {
    pub name: String,
    /// Line of the step's name.
    pub line: usize,
    pub description: Option<String>,
    pub image: String,
    pub image_line: usize,
    pub input: Option<InputSpec>,
    pub input_line: usize,
    pub foreach: Option<Source>,
    pub foreach_line: usize,
    /// Parameter values as given (scalars as their text), file parameters relative to [`Pipeline::dir`].
    pub params: serde_json::Map<String, serde_json::Value>,
    /// Line of each parameter's name.
    pub param_lines: BTreeMap<String, usize>,
    pub output: Option<PathBuf>,
    pub output_line: usize,
    pub timeout: Option<Duration>,
    /// What a cluster's scheduler is asked for, for each run of the step: the step's own
    /// `resources:` over the pipeline's. Not part of any key: the same computation.
    pub resources: Resources,
    /// The container runtime of its runs (`runtime:`, the step's or the pipeline's); `None`:
    /// the command line's (`--runtime`). Not part of any key.
    pub runtime: Option<kliko_engine::RuntimeKind>,
}

/// What a run asks of a cluster's scheduler (`--executor slurm|srun`); the local executor
/// ignores it. None of it is part of a key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    /// CPUs per run (`--cpus-per-task`).
    pub cpus: Option<u32>,
    /// Memory per run, in bytes (`--mem`, in MiB rounded up).
    pub memory: Option<u64>,
    /// Time limit per run (`--time`).
    pub time: Option<Duration>,
    /// GPUs per run (`--gres=gpu:N`).
    pub gpus: Option<u32>,
    pub partition: Option<String>,
    /// Line of `partition`, for the check that Slurm knows it.
    pub partition_line: usize,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// Further `sbatch`/`srun` arguments, as given (the pipeline's, then the step's).
    pub extra: Vec<String>,
}

impl Resources {
    /// `self` (a step's) over `base` (the pipeline's).
    pub fn over(&self, base: &Resources) -> Resources {
        let pick = |a: &Option<String>, b: &Option<String>| a.clone().or_else(|| b.clone());
        Resources {
            cpus: self.cpus.or(base.cpus),
            memory: self.memory.or(base.memory),
            time: self.time.or(base.time),
            gpus: self.gpus.or(base.gpus),
            partition: pick(&self.partition, &base.partition),
            partition_line: if self.partition.is_some() { self.partition_line } else { base.partition_line },
            account: pick(&self.account, &base.account),
            qos: pick(&self.qos, &base.qos),
            extra: base.extra.iter().chain(&self.extra).cloned().collect(),
        }
    }
}

/// What `foreach` iterates over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The entries (files and folders) of a host folder.
    Path(PathBuf),
    /// The entries of a step's output.
    Step(String),
}

/// What a step reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InputSpec {
    /// One thing becomes `/input` (or `/work`) itself.
    One(Item),
    /// Several things, each in its own subfolder `/input/<name>/`.
    Gather(Vec<Named>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Named {
    pub name: String,
    pub item: Item,
    pub line: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// A host file or folder.
    Path(PathBuf),
    /// A step's output (for a `foreach` step: one subfolder per entry).
    Step(String),
    /// The current `foreach` entry.
    Each,
}

/// One problem found in a pipeline.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub line: Option<usize>,
    pub step: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(l) = self.line {
            write!(f, "line {l}: ")?;
        }
        if let Some(s) = &self.step {
            write!(f, "step `{s}`: ")?;
        }
        f.write_str(&self.message)
    }
}

impl Step {
    /// The steps this one reads, each once, in the order they are named.
    pub fn deps(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        let mut names: Vec<&str> = Vec::new();
        if let Some(Source::Step(s)) = &self.foreach {
            names.push(s);
        }
        match &self.input {
            Some(InputSpec::One(Item::Step(s))) => names.push(s),
            Some(InputSpec::Gather(items)) => {
                for n in items {
                    if let Item::Step(s) = &n.item {
                        names.push(s);
                    }
                }
            }
            _ => {}
        }
        for n in names {
            if !out.contains(&n) {
                out.push(n);
            }
        }
        out
    }

    /// Every reference to a step, with its line.
    pub fn step_refs(&self) -> Vec<(&str, usize)> {
        let mut out = Vec::new();
        if let Some(Source::Step(s)) = &self.foreach {
            out.push((s.as_str(), self.foreach_line));
        }
        match &self.input {
            Some(InputSpec::One(Item::Step(s))) => out.push((s.as_str(), self.input_line)),
            Some(InputSpec::Gather(items)) => {
                for n in items {
                    if let Item::Step(s) = &n.item {
                        out.push((s.as_str(), n.line));
                    }
                }
            }
            _ => {}
        }
        out
    }

    /// Every host path the step reads, with its line.
    pub fn host_paths(&self) -> Vec<(&Path, usize)> {
        let mut out = Vec::new();
        if let Some(Source::Path(p)) = &self.foreach {
            out.push((p.as_path(), self.foreach_line));
        }
        match &self.input {
            Some(InputSpec::One(Item::Path(p))) => out.push((p.as_path(), self.input_line)),
            Some(InputSpec::Gather(items)) => {
                for n in items {
                    if let Item::Path(p) = &n.item {
                        out.push((p.as_path(), n.line));
                    }
                }
            }
            _ => {}
        }
        out
    }
}

impl Pipeline {
    /// Read and parse a pipeline file.
    pub fn load(path: &Path) -> Result<Pipeline, PipelineError> {
        let text = match yaml::read_file(path) {
            Ok(text) => text,
            Err(yaml::ReadError::Io(source)) => return Err(PipelineError::Io { path: path.to_path_buf(), source }),
            Err(yaml::ReadError::TooLarge(e)) => {
                let problems = vec![Problem { line: None, step: None, message: e.describe() }];
                return Err(PipelineError::Invalid { file: path.to_path_buf(), problems });
            }
        };
        let abs = std::path::absolute(path).map_err(|source| PipelineError::Io { path: path.to_path_buf(), source })?;
        let dir = abs.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
        Pipeline::parse(&abs, &dir, &text)
            .map_err(|problems| PipelineError::Invalid { file: path.to_path_buf(), problems })
    }

    /// Parse pipeline text; `dir` is where relative paths start.
    pub fn parse(file: &Path, dir: &Path, text: &str) -> Result<Pipeline, Vec<Problem>> {
        let mut p = Parser { problems: Vec::new(), dir: dir.to_path_buf(), runtime: None };
        let (mut steps, resources) = p.document(text);
        if !p.problems.is_empty() {
            return Err(p.problems);
        }
        for s in &mut steps {
            s.resources = s.resources.over(&resources);
            s.runtime = s.runtime.or(p.runtime);
        }
        Ok(Pipeline {
            file: file.to_path_buf(),
            dir: dir.to_path_buf(),
            steps,
            resources,
            runtime: p.runtime,
            digest: kliko_core::Digest::of_bytes(text.as_bytes()),
        })
    }

    pub fn step(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.name == name)
    }
}

struct Parser {
    problems: Vec<Problem>,
    dir: PathBuf,
    /// The pipeline's `runtime:`.
    runtime: Option<kliko_engine::RuntimeKind>,
}

const TOP_KEYS: &[&str] = &["version", "resources", "runtime", "steps"];
const STEP_KEYS: &[&str] =
    &["image", "description", "input", "foreach", "params", "output", "timeout", "resources", "runtime"];
const RESOURCE_KEYS: &[&str] = &["cpus", "memory", "time", "gpus", "partition", "account", "qos", "sbatch"];

/// Whether a string names a host path rather than a step: it contains `/` or starts with `.` or `~`.
pub fn is_path_like(s: &str) -> bool {
    s.contains('/') || s.starts_with('.') || s.starts_with('~')
}

/// Whether `s` can name a step.
pub fn valid_step_name(s: &str) -> bool {
    !s.is_empty() && !is_path_like(s) && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

impl Parser {
    fn problem(&mut self, line: usize, step: Option<&str>, message: impl Into<String>) {
        self.problems.push(Problem { line: Some(line), step: step.map(str::to_string), message: message.into() });
    }

    fn document(&mut self, text: &str) -> (Vec<Step>, Resources) {
        let mut resources = Resources::default();
        let steps = self.document_into(text, &mut resources);
        (steps, resources)
    }

    fn document_into(&mut self, text: &str, resources: &mut Resources) -> Vec<Step> {
        let root = match yaml::parse(text) {
            Ok(Some(n)) => n,
            Ok(None) => {
                self.problems.push(Problem {
                    line: None,
                    step: None,
                    message: "the file is empty: expected `version: 1` and `steps:`".into(),
                });
                return Vec::new();
            }
            Err(e) => {
                let line = e.pos.map(|p| p.line);
                self.problems.push(Problem { line, step: None, message: e.describe() });
                return Vec::new();
            }
        };
        let Node::Map { entries, pos } = &root else {
            self.problem(
                root.pos().line,
                None,
                format!("expected a mapping with `version` and `steps`, found {}", root.kind()),
            );
            return Vec::new();
        };
        let mut version = None;
        let mut steps_node = None;
        for (k, v) in entries {
            match k.as_scalar() {
                Some("version") => version = Some(v),
                Some("steps") => steps_node = Some(v),
                Some("resources") => *resources = self.resources(v, None),
                Some("runtime") => self.runtime = self.runtime_kind(v, None),
                Some(other) => {
                    let other = other.to_string();
                    self.problem(
                        k.pos().line,
                        None,
                        format!("unknown key `{other}`; expected one of {}", list(TOP_KEYS)),
                    );
                }
                None => self.problem(k.pos().line, None, "expected a key".to_string()),
            }
        }
        match version {
            None => self.problem(pos.line, None, format!("missing `version: {PIPELINE_VERSION}`")),
            Some(v) if v.as_scalar() == Some("1") => {}
            Some(v) => self.problem(
                v.pos().line,
                None,
                format!("unsupported `version`: this kliko reads version {PIPELINE_VERSION}"),
            ),
        }
        let Some(steps_node) = steps_node else {
            self.problem(pos.line, None, "missing `steps`");
            return Vec::new();
        };
        let Node::Map { entries, .. } = steps_node else {
            self.problem(
                steps_node.pos().line,
                None,
                format!("`steps` must be a mapping from step name to step, found {}", steps_node.kind()),
            );
            return Vec::new();
        };
        let mut steps: Vec<Step> = Vec::new();
        // Where each name was first seen: no quadratic search in a long file.
        let mut first_lines: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for (k, v) in entries {
            let line = k.pos().line;
            let Some(name) = k.as_scalar().map(str::to_string) else {
                self.problem(line, None, "expected a step name");
                continue;
            };
            if !valid_step_name(&name) {
                self.problem(
                    line,
                    Some(&name),
                    "a step name may use letters, digits, `_`, `-` and `.`, and may not start with `.`",
                );
            }
            if let Some(&first) = first_lines.get(&name) {
                self.problem(line, Some(&name), format!("a second step of this name (the first is on line {first})"));
                continue;
            }
            first_lines.insert(name.clone(), line);
            if let Some(step) = self.step(&name, line, v) {
                steps.push(step);
            }
        }
        if steps.is_empty() && self.problems.is_empty() {
            self.problem(steps_node.pos().line, None, "`steps` is empty");
        }
        steps
    }

    fn step(&mut self, name: &str, line: usize, node: &Node) -> Option<Step> {
        let Node::Map { entries, .. } = node else {
            self.problem(
                node.pos().line,
                Some(name),
                format!("expected a mapping with at least `image`, found {}", node.kind()),
            );
            return None;
        };
        let mut step = Step {
            name: name.to_string(),
            line,
            description: None,
            image: String::new(),
            image_line: line,
            input: None,
            input_line: line,
            foreach: None,
            foreach_line: line,
            params: serde_json::Map::new(),
            param_lines: BTreeMap::new(),
            output: None,
            output_line: line,
            timeout: None,
            resources: Resources::default(),
            runtime: None,
        };
        let mut has_image = false;
        let mut input_node = None;
        for (k, v) in entries {
            let kl = k.pos().line;
            let Some(key) = k.as_scalar() else {
                self.problem(kl, Some(name), "expected a key");
                continue;
            };
            if v.is_null() {
                continue;
            }
            match key {
                "image" => match self.string(v, name, "image") {
                    Some(s) => {
                        step.image = s;
                        step.image_line = v.pos().line;
                        has_image = true;
                    }
                    None => has_image = true,
                },
                "description" => step.description = self.string(v, name, "description"),
                "input" => {
                    step.input_line = v.pos().line;
                    input_node = Some(v);
                }
                "foreach" => {
                    step.foreach_line = v.pos().line;
                    step.foreach = self.source(v, name);
                }
                "params" => self.params(v, name, &mut step),
                "resources" => step.resources = self.resources(v, Some(name)),
                "runtime" => step.runtime = self.runtime_kind(v, Some(name)),
                "output" => {
                    step.output_line = v.pos().line;
                    step.output = self.string(v, name, "output").map(|s| self.path(&s));
                }
                "timeout" => {
                    if let Some(s) = self.string(v, name, "timeout") {
                        match parse_duration(&s) {
                            Some(d) => step.timeout = Some(d),
                            None => self.problem(
                                v.pos().line,
                                Some(name),
                                format!("`timeout: {s}` is not a duration (examples: `90s`, `10m`, `2h`)"),
                            ),
                        }
                    }
                }
                other => {
                    let other = other.to_string();
                    self.problem(kl, Some(name), format!("unknown key `{other}`; a step takes {}", list(STEP_KEYS)));
                }
            }
        }
        if !has_image {
            self.problem(line, Some(name), "missing `image`");
        }
        if let Some(v) = input_node {
            step.input = self.input(v, name, step.foreach.is_some());
        } else if step.foreach.is_some() {
            // A foreach step reads its entry unless it says otherwise.
            step.input = Some(InputSpec::One(Item::Each));
        }
        Some(step)
    }

    /// A `runtime:` value: `docker`, `podman` or `apptainer`.
    fn runtime_kind(&mut self, v: &Node, step: Option<&str>) -> Option<kliko_engine::RuntimeKind> {
        match v.as_scalar().map(kliko_engine::RuntimeKind::parse) {
            Some(Ok(k)) => Some(k),
            Some(Err(e)) => {
                self.problem(v.pos().line, step, format!("`runtime`: {e}"));
                None
            }
            None => {
                self.problem(v.pos().line, step, format!("`runtime` must be a name (`podman`), found {}", v.kind()));
                None
            }
        }
    }

    /// A `resources:` mapping (the pipeline's, or step `step`'s): every problem with its line.
    fn resources(&mut self, v: &Node, step: Option<&str>) -> Resources {
        let mut r = Resources::default();
        let Node::Map { entries, .. } = v else {
            self.problem(v.pos().line, step, format!("`resources` must be a mapping of {}", list(RESOURCE_KEYS)));
            return r;
        };
        for (k, v) in entries {
            let Some(key) = k.as_scalar() else {
                self.problem(k.pos().line, step, "expected a key");
                continue;
            };
            let line = v.pos().line;
            if key == "sbatch" {
                match v {
                    Node::Seq { items, .. } => {
                        for i in items {
                            match i.as_scalar() {
                                Some(a) if a.starts_with('-') => r.extra.push(a.to_string()),
                                _ => self.problem(
                                    i.pos().line,
                                    step,
                                    "each `sbatch` argument must be an option such as `--constraint=avx2`",
                                ),
                            }
                        }
                    }
                    _ => {
                        self.problem(line, step, "`sbatch` must be a list of arguments, such as `[--constraint=avx2]`")
                    }
                }
                continue;
            }
            let Some(text) = v.as_scalar().map(str::trim).filter(|t| !t.is_empty()) else {
                self.problem(line, step, format!("`{key}` must be a value, found {}", v.kind()));
                continue;
            };
            let count = |what: &str| -> Result<u32, String> {
                match text.parse::<u32>() {
                    Ok(n) if n >= 1 => Ok(n),
                    _ => Err(format!("`{key}: {text}` is not a number of {what} (a whole number, at least 1)")),
                }
            };
            let checked: Result<(), String> = match key {
                "cpus" => count("CPUs").map(|n| r.cpus = Some(n)),
                "gpus" => count("GPUs").map(|n| r.gpus = Some(n)),
                "memory" => match kliko_core::units::parse_size(text) {
                    Ok(b) if b > 0 => {
                        r.memory = Some(b);
                        Ok(())
                    }
                    Ok(_) => Err(format!("`memory: {text}` is no memory at all")),
                    Err(e) => Err(format!("`memory`: {e}")),
                },
                "time" => match parse_time_limit(text) {
                    Some(d) => {
                        r.time = Some(d);
                        Ok(())
                    }
                    None => Err(format!(
                        "`time: {text}` is not a time limit (minutes as a number, `90s`, `10m`, `2h`, `1d`, or Slurm's `HH:MM:SS` and `D-HH:MM:SS`)"
                    )),
                },
                "partition" | "account" | "qos" => {
                    if text.chars().any(|c| c.is_whitespace() || c == ',') {
                        Err(format!("`{key}: {text}` names one {key}, without spaces or commas"))
                    } else {
                        match key {
                            "partition" => {
                                r.partition = Some(text.to_string());
                                r.partition_line = line;
                            }
                            "account" => r.account = Some(text.to_string()),
                            _ => r.qos = Some(text.to_string()),
                        }
                        Ok(())
                    }
                }
                other => Err(format!("unknown resource `{other}`; `resources` takes {}", list(RESOURCE_KEYS))),
            };
            if let Err(m) = checked {
                let line = if RESOURCE_KEYS.contains(&key) { line } else { k.pos().line };
                self.problem(line, step, m);
            }
        }
        r
    }

    fn string(&mut self, v: &Node, step: &str, key: &str) -> Option<String> {
        match v.as_scalar() {
            Some(s) if !s.is_empty() => Some(s.to_string()),
            _ => {
                self.problem(
                    v.pos().line,
                    Some(step),
                    format!("`{key}` must be a non-empty string, found {}", v.kind()),
                );
                None
            }
        }
    }

    fn path(&self, s: &str) -> PathBuf {
        let expanded = match s.strip_prefix("~/") {
            Some(rest) => {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(rest)).unwrap_or_else(|| PathBuf::from(s))
            }
            None => PathBuf::from(s),
        };
        let joined = self.dir.join(expanded);
        // Lexically clean `.` and `a/..`, so the same folder always has the same name.
        let mut out = PathBuf::new();
        for c in joined.components() {
            match c {
                std::path::Component::CurDir => {}
                std::path::Component::ParentDir => {
                    out.pop();
                }
                c => out.push(c),
            }
        }
        out
    }

    /// A string: a host path if path-like, else a step name.
    fn item_from_str(&self, s: &str) -> Item {
        if is_path_like(s) {
            Item::Path(self.path(s))
        } else {
            Item::Step(s.to_string())
        }
    }

    fn source(&mut self, v: &Node, step: &str) -> Option<Source> {
        match self.item(v, step, false)? {
            (Item::Path(p), _) => Some(Source::Path(p)),
            (Item::Step(s), _) => Some(Source::Step(s)),
            (Item::Each, _) => {
                self.problem(v.pos().line, Some(step), "`foreach` takes a host folder or `{step: NAME}`, not `each`");
                None
            }
        }
    }

    /// One input item: `"name"`, `"path/"`, `{step: NAME}`, `{path: P}`, `{each: true}`, with
    /// an optional `as` when `named`.
    fn item(&mut self, v: &Node, step: &str, named: bool) -> Option<(Item, Option<String>)> {
        match v {
            Node::Scalar { text, .. } => {
                if text.is_empty() {
                    self.problem(v.pos().line, Some(step), "an empty input");
                    return None;
                }
                Some((self.item_from_str(text), None))
            }
            Node::Map { entries, pos } => {
                let mut item = None;
                let mut alias = None;
                for (k, val) in entries {
                    let key = k.as_scalar().unwrap_or("");
                    let what = match key {
                        "step" => self.string(val, step, "step").map(Item::Step),
                        "path" => self.string(val, step, "path").map(|s| Item::Path(self.path(&s))),
                        "each" => match val.as_scalar() {
                            Some("true" | "yes" | "on") => Some(Item::Each),
                            _ => {
                                self.problem(val.pos().line, Some(step), "`each` takes `true`");
                                None
                            }
                        },
                        "as" if named => {
                            alias = self.string(val, step, "as");
                            continue;
                        }
                        other => {
                            let other = other.to_string();
                            let keys =
                                if named { "`step`, `path` or `each` (and `as`)" } else { "`step`, `path` or `each`" };
                            self.problem(k.pos().line, Some(step), format!("unknown key `{other}`; expected {keys}"));
                            continue;
                        }
                    };
                    if item.is_some() {
                        self.problem(k.pos().line, Some(step), "give only one of `step`, `path` and `each`");
                    } else if let Some(w) = what {
                        item = Some(w);
                    }
                }
                match item {
                    Some(i) => Some((i, alias)),
                    None => {
                        self.problem(pos.line, Some(step), "expected one of `step`, `path` or `each`");
                        None
                    }
                }
            }
            Node::Seq { .. } => {
                self.problem(v.pos().line, Some(step), "expected a step name, a path or a mapping, found a list");
                None
            }
        }
    }

    fn input(&mut self, v: &Node, step: &str, foreach: bool) -> Option<InputSpec> {
        let spec = match v {
            Node::Seq { items, .. } => {
                let mut named: Vec<Named> = Vec::new();
                for it in items {
                    let line = it.pos().line;
                    let Some((item, alias)) = self.item(it, step, true) else { continue };
                    let name = match (&alias, &item) {
                        (Some(a), _) => a.clone(),
                        (None, Item::Step(s)) => s.clone(),
                        (None, Item::Path(p)) => {
                            p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
                        }
                        (None, Item::Each) => {
                            self.problem(line, Some(step), "name the entry's subfolder: `{each: true, as: NAME}`");
                            continue;
                        }
                    };
                    if !kliko_core::tree::valid_name(name.as_bytes()) {
                        self.problem(line, Some(step), format!("`{name}` cannot name a subfolder of `/input`"));
                        continue;
                    }
                    if let Some(first) = named.iter().find(|n| n.name == name) {
                        let first = first.line;
                        self.problem(line, Some(step), format!("two inputs would both be `/input/{name}` (the first on line {first}); rename one with `as: NAME`"));
                        continue;
                    }
                    named.push(Named { name, item, line });
                }
                InputSpec::Gather(named)
            }
            _ => {
                let (item, alias) = self.item(v, step, false)?;
                let _ = alias;
                InputSpec::One(item)
            }
        };
        let uses_each = match &spec {
            InputSpec::One(i) => *i == Item::Each,
            InputSpec::Gather(items) => items.iter().any(|n| n.item == Item::Each),
        };
        if uses_each && !foreach {
            self.problem(
                v.pos().line,
                Some(step),
                "`each` is the current `foreach` entry, but this step has no `foreach`",
            );
        }
        Some(spec)
    }

    fn params(&mut self, v: &Node, step: &str, out: &mut Step) {
        let Node::Map { entries, .. } = v else {
            self.problem(
                v.pos().line,
                Some(step),
                format!("`params` must be a mapping from parameter name to value, found {}", v.kind()),
            );
            return;
        };
        for (k, val) in entries {
            let Some(name) = k.as_scalar() else {
                self.problem(k.pos().line, Some(step), "expected a parameter name");
                continue;
            };
            if out.param_lines.contains_key(name) {
                self.problem(k.pos().line, Some(step), format!("parameter `{name}` is given twice"));
                continue;
            }
            let value = match json_value(val) {
                Ok(j) => j,
                Err(()) => {
                    self.problem(
                        val.pos().line,
                        Some(step),
                        format!("parameter `{name}`: expected a value or a list of values, found a mapping"),
                    );
                    continue;
                }
            };
            out.param_lines.insert(name.to_string(), k.pos().line);
            out.params.insert(name.to_string(), value);
        }
    }
}

/// Scalars keep their text (the image's kliko.yml decides what they mean, as it does for a
/// parameters file); a plain null unsets.
fn json_value(n: &Node) -> Result<serde_json::Value, ()> {
    match n {
        _ if n.is_null() => Ok(serde_json::Value::Null),
        Node::Scalar { text, .. } => Ok(serde_json::Value::String(text.clone())),
        Node::Seq { items, .. } => {
            items.iter().map(json_value).collect::<Result<Vec<_>, _>>().map(serde_json::Value::Array)
        }
        Node::Map { .. } => Err(()),
    }
}

fn list(keys: &[&str]) -> String {
    keys.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
}

/// A positive duration: `500ms`, `90s`, `10m`, `2h`, `1d`, or plain seconds (the grammar of
/// `kliko_core::units::parse_duration`, shared with the command line).
pub fn parse_duration(s: &str) -> Option<Duration> {
    kliko_core::units::parse_duration(s).ok().filter(|d| !d.is_zero())
}

/// A time limit as Slurm users write it: a bare number is minutes (as in `sbatch --time`),
/// `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS`; or a kliko duration with a unit
/// (`90s`, `10m`, `2h`, `1d`). `None` for anything else, and for zero.
pub fn parse_time_limit(s: &str) -> Option<Duration> {
    let t = s.trim();
    if !t.is_empty() && t.chars().all(|c| c.is_ascii_digit()) {
        return t.parse::<u64>().ok().filter(|&m| m > 0).map(|m| Duration::from_secs(m * 60));
    }
    if t.contains(':') || t.contains('-') {
        let (days, rest) = match t.split_once('-') {
            Some((d, rest)) => (Some(d.parse::<u64>().ok()?), rest),
            None => (None, t),
        };
        let parts: Vec<u64> = rest.split(':').map(|p| p.parse::<u64>().ok()).collect::<Option<_>>()?;
        let secs = match (days, parts.as_slice()) {
            (None, [m, s]) => m * 60 + s,
            (None, [h, m, s]) => h * 3600 + m * 60 + s,
            (Some(d), [h]) => d * 86400 + h * 3600,
            (Some(d), [h, m]) => d * 86400 + h * 3600 + m * 60,
            (Some(d), [h, m, s]) => d * 86400 + h * 3600 + m * 60 + s,
            _ => return None,
        };
        return (secs > 0).then(|| Duration::from_secs(secs));
    }
    if t.ends_with(|c: char| c.is_ascii_alphabetic()) {
        return parse_duration(t);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Pipeline, Vec<Problem>> {
        Pipeline::parse(Path::new("/p/pipeline.yml"), Path::new("/p"), text)
    }

    #[test]
    fn the_documented_forms_parse() {
        let p = parse(
            "version: 1
steps:
  calibrate:
    image: flagger:latest
    input: data/
    params: {threshold: 4.0, files: [a.txt, b.txt]}
  per_obs:
    image: flagger:latest
    foreach: observations/
    timeout: 10m
  again:
    image: x
    foreach: {step: per_obs}
    input: [{each: true, as: obs}, calibrate, {path: ../cal, as: cal2}]
  combine:
    image: combine
    input: per_obs
    output: results/final
",
        )
        .unwrap();
        assert_eq!(p.steps.len(), 4);
        let c = &p.steps[0];
        assert_eq!(c.input, Some(InputSpec::One(Item::Path("/p/data".into()))));
        assert_eq!(c.params["threshold"], serde_json::json!("4.0"));
        assert_eq!(c.params["files"], serde_json::json!(["a.txt", "b.txt"]));
        assert_eq!(c.param_lines["threshold"], 6);
        let per = &p.steps[1];
        assert_eq!(per.foreach, Some(Source::Path("/p/observations".into())));
        assert_eq!(per.input, Some(InputSpec::One(Item::Each)));
        assert_eq!(per.timeout, Some(Duration::from_secs(600)));
        let again = &p.steps[2];
        assert_eq!(again.deps(), vec!["per_obs", "calibrate"]);
        let Some(InputSpec::Gather(items)) = &again.input else { panic!() };
        assert_eq!(items.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["obs", "calibrate", "cal2"]);
        assert_eq!(items[2].item, Item::Path("/cal".into()));
        assert_eq!(p.steps[3].output, Some(PathBuf::from("/p/results/final")));
        assert_eq!(p.steps[3].input, Some(InputSpec::One(Item::Step("per_obs".into()))));
    }

    #[test]
    fn resources_and_runtimes_step_over_pipeline() {
        let p = parse(
            "version: 1
resources: {account: radio, time: \"1:00:00\", sbatch: [--exclusive]}
runtime: podman
steps:
  a:
    image: t:1
    resources:
      cpus: 8
      memory: 32G
      time: 90
      gpus: 2
      partition: gpu
      qos: high
      sbatch: [--constraint=avx2]
    runtime: docker
  b:
    image: t:1
    resources: {time: 2-00:00:00}
",
        )
        .unwrap();
        let (a, b) = (&p.steps[0], &p.steps[1]);
        assert_eq!(a.resources.cpus, Some(8));
        assert_eq!(a.resources.memory, Some(32 << 30));
        assert_eq!(
            a.resources.time,
            Some(Duration::from_secs(90 * 60)),
            "a bare number is minutes, as sbatch reads it"
        );
        assert_eq!(a.resources.gpus, Some(2));
        assert_eq!((a.resources.partition.as_deref(), a.resources.partition_line), (Some("gpu"), 12));
        assert_eq!(a.resources.qos.as_deref(), Some("high"));
        assert_eq!(a.resources.account.as_deref(), Some("radio"), "from the pipeline");
        assert_eq!(a.resources.extra, ["--exclusive", "--constraint=avx2"], "the pipeline's, then the step's");
        assert_eq!(b.resources.time, Some(Duration::from_secs(2 * 86400)));
        assert_eq!(b.resources.account.as_deref(), Some("radio"));
        assert_eq!(a.runtime, Some(kliko_engine::RuntimeKind::Docker));
        assert_eq!(b.runtime, Some(kliko_engine::RuntimeKind::Podman), "from the pipeline");
    }

    #[test]
    fn bad_resources_and_runtimes_are_problems_with_their_lines() {
        let e = parse(
            "version: 1
steps:
  a:
    image: t:1
    resources:
      memory: lots
      cpus: 0
      time: soon
      partition: a b
      colour: red
      sbatch: --x
    runtime: docker-ish
",
        )
        .unwrap_err();
        let lines: Vec<(Option<usize>, &str)> = e.iter().map(|p| (p.line, p.message.as_str())).collect();
        let has = |line: usize, text: &str| lines.iter().any(|(l, m)| *l == Some(line) && m.contains(text));
        assert!(has(6, "`memory`"), "{lines:?}");
        assert!(has(7, "`cpus: 0` is not a number of CPUs"), "{lines:?}");
        assert!(has(8, "`time: soon` is not a time limit"), "{lines:?}");
        assert!(has(9, "names one partition"), "{lines:?}");
        assert!(has(10, "unknown resource `colour`"), "{lines:?}");
        assert!(has(11, "`sbatch` must be a list"), "{lines:?}");
        assert!(has(12, "`docker-ish` is not a container runtime"), "{lines:?}");
        assert!(e.iter().all(|p| p.step.as_deref() == Some("a")));
    }

    #[test]
    fn time_limits_as_slurm_users_write_them() {
        let t = |s| parse_time_limit(s).map(|d| d.as_secs());
        assert_eq!(t("30"), Some(1800));
        assert_eq!(t("5:30"), Some(330));
        assert_eq!(t("1:00:00"), Some(3600));
        assert_eq!(t("1-12"), Some(86400 + 12 * 3600));
        assert_eq!(t("1-00:30"), Some(86400 + 1800));
        assert_eq!(t("0-00:00:05"), Some(5));
        assert_eq!(t("90s"), Some(90));
        assert_eq!(t("2h"), Some(7200));
        for bad in ["0", "", "soon", "1:2:3:4", "x-01", "0:00"] {
            assert_eq!(t(bad), None, "{bad}");
        }
    }

    #[test]
    fn problems_name_step_and_line() {
        let e = parse(
            "version: 2
steps:
  a:
    image: x
    colour: red
  b:
    input: [a, {each: true}]
  a:
    image: y
",
        )
        .unwrap_err();
        let text: Vec<String> = e.iter().map(|p| p.to_string()).collect();
        assert!(text.contains(&"line 1: unsupported `version`: this kliko reads version 1".to_string()), "{text:?}");
        assert!(text.iter().any(|t| t.starts_with("line 5: step `a`: unknown key `colour`")), "{text:?}");
        assert!(text.iter().any(|t| t.starts_with("line 6: step `b`: missing `image`")), "{text:?}");
        assert!(text.iter().any(|t| t.starts_with("line 7: step `b`: name the entry's subfolder")), "{text:?}");
        assert!(text.iter().any(|t| t.starts_with("line 8: step `a`: a second step")), "{text:?}");
    }

    #[test]
    fn syntax_errors_have_lines() {
        let e = parse("version: 1\nsteps:\n  a: [\n").unwrap_err();
        assert!(e[0].line.is_some() && e[0].message.starts_with("invalid YAML"), "{e:?}");
    }

    #[test]
    fn alias_bombs_deep_nesting_and_huge_files_are_refused_with_their_lines() {
        let mut bomb = String::from(
            "version: 1\nsteps:\n  a:\n    image: x\n    params:\n      p0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n",
        );
        for i in 1..10 {
            bomb.push_str(&format!("      p{i}: &a{i} [{}]\n", vec![format!("*a{}", i - 1); 10].join(", ")));
        }
        let e = parse(&bomb).unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].line.is_some_and(|l| l > 6), "{e:?}");
        assert!(e[0].message.contains("too large once its aliases are expanded"), "{e:?}");

        let deep = format!("version: 1\nsteps:\n  a: {}{}\n", "[".repeat(5000), "]".repeat(5000));
        let e = std::thread::Builder::new().stack_size(256 * 1024).spawn(move || parse(&deep).unwrap_err());
        let e = e.unwrap().join().expect("no stack overflow");
        assert_eq!(e[0].line, Some(3), "{e:?}");
        assert!(e[0].message.contains("nested too deeply: more than 64 levels"), "{e:?}");

        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("pipeline.yml");
        std::fs::write(&big, format!("version: 1\n# {}\n", "x".repeat(1024 * 1024))).unwrap();
        let e = Pipeline::load(&big).unwrap_err();
        let PipelineError::Invalid { problems, .. } = &e else { panic!("{e:?}") };
        assert_eq!(problems[0].to_string(), "the document is too large: 1.0 MiB, at most 512 KiB");
    }

    #[test]
    fn arbitrary_text_never_panics_and_is_answered_quickly() {
        // xorshift64*: a property test without a dependency.
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut below = |n: usize| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_f491_4f6c_dd1d) % n as u64) as usize
        };
        const FRAGMENTS: &[&str] = &[
            "[",
            "]",
            "{",
            "}",
            "- ",
            ": ",
            ", ",
            "&a ",
            "*a",
            "\n",
            "  ",
            "'",
            "\"",
            "# c",
            "---\n",
            "? ",
            "!!str ",
            "|\n",
            "x",
            "1",
            "~",
            "\t",
            "version: 1\n",
            "steps:\n",
            "  a:\n",
            "    image: x\n",
            "input",
            "foreach",
            "each",
            "params",
            "output",
            "timeout",
            "90s",
            "./in",
            "/abs",
            "{each: true}",
            "é",
        ];
        let started = std::time::Instant::now();
        for _ in 0..3000 {
            let n = below(120);
            let doc: String = (0..n).map(|_| FRAGMENTS[below(FRAGMENTS.len())]).collect();
            let _ = parse(&doc);
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    }
}
