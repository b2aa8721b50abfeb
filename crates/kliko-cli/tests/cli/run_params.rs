//! Parameters from the command line to `/parameters.json`: every field type (schema v4, and a
//! v3 image with `char`) through `--FIELD VALUE`, `--param NAME=VALUE`, `--params FILE.yml`
//! and `--params FILE.json`; bad values (exit 2, naming the field, nothing run); `--help`.

use std::ffi::OsStr;

use crate::common::*;
use serde_json::{json, Value};

const EVERY_TYPE_V4: &str = "      - name: mode
        type: choice
        choices:
          fast: Fast mode
          exact: Exact mode
        initial: fast
        help_text: how hard to try
      - name: title
        type: str
        required: false
        max_length: 12
        label: Title
        help_text: shown on the plot
      - name: gain
        type: float
        initial: 0.1
      - name: mask
        type: file
        required: false
      - name: verbose
        type: bool
        initial: yes
      - name: niter
        type: int
        initial: 1000
      - name: sizes
        type: List[int]
        initial: [1, 2, 3]
      - name: flags
        type: List[bool]
        required: false
      - name: inputs
        type: List[file]
        required: false
      - name: scales
        type: List[float]
        initial: \"0.5,1e3\"
      - name: tags
        type: List[str]
        initial: []
";

/// Copies everything the container was given into /output.
const DUMP: &str = r#"
cat /parameters.json > /output/params.json
cd /param_files && find . -type f | sort > /output/param_files.txt
for f in $(find . -type f); do mkdir -p "/output/files/$(dirname "$f")"; cat "$f" > "/output/files/$f"; done
"#;

fn run_params(w: &World, img: &TestImage, name: &str, extra: &[&dyn AsRef<OsStr>]) -> (Out, std::path::PathBuf) {
    let input = w.folder("in", &[]);
    let out = w.path(name);
    let mut args: Vec<&dyn AsRef<OsStr>> = vec![&img.tag, &"--input", &input, &"--output", &out, &"--json"];
    args.extend_from_slice(extra);
    let o = w.run(&args);
    (o, out)
}

#[test]
fn defaults_fill_every_declared_field() {
    let img = split_image("params-defaults", EVERY_TYPE_V4, DUMP);
    let w = World::new();
    let (o, out) = run_params(&w, &img, "out", &[]);
    o.ok();
    assert_eq!(
        read_json(&out.join("params.json")),
        json!({
            "mode": "fast", "title": null, "gain": 0.1, "mask": null, "verbose": true, "niter": 1000,
            "sizes": [1, 2, 3], "flags": null, "inputs": null, "scales": [0.5, 1000.0], "tags": []
        })
    );
    assert_eq!(read(&out.join("param_files.txt")), "");
    assert_no_containers(&img);
}

#[test]
fn every_type_through_each_way_of_giving_parameters() {
    let img = split_image("params-every", EVERY_TYPE_V4, DUMP);
    let w = World::new();
    let mask = w.file("host/mask.fits", "MASK");
    let a = w.file("host/x/a.ms", "AAA");
    let b = w.file("host/y/b.ms", "BBB");
    let expected = json!({
        "mode": "exact", "title": "M31 field", "gain": 2.5, "mask": "/param_files/mask",
        "verbose": false, "niter": -7, "sizes": [4, 5], "flags": [true, false, true],
        "inputs": ["/param_files/inputs/0/a.ms", "/param_files/inputs/1/b.ms"],
        "scales": [1.5, 0.001], "tags": ["x", "y z"]
    });
    let check = |out: &std::path::Path| {
        assert_eq!(read_json(&out.join("params.json")), expected);
        assert_eq!(read(&out.join("param_files.txt")), "./inputs/0/a.ms\n./inputs/1/b.ms\n./mask\n");
        assert_eq!(read(&out.join("files/mask")), "MASK");
        assert_eq!(read(&out.join("files/inputs/0/a.ms")), "AAA");
        assert_eq!(read(&out.join("files/inputs/1/b.ms")), "BBB");
    };

    // --FIELD VALUE (bool `False` is false; lists repeat or take commas).
    let (o, out) = run_params(
        &w,
        &img,
        "out-flags",
        &[
            &"--mode",
            &"exact",
            &"--title",
            &"M31 field",
            &"--gain",
            &"2.5",
            &"--mask",
            &mask,
            &"--verbose",
            &"False",
            &"--niter",
            &"-7",
            &"--sizes",
            &"4,5",
            &"--flags",
            &"true",
            &"--flags",
            &"no,1",
            &"--inputs",
            &a,
            &"--inputs",
            &b,
            &"--scales",
            &"1.5,1e-3",
            &"--tags",
            &"x",
            &"--tags",
            &"y z",
        ],
    );
    o.ok();
    assert_eq!(o.cache(), "miss");
    check(&out);
    let key = o.key();

    // --param NAME=VALUE, in another order: the same key.
    let inputs = format!("inputs={},{}", a.display(), b.display());
    let maskp = format!("mask={}", mask.display());
    let (o, out) = run_params(
        &w,
        &img,
        "out-param",
        &[
            &"-p",
            &"tags=x",
            &"-p",
            &"tags=y z",
            &"--param",
            &"scales=1.5,0.001",
            &"-p",
            &inputs,
            &"-p",
            &"flags=1,0,TRUE",
            &"-p",
            &"sizes=4,5",
            &"-p",
            &"niter=-7",
            &"-p",
            &"verbose=false",
            &"-p",
            &maskp,
            &"-p",
            &"gain=2.50",
            &"-p",
            &"title=M31 field",
            &"-p",
            &"mode=exact",
        ],
    );
    o.ok();
    assert_eq!(o.key(), key, "the same values given another way must make the same key");
    assert_eq!(o.cache(), "hit");
    check(&out);

    // --params FILE.yml (relative file paths are relative to the parameters file).
    let yml = w.file(
        "host/params.yml",
        "mode: exact\ntitle: M31 field\ngain: 2.5\nmask: mask.fits\nverbose: False\nniter: -7\n\
         sizes: [4, 5]\nflags: [true, false, true]\ninputs: [x/a.ms, y/b.ms]\nscales: [1.5, 1e-3]\ntags: [x, y z]\n",
    );
    let (o, out) = run_params(&w, &img, "out-yml", &[&"--params", &yml, &"--no-cache"]);
    o.ok();
    assert_eq!(o.key(), key);
    check(&out);

    // --params FILE.json.
    let js = json!({
        "mode": "exact", "title": "M31 field", "gain": 2.5, "mask": mask, "verbose": false, "niter": -7,
        "sizes": [4, 5], "flags": [true, false, true], "inputs": [a, b], "scales": [1.5, 0.001], "tags": ["x", "y z"]
    });
    let jsf = w.file("elsewhere/params.json", &js.to_string());
    let (o, out) = run_params(&w, &img, "out-json", &[&"--params", &jsf, &"--no-cache"]);
    o.ok();
    assert_eq!(o.key(), key);
    check(&out);

    // Flags win over the parameters file.
    let (o, out) = run_params(&w, &img, "out-override", &[&"--params", &jsf, &"--niter", &"8"]);
    o.ok();
    assert_eq!(o.cache(), "miss");
    assert_eq!(read_json(&out.join("params.json"))["niter"], json!(8));
    assert_no_containers(&img);
}

#[test]
fn a_v3_image_with_char_and_no_schema_version() {
    let fields = "      - name: letter\n        type: char\n        max_length: 3\n        initial: abc\n\
                  \x20     - name: name\n        type: str\n        required: false\n";
    let yml = spec_yml(3, "split", fields);
    // No schema_version at all: read as version 3.
    let yml = yml.replacen("schema_version: 3\n", "", 1);
    let img = build(ImageBuilder::new("params-v3").kliko_yml(&yml).kliko_script(DUMP));
    let w = World::new();
    let (o, out) = run_params(&w, &img, "out", &[&"--letter", &"xy"]);
    o.ok();
    assert_eq!(read_json(&out.join("params.json")), json!({"letter": "xy", "name": null}));
    let (o, _) = run_params(&w, &img, "out2", &[&"--letter", &"wxyz"]);
    o.expect_code(2);
    assert!(o.stderr.contains("letter"), "{}", o.stderr);
    assert_no_containers(&img);
}

#[test]
fn bad_values_are_refused_before_anything_runs() {
    let img = split_image("params-bad", EVERY_TYPE_V4, DUMP);
    let w = World::new();
    // Reading kliko.yml out of the image creates (never starts) a container, once per image
    // and store: do that first, so that any container counted below would be a run.
    w.run(&[&img.tag, &"--help"]).ok();
    let since = docker_now();
    let cases: &[(&[&str], &str)] = &[
        (&["--niter", "3.5"], "niter"),
        (&["--mode", "slow"], "mode"),
        (&["--title", "a title that is far too long"], "title"),
        (&["--verbose", "maybe"], "verbose"),
        (&["--gain", "NaN"], "gain"),
        (&["--sizes", "1,x"], "sizes"),
        (&["-p", "nosuchfield=1"], "nosuchfield"),
        (&["--mask", "/nonexistent/mask.fits"], "parameter `mask`: `/nonexistent/mask.fits` does not exist"),
        (&["--niter", "1", "--niter", "2"], "niter"),
    ];
    for (i, (flags, names)) in cases.iter().enumerate() {
        let extra: Vec<&dyn AsRef<OsStr>> = flags.iter().map(|f| f as &dyn AsRef<OsStr>).collect();
        let (o, out) = run_params(&w, &img, &format!("out{i}"), &extra);
        o.expect_code(2);
        assert!(o.stderr.contains(names), "the message for {flags:?} must name `{names}`:\n{}", o.stderr);
        assert!(o.stderr.starts_with("error"), "{}", o.stderr);
        assert!(!out.exists(), "nothing may be written for {flags:?}");
    }
    let until = docker_now();
    assert_eq!(containers_created(&img, &since, &until), 0, "a refused run must create no container");
    assert_no_containers(&img);
}

#[test]
fn help_lists_the_image_fields() {
    let img = split_image("params-help", EVERY_TYPE_V4, DUMP);
    let w = World::new();
    let o = w.run(&[&img.tag, &"--help"]);
    o.ok();
    let h = &o.stdout;
    for needle in [
        "--mode <choice>",
        "choices:",
        "fast",
        "exact",
        "how hard to try",
        "--title <str>",
        "Title: shown on the plot",
        "at most 12 characters",
        "--gain <float>",
        "default: `0.1`",
        "--mask <file>",
        "--verbose <bool>",
        "--niter <int>",
        "default: `1000`",
        "--sizes <List[int]>",
        "--flags <List[bool]>",
        "--inputs <List[file]>",
        "--scales <List[float]>",
        "--tags <List[str]>",
    ] {
        assert!(h.contains(needle), "`{needle}` missing from --help:\n{h}");
    }
    // The image is named, and its io mode explained.
    assert!(h.contains(&img.tag), "{h}");
    assert!(h.contains("io: split"), "{h}");
    assert_no_containers(&img);
}

#[test]
fn required_fields_must_be_given() {
    let fields = "      - name: target\n        type: str\n";
    let img = split_image("params-required", fields, DUMP);
    let w = World::new();
    let (o, _) = run_params(&w, &img, "out", &[]);
    o.expect_code(2);
    assert!(o.stderr.contains("target"), "{}", o.stderr);
    let (o, out) = run_params(&w, &img, "out2", &[&"--target", &"m31"]);
    o.ok();
    assert_eq!(read_json(&out.join("params.json")), json!({"target": "m31"}));
    let _: Value = o.json();
    assert_no_containers(&img);
}

#[test]
fn a_bad_value_for_a_required_field_is_reported_once() {
    let fields = "      - name: count\n        type: int\n";
    let img = split_image("params-once", fields, DUMP);
    let w = World::new();
    let (o, out) = run_params(&w, &img, "out", &[&"--count", &"ten"]);
    o.expect_code(2);
    assert_eq!(o.stderr.matches("`count`").count(), 1, "one message about `count`:\n{}", o.stderr);
    assert!(o.stderr.contains("invalid value `ten` for `count`"), "{}", o.stderr);
    assert!(!o.stderr.contains("missing"), "{}", o.stderr);
    assert!(!out.exists());
    assert_no_containers(&img);
}
