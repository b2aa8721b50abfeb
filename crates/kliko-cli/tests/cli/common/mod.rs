//! Shared helpers for the `kliko run` integration tests: the real binary, the real Docker
//! daemon, tiny images built by `kliko-testkit`, one temporary store per test.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use kliko_testkit::{ImageBuilder, TestImage};
use serde_json::Value;

/// The kliko under test: `KLIKO_TEST_BIN` (a copy another user may run), else cargo's.
pub fn kliko_bin() -> PathBuf {
    std::env::var_os("KLIKO_TEST_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_kliko")))
}

/// A test's private world: a temporary folder holding its store and its data folders.
pub struct World {
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
}

impl World {
    pub fn new() -> World {
        let dir = tempfile::Builder::new().prefix("kliko-run-test-").tempdir().expect("temp dir");
        let store = dir.path().join("store");
        World { dir, store }
    }

    /// A path inside the test's folder (not created).
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A folder inside the test's folder holding `files` (`(relative path, content)`).
    pub fn folder(&self, rel: &str, files: &[(&str, &str)]) -> PathBuf {
        let root = self.path(rel);
        fs::create_dir_all(&root).expect("create folder");
        for (name, content) in files {
            let p = root.join(name);
            if let Some(parent) = p.parent() {
                fs::create_dir_all(parent).expect("create parent");
            }
            fs::write(&p, content).expect("write file");
        }
        root
    }

    /// A file inside the test's folder.
    pub fn file(&self, rel: &str, content: &str) -> PathBuf {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).expect("create parent");
        }
        fs::write(&p, content).expect("write file");
        p
    }

    /// `kliko --store STORE` (and no `KLIKO_STORE` from the environment).
    pub fn kliko(&self) -> Command {
        let mut c = Command::new(kliko_bin());
        c.env_remove("KLIKO_STORE").env_remove("KLIKO_REMOTE").arg("--store").arg(&self.store);
        // This world's own signing key (made by `kliko remote key new`), none of the user's.
        c.env("KLIKO_SIGNING_KEY", self.path("signing-key")).env_remove("KLIKO_TRUSTED_KEYS");
        c
    }

    /// `kliko --store STORE run ARGS…`, run to completion.
    pub fn run(&self, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Out {
        let mut c = self.kliko();
        c.arg("run");
        for a in args {
            c.arg(a.as_ref());
        }
        Out::of(&mut c)
    }
}

/// What a finished `kliko` process left.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub cmd: String,
}

impl Out {
    pub fn of(c: &mut Command) -> Out {
        let o: Output = c.output().expect("kliko runs");
        Out::from_output(format!("{c:?}"), o)
    }

    pub fn from_output(cmd: String, o: Output) -> Out {
        use std::os::unix::process::ExitStatusExt;
        let code = o.status.code().unwrap_or_else(|| 128 + o.status.signal().unwrap_or(0));
        Out {
            code,
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            cmd,
        }
    }

    /// Panics with everything the process printed unless it exited with `code`.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Out {
        assert_eq!(
            self.code, code,
            "{} exited with {} (wanted {code})\n--- stdout\n{}\n--- stderr\n{}",
            self.cmd, self.code, self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    pub fn ok(&self) -> &Out {
        self.expect_code(0)
    }

    /// The `--json` report: the last line of stdout.
    #[track_caller]
    pub fn json(&self) -> Value {
        let line = self.stdout.lines().last().unwrap_or_else(|| panic!("no stdout from {}: {}", self.cmd, self.stderr));
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}\nstderr: {}", self.stderr))
    }

    /// `"hit"` or `"miss"` from the `--json` report.
    #[track_caller]
    pub fn cache(&self) -> String {
        self.json()["cache"].as_str().expect("cache in the report").to_string()
    }

    #[track_caller]
    pub fn key(&self) -> String {
        self.json()["key"].as_str().expect("key in the report").to_string()
    }
}

/// Build an image; a build failure is a broken test environment.
pub fn build(b: ImageBuilder) -> TestImage {
    b.build().unwrap_or_else(|e| panic!("building a test image failed: {e}"))
}

/// A split image with this kliko.yml body (fields of one section) and script.
pub fn split_image(prefix: &str, fields_yml: &str, script: &str) -> TestImage {
    build(ImageBuilder::new(prefix).kliko_yml(&spec_yml(4, "split", fields_yml)).kliko_script(script))
}

/// A kliko.yml with one section holding `fields_yml` (a YAML list, indented by 6, or empty).
pub fn spec_yml(version: u32, io: &str, fields_yml: &str) -> String {
    let fields = if fields_yml.trim().is_empty() { "      []\n".to_string() } else { fields_yml.to_string() };
    format!(
        "schema_version: {version}\nname: test\ndescription: a test image\nauthor: tests\n\
         container: kliko/test\nemail: tests@example.org\nio: {io}\nsections:\n  - name: main\n    \
         description: the settings\n    fields:\n{fields}"
    )
}

/// Containers (any state) made from `image`: there must be none once a test is done.
pub fn containers_of(image: &TestImage) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "--all", "--quiet", "--no-trunc", "--filter"])
        .arg(format!("ancestor={}", image.id))
        .output()
        .expect("docker ps");
    assert!(out.status.success(), "docker ps: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

/// Panics (after removing them) if containers made from `image` are left.
#[track_caller]
pub fn assert_no_containers(image: &TestImage) {
    let left = containers_of(image);
    kliko_testkit::remove_containers(&left);
    assert!(left.is_empty(), "containers left behind for `{}`: {left:?}", image.tag);
}

/// A point in time for `docker events --since/--until`.
pub fn docker_now() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970");
    format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
}

/// Containers created from `image` between `since` and `until` (from the daemon's event log,
/// so a container that came and went in between is counted too).
pub fn containers_created(image: &TestImage, since: &str, until: &str) -> usize {
    container_events(image, since, until, "create")
}

/// Containers of `image` started between `since` and `until` (created without starting:
/// only to read a file out of the image).
pub fn containers_started(image: &TestImage, since: &str, until: &str) -> usize {
    container_events(image, since, until, "start")
}

fn container_events(image: &TestImage, since: &str, until: &str, event: &str) -> usize {
    let out = Command::new("docker")
        .args(["events", "--since", since, "--until", until])
        .args(["--filter", "type=container", "--filter"])
        .arg(format!("event={event}"))
        .args(["--format", "{{.Actor.Attributes.image}}"])
        .output()
        .expect("docker events");
    assert!(out.status.success(), "docker events: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| *l == image.id || *l == image.tag).count()
}

/// Waits (polling, with a deadline) until `cond` holds; panics with `what` otherwise.
#[track_caller]
pub fn wait_for(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Running containers that `kliko run` made from `image` (they carry the key label).
pub fn running_kliko_containers(image: &TestImage) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "--quiet", "--no-trunc", "--filter", "label=io.kliko.key", "--filter", "status=running"])
        .arg("--filter")
        .arg(format!("ancestor={}", image.id))
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

/// Whether `--explain` says a result is stored for this invocation (`args` as for `run`).
pub fn stored(w: &World, args: &[&dyn AsRef<std::ffi::OsStr>]) -> bool {
    let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> = args.to_vec();
    all.push(&"--explain");
    all.push(&"--json");
    let o = w.run(&all);
    o.ok();
    let v: Value =
        serde_json::from_str(&o.stdout).unwrap_or_else(|e| panic!("--explain --json is not JSON ({e}): {}", o.stdout));
    v["stored"].as_bool().expect("`stored` in the explanation")
}

/// Every file under `root` (relative path → content), for comparing trees.
pub fn read_tree(root: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap_or_else(|e| panic!("read_dir `{}`: {e}", d.display())) {
            let e = e.expect("dir entry");
            let p = e.path();
            let rel = p.strip_prefix(root).expect("under root").to_string_lossy().into_owned();
            if e.file_type().expect("file type").is_dir() {
                out.insert(format!("{rel}/"), Vec::new());
                stack.push(p);
            } else {
                out.insert(rel, fs::read(&p).expect("read file"));
            }
        }
    }
    out
}

/// The text of a file, with its path in the panic message.
#[track_caller]
pub fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("reading `{}`: {e}", p.display()))
}

/// Parses a JSON file.
#[track_caller]
pub fn read_json(p: &Path) -> Value {
    let t = read(p);
    serde_json::from_str(&t).unwrap_or_else(|e| panic!("`{}` is not JSON ({e}): {t}", p.display()))
}
