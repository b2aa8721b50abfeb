//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while talking to the Docker Engine.
///
/// A container that exits non-zero is *not* an error: see [`crate::Outcome`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The daemon did not answer (not running, no permission on its socket,
    /// wrong `DOCKER_HOST`).
    #[error("cannot reach the docker daemon at `{endpoint}`; {}", daemon_hint(.endpoint, .source))]
    DaemonUnreachable {
        endpoint: String,
        #[source]
        source: bollard::errors::Error,
    },

    /// No local image answers to this reference (nothing is ever pulled).
    #[error(
        "image `{reference}` not found locally; build it with `docker build -t {reference} .` \
         or fetch it with `docker pull {reference}`"
    )]
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
    /// become a named Docker volume.
    #[error("mount source `{}` is not an absolute path", .path.display())]
    RelativeMount { path: PathBuf },

    /// Docker's API carries paths as UTF-8 strings: a host path that is not valid UTF-8 would
    /// be changed on the way (and could name another folder), so it is refused.
    #[error("the host path `{}` cannot be given to the container runtime: it is not valid UTF-8", .path.display())]
    PathNotUtf8 { path: PathBuf },

    /// A mount target inside the container must be absolute.
    #[error("mount target `{target}` is not an absolute path")]
    RelativeMountTarget { target: String },

    /// An environment variable name that Docker would misread.
    #[error("invalid environment variable name `{name}`")]
    InvalidEnvName { name: String },

    /// The daemon answered `wait` without an exit status.
    #[error("the daemon reported no exit status for container `{container}`")]
    NoExitStatus { container: String },

    /// The background task removing a stopped container ended abnormally (it panicked or
    /// the runtime shut down under it); the container may still exist.
    #[error("could not finish removing container `{container}`: {message}; remove it with `docker rm -f {container}`")]
    RemovalInterrupted { container: String, message: String },

    /// Any other call to the daemon that failed.
    #[error("docker failed to {action}")]
    Docker {
        action: String,
        #[source]
        source: bollard::errors::Error,
    },
}

impl RuntimeError {
    pub(crate) fn docker(action: impl Into<String>, source: bollard::errors::Error) -> Self {
        RuntimeError::Docker { action: action.into(), source }
    }
}

/// Choose the fix to suggest from the I/O error at the bottom of the chain.
fn daemon_hint(endpoint: &str, source: &bollard::errors::Error) -> String {
    use std::io::ErrorKind;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(source);
    let mut kind = None;
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            kind = Some(io.kind());
        }
        cur = e.source();
    }
    if matches!(source, bollard::errors::Error::SocketNotFoundError(_)) {
        kind = Some(ErrorKind::NotFound);
    }
    let socket = endpoint.strip_prefix("unix://").unwrap_or("/var/run/docker.sock");
    let start = "is the daemon running? start it with `systemctl start docker`";
    let group = "add your user to the `docker` group (`sudo usermod -aG docker $USER`, then log in again)";
    match kind {
        Some(ErrorKind::PermissionDenied) => {
            format!("permission denied on `{socket}`: {group}")
        }
        Some(ErrorKind::NotFound) | Some(ErrorKind::ConnectionRefused) => {
            format!("{start}, or point `DOCKER_HOST` at a running daemon")
        }
        _ => format!("{start}; if `{socket}` refuses you, {group}; check `DOCKER_HOST` if you set it"),
    }
}
