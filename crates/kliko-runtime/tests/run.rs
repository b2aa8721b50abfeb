//! Running containers against the real daemon: logs, exit codes, timeout,
//! cancellation, isolation settings, and cleanup on every path.

mod common;

use std::time::Duration;

use common::*;
use kliko_runtime::{ContainerRuntime, Mount, Outcome, RuntimeError, Stream};
use kliko_testkit::{ImageBuilder, TestImage};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn script_image(prefix: &str, script: &str) -> TestImage {
    ImageBuilder::new(prefix).kliko_yml(KLIKO_YML).kliko_script(script).build().expect("build image")
}

fn current_user() -> String {
    // SAFETY: getuid/getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    format!("{uid}:{gid}")
}

#[tokio::test]
async fn exit_zero_with_streams_apart_and_complete() {
    let docker = docker().await;
    // Prints and exits at once: nothing may be lost to a late attach.
    let image = script_image(
        "rt-streams",
        "printf 'out-1\\n'; printf 'err-1\\n' >&2; seq 1 20000; printf 'err-2' >&2; printf 'last'",
    );
    let label = unique_value("streams");
    let spec = spec(&image.id, &["/kliko"], &label);
    let got = run_collect(&docker, &spec, CancellationToken::new()).await;
    let run = got.outcome.as_ref().expect("run");
    assert_eq!(run.outcome, Outcome::Exited(0));
    assert!(run.finished_at >= run.started_at);
    assert!(!run.container_id.is_empty());

    let mut expected = String::from("out-1\n");
    for i in 1..=20000 {
        expected.push_str(&format!("{i}\n"));
    }
    expected.push_str("last");
    assert_eq!(got.stdout(), expected);
    assert_eq!(got.stderr(), "err-1\nerr-2");
    assert!(got.chunks.iter().any(|c| c.stream == Stream::Stderr));
    assert!(leftovers(&docker, &label).await.is_empty());
}

#[tokio::test]
async fn immediate_exit_output_is_not_lost() {
    let docker = docker().await;
    let image = script_image("rt-quick", "echo quick");
    for _ in 0..3 {
        let label = unique_value("quick");
        let got = run_collect(&docker, &spec(&image.id, &["/kliko"], &label), CancellationToken::new()).await;
        assert_eq!(got.outcome(), Outcome::Exited(0));
        assert_eq!(got.stdout(), "quick\n");
        assert!(leftovers(&docker, &label).await.is_empty());
    }
}

#[tokio::test]
async fn nonzero_exit_is_an_outcome() {
    let docker = docker().await;
    let image = script_image("rt-exit3", "echo failing >&2; exit 3");
    let label = unique_value("exit3");
    let got = run_collect(&docker, &spec(&image.id, &["/kliko"], &label), CancellationToken::new()).await;
    assert_eq!(got.outcome(), Outcome::Exited(3));
    assert_eq!(got.stderr(), "failing\n");
    assert!(leftovers(&docker, &label).await.is_empty());
}

#[tokio::test]
async fn timeout_stops_and_removes_the_container() {
    let docker = docker().await.with_stop_grace(Duration::ZERO);
    let image = script_image("rt-timeout", "echo started; sleep 600");
    let label = unique_value("timeout");
    let mut spec = spec(&image.id, &["/kliko"], &label);
    spec.timeout = Some(Duration::from_millis(500));
    let got = run_collect(&docker, &spec, CancellationToken::new()).await;
    let run = got.outcome.unwrap();
    assert_eq!(run.outcome, Outcome::TimedOut);
    let took = run.finished_at.duration_since(run.started_at).unwrap();
    assert!(took < Duration::from_secs(60), "{took:?}");
    assert!(leftovers(&docker, &label).await.is_empty());
}

#[tokio::test]
async fn timeout_with_grace_lets_a_term_handler_run() {
    let docker = docker().await.with_stop_grace(Duration::from_secs(10));
    // A workload that exits on SIGTERM: stop must not wait out the grace.
    let image =
        script_image("rt-grace", "trap 'echo got-term; exit 0' TERM; echo started; while true; do sleep 1; done");
    let label = unique_value("grace");
    let mut spec = spec(&image.id, &["/kliko"], &label);
    spec.timeout = Some(Duration::from_millis(500));
    let got = run_collect(&docker, &spec, CancellationToken::new()).await;
    assert_eq!(got.outcome(), Outcome::TimedOut);
    assert_eq!(got.stdout(), "started\ngot-term\n");
    assert!(leftovers(&docker, &label).await.is_empty());
}

#[tokio::test]
async fn cancel_stops_and_removes_the_container() {
    let docker = docker().await.with_stop_grace(Duration::ZERO);
    let image = script_image("rt-cancel", "echo ready; sleep 600");
    let label = unique_value("cancel");
    let spec = spec(&image.id, &["/kliko"], &label);
    let cancel = CancellationToken::new();
    let (tx, mut rx) = mpsc::channel::<kliko_runtime::LogChunk>(16);
    // Cancel as soon as the workload says it is running: an event, not a sleep.
    let canceller = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(chunk) = rx.recv().await {
                seen.extend_from_slice(&chunk.bytes);
                if seen.ends_with(b"ready\n") {
                    cancel.cancel();
                }
            }
            seen
        })
    };
    let run = docker.run(&spec, tx, cancel).await.expect("run");
    assert_eq!(run.outcome, Outcome::Cancelled);
    assert_eq!(canceller.await.unwrap(), b"ready\n");
    assert!(leftovers(&docker, &label).await.is_empty());
}

#[tokio::test]
async fn cancelled_before_start_never_runs() {
    let docker = docker().await;
    let image = script_image("rt-precancel", "echo should-not-run");
    let label = unique_value("precancel");
    let cancel = CancellationToken::new();
    cancel.cancel();
    let got = run_collect(&docker, &spec(&image.id, &["/kliko"], &label), cancel).await;
    assert_eq!(got.outcome(), Outcome::Cancelled);
    assert!(got.stdout.is_empty());
    assert!(leftovers(&docker, &label).await.is_empty());
}

#[tokio::test]
async fn failure_to_start_is_an_error_and_still_cleans_up() {
    let docker = docker().await;
    let image = script_image("rt-nostart", "true");
    let label = unique_value("nostart");
    let got = run_collect(&docker, &spec(&image.id, &["/no/such/binary"], &label), CancellationToken::new()).await;
    let err = got.outcome.unwrap_err();
    assert!(matches!(&err, RuntimeError::Backend { action, .. } if action.starts_with("start container")), "{err:?}");
    assert!(leftovers(&docker, &label).await.is_empty());
}

#[tokio::test]
async fn dropped_log_receiver_does_not_fail_the_run() {
    let docker = docker().await;
    let image = script_image("rt-droprx", "seq 1 50000; exit 4");
    let label = unique_value("droprx");
    let (tx, rx) = mpsc::channel(1);
    drop(rx);
    let run = docker.run(&spec(&image.id, &["/kliko"], &label), tx, CancellationToken::new()).await.expect("run");
    assert_eq!(run.outcome, Outcome::Exited(4));
    assert!(leftovers(&docker, &label).await.is_empty());
}

#[tokio::test]
async fn network_is_none_by_default() {
    let docker = docker().await;
    let image = script_image("rt-net", "ls /sys/class/net");
    let label = unique_value("net");
    let got = run_collect(&docker, &spec(&image.id, &["/kliko"], &label), CancellationToken::new()).await;
    assert_eq!(got.outcome(), Outcome::Exited(0));
    assert_eq!(got.stdout().split_whitespace().collect::<Vec<_>>(), ["lo"]);
    assert!(leftovers(&docker, &label).await.is_empty());
}

#[tokio::test]
async fn user_env_workdir_and_limits_apply() {
    let docker = docker().await;
    let image = script_image(
        "rt-user",
        "id -u; id -g; echo \"$GREETING\"; pwd; \
         cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes",
    );
    let label = unique_value("user");
    let mut spec = spec(&image.id, &["/kliko"], &label);
    spec.user = Some("1234:1234".into());
    spec.env = vec![("GREETING".into(), "hello world".into())];
    spec.workdir = Some("/tmp".into());
    spec.memory_bytes = Some(64 * 1024 * 1024);
    spec.cpus = Some(0.5);
    spec.name = Some(unique_value("kliko-rt-named"));
    let got = run_collect(&docker, &spec, CancellationToken::new()).await;
    assert_eq!(got.outcome(), Outcome::Exited(0), "{}", got.stderr());
    assert_eq!(got.stdout(), format!("1234\n1234\nhello world\n/tmp\n{}\n", 64 * 1024 * 1024));
    assert!(leftovers(&docker, &label).await.is_empty());
}

#[tokio::test]
async fn mounts_read_only_read_write_and_single_file() {
    let docker = docker().await;
    let input = tempfile::tempdir().unwrap();
    let output = tempfile::tempdir().unwrap();
    std::fs::write(input.path().join("data.txt"), "input data").unwrap();
    let params = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(params.path(), "{\"n\": 1}").unwrap();

    let image = script_image(
        "rt-mounts",
        "cat /input/data.txt; echo; cat /parameters.json; echo; \
         if touch /input/new 2>/dev/null; then echo input-writable; else echo input-readonly; fi; \
         if echo x > /parameters.json 2>/dev/null; then echo params-writable; else echo params-readonly; fi; \
         cp /input/data.txt /output/copied.txt",
    );
    let label = unique_value("mounts");
    let mut spec = spec(&image.id, &["/kliko"], &label);
    spec.user = Some(current_user());
    spec.mounts = vec![
        Mount { host: input.path().to_path_buf(), container: "/input".into(), read_only: true },
        Mount { host: output.path().to_path_buf(), container: "/output".into(), read_only: false },
        Mount { host: params.path().to_path_buf(), container: "/parameters.json".into(), read_only: true },
    ];
    let got = run_collect(&docker, &spec, CancellationToken::new()).await;
    assert_eq!(got.outcome(), Outcome::Exited(0), "{}", got.stderr());
    assert_eq!(got.stdout(), "input data\n{\"n\": 1}\ninput-readonly\nparams-readonly\n");
    assert!(!input.path().join("new").exists());
    assert_eq!(std::fs::read_to_string(params.path()).unwrap(), "{\"n\": 1}");
    assert_eq!(std::fs::read_to_string(output.path().join("copied.txt")).unwrap(), "input data");
    assert!(leftovers(&docker, &label).await.is_empty());
}

#[tokio::test]
async fn relative_mount_is_refused_before_anything_is_created() {
    let docker = docker().await;
    let label = unique_value("relative");
    let mut spec = spec("sha256:not-needed", &["/kliko"], &label);
    spec.mounts = vec![Mount { host: "output".into(), container: "/output".into(), read_only: false }];
    let (tx, _rx) = mpsc::channel(1);
    let err = docker.run(&spec, tx, CancellationToken::new()).await.unwrap_err();
    assert!(matches!(err, RuntimeError::RelativeMount { .. }), "{err:?}");
    assert!(err.to_string().contains("`output`"), "{err}");
    assert!(leftovers(&docker, &label).await.is_empty());
}

#[tokio::test]
async fn entrypoint_stays_and_cmd_is_appended() {
    let docker = docker().await;
    let image = ImageBuilder::new("rt-entry")
        .kliko_yml(KLIKO_YML)
        .kliko_script("echo kliko-ran")
        .entrypoint(vec!["/bin/echo".into(), "entry".into()])
        .build()
        .expect("build image");
    let label = unique_value("entry");
    let got = run_collect(&docker, &spec(&image.id, &["/kliko"], &label), CancellationToken::new()).await;
    assert_eq!(got.outcome(), Outcome::Exited(0));
    assert_eq!(got.stdout(), "entry /kliko\n");
    assert!(leftovers(&docker, &label).await.is_empty());
}

#[tokio::test]
async fn static_binary_runs_in_an_image_without_a_shell() {
    let docker = docker().await;
    let image = ImageBuilder::new("rt-noshell-run")
        .no_shell()
        .kliko_yml(KLIKO_YML)
        .kliko_c(HELLO_C)
        .build()
        .expect("build image");
    let label = unique_value("noshell");
    let got = run_collect(&docker, &spec(&image.id, &["/kliko", "arg"], &label), CancellationToken::new()).await;
    assert_eq!(got.outcome(), Outcome::Exited(0));
    assert_eq!(got.stdout(), "hello from c arg\n");
    assert_eq!(got.stderr(), "to stderr\n");
    assert!(leftovers(&docker, &label).await.is_empty());
}

#[tokio::test]
async fn missing_image_is_image_not_found() {
    let docker = docker().await;
    let label = unique_value("noimage");
    let (tx, _rx) = mpsc::channel(1);
    let err = docker
        .run(&spec("kliko-test-no-such-image:never", &["/kliko"], &label), tx, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, RuntimeError::ImageNotFound { .. }), "{err:?}");
}
