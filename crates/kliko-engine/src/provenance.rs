//! Provenance by hash: from a run key, an output tree or file digest, a hex prefix, or a
//! host path, to every run that produced it, and back through the runs that produced their
//! inputs (lineage).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;

use kliko_core::tree::Entry;
use kliko_core::Digest;
use kliko_store::records::{ActionResult, PROV_INPUT, PROV_OUTPUT};
use kliko_store::{ObjectKind, Store, StoreError};
use serde::Serialize;

use crate::error::{EngineError, Result};

/// The shortest hex prefix accepted.
pub const MIN_PREFIX: usize = 8;

/// One run in a provenance answer.
#[derive(Clone, Debug, Serialize)]
pub struct ProvRun {
    /// 0: produced (or is) the object asked about; 1: produced the input of a depth-0 run; …
    pub depth: usize,
    /// The key of the run at depth − 1 whose input this run produced (none at depth 0).
    pub feeds: Option<Digest>,
    pub result: ActionResult,
    /// Whether the result's objects are all still stored.
    pub complete: bool,
    pub pinned: bool,
    /// Found on the shared tier, not in this store (made on another machine, never used here).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub from_tier: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Provenance {
    pub query: String,
    pub digest: Digest,
    /// `key`, `tree` or `file`.
    pub kind: String,
    pub runs: Vec<ProvRun>,
    /// Keys of runs that used the object as their input tree.
    pub used_by: Vec<Digest>,
}

/// Resolve `arg` (key, digest, prefix of at least [`MIN_PREFIX`] hex characters, or a path).
pub fn resolve(store: &Store, arg: &str) -> Result<(Digest, String)> {
    let path = Path::new(arg);
    let looks_hex = arg.len() >= MIN_PREFIX && arg.chars().all(|c| c.is_ascii_hexdigit());
    if !looks_hex || path.exists() {
        if !path.exists() {
            return Err(EngineError::UnknownRef { arg: arg.to_string(), hex: false });
        }
        let h = store.hash_path(path, &kliko_core::hash::NoProgress)?;
        return Ok((h.digest, if h.is_dir { "tree" } else { "file" }.to_string()));
    }
    let db = store.db()?;
    let mut found = store.resolve_prefix(&db, arg)?;
    if found.is_empty() {
        return Err(EngineError::UnknownRef { arg: arg.to_string(), hex: true });
    }
    if found.len() > 1 {
        found.truncate(10);
        let candidates = found.iter().map(|(d, k)| format!("`{d}` ({k})")).collect::<Vec<_>>().join(", ");
        return Err(StoreError::Ambiguous { prefix: arg.to_string(), candidates }.into());
    }
    let (d, kind) = found[0];
    Ok((d, if kind == "blob" { "file" } else { kind }.to_string()))
}

/// Everything known about where `arg` came from, following inputs back `depth` levels.
pub fn provenance(store: &Store, arg: &str, depth: usize) -> Result<Provenance> {
    let (digest, kind) = resolve(store, arg)?;
    let db = store.db()?;
    let mut runs = Vec::new();
    let mut seen = BTreeSet::new();
    let mut queue: VecDeque<(Digest, usize, Option<Digest>)> = VecDeque::new();
    let mut used_by = Vec::new();
    if kind == "key" {
        queue.push_back((digest, 0, None));
    } else {
        for (role, key) in store.provenance_of(&db, &digest)? {
            if role == PROV_OUTPUT {
                queue.push_back((key, 0, None));
            } else if role == PROV_INPUT {
                used_by.push(key);
            }
        }
    }
    while let Some((key, d, feeds)) = queue.pop_front() {
        if !seen.insert(key) {
            continue;
        }
        let Some(result) = store.get_result(&db, &key)? else { continue };
        if d < depth {
            if let Some(input) = result.preimage.input {
                for producer in producers_of(store, &db, &input)? {
                    queue.push_back((producer, d + 1, Some(key)));
                }
            }
        }
        let complete = store.is_complete(&result);
        let pinned = store.is_pinned(&db, &key)?;
        runs.push(ProvRun { depth: d, feeds, result, complete, pinned, from_tier: false });
    }
    Ok(Provenance { query: arg.to_string(), digest, kind, runs, used_by })
}

/// The stored runs `keys` (a pipeline's, say) as one provenance answer named `query`, with
/// `digest` standing for the whole (the pipeline file's digest): each at depth 0, in order,
/// each once. A key with no stored result is left out.
pub fn of_runs(store: &Store, query: &str, digest: Digest, kind: &str, keys: &[Digest]) -> Result<Provenance> {
    let db = store.db()?;
    let mut runs = Vec::new();
    let mut seen = BTreeSet::new();
    for key in keys {
        if !seen.insert(*key) {
            continue;
        }
        let Some(result) = store.get_result(&db, key)? else { continue };
        let complete = store.is_complete(&result);
        let pinned = store.is_pinned(&db, key)?;
        runs.push(ProvRun { depth: 0, feeds: None, result, complete, pinned, from_tier: false });
    }
    Ok(Provenance { query: query.to_string(), digest, kind: kind.to_string(), runs, used_by: Vec::new() })
}

/// Runs whose output contains `input`; if none (an input composed from several outputs, as
/// a pipeline step that gathers other steps gets), the producers of its sub-folders.
fn producers_of(store: &Store, db: &kliko_store::Db, input: &Digest) -> Result<Vec<Digest>> {
    let direct: Vec<Digest> =
        store.provenance_of(db, input)?.into_iter().filter(|(r, _)| *r == PROV_OUTPUT).map(|(_, k)| k).collect();
    if !direct.is_empty() || !store.has_object(ObjectKind::Tree, input) {
        return Ok(direct);
    }
    let mut out = Vec::new();
    let tree = store.get_tree(input)?;
    for e in tree.entries.values() {
        if let Entry::Dir { digest } = e {
            out.extend(store.provenance_of(db, digest)?.into_iter().filter(|(r, _)| *r == PROV_OUTPUT).map(|(_, k)| k));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// [`provenance`], and where this store knows no run that made it, the shared tier's: runs
/// made on other machines (found by run key, or by output tree through the tier's provenance
/// entries), followed back through the runs that made their inputs. On the tier a digest must
/// be given whole (64 hex characters) or as a path.
pub async fn provenance_with_tier(
    store: &std::sync::Arc<Store>,
    remote: Option<&kliko_remote::Remote>,
    arg: &str,
    depth: usize,
) -> Result<Provenance> {
    let local = {
        let (s, a) = (store.clone(), arg.to_string());
        crate::error::blocking(move || provenance(&s, &a, depth)).await
    };
    let Some(remote) = remote else { return local };
    let (digest, kind) = match &local {
        Ok(p) if !p.runs.is_empty() => return local,
        Ok(p) => (p.digest, p.kind.clone()),
        Err(EngineError::UnknownRef { hex: true, .. }) => match arg.parse::<Digest>() {
            Ok(d) => (d, "key".to_string()),
            Err(_) => return local,
        },
        Err(_) => return local,
    };
    let mut runs = Vec::new();
    let mut seen = BTreeSet::new();
    let first = if kind == "key" {
        match remote.record_of(&digest).await? {
            kliko_remote::Record::Usable { result, .. } => Some(*result),
            _ => remote.producer_of(&digest).await?,
        }
    } else {
        remote.producer_of(&digest).await?
    };
    let kind = match (&first, kind.as_str()) {
        (Some(r), "key") if r.key != digest => "tree".to_string(),
        _ => kind,
    };
    let mut queue: VecDeque<(ActionResult, usize, Option<Digest>)> = first.into_iter().map(|r| (r, 0, None)).collect();
    while let Some((result, d, feeds)) = queue.pop_front() {
        if !seen.insert(result.key) {
            continue;
        }
        if d < depth {
            if let Some(input) = result.preimage.input {
                if let Some(producer) = remote.producer_of(&input).await? {
                    queue.push_back((producer, d + 1, Some(result.key)));
                }
            }
        }
        runs.push(ProvRun { depth: d, feeds, result, complete: false, pinned: false, from_tier: true });
    }
    Ok(Provenance { query: arg.to_string(), digest, kind, runs, used_by: Vec::new() })
}

/// A lineage as a Graphviz graph (`kliko provenance ARG --dot`): runs as boxes (image, key,
/// when, where), data as ellipses (tree digests, with the host path they came from where it
/// is known), an edge from each run's input to the run and from the run to its output. The
/// object asked about is drawn bold. Every label is escaped for DOT.
pub fn to_dot(p: &Provenance) -> String {
    fn esc(s: &str) -> String {
        s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
    }
    let mut out = String::from(
        "digraph kliko_provenance {\n  rankdir=LR;\n  node [fontname=\"Helvetica\", fontsize=10];\n  edge [color=\"#555555\"];\n",
    );
    let mut data: BTreeSet<Digest> = BTreeSet::new();
    let mut data_labels: BTreeMap<Digest, String> = BTreeMap::new();
    let mut edges: Vec<String> = Vec::new();
    let mut seen_runs: BTreeSet<Digest> = BTreeSet::new();
    for run in &p.runs {
        let r = &run.result;
        if !seen_runs.insert(r.key) {
            continue;
        }
        let image = r.repo_tags.first().cloned().unwrap_or_else(|| r.image_ref.clone());
        let mut label =
            format!("{image}\nrun {}\n{}", r.key.short(12), r.started_at.get(..19).unwrap_or(&r.started_at));
        if !r.host.is_empty() {
            label.push_str(&format!("\non {}", r.host));
        }
        if run.from_tier {
            label.push_str("\n(shared tier)");
        }
        let bold = if r.key == p.digest { ", penwidth=2.5" } else { "" };
        out.push_str(&format!(
            "  \"run:{}\" [shape=box, style=\"rounded,filled\", fillcolor=\"#e8f0fe\", label=\"{}\"{bold}];\n",
            r.key,
            esc(&label)
        ));
        if let Some(input) = r.preimage.input {
            data.insert(input);
            if let Some(path) = &r.input_path {
                data_labels.entry(input).or_insert_with(|| path.clone());
            }
            edges.push(format!("  \"data:{input}\" -> \"run:{}\";\n", r.key));
        }
        data.insert(r.output);
        edges.push(format!("  \"run:{}\" -> \"data:{}\";\n", r.key, r.output));
    }
    for d in &data {
        let mut label = format!("tree {}", d.short(12));
        if let Some(path) = data_labels.get(d) {
            label.push_str(&format!("\n{path}"));
        }
        let bold = if *d == p.digest { ", penwidth=2.5" } else { "" };
        out.push_str(&format!("  \"data:{d}\" [shape=ellipse, label=\"{}\"{bold}];\n", esc(&label)));
    }
    if p.kind == "file" && !data.contains(&p.digest) {
        out.push_str(&format!(
            "  \"data:{}\" [shape=note, penwidth=2.5, label=\"file {}\"];\n",
            p.digest,
            p.digest.short(12)
        ));
        for run in p.runs.iter().filter(|r| r.depth == 0) {
            edges.push(format!(
                "  \"data:{}\" -> \"data:{}\" [style=dashed, arrowhead=none];\n",
                run.result.output, p.digest
            ));
        }
    }
    for e in edges {
        out.push_str(&e);
    }
    out.push_str("}\n");
    out
}

/// A lineage drawn as SVG, without Graphviz (the web's provenance page): runs and data as
/// boxes in layers left to right (each node one layer after everything it comes from), edges
/// from each input to its run and from each run to its output, every node a link to its own
/// provenance page under `link_prefix` (`/provenance/`). The object asked about is outlined.
pub fn lineage_svg(p: &Provenance, link_prefix: &str) -> String {
    use kliko_core::svg::Node;
    let mut nodes: Vec<Node> = Vec::new();
    let mut index: BTreeMap<(bool, Digest), usize> = BTreeMap::new();
    let mut edges: Vec<(usize, usize)> = Vec::new();
    let mut node = |nodes: &mut Vec<Node>, run: bool, id: Digest, lines: Vec<String>| -> usize {
        *index.entry((run, id)).or_insert_with(|| {
            nodes.push(Node {
                href: Some(format!("{link_prefix}{id}")),
                title: format!("{} {id}", if run { "run" } else { "tree" }),
                lines,
                round: !run,
                outlined: id == p.digest,
                ..Default::default()
            });
            nodes.len() - 1
        })
    };
    for r in &p.runs {
        let res = &r.result;
        let tag = res.repo_tags.first().cloned().unwrap_or_else(|| res.image_ref.clone());
        let run = node(&mut nodes, true, res.key, vec![tag, format!("run {}", res.key.short(12))]);
        if let Some(input) = res.preimage.input {
            let name = res
                .input_path
                .as_deref()
                .and_then(|p| Path::new(p).file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "input".into());
            let i = node(&mut nodes, false, input, vec![name, format!("tree {}", input.short(12))]);
            edges.push((i, run));
        }
        let o = node(&mut nodes, false, res.output, vec!["output".into(), format!("tree {}", res.output.short(12))]);
        edges.push((run, o));
    }
    kliko_core::svg::layered(&nodes, &edges, "lineage", "lineage graph")
}
