//! Hardening: a reader that stops early (`| head`), symbolic links given for file parameters
//! and output folders, an output folder inside its input, and a store that someone else could
//! change (or no place for one at all).

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::common::*;

/// Runs `c` with stdout a pipe whose reading end is already closed: its first write fails.
fn with_closed_stdout(c: &mut Command) -> Out {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let o = c.stdout(Stdio::from(writer)).stderr(Stdio::piped()).output().expect("kliko runs");
    Out::from_output(format!("{c:?}"), o)
}

#[test]
fn a_reader_that_stops_early_is_a_quiet_exit() {
    let img = split_image("closed-stdout", "", "for i in 1 2 3; do echo line $i > /output/f$i.txt; done\necho done");
    let w = World::new();
    let input = w.folder("in", &[("a.txt", "a\n")]);
    let out = w.path("out");
    let o = w.run(&[&img.tag, &"--input", &input, &"--output", &out, &"--json"]);
    o.ok();
    let key = o.key();
    let file = out.join("f1.txt");
    let cases: Vec<Vec<std::ffi::OsString>> = vec![
        vec!["history".into()],
        vec!["provenance".into(), key.clone().into()],
        vec!["provenance".into(), file.clone().into(), "--json".into()],
        vec!["show".into(), key.clone().into()],
        vec!["hash".into(), file.clone().into(), out.join("f2.txt").into(), out.clone().into(), input.clone().into()],
        vec!["store".into(), "stats".into()],
        vec!["validate".into(), w.file("kliko.yml", &spec_yml(4, "split", "")).into()],
        vec![
            "run".into(),
            img.tag.clone().into(),
            "--input".into(),
            input.clone().into(),
            "--output".into(),
            w.path("out2").into(),
            "--explain".into(),
        ],
        // A miss shows the container's logs on stdout, as they come.
        vec![
            "run".into(),
            img.tag.clone().into(),
            "--input".into(),
            input.clone().into(),
            "--output".into(),
            w.path("out3").into(),
            "--no-cache".into(),
        ],
        vec!["run".into(), "--help".into()],
        vec!["--help".into()],
    ];
    for args in &cases {
        let mut c = w.kliko();
        c.args(args);
        let o = with_closed_stdout(&mut c);
        assert!(!o.stderr.contains("panicked"), "{args:?} panicked:\n{}", o.stderr);
        assert!(!o.stderr.contains("RUST_BACKTRACE"), "{args:?}:\n{}", o.stderr);
        assert!(!o.stderr.contains("Broken pipe"), "{args:?} must say nothing of the pipe:\n{}", o.stderr);
        o.ok();
    }
    // The run whose logs found no reader still finished, stored its result and placed it.
    assert_eq!(read(&w.path("out3").join("f3.txt")), "line 3\n");
    assert_no_containers(&img);
}

#[test]
fn a_stdout_that_fails_otherwise_is_reported() {
    let w = World::new();
    let f = w.file("a.txt", "a\n");
    let mut c = w.kliko();
    c.arg("hash").arg(&f).stdout(fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full"));
    let o = Out::of(&mut c);
    o.expect_code(2);
    assert!(o.stderr.contains("cannot write to standard output"), "{}", o.stderr);
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
}

#[test]
fn symbolic_links_to_a_parameter_file_and_to_an_output_folder_are_followed() {
    let fields = "      - name: calibration\n        type: file\n";
    let img = split_image("links", fields, "cat /param_files/calibration > /output/cal.txt");
    let w = World::new();
    let input = w.folder("in", &[]);
    let cal = w.file("data/cal.txt", "gain 2\n");
    let link = w.path("cal-link.txt");
    symlink(&cal, &link).expect("symlink");
    // The output folder is a link to an (empty) folder elsewhere.
    let real_out = w.folder("elsewhere/out", &[]);
    let out_link = w.path("out");
    symlink(&real_out, &out_link).expect("symlink");
    let o = w.run(&[&img.tag, &"--input", &input, &"--output", &out_link, &"--calibration", &link, &"--json"]);
    o.ok();
    assert_eq!(o.cache(), "miss");
    assert_eq!(read(&real_out.join("cal.txt")), "gain 2\n", "the target's content is what the container reads");
    assert!(fs::symlink_metadata(&out_link).expect("link").file_type().is_symlink(), "the link stays a link");
    // The key holds the target's content: the file itself gives the same key (a hit).
    let o2 = w.run(&[&img.tag, &"--input", &input, &"--output", &w.path("out2"), &"--calibration", &cal, &"--json"]);
    o2.ok();
    assert_eq!((o2.cache(), o2.key()), ("hit".to_string(), o.key()));
    assert_no_containers(&img);
}

#[test]
fn a_dangling_output_link_and_a_missing_parameter_file_are_refused_before_running() {
    let fields = "      - name: calibration\n        type: file\n";
    // (Not the script of the test above: the same image ID would count its containers.)
    let img = split_image("dangling", fields, "cp /param_files/calibration /output/");
    let w = World::new();
    let input = w.folder("in", &[]);
    let cal = w.file("cal.txt", "gain 2\n");
    w.run(&[&img.tag, &"--help"]).ok();
    let since = docker_now();
    let out_link = w.path("out");
    symlink(w.path("nowhere"), &out_link).expect("symlink");
    let o = w.run(&[&img.tag, &"--input", &input, &"--output", &out_link, &"--calibration", &cal]);
    o.expect_code(2);
    assert!(o.stderr.contains("is a symbolic link to") && o.stderr.contains("which does not exist"), "{}", o.stderr);

    // A missing file names its parameter and its path, once.
    let missing = w.path("no-such-cal.txt");
    let o = w.run(&[&img.tag, &"--input", &input, &"--output", &w.path("o2"), &"--calibration", &missing]);
    o.expect_code(2);
    let want = format!("parameter `calibration`: `{}` does not exist", missing.display());
    assert_eq!(o.stderr.matches(&want).count(), 1, "{}", o.stderr);
    // A link to nothing says so.
    let dangling = w.path("cal-link.txt");
    symlink(w.path("gone.txt"), &dangling).expect("symlink");
    let o = w.run(&[&img.tag, &"--input", &input, &"--output", &w.path("o3"), &"--calibration", &dangling]);
    o.expect_code(2);
    assert!(o.stderr.contains("parameter `calibration`") && o.stderr.contains("symbolic link"), "{}", o.stderr);
    // A folder is not a file.
    let o = w.run(&[&img.tag, &"--input", &input, &"--output", &w.path("o4"), &"--calibration", &input]);
    o.expect_code(2);
    assert!(o.stderr.contains("parameter `calibration`") && o.stderr.contains("is a folder"), "{}", o.stderr);
    let until = docker_now();
    assert_eq!(containers_created(&img, &since, &until), 0, "a refused run must create no container");
    assert_no_containers(&img);
}

#[test]
fn an_output_inside_the_input_or_holding_it_is_refused() {
    let img = split_image("nested-io", "", "cp -r /input/. /output/");
    let w = World::new();
    let data = w.folder("data", &[("a.txt", "precious\n")]);
    w.run(&[&img.tag, &"--help"]).ok();
    let since = docker_now();
    // Inside: every result would change the input (a miss each time).
    let o = w.run(&[&img.tag, &"--input", &data, &"--output", &data.join("out")]);
    o.expect_code(2);
    assert!(o.stderr.contains("is inside the input folder"), "{}", o.stderr);
    // Also when the input is named through a link, and the output does not exist yet.
    let link = w.path("data-link");
    symlink(&data, &link).expect("symlink");
    let o = w.run(&[&img.tag, &"--input", &link, &"--output", &data.join("new/deeper")]);
    o.expect_code(2);
    assert!(o.stderr.contains("is inside the input folder"), "{}", o.stderr);
    // Holding it: `--overwrite` would replace the input.
    let o = w.run(&[&img.tag, &"--input", &data, &"--output", &w.dir.path(), &"--overwrite"]);
    o.expect_code(2);
    assert!(o.stderr.contains("holds the input folder"), "{}", o.stderr);
    // The same folder.
    let o = w.run(&[&img.tag, &"--input", &data, &"--output", &link, &"--overwrite"]);
    o.expect_code(2);
    assert!(o.stderr.contains("is the input folder"), "{}", o.stderr);
    let until = docker_now();
    assert_eq!(containers_created(&img, &since, &until), 0, "a refused run must create no container");
    assert_eq!(read(&data.join("a.txt")), "precious\n");
    assert_eq!(fs::read_dir(&data).expect("data").count(), 1, "nothing was written into the input");
    // A sibling is fine.
    w.run(&[&img.tag, &"--input", &data, &"--output", &w.path("data-out")]).ok();
    assert_eq!(read(&w.path("data-out/a.txt")), "precious\n");
    assert_no_containers(&img);
}

/// `kliko store stats` on `store`, as `uid` when given.
fn stats(store: &std::path::Path, uid: Option<u32>) -> Out {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kliko"));
    c.env_remove("KLIKO_STORE").arg("--store").arg(store).args(["store", "stats"]);
    if let Some(u) = uid {
        c.uid(u).gid(u);
    }
    Out::of(&mut c)
}

fn chmod(p: &std::path::Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).expect("chmod");
}

#[test]
fn a_store_that_others_could_change_is_refused() {
    let w = World::new();
    // Other users must be able to reach the stores below (the test's folder is private).
    chmod(w.dir.path(), 0o755);

    let open = w.path("open");
    fs::create_dir(&open).expect("mkdir");
    chmod(&open, 0o777);
    let o = stats(&open, None);
    o.expect_code(2);
    assert!(o.stderr.contains("writable by every user"), "{}", o.stderr);
    assert!(!open.join("FORMAT").exists(), "nothing may be written into a refused store");

    let group = w.path("group");
    fs::create_dir(&group).expect("mkdir");
    chmod(&group, 0o775);
    let o = stats(&group, None);
    o.expect_code(2);
    assert!(o.stderr.contains("writable by its group") && o.stderr.contains("chmod g+s"), "{}", o.stderr);
    // Shared with the group on purpose (setgid): accepted.
    chmod(&group, 0o2775);
    stats(&group, None).ok();

    // Another user's store: refused to a user who is not its owner, accepted for its owner.
    let theirs = w.path("theirs");
    fs::create_dir(&theirs).expect("mkdir");
    std::os::unix::fs::chown(&theirs, Some(4321), Some(4321)).expect("chown");
    let o = stats(&theirs, Some(1234));
    o.expect_code(2);
    assert!(o.stderr.contains("belongs to uid 4321, not to you (uid 1234)"), "{}", o.stderr);
    stats(&theirs, Some(4321)).ok();
    // Root may open any store (it could change any folder anyway).
    stats(&theirs, None).ok();
}

#[test]
fn a_new_store_is_private_whatever_the_umask() {
    let w = World::new();
    let store = w.path("fresh/store");
    let o = Out::of(
        Command::new("sh")
            .arg("-c")
            .arg("umask 000; exec \"$0\" --store \"$1\" store stats")
            .arg(env!("CARGO_BIN_EXE_kliko"))
            .arg(&store)
            .env_remove("KLIKO_STORE"),
    );
    o.ok();
    let mode = fs::metadata(&store).expect("store").permissions().mode();
    assert_eq!(mode & 0o022, 0, "mode {mode:o}");
}

#[test]
fn without_home_or_a_store_setting_there_is_no_store() {
    let w = World::new();
    let mut c = Command::new(env!("CARGO_BIN_EXE_kliko"));
    c.env_remove("KLIKO_STORE").env_remove("HOME").env_remove("XDG_CACHE_HOME").current_dir(w.dir.path());
    let o = Out::of(c.args(["store", "stats"]));
    o.expect_code(2);
    assert!(o.stderr.contains("cannot find a place for the store: set `KLIKO_STORE` or `HOME`"), "{}", o.stderr);
    assert_eq!(fs::read_dir(w.dir.path()).expect("dir").count(), 0, "no store was made anywhere near");
    // `HOME` alone is enough.
    let mut c = Command::new(env!("CARGO_BIN_EXE_kliko"));
    c.env_remove("KLIKO_STORE").env_remove("XDG_CACHE_HOME").env("HOME", w.dir.path());
    Out::of(c.args(["store", "stats"])).ok();
    assert!(w.path(".cache/kliko/FORMAT").exists());
}
