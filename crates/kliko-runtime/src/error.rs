//! The one error type of this crate.
//!
//! The errors describe what happened in the runtime's terms; none carries a type from the
//! client library behind it (sources are boxed), and none gives advice that names a command
//! or a flag: front ends choose their own ([`RuntimeError::unreachable_reason`] says why a
//! daemon could not be reached, for example).

use std::path::PathBuf;

/// Any error from the layer under a runtime (an HTTP client, a spawned process).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong while talking to a container runtime.
///
/// A container that exits non-zero is *not* an error: see [`crate::Outcome`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The runtime's daemon did not answer (not running, no permission on its socket, a
    /// wrong endpoint).
    #[error("cannot reach the {runtime} daemon at `{endpoint}`{}", .reason.suffix())]
    Unreachable {
        /// `docker`, `podman`, ...
        runtime: String,
        endpoint: String,
        reason: Unreachable,
        #[source]
        source: BoxError,
    },

    /// The runtime cannot be used here: not installed, or its service would not start.
    #[error("cannot use {runtime}: {message}")]
    RuntimeUnavailable { runtime: String, message: String },

    /// A run asked for GPUs this machine does not have (checked before any container starts).
    #[error("the run asks for {asked}, and {found}")]
    NoGpu { asked: String, found: String },

    /// No local image answers to this reference (nothing is ever pulled).
    #[error("image `{reference}` not found locally")]
    ImageNotFound { reference: String },

    /// The image has no such path (or a symlink in it points nowhere).
    #[error("file `{path}` not found in image `{image}`")]
    FileNotInImage { image: String, path: String },

    /// The path exists in the image but is a directory, device, ... .
    #[error("`{path}` in image `{image}` is not a regular file (it is a {kind})")]
    NotARegularFile { image: String, path: String, kind: &'static str },

    /// Symlinks chained beyond [`MAX_SYMLINK_HOPS`](crate::MAX_SYMLINK_HOPS), most likely a loop.
    #[error("too many levels of symlinks resolving `{path}` in image `{image}`")]
    SymlinkLoop { image: String, path: String },

    /// The archive the daemon sent for a path could not be read.
    #[error("unreadable archive for `{path}` from image `{image}`")]
    Archive {
        image: String,
        path: String,
        #[source]
        source: std::io::Error,
    },

    /// Bind mounts need absolute host paths: a relative one would silently
    /// become a named volume.
    #[error("mount source `{}` is not an absolute path", .path.display())]
    RelativeMount { path: PathBuf },

    /// The runtime's API carries paths as UTF-8 strings: a host path that is not valid UTF-8
    /// would be changed on the way (and could name another folder), so it is refused.
    #[error("the host path `{}` cannot be given to the container runtime: it is not valid UTF-8", .path.display())]
    PathNotUtf8 { path: PathBuf },

    /// A mount target inside the container must be absolute.
    #[error("mount target `{target}` is not an absolute path")]
    RelativeMountTarget { target: String },

    /// An environment variable name that the runtime would misread.
    #[error("invalid environment variable name `{name}`")]
    InvalidEnvName { name: String },

    /// The daemon answered `wait` without an exit status.
    #[error("the daemon reported no exit status for container `{container}`")]
    NoExitStatus { container: String },

    /// The background task removing a stopped container ended abnormally (it panicked or
    /// the async runtime shut down under it); the container may still exist.
    #[error("could not finish removing container `{container}`: {message}")]
    RemovalInterrupted { container: String, message: String },

    /// Any other call to the runtime that failed.
    #[error("{runtime} failed to {action}")]
    Backend {
        runtime: String,
        action: String,
        #[source]
        source: BoxError,
    },
}

/// Why a daemon could not be reached, as far as the operating system said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unreachable {
    /// Nothing listens at the endpoint (no socket, connection refused).
    NotRunning,
    /// The socket exists but this user may not open it.
    PermissionDenied,
    /// Something else (a timeout, a protocol error).
    Other,
}

impl Unreachable {
    fn suffix(self) -> &'static str {
        match self {
            Unreachable::NotRunning => ": nothing answers there",
            Unreachable::PermissionDenied => ": permission denied on its socket",
            Unreachable::Other => "",
        }
    }

    /// Classify by the I/O error at the bottom of `source`'s chain.
    pub fn of(source: &(dyn std::error::Error + 'static)) -> Unreachable {
        use std::io::ErrorKind;
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(source);
        let mut kind = None;
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                kind = Some(io.kind());
            }
            cur = e.source();
        }
        match kind {
            Some(ErrorKind::PermissionDenied) => Unreachable::PermissionDenied,
            Some(ErrorKind::NotFound | ErrorKind::ConnectionRefused) => Unreachable::NotRunning,
            _ => Unreachable::Other,
        }
    }
}

impl RuntimeError {
    /// Why the daemon could not be reached, for an [`RuntimeError::Unreachable`].
    pub fn unreachable_reason(&self) -> Option<Unreachable> {
        match self {
            RuntimeError::Unreachable { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    pub(crate) fn unreachable(runtime: &str, endpoint: &str, source: bollard::errors::Error) -> Self {
        let reason = match &source {
            bollard::errors::Error::SocketNotFoundError(_) => Unreachable::NotRunning,
            other => Unreachable::of(other),
        };
        RuntimeError::Unreachable {
            runtime: runtime.into(),
            endpoint: endpoint.to_string(),
            reason,
            source: Box::new(source),
        }
    }
}
