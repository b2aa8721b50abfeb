//! Running kliko images through the Docker Engine.
//!
//! This crate owns every conversation with the daemon (through `bollard`):
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
//! use kliko_runtime::{ContainerSpec, Docker, Outcome};
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

mod archive;
mod docker;
mod error;
mod run;

pub use docker::{Docker, ImageInfo, DEFAULT_STOP_GRACE};
pub use error::RuntimeError;
pub use run::{ContainerSpec, LogChunk, Mount, Outcome, Removal, RunOutcome, Stream};

/// The label on every container this crate creates (value `true`).
pub const MANAGED_LABEL: &str = "io.kliko.managed";

/// How many symlinks [`Docker::read_file`] follows before giving up.
pub const MAX_SYMLINK_HOPS: usize = 16;
