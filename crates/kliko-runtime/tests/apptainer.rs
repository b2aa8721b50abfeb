//! The Apptainer runtime. Apptainer is not packaged for this machine, so these tests give
//! kliko a stand-in `apptainer` program (a shell script that checks what it is handed and
//! behaves as told) while everything on kliko's side is real: the image exported from the
//! real Docker daemon into the SIF cache, the exact command line and environment, the logs,
//! exit codes, timeouts and cancellation of a real process group. Where a real `apptainer`
//! is on PATH, `a_real_apptainer_runs_a_kliko_image` runs a kliko image through it.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use kliko_runtime::apptainer::{Apptainer, SIF_DIR};
use kliko_runtime::{ContainerRuntime, ContainerSpec, Mount, Outcome};
use kliko_testkit::{ImageBuilder, TestImage};
use tokio_util::sync::CancellationToken;

/// A stand-in for `apptainer` in `dir`: `build` checks that it was given a real `docker save`
/// archive; `exec` records its arguments and `APPTAINERENV_*` environment, writes to both
/// streams and then does what `APPTAINERENV_MODE` says.
fn fake_apptainer(dir: &Path) -> std::path::PathBuf {
    let script = format!(
        r#"#!/bin/sh
d='{d}'
case "$1" in
--version) echo "apptainer version 0.0-stand-in" ;;
build)
  echo "$@" >> "$d/build.log"
  tar=${{4#docker-archive:}}
  tar -tf "$tar" | grep -qx manifest.json || {{ echo "not a docker-save archive: $tar" >&2; exit 8; }}
  echo sif > "$3" ;;
exec)
  printf '%s\n' "$@" > "$d/exec.args"
  env | grep '^APPTAINERENV_' | sort > "$d/exec.env"
  echo "to stdout"
  echo "to stderr" >&2
  case "$APPTAINERENV_MODE" in
  sleep) trap 'echo got TERM >&2; exit 143' TERM; sleep 60 & wait ;;
  fail) exit 7 ;;
  esac ;;
*) echo "unexpected: $*" >&2; exit 99 ;;
esac
"#,
        d = dir.display()
    );
    let path = dir.join("apptainer");
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn image() -> TestImage {
    ImageBuilder::new("rt-apptainer")
        .kliko_yml("schema_version: 4\nio: split\nsections: []\n")
        .kliko_script("true")
        .build()
        .expect("build image")
}

fn spec_for(img: &TestImage, mode: &str, host: &Path) -> ContainerSpec {
    // SAFETY: getuid/getgid cannot fail.
    let me = unsafe { format!("{}:{}", libc::getuid(), libc::getgid()) };
    ContainerSpec {
        image_id: img.id.clone(),
        cmd: vec!["/kliko".into()],
        env: vec![("MODE".into(), mode.into()), ("INPUT".into(), "/input".into())],
        mounts: vec![
            Mount { host: host.join("in"), container: "/input".into(), read_only: true },
            Mount { host: host.join("out"), container: "/output".into(), read_only: false },
        ],
        user: Some(me),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_run_builds_the_sif_once_and_hands_apptainer_the_contract() {
    let img = image();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let rt = Apptainer::with_program(&fake_apptainer(dir.path()), &store).await.unwrap();
    assert_eq!(rt.describe(), "apptainer version 0.0-stand-in");
    let info = rt.inspect_image(&img.tag).await.unwrap();
    assert_eq!(info.id, img.id, "the image keeps its Docker ID");
    // Its kliko.yml is kept beside the SIF: a machine without Docker can read it.
    assert_eq!(rt.read_file(&img.id, "/kliko.yml").await.unwrap(), b"schema_version: 4\nio: split\nsections: []\n");

    let spec = spec_for(&img, "ok", dir.path());
    let run = run_collect(&rt, &spec, CancellationToken::new()).await;
    assert_eq!(run.outcome(), Outcome::Exited(0));
    assert_eq!((run.stdout(), run.stderr()), ("to stdout\n".to_string(), "to stderr\n".to_string()));
    let hex = img.id.trim_start_matches("sha256:");
    let sif = store.join(SIF_DIR).join(format!("{hex}.sif"));
    assert!(sif.is_file(), "the SIF is cached under the image ID");
    let args = std::fs::read_to_string(dir.path().join("exec.args")).unwrap();
    let want = format!(
        "exec\n--containall\n--cleanenv\n--no-home\n--writable-tmpfs\n--net\n--network\nnone\n--bind\n{d}/in:/input:ro\n--bind\n{d}/out:/output\n{sif}\n/kliko\n",
        d = dir.path().display(),
        sif = sif.display()
    );
    assert_eq!(args, want);
    let env = std::fs::read_to_string(dir.path().join("exec.env")).unwrap();
    assert_eq!(env, "APPTAINERENV_INPUT=/input\nAPPTAINERENV_MODE=ok\n");
    // A second run reuses the SIF.
    run_collect(&rt, &spec, CancellationToken::new()).await.outcome();
    let builds = std::fs::read_to_string(dir.path().join("build.log")).unwrap();
    assert_eq!(builds.lines().count(), 1, "{builds}");
    assert!(!builds.contains("sha256:"), "apptainer build refuses `:` in an archive path: {builds}");
    // Nothing left beside the SIF and its metadata.
    let mut left: Vec<String> = std::fs::read_dir(store.join(SIF_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, [format!("{hex}.json"), format!("{hex}.sif")]);
}

#[tokio::test]
async fn exit_codes_timeouts_and_cancellation_of_the_process_group() {
    let img = image();
    let dir = tempfile::tempdir().unwrap();
    let rt = Apptainer::with_program(&fake_apptainer(dir.path()), &dir.path().join("store"))
        .await
        .unwrap()
        .with_stop_grace(Duration::from_secs(1));
    let failed = run_collect(&rt, &spec_for(&img, "fail", dir.path()), CancellationToken::new()).await;
    assert_eq!(failed.outcome(), Outcome::Exited(7));

    let mut slow = spec_for(&img, "sleep", dir.path());
    slow.timeout = Some(Duration::from_millis(500));
    let t0 = Instant::now();
    let timed = run_collect(&rt, &slow, CancellationToken::new()).await;
    assert_eq!(timed.outcome(), Outcome::TimedOut);
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    assert!(timed.stderr().contains("got TERM"), "SIGTERM first: {}", timed.stderr());

    slow.timeout = None;
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.cancel();
    });
    let t0 = Instant::now();
    let cancelled = run_collect(&rt, &slow, cancel).await;
    assert_eq!(cancelled.outcome(), Outcome::Cancelled);
    assert!(t0.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_gpu_request_without_gpus_fails_before_apptainer_is_asked() {
    if !kliko_runtime::gpu::present().is_empty() {
        eprintln!("skipped: this machine has GPUs");
        return;
    }
    let img = image();
    let dir = tempfile::tempdir().unwrap();
    let rt = Apptainer::with_program(&fake_apptainer(dir.path()), &dir.path().join("store")).await.unwrap();
    let mut spec = spec_for(&img, "ok", dir.path());
    spec.gpus = Some(kliko_runtime::Gpus::All);
    let run = run_collect(&rt, &spec, CancellationToken::new()).await;
    let err = run.outcome.unwrap_err().to_string();
    assert!(err.contains("asks for all GPUs"), "{err}");
    assert!(!dir.path().join("exec.args").exists(), "apptainer was never run");
}

#[tokio::test]
async fn a_real_apptainer_runs_a_kliko_image() {
    let Some(program) = kliko_runtime::apptainer::find_program() else {
        eprintln!("skipped: no `apptainer` or `singularity` on PATH");
        return;
    };
    let img = ImageBuilder::new("rt-apptainer-real")
        .kliko_yml("schema_version: 4\nio: split\nsections: []\n")
        .kliko_script("ls /input > /output/listing; id -u > /output/uid; echo real")
        .build()
        .expect("build image");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("in")).unwrap();
    std::fs::write(dir.path().join("in/a.txt"), "a").unwrap();
    std::fs::create_dir_all(dir.path().join("out")).unwrap();
    let rt = Apptainer::with_program(&program, &dir.path().join("store")).await.unwrap();
    let run = run_collect(&rt, &spec_for(&img, "ok", dir.path()), CancellationToken::new()).await;
    assert_eq!(run.outcome(), Outcome::Exited(0), "{}", run.stderr());
    assert_eq!(std::fs::read_to_string(dir.path().join("out/listing")).unwrap(), "a.txt\n");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out/uid")).unwrap().trim(),
        unsafe { libc::getuid() }.to_string()
    );
}
