//! The connection to the Docker Engine and the calls that do not run a workload:
//! image inspection, listing, reading a file out of an image.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, HostConfig, ImageInspect};
use bollard::query_parameters::{
    DownloadFromContainerOptionsBuilder, ListContainersOptionsBuilder, ListImagesOptionsBuilder,
    RemoveContainerOptionsBuilder,
};
use futures_util::TryStreamExt;

use crate::archive::{self, Entry};
use crate::error::RuntimeError;
use crate::{MANAGED_LABEL, MAX_SYMLINK_HOPS};

/// A container found by its labels.
#[derive(Clone, Debug)]
pub struct Labelled {
    pub id: String,
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Where bollard connects when `DOCKER_HOST` is unset.
const DEFAULT_ENDPOINT: &str = "unix:///var/run/docker.sock";

/// How long a timed-out or cancelled container gets between `SIGTERM` and `SIGKILL`.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(2);

/// A connection to one Docker Engine. Cheap to clone (the HTTP client is shared).
#[derive(Debug, Clone)]
pub struct Docker {
    pub(crate) inner: bollard::Docker,
    pub(crate) endpoint: String,
    pub(crate) stop_grace: Duration,
}

/// What kliko needs to know about a local image: its content-addressed id,
/// for cache keys, and the rest for provenance and the web UI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// `sha256:<64 hex>`: the image's config digest.
    pub id: String,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    /// The image's `USER`; `None` when unset (root).
    pub user: Option<String>,
    /// Creation time as the daemon reports it (RFC 3339).
    pub created: Option<String>,
    pub labels: BTreeMap<String, String>,
}

impl Docker {
    /// Connect to `DOCKER_HOST`, or the local socket when it is unset, and
    /// negotiate the API version down to what the daemon speaks.
    pub async fn connect() -> Result<Docker, RuntimeError> {
        let endpoint =
            std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let unreachable = |source| RuntimeError::docker_unreachable(&endpoint, source);
        // On a local socket, ask `/_ping` (what the docker CLI asks) for the daemon's API
        // version: `/version`, which bollard's negotiation uses, makes the daemon query
        // containerd and run `runc --version`, several milliseconds on every command. Any
        // trouble on this quick path falls back to bollard's negotiation and its errors.
        let quick = match socket_path(&endpoint) {
            Some(path) => ping_api_version(&path).await.and_then(|(major, minor)| {
                let ours = bollard::API_DEFAULT_VERSION;
                let version = if (major, minor) < (ours.major_version, ours.minor_version) {
                    bollard::ClientVersion { major_version: major, minor_version: minor }
                } else {
                    *ours
                };
                bollard::Docker::connect_with_unix(&path, 120, &version).ok()
            }),
            None => None,
        };
        let inner = match quick {
            Some(inner) => inner,
            None => {
                let inner = bollard::Docker::connect_with_defaults().map_err(unreachable)?;
                inner.negotiate_version().await.map_err(unreachable)?
            }
        };
        Ok(Docker { inner, endpoint, stop_grace: DEFAULT_STOP_GRACE })
    }

    /// The time a timed-out or cancelled container gets to exit on `SIGTERM`
    /// before it is killed; [`DEFAULT_STOP_GRACE`] unless changed here.
    /// Whole seconds (the Engine API's unit), rounded up.
    pub fn with_stop_grace(mut self, grace: Duration) -> Docker {
        self.stop_grace = grace;
        self
    }

    /// The endpoint this connection talks to (`unix:///var/run/docker.sock`, `tcp://…`).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Resolve a reference (tag, short or full id, `name@sha256:…`) to the
    /// image's id and metadata. Never pulls.
    pub async fn inspect_image(&self, reference: &str) -> Result<ImageInfo, RuntimeError> {
        match self.inner.inspect_image(reference).await {
            Ok(inspect) => Ok(image_info(inspect)),
            Err(e) if is_status(&e, 404) => Err(RuntimeError::ImageNotFound { reference: reference.to_string() }),
            Err(e) => Err(RuntimeError::docker(format!("inspect image `{reference}`"), e)),
        }
    }

    /// All local images (not intermediate layers), newest first as the daemon
    /// lists them. The caller filters for kliko images.
    pub async fn list_images(&self) -> Result<Vec<ImageInfo>, RuntimeError> {
        let summaries = self
            .inner
            .list_images(Some(ListImagesOptionsBuilder::new().all(false).build()))
            .await
            .map_err(|e| RuntimeError::docker("list images", e))?;
        let mut images = Vec::with_capacity(summaries.len());
        for summary in summaries {
            // The summary lacks entrypoint, cmd and user: inspect each one.
            match self.inspect_image(&summary.id).await {
                Ok(info) => images.push(info),
                // Removed between the listing and the inspection.
                Err(RuntimeError::ImageNotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(images)
    }

    /// Read one regular file out of an image without running anything in it.
    ///
    /// A container is created from the image (never started), the path is
    /// fetched through the archive API, and the container is removed whatever
    /// happens. Symlinks are resolved inside the image, one archive request per
    /// hop. Works on images without a shell and with an `ENTRYPOINT`.
    pub async fn read_file(&self, image_id: &str, path: &str) -> Result<Vec<u8>, RuntimeError> {
        let body = ContainerCreateBody {
            image: Some(image_id.to_string()),
            // Never started, but the daemon refuses to create a container
            // without a command and FROM-scratch images often have none.
            cmd: Some(vec!["/kliko-never-started".to_string()]),
            labels: Some(HashMap::from([
                (MANAGED_LABEL.to_string(), "true".to_string()),
                // If this process is killed before it removes the container, a sweep can tell.
                (crate::OWNER_LABEL.to_string(), crate::this_process_owner()),
            ])),
            host_config: Some(HostConfig { network_mode: Some("none".to_string()), ..Default::default() }),
            ..Default::default()
        };
        let id = self.create(image_id, None, body).await?;
        let guard = RemoveOnDrop::new(self.inner.clone(), id.clone());
        let result = self.read_file_from(&id, image_id, path).await;
        let removed = self.remove(&id).await;
        guard.disarm();
        let bytes = result?;
        removed?;
        Ok(bytes)
    }

    async fn read_file_from(&self, container: &str, image: &str, path: &str) -> Result<Vec<u8>, RuntimeError> {
        let not_found = || RuntimeError::FileNotInImage { image: image.to_string(), path: path.to_string() };
        let mut current = archive::normalize("/", path);
        for _ in 0..=MAX_SYMLINK_HOPS {
            if current == "/" {
                // Asking for `/` would copy the whole filesystem.
                return Err(RuntimeError::NotARegularFile {
                    image: image.to_string(),
                    path: path.to_string(),
                    kind: "directory",
                });
            }
            let options = DownloadFromContainerOptionsBuilder::new().path(&current).build();
            let tar: Vec<u8> = match self
                .inner
                .download_from_container(container, Some(options))
                .map_ok(|chunk| chunk.to_vec())
                .try_concat()
                .await
            {
                Ok(tar) => tar,
                Err(e) if is_status(&e, 404) => return Err(not_found()),
                // The daemon resolves the link itself to report its target,
                // and gives up on a loop before we can count hops.
                Err(BollardError::DockerResponseServerError { message, .. }) if message.contains("too many links") => {
                    return Err(RuntimeError::SymlinkLoop { image: image.to_string(), path: path.to_string() })
                }
                Err(e) => return Err(RuntimeError::docker(format!("copy `{current}` out of image `{image}`"), e)),
            };
            let entry = archive::first_entry(&tar).map_err(|source| RuntimeError::Archive {
                image: image.to_string(),
                path: path.to_string(),
                source,
            })?;
            match entry {
                Entry::File(bytes) => return Ok(bytes),
                Entry::Symlink(target) => {
                    let dir = archive::parent(&current);
                    current = archive::normalize(&dir, &target);
                }
                Entry::Other(kind) => {
                    return Err(RuntimeError::NotARegularFile {
                        image: image.to_string(),
                        path: path.to_string(),
                        kind,
                    })
                }
            }
        }
        Err(RuntimeError::SymlinkLoop { image: image.to_string(), path: path.to_string() })
    }

    /// Ids of all containers, running or not, that carry the label `key=value`.
    pub async fn containers_with_label(&self, key: &str, value: &str) -> Result<Vec<String>, RuntimeError> {
        let filters = HashMap::from([("label", vec![format!("{key}={value}")])]);
        let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
        let containers =
            self.inner.list_containers(Some(options)).await.map_err(|e| RuntimeError::docker("list containers", e))?;
        Ok(containers.into_iter().filter_map(|c| c.id).collect())
    }

    /// All containers, running or not, that carry the label `key=value`, with their labels.
    pub async fn labelled_containers(&self, key: &str, value: &str) -> Result<Vec<Labelled>, RuntimeError> {
        let filters = HashMap::from([("label", vec![format!("{key}={value}")])]);
        let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
        let containers =
            self.inner.list_containers(Some(options)).await.map_err(|e| RuntimeError::docker("list containers", e))?;
        Ok(containers
            .into_iter()
            .filter_map(|c| Some(Labelled { id: c.id?, labels: c.labels.unwrap_or_default().into_iter().collect() }))
            .collect())
    }

    /// Create a container; a missing image becomes [`RuntimeError::ImageNotFound`].
    pub(crate) async fn create(
        &self,
        image: &str,
        name: Option<&str>,
        body: ContainerCreateBody,
    ) -> Result<String, RuntimeError> {
        let options = name.map(|n| bollard::query_parameters::CreateContainerOptionsBuilder::new().name(n).build());
        match self.inner.create_container(options, body).await {
            Ok(created) => Ok(created.id),
            Err(e) if is_status(&e, 404) => Err(RuntimeError::ImageNotFound { reference: image.to_string() }),
            Err(e) => Err(RuntimeError::docker(format!("create a container from image `{image}`"), e)),
        }
    }

    /// Force-remove a container and its anonymous volumes; gone already is fine.
    pub async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        remove_container(&self.inner, id).await.map_err(|e| RuntimeError::docker(format!("remove container `{id}`"), e))
    }
}

async fn remove_container(docker: &bollard::Docker, id: &str) -> Result<(), BollardError> {
    let options = RemoveContainerOptionsBuilder::new().force(true).v(true).build();
    match docker.remove_container(id, Some(options)).await {
        Err(e) if is_status(&e, 404) => Ok(()),
        other => other,
    }
}

/// The socket path of a `unix://` endpoint.
fn socket_path(endpoint: &str) -> Option<String> {
    endpoint.strip_prefix("unix://").filter(|p| !p.is_empty()).map(str::to_string)
}

/// `GET /_ping` over a Unix socket: the `Api-Version` header's `(major, minor)`, or `None`
/// on any failure (the caller then negotiates the slow way and reports errors from there).
async fn ping_api_version(path: &str) -> Option<(usize, usize)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::UnixStream::connect(path).await.ok()?;
        stream.write_all(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n").await.ok()?;
        let mut response = Vec::with_capacity(1024);
        stream.take(64 * 1024).read_to_end(&mut response).await.ok()?;
        Some(response)
    };
    let response = tokio::time::timeout(std::time::Duration::from_secs(5), exchange).await.ok()??;
    parse_ping(&response)
}

fn parse_ping(response: &[u8]) -> Option<(usize, usize)> {
    let text = std::str::from_utf8(response).ok()?;
    let head = text.split("\r\n\r\n").next()?;
    let mut lines = head.split("\r\n");
    if !lines.next()?.starts_with("HTTP/1.1 200") {
        return None;
    }
    let version = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim().eq_ignore_ascii_case("api-version").then(|| value.trim())
    })?;
    let (major, minor) = version.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

pub(crate) fn is_status(e: &BollardError, status: u16) -> bool {
    matches!(e, BollardError::DockerResponseServerError { status_code, .. } if *status_code == status)
}

fn image_info(inspect: ImageInspect) -> ImageInfo {
    let config = inspect.config.unwrap_or_default();
    ImageInfo {
        id: inspect.id.unwrap_or_default(),
        repo_tags: inspect.repo_tags.unwrap_or_default(),
        repo_digests: inspect.repo_digests.unwrap_or_default(),
        entrypoint: config.entrypoint,
        cmd: config.cmd,
        user: config.user.filter(|u| !u.is_empty()),
        // `created` is a String, or a date type when another crate turns on
        // bollard's `time`/`chrono` feature: go through serde to accept both.
        created: inspect.created.as_ref().and_then(|c| match serde_json::to_value(c).ok()? {
            serde_json::Value::String(s) => Some(s),
            other => Some(other.to_string()),
        }),
        labels: config.labels.unwrap_or_default().into_iter().collect(),
    }
}

/// Removes a container if the future that owns it is dropped part-way (the
/// normal paths remove it themselves and disarm this). Needs a tokio runtime
/// that is still running to do its work.
pub(crate) struct RemoveOnDrop {
    docker: bollard::Docker,
    id: Option<String>,
}

impl RemoveOnDrop {
    pub(crate) fn new(docker: bollard::Docker, id: String) -> Self {
        RemoveOnDrop { docker, id: Some(id) }
    }

    pub(crate) fn disarm(mut self) {
        self.id = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                let docker = self.docker.clone();
                handle.spawn(async move {
                    let _ = remove_container(&docker, &id).await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_version_is_read_from_a_ping_answer() {
        let answer = b"HTTP/1.1 200 OK\r\nApi-Version: 1.41\r\nOstype: linux\r\nContent-Length: 2\r\n\r\nOK";
        assert_eq!(parse_ping(answer), Some((1, 41)));
        let lower = b"HTTP/1.1 200 OK\r\napi-version:1.47\r\n\r\nOK";
        assert_eq!(parse_ping(lower), Some((1, 47)));
    }

    #[test]
    fn a_ping_answer_without_a_usable_version_is_refused() {
        assert_eq!(parse_ping(b"HTTP/1.1 500 Internal Server Error\r\nApi-Version: 1.41\r\n\r\n"), None);
        assert_eq!(parse_ping(b"HTTP/1.1 200 OK\r\nOstype: linux\r\n\r\nOK"), None);
        assert_eq!(parse_ping(b"HTTP/1.1 200 OK\r\nApi-Version: one\r\n\r\nOK"), None);
        assert_eq!(parse_ping(b""), None);
    }

    #[test]
    fn only_unix_endpoints_take_the_quick_path() {
        assert_eq!(socket_path("unix:///var/run/docker.sock").as_deref(), Some("/var/run/docker.sock"));
        assert_eq!(socket_path("tcp://127.0.0.1:2375"), None);
        assert_eq!(socket_path("unix://"), None);
    }
}
