//! Nothing the user owns is lost: an output that names the input, a work folder edited while
//! its join run goes on; and an input edited while its split run goes on is not cached.

use std::process::Stdio;
use std::time::Duration;

use crate::common::*;

#[test]
fn an_output_folder_that_is_the_input_is_refused_and_the_input_kept() {
    let w = World::new();
    let img = split_image("same-io", "", "cp /input/* /output/");
    let data = w.folder("data", &[("a.txt", "precious\n")]);
    for extra in [&[][..], &["--overwrite"][..]] {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&img.tag, &"--input", &data, &"--output", &data];
        args.extend(extra.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
        let o = w.run(&args);
        o.expect_code(2);
        assert!(o.stderr.contains("is the input folder"), "{}", o.stderr);
    }
    assert_eq!(read(&data.join("a.txt")), "precious\n");
    assert_no_containers(&img);
}

#[test]
fn a_work_folder_edited_during_its_join_run_is_left_alone() {
    let w = World::new();
    let img = build(
        ImageBuilder::new("join-edit")
            .kliko_yml(&spec_yml(4, "join", ""))
            .kliko_script("sleep 3\necho processed >> /work/a.txt"),
    );
    let work = w.folder("work", &[("a.txt", "raw\n")]);
    let mut c = w.kliko();
    c.args(["run", &img.tag, "--work"]).arg(&work);
    let child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn kliko");
    wait_for("the join container", Duration::from_secs(30), || !running_kliko_containers(&img).is_empty());
    std::fs::write(work.join("notes.txt"), "written by the user meanwhile\n").expect("write");
    let o = Out::from_output("kliko run --work".into(), child.wait_with_output().expect("wait"));
    o.expect_code(2);
    assert!(o.stderr.contains("changed while the run went on"), "{}", o.stderr);
    // The user's folder is exactly as they left it.
    assert_eq!(read(&work.join("a.txt")), "raw\n");
    assert_eq!(read(&work.join("notes.txt")), "written by the user meanwhile\n");
    // The result is stored all the same: the original content is a hit elsewhere.
    let again = w.folder("work2", &[("a.txt", "raw\n")]);
    let o = w.run(&[&img.tag, &"--json", &"--work", &again]);
    o.ok();
    assert_eq!(o.cache(), "hit");
    assert_eq!(read(&again.join("a.txt")), "raw\nprocessed\n");
    assert_no_containers(&img);
}

#[test]
fn an_input_edited_during_its_split_run_gives_its_output_but_is_not_cached() {
    let w = World::new();
    let img = split_image("split-edit", "", "sleep 3\ncp -r /input/. /output/");
    let input = w.folder("in", &[("a.txt", "raw\n"), ("b.txt", "other\n")]);
    // Older than the stat cache's racy-timestamp guard, so the check after the run relies on
    // the stat records taken before it.
    std::thread::sleep(Duration::from_millis(2100));
    let out = w.path("out");
    let mut c = w.kliko();
    c.args(["run", &img.tag, "--json", "--input"]).arg(&input).arg("--output").arg(&out);
    let child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn kliko");
    wait_for("the split container", Duration::from_secs(30), || !running_kliko_containers(&img).is_empty());
    // Same size, new content: only the modification time tells.
    std::fs::write(input.join("a.txt"), "RAW\n").expect("write");
    let o = Out::from_output("kliko run --input".into(), child.wait_with_output().expect("wait"));
    o.ok();
    let j = o.json();
    assert_eq!(j["recorded"], false, "{j}");
    assert!(j["warnings"].to_string().contains("changed while the container ran"), "{j}");
    assert!(out.join("b.txt").exists(), "the output is placed all the same");
    // Back to what the key was computed from: still a miss, since nothing was cached.
    std::fs::write(input.join("a.txt"), "raw\n").expect("write");
    let again = w.run(&[&img.tag, &"--json", &"--input", &input, &"--output", &w.path("out2")]);
    again.ok();
    assert_eq!(again.cache(), "miss");
    assert_eq!(again.json()["recorded"], true);
    assert_no_containers(&img);
}
