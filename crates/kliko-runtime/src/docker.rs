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

/// A connection to one Docker Engine API: the Docker daemon, or Podman's compatible service.
/// Cheap to clone (the HTTP client is shared).
#[derive(Debug, Clone)]
pub struct Docker {
    pub(crate) inner: bollard::Docker,
    pub(crate) endpoint: String,
    pub(crate) stop_grace: Duration,
    pub(crate) flavor: Flavor,
    /// What the server says it is (`Docker/20.10.24 (linux)`, `Libpod/4.3.1 (linux)`).
    pub(crate) server: Option<String>,
    /// Podman running as an unprivileged user: the container's user namespace keeps the
    /// invoking user's id (`keep-id`), so outputs belong to that user.
    pub(crate) rootless: bool,
    /// A `podman system service` this process started, stopped when the last clone drops.
    pub(crate) service: Option<std::sync::Arc<crate::podman::Service>>,
}

/// Which engine answers on a Docker-API endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Docker,
    Podman,
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
        Docker::connect_to(&endpoint).await
    }

    /// Connect to `endpoint` (`unix:///path`, `tcp://host:port`), telling Docker from Podman
    /// by what the server says it is.
    pub async fn connect_to(endpoint: &str) -> Result<Docker, RuntimeError> {
        let runtime = if endpoint.contains("podman") { "podman" } else { "docker" };
        let unreachable = |source| RuntimeError::unreachable(runtime, endpoint, source);
        // On a local socket, ask `/_ping` (what the docker CLI asks) for the daemon's API
        // version: `/version`, which bollard's negotiation uses, makes the daemon query
        // containerd and run `runc --version`, several milliseconds on every command. Any
        // trouble on this quick path falls back to bollard's negotiation and its errors.
        let socket = socket_path(endpoint);
        let ping = match &socket {
            Some(path) => ping(path).await,
            None => None,
        };
        let quick = match (&socket, &ping) {
            (Some(path), Some(p)) => {
                let (major, minor) = p.api;
                let ours = bollard::API_DEFAULT_VERSION;
                let version = if (major, minor) < (ours.major_version, ours.minor_version) {
                    bollard::ClientVersion { major_version: major, minor_version: minor }
                } else {
                    *ours
                };
                bollard::Docker::connect_with_unix(path, 120, &version).ok()
            }
            _ => None,
        };
        let (inner, flavor, server) = match quick {
            Some(inner) => {
                let p = ping.expect("a quick connection has a ping");
                (inner, p.flavor(), p.server)
            }
            None => {
                let inner = match &socket {
                    Some(path) => bollard::Docker::connect_with_unix(path, 120, bollard::API_DEFAULT_VERSION),
                    None if std::env::var("DOCKER_HOST").ok().as_deref() == Some(endpoint) => {
                        bollard::Docker::connect_with_defaults()
                    }
                    None => bollard::Docker::connect_with_http(endpoint, 120, bollard::API_DEFAULT_VERSION),
                }
                .map_err(unreachable)?;
                let inner = inner.negotiate_version().await.map_err(unreachable)?;
                // The slow path's one extra question: who is this?
                let version = inner.version().await.ok();
                let podman = version
                    .as_ref()
                    .and_then(|v| v.components.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.name.to_ascii_lowercase().contains("podman")));
                let server = version.and_then(|v| v.version).map(|v| {
                    if podman {
                        format!("Libpod/{v}")
                    } else {
                        format!("Docker/{v}")
                    }
                });
                (inner, if podman { Flavor::Podman } else { Flavor::Docker }, server)
            }
        };
        // Rootless Podman's socket belongs to its user; the system service's to root.
        let rootless = flavor == Flavor::Podman
            && socket.as_deref().and_then(|p| std::fs::metadata(p).ok()).is_some_and(|m| {
                use std::os::unix::fs::MetadataExt;
                m.uid() != 0
            });
        Ok(Docker {
            inner,
            endpoint: endpoint.to_string(),
            stop_grace: DEFAULT_STOP_GRACE,
            flavor,
            server,
            rootless,
            service: None,
        })
    }

    /// A failed call, in this runtime's name.
    pub(crate) fn fail(&self, action: impl Into<String>, source: BollardError) -> RuntimeError {
        RuntimeError::Backend { runtime: self.name().into(), action: action.into(), source: Box::new(source) }
    }

    /// Docker or Podman.
    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// `docker` or `podman`, for messages.
    pub fn name(&self) -> &'static str {
        match self.flavor {
            Flavor::Docker => "docker",
            Flavor::Podman => "podman",
        }
    }

    /// What the runtime is, for provenance: `docker 20.10.24`, `podman 4.3.1 (rootless)`.
    pub fn describe(&self) -> String {
        let version = self
            .server
            .as_deref()
            .and_then(|s| s.split_once('/'))
            .map(|(_, v)| v.split_whitespace().next().unwrap_or(v).to_string());
        let mut d = match version {
            Some(v) => format!("{} {v}", self.name()),
            None => self.name().to_string(),
        };
        if self.rootless {
            d.push_str(" (rootless)");
        }
        d
    }

    pub(crate) fn dialect(&self) -> crate::run::Dialect {
        crate::run::Dialect { podman: self.flavor == Flavor::Podman, keep_id: self.rootless }
    }

    /// Whether containers run in a user namespace that maps the invoking user to itself.
    pub fn rootless(&self) -> bool {
        self.rootless
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
            Err(e) => Err(self.fail(format!("inspect image `{reference}`"), e)),
        }
    }

    /// All local images (not intermediate layers), newest first as the daemon
    /// lists them. The caller filters for kliko images.
    pub async fn list_images(&self) -> Result<Vec<ImageInfo>, RuntimeError> {
        let summaries = self
            .inner
            .list_images(Some(ListImagesOptionsBuilder::new().all(false).build()))
            .await
            .map_err(|e| self.fail("list images", e))?;
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
    ///
    /// When the daemon is local and keeps the image's layers in overlay folders this process
    /// may read (Docker as root, rootless Podman), a plain regular file is read from them
    /// directly and no container is created (see `layers.rs` for when that is certain).
    pub async fn read_file(&self, image_id: &str, path: &str) -> Result<Vec<u8>, RuntimeError> {
        if let Some(bytes) = self.read_file_cheaply(image_id, path).await {
            return Ok(bytes);
        }
        self.read_file_through_container(image_id, path).await
    }

    /// The shortcut of [`Docker::read_file`], from the image's layer folders: `None` whenever
    /// it is not certain (then only a container can tell).
    pub async fn read_file_cheaply(&self, image_id: &str, path: &str) -> Option<Vec<u8>> {
        // A daemon reached over TCP or SSH names folders on another machine.
        if !self.endpoint.starts_with("unix://") || std::env::var_os("KLIKO_NO_LAYER_READS").is_some() {
            return None;
        }
        let driver = self.inner.inspect_image(image_id).await.ok()?.graph_driver?;
        let dirs = crate::layers::layer_dirs(&driver.name, &driver.data)?;
        let path = archive::normalize("/", path);
        tokio::task::spawn_blocking(move || crate::layers::read(&dirs, &path)).await.ok()?
    }

    /// [`Docker::read_file`] through a created (never started) container and the archive API.
    pub async fn read_file_through_container(&self, image_id: &str, path: &str) -> Result<Vec<u8>, RuntimeError> {
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
                Err(e) => return Err(self.fail(format!("copy `{current}` out of image `{image}`"), e)),
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

    /// `docker save` of one image into the file `dest` (written whole, then renamed there).
    pub async fn export_image(&self, image_id: &str, dest: &std::path::Path) -> Result<(), RuntimeError> {
        use tokio::io::AsyncWriteExt;
        let io = |e: std::io::Error| RuntimeError::Backend {
            runtime: self.name().into(),
            action: format!("save image `{image_id}` to `{}`", dest.display()),
            source: Box::new(e),
        };
        let tmp = dest.with_extension("part");
        let mut file = tokio::fs::File::create(&tmp).await.map_err(io)?;
        let mut stream = self.inner.export_image(image_id);
        use futures_util::StreamExt;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => file.write_all(&bytes).await.map_err(io)?,
                Err(e) => {
                    drop(file);
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return Err(self.fail(format!("save image `{image_id}`"), e));
                }
            }
        }
        file.flush().await.map_err(io)?;
        drop(file);
        tokio::fs::rename(&tmp, dest).await.map_err(io)
    }

    /// Ids of all containers, running or not, that carry the label `key=value`.
    pub async fn containers_with_label(&self, key: &str, value: &str) -> Result<Vec<String>, RuntimeError> {
        let filters = HashMap::from([("label", vec![format!("{key}={value}")])]);
        let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
        let containers =
            self.inner.list_containers(Some(options)).await.map_err(|e| self.fail("list containers", e))?;
        Ok(containers.into_iter().filter_map(|c| c.id).collect())
    }

    /// All containers, running or not, that carry the label `key=value`, with their labels.
    pub async fn labelled_containers(&self, key: &str, value: &str) -> Result<Vec<Labelled>, RuntimeError> {
        let filters = HashMap::from([("label", vec![format!("{key}={value}")])]);
        let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
        let containers =
            self.inner.list_containers(Some(options)).await.map_err(|e| self.fail("list containers", e))?;
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
            Err(e) => Err(self.fail(format!("create a container from image `{image}`"), e)),
        }
    }

    /// Force-remove a container and its anonymous volumes; gone already is fine.
    pub async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        remove_container(&self.inner, id).await.map_err(|e| self.fail(format!("remove container `{id}`"), e))
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

/// What `GET /_ping` says.
#[derive(Debug, PartialEq, Eq)]
struct Ping {
    /// `Api-Version`.
    api: (usize, usize),
    /// `Server`: `Docker/20.10.24 (linux)`, `Libpod/4.3.1 (linux)`.
    server: Option<String>,
    /// `Libpod-Api-Version`: only Podman sends it.
    libpod: bool,
}

impl Ping {
    fn flavor(&self) -> Flavor {
        if self.libpod || self.server.as_deref().is_some_and(|s| s.starts_with("Libpod")) {
            Flavor::Podman
        } else {
            Flavor::Docker
        }
    }
}

/// `GET /_ping` over a Unix socket, or `None` on any failure (the caller then negotiates the
/// slow way and reports errors from there).
async fn ping(path: &str) -> Option<Ping> {
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

fn parse_ping(response: &[u8]) -> Option<Ping> {
    let text = std::str::from_utf8(response).ok()?;
    let head = text.split("\r\n\r\n").next()?;
    let mut lines = head.split("\r\n");
    if !lines.next()?.starts_with("HTTP/1.1 200") {
        return None;
    }
    let headers: Vec<(&str, &str)> =
        lines.filter_map(|l| l.split_once(':')).map(|(n, v)| (n.trim(), v.trim())).collect();
    let header = |name: &str| headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| *v);
    let (major, minor) = header("api-version")?.split_once('.')?;
    Some(Ping {
        api: (major.parse().ok()?, minor.parse().ok()?),
        server: header("server").map(str::to_string),
        libpod: header("libpod-api-version").is_some(),
    })
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
        let ping = parse_ping(answer).unwrap();
        assert_eq!((ping.api, ping.flavor()), ((1, 41), Flavor::Docker));
        let lower = b"HTTP/1.1 200 OK\r\napi-version:1.47\r\n\r\nOK";
        assert_eq!(parse_ping(lower).unwrap().api, (1, 47));
    }

    #[test]
    fn podman_is_told_from_docker_by_its_ping() {
        let podman = b"HTTP/1.1 200 OK\r\nApi-Version: 1.41\r\nLibpod-Api-Version: 4.3.1\r\nServer: Libpod/4.3.1 (linux)\r\n\r\nOK";
        let p = parse_ping(podman).unwrap();
        assert_eq!((p.flavor(), p.server.as_deref()), (Flavor::Podman, Some("Libpod/4.3.1 (linux)")));
        let docker = b"HTTP/1.1 200 OK\r\nApi-Version: 1.41\r\nServer: Docker/20.10.24+dfsg1 (linux)\r\n\r\nOK";
        assert_eq!(parse_ping(docker).unwrap().flavor(), Flavor::Docker);
    }

    #[test]
    fn a_ping_answer_without_a_usable_version_is_refused() {
        assert!(parse_ping(b"HTTP/1.1 500 Internal Server Error\r\nApi-Version: 1.41\r\n\r\n").is_none());
        assert!(parse_ping(b"HTTP/1.1 200 OK\r\nOstype: linux\r\n\r\nOK").is_none());
        assert!(parse_ping(b"HTTP/1.1 200 OK\r\nApi-Version: one\r\n\r\nOK").is_none());
        assert!(parse_ping(b"").is_none());
    }

    #[test]
    fn only_unix_endpoints_take_the_quick_path() {
        assert_eq!(socket_path("unix:///var/run/docker.sock").as_deref(), Some("/var/run/docker.sock"));
        assert_eq!(socket_path("tcp://127.0.0.1:2375"), None);
        assert_eq!(socket_path("unix://"), None);
    }
}
