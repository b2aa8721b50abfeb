//! Apptainer (or Singularity): kliko images run from SIF files, without a daemon and without
//! root, as HPC centres allow.
//!
//! An image is still named and keyed by its Docker image ID. Its SIF is built once per ID,
//! from `docker save` of the image (Docker's or Podman's store, whichever answers) and
//! `apptainer build <id>.sif docker-archive:<id>.tar`, and kept in the store under
//! `sif-v1/<id hex>.sif`, beside `sif-v1/<id hex>.json` (the image's metadata and its
//! `/kliko.yml`). A machine without Docker or Podman runs the images whose SIF and metadata
//! are there (copied from a machine that built them).
//!
//! A run is `apptainer exec --containall --cleanenv --no-home --net --network none
//! --writable-tmpfs --bind HOST:CONTAINER[:ro] ... SIF ENTRYPOINT... CMD...`, its environment
//! given as `APPTAINERENV_*` variables (values pass unchanged, commas included); the container
//! runs as the invoking user (Apptainer cannot run as anyone else), so outputs are theirs.
//! `--nv` gives it the GPUs (`CUDA_VISIBLE_DEVICES` picks them).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, OnceCell};
use tokio_util::sync::CancellationToken;

use crate::{
    ContainerRuntime, ContainerSpec, Docker, Gpus, ImageInfo, Labelled, LogChunk, Outcome, Removal, RunOutcome,
    RuntimeError, Stream,
};

/// The folder of the SIF cache inside a store.
pub const SIF_DIR: &str = "sif-v1";

/// The Apptainer runtime (see the module docs).
pub struct Apptainer {
    program: PathBuf,
    version: String,
    sif_dir: PathBuf,
    stop_grace: Duration,
    /// Docker or Podman, for images without a SIF yet; asked for on first need.
    source: OnceCell<Option<Docker>>,
}

/// Find `apptainer` (or `singularity`) on PATH.
pub fn find_program() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for name in ["apptainer", "singularity"] {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

impl Apptainer {
    /// Apptainer from PATH, caching SIFs under `store_root/sif-v1`.
    pub async fn new(store_root: &Path) -> Result<Apptainer, RuntimeError> {
        let program = find_program().ok_or_else(|| RuntimeError::RuntimeUnavailable {
            runtime: "apptainer".into(),
            message: "neither `apptainer` nor `singularity` is installed (on PATH)".into(),
        })?;
        Apptainer::with_program(&program, store_root).await
    }

    /// The Apptainer (or Singularity) at `program`, caching SIFs under `store_root/sif-v1`.
    pub async fn with_program(program: &Path, store_root: &Path) -> Result<Apptainer, RuntimeError> {
        let program = program.to_path_buf();
        let unavailable = |message: String| RuntimeError::RuntimeUnavailable { runtime: "apptainer".into(), message };
        let out = tokio::process::Command::new(&program)
            .arg("--version")
            .output()
            .await
            .map_err(|e| unavailable(format!("cannot run `{} --version`: {e}", program.display())))?;
        let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(Apptainer {
            program,
            version,
            sif_dir: store_root.join(SIF_DIR),
            stop_grace: crate::DEFAULT_STOP_GRACE,
            source: OnceCell::new(),
        })
    }

    /// The time a timed-out or cancelled run gets between `SIGTERM` and `SIGKILL`.
    pub fn with_stop_grace(mut self, grace: Duration) -> Apptainer {
        self.stop_grace = grace;
        self
    }

    /// Where the SIFs are kept.
    pub fn sif_dir(&self) -> &Path {
        &self.sif_dir
    }

    /// The prefix of the environment variables Apptainer passes into the container.
    fn env_prefix(&self) -> &'static str {
        if self.program.file_name().is_some_and(|n| n == "singularity") {
            "SINGULARITYENV_"
        } else {
            "APPTAINERENV_"
        }
    }

    async fn source(&self) -> Option<&Docker> {
        self.source
            .get_or_init(|| async {
                // A connection is made only once the daemon has answered (its ping, or the
                // version negotiation).
                if let Ok(d) = Docker::connect().await {
                    return Some(d);
                }
                crate::podman::connect().await.ok()
            })
            .await
            .as_ref()
    }

    fn paths(&self, image_id: &str) -> SifPaths {
        SifPaths::new(&self.sif_dir, image_id)
    }

    /// The SIF of `image_id`, built (once) from Docker's or Podman's copy of the image.
    async fn sif(&self, image_id: &str) -> Result<PathBuf, RuntimeError> {
        let p = self.paths(image_id);
        if p.sif.is_file() {
            return Ok(p.sif);
        }
        let Some(source) = self.source().await else {
            return Err(RuntimeError::RuntimeUnavailable {
                runtime: "apptainer".into(),
                message: format!(
                    "image {image_id} has no SIF in `{}`, and neither Docker nor Podman answers here to build one",
                    self.sif_dir.display()
                ),
            });
        };
        std::fs::create_dir_all(&self.sif_dir).map_err(|e| self.io("make the SIF folder", e))?;
        let tar = p.tmp.with_extension("tar");
        source.export_image(image_id, &tar).await?;
        let args = build_args(&p.tmp, &tar);
        let out = tokio::process::Command::new(&self.program).args(&args).output().await;
        let _ = std::fs::remove_file(&tar);
        let out = out.map_err(|e| self.io("run `apptainer build`", e))?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&p.tmp);
            return Err(RuntimeError::RuntimeUnavailable {
                runtime: "apptainer".into(),
                message: format!(
                    "`apptainer build` of image {image_id} failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        std::fs::rename(&p.tmp, &p.sif).map_err(|e| self.io("keep the SIF", e))?;
        Ok(p.sif)
    }

    fn io(&self, what: &str, e: std::io::Error) -> RuntimeError {
        RuntimeError::Backend { runtime: "apptainer".into(), action: what.to_string(), source: Box::new(e) }
    }

    /// Metadata kept beside a SIF (written the first time the image is inspected).
    fn cached_info(&self, reference: &str) -> Option<CachedImage> {
        let entries = std::fs::read_dir(&self.sif_dir).ok()?;
        let want = reference.trim_start_matches("sha256:");
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let Some(c) = std::fs::read(&path).ok().and_then(|b| CachedImage::from_json(&b)) else { continue };
            let id = c.info.id.trim_start_matches("sha256:");
            let tagged = c.info.repo_tags.iter().any(|t| {
                t == reference || t.strip_prefix("localhost/") == Some(reference) || *t == format!("{reference}:latest")
            });
            if id == want || (want.len() >= 12 && id.starts_with(want)) || tagged {
                return Some(c);
            }
        }
        None
    }

    fn remember(&self, c: &CachedImage) {
        let p = self.paths(&c.info.id);
        if std::fs::create_dir_all(&self.sif_dir).is_ok() {
            let tmp = p.json.with_extension("json.tmp");
            if std::fs::write(&tmp, c.to_json()).is_ok() {
                let _ = std::fs::rename(&tmp, &p.json);
            }
        }
    }
}

/// Where one image's SIF and metadata live.
#[derive(Debug, PartialEq, Eq)]
pub struct SifPaths {
    pub sif: PathBuf,
    pub json: PathBuf,
    /// Built here, then renamed to `sif` (no `:` in the name: `apptainer build` refuses it).
    pub tmp: PathBuf,
}

impl SifPaths {
    pub fn new(dir: &Path, image_id: &str) -> SifPaths {
        let hex: String =
            image_id.trim_start_matches("sha256:").chars().filter(|c| c.is_ascii_alphanumeric()).collect();
        SifPaths {
            sif: dir.join(format!("{hex}.sif")),
            json: dir.join(format!("{hex}.json")),
            tmp: dir.join(format!("tmp-{hex}-{}.sif", std::process::id())),
        }
    }
}

/// `apptainer build --force OUT docker-archive:TAR`.
pub fn build_args(out: &Path, tar: &Path) -> Vec<String> {
    vec!["build".into(), "--force".into(), out.display().to_string(), format!("docker-archive:{}", tar.display())]
}

/// An image as the SIF cache remembers it: its metadata and the files kliko reads out of it.
#[derive(Clone, Debug, PartialEq)]
pub struct CachedImage {
    pub info: ImageInfo,
    /// Path → bytes (`/kliko.yml`).
    pub files: BTreeMap<String, Vec<u8>>,
}

impl CachedImage {
    pub fn to_json(&self) -> Vec<u8> {
        let i = &self.info;
        let files: serde_json::Map<String, Value> = self
            .files
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(String::from_utf8_lossy(v).into_owned())))
            .collect();
        serde_json::to_vec_pretty(&json!({
            "kliko_sif_image": 1,
            "id": i.id, "repo_tags": i.repo_tags, "repo_digests": i.repo_digests,
            "entrypoint": i.entrypoint, "cmd": i.cmd, "user": i.user, "created": i.created,
            "labels": i.labels, "files": files,
        }))
        .expect("JSON of plain values")
    }

    pub fn from_json(bytes: &[u8]) -> Option<CachedImage> {
        let v: Value = serde_json::from_slice(bytes).ok()?;
        if v["kliko_sif_image"] != 1 {
            return None;
        }
        let strings = |k: &str| -> Vec<String> {
            v[k].as_array()
                .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
                .unwrap_or_default()
        };
        let opt_list = |k: &str| v[k].as_array().map(|_| strings(k));
        let info = ImageInfo {
            id: v["id"].as_str()?.to_string(),
            repo_tags: strings("repo_tags"),
            repo_digests: strings("repo_digests"),
            entrypoint: opt_list("entrypoint"),
            cmd: opt_list("cmd"),
            user: v["user"].as_str().map(str::to_string),
            created: v["created"].as_str().map(str::to_string),
            labels: v["labels"]
                .as_object()
                .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
                .unwrap_or_default(),
        };
        let files = v["files"]
            .as_object()
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.as_bytes().to_vec()))).collect())
            .unwrap_or_default();
        Some(CachedImage { info, files })
    }
}

/// `apptainer`'s arguments, and the variables to add to its environment.
pub type ExecCommand = (Vec<String>, Vec<(String, String)>);

/// The `apptainer exec` arguments and environment for `spec`, from image `info`'s SIF `sif`.
/// `invoker`: this process's `uid:gid`; `env_prefix`: `APPTAINERENV_` or `SINGULARITYENV_`.
pub fn exec_command(
    spec: &ContainerSpec,
    info: &ImageInfo,
    sif: &Path,
    invoker: &str,
    env_prefix: &str,
) -> Result<ExecCommand, RuntimeError> {
    let refuse = |message: String| RuntimeError::RuntimeUnavailable { runtime: "apptainer".into(), message };
    if let Some(u) = &spec.user {
        if u != invoker && u.split(':').next() != invoker.split(':').next() {
            return Err(refuse(format!("Apptainer runs containers as you ({invoker}), not as `{u}`")));
        }
    }
    let mut args: Vec<String> =
        ["exec", "--containall", "--cleanenv", "--no-home", "--writable-tmpfs"].iter().map(|s| s.to_string()).collect();
    match spec.network.as_deref() {
        None | Some("none") => args.extend(["--net".to_string(), "--network".into(), "none".into()]),
        Some("host") => {}
        Some(other) => {
            return Err(refuse(format!(
                "Apptainer gives an unprivileged user no network `{other}`: only none (the default) or `host`"
            )))
        }
    }
    for m in &spec.mounts {
        if !m.host.is_absolute() {
            return Err(RuntimeError::RelativeMount { path: m.host.clone() });
        }
        if !m.container.starts_with('/') {
            return Err(RuntimeError::RelativeMountTarget { target: m.container.clone() });
        }
        let Some(host) = m.host.to_str() else { return Err(RuntimeError::PathNotUtf8 { path: m.host.clone() }) };
        if host.contains(',') || host.contains(':') || m.container.contains(',') || m.container.contains(':') {
            return Err(refuse(format!(
                "Apptainer cannot bind `{host}` to `{}`: its `--bind` list cannot hold `,` or `:` in a path",
                m.container
            )));
        }
        args.push("--bind".into());
        args.push(format!("{host}:{}{}", m.container, if m.read_only { ":ro" } else { "" }));
    }
    if let Some(w) = &spec.workdir {
        args.extend(["--pwd".to_string(), w.clone()]);
    }
    if let Some(m) = spec.memory_bytes {
        args.extend(["--memory".to_string(), m.to_string()]);
    }
    if let Some(c) = spec.cpus {
        args.extend(["--cpus".to_string(), format!("{c}")]);
    }
    let mut env = Vec::new();
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(RuntimeError::InvalidEnvName { name: k.clone() });
        }
        env.push((format!("{env_prefix}{k}"), v.clone()));
    }
    if let Some(g) = &spec.gpus {
        args.push("--nv".into());
        let visible = match g {
            Gpus::All => None,
            Gpus::Count(n) => Some((0..*n).map(|i| i.to_string()).collect::<Vec<_>>().join(",")),
            Gpus::Devices(ids) => Some(ids.join(",")),
        };
        if let Some(v) = visible {
            env.push((format!("{env_prefix}CUDA_VISIBLE_DEVICES"), v));
        }
    }
    args.push(sif.display().to_string());
    // Docker's rule: the entrypoint, then the given command (or the image's own).
    let mut argv: Vec<String> = info.entrypoint.clone().unwrap_or_default();
    argv.extend(if spec.cmd.is_empty() { info.cmd.clone().unwrap_or_default() } else { spec.cmd.clone() });
    if argv.is_empty() {
        return Err(refuse(format!("image {} has no entrypoint and no command to run", info.id)));
    }
    args.extend(argv);
    Ok((args, env))
}

fn invoker() -> String {
    // SAFETY: getuid and getgid cannot fail.
    unsafe { format!("{}:{}", libc::getuid(), libc::getgid()) }
}

#[async_trait]
impl ContainerRuntime for Apptainer {
    fn name(&self) -> &str {
        "apptainer"
    }

    fn endpoint(&self) -> &str {
        self.program.to_str().unwrap_or("apptainer")
    }

    fn describe(&self) -> String {
        if self.version.is_empty() {
            "apptainer".into()
        } else {
            self.version.clone()
        }
    }

    async fn inspect_image(&self, reference: &str) -> Result<ImageInfo, RuntimeError> {
        if let Some(source) = self.source().await {
            let info = source.inspect_image(reference).await?;
            if self.cached_info(&info.id).is_none() {
                let mut files = BTreeMap::new();
                if let Ok(yml) = source.read_file(&info.id, "/kliko.yml").await {
                    files.insert("/kliko.yml".to_string(), yml);
                }
                self.remember(&CachedImage { info: info.clone(), files });
            }
            return Ok(info);
        }
        self.cached_info(reference)
            .map(|c| c.info)
            .ok_or_else(|| RuntimeError::ImageNotFound { reference: reference.to_string() })
    }

    async fn list_images(&self) -> Result<Vec<ImageInfo>, RuntimeError> {
        if let Some(source) = self.source().await {
            return source.list_images().await;
        }
        let mut out = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&self.sif_dir) {
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "json") {
                    if let Some(c) = std::fs::read(e.path()).ok().and_then(|b| CachedImage::from_json(&b)) {
                        out.push(c.info);
                    }
                }
            }
        }
        Ok(out)
    }

    async fn read_file(&self, image_id: &str, path: &str) -> Result<Vec<u8>, RuntimeError> {
        if let Some(bytes) = self.cached_info(image_id).and_then(|c| c.files.get(path).cloned()) {
            return Ok(bytes);
        }
        match self.source().await {
            Some(source) => source.read_file(image_id, path).await,
            None => Err(RuntimeError::FileNotInImage { image: image_id.to_string(), path: path.to_string() }),
        }
    }

    async fn read_file_cheaply(&self, image_id: &str, path: &str) -> Option<Vec<u8>> {
        if let Some(bytes) = self.cached_info(image_id).and_then(|c| c.files.get(path).cloned()) {
            return Some(bytes);
        }
        self.source().await?.read_file_cheaply(image_id, path).await
    }

    async fn run_until_exit(
        &self,
        spec: &ContainerSpec,
        logs: mpsc::Sender<LogChunk>,
        cancel: CancellationToken,
    ) -> Result<(RunOutcome, Removal), RuntimeError> {
        spec.check_gpus()?;
        let info = self.inspect_image(&spec.image_id).await?;
        let sif = self.sif(&info.id).await?;
        let (args, env) = exec_command(spec, &info, &sif, &invoker(), self.env_prefix())?;
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(&args).envs(env).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.kill_on_drop(true).process_group(0);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let started_at = SystemTime::now();
        if cancel.is_cancelled() {
            let outcome = RunOutcome {
                outcome: Outcome::Cancelled,
                container_id: String::new(),
                started_at,
                finished_at: started_at,
            };
            return Ok((outcome, Removal::spawned(String::new(), tokio::spawn(async { Ok(()) }))));
        }
        let mut child = cmd.spawn().map_err(|e| self.io("start `apptainer exec`", e))?;
        let id = format!("apptainer-{}", child.id().unwrap_or(0));
        let pump = |mut r: Box<dyn tokio::io::AsyncRead + Unpin + Send>, stream: Stream, tx: mpsc::Sender<LogChunk>| {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = r.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let _ = tx.send(LogChunk { stream, bytes: bytes::Bytes::copy_from_slice(&buf[..n]) }).await;
                }
            })
        };
        let out = pump(Box::new(child.stdout.take().expect("piped")), Stream::Stdout, logs.clone());
        let err = pump(Box::new(child.stderr.take().expect("piped")), Stream::Stderr, logs);
        let deadline = async {
            match spec.timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        let pgid = child.id().map(|p| p as libc::pid_t);
        enum Ended {
            Exited(std::io::Result<std::process::ExitStatus>),
            Cancelled,
            TimedOut,
        }
        let ended = tokio::select! {
            biased;
            status = child.wait() => Ended::Exited(status),
            _ = cancel.cancelled() => Ended::Cancelled,
            _ = deadline => Ended::TimedOut,
        };
        let outcome = match ended {
            Ended::Exited(status) => {
                let status = status.map_err(|e| self.io("wait for `apptainer exec`", e))?;
                use std::os::unix::process::ExitStatusExt;
                Outcome::Exited(
                    status.code().map(i64::from).unwrap_or_else(|| 128 + i64::from(status.signal().unwrap_or(0))),
                )
            }
            Ended::Cancelled | Ended::TimedOut => {
                stop_group(&mut child, pgid, self.stop_grace).await;
                if matches!(ended, Ended::Cancelled) {
                    Outcome::Cancelled
                } else {
                    Outcome::TimedOut
                }
            }
        };
        let finished_at = SystemTime::now();
        let _ = out.await;
        let _ = err.await;
        let removal = Removal::spawned(id.clone(), tokio::spawn(async { Ok(()) }));
        Ok((RunOutcome { outcome, container_id: id, started_at, finished_at }, removal))
    }

    async fn labelled_containers(&self, _key: &str, _value: &str) -> Result<Vec<Labelled>, RuntimeError> {
        // No daemon, no containers that outlive the process that started them.
        Ok(Vec::new())
    }

    async fn remove(&self, _id: &str) -> Result<(), RuntimeError> {
        Ok(())
    }
}

/// `SIGTERM` to the run's process group, then `SIGKILL` after `grace`.
async fn stop_group(child: &mut tokio::process::Child, pgid: Option<libc::pid_t>, grace: Duration) {
    if let Some(g) = pgid {
        // SAFETY: a signal to our own child's process group.
        unsafe { libc::kill(-g, libc::SIGTERM) };
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        if let Some(g) = pgid {
            // SAFETY: as above.
            unsafe { libc::kill(-g, libc::SIGKILL) };
        }
        let _ = child.wait().await;
    }
}

/// For [`crate::RuntimeKind::connect`].
pub(crate) async fn connect(store_root: &Path) -> Result<Arc<dyn ContainerRuntime>, RuntimeError> {
    Ok(Arc::new(Apptainer::new(store_root).await?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Mount;

    fn info() -> ImageInfo {
        ImageInfo {
            id: "sha256:ab12".into(),
            repo_tags: vec!["localhost/flagger:1".into()],
            repo_digests: vec![],
            entrypoint: Some(vec!["/bin/tini".into(), "--".into()]),
            cmd: Some(vec!["/bin/sh".into()]),
            user: None,
            created: None,
            labels: BTreeMap::from([("a".to_string(), "b".to_string())]),
        }
    }

    fn spec() -> ContainerSpec {
        ContainerSpec {
            image_id: "sha256:ab12".into(),
            cmd: vec!["/kliko".into()],
            env: vec![("INPUT".into(), "/input".into()), ("LIST".into(), "a,b=c".into())],
            mounts: vec![
                Mount { host: "/data/in".into(), container: "/input".into(), read_only: true },
                Mount { host: "/scratch/out".into(), container: "/output".into(), read_only: false },
                Mount { host: "/scratch/p.json".into(), container: "/parameters.json".into(), read_only: true },
            ],
            user: Some("1001:1001".into()),
            ..Default::default()
        }
    }

    #[test]
    fn the_exact_command_line_and_bind_list() {
        let (args, env) =
            exec_command(&spec(), &info(), Path::new("/store/sif-v1/ab12.sif"), "1001:1001", "APPTAINERENV_").unwrap();
        assert_eq!(
            args,
            [
                "exec",
                "--containall",
                "--cleanenv",
                "--no-home",
                "--writable-tmpfs",
                "--net",
                "--network",
                "none",
                "--bind",
                "/data/in:/input:ro",
                "--bind",
                "/scratch/out:/output",
                "--bind",
                "/scratch/p.json:/parameters.json:ro",
                "/store/sif-v1/ab12.sif",
                "/bin/tini",
                "--",
                "/kliko"
            ]
        );
        // Values go through the environment unchanged (commas and `=` included).
        assert_eq!(
            env,
            [
                ("APPTAINERENV_INPUT".to_string(), "/input".to_string()),
                ("APPTAINERENV_LIST".to_string(), "a,b=c".to_string())
            ]
        );
    }

    #[test]
    fn gpus_limits_host_network_and_the_images_own_command() {
        let mut s = spec();
        s.gpus = Some(Gpus::Count(2));
        s.network = Some("host".into());
        s.memory_bytes = Some(1 << 30);
        s.cpus = Some(1.5);
        s.cmd.clear();
        s.workdir = Some("/work".into());
        let (args, env) = exec_command(&s, &info(), Path::new("/s.sif"), "1001:1001", "SINGULARITYENV_").unwrap();
        assert!(!args.contains(&"--network".to_string()));
        let tail: Vec<&str> = args.iter().map(String::as_str).skip_while(|a| *a != "--pwd").collect();
        assert_eq!(
            tail,
            [
                "--pwd",
                "/work",
                "--memory",
                "1073741824",
                "--cpus",
                "1.5",
                "--nv",
                "/s.sif",
                "/bin/tini",
                "--",
                "/bin/sh"
            ]
        );
        assert!(env.contains(&("SINGULARITYENV_CUDA_VISIBLE_DEVICES".to_string(), "0,1".to_string())));
        s.gpus = Some(Gpus::All);
        let (_, env) = exec_command(&s, &info(), Path::new("/s.sif"), "1001:1001", "APPTAINERENV_").unwrap();
        assert!(!env.iter().any(|(k, _)| k.ends_with("CUDA_VISIBLE_DEVICES")));
    }

    #[test]
    fn what_apptainer_cannot_do_is_refused_in_words() {
        let mut s = spec();
        s.user = Some("0:0".into());
        let e = exec_command(&s, &info(), Path::new("/s.sif"), "1001:1001", "APPTAINERENV_").unwrap_err();
        assert!(e.to_string().contains("runs containers as you (1001:1001)"), "{e}");
        let mut s = spec();
        s.network = Some("bridge".into());
        assert!(exec_command(&s, &info(), Path::new("/s.sif"), "1001:1001", "APPTAINERENV_").is_err());
        let mut s = spec();
        s.mounts[0].host = "/data/a,b".into();
        let e = exec_command(&s, &info(), Path::new("/s.sif"), "1001:1001", "APPTAINERENV_").unwrap_err();
        assert!(e.to_string().contains("cannot bind"), "{e}");
        let mut s = spec();
        s.mounts[0].host = "rel".into();
        assert!(matches!(
            exec_command(&s, &info(), Path::new("/s.sif"), "1001:1001", "APPTAINERENV_"),
            Err(RuntimeError::RelativeMount { .. })
        ));
        let mut bare = info();
        bare.entrypoint = None;
        bare.cmd = None;
        let mut s = spec();
        s.cmd.clear();
        assert!(exec_command(&s, &bare, Path::new("/s.sif"), "1001:1001", "APPTAINERENV_").is_err());
    }

    #[test]
    fn sifs_are_named_by_image_id_without_a_colon() {
        let p = SifPaths::new(Path::new("/store/sif-v1"), "sha256:ab12cd");
        assert_eq!(p.sif, Path::new("/store/sif-v1/ab12cd.sif"));
        assert_eq!(p.json, Path::new("/store/sif-v1/ab12cd.json"));
        assert!(!p.tmp.to_string_lossy().contains(':'));
        assert_eq!(
            build_args(&p.tmp, Path::new("/store/sif-v1/tmp-ab12cd-1.tar")),
            ["build", "--force", &p.tmp.display().to_string(), "docker-archive:/store/sif-v1/tmp-ab12cd-1.tar"]
        );
    }

    #[test]
    fn the_cache_remembers_an_image_and_its_kliko_yml() {
        let c =
            CachedImage { info: info(), files: BTreeMap::from([("/kliko.yml".to_string(), b"io: split\n".to_vec())]) };
        assert_eq!(CachedImage::from_json(&c.to_json()), Some(c.clone()));
        assert_eq!(CachedImage::from_json(b"{}"), None);
        // Found by ID, by a prefix of it, and by tag.
        let dir = tempfile::tempdir().unwrap();
        let a = Apptainer {
            program: "/usr/bin/apptainer".into(),
            version: "apptainer version 1.3.4".into(),
            sif_dir: dir.path().join(SIF_DIR),
            stop_grace: Duration::from_secs(1),
            source: OnceCell::new_with(Some(None)),
        };
        a.remember(&c);
        assert_eq!(a.cached_info("sha256:ab12").map(|c| c.info.id), Some("sha256:ab12".into()));
        assert_eq!(a.cached_info("flagger:1").map(|c| c.info.id), Some("sha256:ab12".into()));
        assert!(a.cached_info("other:1").is_none());
        assert_eq!(a.describe(), "apptainer version 1.3.4");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        assert_eq!(rt.block_on(a.read_file("sha256:ab12", "/kliko.yml")).unwrap(), b"io: split\n");
        assert!(rt.block_on(a.inspect_image("other:1")).is_err());
    }
}
