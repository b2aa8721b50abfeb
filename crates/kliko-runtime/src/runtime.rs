//! The seam between kliko and a container runtime.

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{ContainerSpec, ImageInfo, Labelled, LogChunk, Removal, RunOutcome, RuntimeError};

/// What kliko needs from a container runtime: resolve and list local images, read a file out
/// of an image without running it, run one container to its end with logs, a timeout and
/// cancellation, and find and remove the containers it labelled.
///
/// [`crate::Docker`] (the Docker Engine API, also spoken by rootless Podman's socket) is one
/// implementation; `FakeRuntime` (feature `fake`) is a scripted one for tests. A runtime never
/// pulls an image and gives a container no network unless its spec names one.
#[async_trait]
pub trait ContainerRuntime: Send + Sync + 'static {
    /// A short name for messages: `docker`, `podman`, `fake`.
    fn name(&self) -> &str;

    /// Where it is reached (`unix:///var/run/docker.sock`), for messages.
    fn endpoint(&self) -> &str;

    /// What it is, for provenance: `docker 20.10.24`, `podman 4.3.1 (rootless)`.
    fn describe(&self) -> String {
        self.name().to_string()
    }

    /// Resolve a reference (tag, short or full id, `name@sha256:…`) to the image's
    /// content-addressed id and metadata. Never pulls: an unknown reference is
    /// [`RuntimeError::ImageNotFound`].
    async fn inspect_image(&self, reference: &str) -> Result<ImageInfo, RuntimeError>;

    /// All local images (not intermediate layers).
    async fn list_images(&self) -> Result<Vec<ImageInfo>, RuntimeError>;

    /// The bytes of a regular file in an image, symlinks followed, without running it.
    async fn read_file(&self, image_id: &str, path: &str) -> Result<Vec<u8>, RuntimeError>;

    /// [`ContainerRuntime::read_file`] when it needs no container (the image's layers are
    /// unpacked where this process may read them, or the runtime has the file already);
    /// `None` when it would, or when the answer is not certain. Callers try this before a
    /// slower source, such as a copy on the shared tier.
    async fn read_file_cheaply(&self, _image_id: &str, _path: &str) -> Option<Vec<u8>> {
        None
    }

    /// Run one container until it has stopped and all its output has been sent to `logs`;
    /// its removal goes on in the background ([`Removal::finish`] waits for it). On an error
    /// part-way the container is already removed when this returns, and a dropped future
    /// still removes it.
    async fn run_until_exit(
        &self,
        spec: &ContainerSpec,
        logs: mpsc::Sender<LogChunk>,
        cancel: CancellationToken,
    ) -> Result<(RunOutcome, Removal), RuntimeError>;

    /// Every container, running or not, that carries the label `key=value`.
    async fn labelled_containers(&self, key: &str, value: &str) -> Result<Vec<Labelled>, RuntimeError>;

    /// Force-remove a container; one that is gone already is fine.
    async fn remove(&self, id: &str) -> Result<(), RuntimeError>;

    /// Run one container to completion and remove it: [`ContainerRuntime::run_until_exit`],
    /// then wait for the removal.
    ///
    /// Output is sent to `logs` as it arrives, stdout and stderr apart; all of it has been
    /// sent when this returns. The receiver should be read concurrently: a full channel holds
    /// the log stream back. A dropped receiver is fine (the output is then discarded).
    ///
    /// The container is removed (forcibly, with its anonymous volumes) on every path: exit,
    /// timeout, cancellation through `cancel`, an error part-way, and, from a background task,
    /// if this future is dropped unfinished.
    async fn run(
        &self,
        spec: &ContainerSpec,
        logs: mpsc::Sender<LogChunk>,
        cancel: CancellationToken,
    ) -> Result<RunOutcome, RuntimeError> {
        let (outcome, removal) = self.run_until_exit(spec, logs, cancel).await?;
        removal.finish().await?;
        Ok(outcome)
    }
}

#[async_trait]
impl ContainerRuntime for crate::Docker {
    fn name(&self) -> &str {
        crate::Docker::name(self)
    }

    fn endpoint(&self) -> &str {
        crate::Docker::endpoint(self)
    }

    fn describe(&self) -> String {
        crate::Docker::describe(self)
    }

    async fn inspect_image(&self, reference: &str) -> Result<ImageInfo, RuntimeError> {
        crate::Docker::inspect_image(self, reference).await
    }

    async fn list_images(&self) -> Result<Vec<ImageInfo>, RuntimeError> {
        crate::Docker::list_images(self).await
    }

    async fn read_file(&self, image_id: &str, path: &str) -> Result<Vec<u8>, RuntimeError> {
        crate::Docker::read_file(self, image_id, path).await
    }

    async fn read_file_cheaply(&self, image_id: &str, path: &str) -> Option<Vec<u8>> {
        crate::Docker::read_file_cheaply(self, image_id, path).await
    }

    async fn run_until_exit(
        &self,
        spec: &ContainerSpec,
        logs: mpsc::Sender<LogChunk>,
        cancel: CancellationToken,
    ) -> Result<(RunOutcome, Removal), RuntimeError> {
        crate::Docker::run_until_exit(self, spec, logs, cancel).await
    }

    async fn labelled_containers(&self, key: &str, value: &str) -> Result<Vec<Labelled>, RuntimeError> {
        crate::Docker::labelled_containers(self, key, value).await
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        crate::Docker::remove(self, id).await
    }
}
