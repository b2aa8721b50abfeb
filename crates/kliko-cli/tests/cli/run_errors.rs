//! What `kliko run` says when it cannot run: a missing image, an unreachable daemon, a bad
//! kliko.yml inside an image, a missing input folder, the wrong io flags; and `kliko validate`.

use crate::common::*;

#[test]
fn a_missing_image_is_named_with_a_hint() {
    let w = World::new();
    let input = w.folder("in", &[]);
    let name = format!("kliko-test-no-such-image-{}:v1", std::process::id());
    let o = w.run(&[&name, &"--input", &input, &"--output", &w.path("out")]);
    o.expect_code(2);
    assert!(o.stderr.starts_with("error: "), "{}", o.stderr);
    assert!(o.stderr.contains(&format!("`{name}`")), "{}", o.stderr);
    assert!(o.stderr.contains("docker build") && o.stderr.contains("docker pull"), "{}", o.stderr);
    assert!(!w.path("out").exists());
}

#[test]
fn an_unreachable_daemon_says_how_to_fix_it() {
    let w = World::new();
    let input = w.folder("in", &[]);
    let mut c = w.kliko();
    c.env("DOCKER_HOST", "unix:///nonexistent.sock")
        .args(["run", "any-image:1", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(w.path("out"));
    let o = Out::of(&mut c);
    o.expect_code(2);
    assert!(o.stderr.contains("cannot reach the docker daemon"), "{}", o.stderr);
    assert!(o.stderr.contains("/nonexistent.sock"), "{}", o.stderr);
    assert!(o.stderr.contains("DOCKER_HOST") && o.stderr.contains("systemctl start docker"), "{}", o.stderr);
}

#[test]
fn a_bad_kliko_yml_in_an_image_is_reported_with_its_place() {
    let yml = "schema_version: 4\nio: split\nsections:\n  - name: main\n    description: d\n    fields:\n      - name: x\n        type: integer\n";
    let img = build(ImageBuilder::new("errors-bad-yml").kliko_yml(yml).kliko_script("echo ran > /output/ran"));
    let w = World::new();
    let input = w.folder("in", &[]);
    let o = w.run(&[&img.tag, &"--input", &input, &"--output", &w.path("out")]);
    o.expect_code(2);
    assert!(o.stderr.contains("kliko.yml"), "{}", o.stderr);
    assert!(o.stderr.contains("line 8, column 15"), "the message gives the line and column: {}", o.stderr);
    assert!(o.stderr.contains("integer"), "{}", o.stderr);
    assert!(!w.path("out").exists());

    // Unknown top-level key.
    let img2 = build(
        ImageBuilder::new("errors-bad-key")
            .kliko_yml("schema_version: 4\nio: split\nsectoins: []\n")
            .kliko_script("true"),
    );
    let o = w.run(&[&img2.tag, &"--help"]);
    o.expect_code(2);
    assert!(o.stderr.contains("sectoins") && o.stderr.contains("line 3, column"), "{}", o.stderr);

    // No kliko.yml at all.
    let img3 = build(ImageBuilder::new("errors-no-yml").kliko_script("true"));
    let o = w.run(&[&img3.tag, &"--input", &input, &"--output", &w.path("out")]);
    o.expect_code(2);
    assert!(o.stderr.contains("/kliko.yml"), "{}", o.stderr);
    for i in [&img, &img2, &img3] {
        assert_no_containers(i);
    }
}

#[test]
fn a_missing_input_folder_is_named() {
    let img = split_image("errors-no-input", "", "true");
    let w = World::new();
    let missing = w.path("does-not-exist");
    let o = w.run(&[&img.tag, &"--input", &missing, &"--output", &w.path("out")]);
    o.expect_code(2);
    assert!(o.stderr.contains("does-not-exist") && o.stderr.contains("does not exist"), "{}", o.stderr);
    let file = w.file("a-file", "x");
    let o = w.run(&[&img.tag, &"--input", &file, &"--output", &w.path("out")]);
    o.expect_code(2);
    assert!(o.stderr.contains("not a folder"), "{}", o.stderr);
    assert_no_containers(&img);
}

#[test]
fn the_wrong_io_flags_are_explained() {
    let img = split_image("errors-io", "", "true");
    let w = World::new();
    let work = w.folder("work", &[]);
    let o = w.run(&[&img.tag, &"--work", &work]);
    o.expect_code(2);
    assert!(o.stderr.contains("split") && o.stderr.contains("--input"), "{}", o.stderr);
    let join = build(ImageBuilder::new("errors-io-join").kliko_yml(&spec_yml(4, "join", "")).kliko_script("true"));
    let o = w.run(&[&join.tag, &"--input", &work, &"--output", &w.path("out")]);
    o.expect_code(2);
    assert!(o.stderr.contains("join") && o.stderr.contains("--work"), "{}", o.stderr);
    let o = w.run(&[&join.tag]);
    o.expect_code(2);
    assert!(o.stderr.contains("--work"), "{}", o.stderr);
    assert_no_containers(&img);
    assert_no_containers(&join);
}

#[test]
fn validate_accepts_good_files_and_explains_bad_ones() {
    let w = World::new();
    let good = w.file("good.yml", &spec_yml(4, "split", "      - name: n\n        type: int\n        initial: 3\n"));
    let legacy = w.file("legacy.yml", "io: join\nsections: []\n");
    let o = Out::of(w.kliko().arg("validate").arg(&good).arg(&legacy));
    o.ok();
    assert!(o.stdout.contains("ok:") && o.stdout.contains("1 fields"), "{}", o.stdout);
    assert!(o.stdout.contains("not declared"), "{}", o.stdout);

    let bad_type = w.file("bad-type.yml", "schema_version: 4\nio: split\nsections:\n  - name: s\n    description: d\n    fields:\n      - name: c\n        type: char\n");
    let bad_io = w.file("bad-io.yml", "schema_version: 3\nio: both\nsections: []\n");
    let no_io = w.file("no-io.yml", "schema_version: 3\nsections: []\n");
    let dup = w.file("dup.yml", "schema_version: 4\nio: split\nsections:\n  - name: s\n    description: d\n    fields:\n      - {name: a, type: int}\n      - {name: a, type: str}\n");
    for f in [&bad_type, &bad_io, &no_io, &dup] {
        let o = Out::of(w.kliko().arg("validate").arg(f));
        o.expect_code(1);
        assert!(o.stderr.contains("error"), "{}", o.stderr);
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        assert!(o.stderr.contains(&name), "the message names the file: {}", o.stderr);
    }
    let o = Out::of(w.kliko().arg("validate").arg(&bad_type));
    assert!(o.stderr.contains("char") && o.stderr.contains("line 8, column 15"), "{}", o.stderr);
    // One bad file among good ones fails the whole command.
    Out::of(w.kliko().arg("validate").arg(&good).arg(&bad_io)).expect_code(1);
    Out::of(w.kliko().arg("validate").arg(w.path("missing.yml"))).expect_code(1);
}
