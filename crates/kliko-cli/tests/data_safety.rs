//! Nothing the user owns is lost: an output that names the input, and a work folder edited
//! while its join run goes on.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;

#[test]
fn an_output_folder_that_is_the_input_is_refused_and_the_input_kept() {
    let w = World::new();
    let img = split_image("same-io", "", "cp /input/* /output/");
    let data = w.folder("data", &[("a.txt", "precious\n")]);
    let o = w.run(&[&img.tag, &"--input", &data, &"--output", &data]);
    o.expect_code(2);
    assert!(o.stderr.contains("is not empty"), "{}", o.stderr);
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
