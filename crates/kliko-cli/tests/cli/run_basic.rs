//! `kliko run` against the real daemon: what a container sees. Images report their view of the
//! world (mounts, parameters, uid, network, environment) into `/output`, and the tests check it
//! against the container contract: split and join mounts, the user, no network, the
//! environment, file parameters, images without a shell and images with an ENTRYPOINT.

use std::fs;

use crate::common::*;
use serde_json::json;

/// A split image that writes what it saw into /output.
const REPORTER: &str = r#"
set -u
cat /parameters.json > /output/params.json
id -u > /output/uid
id -g > /output/gid
ls /sys/class/net > /output/net
env | sort > /output/env
cat /proc/mounts > /output/mounts
ls -la /param_files > /output/param_files.txt
if [ -f /param_files/mask ]; then cat /param_files/mask > /output/mask; fi
cat /input/data.txt > /output/seen-input
if touch /input/written-by-container 2>/output/input-write-error; then echo yes > /output/input-writable; else echo no > /output/input-writable; fi
if [ -e /work ]; then echo yes > /output/has-work; else echo no > /output/has-work; fi
echo "reporter: done"
"#;

const REPORTER_FIELDS: &str = "      - name: threshold
        type: float
        initial: 0.5
      - name: mode
        type: choice
        choices: {fast: Fast, exact: Exact}
        initial: fast
      - name: note
        type: str
        required: false
      - name: count
        type: int
        required: false
      - name: mask
        type: file
        required: false
";

#[test]
fn split_image_sees_the_contract() {
    let img = split_image("basic-split", REPORTER_FIELDS, REPORTER);
    let w = World::new();
    let input = w.folder("in", &[("data.txt", "hello input\n")]);
    let mask = w.file("masks/m.txt", "mask content\n");
    let out = w.path("out");
    let o = w.run(&[&img.tag, &"--input", &input, &"--output", &out, &"--mode", &"exact", &"--mask", &mask]);
    o.ok();
    assert!(o.stdout.contains("reporter: done"), "container logs reach stdout: {}", o.stdout);

    // Output landed in --output; the input was readable and not writable.
    assert_eq!(read(&out.join("seen-input")), "hello input\n");
    assert_eq!(read(&out.join("input-writable")).trim(), "no");
    assert!(read(&out.join("input-write-error")).contains("Read-only"), "{}", read(&out.join("input-write-error")));
    assert!(!input.join("written-by-container").exists());
    assert_eq!(read(&out.join("has-work")).trim(), "no", "a split container has no /work");

    // parameters.json: every field, null where unset, defaults filled, native types.
    assert_eq!(
        read_json(&out.join("params.json")),
        json!({"threshold": 0.5, "mode": "exact", "note": null, "count": null, "mask": "/param_files/mask"})
    );
    assert_eq!(read(&out.join("mask")), "mask content\n");

    // Mounts: /input read-only, /output read-write, parameters read-only.
    let mounts = read(&out.join("mounts"));
    let opts = |target: &str| -> String {
        mounts
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(target))
            .unwrap_or_else(|| panic!("no mount at `{target}`:\n{mounts}"))
            .split_whitespace()
            .nth(3)
            .unwrap()
            .to_string()
    };
    assert!(opts("/input").split(',').any(|o| o == "ro"), "{mounts}");
    assert!(opts("/output").split(',').any(|o| o == "rw"), "{mounts}");
    assert!(opts("/parameters.json").split(',').any(|o| o == "ro"), "{mounts}");
    assert!(opts("/param_files").split(',').any(|o| o == "ro"), "{mounts}");

    // The invoking user; no network but loopback; the kliko environment.
    let me = unsafe { libc::getuid() };
    assert_eq!(read(&out.join("uid")).trim(), me.to_string());
    assert_eq!(read(&out.join("net")).split_whitespace().collect::<Vec<_>>(), vec!["lo"]);
    let env = read(&out.join("env"));
    for kv in [
        "INPUT=/input",
        "OUTPUT=/output",
        "WORK=/work",
        "PARAM_FILES=/param_files",
        "PARAM_FILE=/parameters.json",
        "KLIKO_FILE=/kliko.yml",
    ] {
        assert!(env.lines().any(|l| l == kv), "`{kv}` missing from the environment:\n{env}");
    }
    // kliko wrote nothing into the current directory or the input.
    assert_eq!(fs::read_dir(&input).unwrap().count(), 1);
    assert_no_containers(&img);
}

#[test]
fn output_belongs_to_the_invoker_and_user_can_be_chosen() {
    let img = split_image("basic-user", "", "id -u > /output/uid; id -g > /output/gid; echo x > /output/file");
    let w = World::new();
    let input = w.folder("in", &[]);

    // Default: the invoking user, in the container and on the output files.
    let out = w.path("out-default");
    w.run(&[&img.tag, &"--input", &input, &"--output", &out]).ok();
    let me = unsafe { libc::getuid() };
    assert_eq!(read(&out.join("uid")).trim(), me.to_string());
    use std::os::unix::fs::MetadataExt;
    assert_eq!(fs::metadata(out.join("file")).unwrap().uid(), me);

    // An explicit uid:gid. The user is not part of the key: pass --no-cache to really run.
    let out = w.path("out-1234");
    w.run(&[&img.tag, &"--input", &input, &"--output", &out, &"--user", &"1234:1234", &"--no-cache"]).ok();
    assert_eq!(read(&out.join("uid")).trim(), "1234");
    assert_eq!(read(&out.join("gid")).trim(), "1234");

    // The image's own user (none declared: root).
    let img2 = build(
        ImageBuilder::new("basic-user-image")
            .kliko_yml(&spec_yml(4, "split", ""))
            .kliko_script("id -u > /output/uid")
            .user("4321:4321"),
    );
    let out = w.path("out-image");
    w.run(&[&img2.tag, &"--input", &input, &"--output", &out, &"--user", &"image"]).ok();
    assert_eq!(read(&out.join("uid")).trim(), "4321");
    assert_no_containers(&img);
    assert_no_containers(&img2);
}

#[test]
fn a_miss_and_a_hit_place_the_same_tree_with_the_same_modes() {
    // The container leaves odd modes; a miss hands its own files over (as root) or links or
    // copies them out of the store, a hit always places them from the store: the user must not
    // be able to tell which happened.
    let img = split_image(
        "basic-modes",
        "",
        "echo private > /output/a; chmod 600 /output/a\n\
         printf '#!/bin/sh\\n' > /output/run.sh; chmod 700 /output/run.sh\n\
         mkdir /output/d; echo in > /output/d/b; chmod 700 /output/d; ln -s a /output/link",
    );
    let w = World::new();
    let input = w.folder("in", &[]);
    let modes = |root: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        ["a", "run.sh", "d", "d/b"]
            .iter()
            .map(|p| format!("{p} {:o}", fs::metadata(root.join(p)).unwrap().permissions().mode() & 0o7777))
            .collect::<Vec<_>>()
    };
    let miss = w.path("out-miss");
    let o = w.run(&[&img.tag, &"--json", &"--input", &input, &"--output", &miss]);
    o.ok();
    assert_eq!(o.cache(), "miss");
    let hit = w.path("out-hit");
    let o = w.run(&[&img.tag, &"--json", &"--input", &input, &"--output", &hit]);
    assert_eq!(o.cache(), "hit");
    assert_eq!(read_tree(&miss), read_tree(&hit));
    assert_eq!(fs::read_link(miss.join("link")).unwrap(), std::path::PathBuf::from("a"));
    // Root gets writable copies (the default placement never hands root a link into the
    // store); others get read-only links, executables copied.
    let expected = if unsafe { libc::geteuid() } == 0 {
        vec!["a 644", "run.sh 755", "d 755", "d/b 644"]
    } else {
        vec!["a 444", "run.sh 755", "d 755", "d/b 444"]
    };
    assert_eq!(modes(&miss), expected, "after the miss");
    assert_eq!(modes(&hit), expected, "after the hit");
    assert_no_containers(&img);
}

#[test]
fn join_image_changes_a_private_copy_and_the_work_folder_gets_the_result_after_storing() {
    let fields = "      - name: suffix\n        type: str\n        initial: changed\n";
    let script = r#"
if [ -e /input ] || [ -e /output ]; then echo "a join container has no /input or /output" >&2; exit 9; fi
for f in /work/*.txt; do echo "$(cat "$f") $(sed -n 's/.*"suffix": "\(.*\)".*/\1/p' /parameters.json)" > "$f"; done
rm -f /work/remove-me
mkdir -p /work/made
echo new > /work/made/new.txt
"#;
    let img = build(ImageBuilder::new("basic-join").kliko_yml(&spec_yml(4, "join", fields)).kliko_script(script));
    let w = World::new();
    let original: &[(&str, &str)] = &[("a.txt", "alpha"), ("b.txt", "beta"), ("remove-me", "x")];
    let work = w.folder("work", original);
    let o = w.run(&[&img.tag, &"--work", &work, &"--json"]);
    o.ok();
    assert_eq!(o.cache(), "miss");
    // The work folder holds the result.
    assert_eq!(read(&work.join("a.txt")), "alpha changed\n");
    assert_eq!(read(&work.join("made/new.txt")), "new\n");
    assert!(!work.join("remove-me").exists());

    // The original content in a fresh folder: the same key, served from the store.
    let again = w.folder("work-again", original);
    let o2 = w.run(&[&img.tag, &"--work", &again, &"--json"]);
    o2.ok();
    assert_eq!(o2.cache(), "hit");
    assert_eq!(read_tree(&again), read_tree(&work));

    // --work DIR --output OUT: DIR is left alone, OUT gets the result.
    let untouched = w.folder("work-untouched", original);
    let before = read_tree(&untouched);
    let out = w.path("join-out");
    let o3 = w.run(&[&img.tag, &"--work", &untouched, &"--output", &out, &"--json", &"--no-cache"]);
    o3.ok();
    assert_eq!(read_tree(&untouched), before, "--output must leave the work folder untouched");
    assert_eq!(read(&out.join("b.txt")), "beta changed\n");
    assert_no_containers(&img);
}

#[test]
fn a_failed_join_run_leaves_the_work_folder_untouched() {
    let img = build(
        ImageBuilder::new("basic-join-fail")
            .kliko_yml(&spec_yml(4, "join", ""))
            .kliko_script("echo ruined > /work/a.txt; rm -f /work/b.txt; exit 5"),
    );
    let w = World::new();
    let work = w.folder("work", &[("a.txt", "alpha"), ("b.txt", "beta")]);
    let before = read_tree(&work);
    w.run(&[&img.tag, &"--work", &work]).expect_code(5);
    assert_eq!(read_tree(&work), before);
    assert_no_containers(&img);
}

#[test]
fn an_image_without_a_shell_runs() {
    let c = r#"
#include <stdio.h>
int main(void) {
    FILE *in = fopen("/parameters.json", "r");
    FILE *out = fopen("/output/params.json", "w");
    if (!in || !out) return 7;
    int c;
    while ((c = fgetc(in)) != EOF) fputc(c, out);
    fclose(out);
    puts("no shell here");
    return 0;
}
"#;
    let img = build(
        ImageBuilder::new("basic-noshell")
            .no_shell()
            .kliko_yml(&spec_yml(4, "split", "      - name: level\n        type: int\n        initial: 2\n"))
            .kliko_c(c),
    );
    let w = World::new();
    let input = w.folder("in", &[]);
    let out = w.path("out");
    let o = w.run(&[&img.tag, &"--input", &input, &"--output", &out, &"--level", &"5"]);
    o.ok();
    assert!(o.stdout.contains("no shell here"), "{}", o.stdout);
    assert_eq!(read_json(&out.join("params.json")), json!({"level": 5}));

    // --help reads kliko.yml without running anything too.
    let h = w.run(&[&img.tag, &"--help"]);
    h.ok();
    assert!(h.stdout.contains("--level"), "{}", h.stdout);
    assert_no_containers(&img);
}

#[test]
fn an_entrypoint_stays_and_kliko_is_its_argument() {
    let img = build(
        ImageBuilder::new("basic-entrypoint")
            .kliko_yml(&spec_yml(4, "split", ""))
            .kliko_script("echo \"kliko ran with $# args\" > /output/kliko-ran")
            .file("/entry.sh", b"#!/bin/sh\necho \"entry: $*\" > /output/entry\nexec \"$@\"\n", 0o755)
            .entrypoint(vec!["/entry.sh".into()]),
    );
    let w = World::new();
    let input = w.folder("in", &[]);
    let out = w.path("out");
    w.run(&[&img.tag, &"--input", &input, &"--output", &out]).ok();
    assert_eq!(read(&out.join("entry")), "entry: /kliko\n");
    assert_eq!(read(&out.join("kliko-ran")), "kliko ran with 0 args\n");
    assert_no_containers(&img);
}

#[test]
fn no_input_is_an_empty_input() {
    let img = split_image("basic-noinput", "", "ls -A /input | wc -l > /output/count");
    let w = World::new();
    let out = w.path("out");
    let o = w.run(&[&img.tag, &"--output", &out, &"--json"]);
    o.ok();
    assert_eq!(read(&out.join("count")).trim(), "0");
    // The same key as an empty folder.
    let empty = w.folder("empty", &[]);
    let o2 = w.run(&[&img.tag, &"--input", &empty, &"--output", &w.path("out2"), &"--json"]);
    o2.ok();
    assert_eq!(o2.cache(), "hit");
    assert_eq!(o.key(), o2.key());
    assert_no_containers(&img);
}
