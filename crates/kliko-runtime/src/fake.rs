//! A scripted container runtime for tests (feature `fake`): no daemon, no images, no
//! containers, but the same contract as a real one.
//!
//! Images are registered with their files (a `/kliko.yml`) and a [`Script`]: what a
//! container of that image does when it runs (write into its mounts, print, exit with a
//! code, take some time). Timeouts and cancellation stop a script that takes longer; the
//! fake counts the containers it ran and keeps the ones a test leaves behind
//! ([`FakeRuntime::leave_container`]) until they are removed, so orphan sweeps can be tested.
//!
//! ```
//! use kliko_runtime::fake::{FakeExit, FakeRuntime};
//! use kliko_runtime::ContainerRuntime;
//! # async fn demo() {
//! let rt = FakeRuntime::new();
//! let info = rt.add_image("tool:1", &[("/kliko.yml", b"schema_version: 3\n".as_slice())], |c| {
//!     std::fs::write(c.host("/output").unwrap().join("a.txt"), "hello").unwrap();
//!     FakeExit::code(0)
//! });
//! assert_eq!(rt.inspect_image("tool:1").await.unwrap().id, info.id);
//! # }
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::Unreachable;
use crate::{
    ContainerRuntime, ContainerSpec, ImageInfo, Labelled, LogChunk, Outcome, Removal, RunOutcome, RuntimeError, Stream,
    MANAGED_LABEL,
};

/// What a container does: called once per run, on a blocking thread, with the container's
/// view of its mounts.
pub type Script = Arc<dyn Fn(&FakeContainer<'_>) -> FakeExit + Send + Sync>;

/// A running fake container, as its script sees it.
pub struct FakeContainer<'a> {
    pub spec: &'a ContainerSpec,
}

impl FakeContainer<'_> {
    /// The host path mounted at `container_path` (`/output`, `/input`, `/work`, ...).
    pub fn host(&self, container_path: &str) -> Option<&Path> {
        self.spec.mounts.iter().find(|m| m.container == container_path).map(|m| m.host.as_path())
    }

    /// The value of an environment variable the container gets.
    pub fn env(&self, name: &str) -> Option<&str> {
        self.spec.env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// How a fake container ends.
#[derive(Clone, Debug, Default)]
pub struct FakeExit {
    pub code: i64,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// How long it runs after printing (a timeout or a cancellation cuts this short).
    pub duration: Duration,
}

impl FakeExit {
    pub fn code(code: i64) -> FakeExit {
        FakeExit { code, ..Default::default() }
    }

    pub fn stdout(mut self, bytes: impl Into<Vec<u8>>) -> FakeExit {
        self.stdout = bytes.into();
        self
    }

    pub fn stderr(mut self, bytes: impl Into<Vec<u8>>) -> FakeExit {
        self.stderr = bytes.into();
        self
    }

    pub fn taking(mut self, duration: Duration) -> FakeExit {
        self.duration = duration;
        self
    }
}

#[derive(Clone)]
struct FakeImage {
    references: Vec<String>,
    info: ImageInfo,
    files: BTreeMap<String, Vec<u8>>,
    script: Script,
}

#[derive(Default)]
struct State {
    images: Vec<FakeImage>,
    containers: BTreeMap<String, Labelled>,
    runs: Vec<ContainerSpec>,
    files_read: usize,
    cheap_reads: usize,
    next: u64,
}

/// The scripted runtime. Cheap to share behind an `Arc`.
#[derive(Default)]
pub struct FakeRuntime {
    state: Mutex<State>,
    unreachable: bool,
    cheap: bool,
}

impl FakeRuntime {
    pub fn new() -> FakeRuntime {
        FakeRuntime::default()
    }

    /// A runtime whose daemon never answers: every call fails with
    /// [`RuntimeError::Unreachable`].
    pub fn unreachable() -> FakeRuntime {
        FakeRuntime { unreachable: true, ..Default::default() }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A test that panicked while holding it has failed already; keep the data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register an image known as `reference` with these files and this behaviour; returns
    /// its info (a content-addressed id derived from the reference and the files).
    pub fn add_image(
        &self,
        reference: &str,
        files: &[(&str, &[u8])],
        script: impl Fn(&FakeContainer<'_>) -> FakeExit + Send + Sync + 'static,
    ) -> ImageInfo {
        let mut pre = Vec::new();
        for part in std::iter::once(reference.as_bytes()).chain(files.iter().flat_map(|(p, b)| [p.as_bytes(), *b])) {
            pre.extend_from_slice(&(part.len() as u64).to_le_bytes());
            pre.extend_from_slice(part);
        }
        let id = format!("sha256:{}", kliko_core::Digest::of_bytes(&pre).to_hex());
        let info = ImageInfo {
            id: id.clone(),
            repo_tags: vec![reference.to_string()],
            repo_digests: Vec::new(),
            entrypoint: None,
            cmd: None,
            user: None,
            created: Some("2026-01-01T00:00:00Z".into()),
            labels: BTreeMap::new(),
        };
        let image = FakeImage {
            references: vec![reference.to_string(), id],
            info: info.clone(),
            files: files.iter().map(|(p, b)| (p.to_string(), b.to_vec())).collect(),
            script: Arc::new(script),
        };
        let mut st = self.state();
        st.images.retain(|i| !i.references.iter().any(|r| r == reference));
        st.images.push(image);
        info
    }

    /// How many containers have been run.
    pub fn runs(&self) -> usize {
        self.state().runs.len()
    }

    /// The specs of every container run so far, in order.
    pub fn specs(&self) -> Vec<ContainerSpec> {
        self.state().runs.clone()
    }

    /// How many files were read out of images.
    pub fn files_read(&self) -> usize {
        self.state().files_read
    }

    /// A runtime that can read an image's files without a container (as Docker can when its
    /// layer folders are readable): [`ContainerRuntime::read_file_cheaply`] answers.
    pub fn with_cheap_reads(mut self) -> FakeRuntime {
        self.cheap = true;
        self
    }

    /// How many files were read without a container.
    pub fn cheap_reads(&self) -> usize {
        self.state().cheap_reads
    }

    /// A container that exists without a run (as one a killed process left behind).
    pub fn leave_container(&self, labels: BTreeMap<String, String>) -> String {
        let mut st = self.state();
        st.next += 1;
        let id = format!("fake-left-{}", st.next);
        st.containers.insert(id.clone(), Labelled { id: id.clone(), labels });
        id
    }

    /// The ids of the containers that exist now.
    pub fn containers(&self) -> Vec<String> {
        self.state().containers.keys().cloned().collect()
    }

    fn check(&self) -> Result<(), RuntimeError> {
        if self.unreachable {
            return Err(RuntimeError::Unreachable {
                runtime: "fake".into(),
                endpoint: "fake://".into(),
                reason: Unreachable::NotRunning,
                source: "the fake daemon is down".into(),
            });
        }
        Ok(())
    }

    fn image(&self, reference: &str) -> Result<FakeImage, RuntimeError> {
        let st = self.state();
        let found = st.images.iter().find(|i| i.references.iter().any(|r| r == reference));
        found.cloned().ok_or_else(|| RuntimeError::ImageNotFound { reference: reference.to_string() })
    }
}

#[async_trait]
impl ContainerRuntime for FakeRuntime {
    fn name(&self) -> &str {
        "fake"
    }

    fn endpoint(&self) -> &str {
        "fake://"
    }

    async fn inspect_image(&self, reference: &str) -> Result<ImageInfo, RuntimeError> {
        self.check()?;
        Ok(self.image(reference)?.info)
    }

    async fn list_images(&self) -> Result<Vec<ImageInfo>, RuntimeError> {
        self.check()?;
        Ok(self.state().images.iter().rev().map(|i| i.info.clone()).collect())
    }

    async fn read_file(&self, image_id: &str, path: &str) -> Result<Vec<u8>, RuntimeError> {
        self.check()?;
        let image = self.image(image_id)?;
        self.state().files_read += 1;
        image
            .files
            .get(path)
            .cloned()
            .ok_or_else(|| RuntimeError::FileNotInImage { image: image_id.to_string(), path: path.to_string() })
    }

    async fn read_file_cheaply(&self, image_id: &str, path: &str) -> Option<Vec<u8>> {
        if !self.cheap || self.check().is_err() {
            return None;
        }
        let bytes = self.image(image_id).ok()?.files.get(path).cloned()?;
        self.state().cheap_reads += 1;
        Some(bytes)
    }

    async fn run_until_exit(
        &self,
        spec: &ContainerSpec,
        logs: mpsc::Sender<LogChunk>,
        cancel: CancellationToken,
    ) -> Result<(RunOutcome, Removal), RuntimeError> {
        self.check()?;
        for m in &spec.mounts {
            if !m.host.is_absolute() {
                return Err(RuntimeError::RelativeMount { path: m.host.clone() });
            }
            if m.host.to_str().is_none() {
                return Err(RuntimeError::PathNotUtf8 { path: m.host.clone() });
            }
        }
        let script = self.image(&spec.image_id)?.script;
        let id = {
            let mut st = self.state();
            st.next += 1;
            let id = format!("fake-{}", st.next);
            let mut labels = spec.labels.clone();
            labels.insert(MANAGED_LABEL.into(), "true".into());
            st.containers.insert(id.clone(), Labelled { id: id.clone(), labels });
            st.runs.push(spec.clone());
            id
        };
        let started_at = SystemTime::now();
        let outcome = if cancel.is_cancelled() {
            Outcome::Cancelled
        } else {
            let s = spec.clone();
            let exit = tokio::task::spawn_blocking(move || script(&FakeContainer { spec: &s })).await.map_err(|e| {
                RuntimeError::Backend { runtime: "fake".into(), action: "run".into(), source: e.into() }
            })?;
            for (stream, bytes) in [(Stream::Stdout, exit.stdout), (Stream::Stderr, exit.stderr)] {
                if !bytes.is_empty() {
                    let _ = logs.send(LogChunk { stream, bytes: bytes.into() }).await;
                }
            }
            let deadline = async {
                match spec.timeout {
                    Some(limit) => tokio::time::sleep(limit).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = tokio::time::sleep(exit.duration) => Outcome::Exited(exit.code),
                _ = cancel.cancelled() => Outcome::Cancelled,
                _ = deadline => Outcome::TimedOut,
            }
        };
        let finished_at = SystemTime::now();
        drop(logs);
        self.state().containers.remove(&id);
        let removal = Removal::spawned(id.clone(), tokio::spawn(async { Ok(()) }));
        Ok((RunOutcome { outcome, container_id: id, started_at, finished_at }, removal))
    }

    async fn labelled_containers(&self, key: &str, value: &str) -> Result<Vec<Labelled>, RuntimeError> {
        self.check()?;
        let st = self.state();
        Ok(st.containers.values().filter(|c| c.labels.get(key).map(String::as_str) == Some(value)).cloned().collect())
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.check()?;
        self.state().containers.remove(id);
        Ok(())
    }
}
