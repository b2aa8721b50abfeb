//! Memoization through `kliko run`: a miss then a hit that creates no container, the output
//! placed identically, `--output` safety, `--overwrite`, `--no-cache`; for every input of the
//! key a change that makes a miss, and changes outside the key that stay a hit; `--explain`.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

const FIELDS: &str = "      - name: level
        type: int
        initial: 1
      - name: name
        type: str
        required: false
      - name: mask
        type: file
        required: false
";

/// Output derived from everything the container sees, so a wrong hit would show.
const SCRIPT: &str = r#"
cp -r /input /output/input-copy
cat /parameters.json > /output/params.json
if [ -f /param_files/mask ]; then cat /param_files/mask > /output/mask; fi
echo "${EXTRA:-none}" > /output/extra
mkdir -p /output/sub/deeper
echo nested > /output/sub/deeper/file.txt
echo ran
"#;

fn image(prefix: &str) -> TestImage {
    split_image(prefix, FIELDS, SCRIPT)
}

/// `kliko run IMG --input IN --output <fresh> --json EXTRA…`.
fn run_in(w: &World, img: &str, input: &Path, extra: &[&dyn AsRef<OsStr>]) -> (Out, PathBuf) {
    let out = w.path(&format!("out-{}", unique()));
    let mut args: Vec<&dyn AsRef<OsStr>> = vec![&img, &"--input", &input, &"--output", &out, &"--json", &"-q"];
    args.extend_from_slice(extra);
    let o = w.run(&args);
    o.ok();
    (o, out)
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[test]
fn a_hit_creates_no_container_and_places_the_same_output() {
    let img = image("cache-hit");
    let w = World::new();
    let input = w.folder("in", &[("a.txt", "alpha"), ("d/b.txt", "beta")]);
    let (miss, out1) = run_in(&w, &img.tag, &input, &[]);
    assert_eq!(miss.cache(), "miss");
    assert_eq!(miss.json()["recorded"], true);

    let since = docker_now();
    let (hit, out2) = run_in(&w, &img.tag, &input, &[]);
    let until = docker_now();
    assert_eq!(hit.cache(), "hit");
    assert_eq!(hit.key(), miss.key());
    assert_eq!(hit.json()["output"], miss.json()["output"]);
    assert!(!hit.stdout.contains("ran") && !hit.stderr.contains("ran"), "a hit runs nothing");
    assert_eq!(containers_created(&img, &since, &until), 0, "a hit must not create a container");
    assert_eq!(read_tree(&out2), read_tree(&out1));
    assert_eq!(read(&out2.join("input-copy/d/b.txt")), "beta");

    // The event count does see containers: a --no-cache run creates exactly one.
    let since = docker_now();
    let (again, out3) = run_in(&w, &img.tag, &input, &[&"--no-cache"]);
    let until = docker_now();
    assert_eq!(again.cache(), "miss");
    assert_eq!(containers_created(&img, &since, &until), 1);
    assert_eq!(read_tree(&out3), read_tree(&out1));
    assert_no_containers(&img);
}

#[test]
fn output_folder_rules() {
    let img = image("cache-output");
    let w = World::new();
    let input = w.folder("in", &[("a.txt", "alpha")]);
    let (_, reference) = run_in(&w, &img.tag, &input, &[]);

    // A non-empty --output is refused, before anything runs, and left as it was.
    let busy = w.folder("busy", &[("keep.txt", "mine")]);
    let since = docker_now();
    let o = w.run(&[&img.tag, &"--input", &input, &"--output", &busy, &"--no-cache"]);
    let until = docker_now();
    o.expect_code(2);
    assert!(o.stderr.contains("not empty") && o.stderr.contains("--overwrite"), "{}", o.stderr);
    assert_eq!(containers_created(&img, &since, &until), 0);
    assert_eq!(read_tree(&busy).len(), 1);

    // --overwrite replaces its contents (the stale file goes), for a hit and a miss.
    let o = w.run(&[&img.tag, &"--input", &input, &"--output", &busy, &"--overwrite", &"--json"]);
    o.ok();
    assert_eq!(o.cache(), "hit");
    assert!(!busy.join("keep.txt").exists());
    assert_eq!(read_tree(&busy), read_tree(&reference));
    fs::write(busy.join("stale.txt"), "old").unwrap();
    let o = w.run(&[&img.tag, &"--input", &input, &"--output", &busy, &"--overwrite", &"--no-cache", &"--json"]);
    o.ok();
    assert_eq!(o.cache(), "miss");
    assert_eq!(read_tree(&busy), read_tree(&reference));

    // A relative --output is a folder under the current directory (never a docker volume).
    let cwd = w.folder("cwd", &[]);
    let mut c = w.kliko();
    c.current_dir(&cwd).args(["run", &img.tag, "--input"]).arg(&input).args(["--output", "rel-out", "--no-cache"]);
    Out::of(&mut c).ok();
    assert_eq!(read_tree(&cwd.join("rel-out")), read_tree(&reference));
    assert_no_containers(&img);
}

#[test]
fn every_input_of_the_key_makes_a_miss() {
    let img = image("cache-key-miss");
    let w = World::new();
    let input = w.folder("in", &[("a.txt", "alpha"), ("d/b.txt", "beta")]);
    let mask = w.file("mask.txt", "mask one");
    let (base, _) = run_in(&w, &img.tag, &input, &[&"--mask", &mask, &"--level", &"2"]);
    assert_eq!(base.cache(), "miss");
    let mut keys = vec![base.key()];
    let mut expect_miss = |what: &str, o: Out| {
        assert_eq!(o.cache(), "miss", "changing {what} must make a miss");
        let k = o.key();
        assert!(!keys.contains(&k), "changing {what} must make a new key");
        keys.push(k);
    };

    // A parameter value.
    let (o, out) = run_in(&w, &img.tag, &input, &[&"--mask", &mask, &"--level", &"3"]);
    assert_eq!(read_json(&out.join("params.json"))["level"], 3);
    expect_miss("a parameter value", o);
    // A parameter that was unset, set.
    let (o, _) = run_in(&w, &img.tag, &input, &[&"--mask", &mask, &"--level", &"2", &"--name", &"x"]);
    expect_miss("an optional parameter", o);

    // The file parameter's content, at the same path.
    fs::write(&mask, "mask two").unwrap();
    let (o, out) = run_in(&w, &img.tag, &input, &[&"--mask", &mask, &"--level", &"2"]);
    assert_eq!(read(&out.join("mask")), "mask two");
    expect_miss("a file parameter's content", o);
    fs::write(&mask, "mask one").unwrap();

    // The input tree: a file's content (same size), then an added empty folder.
    fs::write(input.join("d/b.txt"), "BETA").unwrap();
    let (o, out) = run_in(&w, &img.tag, &input, &[&"--mask", &mask, &"--level", &"2"]);
    assert_eq!(read(&out.join("input-copy/d/b.txt")), "BETA");
    expect_miss("an input file's content", o);
    fs::write(input.join("d/b.txt"), "beta").unwrap();
    fs::create_dir(input.join("empty")).unwrap();
    let (o, out) = run_in(&w, &img.tag, &input, &[&"--mask", &mask, &"--level", &"2"]);
    assert!(out.join("input-copy/empty").is_dir());
    expect_miss("an added empty folder", o);
    fs::remove_dir(input.join("empty")).unwrap();

    // An environment variable, and the salt.
    let (o, out) = run_in(&w, &img.tag, &input, &[&"--mask", &mask, &"--level", &"2", &"--env", &"EXTRA=1"]);
    assert_eq!(read(&out.join("extra")), "1\n");
    expect_miss("`--env`", o);
    let (o, _) = run_in(&w, &img.tag, &input, &[&"--mask", &mask, &"--level", &"2", &"--env", &"EXTRA=2"]);
    expect_miss("an `--env` value", o);
    let (o, _) = run_in(&w, &img.tag, &input, &[&"--mask", &mask, &"--level", &"2", &"--salt", &"s1"]);
    expect_miss("`--salt`", o);

    // Everything back as it was: the first result again.
    let (o, _) = run_in(&w, &img.tag, &input, &[&"--mask", &mask, &"--level", &"2"]);
    assert_eq!(o.cache(), "hit");
    assert_eq!(o.key(), base.key());
    assert_no_containers(&img);
}

#[test]
fn a_rebuilt_image_under_the_same_tag_makes_a_miss() {
    let old = image("cache-rebuild-old");
    let new = build(
        ImageBuilder::new("cache-rebuild-new")
            .kliko_yml(&spec_yml(4, "split", FIELDS))
            .kliko_script(&format!("{SCRIPT}\necho v2 > /output/version")),
    );
    assert_ne!(old.id, new.id);
    let w = World::new();
    let input = w.folder("in", &[("a.txt", "alpha")]);
    let (first, _) = run_in(&w, &old.tag, &input, &[]);
    assert_eq!(first.cache(), "miss");

    // Move the old tag to the new image: the old image is left without a tag (remove it now).
    let tagged = Command::new("docker").args(["tag", &new.id, &old.tag]).output().expect("docker tag");
    assert!(tagged.status.success(), "{}", String::from_utf8_lossy(&tagged.stderr));
    let (second, out) = run_in(&w, &old.tag, &input, &[]);
    assert_no_containers(&old);
    let _ = Command::new("docker").args(["image", "rm", "--force", &old.id]).output();
    assert_eq!(second.cache(), "miss", "the same tag on another image must not be a hit");
    assert_ne!(second.key(), first.key());
    assert_eq!(second.json()["image_id"], new.id.as_str());
    assert_eq!(read(&out.join("version")), "v2\n");
    assert_no_containers(&new);
}

#[test]
fn changes_outside_the_key_stay_a_hit() {
    let img = image("cache-key-hit");
    let w = World::new();
    let input = w.folder("in", &[("a.txt", "alpha"), ("d/b.txt", "beta")]);
    let mask = w.file("mask.txt", "the mask");
    let (base, reference) = run_in(&w, &img.tag, &input, &[&"--mask", &mask, &"--level", &"2", &"--name", &"n"]);
    assert_eq!(base.cache(), "miss");
    let expect_hit = |what: &str, (o, out): (Out, PathBuf)| {
        assert_eq!(o.cache(), "hit", "{what} must stay a hit");
        assert_eq!(o.key(), base.key(), "{what} must not change the key");
        assert_eq!(read_tree(&out), read_tree(&reference), "{what}: the output must be the same");
    };

    // Only the mtimes of the input files change.
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
    for f in ["a.txt", "d/b.txt"] {
        fs::File::options().write(true).open(input.join(f)).unwrap().set_modified(later).unwrap();
    }
    expect_hit(
        "touching input files",
        run_in(&w, &img.tag, &input, &[&"--mask", &mask, &"--level", &"2", &"--name", &"n"]),
    );

    // The same input at another host path.
    let copy = w.folder("elsewhere/copy-of-in", &[("a.txt", "alpha"), ("d/b.txt", "beta")]);
    expect_hit(
        "the same input elsewhere",
        run_in(&w, &img.tag, &copy, &[&"--mask", &mask, &"--level", &"2", &"--name", &"n"]),
    );

    // The parameters in another order, and given another way.
    expect_hit("parameter order", run_in(&w, &img.tag, &input, &[&"--name", &"n", &"--level", &"2", &"--mask", &mask]));
    let level = "level=2";
    expect_hit("`--param`", run_in(&w, &img.tag, &input, &[&"-p", &level, &"--name", &"n", &"--mask", &mask]));

    // The same file parameter content at another path (and name).
    let other = w.file("other/place/renamed.bin", "the mask");
    expect_hit(
        "the same file content elsewhere",
        run_in(&w, &img.tag, &input, &[&"--mask", &other, &"--level", &"2", &"--name", &"n"]),
    );

    // Resource limits, the timeout and the user are not part of the key.
    expect_hit(
        "`--memory/--cpus/--timeout`",
        run_in(
            &w,
            &img.tag,
            &input,
            &[
                &"--mask",
                &mask,
                &"--level",
                &"2",
                &"--name",
                &"n",
                &"--memory",
                &"256m",
                &"--cpus",
                &"0.5",
                &"--timeout",
                &"1h",
            ],
        ),
    );
    expect_hit(
        "`--user`",
        run_in(&w, &img.tag, &input, &[&"--mask", &mask, &"--level", &"2", &"--name", &"n", &"--user", &"1234:1234"]),
    );

    // The default made explicit is the same value.
    expect_hit(
        "a default given explicitly",
        run_in(&w, &img.tag, &input, &[&"--mask", &mask, &"--level", &"2", &"--name", &"n", &"--env", &"INPUT=/input"]),
    );
    assert_no_containers(&img);
}

#[test]
fn explain_prints_the_preimage_and_the_differences_and_runs_nothing() {
    let img = image("cache-explain");
    let w = World::new();
    let input = w.folder("in", &[("a.txt", "alpha")]);
    let (base, _) = run_in(&w, &img.tag, &input, &[&"--level", &"2"]);

    let out = w.path("explain-out");
    let since = docker_now();
    let o =
        w.run(&[&img.tag, &"--input", &input, &"--output", &out, &"--level", &"5", &"--salt", &"abc", &"--explain"]);
    let until = docker_now();
    o.ok();
    assert_eq!(containers_created(&img, &since, &until), 0, "--explain runs nothing");
    assert!(!out.exists(), "--explain writes no output");
    let t = &o.stdout;
    assert!(t.contains("stored: no"), "{t}");
    assert!(t.contains(&img.id), "the pre-image names the image ID:\n{t}");
    assert!(t.contains("\"input\""), "{t}");
    assert!(t.contains("\"parameters\""), "{t}");
    assert!(t.contains(&base.key()), "the nearest stored run is named:\n{t}");
    assert!(t.contains("parameters.level: 2 → 5"), "{t}");
    assert!(t.contains("salt: null → \"abc\""), "{t}");
    assert!(!t.contains("input:"), "the input did not change:\n{t}");

    // As JSON: the same pre-image the stored result was made from.
    let o = w.run(&[&img.tag, &"--input", &input, &"--level", &"2", &"--explain", &"--json"]);
    o.ok();
    let x: serde_json::Value = serde_json::from_str(&o.stdout).expect("JSON");
    assert_eq!(x["stored"], true);
    assert_eq!(x["key"], base.key().as_str());
    assert_eq!(x["preimage"]["image_id"], img.id.as_str());
    assert_eq!(x["preimage"]["parameters"]["level"], 2);
    assert!(x["preimage"]["input"].as_str().is_some_and(|s| s.len() == 64), "{x}");
    assert_no_containers(&img);
}

/// Two machines (two stores) sharing a folder tier: the second gets the first's result
/// without a container, and says where it came from.
#[test]
fn a_result_from_another_machine_through_a_shared_folder() {
    let img = image("cache-shared");
    let (a, b) = (World::new(), World::new());
    let tier = a.path("tier");
    let input = a.folder("in", &[("a.txt", "alpha")]);
    let shared = |w: &World, out: &Path| {
        let mut c = w.kliko();
        c.arg("--remote").arg(&tier).arg("run").arg(&img.tag).arg("--input").arg(&input).arg("--output").arg(out);
        c.arg("--json");
        Out::of(&mut c)
    };
    let made = shared(&a, &a.path("out"));
    made.ok();
    assert_eq!(made.cache(), "miss");
    assert!(made.json()["published"]["uploaded"].as_u64().unwrap() > 0, "{}", made.stdout);

    let since = docker_now();
    let got = shared(&b, &b.path("out"));
    let until = docker_now();
    got.ok();
    assert_eq!((got.cache().as_str(), got.json()["hit_from"].as_str()), ("hit", Some("remote")));
    assert_eq!(got.key(), made.key());
    // The second machine creates no container at all: not for the step, and not to read the
    // image's kliko.yml (the first machine left it on the tier).
    assert_eq!(containers_created(&img, &since, &until), 0, "a shared hit creates no container");
    assert_eq!(read_tree(&b.path("out")), read_tree(&a.path("out")));
    // Its provenance came along: `kliko show` on the second machine knows the run.
    let show = Out::of(b.kliko().args(["show", &got.key()[..16]]));
    show.ok();
    assert!(show.stdout.contains("ran"), "{}", show.stdout);

    // A shared folder given relatively is refused, before anything runs.
    let mut c = b.kliko();
    c.args(["--remote", "relative/tier", "run", &img.tag, "--input"]).arg(&input).arg("--output").arg(b.path("o2"));
    let o = Out::of(&mut c);
    o.expect_code(2);
    assert!(o.stderr.contains("absolute path"), "{}", o.stderr);
    assert_no_containers(&img);
}
