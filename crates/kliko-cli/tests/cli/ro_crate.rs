//! `kliko provenance --ro-crate`: the crates are checked by the field's own tools, from PyPI:
//! `rocrate-validator` (roc-validator) against the Process Run Crate 0.5 profile (a pipeline
//! run's: the Provenance Run Crate 0.5 profile, with the Workflow Run Crate and Workflow
//! RO-Crate profiles it builds on), and read back with `rocrate`. `KLIKO_ROC_VENV` names the venv that holds them (`scripts/test.sh`
//! makes it); without it every test says it is skipped.
//!
//! The validator resolves the RO-Crate JSON-LD context over the network, which this machine
//! does not have: `scripts/roc-offline.py` seeds its HTTP cache with the context the
//! `rocrate` package ships, and the validator runs with `--offline --cache-path`, so no
//! check is skipped and nothing is fetched.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use serde_json::Value;

fn venv() -> Option<PathBuf> {
    match std::env::var_os("KLIKO_ROC_VENV") {
        Some(v) => Some(PathBuf::from(v)),
        None => {
            eprintln!("skipped: no roc-validator (set KLIKO_ROC_VENV, as scripts/test.sh does)");
            None
        }
    }
}

/// The validator's verdict on `krate` (a folder or a .zip), as JSON.
fn validate(venv: &Path, cache: &Path, krate: &Path) -> Value {
    validate_as(venv, cache, krate, "process-run-crate-0.5")
}

/// The validator's verdict on `krate` against `profile` (and the profiles it builds on).
fn validate_as(venv: &Path, cache: &Path, krate: &Path, profile: &str) -> Value {
    let o = Command::new(venv.join("bin/rocrate-validator"))
        .args(["validate", "-p", profile, "--offline", "--no-paging", "--output-format", "json"])
        .arg("--cache-path")
        .arg(cache)
        .arg(krate)
        .output()
        .expect("rocrate-validator runs");
    let text = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("the validator said no JSON ({e}): {text}\n{}", String::from_utf8_lossy(&o.stderr)))
}

/// What `rocrate` reads back: every entity's id, types, identifier and the links of actions.
const READ_BACK: &str = r#"
import json, sys
from rocrate.rocrate import ROCrate
crate = ROCrate(sys.argv[1])
def ids(v):
    v = v if isinstance(v, list) else [v] if v is not None else []
    return [x.id for x in v]
def ids_of(v):
    return v if isinstance(v, list) else [v] if v is not None else []
main = crate.root_dataset.get("mainEntity")
out = {"actions": [], "identifiers": [], "conforms": str(crate.root_dataset.get("conformsTo")),
       "main": main.id if main else None, "steps": [], "controls": {}, "organize": None, "workflow_run": None}
for e in crate.get_entities():
    t = e.type if isinstance(e.type, list) else [e.type]
    ident = e.get("identifier")
    if ident:
        out["identifiers"].append(ident)
    if "HowToStep" in t:
        out["steps"].append({"name": e.get("name"), "position": e.get("position"), "tool": e.get("workExample").get("identifier")})
    if "ControlAction" in t:
        out["controls"][e.get("instrument").get("name")] = [crate.get(i).get("identifier") for i in ids(e.get("object"))]
    if "OrganizeAction" in t:
        out["organize"] = {"engine": e.get("instrument").get("name"), "controls": len(ids(e.get("object"))), "result": e.get("result").id}
    if "CreateAction" in t and e.get("containerImage") is None:
        out["workflow_run"] = {"instrument": e.get("instrument").id, "results": len(ids(e.get("result")))}
    if "CreateAction" in t and e.get("containerImage") is not None:
        obj = e.get("object") or []
        obj = obj if isinstance(obj, list) else [obj]
        out["actions"].append({
            "key": ident,
            "image": e.get("instrument").get("identifier"),
            "container_sha256": e.get("containerImage").get("sha256"),
            "params": {o.get("name"): o.get("value") for o in obj if o.type == "PropertyValue"},
            "formal": {o.get("name"): o.get("exampleOfWork").get("additionalType")
                       for o in obj if o.type == "PropertyValue" and o.get("exampleOfWork") is not None},
            "app_inputs": sorted(i.get("name") for i in ids_of(e.get("instrument").get("input"))),
            "inputs": sorted(o.get("identifier") for o in obj if o.type in ("Dataset", "File")),
            "result": e.get("result").get("identifier"),
            "start": e.get("startTime"), "end": e.get("endTime"),
            "agent": e.get("agent").get("name"), "exit": e.get("exitCode"),
        })
print(json.dumps(out))
"#;

fn read_back(venv: &Path, krate: &Path) -> Value {
    let o = Command::new(venv.join("bin/python")).arg("-c").arg(READ_BACK).arg(krate).output().expect("python runs");
    assert!(o.status.success(), "rocrate could not read {}: {}", krate.display(), String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("JSON")
}

fn digest_of(w: &World, path: &Path) -> String {
    let h = Out::of(w.kliko().args(["hash", "--json"]).arg(path));
    h.ok();
    serde_json::from_str::<Value>(&h.stdout).expect("json")["digest"].as_str().expect("digest").to_string()
}

#[test]
fn a_lineage_is_a_valid_process_run_crate_holding_every_run_and_digest_and_nothing_else() {
    let Some(venv) = venv() else { return };
    let w = World::new();
    let cache = w.path("http-cache");
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/roc-offline.py");
    let s = Command::new(venv.join("bin/python")).arg(&seed).arg(&cache).output().expect("seed");
    assert!(s.status.success(), "seeding: {}", String::from_utf8_lossy(&s.stderr));

    let step1 = split_image(
        "crate-step1",
        "      - {name: scale, type: int, initial: 2}\n      - {name: mask, type: file, required: false}\n",
        "cat /input/* /param_files/mask > /output/data.txt; echo step1 says hello",
    );
    let step2 = split_image("crate-step2", "", "wc -l < /input/data.txt > /output/summary.txt");
    let input = w.folder("raw", &[("a.txt", "1\n2\n")]);
    let mask = w.file("mask.txt", "m\n");
    let r1 = w.run(&[
        &step1.tag,
        &"--json",
        &"--input",
        &input,
        &"--output",
        &w.path("out1"),
        &"--scale",
        &"3",
        &"--mask",
        &mask,
    ]);
    r1.ok();
    let r2 = w.run(&[&step2.tag, &"--json", &"--input", &w.path("out1"), &"--output", &w.path("out2")]);
    r2.ok();
    // A run that is not in the lineage: it must not appear.
    let unrelated = w.folder("unrelated", &[("data.txt", "x\n")]);
    let other = w.run(&[&step2.tag, &"--json", &"--input", &unrelated, &"--output", &w.path("other")]);
    other.ok();
    let (k1, k2) = (r1.key(), r2.key());

    // Without data: a folder.
    let krate = w.path("crate");
    let o = Out::of(w.kliko().args(["provenance", "--ro-crate"]).arg(&krate).arg(w.path("out2/summary.txt")));
    o.ok();
    assert!(o.stdout.contains("2 run(s)"), "{}", o.stdout);
    let verdict = validate(&venv, &cache, &krate);
    assert_eq!(verdict["passed"], true, "not a valid Process Run Crate: {verdict:#}");
    let back = read_back(&venv, &krate);
    assert!(back["conforms"].as_str().unwrap().contains("wfrun/process/0.5"), "{back}");
    let actions = back["actions"].as_array().unwrap();
    let mut keys: Vec<&str> = actions.iter().map(|a| a["key"].as_str().unwrap()).collect();
    keys.sort();
    let mut want = vec![k1.as_str(), k2.as_str()];
    want.sort();
    assert_eq!(keys, want, "exactly the lineage's runs");
    let a1 = actions.iter().find(|a| a["key"] == k1.as_str()).unwrap();
    let a2 = actions.iter().find(|a| a["key"] == k2.as_str()).unwrap();
    assert_eq!(a1["image"], step1.id.as_str());
    assert_eq!(a1["container_sha256"], step1.id.trim_start_matches("sha256:"));
    assert_eq!(a2["image"], step2.id.as_str());
    assert_eq!(a1["params"]["scale"], "3");
    // Each value given is an example of the parameter the image's kliko.yml declares.
    assert_eq!(a1["formal"]["scale"], "Integer", "{a1}");
    assert_eq!(a1["app_inputs"], serde_json::json!(["mask", "scale"]), "{a1}");
    assert_eq!(a2["app_inputs"], serde_json::json!([]), "step2 declares no parameters: {a2}");
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(krate.join("ro-crate-metadata.json")).unwrap()).unwrap();
    let formal = |name: &str| {
        doc["@graph"].as_array().unwrap().iter().find(|e| e["@type"] == "FormalParameter" && e["name"] == name).cloned()
    };
    let scale = formal("scale").expect("scale is a FormalParameter");
    assert_eq!((scale["defaultValue"].as_str(), scale["valueRequired"].as_bool()), (Some("2"), Some(true)), "{scale}");
    let mask_param = formal("mask").expect("mask is a FormalParameter");
    assert_eq!(
        (mask_param["additionalType"].as_str(), mask_param["valueRequired"].as_bool()),
        (Some("File"), Some(false))
    );
    assert_eq!(a1["exit"], 0);
    assert!(a1["start"].as_str().unwrap().starts_with("20") && a1["end"].as_str().is_some());
    // Inputs and outputs by digest, as `kliko hash` gives them: anyone can check the folders.
    let raw = digest_of(&w, &input);
    let out1 = digest_of(&w, &w.path("out1"));
    let out2 = digest_of(&w, &w.path("out2"));
    let mask_digest = digest_of(&w, &mask);
    let inputs1: Vec<&str> = a1["inputs"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(inputs1.contains(&format!("kliko-tree:{raw}").as_str()), "{inputs1:?}");
    assert!(inputs1.contains(&format!("blake3:{mask_digest}").as_str()), "the file parameter by content: {inputs1:?}");
    assert_eq!(a1["result"], format!("kliko-tree:{out1}"));
    assert_eq!(a2["inputs"], serde_json::json!([format!("kliko-tree:{out1}")]), "step2 read step1's output");
    assert_eq!(a2["result"], format!("kliko-tree:{out2}"));
    // Nothing else of the store.
    let all = serde_json::to_string(&back["identifiers"]).unwrap();
    assert!(!all.contains(&other.key()), "a run outside the lineage leaked in");
    let meta = std::fs::read_to_string(krate.join("ro-crate-metadata.json")).unwrap();
    assert!(!meta.contains(&other.key()));

    // With the data, as a zip: the outputs and logs themselves, every file with its digest.
    let zip = w.path("crate.zip");
    let o = Out::of(
        w.kliko()
            .args(["provenance", "--with-data", "--license", "https://spdx.org/licenses/CC-BY-4.0", "--ro-crate"])
            .arg(&zip)
            .arg(&k2),
    );
    o.ok();
    // (roc-validator 0.13 validates a .zip, but its JSON report of one fails: "Object of type
    // URI is not JSON serializable"; the zip's contents are validated instead.)
    let unzip = w.path("unzipped");
    let py = "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])";
    assert!(Command::new("python3").args(["-c", py]).arg(&zip).arg(&unzip).status().unwrap().success());
    let verdict = validate(&venv, &cache, &unzip);
    assert_eq!(verdict["passed"], true, "not a valid Process Run Crate: {verdict:#}");
    assert_eq!(read(&unzip.join(format!("outputs/{out2}/summary.txt"))).trim(), "3");
    assert_eq!(read(&unzip.join(format!("outputs/{out1}/data.txt"))), "1\n2\nm\n");
    assert!(read(&unzip.join(format!("logs/{k1}/stdout.log"))).contains("step1 says hello"));
    let back = read_back(&venv, &unzip);
    let ids = serde_json::to_string(&back["identifiers"]).unwrap();
    let data_digest = digest_of(&w, &w.path("out1/data.txt"));
    assert!(ids.contains(&format!("blake3:{data_digest}")), "each file with its digest: {ids}");
    let meta = std::fs::read_to_string(unzip.join("ro-crate-metadata.json")).unwrap();
    assert!(meta.contains("https://spdx.org/licenses/CC-BY-4.0"));

    // Refusals: an existing crate is never replaced; nothing to describe is an error.
    let again = Out::of(w.kliko().args(["provenance", "--ro-crate"]).arg(&zip).arg(&k2));
    assert_ne!(again.code, 0);
    assert!(again.stderr.contains("exists already"), "{}", again.stderr);
    let again = Out::of(w.kliko().args(["provenance", "--ro-crate"]).arg(&krate).arg(&k2));
    assert_ne!(again.code, 0);
    assert_no_containers(&step1);
    assert_no_containers(&step2);
}

#[test]
fn a_pipeline_run_writes_one_crate_of_all_its_runs_and_its_file() {
    let Some(venv) = venv() else { return };
    let w = World::new();
    let cache = w.path("http-cache");
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/roc-offline.py");
    assert!(Command::new(venv.join("bin/python")).arg(&seed).arg(&cache).status().unwrap().success());
    let each = split_image("crate-each", "", "wc -c < /input/x > /output/n");
    let all = split_image("crate-all", "", "cat /input/*/n > /output/all");
    w.folder("obs/a", &[("x", "aaa")]);
    w.folder("obs/b", &[("x", "bb")]);
    let file = w.file(
        "p.yml",
        &format!(
            "version: 1\nsteps:\n  count:\n    image: {}\n    foreach: obs/\n  gather:\n    image: {}\n    input: count\n",
            each.tag, all.tag
        ),
    );
    let krate = w.path("pipeline-crate");
    let o = Out::of(w.kliko().args(["pipeline", "run", "--json", "--ro-crate"]).arg(&krate).arg(&file));
    o.ok();
    assert!(o.stderr.contains("wrote the RO-Crate") && o.stderr.contains("3 run(s)"), "{}", o.stderr);
    let verdict = validate_as(&venv, &cache, &krate, "provenance-run-crate-0.5");
    assert_eq!(verdict["passed"], true, "not a valid Provenance Run Crate: {verdict:#}");
    let back = read_back(&venv, &krate);
    let report = o.json();
    // The pipeline as the workflow: its file the main entity, run once; each step a HowToStep
    // with its image, whose ControlAction names exactly the step's runs; kliko organizes them.
    assert_eq!(back["main"], "p.yml");
    for p in ["process/0.5", "workflow/0.5", "provenance/0.5", "workflow-ro-crate/1.0"] {
        assert!(back["conforms"].as_str().unwrap().contains(p), "{p}: {}", back["conforms"]);
    }
    assert_eq!(back["workflow_run"]["instrument"], "p.yml");
    assert_eq!(back["workflow_run"]["results"], 3, "every run's output");
    let steps = back["steps"].as_array().unwrap();
    let step_names: Vec<&str> = steps.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(step_names.len(), 2);
    assert!(step_names.contains(&"count") && step_names.contains(&"gather"));
    for (name, image) in [("count", &each.id), ("gather", &all.id)] {
        let s = steps.iter().find(|s| s["name"] == name).unwrap();
        assert_eq!(&s["tool"], image, "{name} names its image");
        let mut want: Vec<&str> = report["steps"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap()
            ["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["key"].as_str().unwrap())
            .collect();
        want.sort();
        let mut got: Vec<&str> =
            back["controls"][name].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
        got.sort();
        assert_eq!(got, want, "{name}: its runs");
    }
    assert_eq!(back["organize"]["engine"], "kliko");
    assert_eq!(back["organize"]["controls"], 2);
    assert_eq!(back["organize"]["result"], "#pipeline-run");
    let mut want: Vec<String> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["runs"].as_array().unwrap().iter().map(|r| r["key"].as_str().unwrap().to_string()))
        .collect();
    want.sort();
    let mut got: Vec<String> =
        back["actions"].as_array().unwrap().iter().map(|a| a["key"].as_str().unwrap().to_string()).collect();
    got.sort();
    assert_eq!(got, want, "every run of the pipeline, once");
    assert_eq!(read(&krate.join("p.yml")), read(&file), "the pipeline file is in the crate");
    let file_digest = digest_of(&w, &file);
    assert!(serde_json::to_string(&back["identifiers"]).unwrap().contains(&format!("blake3:{file_digest}")));
    // A re-run is all hits: its crate names the same runs (the ones that made the results).
    let again = w.path("again-crate");
    let o = Out::of(w.kliko().args(["pipeline", "run", "--json", "--ro-crate"]).arg(&again).arg(&file));
    o.ok();
    assert_eq!(o.json()["containers"], 0);
    let mut got: Vec<String> = read_back(&venv, &again)["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["key"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    assert_eq!(got, want);
    assert_no_containers(&each);
    assert_no_containers(&all);
}
