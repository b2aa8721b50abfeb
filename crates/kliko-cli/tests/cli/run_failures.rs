//! Runs that do not succeed: a non-zero exit, a timeout, and SIGINT/SIGTERM to `kliko run`
//! while its container runs. Each must leave no container and cache nothing.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;

#[test]
fn a_failing_image_reports_its_exit_code_and_logs_and_caches_nothing() {
    let img = split_image(
        "fail-exit3",
        "",
        "echo 'partial' > /output/partial; for i in 1 2 3 4 5; do echo \"line $i\"; done; echo 'the last words' >&2; exit 3",
    );
    let w = World::new();
    let input = w.folder("in", &[("a", "a")]);
    let out = w.path("out");
    let args: [&dyn AsRef<std::ffi::OsStr>; 6] = [&img.tag, &"--input", &input, &"--output", &out, &"--json"];
    let o = w.run(&args);
    o.expect_code(3);
    assert_eq!(o.cache(), "miss");
    assert_eq!(o.json()["status"], "failed");
    assert!(o.stderr.contains("exited with code 3"), "{}", o.stderr);
    assert!(o.stderr.contains("nothing was cached"), "{}", o.stderr);
    assert!(o.stderr.contains("last log lines"), "{}", o.stderr);
    assert!(o.stderr.contains("| the last words"), "{}", o.stderr);
    assert!(o.stderr.contains("| line 5"), "{}", o.stderr);
    assert!(!out.join("partial").exists(), "a failed run's output must not be placed");

    // Nothing cached: the second run runs again (and fails again).
    let o2 = w.run(&args);
    o2.expect_code(3);
    assert_eq!(o2.cache(), "miss");
    assert!(!stored(&w, &args[..5]));
    assert_no_containers(&img);
}

#[test]
fn a_timeout_stops_the_container_and_caches_nothing() {
    let img = split_image("fail-timeout", "", "echo started; sleep 600; echo never > /output/never");
    let w = World::new();
    let input = w.folder("in", &[]);
    let out = w.path("out");
    let t0 = Instant::now();
    let o = w.run(&[&img.tag, &"--input", &input, &"--output", &out, &"--timeout", &"2s", &"--json"]);
    let took = t0.elapsed();
    o.expect_code(124);
    assert_eq!(o.json()["status"], "timed_out");
    assert!(o.stderr.contains("timed out"), "{}", o.stderr);
    // 2 s plus the stop grace (the shell, as PID 1, ignores SIGTERM) plus overhead.
    assert!(took < Duration::from_secs(30), "the timeout was not enforced: {took:?}");
    assert!(!out.join("never").exists());
    assert!(!stored(&w, &[&img.tag, &"--input", &input, &"--output", &out]));
    assert_no_containers(&img);
}

/// Starts a long run, waits until its container is running, sends `signal`, and checks that
/// the container is stopped and removed, nothing is cached, and the exit is non-zero.
fn interrupted_by(signal: libc::c_int, prefix: &str) {
    let img = split_image(prefix, "", "echo started; sleep 600; echo never > /output/never");
    let w = World::new();
    let input = w.folder("in", &[]);
    let out = w.path("out");
    let mut child = w
        .kliko()
        .arg("run")
        .arg(&img.tag)
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
        !running_kliko_containers(&img).is_empty()
    });
    // SAFETY: a plain kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
    let pid = child.id();
    let o = child.wait_with_output().expect("kliko finishes");
    let o = Out::from_output(format!("kliko run (pid {pid}) interrupted"), o);
    assert_ne!(o.code, 0, "an interrupted run must fail: {}", o.stderr);
    assert!(o.stderr.contains("nothing is cached") || o.stderr.contains("nothing was cached"), "{}", o.stderr);
    assert_eq!(o.json()["status"], "cancelled");
    assert!(!out.join("never").exists());
    assert!(running_kliko_containers(&img).is_empty());
    assert_no_containers(&img);
    assert!(!stored(&w, &[&img.tag, &"--input", &input, &"--output", &out]));
}

#[test]
fn sigint_stops_and_removes_the_container() {
    interrupted_by(libc::SIGINT, "fail-sigint");
}

#[test]
fn sigterm_stops_and_removes_the_container() {
    interrupted_by(libc::SIGTERM, "fail-sigterm");
}
