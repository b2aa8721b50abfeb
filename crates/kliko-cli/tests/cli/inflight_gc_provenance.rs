//! Identical runs in flight execute once; a dead leader's lease expires; gc is safe while
//! runs and hits happen; provenance by every kind of argument, with lineage.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use serde_json::Value;

/// Containers created between `since` and `until` from `image` that carry kliko's key label.
fn run_containers_created(image: &TestImage, since: &str, until: &str) -> usize {
    let out = std::process::Command::new("docker")
        .args(["events", "--since", since, "--until", until])
        .args(["--filter", "type=container", "--filter", "event=create", "--filter", "label=io.kliko.key"])
        .args(["--format", "{{.Actor.Attributes.image}}"])
        .output()
        .expect("docker events");
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| *l == image.id || *l == image.tag).count()
}

const SLOW: &str = "sleep 3\ncat /input/* > /output/all.txt\necho finished";

#[test]
fn eight_identical_runs_at_once_execute_one_container() {
    let w = World::new();
    let img = split_image("dedup8", "", SLOW);
    let input = w.folder("in", &[("a.txt", "alpha\n"), ("b.txt", "beta\n")]);
    let since = docker_now();
    let children: Vec<_> = (0..8)
        .map(|i| {
            let mut c = w.kliko();
            c.args(["run", &img.tag, "--json", "--quiet", "--input"])
                .arg(&input)
                .arg("--output")
                .arg(w.path(&format!("out{i}")));
            c.stdout(Stdio::piped()).stderr(Stdio::piped());
            (format!("{c:?}"), c.spawn().expect("spawn kliko"))
        })
        .collect();
    let outs: Vec<Out> =
        children.into_iter().map(|(cmd, ch)| Out::from_output(cmd, ch.wait_with_output().expect("wait"))).collect();
    let until = docker_now();
    for o in &outs {
        o.ok();
    }
    // Containers that ran the image (they carry the key label); each process may also have
    // created, never started, one container to copy /kliko.yml out of the image the first time.
    assert_eq!(run_containers_created(&img, &since, &until), 1, "exactly one container ran for 8 identical runs");
    let misses = outs.iter().filter(|o| o.cache() == "miss").count();
    assert_eq!(misses, 1, "one leader ran, the others took its result");
    assert!(outs.iter().filter(|o| o.json()["waited"] == Value::Bool(true)).count() >= 1);
    let first = read_tree(&w.path("out0"));
    assert_eq!(first.get("all.txt").map(|b| b.as_slice()), Some(&b"alpha\nbeta\n"[..]));
    for i in 1..8 {
        assert_eq!(read_tree(&w.path(&format!("out{i}"))), first, "output {i} differs");
    }
    assert_no_containers(&img);
}

#[test]
fn a_waiter_takes_over_when_the_leader_is_killed() {
    let w = World::new();
    let img = split_image("takeover", "", SLOW);
    let input = w.folder("in", &[("a.txt", "alpha\n")]);
    let (mut leader, waiter, err, seen) = leader_and_waiter(&w, &img, &input, &["--json"]);
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(leader.id() as i32, libc::SIGKILL) };
    leader.wait().expect("reap leader");
    let o = finish(waiter, err, seen);
    o.ok();
    assert_eq!(o.cache(), "miss", "the waiter ran it itself");
    assert_eq!(read(&w.path("out-waiter/all.txt")), "alpha\n");
    // The dead leader's container was removed by the one that took over.
    assert_no_containers(&img);
    let fsck = Out::of(w.kliko().args(["store", "fsck"]));
    fsck.ok();
    assert!(fsck.stdout.contains("store is consistent"), "{}", fsck.stdout);
}

#[test]
fn gc_in_a_loop_while_runs_and_hits_happen() {
    let w = Arc::new(World::new());
    let img = Arc::new(split_image(
        "gcloop",
        "      - name: n\n        type: int\n",
        "n=$(sed -n 's/.*\"n\": *\\([0-9]*\\).*/\\1/p' /parameters.json)\ncat /input/* > /output/all.txt\necho \"$n\" > /output/n.txt",
    ));
    let input = w.folder("in", &[("a.txt", "alpha\n")]);
    let stop = Arc::new(AtomicBool::new(false));
    let gc = {
        let (w, stop) = (w.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) || rounds == 0 {
                // No grace period: sweep everything unnamed, as hard as gc can.
                Out::of(w.kliko().args(["gc", "--max-size", "1", "--grace", "0s"])).ok();
                rounds += 1;
            }
            rounds
        })
    };
    let workers: Vec<_> = (0..3)
        .map(|t| {
            let (w, img, input) = (w.clone(), img.clone(), input.clone());
            std::thread::spawn(move || {
                for i in 0..6 {
                    let n = (t + i) % 3;
                    let out = w.path(&format!("out-{t}-{i}"));
                    let o =
                        w.run(&[&img.tag, &"--quiet", &"--input", &input, &"--output", &out, &"--n", &n.to_string()]);
                    o.ok();
                    assert_eq!(read(&out.join("n.txt")), format!("{n}\n"));
                    assert_eq!(read(&out.join("all.txt")), "alpha\n");
                }
            })
        })
        .collect();
    for t in workers {
        t.join().expect("worker");
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = gc.join().expect("gc thread");
    assert!(rounds >= 1);
    let fsck = Out::of(w.kliko().args(["store", "fsck"]));
    fsck.ok();
    assert!(fsck.stdout.contains("store is consistent"), "{}", fsck.stdout);
    assert_no_containers(&img);
}

fn prov(w: &World, arg: &str, extra: &[&str]) -> Value {
    let o = Out::of(w.kliko().args(["provenance", arg, "--json"]).args(extra));
    o.ok();
    serde_json::from_str(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", o.stdout))
}

fn run_keys(v: &Value) -> Vec<(u64, String)> {
    v["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| (r["depth"].as_u64().expect("depth"), r["result"]["key"].as_str().expect("key").to_string()))
        .collect()
}

#[test]
fn provenance_by_every_kind_of_argument_with_lineage() {
    let w = World::new();
    let step1 = split_image(
        "prov-step1",
        "      - name: scale\n        type: int\n        initial: 2\n",
        "for f in /input/*; do cat \"$f\"; done > /output/data.txt\necho step1 log",
    );
    let step2 = split_image("prov-step2", "", "wc -l < /input/data.txt > /output/summary.txt\necho step2 log");
    let input = w.folder("raw", &[("a.txt", "1\n2\n"), ("b.txt", "3\n")]);
    let r1 = w.run(&[&step1.tag, &"--json", &"--input", &input, &"--output", &w.path("out1"), &"--scale", &"3"]);
    r1.ok();
    let r2 = w.run(&[&step2.tag, &"--json", &"--input", &w.path("out1"), &"--output", &w.path("out2")]);
    r2.ok();
    let (k1, k2) = (r1.key(), r2.key());
    assert_eq!(read(&w.path("out2/summary.txt")).trim(), "3");

    // A path to a file: produced by step2, whose input came from step1.
    let v = prov(&w, &w.path("out2/summary.txt").to_string_lossy(), &[]);
    assert_eq!(v["kind"], "file");
    assert_eq!(run_keys(&v), vec![(0, k2.clone()), (1, k1.clone())]);
    let step1_run = &v["runs"][1];
    assert_eq!(step1_run["feeds"], Value::String(k2.clone()));
    assert_eq!(step1_run["result"]["parameters_given"]["scale"], 3);
    assert_eq!(step1_run["result"]["input_path"], Value::String(input.to_string_lossy().into_owned()));
    assert_eq!(step1_run["result"]["image_ref"], Value::String(step1.tag.clone()));
    assert_eq!(step1_run["result"]["image_id"], Value::String(step1.id.clone()));

    // --depth 0: no lineage.
    assert_eq!(
        run_keys(&prov(&w, &w.path("out2/summary.txt").to_string_lossy(), &["--depth", "0"])),
        vec![(0, k2.clone())]
    );
    // A path to a folder.
    let v = prov(&w, &w.path("out2").to_string_lossy(), &[]);
    assert_eq!(v["kind"], "tree");
    assert_eq!(run_keys(&v)[0], (0, k2.clone()));
    // The run key, and a prefix of it.
    assert_eq!(run_keys(&prov(&w, &k2, &["--depth", "0"])), vec![(0, k2.clone())]);
    assert_eq!(prov(&w, &k1[..10], &[])["kind"], "key");
    // The output tree digest and a file digest (full and as a prefix).
    let tree = r2.json()["output"].as_str().expect("output").to_string();
    assert_eq!(run_keys(&prov(&w, &tree, &["--depth", "0"])), vec![(0, k2.clone())]);
    let h = Out::of(w.kliko().args(["hash", "--json"]).arg(w.path("out1/data.txt")));
    h.ok();
    let file_digest =
        serde_json::from_str::<Value>(&h.stdout).expect("json")["digest"].as_str().expect("digest").to_string();
    let v = prov(&w, &file_digest[..12], &[]);
    assert_eq!(v["kind"], "file");
    assert_eq!(run_keys(&v)[0], (0, k1.clone()));
    // step1's output tree was step2's input.
    let v = prov(&w, r1.json()["output"].as_str().expect("output"), &["--depth", "0"]);
    assert_eq!(v["used_by"], Value::Array(vec![Value::String(k2.clone())]));

    // The lineage as a graph: raw input → step1 → its output → step2 → the file's tree.
    let o = Out::of(w.kliko().args(["provenance", "--dot"]).arg(w.path("out2/summary.txt")));
    o.ok();
    let dot = &o.stdout;
    let out1 = r1.json()["output"].as_str().expect("output").to_string();
    for edge in [
        format!("\"run:{k1}\" -> \"data:{out1}\""),
        format!("\"data:{out1}\" -> \"run:{k2}\""),
        format!("\"run:{k2}\" -> \"data:{tree}\""),
    ] {
        assert!(dot.contains(&edge), "{edge} missing from\n{dot}");
    }
    assert!(dot.contains(&step1.tag) && dot.contains(&input.to_string_lossy().into_owned()), "{dot}");
    assert_eq!(dot.matches("shape=box").count(), 2, "{dot}");
    // Graphviz itself reads it.
    let mut render = std::process::Command::new("dot")
        .arg("-Tsvg")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("graphviz `dot` (scripts/setup.sh installs it)");
    use std::io::Write;
    render.stdin.take().unwrap().write_all(dot.as_bytes()).unwrap();
    let svg = render.wait_with_output().unwrap();
    assert!(svg.status.success() && String::from_utf8_lossy(&svg.stdout).contains("<svg"), "dot refused:\n{dot}");

    // Unknown things are errors, not empty answers.
    let o = Out::of(w.kliko().args(["provenance", "0123456789abcdef"]));
    o.expect_code(2);
    assert!(o.stderr.contains("no stored run"), "{}", o.stderr);
    let o = Out::of(w.kliko().args(["provenance", "no-such-file.txt"]));
    o.expect_code(2);

    // show: the result and its stored logs; history: both runs.
    let o = Out::of(w.kliko().args(["show", &k1[..12]]));
    o.ok();
    assert!(o.stdout.contains("step1 log") && o.stdout.contains(&step1.id), "{}", o.stdout);
    let o = Out::of(w.kliko().args(["history", "--json"]));
    o.ok();
    let hist: Value = serde_json::from_str(&o.stdout).expect("json");
    assert_eq!(hist.as_array().expect("list").len(), 2);
    assert_eq!(hist[0]["key"], Value::String(k2.clone()), "newest first");

    // pin protects from gc; the unpinned result is evicted and its rerun is a miss.
    Out::of(w.kliko().args(["pin", &k1])).ok();
    let dry = Out::of(w.kliko().args(["gc", "--max-size", "1", "--dry-run", "--json"]));
    dry.ok();
    let dry: Value = serde_json::from_str(&dry.stdout).expect("json");
    assert_eq!(dry["evicted"], Value::Array(vec![Value::String(k2.clone())]));
    assert!(stored(&w, &[&step2.tag, &"--input", &w.path("out1")]), "dry run deleted nothing");
    Out::of(w.kliko().args(["gc", "--max-size", "1"])).ok();
    assert!(!stored(&w, &[&step2.tag, &"--input", &w.path("out1")]));
    assert!(stored(&w, &[&step1.tag, &"--input", &input, &"--scale", &"3"]), "pinned result kept");
    Out::of(w.kliko().args(["unpin", &k1])).ok();
    Out::of(w.kliko().args(["gc", "--max-size", "1"])).ok();
    assert!(!stored(&w, &[&step1.tag, &"--input", &input, &"--scale", &"3"]));
    let fsck = Out::of(w.kliko().args(["store", "fsck"]));
    fsck.ok();
    assert_no_containers(&step1);
    assert_no_containers(&step2);
}

/// Start a leader on `img` and a waiter; return the waiter once it reports that it waits.
// Both children are returned to the caller, who waits for them.
#[allow(clippy::zombie_processes)]
fn leader_and_waiter(
    w: &World,
    img: &TestImage,
    input: &std::path::Path,
    waiter_args: &[&str],
) -> (std::process::Child, std::process::Child, BufReader<std::process::ChildStderr>, String) {
    let mut leader = w.kliko();
    leader.args(["run", &img.tag, "--quiet", "--input"]).arg(input).arg("--output").arg(w.path("out-leader"));
    let leader = leader.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn leader");
    wait_for("the leader's container", Duration::from_secs(30), || !running_kliko_containers(img).is_empty());
    let mut waiter = w.kliko();
    waiter.args(["run", &img.tag, "--input"]).arg(input).arg("--output").arg(w.path("out-waiter")).args(waiter_args);
    let mut waiter = waiter.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn waiter");
    let mut err = BufReader::new(waiter.stderr.take().expect("stderr"));
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(err.read_line(&mut line).expect("read stderr") > 0, "waiter ended before waiting: {seen}");
        seen.push_str(&line);
        if line.contains("waiting for its result") {
            return (leader, waiter, err, seen);
        }
    }
}

fn finish(child: std::process::Child, mut err: BufReader<std::process::ChildStderr>, seen: String) -> Out {
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).expect("stderr");
    let out = child.wait_with_output().expect("wait");
    Out::from_output(
        "waiter".into(),
        std::process::Output { status: out.status, stdout: out.stdout, stderr: format!("{seen}{rest}").into_bytes() },
    )
}

#[test]
fn a_failed_leader_is_reported_to_its_waiters_with_its_log() {
    let w = World::new();
    let img = split_image("leaderfail", "", "echo 'calibration diverged' >&2\nsleep 3\nexit 3");
    let input = w.folder("in", &[("a.txt", "alpha\n")]);

    // Default: the waiter reports the leader's failure and its log; it runs nothing itself.
    let since = docker_now();
    let (leader, waiter, err, seen) = leader_and_waiter(&w, &img, &input, &[]);
    let o = finish(waiter, err, seen);
    let lo = leader.wait_with_output().expect("leader");
    assert_eq!(lo.status.code(), Some(3));
    o.expect_code(3);
    assert!(o.stderr.contains("waited on failed") && o.stderr.contains("calibration diverged"), "{}", o.stderr);
    assert!(o.stderr.contains("--retry-failed"), "{}", o.stderr);
    assert_eq!(run_containers_created(&img, &since, &docker_now()), 1);

    // --retry-failed: the waiter runs it once more itself (and it fails again).
    let since = docker_now();
    let (leader, waiter, err, seen) = leader_and_waiter(&w, &img, &input, &["--retry-failed"]);
    let o = finish(waiter, err, seen);
    leader.wait_with_output().expect("leader");
    o.expect_code(3);
    assert_eq!(run_containers_created(&img, &since, &docker_now()), 2);
    assert_no_containers(&img);
}

#[test]
fn a_waiter_shows_the_leaders_logs_as_they_come() {
    let w = World::new();
    let img = split_image(
        "waiterlogs",
        "",
        "echo 'first line, before the waiter came'\nsleep 2\necho 'second line, on stderr' >&2\nsleep 1\ncp -r /input/. /output/",
    );
    let input = w.folder("in", &[("a.txt", "alpha\n")]);
    let (leader, waiter, err, seen) = leader_and_waiter(&w, &img, &input, &[]);
    let o = finish(waiter, err, seen);
    o.ok();
    assert!(leader.wait_with_output().expect("leader").status.success());
    assert!(o.stdout.contains("first line, before the waiter came"), "stdout: {}", o.stdout);
    assert!(o.stderr.contains("second line, on stderr"), "stderr: {}", o.stderr);
    assert_eq!(read(&w.path("out-waiter/a.txt")), "alpha\n");
    assert_no_containers(&img);
}

#[test]
fn a_leader_whose_output_cannot_be_stored_tells_its_waiters() {
    let w = World::new();
    // Exit 0, but a FIFO in the output: the store refuses it, and the run is an error.
    let img = split_image("leaderstorefail", "", "sleep 3\nmkfifo /output/pipe");
    let input = w.folder("in", &[("a.txt", "alpha\n")]);
    let since = docker_now();
    let (leader, waiter, err, seen) = leader_and_waiter(&w, &img, &input, &[]);
    let o = finish(waiter, err, seen);
    let lo = leader.wait_with_output().expect("leader");
    let leader_err = String::from_utf8_lossy(&lo.stderr);
    assert_eq!(lo.status.code(), Some(2), "{leader_err}");
    assert!(leader_err.contains("pipe"), "the leader names the path: {leader_err}");
    o.expect_code(2);
    assert!(o.stderr.contains("waited on failed") && o.stderr.contains("pipe"), "{}", o.stderr);
    assert_eq!(run_containers_created(&img, &since, &docker_now()), 1, "the waiter did not run it again");
    assert_no_containers(&img);
}

#[test]
fn ctrl_c_on_a_waiter_stops_only_that_waiter() {
    let w = World::new();
    let img = split_image("waitercancel", "", SLOW);
    let input = w.folder("in", &[("a.txt", "alpha\n")]);
    let (leader, waiter, err, seen) = leader_and_waiter(&w, &img, &input, &[]);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(waiter.id() as i32, libc::SIGINT) };
    let o = finish(waiter, err, seen);
    assert_eq!(o.code, 130, "{}", o.stderr);
    let lo = leader.wait_with_output().expect("leader");
    assert!(lo.status.success(), "the leader went on: {}", String::from_utf8_lossy(&lo.stderr));
    assert_eq!(read(&w.path("out-leader/all.txt")), "alpha\n");
    assert!(!w.path("out-waiter").exists());
    assert_no_containers(&img);
}

const CAT_ALL: &str = "cat /input/* > /output/all.txt";

/// The key `kliko run IMG --input INPUT` would have (from `--explain --json`).
fn explained_key(w: &World, img: &TestImage, input: &std::path::Path) -> String {
    let o = w.run(&[&img.tag, &"--json", &"--input", &input, &"--explain"]);
    o.ok();
    let v: Value = serde_json::from_str(&o.stdout).expect("--explain --json prints JSON");
    v["key"].as_str().expect("a key").to_string()
}

fn os(bytes: &[u8]) -> std::path::PathBuf {
    use std::os::unix::ffi::OsStrExt;
    std::path::PathBuf::from(std::ffi::OsStr::from_bytes(bytes))
}

#[test]
fn a_folder_whose_name_is_not_utf8_is_the_folder_that_runs() {
    let w = World::new();
    let img = split_image("nonutf8", "", CAT_ALL);
    // `obs\xe9` and the UTF-8 of U+FFFD, which a lossy conversion turns the first one into.
    let latin1 = w.dir.path().join(os(b"obs\xe9"));
    let replacement = w.dir.path().join(os(b"obs\xef\xbf\xbd"));
    for (dir, text) in [(&latin1, "latin-1 name\n"), (&replacement, "replacement character\n")] {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("a.txt"), text).unwrap();
    }
    let out1 = w.dir.path().join(os(b"out\xe9"));
    let o = w.run(&[&img.tag, &"--json", &"--input", &latin1, &"--output", &out1]);
    o.ok();
    assert_eq!(read(&out1.join("all.txt")), "latin-1 name\n", "the container saw another folder");
    let out2 = w.path("out2");
    let o2 = w.run(&[&img.tag, &"--json", &"--input", &replacement, &"--output", &out2]);
    o2.ok();
    assert_eq!(o2.cache(), "miss", "two different inputs share a key");
    assert_eq!(read(&out2.join("all.txt")), "replacement character\n");
    // And the first is a hit that gives its own content back.
    let out3 = w.path("out3");
    let o3 = w.run(&[&img.tag, &"--json", &"--input", &latin1, &"--output", &out3]);
    assert_eq!(o3.cache(), "hit");
    assert_eq!(read(&out3.join("all.txt")), "latin-1 name\n");
    assert_no_containers(&img);
}

#[test]
fn a_store_whose_path_is_not_utf8_is_refused_before_anything_runs() {
    let w = World::new();
    let img = split_image("nonutf8store", "", CAT_ALL);
    let input = w.folder("in", &[("a.txt", "alpha\n")]);
    let store = w.dir.path().join(os(b"store\xe9"));
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_kliko"));
    c.env_remove("KLIKO_STORE").arg("--store").arg(&store);
    c.args(["run", &img.tag, "--input"]).arg(&input).arg("--output").arg(w.path("out"));
    let o = Out::of(&mut c);
    o.expect_code(2);
    assert!(o.stderr.contains("not valid UTF-8"), "{}", o.stderr);
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
    assert!(!w.path("out").exists());
    assert_no_containers(&img);
}

#[test]
fn a_lost_index_stops_every_command_until_it_is_repaired() {
    let w = World::new();
    let img = split_image("lostindex", "", CAT_ALL);
    let input = w.folder("in", &[("a.txt", "alpha\n")]);
    w.run(&[&img.tag, &"--quiet", &"--input", &input, &"--output", &w.path("out1")]).ok();
    Out::of(w.kliko().args(["pin", &explained_key(&w, &img, &input)])).ok();
    std::fs::remove_file(w.store.join("index-v1/CURRENT")).unwrap();
    let o = w.run(&[&img.tag, &"--input", &input, &"--output", &w.path("out2")]);
    o.expect_code(2);
    assert!(o.stderr.contains("index") && o.stderr.contains("missing"), "{}", o.stderr);
    assert!(o.stderr.contains("kliko store repair"), "no way out offered: {}", o.stderr);
    assert!(!w.path("out2").exists());
    Out::of(w.kliko().args(["history"])).expect_code(2);
    let r = Out::of(w.kliko().args(["store", "repair"]));
    r.ok();
    assert!(r.stdout.contains("results"), "{}", r.stdout);
    // Everything is back: the run is a hit, the pin is kept.
    let o = w.run(&[&img.tag, &"--json", &"--input", &input, &"--output", &w.path("out3")]);
    assert_eq!(o.cache(), "hit");
    let stats = Out::of(w.kliko().args(["store", "stats", "--json"]));
    let stats: Value = serde_json::from_str(&stats.ok().stdout).expect("stats --json prints JSON");
    assert_eq!(stats["pinned"], 1, "{stats}");
    assert_no_containers(&img);
}

/// `docker create` a never-started container labelled as a run of `key` in `w`'s store.
fn labelled_container(w: &World, img: &TestImage, key: &str) -> String {
    let out = std::process::Command::new("docker")
        .args(["create", "--network", "none", "--label", "io.kliko.managed=true"])
        .arg("--label")
        .arg(format!("io.kliko.key={key}"))
        .arg("--label")
        .arg(format!("io.kliko.store={}", std::path::absolute(&w.store).unwrap().display()))
        .args([&img.id, "/kliko"])
        .output()
        .expect("docker create");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn exists(container: &str) -> bool {
    std::process::Command::new("docker").args(["inspect", container]).output().is_ok_and(|o| o.status.success())
}

#[test]
fn a_container_created_after_its_leader_died_is_removed() {
    let w = World::new();
    let img = split_image("latecreate", "", &format!("sleep 2\n{CAT_ALL}"));
    let input = w.folder("in", &[("a.txt", "alpha\n")]);
    let key = explained_key(&w, &img, &input);
    // A leader that died holding the lease (its name is still in the lease file) ...
    std::fs::create_dir_all(w.store.join("leases")).unwrap();
    std::fs::write(
        w.store.join(format!("leases/{key}.lock")),
        r#"{"pid":4194303,"host":"gone","started_at":"2026-01-01T00:00:00Z"}"#,
    )
    .unwrap();
    let early = labelled_container(&w, &img, &key);
    let mut run = w.kliko();
    run.args(["run", &img.tag, "--quiet", "--input"]).arg(&input).arg("--output").arg(w.path("out"));
    let child = run.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // ... and whose create request reached the daemon only after the new leader looked.
    wait_for("the new leader's container", Duration::from_secs(30), || !running_kliko_containers(&img).is_empty());
    let late = labelled_container(&w, &img, &key);
    Out::from_output(format!("{run:?}"), child.wait_with_output().unwrap()).ok();
    assert!(!exists(&early), "the orphan found before the run was left");
    assert!(!exists(&late), "the orphan created during the run was left");
    assert_no_containers(&img);
}

#[test]
fn gc_removes_containers_whose_run_is_over_and_only_those() {
    let w = World::new();
    let img = split_image("gccontainers", "", CAT_ALL);
    let input = w.folder("in", &[("a.txt", "alpha\n")]);
    w.run(&[&img.tag, &"--quiet", &"--input", &input, &"--output", &w.path("out")]).ok();
    let dead = labelled_container(&w, &img, &"ab".repeat(32));
    // A run in progress: its lease is held (here, by this test).
    let live_key = "cd".repeat(32);
    let live = labelled_container(&w, &img, &live_key);
    let lease = std::fs::File::create(w.store.join(format!("leases/{live_key}.lock"))).unwrap();
    // SAFETY: flock on a file we own.
    assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lease), libc::LOCK_EX) }, 0);
    let o = Out::of(w.kliko().args(["gc", "--max-size", "100g"]));
    o.ok();
    assert!(o.stdout.contains("removed 1 containers"), "{}", o.stdout);
    assert!(!exists(&dead), "a dead run's container was left");
    assert!(exists(&live), "a live run's container was removed");
    drop(lease);
    kliko_testkit::remove_containers(&[live]);
    assert_no_containers(&img);
}
