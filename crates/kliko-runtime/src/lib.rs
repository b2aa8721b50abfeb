//! Running kliko images through a container runtime.
//!
//! [`ContainerRuntime`] is the seam: what kliko needs from any runtime. [`Docker`] implements
//! it over the Docker Engine API (through `bollard`), and `fake::FakeRuntime` (feature `fake`)
//! is a scripted one for tests that need no daemon. The Docker implementation owns every
//! conversation with the daemon:
//! connecting and negotiating the API version, resolving image references to
//! content-addressed ids, reading `/kliko.yml` out of an image without running
//! it, and running one container to completion with its logs streamed, a
//! timeout, cancellation and guaranteed removal. It knows nothing about
//! kliko.yml or the cache: callers hand it a [`ContainerSpec`].
//!
//! Every container it creates carries the label `io.kliko.managed=true`
//! ([`MANAGED_LABEL`]), and none outlives the call that created it. Containers
//! get no network unless the spec asks for one.
//!
//! ```no_run
//! use kliko_runtime::{ContainerRuntime, ContainerSpec, Docker, Outcome};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn demo() -> Result<(), kliko_runtime::RuntimeError> {
//! let docker = Docker::connect().await?;
//! let image = docker.inspect_image("kliko/example:latest").await?;
//! let kliko_yml = docker.read_file(&image.id, "/kliko.yml").await?;
//!
//! let spec = ContainerSpec {
//!     image_id: image.id.clone(),
//!     cmd: vec!["/kliko".into()],
//!     timeout: Some(std::time::Duration::from_secs(600)),
//!     ..Default::default()
//! };
//! let (tx, mut rx) = tokio::sync::mpsc::channel::<kliko_runtime::LogChunk>(64);
//! let printer = tokio::spawn(async move {
//!     while let Some(chunk) = rx.recv().await {
//!         print!("{}", String::from_utf8_lossy(&chunk.bytes));
//!     }
//! });
//! let run = docker.run(&spec, tx, CancellationToken::new()).await?;
//! printer.await.ok();
//! assert!(matches!(run.outcome, Outcome::Exited(_)));
//! # let _ = kliko_yml; Ok(()) }
//! ```

pub mod apptainer;
mod archive;
mod docker;
mod error;
#[cfg(feature = "fake")]
pub mod fake;
pub mod gpu;
mod layers;
pub mod podman;
mod run;
mod runtime;

pub use docker::{Docker, Flavor, ImageInfo, Labelled, DEFAULT_STOP_GRACE};
pub use error::{BoxError, RuntimeError, Unreachable};
pub use gpu::Gpus;
pub use run::{ContainerSpec, LogChunk, Mount, Outcome, Removal, RunOutcome, Stream};
pub use runtime::ContainerRuntime;

/// Which container runtime runs the containers (`--runtime`, `KLIKO_RUNTIME`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RuntimeKind {
    /// The Docker Engine (`DOCKER_HOST`, else `/var/run/docker.sock`).
    #[default]
    Docker,
    /// Podman's Docker-compatible service: the user's own socket, or one started for the
    /// run ([`podman`]).
    Podman,
    /// Apptainer (or Singularity) from PATH, running SIFs built once per image ID
    /// ([`apptainer`]).
    Apptainer,
}

impl RuntimeKind {
    /// `docker` or `podman`.
    pub fn parse(s: &str) -> Result<RuntimeKind, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "docker" => Ok(RuntimeKind::Docker),
            "podman" => Ok(RuntimeKind::Podman),
            "apptainer" | "singularity" => Ok(RuntimeKind::Apptainer),
            other => {
                Err(format!("`{other}` is not a container runtime kliko knows: say `docker`, `podman` or `apptainer`"))
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RuntimeKind::Docker => "docker",
            RuntimeKind::Podman => "podman",
            RuntimeKind::Apptainer => "apptainer",
        }
    }

    /// Connect to this runtime; `store_root` is where a runtime keeps what it converts
    /// (Apptainer's SIFs).
    pub async fn connect(
        self,
        store_root: &std::path::Path,
    ) -> Result<std::sync::Arc<dyn ContainerRuntime>, RuntimeError> {
        Ok(match self {
            RuntimeKind::Docker => std::sync::Arc::new(Docker::connect().await?),
            RuntimeKind::Podman => std::sync::Arc::new(podman::connect().await?),
            RuntimeKind::Apptainer => apptainer::connect(store_root).await?,
        })
    }
}

/// The label on every container this crate creates (value `true`).
pub const MANAGED_LABEL: &str = "io.kliko.managed";

/// Label on a container that no run's lease covers (one created only to read a file out of an
/// image): `host/pid/start` of the process that created it, so a sweep can tell when it is
/// gone ([`owner_is_gone`]).
pub const OWNER_LABEL: &str = "io.kliko.owner";

/// This process as [`OWNER_LABEL`] names it: host, pid, and its start time (clock ticks since
/// boot), so that a later process with the same pid is not taken for it.
pub fn this_process_owner() -> String {
    let pid = std::process::id();
    format!("{}/{pid}/{}", host_name(), process_start(pid).unwrap_or(0))
}

/// Whether the process an [`OWNER_LABEL`] names has ended: only for this host (another
/// host's processes cannot be seen from here, so they are never judged gone).
pub fn owner_is_gone(owner: &str) -> bool {
    let mut parts = owner.rsplitn(3, '/');
    let (Some(start), Some(pid), Some(host)) = (parts.next(), parts.next(), parts.next()) else { return false };
    let (Ok(start), Ok(pid)) = (start.parse::<u64>(), pid.parse::<u32>()) else { return false };
    host == host_name() && process_start(pid) != Some(start)
}

use kliko_core::process::{host_name, process_start};

/// How many symlinks [`Docker::read_file`] follows before giving up.
pub const MAX_SYMLINK_HOPS: usize = 16;
