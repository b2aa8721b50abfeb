//! Tiny Docker images for tests, built offline and removed afterwards.
//!
//! Images are built `FROM scratch` by the `docker` CLI from a root
//! filesystem assembled in a temporary directory: the host's static busybox
//! (`/bin/busybox`, from Debian's `busybox-static`; override with
//! `KLIKO_TEST_BUSYBOX`) with a symlink per applet, plus the files a test
//! asks for. Nothing is pulled and nothing runs at build time, so building
//! works without a registry and without a shell in the image. Every image
//! gets a unique tag ([`unique_tag`]) and is removed when its [`TestImage`] is
//! dropped.
//!
//! ```no_run
//! use kliko_testkit::ImageBuilder;
//!
//! let image = ImageBuilder::new("example")
//!     .kliko_yml("schema_version: 3\nio: join\nsections: []\n")
//!     .kliko_script("echo hello; ls /work")
//!     .build()
//!     .expect("docker build");
//! // use image.tag or image.id; the image is removed at the end of scope
//! ```

use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};

/// Where the static busybox is taken from, unless `KLIKO_TEST_BUSYBOX` says otherwise.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// The applets linked when `busybox --list` is unavailable.
const FALLBACK_APPLETS: &[&str] = &[
    "sh",
    "cat",
    "ls",
    "sleep",
    "echo",
    "id",
    "wc",
    "cp",
    "mkdir",
    "ip",
    "rm",
    "mv",
    "ln",
    "touch",
    "test",
    "[",
    "printf",
    "true",
    "false",
    "env",
    "head",
    "tail",
    "grep",
    "sed",
    "find",
    "stat",
    "chmod",
    "kill",
    "yes",
    "dd",
    "sha256sum",
    "seq",
    "tr",
];

/// A locally built image that is removed (by tag, forcibly) when dropped.
#[derive(Debug)]
pub struct TestImage {
    /// Unique `repo:tag`, see [`unique_tag`].
    pub tag: String,
    /// `sha256:<64 hex>`.
    pub id: String,
}

impl Drop for TestImage {
    fn drop(&mut self) {
        // By tag, not id: two identical builds can share an id, and the other
        // test still needs its image. Best effort: a failure must not panic
        // inside a (possibly already panicking) test.
        let _ = Command::new("docker").args(["image", "rm", "--force", &self.tag]).output();
    }
}

/// Builds a [`TestImage`]; see the crate docs.
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    prefix: String,
    files: Vec<(String, Vec<u8>, u32)>,
    symlinks: Vec<(String, String)>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    user: Option<String>,
    labels: Vec<(String, String)>,
    workdir: Option<String>,
    shell: bool,
    base: Option<String>,
    build_steps: Vec<Vec<String>>,
}

impl ImageBuilder {
    /// `prefix` goes into the tag, to tell which test made an image.
    pub fn new(prefix: &str) -> Self {
        ImageBuilder {
            prefix: prefix.to_string(),
            files: Vec::new(),
            symlinks: Vec::new(),
            entrypoint: None,
            cmd: None,
            user: None,
            labels: Vec::new(),
            workdir: None,
            shell: true,
            base: None,
            build_steps: Vec::new(),
        }
    }

    /// `/kliko.yml`, mode 0644.
    pub fn kliko_yml(self, yml: &str) -> Self {
        self.file("/kliko.yml", yml.as_bytes(), 0o644)
    }

    /// `/kliko`, mode 0755: a busybox `sh` script (`#!/bin/sh` is prepended
    /// unless the text starts with `#!`).
    pub fn kliko_script(self, script: &str) -> Self {
        let text = if script.starts_with("#!") { script.to_string() } else { format!("#!/bin/sh\n{script}\n") };
        self.file("/kliko", text.as_bytes(), 0o755)
    }

    /// `/kliko` as a static binary compiled from C source with `gcc -static`,
    /// for images without a shell. Panics if the compiler fails: that is a
    /// broken test, not a condition to handle.
    pub fn kliko_c(self, c_source: &str) -> Self {
        let binary = static_c_binary(c_source).unwrap_or_else(|e| panic!("compiling the test's C source failed: {e}"));
        self.file("/kliko", &binary, 0o755)
    }

    /// Any file at an absolute path in the image; parent directories are created (0755).
    pub fn file(mut self, path_in_image: &str, bytes: &[u8], mode: u32) -> Self {
        self.files.push((path_in_image.to_string(), bytes.to_vec(), mode));
        self
    }

    /// A symlink at `link` (absolute) pointing at `target`, stored as given.
    pub fn symlink(mut self, link: &str, target: &str) -> Self {
        self.symlinks.push((link.to_string(), target.to_string()));
        self
    }

    pub fn entrypoint(mut self, entrypoint: Vec<String>) -> Self {
        self.entrypoint = Some(entrypoint);
        self
    }

    pub fn cmd(mut self, cmd: Vec<String>) -> Self {
        self.cmd = Some(cmd);
        self
    }

    /// The image's `USER`.
    pub fn user(mut self, user: &str) -> Self {
        self.user = Some(user.to_string());
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.to_string(), value.to_string()));
        self
    }

    pub fn workdir(mut self, dir: &str) -> Self {
        self.workdir = Some(dir.to_string());
        self
    }

    /// No busybox at all: no `/bin/sh`, nothing but the files given. `/kliko`
    /// must then be a static binary ([`ImageBuilder::kliko_c`]).
    pub fn no_shell(mut self) -> Self {
        self.shell = false;
        self
    }

    /// Build on top of another image (a tag or id) instead of `scratch`: the files given
    /// here become a layer above the base's.
    pub fn on(mut self, base: &str) -> Self {
        self.base = Some(base.to_string());
        self
    }

    /// A `RUN` step (exec form, run with no network) after the files are copied in, for
    /// layers that delete or change what a base image holds: `["/bin/busybox", "rm", "/x"]`.
    pub fn run_in_build(mut self, argv: &[&str]) -> Self {
        self.build_steps.push(argv.iter().map(|a| a.to_string()).collect());
        self
    }

    /// Build and tag the image with the `docker` CLI.
    pub fn build(self) -> io::Result<TestImage> {
        let context = tempfile::Builder::new().prefix("kliko-testkit-").tempdir()?;
        let rootfs = context.path().join("rootfs");
        make_dir(&rootfs)?;
        make_dir(&rootfs.join("tmp"))?;
        std::fs::set_permissions(rootfs.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
        if self.shell {
            install_busybox(&rootfs)?;
        }
        for (path, bytes, mode) in &self.files {
            let dest = in_rootfs(&rootfs, path)?;
            if let Some(parent) = dest.parent() {
                make_dir(parent)?;
            }
            std::fs::write(&dest, bytes).map_err(|e| at(&dest, e))?;
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(*mode)).map_err(|e| at(&dest, e))?;
        }
        for (link, target) in &self.symlinks {
            let dest = in_rootfs(&rootfs, link)?;
            if let Some(parent) = dest.parent() {
                make_dir(parent)?;
            }
            symlink(target, &dest).map_err(|e| at(&dest, e))?;
        }

        let mut dockerfile = format!("FROM {}\nCOPY rootfs/ /\n", self.base.as_deref().unwrap_or("scratch"));
        let json = |v: &[String]| {
            let quoted: Vec<String> = v.iter().map(|s| json_string(s)).collect();
            format!("[{}]", quoted.join(", "))
        };
        for step in &self.build_steps {
            dockerfile.push_str(&format!("RUN {}\n", json(step)));
        }
        if let Some(e) = &self.entrypoint {
            dockerfile.push_str(&format!("ENTRYPOINT {}\n", json(e)));
        }
        if let Some(c) = &self.cmd {
            dockerfile.push_str(&format!("CMD {}\n", json(c)));
        }
        if let Some(u) = &self.user {
            dockerfile.push_str(&format!("USER {u}\n"));
        }
        if let Some(w) = &self.workdir {
            dockerfile.push_str(&format!("WORKDIR {w}\n"));
        }
        for (k, v) in &self.labels {
            dockerfile.push_str(&format!("LABEL {}={}\n", json_string(k), json_string(v)));
        }
        let dockerfile_path = context.path().join("Dockerfile");
        std::fs::write(&dockerfile_path, dockerfile).map_err(|e| at(&dockerfile_path, e))?;

        let tag = unique_tag(&self.prefix);
        // --no-cache: parallel tests never share (and so never race to delete)
        // intermediate images.
        let mut build = Command::new("docker");
        build
            .args(["build", "--quiet", "--no-cache", "--force-rm", "--network", "none", "--tag", &tag])
            .arg(context.path());
        run_ok(&mut build, "docker build")?;
        // From here the tag exists: own it, so a failure below still removes it.
        let mut image = TestImage { tag, id: String::new() };
        let out = run_ok(
            Command::new("docker").args(["image", "inspect", "--format", "{{.Id}}", &image.tag]),
            "docker image inspect",
        )?;
        image.id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(image)
    }
}

/// A tag no other test (in this or a concurrent process) uses:
/// `kliko-test-<prefix>-<pid>-<counter>:latest`.
pub fn unique_tag(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let clean: String = prefix
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '-',
        })
        .collect();
    format!("kliko-test-{clean}-{}-{n}:latest", std::process::id())
}

/// Compile C source into a static executable with `gcc -static -Os`.
pub fn static_c_binary(c_source: &str) -> io::Result<Vec<u8>> {
    let dir = tempfile::Builder::new().prefix("kliko-testkit-cc-").tempdir()?;
    let src = dir.path().join("main.c");
    let bin = dir.path().join("main");
    std::fs::write(&src, c_source).map_err(|e| at(&src, e))?;
    run_ok(Command::new("gcc").args(["-static", "-Os", "-s", "-o"]).arg(&bin).arg(&src), "gcc -static")?;
    std::fs::read(&bin).map_err(|e| at(&bin, e))
}

/// Ids of all containers (running or not) with the label `key=value`, via the CLI.
pub fn containers_with_label(key: &str, value: &str) -> io::Result<Vec<String>> {
    let out = run_ok(
        Command::new("docker").args([
            "ps",
            "--all",
            "--quiet",
            "--no-trunc",
            "--filter",
            &format!("label={key}={value}"),
        ]),
        "docker ps",
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect())
}

/// Force-remove containers, best effort (for test teardown).
pub fn remove_containers(ids: &[String]) {
    if !ids.is_empty() {
        let _ = Command::new("docker").args(["rm", "--force", "--volumes"]).args(ids).output();
    }
}

fn install_busybox(rootfs: &Path) -> io::Result<()> {
    let source =
        std::env::var_os("KLIKO_TEST_BUSYBOX").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_BUSYBOX));
    let bin = rootfs.join("bin");
    make_dir(&bin)?;
    let dest = bin.join("busybox");
    std::fs::copy(&source, &dest).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "copying busybox from `{}` failed: {e} (install `busybox-static` or set KLIKO_TEST_BUSYBOX)",
                source.display()
            ),
        )
    })?;
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755)).map_err(|e| at(&dest, e))?;
    let listed = Command::new(&source).arg("--list").output().ok();
    let applets: Vec<String> = match listed {
        Some(out) if out.status.success() && !out.stdout.is_empty() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|a| !a.is_empty() && !a.contains('/') && *a != "busybox")
            .map(str::to_string)
            .collect(),
        _ => FALLBACK_APPLETS.iter().map(|a| a.to_string()).collect(),
    };
    for applet in applets {
        let link = bin.join(&applet);
        symlink("busybox", &link).map_err(|e| at(&link, e))?;
    }
    Ok(())
}

fn in_rootfs(rootfs: &Path, path_in_image: &str) -> io::Result<PathBuf> {
    let rel = Path::new(path_in_image.trim_start_matches('/'));
    let clean = rel.components().all(|c| matches!(c, Component::Normal(_)));
    if !path_in_image.starts_with('/') || !clean || rel.as_os_str().is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{path_in_image}` is not a clean absolute path in the image"),
        ));
    }
    Ok(rootfs.join(rel))
}

fn make_dir(path: &Path) -> io::Result<()> {
    std::fs::create_dir_all(path).map_err(|e| at(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(|e| at(path, e))
}

fn at(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("`{}`: {e}", path.display()))
}

fn run_ok(cmd: &mut Command, what: &str) -> io::Result<Output> {
    let out = cmd.output().map_err(|e| io::Error::new(e.kind(), format!("cannot run `{what}`: {e}")))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(io::Error::other(format!(
            "`{what}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A JSON string literal, for Dockerfile exec-form arrays and labels.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_unique_and_valid() {
        let a = unique_tag("My Test");
        let b = unique_tag("My Test");
        assert_ne!(a, b);
        assert!(a.starts_with("kliko-test-my-test-"));
        assert!(a.ends_with(":latest"));
    }

    #[test]
    fn rejects_unclean_paths() {
        let root = Path::new("/r");
        assert!(in_rootfs(root, "relative").is_err());
        assert!(in_rootfs(root, "/a/../b").is_err());
        assert_eq!(in_rootfs(root, "/a/b").unwrap(), PathBuf::from("/r/a/b"));
    }

    #[test]
    fn json_strings_escape() {
        assert_eq!(json_string("a\"b\\c"), r#""a\"b\\c""#);
    }
}
