//! Provenance as an RO-Crate (`kliko provenance ARG --ro-crate OUT`): a Workflow Run RO-Crate
//! of the Process Run Crate profile (0.5), which the field's tools read and check
//! (`rocrate-validator`, `rocrate`).
//!
//! Every run of the answer is a `CreateAction`: its image as the `instrument` (a
//! `SoftwareApplication` named by its tag and identified by its image ID) and its
//! `containerImage` (a `ContainerImage` with that ID's sha256), its parameters (as given, one
//! `PropertyValue` each, an `exampleOfWork` of the `FormalParameter` the image's kliko.yml
//! declares (its type, default and whether it is required, listed as the application's
//! `input`); file parameters also as `File`s with their BLAKE3 digest) and its
//! input tree as `object`, its output tree as `result`, its start and end times, its agent
//! (the user), host and exit code. Trees are `Dataset`s identified by their kliko tree digest
//! (`kliko hash FOLDER` prints it, so anyone can check a folder against the crate). With
//! `with_data`, every output (and the run's logs) is written into the crate, its files listed
//! with their digests and sizes. Nothing else of the store appears.
//!
//! A pipeline run's crate ([`CrateOptions::workflow`]) is a Provenance Run Crate (0.5; so
//! also a Workflow Run Crate and a Workflow RO-Crate): the pipeline file is the main entity,
//! a `ComputationalWorkflow` whose parts are the steps' images and whose steps are
//! `HowToStep`s; the pipeline run is a `CreateAction` of it; each step's `ControlAction`
//! names the runs it made or reused, and kliko's `OrganizeAction` ties them together.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kliko_core::tree::Entry;
use kliko_core::Digest;
use kliko_store::records::ActionResult;
use kliko_store::{MaterializeMode, ObjectKind, Store};
use serde_json::{json, Map, Value};

use crate::error::{EngineError, Result};
use crate::provenance::Provenance;

/// The profile every crate conforms to.
pub const PROCESS_RUN_CRATE: &str = "https://w3id.org/ro/wfrun/process/0.5";
/// The profiles a pipeline run's crate conforms to as well ([`CrateOptions::workflow`]).
pub const WORKFLOW_RUN_CRATE: &str = "https://w3id.org/ro/wfrun/workflow/0.5";
pub const PROVENANCE_RUN_CRATE: &str = "https://w3id.org/ro/wfrun/provenance/0.5";
pub const WORKFLOW_RO_CRATE: &str = "https://w3id.org/workflowhub/workflow-ro-crate/1.0";
const RO_CRATE: &str = "https://w3id.org/ro/crate/1.1";
const WFRUN: &str = "https://w3id.org/ro/terms/workflow-run#";

/// What to put in a crate.
#[derive(Clone, Debug, Default)]
pub struct CrateOptions {
    /// Write the outputs and logs into the crate, not only their digests.
    pub with_data: bool,
    /// The crate's licence (a URL, or words); by default it says that none is stated.
    pub license: Option<String>,
    /// Files copied into the crate's top folder and listed with their digests (the pipeline
    /// file, for a pipeline's crate).
    pub attach: Vec<PathBuf>,
    /// The runs are a pipeline run's: describe the pipeline as the workflow, its steps, and
    /// which runs each step made (a Provenance Run Crate, 0.5).
    pub workflow: Option<WorkflowRun>,
}

/// A pipeline run, as a crate describes it.
#[derive(Clone, Debug)]
pub struct WorkflowRun {
    /// The pipeline file: the crate's main entity, copied into it.
    pub file: PathBuf,
    /// RFC 3339.
    pub started_at: String,
    pub finished_at: String,
    pub ok: bool,
    /// In file order.
    pub steps: Vec<WorkflowStep>,
}

/// One step of a [`WorkflowRun`]: the runs it made (or reused).
#[derive(Clone, Debug)]
pub struct WorkflowStep {
    pub name: String,
    pub runs: Vec<Digest>,
}

/// What was written.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CrateSummary {
    pub path: PathBuf,
    pub runs: usize,
    pub datasets: usize,
    pub files: usize,
}

/// [`write_ro_crate`] packed as one zip file at `out` (the usual packaging of an RO-Crate: the
/// crate folder's contents at the top of the zip, stored uncompressed), written beside it and
/// renamed into place; an `out` that exists is refused, never replaced.
pub fn write_ro_crate_zip(store: &Store, prov: &Provenance, out: &Path, opts: &CrateOptions) -> Result<CrateSummary> {
    let io = |path: &Path, e: std::io::Error| EngineError::Io { path: path.to_path_buf(), source: e };
    if out.symlink_metadata().is_ok() {
        return Err(io(
            out,
            std::io::Error::new(std::io::ErrorKind::AlreadyExists, "exists already: kliko does not replace it"),
        ));
    }
    let parent = out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new().prefix(".kliko-crate-").tempdir_in(parent).map_err(|e| io(parent, e))?;
    let root = tmp.path().join("crate");
    let mut summary = write_ro_crate(store, prov, &root, opts)?;
    let zip_tmp = tmp.path().join("crate.zip");
    let zipped = (|| -> zip::result::ZipResult<()> {
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&zip_tmp)?);
        let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for entry in walkdir::WalkDir::new(&root).sort_by_file_name() {
            let entry = entry.map_err(std::io::Error::from)?;
            let rel = entry.path().strip_prefix(&root).expect("under the root");
            if rel.as_os_str().is_empty() {
                continue;
            }
            let name = rel.to_string_lossy().replace('\\', "/");
            if entry.file_type().is_dir() {
                zip.add_directory(format!("{name}/"), options)?;
            } else if entry.file_type().is_file() {
                zip.start_file(name, options)?;
                std::io::copy(&mut std::fs::File::open(entry.path())?, &mut zip)?;
            }
        }
        zip.finish()?;
        Ok(())
    })();
    zipped.map_err(|e| io(&zip_tmp, std::io::Error::other(e)))?;
    std::fs::rename(&zip_tmp, out).map_err(|e| io(out, e))?;
    summary.path = out.to_path_buf();
    Ok(summary)
}

/// Write `prov` as an RO-Crate folder at `out` (which must not exist, or be an empty folder).
pub fn write_ro_crate(store: &Store, prov: &Provenance, out: &Path, opts: &CrateOptions) -> Result<CrateSummary> {
    let io = |path: &Path, e: std::io::Error| EngineError::Io { path: path.to_path_buf(), source: e };
    match std::fs::read_dir(out) {
        Ok(mut d) => {
            if d.next().is_some() {
                return Err(EngineError::OutputNotEmpty { path: out.to_path_buf() });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(out).map_err(|e| io(out, e))?,
        Err(e) => return Err(io(out, e)),
    }
    let mut g = Graph::default();
    let mut runs: Vec<&ActionResult> = Vec::new();
    for r in &prov.runs {
        if !runs.iter().any(|x| x.key == r.result.key) {
            runs.push(&r.result);
        }
    }
    let mut has_part = Vec::new();
    let mut mentions = Vec::new();
    let mut files = 0usize;
    for r in &runs {
        let run_id = format!("#run-{}", r.key);
        mentions.push(json!({"@id": run_id}));
        let image_hex = r.image_id.trim_start_matches("sha256:").to_string();
        let tag = r.repo_tags.first().cloned().unwrap_or_else(|| r.image_ref.clone());
        let (repo, version) = split_tag(&tag);
        let app_id = format!("#app-{image_hex}");
        let mut app = json!({
            "@id": app_id, "@type": "SoftwareApplication", "name": tag,
            "identifier": r.image_id, "softwareVersion": version,
            "description": format!("the kliko image {tag}, image ID {}", r.image_id),
        });
        // The image's parameters, as its kliko.yml declares them (when this store has it).
        let formal = formal_parameters(store, &r.image_id, &app_id);
        if !formal.is_empty() {
            app["input"] = one_or_many(formal.values().map(|(id, _)| json!({"@id": id})).collect());
            for (_, e) in formal.values() {
                g.add(e.clone());
            }
        }
        g.add(app);
        let example_of = |name: &str| formal.get(name).map(|(id, _)| json!({"@id": id}));
        let image_id = format!("#image-{image_hex}");
        g.add(json!({
            "@id": image_id, "@type": "ContainerImage",
            "additionalType": {"@id": format!("{WFRUN}DockerImage")},
            "name": repo, "tag": version, "sha256": image_hex, "identifier": r.image_id,
        }));
        let mut object = Vec::new();
        if let Some(input) = r.preimage.input {
            let id = format!("#tree-{input}");
            let mut d = json!({
                "@id": id, "@type": "Dataset", "name": format!("input tree {}", input.short(12)),
                "identifier": format!("kliko-tree:{input}"),
                "description": "a folder, by its kliko tree digest (`kliko hash FOLDER` prints it)",
            });
            if let Some(p) = &r.input_path {
                d["name"] = json!(p);
            }
            g.add(d);
            object.push(json!({"@id": id}));
        }
        if let Value::Object(given) = &r.parameters_given {
            for (name, value) in given {
                if value.is_null() {
                    continue;
                }
                let pid = format!("#param-{}-{name}", r.key);
                let text = match value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let mut pv = json!({"@id": pid, "@type": "PropertyValue", "name": name, "value": text});
                if let Some(fp) = example_of(name) {
                    pv["exampleOfWork"] = fp;
                }
                g.add(pv);
                object.push(json!({"@id": pid}));
            }
        }
        // File parameters, by content (the canonical parameters carry their digests).
        if let Value::Object(canon) = &r.preimage.parameters {
            for (name, v) in canon {
                for f in file_params(v) {
                    let fid = format!("#file-{}", f.0);
                    let mut file = json!({
                        "@id": fid, "@type": "File", "name": format!("{name}: {}", f.1),
                        "identifier": format!("blake3:{}", f.0), "encodingFormat": "application/octet-stream",
                    });
                    if let Some(fp) = example_of(name) {
                        file["exampleOfWork"] = fp;
                    }
                    g.add(file);
                    object.push(json!({"@id": fid}));
                }
            }
        }
        // The output: a dataset by digest, or the files themselves.
        let out_id = if opts.with_data {
            let rel = format!("outputs/{}/", r.output);
            let dest = out.join("outputs").join(r.output.to_hex());
            if !dest.exists() {
                store.materialize(&r.output, &dest, MaterializeMode::Copy)?;
                let mut parts = Vec::new();
                list_files(store, &r.output, &rel, &mut g, &mut parts, &mut files)?;
                g.add(json!({
                    "@id": rel, "@type": "Dataset", "name": format!("output of run {}", r.key.short(12)),
                    "identifier": format!("kliko-tree:{}", r.output), "hasPart": parts,
                    "description": format!("{} files, {} bytes", r.output_files, r.output_bytes),
                }));
                has_part.push(json!({"@id": rel}));
            }
            for (stream, digest) in [("stdout", r.stdout), ("stderr", r.stderr)] {
                let rel = format!("logs/{}/{stream}.log", r.key);
                let dest = out.join(&rel);
                std::fs::create_dir_all(dest.parent().expect("a log has a folder")).map_err(|e| io(&dest, e))?;
                let bytes = store.get_bytes(ObjectKind::Blob, &digest)?;
                std::fs::write(&dest, &bytes).map_err(|e| io(&dest, e))?;
                g.add(json!({
                    "@id": rel, "@type": "File", "name": format!("{stream} of run {}", r.key.short(12)),
                    "identifier": format!("blake3:{digest}"), "contentSize": bytes.len().to_string(),
                    "encodingFormat": "text/plain",
                }));
                has_part.push(json!({"@id": rel}));
                files += 1;
            }
            rel
        } else {
            let id = format!("#tree-{}", r.output);
            g.add(json!({
                "@id": id, "@type": "Dataset", "name": format!("output tree {}", r.output.short(12)),
                "identifier": format!("kliko-tree:{}", r.output),
                "description": format!(
                    "{} files, {} bytes, by its kliko tree digest (`kliko hash FOLDER` prints it)",
                    r.output_files, r.output_bytes
                ),
            }));
            id
        };
        let person = format!("#person-{}", r.user);
        g.add(json!({"@id": person, "@type": "Person", "name": r.user}));
        let mut action = json!({
            "@id": run_id, "@type": "CreateAction",
            "name": format!("kliko run of {tag}"),
            "description": format!(
                "run {} of image {} on host {}, by kliko {}{}",
                r.key, r.image_id, r.host, r.kliko_version,
                r.runtime.as_ref().map(|rt| format!(" under {rt}")).unwrap_or_default()
            ),
            "identifier": r.key.to_string(),
            "instrument": {"@id": app_id}, "containerImage": {"@id": image_id},
            "object": one_or_many(object), "result": {"@id": out_id},
            "startTime": r.started_at, "endTime": r.finished_at,
            "agent": {"@id": person},
            "actionStatus": {"@id": "http://schema.org/CompletedActionStatus"},
            "exitCode": r.exit_code,
        });
        if let Some(gpus) = &r.gpus {
            action["description"] = json!(format!("{}, GPUs {gpus}", action["description"].as_str().unwrap_or("")));
        }
        g.add(action);
    }
    for src in &opts.attach {
        let (id, file) = copy_in(src, out, "attached")?;
        g.add(file);
        has_part.push(json!({"@id": id}));
        files += 1;
    }
    let mut conforms = vec![json!({"@id": PROCESS_RUN_CRATE})];
    let mut main_entity = None;
    if let Some(wf) = &opts.workflow {
        let id = describe_workflow(&mut g, wf, &runs, out, &mut files)?;
        has_part.push(json!({"@id": id.clone()}));
        for (p, name) in [
            (WORKFLOW_RUN_CRATE, "Workflow Run Crate"),
            (PROVENANCE_RUN_CRATE, "Provenance Run Crate"),
            (WORKFLOW_RO_CRATE, "Workflow RO-Crate"),
        ] {
            let version = p.rsplit('/').next().unwrap_or_default();
            g.add(json!({"@id": p, "@type": "CreativeWork", "name": name, "version": version}));
            conforms.push(json!({"@id": p}));
        }
        main_entity = Some(json!({"@id": id}));
    }
    let license = opts
        .license
        .clone()
        .unwrap_or_else(|| "not stated: the licence of the data this crate describes applies".to_string());
    let license = if license.starts_with("http://") || license.starts_with("https://") {
        g.add(json!({"@id": license, "@type": "CreativeWork", "name": license}));
        json!({"@id": license})
    } else {
        json!(license)
    };
    let mut root = json!({
        "@id": "./", "@type": "Dataset",
        "name": format!("Provenance of {} {}", prov.kind, prov.digest),
        "description": format!(
            "What kliko recorded about {} `{}` (asked as `{}`): {} run(s) and the data they read and made, \
             each named by its digest.",
            prov.kind, prov.digest, prov.query, runs.len()
        ),
        "datePublished": crate::fsutil::now_rfc3339(),
        "license": license,
        "conformsTo": one_or_many(conforms),
        "mentions": one_or_many(mentions),
    });
    if let Some(m) = main_entity {
        root["mainEntity"] = m;
    }
    if !has_part.is_empty() {
        root["hasPart"] = one_or_many(has_part);
    }
    g.add(root);
    g.add(json!({"@id": PROCESS_RUN_CRATE, "@type": "CreativeWork", "name": "Process Run Crate", "version": "0.5"}));
    g.add(json!({
        "@id": "ro-crate-metadata.json", "@type": "CreativeWork",
        "about": {"@id": "./"}, "conformsTo": {"@id": RO_CRATE},
    }));
    let datasets = g.entities.values().filter(|e| e["@type"] == "Dataset").count() - 1;
    let mut terms = json!({
        "ContainerImage": format!("{WFRUN}ContainerImage"),
        "containerImage": format!("{WFRUN}containerImage"),
        "sha256": format!("{WFRUN}sha256"),
        "tag": format!("{WFRUN}tag"),
        "exitCode": format!("{WFRUN}exitCode"),
    });
    // Bioschemas' terms as RO-Crate 1.1's context maps them, said here too: later versions
    // of that context map them elsewhere (`bioschemas.org/terms/…`), and a reader given one
    // of those for 1.1 must still see a ComputationalWorkflow and its FormalParameters.
    terms["FormalParameter"] = json!("https://bioschemas.org/FormalParameter");
    if opts.workflow.is_some() {
        terms["ComputationalWorkflow"] = json!("https://bioschemas.org/ComputationalWorkflow");
    }
    let doc = json!({
        "@context": [format!("{RO_CRATE}/context"), terms],
        "@graph": g.entities.into_values().collect::<Vec<_>>(),
    });
    let meta = out.join("ro-crate-metadata.json");
    std::fs::write(&meta, serde_json::to_vec_pretty(&doc).expect("JSON of plain values")).map_err(|e| io(&meta, e))?;
    Ok(CrateSummary { path: out.to_path_buf(), runs: runs.len(), datasets, files })
}

/// The pipeline as a workflow (Provenance Run Crate 0.5): the file as the main entity (a
/// `ComputationalWorkflow` whose parts are the steps' images and whose `step`s are
/// `HowToStep`s), the pipeline run as a `CreateAction` of it, one `ControlAction` per step
/// naming the runs it made, and kliko's `OrganizeAction` over them. A step without a run that
/// made a result (it failed, or was skipped) is left out: the crate holds what was made.
/// Returns the main entity's id.
fn describe_workflow(
    g: &mut Graph,
    wf: &WorkflowRun,
    runs: &[&ActionResult],
    out: &Path,
    files: &mut usize,
) -> Result<String> {
    let (main, mut workflow) = copy_in(&wf.file, out, "pipeline.yml")?;
    *files += 1;
    let name = workflow["name"].as_str().unwrap_or("pipeline.yml").to_string();
    let lang = "#kliko-pipeline-language";
    g.add(json!({
        "@id": lang, "@type": "ComputerLanguage", "name": "kliko pipeline", "alternateName": "kliko-pipeline",
        "version": "1",
    }));
    let mut tools = Vec::new();
    let mut steps = Vec::new();
    let mut controls = Vec::new();
    for step in &wf.steps {
        let made: Vec<&&ActionResult> = step.runs.iter().filter_map(|k| runs.iter().find(|r| r.key == *k)).collect();
        let Some(first) = made.first() else { continue };
        let app = format!("#app-{}", first.image_id.trim_start_matches("sha256:"));
        if !tools.iter().any(|t: &Value| t["@id"] == app.as_str()) {
            tools.push(json!({"@id": app}));
        }
        let step_id = format!("#step-{}", encode_path(&step.name));
        g.add(json!({
            "@id": step_id, "@type": "HowToStep", "name": step.name,
            "position": (steps.len() + 1).to_string(), "workExample": {"@id": app},
        }));
        steps.push(json!({"@id": step_id}));
        let control = format!("#control-{}", encode_path(&step.name));
        g.add(json!({
            "@id": control, "@type": "ControlAction", "name": format!("orchestrate step {}", step.name),
            "instrument": {"@id": step_id},
            "object": one_or_many(made.iter().map(|r| json!({"@id": format!("#run-{}", r.key)})).collect()),
            "actionStatus": {"@id": "http://schema.org/CompletedActionStatus"},
        }));
        controls.push(json!({"@id": control}));
    }
    workflow["@type"] = json!(["File", "SoftwareSourceCode", "ComputationalWorkflow", "HowTo"]);
    workflow["description"] = json!(format!("the kliko pipeline, copied from `{}`", wf.file.display()));
    workflow["programmingLanguage"] = json!({"@id": lang});
    workflow["hasPart"] = one_or_many(tools);
    workflow["step"] = one_or_many(steps);
    g.add(workflow);
    // What the pipeline read from outside (inputs no run of it made) and everything it made.
    let outputs: Vec<Digest> = runs.iter().map(|r| r.output).collect();
    let mut object: Vec<Value> = Vec::new();
    for r in runs {
        if let Some(i) = r.preimage.input.filter(|i| !outputs.contains(i)) {
            let v = json!({"@id": format!("#tree-{i}")});
            if !object.contains(&v) {
                object.push(v);
            }
        }
    }
    let result: Vec<Value> = runs
        .iter()
        .map(|r| {
            let with_data = format!("outputs/{}/", r.output);
            let id = if g.entities.contains_key(&with_data) { with_data } else { format!("#tree-{}", r.output) };
            json!({"@id": id})
        })
        .collect();
    let user = crate::fsutil::invoking_user();
    let person = format!("#person-{user}");
    g.add(json!({"@id": person, "@type": "Person", "name": user}));
    let status = if wf.ok { "CompletedActionStatus" } else { "FailedActionStatus" };
    let mut run = json!({
        "@id": "#pipeline-run", "@type": "CreateAction", "name": format!("kliko pipeline run {name}"),
        "instrument": {"@id": main}, "startTime": wf.started_at, "endTime": wf.finished_at,
        "agent": {"@id": person}, "actionStatus": {"@id": format!("http://schema.org/{status}")},
        "result": one_or_many(result),
    });
    if !object.is_empty() {
        run["object"] = one_or_many(object);
    }
    g.add(run);
    let engine = "#kliko";
    g.add(json!({
        "@id": engine, "@type": "SoftwareApplication", "name": "kliko",
        "softwareVersion": env!("CARGO_PKG_VERSION"),
    }));
    g.add(json!({
        "@id": "#kliko-organize", "@type": "OrganizeAction", "name": "kliko runs the pipeline's steps",
        "instrument": {"@id": engine}, "object": one_or_many(controls), "result": {"@id": "#pipeline-run"},
        "startTime": wf.started_at, "endTime": wf.finished_at, "agent": {"@id": person},
    }));
    Ok(main)
}

/// Copy file `src` into the crate's top folder (named as it is, else `fallback`): its id and
/// its `File` entity, with its size and BLAKE3 digest.
fn copy_in(src: &Path, out: &Path, fallback: &str) -> Result<(String, Value)> {
    let io = |path: &Path, e: std::io::Error| EngineError::Io { path: path.to_path_buf(), source: e };
    let name = src.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| fallback.into());
    let bytes = std::fs::read(src).map_err(|e| io(src, e))?;
    let dest = out.join(&name);
    std::fs::write(&dest, &bytes).map_err(|e| io(&dest, e))?;
    let id = encode_path(&name);
    let file = json!({
        "@id": id, "@type": "File", "name": name, "contentSize": bytes.len().to_string(),
        "identifier": format!("blake3:{}", Digest::of_bytes(&bytes)),
        "description": format!("copied from `{}`", src.display()),
    });
    Ok((id, file))
}

/// Entities by id, each once (a later addition of the same id is the same entity).
#[derive(Default)]
struct Graph {
    entities: BTreeMap<String, Value>,
}

impl Graph {
    fn add(&mut self, e: Value) {
        let id = e["@id"].as_str().expect("every entity has an @id").to_string();
        self.entities.entry(id).or_insert(e);
    }
}

/// The parameters the kliko.yml of image `image_id` declares (from this store's copy; none
/// if it has none), as `FormalParameter`s of the application `app_id`: name → (id, entity).
fn formal_parameters(store: &Store, image_id: &str, app_id: &str) -> BTreeMap<String, (String, Value)> {
    use kliko_spec::FieldType as T;
    let Some(spec) = store
        .image_file(image_id, "/kliko.yml")
        .ok()
        .flatten()
        .and_then(|y| kliko_spec::Spec::parse("kliko.yml", &String::from_utf8_lossy(&y)).ok())
    else {
        return BTreeMap::new();
    };
    let mut out = BTreeMap::new();
    for f in spec.fields() {
        let id = format!("{app_id}-param-{}", f.name);
        let (kind, many) = match f.ty {
            T::Int => ("Integer", false),
            T::ListInt => ("Integer", true),
            T::Float => ("Float", false),
            T::ListFloat => ("Float", true),
            T::Bool => ("Boolean", false),
            T::ListBool => ("Boolean", true),
            T::File => ("File", false),
            T::ListFile => ("File", true),
            T::Choice | T::Char | T::Str => ("Text", false),
            T::ListStr => ("Text", true),
        };
        let mut e = json!({
            "@id": id, "@type": "FormalParameter", "name": f.name,
            "additionalType": kind, "valueRequired": f.required, "multipleValues": many,
            "conformsTo": {"@id": "https://bioschemas.org/profiles/FormalParameter/1.0-RELEASE"},
        });
        if let Some(d) = f.help_text.as_ref().or(f.label.as_ref()) {
            e["description"] = json!(d);
        }
        if let Some(v) = f.initial.as_ref().filter(|v| !matches!(v, kliko_spec::Value::Null)) {
            // The command-line spelling, as the run's own values are given.
            e["defaultValue"] = json!(v.to_string());
        }
        out.insert(f.name.clone(), (id, e));
    }
    out
}

/// RO-Crate 1.1 prefers a single value to a one-element list.
fn one_or_many(mut v: Vec<Value>) -> Value {
    if v.len() == 1 {
        v.pop().expect("one")
    } else {
        Value::Array(v)
    }
}

/// `repo:tag` → (`repo`, `tag`); no tag: `latest`.
fn split_tag(tag: &str) -> (String, String) {
    match tag.rsplit_once(':') {
        Some((repo, t)) if !t.contains('/') => (repo.to_string(), t.to_string()),
        _ => (tag.to_string(), "latest".to_string()),
    }
}

/// The `(digest, path)` of each file parameter in a canonical parameter value.
fn file_params(v: &Value) -> Vec<(String, String)> {
    match v {
        Value::Object(m) => match (m.get("digest").and_then(Value::as_str), m.get("path").and_then(Value::as_str)) {
            (Some(d), Some(p)) => vec![(d.to_string(), p.to_string())],
            _ => Vec::new(),
        },
        Value::Array(items) => items.iter().flat_map(file_params).collect(),
        _ => Vec::new(),
    }
}

/// Every file under tree `d`, as `File` entities at `prefix…`, their ids pushed to `parts`.
fn list_files(
    store: &Store,
    d: &Digest,
    prefix: &str,
    g: &mut Graph,
    parts: &mut Vec<Value>,
    files: &mut usize,
) -> Result<()> {
    let tree = store.get_tree(d)?;
    for (name, entry) in &tree.entries {
        let name = String::from_utf8_lossy(name);
        match entry {
            Entry::File { size, digest, .. } => {
                let id = format!("{prefix}{}", encode_path(&name));
                let mut f = Map::new();
                f.insert("@id".into(), json!(id));
                f.insert("@type".into(), json!("File"));
                f.insert("name".into(), json!(name));
                f.insert("contentSize".into(), json!(size.to_string()));
                f.insert("identifier".into(), json!(format!("blake3:{digest}")));
                g.add(Value::Object(f));
                parts.push(json!({"@id": id}));
                *files += 1;
            }
            Entry::Dir { digest } => {
                list_files(store, digest, &format!("{prefix}{}/", encode_path(&name)), g, parts, files)?;
            }
            Entry::Symlink { .. } => {}
        }
    }
    Ok(())
}

/// A path segment as a URI path (RO-Crate ids are URI references).
fn encode_path(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_parameters_and_paths() {
        assert_eq!(split_tag("flagger:1.2"), ("flagger".to_string(), "1.2".to_string()));
        assert_eq!(split_tag("localhost:5000/flagger"), ("localhost:5000/flagger".to_string(), "latest".to_string()));
        let canon = json!([{"digest": "ab", "path": "/param_files/m/0/a.fits"}, {"digest": "cd", "path": "/p"}]);
        assert_eq!(file_params(&canon), [("ab".into(), "/param_files/m/0/a.fits".into()), ("cd".into(), "/p".into())]);
        assert!(file_params(&json!(3)).is_empty());
        assert_eq!(encode_path("a b#c.txt"), "a%20b%23c.txt");
        assert_eq!(one_or_many(vec![json!(1)]), json!(1));
        assert_eq!(one_or_many(vec![json!(1), json!(2)]), json!([1, 2]));
    }
}
