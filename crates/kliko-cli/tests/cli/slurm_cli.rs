//! `kliko pipeline run --executor slurm|srun` against a real Slurm (a private single-node
//! cluster started by `scripts/with-slurm.sh`: munged, slurmctld and slurmd on 127.0.0.1),
//! real Docker inside the jobs, and a shared-folder tier. Jobs are counted from Slurm itself
//! (`scontrol show job`, by a comment each test gives its jobs), containers from Docker.
//!
//! Without `KLIKO_TEST_SLURM` (set by `scripts/with-slurm.sh`) every test says it is skipped:
//! `scripts/test.sh`, the README's test command, runs them under it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;

fn slurm_here() -> bool {
    if std::env::var_os("KLIKO_TEST_SLURM").is_none() {
        eprintln!("skipped: no Slurm cluster (run under `bash scripts/with-slurm.sh`)");
        return false;
    }
    true
}

/// Lists its input, writes its tag; sleeps `sleep` seconds first.
const TOOL_YML: &str = "schema_version: 3
io: split
sections:
  - name: main
    description: test knobs
    fields:
      - {name: tag, type: str, initial: x}
      - {name: sleep, type: int, initial: 0}
";
const TOOL_SCRIPT: &str = r#"set -eu
tag=$(sed -n 's/^ *"tag": *"\(.*\)",\{0,1\} *$/\1/p' /parameters.json)
s=$(sed -n 's/^ *"sleep": *\([0-9]*\),\{0,1\} *$/\1/p' /parameters.json)
echo "tool $tag starting"
[ "${s:-0}" -gt 0 ] && sleep "$s"
cd /input
find . -type f | sort | while read -r f; do echo "$f: $(cat "$f")"; done > /output/listing.txt
echo "$tag" > /output/tag.txt
echo "tool $tag done"
"#;

/// One test's cluster world: its dispatcher store, the node store its jobs use, a shared
/// folder tier, and a comment on every job it submits.
struct Cluster {
    w: World,
    tier: PathBuf,
    tag: String,
}

impl Cluster {
    fn new(name: &str) -> Cluster {
        let w = World::new();
        let tier = w.path("tier");
        std::fs::create_dir_all(&tier).unwrap();
        Out::of(w.kliko().args(["remote", "key", "new"])).ok();
        let tag = kliko_testkit::unique_tag(name).replace([':', '/', '.'], "-");
        Cluster { w, tier, tag }
    }

    fn pipeline(&self, executor: &str, file: &Path) -> Command {
        self.pipeline_in(&self.w.store, executor, file)
    }

    /// [`Cluster::pipeline`] dispatched from another store (another user, another login node).
    fn pipeline_in(&self, store: &Path, executor: &str, file: &Path) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kliko"));
        c.env_remove("KLIKO_STORE").env_remove("KLIKO_REMOTE").arg("--store").arg(store);
        c.env("KLIKO_SIGNING_KEY", self.w.path("signing-key")).env_remove("KLIKO_TRUSTED_KEYS");
        c.arg("--remote").arg(&self.tier);
        c.args(["pipeline", "run", "--json", "--executor", executor]).arg(file);
        c.env("KLIKO_NODE_STORE", self.w.path("node-store"))
            .env("KLIKO_SLURM_LOGS", self.w.path("slurm-logs"))
            .env("KLIKO_SLURM_POLL", "1s")
            .env("KLIKO_SLURM_ARGS", format!("--comment={}", self.tag));
        c
    }

    fn run(&self, file: &Path) -> Out {
        Out::of(&mut self.pipeline("slurm", file))
    }

    /// This test's jobs as Slurm knows them: `(job id, state)`, array tasks one by one.
    fn jobs(&self) -> Vec<(String, String)> {
        let out = Command::new("scontrol").args(["show", "job", "-o"]).output().expect("scontrol");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .filter(|l| l.contains(&format!("Comment={}", self.tag)))
            .map(|l| {
                let field = |name: &str| {
                    l.split_whitespace()
                        .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
                        .unwrap_or("")
                        .to_string()
                };
                (field("JobId"), field("JobState"))
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Nothing of this test's left in the queue.
        let ids: Vec<String> = self.jobs().into_iter().map(|(id, _)| id).collect();
        if !ids.is_empty() {
            let _ = Command::new("scancel").args(&ids).status();
        }
    }
}

fn steps(report: &serde_json::Value) -> std::collections::BTreeMap<String, serde_json::Value> {
    report["steps"].as_array().unwrap().iter().map(|s| (s["name"].as_str().unwrap().to_string(), s.clone())).collect()
}

#[test]
fn a_fanout_pipeline_runs_as_jobs_and_an_unchanged_rerun_submits_none() {
    if !slurm_here() {
        return;
    }
    let c = Cluster::new("slurm-fanout");
    let tool = build(ImageBuilder::new("slurm-tool").kliko_yml(TOOL_YML).kliko_script(TOOL_SCRIPT));
    c.w.folder("obs", &[("a/x.txt", "ax"), ("b/x.txt", "bx"), ("c/x.txt", "cx")]);
    let file = c.w.file(
        "p.yml",
        &format!(
            "version: 1
resources: {{cpus: 1, memory: 64M, time: 10m}}
steps:
  split:
    image: {img}
    foreach: obs/
    params: {{tag: split}}
  combine:
    image: {img}
    input: split
    params: {{tag: combine}}
    resources: {{time: 5}}
  final:
    image: {img}
    input: combine
    params: {{tag: final}}
    output: out/
",
            img = tool.tag
        ),
    );
    let first = c.run(&file);
    first.ok();
    let r = first.json();
    let s = steps(&r);
    assert_eq!(r["containers"], 5, "{r}");
    for name in ["split", "combine", "final"] {
        assert_eq!(s[name]["state"], "done", "{name}: {}", s[name]);
        for run in s[name]["runs"].as_array().unwrap() {
            assert!(run["job"].as_str().is_some_and(|j| !j.is_empty()), "{run}");
        }
    }
    // The foreach step's three misses were one job array.
    let split_jobs: Vec<&str> =
        s["split"]["runs"].as_array().unwrap().iter().map(|r| r["job"].as_str().unwrap()).collect();
    let array = split_jobs[0].split('_').next().unwrap();
    assert!(split_jobs.iter().all(|j| j.starts_with(&format!("{array}_"))), "{split_jobs:?}");
    // The output, made on the "node", is placed here.
    let listing = read(&c.w.path("out/listing.txt"));
    assert!(listing.contains("split/a/listing.txt") || listing.contains("a/listing.txt"), "{listing}");
    assert_eq!(read(&c.w.path("out/tag.txt")).trim(), "final");
    let jobs = c.jobs();
    assert_eq!(jobs.len(), 5, "Slurm ran one job per miss: {jobs:?}");
    assert!(jobs.iter().all(|(_, st)| st == "COMPLETED"), "{jobs:?}");
    // The jobs used the node's store, not this one.
    assert!(c.w.path("node-store").join("FORMAT").exists());
    // The dispatcher's history says those runs happened (elsewhere), not that they were reused.
    let h = Out::of(c.w.kliko().args(["history", "--json"]));
    h.ok();
    let h: serde_json::Value = serde_json::from_str(&h.stdout).unwrap();
    let kinds: Vec<&str> = h.as_array().unwrap().iter().map(|e| e["cache"].as_str().unwrap()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "miss").count(), 5, "{kinds:?}");
    assert!(!kinds.contains(&"hit"), "{kinds:?}");

    // Unchanged: every step a hit, nothing submitted, no container.
    let since = docker_now();
    let again = c.run(&file);
    again.ok();
    let until = docker_now();
    let r = again.json();
    assert_eq!(r["containers"], 0, "{r}");
    assert!(steps(&r).values().all(|s| s["state"] == "cached"), "{r}");
    assert_eq!(c.jobs().len(), 5, "a cached re-run submits no job");
    assert_eq!(containers_created(&tool, &since, &until), 0);

    // One input changes: exactly the jobs downstream of it.
    std::fs::write(c.w.path("obs/b/x.txt"), "bx2").unwrap();
    let third = c.run(&file);
    third.ok();
    let r = third.json();
    let s = steps(&r);
    let ran: Vec<&str> = s["split"]["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["cache"] == "miss")
        .map(|x| x["entry"].as_str().unwrap())
        .collect();
    assert_eq!(ran, ["b"], "{r}");
    assert_eq!((s["combine"]["cache"].as_str(), s["final"]["cache"].as_str()), (Some("miss"), Some("miss")));
    assert_eq!(c.jobs().len(), 8, "three new jobs: {:?}", c.jobs());
    assert!(read(&c.w.path("out/listing.txt")).contains("bx2") || read(&c.w.path("out/listing.txt")).contains("b/"));
}

#[test]
fn a_step_past_its_time_limit_is_reported_with_its_log() {
    if !slurm_here() {
        return;
    }
    let c = Cluster::new("slurm-timeout");
    let tool = build(ImageBuilder::new("slurm-slow").kliko_yml(TOOL_YML).kliko_script(TOOL_SCRIPT));
    c.w.folder("in", &[("x.txt", "x")]);
    let file = c.w.file(
        "p.yml",
        &format!("version: 1\nsteps:\n  slow:\n    image: {}\n    input: in/\n    params: {{tag: slow, sleep: 400}}\n    resources: {{time: 1}}\n", tool.tag),
    );
    let out = c.run(&file);
    out.expect_code(1);
    let r = out.json();
    let slow = &steps(&r)["slow"];
    assert_eq!(slow["state"], "failed", "{r}");
    let reason = slow["reason"].as_str().unwrap();
    assert!(reason.contains("time limit"), "{reason}");
    let tail = slow["runs"][0]["log_tail"].as_array().unwrap();
    assert!(tail.iter().any(|l| l.as_str().unwrap().contains("tool slow starting")), "{tail:?}");
    assert!(out.stderr.contains("time limit"), "{}", out.stderr);
    let jobs = c.jobs();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].1, "TIMEOUT", "{jobs:?}");
    // Nothing recorded: the same pipeline runs it again (and fails again), never a hit.
    assert!(!c.tier.join("kliko-remote-v1/ac").read_dir().is_ok_and(|mut d| d.next().is_some()));
    wait_for("the timed-out container to be removed", Duration::from_secs(60), || containers_of(&tool).is_empty());
}

/// The pipeline started in the background; returns when `cond` holds of this test's jobs.
fn wait_for_jobs(c: &Cluster, what: &str, cond: impl Fn(&[(String, String)]) -> bool) -> Vec<(String, String)> {
    let mut last = Vec::new();
    for _ in 0..600 {
        last = c.jobs();
        if cond(&last) {
            return last;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}: {last:?}");
}

#[test]
fn a_job_cancelled_from_outside_is_reported() {
    if !slurm_here() {
        return;
    }
    let c = Cluster::new("slurm-scancel");
    let tool = build(ImageBuilder::new("slurm-cancelled").kliko_yml(TOOL_YML).kliko_script(TOOL_SCRIPT));
    c.w.folder("in", &[("x.txt", "x")]);
    let file = c.w.file(
        "p.yml",
        &format!(
            "version: 1\nsteps:\n  long:\n    image: {}\n    input: in/\n    params: {{tag: long, sleep: 300}}\n",
            tool.tag
        ),
    );
    let child = c
        .pipeline("slurm", &file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let jobs = wait_for_jobs(&c, "the job to run", |j| j.iter().any(|(_, s)| s == "RUNNING"));
    wait_for("the container to start", Duration::from_secs(60), || !running_kliko_containers(&tool).is_empty());
    assert!(Command::new("scancel").arg(&jobs[0].0).status().unwrap().success());
    let out = Out::from_output("kliko pipeline run".into(), child.wait_with_output().unwrap());
    out.expect_code(1);
    let r = out.json();
    let reason = steps(&r)["long"]["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("cancelled") && reason.contains(&jobs[0].0), "{reason}");
    wait_for("the cancelled container to be removed", Duration::from_secs(60), || containers_of(&tool).is_empty());
}

#[test]
fn ctrl_c_cancels_the_jobs_in_the_queue_and_records_nothing() {
    if !slurm_here() {
        return;
    }
    let c = Cluster::new("slurm-ctrlc");
    let tool = build(ImageBuilder::new("slurm-held").kliko_yml(TOOL_YML).kliko_script(TOOL_SCRIPT));
    c.w.folder("obs", &[("a/x.txt", "a"), ("b/x.txt", "b")]);
    let file = c.w.file("p.yml", &format!("version: 1\nsteps:\n  each:\n    image: {}\n    foreach: obs/\n", tool.tag));
    // Held jobs stay pending: the pipeline is waiting on the queue when it is stopped.
    let mut cmd = c.pipeline("slurm", &file);
    cmd.env("KLIKO_SLURM_ARGS", format!("--comment={} --hold", c.tag));
    let child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // One array of two tasks, held: Slurm lists it as one job until its tasks start.
    wait_for_jobs(&c, "the held array", |j| j.len() == 1 && j[0].1 == "PENDING");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = Out::from_output("kliko pipeline run".into(), child.wait_with_output().unwrap());
    out.expect_code(130);
    wait_for_jobs(&c, "the jobs to be cancelled", |j| !j.is_empty() && j.iter().all(|(_, s)| s == "CANCELLED"));
    assert!(out.stderr.contains("stopping"), "{}", out.stderr);
    assert!(!c.tier.join("kliko-remote-v1/ac").read_dir().is_ok_and(|mut d| d.next().is_some()));
    assert!(containers_of(&tool).is_empty());
}

/// Two pipeline files, `one.yml` and `two.yml`, whose first step `shared` (sleeping `sleep`
/// seconds) is the same run; each has a second step of its own.
fn sharing_pipelines(c: &Cluster, tool: &TestImage, sleep: u32) -> (PathBuf, PathBuf) {
    let body = |second: &str| {
        format!(
            "version: 1\nsteps:\n  shared:\n    image: {img}\n    input: in/\n    params: {{tag: shared, sleep: {sleep}}}\n  {second}:\n    image: {img}\n    input: shared\n    params: {{tag: {second}}}\n",
            img = tool.tag
        )
    };
    (c.w.file("one.yml", &body("first")), c.w.file("two.yml", &body("second")))
}

#[test]
fn two_pipelines_sharing_a_step_run_it_once() {
    if !slurm_here() {
        return;
    }
    let c = Cluster::new("slurm-shared");
    let tool = build(ImageBuilder::new("slurm-shared").kliko_yml(TOOL_YML).kliko_script(TOOL_SCRIPT));
    c.w.folder("in", &[("x.txt", "x")]);
    let (f1, f2) = sharing_pipelines(&c, &tool, 3);
    let since = docker_now();
    let a = c
        .pipeline("slurm", &f1)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let b = c
        .pipeline_in(&c.w.path("store-2"), "slurm", &f2)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let a = Out::from_output("one".into(), a.wait_with_output().unwrap());
    let b = Out::from_output("two".into(), b.wait_with_output().unwrap());
    a.ok();
    b.ok();
    let until = docker_now();
    // Three containers: the shared step once, and each pipeline's own second step (each
    // dispatcher submitted the shared step; the second job found the first's lease on the
    // tier, waited, and took its result).
    assert_eq!(containers_started(&tool, &since, &until), 3, "{}\n{}", a.stderr, b.stderr);
    assert_eq!(steps(&a.json())["shared"]["output"], steps(&b.json())["shared"]["output"]);
}

#[test]
fn a_dispatcher_follows_a_job_that_already_runs_its_step_instead_of_submitting_another() {
    if !slurm_here() {
        return;
    }
    let c = Cluster::new("slurm-follow");
    let tool = build(ImageBuilder::new("slurm-follow").kliko_yml(TOOL_YML).kliko_script(TOOL_SCRIPT));
    c.w.folder("in", &[("x.txt", "x")]);
    let (f1, f2) = sharing_pipelines(&c, &tool, 4);
    let since = docker_now();
    let a = c.pipeline("slurm", &f1).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn();
    let a = a.unwrap();
    // Once the first dispatcher's job leads the shared step on the tier, a second dispatcher
    // (another user's store) follows that job: it submits only its own second step.
    let leases = c.tier.join("kliko-remote-v1/leases");
    for _ in 0..600 {
        if std::fs::read_dir(&leases).is_ok_and(|mut d| d.next().is_some()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(std::fs::read_dir(&leases).is_ok_and(|mut d| d.next().is_some()), "the first job never led the step");
    let b = Out::of(&mut c.pipeline_in(&c.w.path("store-2"), "slurm", &f2));
    let a = Out::from_output("one".into(), a.wait_with_output().unwrap());
    a.ok();
    b.ok();
    let until = docker_now();
    let (sa, sb) = (steps(&a.json()), steps(&b.json()));
    assert!(sa["shared"]["runs"][0]["job"].as_str().is_some_and(|j| !j.is_empty()), "{}", a.stdout);
    assert!(sb["shared"]["runs"][0]["job"].is_null(), "the second dispatcher submitted the shared step: {}", b.stdout);
    assert!(sb["second"]["runs"][0]["job"].as_str().is_some_and(|j| !j.is_empty()), "{}", b.stdout);
    assert_eq!(sa["shared"]["output"], sb["shared"]["output"]);
    assert_eq!(sb["shared"]["runs"][0]["container"], false, "{}", b.stdout);
    // Three containers, and only three jobs: the shared step once, each pipeline's second.
    assert_eq!(containers_started(&tool, &since, &until), 3, "{}\n{}", a.stderr, b.stderr);
}

#[test]
fn a_file_parameter_reaches_a_node_that_does_not_see_the_dispatchers_files() {
    if !slurm_here() {
        return;
    }
    let c = Cluster::new("slurm-files");
    let tool = split_image(
        "slurm-files",
        "      - {name: cal, type: file}\n",
        "cat /param_files/cal > /output/cal.txt; echo calibrated",
    );
    c.w.folder("in", &[("x.txt", "x")]);
    let cal = c.w.file("private/cal.txt", "gains 1.5\n");
    let file = c.w.file(
        "p.yml",
        &format!("version: 1\nsteps:\n  calibrate:\n    image: {}\n    input: in/\n    params: {{cal: private/cal.txt}}\n    output: out/cal\n", tool.tag),
    );
    // The job is held until the dispatcher's copy of the file is out of every node's sight.
    let mut cmd = c.pipeline("slurm", &file);
    cmd.env("KLIKO_SLURM_ARGS", format!("--comment={} --hold", c.tag));
    let run = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let jobs = wait_for_jobs(&c, "the held job", |j| !j.is_empty());
    std::fs::rename(c.w.path("private"), c.w.path("moved-away")).unwrap();
    assert!(!cal.exists());
    let released = Command::new("scontrol").args(["release", &jobs[0].0]).status().unwrap();
    assert!(released.success());
    let out = Out::from_output("p".into(), run.wait_with_output().unwrap());
    out.ok();
    let s = steps(&out.json());
    assert!(s["calibrate"]["runs"][0]["job"].as_str().is_some_and(|j| !j.is_empty()), "{}", out.stdout);
    // The node ran the same key on the tier's copy of the file.
    assert_eq!(read(&c.w.path("out/cal/cal.txt")), "gains 1.5\n");
}

#[test]
fn problems_are_said_before_anything_is_submitted() {
    if !slurm_here() {
        return;
    }
    let c = Cluster::new("slurm-checks");
    let tool = build(ImageBuilder::new("slurm-checks").kliko_yml(TOOL_YML).kliko_script(TOOL_SCRIPT));
    c.w.folder("in", &[("x.txt", "x")]);
    let step = |res: &str| {
        format!("version: 1\nsteps:\n  one:\n    image: {}\n    input: in/\n    resources: {res}\n", tool.tag)
    };
    // A partition Slurm does not know: the step and its line.
    let file = c.w.file("p.yml", &step("{partition: nosuch}"));
    let out = c.run(&file);
    out.expect_code(2);
    assert!(
        out.stderr.contains("line 6") && out.stderr.contains("nosuch") && out.stderr.contains("`debug`"),
        "{}",
        out.stderr
    );
    // A malformed resource.
    let file = c.w.file("p.yml", &step("{memory: lots}"));
    let out = c.run(&file);
    out.expect_code(2);
    assert!(out.stderr.contains("line 6") && out.stderr.contains("lots"), "{}", out.stderr);
    // No shared tier.
    let file = c.w.file("p.yml", &step("{partition: other}"));
    let mut cmd = c.w.kliko();
    cmd.args(["pipeline", "run", "--executor", "slurm"]).arg(&file);
    let out = Out::of(&mut cmd);
    out.expect_code(2);
    assert!(out.stderr.contains("shared tier"), "{}", out.stderr);
    // Slurm's commands missing from PATH.
    let mut cmd = c.pipeline("slurm", &file);
    cmd.env("PATH", "/nonexistent");
    let out = Out::of(&mut cmd);
    out.expect_code(2);
    assert!(out.stderr.contains("not installed"), "{}", out.stderr);
    assert!(c.jobs().is_empty(), "nothing was submitted: {:?}", c.jobs());
    // And with everything right, the step runs on partition `other`.
    let out = c.run(&file);
    out.ok();
    let jobs = c.jobs();
    assert_eq!(jobs.len(), 1);
    let show = Command::new("scontrol").args(["show", "job", "-o", &jobs[0].0]).output().unwrap();
    assert!(String::from_utf8_lossy(&show.stdout).contains("Partition=other"));
}

#[test]
fn srun_runs_each_miss_inside_the_allocation() {
    if !slurm_here() {
        return;
    }
    let c = Cluster::new("slurm-srun");
    let tool = build(ImageBuilder::new("slurm-srun").kliko_yml(TOOL_YML).kliko_script(TOOL_SCRIPT));
    c.w.folder("in", &[("x.txt", "x")]);
    let file = c.w.file(
        "p.yml",
        &format!("version: 1\nsteps:\n  one:\n    image: {img}\n    input: in/\n    params: {{tag: one}}\n  two:\n    image: {img}\n    input: one\n    params: {{tag: two}}\n    output: out/\n", img = tool.tag),
    );
    let out = Out::of(&mut c.pipeline("srun", &file));
    out.ok();
    let r = out.json();
    assert_eq!(r["containers"], 2, "{r}");
    assert_eq!(read(&c.w.path("out/tag.txt")).trim(), "two");
    let again = Out::of(&mut c.pipeline("srun", &file));
    again.ok();
    assert_eq!(again.json()["containers"], 0);
}

/// A bare HTTP/1.1 exchange with `kliko serve` on loopback: (status, Location, body).
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("the server listens");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let location = head
        .lines()
        .find_map(|l| l.strip_prefix("location: ").or_else(|| l.strip_prefix("Location: ")))
        .unwrap_or("")
        .to_string();
    (status, location, body.to_string())
}

/// `kliko serve`, stopped when dropped.
struct Serve(std::process::Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_pipeline_run_from_the_web_interface_goes_to_slurm() {
    if !slurm_here() {
        return;
    }
    let c = Cluster::new("slurm-web");
    let tool = build(ImageBuilder::new("slurm-web-tool").kliko_yml(TOOL_YML).kliko_script(TOOL_SCRIPT));
    c.w.folder("data/obs", &[("a/x.txt", "ax"), ("b/x.txt", "bx")]);
    let file = c.w.file(
        "data/p.yml",
        &format!(
            "version: 1\nsteps:\n  each:\n    image: {img}\n    foreach: obs/\n    params: {{tag: each}}\n  all:\n    image: {img}\n    input: each\n    params: {{tag: all}}\n    output: out/\n",
            img = tool.tag
        ),
    );
    let file = std::fs::canonicalize(file).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    // The cluster's settings as `pipeline run` gets them, for `serve` instead.
    let cmd = c.pipeline("slurm", &file);
    let mut serve = Command::new(env!("CARGO_BIN_EXE_kliko"));
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => serve.env(k, v),
            None => serve.env_remove(k),
        };
    }
    serve.arg("--store").arg(&c.w.store).arg("--remote").arg(&c.tier);
    serve.args(["serve", "--bind", &addr, "--data-root"]).arg(c.w.path("data"));
    let _server = Serve(serve.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap());
    let page = format!("/pipeline{}", file.display());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let form = loop {
        if std::net::TcpStream::connect(&addr).is_ok() {
            break http(&addr, "GET", &page, "");
        }
        assert!(std::time::Instant::now() < deadline, "kliko serve did not start");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(form.0, 200, "{}", form.2);
    assert!(form.2.contains("<option value=\"slurm\">"), "the cluster is offered: {}", form.2);
    let csrf = form.2.split("name=\"csrf\" value=\"").nth(1).and_then(|r| r.split('"').next()).unwrap().to_string();
    let (status, location, body) = http(&addr, "POST", &page, &format!("csrf={csrf}&executor=slurm"));
    assert_eq!(status, 303, "{body}");
    assert!(location.starts_with("/pipeline-run/"), "{location}");
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    let done = loop {
        let (_, _, body) = http(&addr, "GET", &location, "");
        if !body.contains("badge running\">running</span></div></div>") {
            break body;
        }
        assert!(std::time::Instant::now() < deadline, "the pipeline run did not end: {body}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(done.contains("badge ok\">succeeded"), "{done}");
    assert!(done.contains("on slurm"), "{done}");
    assert!(done.contains("cluster job"), "the jobs are in the log: {done}");
    let jobs = c.jobs();
    assert_eq!(jobs.len(), 3, "one job per miss: {jobs:?}");
    assert!(jobs.iter().all(|(_, st)| st == "COMPLETED"), "{jobs:?}");
    assert_eq!(read(&c.w.path("data/out/tag.txt")).trim(), "all");
    // The history says where it ran and who started it.
    let h = Out::of(c.w.kliko().args(["pipeline", "history", "--json"]).arg(&file));
    h.ok();
    let run: serde_json::Value = serde_json::from_str(h.stdout.lines().next().unwrap()).unwrap();
    assert_eq!(
        (run["executor"].as_str(), run["via"].as_str(), run["ok"].as_bool()),
        (Some("slurm"), Some("web"), Some(true))
    );
    assert_no_containers(&tool);
}
