//! `kliko pipeline run --json` against the real Docker daemon: a five-step pipeline with a
//! fan-out (`foreach`, with a folder and a file entry), a join-mode step and a gathering step.
//! An unchanged re-run starts zero containers (counted from Docker's own events); changing
//! one input file re-runs exactly the steps downstream of it; a new foreach entry runs only
//! that entry and the steps that gather it. Also `kliko pipeline show` and validation errors.

use std::path::{Path, PathBuf};
use std::process::Command;

use kliko_testkit::{ImageBuilder, TestImage};

const TOOL_YML: &str = "schema_version: 3
io: split
sections:
  - name: main
    description: test knobs
    fields:
      - {name: tag, type: str, initial: x}
";

/// Lists its input (paths and contents) and writes its tag.
const TOOL_SCRIPT: &str = r#"set -eu
tag=$(sed -n 's/^ *"tag": *"\(.*\)",\{0,1\} *$/\1/p' /parameters.json)
cd /input
find . -type f | sort | while read -r f; do echo "$f: $(cat "$f")"; done > /output/listing.txt
echo "$tag" > /output/tag.txt
"#;

const JOIN_YML: &str = "schema_version: 3\nio: join\nsections: []\n";
/// Changes every file of its work tree in place.
const JOIN_SCRIPT: &str = r#"set -eu
find /work -type f | while read -r f; do echo joined >> "$f"; done
"#;

fn kliko(store: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kliko"));
    c.env_remove("KLIKO_STORE").arg("--store").arg(store);
    c
}

fn now_s() -> String {
    format!("{:.3}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64())
}

/// Containers Docker created for this pipeline file between `since` and `until`.
fn containers_created(pipeline: &Path, since: &str, until: &str) -> usize {
    let out = Command::new("docker")
        .args(["events", "--since", since, "--until", until, "--filter", "type=container", "--filter", "event=create"])
        .args(["--filter", &format!("label=io.kliko.pipeline={}", pipeline.display()), "--format", "{{.ID}}"])
        .output()
        .expect("docker events");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()).count()
}

struct Run {
    json: serde_json::Value,
    created: usize,
}

impl Run {
    fn step(&self, name: &str) -> &serde_json::Value {
        self.json["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no step {name}"))
    }
    fn cache(&self, name: &str) -> String {
        self.step(name)["cache"].as_str().unwrap_or("none").to_string()
    }
    /// entry → cache of each run of a step.
    fn entries(&self, name: &str) -> Vec<(String, String)> {
        self.step(name)["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["entry"].as_str().unwrap_or("").to_string(), r["cache"].as_str().unwrap().to_string()))
            .collect()
    }
}

fn run_pipeline(store: &Path, file: &Path) -> Run {
    let since = now_s();
    let out = kliko(store).args(["pipeline", "run", "--jobs", "2", "--json"]).arg(file).output().unwrap();
    // Every container of the run was created before kliko exited: `until` is now.
    let until = now_s();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{}", out.status, stderr);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    Run { json, created: containers_created(file, &since, &until) }
}

fn write(p: &Path, text: &str) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    store: PathBuf,
    file: PathBuf,
    _images: (TestImage, TestImage),
}

fn setup() -> Setup {
    let tool = ImageBuilder::new("pipeline-cli-tool")
        .kliko_yml(TOOL_YML)
        .kliko_script(TOOL_SCRIPT)
        .build()
        .expect("docker build");
    let join = ImageBuilder::new("pipeline-cli-join")
        .kliko_yml(JOIN_YML)
        .kliko_script(JOIN_SCRIPT)
        .build()
        .expect("docker build");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    write(&root.join("data/a.txt"), "a1");
    write(&root.join("data/b.txt"), "b1");
    write(&root.join("obs/o1/x.txt"), "o1");
    write(&root.join("obs/o2/x.txt"), "o2");
    write(&root.join("obs/o3.txt"), "o3");
    write(&root.join("extra/e.txt"), "e");
    let file = root.join("pipeline.yml");
    write(
        &file,
        &format!(
            "version: 1
steps:
  prep:
    image: {t}
    input: data/
    params: {{tag: prep}}
  per_obs:
    image: {t}
    foreach: obs/
    params: {{tag: obs}}
  other:
    image: {t}
    input: extra/
    params: {{tag: other}}
  annotate:
    image: {j}
    input: prep
  combine:
    image: {t}
    input: [prep, per_obs, annotate]
    params: {{tag: combine}}
    output: out/
",
            t = tool.tag,
            j = join.tag
        ),
    );
    Setup { store: root.join("store"), _dir: dir, root, file, _images: (tool, join) }
}

#[test]
fn reruns_are_free_and_changes_rerun_only_what_depends_on_them() {
    let s = setup();

    // 1. Everything runs.
    let r = run_pipeline(&s.store, &s.file);
    assert_eq!(r.json["ok"], true);
    assert_eq!(r.json["containers"], 7, "prep, 3 entries, other, annotate, combine");
    assert_eq!(r.created, 7);
    for step in ["prep", "per_obs", "other", "annotate", "combine"] {
        assert_eq!(r.cache(step), "miss", "{step}");
    }
    let listing = std::fs::read_to_string(s.root.join("out/listing.txt")).unwrap();
    // The gathered input: one subfolder per input, one per foreach entry; a file entry sits
    // in its folder under its own name.
    for line in
        ["./prep/tag.txt: prep", "./per_obs/o1/listing.txt: ./x.txt: o1", "./per_obs/o3.txt/listing.txt: ./o3.txt: o3"]
    {
        assert!(listing.contains(line), "{line} in {listing}");
    }
    assert!(listing.contains("./annotate/tag.txt: prep\njoined"), "{listing}");
    // The join step changed a private copy: `prep`'s stored output is untouched.
    let prep_out = r.step("prep")["output"].as_str().unwrap().to_string();
    let copy = s.root.join("prep-copy");
    let st = kliko(&s.store).args(["store", "materialize", &prep_out]).arg(&copy).status().unwrap();
    assert!(st.success());
    assert_eq!(std::fs::read_to_string(copy.join("tag.txt")).unwrap(), "prep\n");

    // 2. Unchanged: every step a hit, and Docker saw no container created.
    let r = run_pipeline(&s.store, &s.file);
    assert_eq!(r.json["containers"], 0);
    assert_eq!(r.created, 0, "an unchanged re-run starts zero containers");
    for step in ["prep", "per_obs", "other", "annotate", "combine"] {
        assert_eq!(r.cache(step), "hit", "{step}");
        assert_eq!(r.step(step)["state"], "cached", "{step}");
    }

    // 3. One input file changes: `prep` and what reads it (directly or not) run again.
    write(&s.root.join("data/a.txt"), "a2");
    let r = run_pipeline(&s.store, &s.file);
    assert_eq!(r.cache("prep"), "miss");
    assert_eq!(r.cache("annotate"), "miss");
    assert_eq!(r.cache("combine"), "miss");
    assert_eq!(r.cache("per_obs"), "hit");
    assert_eq!(r.cache("other"), "hit");
    assert_eq!(r.created, 3);
    assert!(std::fs::read_to_string(s.root.join("out/listing.txt"))
        .unwrap()
        .contains("./prep/listing.txt: ./a.txt: a2"));

    // 4. A new foreach entry: only it runs, then the steps that gather it.
    write(&s.root.join("obs/o4/x.txt"), "o4");
    let r = run_pipeline(&s.store, &s.file);
    assert_eq!(r.cache("per_obs"), "partial");
    let entries = r.entries("per_obs");
    assert_eq!(
        entries,
        [("o1", "hit"), ("o2", "hit"), ("o3.txt", "hit"), ("o4", "miss")]
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .to_vec()
    );
    assert_eq!(r.cache("combine"), "miss");
    for step in ["prep", "other", "annotate"] {
        assert_eq!(r.cache(step), "hit", "{step}");
    }
    assert_eq!(r.created, 2, "the new entry and the gathering step");
    assert!(std::fs::read_to_string(s.root.join("out/listing.txt"))
        .unwrap()
        .contains("./per_obs/o4/listing.txt: ./x.txt: o4"));

    // `show` knows every key now, and that each would hit.
    let out = kliko(&s.store).args(["pipeline", "show", "--json"]).arg(&s.file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for step in v["steps"].as_array().unwrap() {
        let runs = step["runs"].as_array().unwrap_or_else(|| panic!("keys known: {step}"));
        assert!(runs.iter().all(|r| r["hit"] == true), "{step}");
    }
    // ... and after a change, which steps would miss and which cannot be known yet.
    write(&s.root.join("extra/e.txt"), "e2");
    let out = kliko(&s.store).args(["pipeline", "show", "--json"]).arg(&s.file).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let step = |n: &str| v["steps"].as_array().unwrap().iter().find(|s| s["name"] == n).unwrap().clone();
    assert_eq!(step("other")["runs"][0]["hit"], false);
    assert_eq!(step("prep")["runs"][0]["hit"], true);

    // The four runs are in the history of pipeline runs, newest first, however the file is named.
    let relative = s.root.join("obs/../pipeline.yml");
    let out = kliko(&s.store).args(["pipeline", "history", "--json"]).arg(&relative).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let runs: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(runs.iter().map(|r| r["containers"].as_u64().unwrap()).collect::<Vec<_>>(), [2, 3, 0, 7]);
    assert!(runs.iter().all(|r| r["ok"] == true && r["via"] == "cli" && r["executor"] == "local"));
    let combine = runs[0]["steps"].as_array().unwrap().iter().find(|x| x["name"] == "combine").unwrap().clone();
    assert_eq!(combine["state"], "done");
    assert_eq!(combine["keys"].as_array().unwrap().len(), 1);
    let text = kliko(&s.store).args(["pipeline", "history"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("combine") && text.contains("7 container(s)"), "{text}");
}

#[test]
fn validation_errors_name_step_and_line_and_nothing_runs() {
    let s = setup();
    let bad = s.root.join("bad.yml");
    let missing = kliko_testkit::unique_tag("pipeline-cli-missing");
    let tool = &s._images.0.tag;
    write(
        &bad,
        &format!(
            "version: 1
steps:
  a:
    image: {tool}
    input: b
  b:
    image: {tool}
    input: a
    params: {{tga: x}}
  c:
    image: {missing}
    input: data/
"
        ),
    );
    let since = now_s();
    let out = kliko(&s.store).args(["pipeline", "run"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3: step `a`: the steps form a cycle"), "{err}");
    assert!(err.contains("line 9: step `b`: unknown parameter `tga`"), "{err}");
    assert!(err.contains("did you mean `tag`?"), "{err}");
    assert!(err.contains(&format!("line 11: step `c`: cannot use image `{missing}`")), "{err}");
    let until = now_s();
    assert_eq!(containers_created(&bad, &since, &until), 0);
}

/// Containers labelled with this pipeline file that exist now (running or not).
fn containers_of_pipeline(pipeline: &Path) -> Vec<String> {
    let out = Command::new("docker")
        .args([
            "ps",
            "-a",
            "--filter",
            &format!("label=io.kliko.pipeline={}", pipeline.display()),
            "--format",
            "{{.ID}}",
        ])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).filter(|l| !l.is_empty()).collect()
}

#[test]
fn ctrl_c_stops_running_containers_and_keeps_finished_steps_cached() {
    let tool = ImageBuilder::new("pipeline-cli-quick")
        .kliko_yml(TOOL_YML)
        .kliko_script(TOOL_SCRIPT)
        .build()
        .expect("docker build");
    let slow = ImageBuilder::new("pipeline-cli-slow")
        .kliko_yml(TOOL_YML)
        .kliko_script("sleep 60\n")
        .build()
        .expect("docker build");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(&root.join("data/a.txt"), "a1");
    let file = root.join("pipeline.yml");
    write(
        &file,
        &format!(
            "version: 1\nsteps:\n  quick:\n    image: {t}\n    input: data/\n  slow:\n    image: {s}\n    input: data/\n  after:\n    image: {t}\n    input: slow\n",
            t = tool.tag,
            s = slow.tag
        ),
    );
    let store = root.join("store");
    let child = kliko(&store)
        .args(["pipeline", "run", "--jobs", "2", "--json"])
        .arg(&file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // Wait until `quick` is stored and `slow` is running.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let show = kliko(&store).args(["pipeline", "show", "--json"]).arg(&file).output().unwrap();
        let plan: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap_or_default();
        let quick_stored =
            plan["steps"].as_array().into_iter().flatten().any(|s| s["name"] == "quick" && s["runs"][0]["hit"] == true);
        let running = !containers_of_pipeline(&file).is_empty();
        if quick_stored && running {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the pipeline never got going");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let t0 = std::time::Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(30), "it took {:?} to stop", t0.elapsed());
    assert!(stderr.contains("stopping"), "{stderr}");
    assert!(containers_of_pipeline(&file).is_empty(), "a container was left behind");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    let state =
        |name: &str| report["steps"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap()["state"].clone();
    assert!(["done", "cached"].contains(&state("quick").as_str().unwrap()), "{report}");
    assert!(!["done", "cached"].contains(&state("slow").as_str().unwrap()), "{report}");
    assert!(!["done", "cached"].contains(&state("after").as_str().unwrap()), "{report}");
    // What finished stays cached; what was stopped is not.
    let show = kliko(&store).args(["pipeline", "show", "--json"]).arg(&file).output().unwrap();
    let plan: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let hit = |name: &str| {
        plan["steps"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap()["runs"][0]["hit"].clone()
    };
    assert_eq!(hit("quick"), true, "{plan}");
    assert_eq!(hit("slow"), false, "{plan}");
}
