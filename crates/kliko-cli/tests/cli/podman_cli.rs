//! `kliko --runtime podman` against real rootless Podman, as an unprivileged user
//! (`scripts/with-podman.sh` makes one, with the containers.conf this machine needs, and runs
//! this test binary as that user). kliko finds no Podman socket of the user's, so it starts
//! `podman system service` itself for each command and stops it after.
//!
//! Images are built with Docker (the user is in the `docker` group, so that one run can be
//! compared with Docker's) and copied across with `docker save | podman load`, which keeps
//! their image ID. Without `KLIKO_TEST_PODMAN` (set by `scripts/with-podman.sh`) every test
//! says it is skipped.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

fn podman_here() -> bool {
    if std::env::var_os("KLIKO_TEST_PODMAN").is_none() {
        eprintln!("skipped: no rootless Podman (run under `bash scripts/with-podman.sh`)");
        return false;
    }
    assert_ne!(unsafe { libc::getuid() }, 0, "the Podman tests run as an unprivileged user");
    true
}

/// A test image in Podman's store too (removed from it on drop; the Docker copy goes with
/// the `TestImage`).
struct PodImage {
    img: TestImage,
}

impl Drop for PodImage {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rmi", "--force", &self.img.id]).output();
    }
}

fn podman_image(b: ImageBuilder) -> PodImage {
    let img = build(b);
    let mut save = Command::new("docker").args(["save", &img.tag]).stdout(Stdio::piped()).spawn().expect("docker save");
    let load = Command::new("podman")
        .args(["load", "--quiet"])
        .stdin(save.stdout.take().expect("docker save's output"))
        .output()
        .expect("podman load");
    assert!(save.wait().expect("docker save ends").success(), "docker save failed");
    assert!(load.status.success(), "podman load: {}", String::from_utf8_lossy(&load.stderr));
    PodImage { img }
}

fn split(prefix: &str, fields_yml: &str, script: &str) -> PodImage {
    podman_image(ImageBuilder::new(prefix).kliko_yml(&spec_yml(4, "split", fields_yml)).kliko_script(script))
}

/// `kliko --runtime podman --store STORE`.
fn kliko(w: &World) -> Command {
    let mut c = w.kliko();
    c.env_remove("DOCKER_HOST").arg("--runtime").arg("podman");
    c
}

fn run(w: &World, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Out {
    let mut c = kliko(w);
    c.arg("run");
    for a in args {
        c.arg(a.as_ref());
    }
    Out::of(&mut c)
}

/// Podman containers (any state) made from `image`: there must be none once a run is done.
fn podman_containers(image: &PodImage) -> Vec<String> {
    podman_ps(image, &[])
}

/// The running ones (not the container made, never started, to read its kliko.yml).
fn running_podman_containers(image: &PodImage) -> Vec<String> {
    podman_ps(image, &["--filter", "status=running"])
}

fn podman_ps(image: &PodImage, filters: &[&str]) -> Vec<String> {
    let out = Command::new("podman")
        .args([
            "ps",
            "--all",
            "--no-trunc",
            "--filter",
            "label=io.kliko.managed=true",
            "--format",
            "{{.ID}} {{.ImageID}}",
        ])
        .args(filters)
        .output()
        .expect("podman ps");
    assert!(out.status.success(), "podman ps: {}", String::from_utf8_lossy(&out.stderr));
    let id = image.img.id.trim_start_matches("sha256:");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, image)| image.trim_start_matches("sha256:") == id)
        .map(|(c, _)| c.to_string())
        .collect()
}

/// No `podman system service` of this user's left running.
fn no_service_left() {
    let out = Command::new("pgrep")
        .args(["-u", &unsafe { libc::getuid() }.to_string(), "-f", "podman system service"])
        .output();
    if let Ok(o) = out {
        let left = String::from_utf8_lossy(&o.stdout).trim().to_string();
        assert!(left.is_empty(), "a podman service is still running: {left}");
    }
}

fn owner(p: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).expect("stat").uid()
}

const PARAMS: &str = "      - {name: tag, type: str, initial: x}\n      - {name: mask, type: file, required: false}\n";

#[test]
fn a_split_run_with_a_file_parameter_belongs_to_the_user_and_hits_the_second_time() {
    if !podman_here() {
        return;
    }
    let img = split(
        "podman-split",
        PARAMS,
        "id -u > /output/uid; cat /param_files/mask > /output/mask; ls /input > /output/listing; echo made",
    );
    let w = World::new();
    let input = w.folder("in", &[("a.txt", "a"), ("b.txt", "b")]);
    let mask = w.file("mask.txt", "the mask");
    let out = w.path("out");
    let o = run(&w, &[&img.img.tag, &"--input", &input, &"--output", &out, &"--mask", &mask, &"--json"]);
    o.ok();
    assert_eq!(o.cache(), "miss");
    let me = unsafe { libc::getuid() };
    assert_eq!(read(&out.join("uid")).trim(), me.to_string(), "the container runs as the invoking user");
    assert_eq!(owner(&out.join("mask")), me, "outputs belong to the invoking user");
    assert_eq!(read(&out.join("mask")), "the mask");
    assert_eq!(read(&out.join("listing")), "a.txt\nb.txt\n");
    assert!(podman_containers(&img).is_empty());
    // Provenance names the runtime.
    let key = o.key();
    let show = Out::of(kliko(&w).args(["show", &key]));
    show.ok();
    assert!(show.stdout.contains("runtime:     podman") && show.stdout.contains("(rootless)"), "{}", show.stdout);
    let again = run(&w, &[&img.img.tag, &"--input", &input, &"--output", &w.path("out2"), &"--mask", &mask, &"--json"]);
    again.ok();
    assert_eq!(again.cache(), "hit");
    assert_eq!(read(&w.path("out2/mask")), "the mask");
    no_service_left();
}

#[test]
fn a_join_run_changes_only_its_private_copy_until_it_succeeds() {
    if !podman_here() {
        return;
    }
    let img = podman_image(
        ImageBuilder::new("podman-join")
            .kliko_yml(&spec_yml(4, "join", ""))
            .kliko_script("cat /work/n > /work/m; echo added >> /work/m; rm /work/n"),
    );
    let w = World::new();
    let work = w.folder("work", &[("n", "one\n")]);
    let o = run(&w, &[&img.img.tag, &"--work", &work, &"--json"]);
    o.ok();
    assert_eq!(read(&work.join("m")), "one\nadded\n");
    assert!(!work.join("n").exists());
    assert_eq!(owner(&work.join("m")), unsafe { libc::getuid() });
    assert!(podman_containers(&img).is_empty());
}

#[test]
fn a_failing_image_keeps_its_exit_code_and_caches_nothing() {
    if !podman_here() {
        return;
    }
    // Podman's `--rm` loses exit codes: kliko never asks for it.
    let img = split("podman-fail", "", "echo partial > /output/partial; echo 'the last words' >&2; exit 3");
    let w = World::new();
    let input = w.folder("in", &[("a", "a")]);
    let o = run(&w, &[&img.img.tag, &"--input", &input, &"--output", &w.path("out"), &"--json"]);
    o.expect_code(3);
    assert_eq!(o.json()["status"], "failed");
    assert!(o.stderr.contains("the last words"), "{}", o.stderr);
    assert!(!w.path("out/partial").exists(), "a failed run places nothing");
    let again = run(&w, &[&img.img.tag, &"--input", &input, &"--output", &w.path("out"), &"--json"]);
    again.expect_code(3);
    assert_eq!(again.json()["cache"], "miss", "a failure is never a hit");
    assert!(podman_containers(&img).is_empty());
}

#[test]
fn a_timeout_stops_the_container() {
    if !podman_here() {
        return;
    }
    let img = split("podman-timeout", "", "echo started; sleep 600");
    let w = World::new();
    let input = w.folder("in", &[]);
    let t0 = std::time::Instant::now();
    let o = run(&w, &[&img.img.tag, &"--input", &input, &"--output", &w.path("out"), &"--timeout", &"2s", &"--json"]);
    o.expect_code(124);
    assert!(t0.elapsed() < Duration::from_secs(60), "took {:?}", t0.elapsed());
    assert_eq!(o.json()["status"], "timed_out");
    assert!(podman_containers(&img).is_empty());
}

#[test]
fn ctrl_c_stops_and_removes_the_container_and_records_nothing() {
    if !podman_here() {
        return;
    }
    let img = split("podman-sigint", "", "echo started; sleep 600; echo never > /output/never");
    let w = World::new();
    let input = w.folder("in", &[]);
    let out = w.path("out");
    let mut child = kliko(&w)
        .arg("run")
        .arg(&img.img.tag)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&out)
        .arg("--json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kliko");
    wait_for("the container to run", Duration::from_secs(60), || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("kliko exited early: {status}");
        }
        !running_podman_containers(&img).is_empty()
    });
    // SAFETY: a plain kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) }, 0);
    let o = Out::from_output("kliko run (interrupted)".into(), child.wait_with_output().expect("kliko finishes"));
    assert_ne!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.json()["status"], "cancelled");
    assert!(!out.join("never").exists());
    assert!(podman_containers(&img).is_empty());
    let again = run(&w, &[&img.img.tag, &"--input", &input, &"--output", &out, &"--explain", &"--json"]);
    again.ok();
    assert_eq!(serde_json::from_str::<serde_json::Value>(&again.stdout).unwrap()["stored"], false);
    no_service_left();
}

#[test]
fn containers_have_no_network() {
    if !podman_here() {
        return;
    }
    let img = split("podman-net", "", "ls /sys/class/net > /output/interfaces");
    let w = World::new();
    let input = w.folder("in", &[]);
    run(&w, &[&img.img.tag, &"--input", &input, &"--output", &w.path("out")]).ok();
    assert_eq!(read(&w.path("out/interfaces")), "lo\n", "only loopback inside");
}

#[test]
fn a_result_made_under_docker_is_a_hit_under_podman() {
    if !podman_here() {
        return;
    }
    let img = split("podman-shared", PARAMS, "echo made by $(id -u) > /output/made");
    let w = World::new();
    let input = w.folder("in", &[("a", "a")]);
    let args: [&dyn AsRef<std::ffi::OsStr>; 8] =
        [&img.img.tag, &"--input", &input, &"--output", &w.path("out1"), &"--tag", &"same", &"--json"];
    // Under Docker: a miss, a container.
    let docker = w.run(&args);
    docker.ok();
    assert_eq!(docker.cache(), "miss");
    // Under Podman: the same key, a hit, no container.
    let args: [&dyn AsRef<std::ffi::OsStr>; 8] =
        [&img.img.tag, &"--input", &input, &"--output", &w.path("out2"), &"--tag", &"same", &"--json"];
    let podman = run(&w, &args);
    podman.ok();
    assert_eq!((podman.cache(), podman.key()), ("hit".to_string(), docker.key()));
    assert_eq!(read(&w.path("out2/made")), read(&w.path("out1/made")));
    assert!(podman_containers(&img).is_empty());
}

#[test]
fn an_image_only_docker_has_is_an_error_that_says_how_to_copy_it() {
    if !podman_here() {
        return;
    }
    let img = build(ImageBuilder::new("podman-missing").kliko_yml(&spec_yml(4, "split", "")).kliko_script("true"));
    let w = World::new();
    let input = w.folder("in", &[]);
    let o = run(&w, &[&img.tag, &"--input", &input, &"--output", &w.path("out")]);
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("not found locally"), "{}", o.stderr);
    assert!(o.stderr.contains(&format!("docker save {} | podman load", img.tag)), "{}", o.stderr);
    assert!(!w.path("out").exists());
    no_service_left();
}

#[test]
fn a_gpu_request_on_a_machine_without_gpus_fails_before_anything_starts() {
    if !podman_here() {
        return;
    }
    if !kliko_runtime::gpu::present().is_empty() {
        eprintln!("skipped: this machine has GPUs");
        return;
    }
    let img = split("podman-gpu", "", "echo ran > /output/ran");
    let w = World::new();
    let input = w.folder("in", &[]);
    let o = run(&w, &[&img.img.tag, &"--input", &input, &"--output", &w.path("out"), &"--gpus", &"all"]);
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("asks for all GPUs") && o.stderr.contains("no NVIDIA GPU"), "{}", o.stderr);
    assert!(!w.path("out").exists());
    assert!(podman_containers(&img).is_empty());
}

#[test]
fn a_pipeline_runs_each_step_under_its_own_runtime() {
    if !podman_here() {
        return;
    }
    let img = split(
        "podman-pipe",
        "      - {name: tag, type: str, initial: x}\n",
        "ls /input > /output/seen-by-$(id -u); cp /input/*.txt /output/",
    );
    let w = World::new();
    w.folder("in", &[("a.txt", "a")]);
    let file = w.file(
        "p.yml",
        &format!(
            "version: 1\nruntime: podman\nsteps:\n  first:\n    image: {t}\n    input: in/\n    params: {{tag: one}}\n    runtime: docker\n  second:\n    image: {t}\n    input: first\n    params: {{tag: two}}\n    output: out/\n",
            t = img.img.tag
        ),
    );
    // The command line says nothing: the file's runtimes decide.
    let mut c = w.kliko();
    c.env_remove("DOCKER_HOST").args(["pipeline", "run"]).arg(&file).arg("--json");
    let o = Out::of(&mut c);
    o.ok();
    let report = o.json();
    assert_eq!(report["containers"], 2, "{}", o.stdout);
    let key_of = |step: &str| -> String {
        report["steps"].as_array().unwrap().iter().find(|s| s["name"] == step).unwrap()["runs"][0]["key"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let runtime_of = |step: &str| {
        let show = Out::of(w.kliko().args(["show", &key_of(step)]));
        show.ok();
        show.stdout.lines().find(|l| l.contains("runtime:")).unwrap_or_default().to_string()
    };
    assert!(runtime_of("first").contains("docker"), "{}", runtime_of("first"));
    assert!(runtime_of("second").contains("podman") && runtime_of("second").contains("rootless"));
    assert!(w.path("out/a.txt").exists());
    assert!(podman_containers(&img).is_empty());
}
