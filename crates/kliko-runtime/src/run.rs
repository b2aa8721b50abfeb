//! Running one container to completion: logs, timeout, cancellation, cleanup.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, HostConfig, MountType};
use bollard::query_parameters::{AttachContainerOptionsBuilder, StopContainerOptionsBuilder};
use futures_util::stream::{Stream as FuturesStream, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::docker::{is_status, Docker, RemoveOnDrop};
use crate::error::RuntimeError;
use crate::MANAGED_LABEL;

/// After the container has exited, how long its log stream may stay silent
/// before we stop waiting for it to close. The Engine closes it as soon as
/// the container's pipes are closed, which the end of its PID namespace
/// guarantees: this only guards against a daemon that never does.
const LOG_LINGER: Duration = Duration::from_secs(10);

/// A bind mount of a host file or directory into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Absolute path on the host; a file or a directory. Must exist.
    pub host: PathBuf,
    /// Absolute path inside the container.
    pub container: String,
    pub read_only: bool,
}

/// Everything needed to run one container.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerSpec {
    /// The image, best given as its id (`sha256:…`) so a re-tag cannot swap it.
    pub image_id: String,
    /// The container's command, e.g. `["/kliko"]`. The image's `ENTRYPOINT`
    /// stays in place, so this is appended to it. Empty: the image's own `CMD`.
    pub cmd: Vec<String>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
    /// `uid:gid` (or any `--user` form); `None` keeps the image's `USER`.
    pub user: Option<String>,
    /// A Docker network mode (`bridge`, `host`, a network name). `None`
    /// means `none`: no network at all, the default.
    pub network: Option<String>,
    pub memory_bytes: Option<i64>,
    /// CPU quota, in CPUs (`1.5`: one and a half).
    pub cpus: Option<f64>,
    /// Wall-clock limit from start; the container is stopped when it passes.
    pub timeout: Option<Duration>,
    /// Added to the container next to `io.kliko.managed=true`.
    pub labels: BTreeMap<String, String>,
    pub name: Option<String>,
    pub workdir: Option<String>,
    /// GPUs for the container; checked against this machine before it is created.
    pub gpus: Option<crate::Gpus>,
}

impl ContainerSpec {
    /// Whether this machine has the GPUs the spec asks for (every runtime asks, before it
    /// starts anything).
    pub fn check_gpus(&self) -> Result<(), RuntimeError> {
        match &self.gpus {
            Some(g) => g.check(&crate::gpu::present()),
            None => Ok(()),
        }
    }
}

/// How a container is described to the engine behind the API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Dialect {
    /// Podman: GPUs as CDI devices.
    pub podman: bool,
    /// Rootless Podman: the user namespace keeps the invoking user's id.
    pub keep_id: bool,
}

/// Which of the container's output streams a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A piece of the container's output, in the order the daemon sent it.
/// Chunks do not follow line boundaries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    pub stream: Stream,
    pub bytes: bytes::Bytes,
}

/// How a run ended. A non-zero exit is an outcome, not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The workload exited by itself with this status.
    Exited(i64),
    /// [`ContainerSpec::timeout`] passed; the container was stopped.
    TimedOut,
    /// The caller's cancellation token fired; the container was stopped.
    Cancelled,
}

/// The result of a run ([`crate::ContainerRuntime::run`]). The container no longer exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    pub outcome: Outcome,
    pub container_id: String,
    /// Just before the start request (the workload cannot have begun earlier).
    pub started_at: SystemTime,
    /// When the exit (or the stop, on timeout and cancellation) was seen.
    pub finished_at: SystemTime,
}

/// A stopped container being removed in the background (see
/// [`crate::ContainerRuntime::run_until_exit`]).
pub struct Removal {
    container: String,
    task: Option<tokio::task::JoinHandle<Result<(), RuntimeError>>>,
}

impl Removal {
    /// A removal going on in `task`.
    pub fn spawned(container: String, task: tokio::task::JoinHandle<Result<(), RuntimeError>>) -> Removal {
        Removal { container, task: Some(task) }
    }

    /// Wait until the container is gone.
    pub async fn finish(mut self) -> Result<(), RuntimeError> {
        let task = self.task.take().expect("finish is called once");
        match task.await {
            Ok(result) => result,
            Err(e) => {
                Err(RuntimeError::RemovalInterrupted { container: self.container.clone(), message: e.to_string() })
            }
        }
    }
}

type LogStream = Pin<Box<dyn FuturesStream<Item = Result<LogOutput, BollardError>> + Send>>;

impl Docker {
    /// [`ContainerRuntime::run`](crate::ContainerRuntime::run), returning as soon as the container has stopped and all its output has
    /// been sent, while its removal goes on in the background: the caller can work on the
    /// output meanwhile (the container's processes are gone, so nothing writes to its mounts
    /// any more). Await [`Removal::finish`] before reporting the run as done; a dropped
    /// [`Removal`] still completes in the background. On an error part-way the container has
    /// already been removed when this returns.
    pub async fn run_until_exit(
        &self,
        spec: &ContainerSpec,
        logs: mpsc::Sender<LogChunk>,
        cancel: CancellationToken,
    ) -> Result<(RunOutcome, Removal), RuntimeError> {
        spec.check_gpus()?;
        let body = container_body(spec, self.dialect())?;
        let id = self.create(&spec.image_id, spec.name.as_deref(), body).await?;
        kliko_core::trace::mark("container created");
        let guard = RemoveOnDrop::new(self.inner.clone(), id.clone());
        let result = self.drive(&id, spec, logs, &cancel).await;
        kliko_core::trace::mark("container exited");
        match result {
            Ok(outcome) => {
                let docker = self.clone();
                let container = id.clone();
                let task = tokio::spawn(async move {
                    let removed = docker.remove(&id).await;
                    guard.disarm();
                    removed
                });
                Ok((outcome, Removal::spawned(container, task)))
            }
            Err(e) => {
                let _ = self.remove(&id).await;
                guard.disarm();
                Err(e)
            }
        }
    }

    async fn drive(
        &self,
        id: &str,
        spec: &ContainerSpec,
        logs: mpsc::Sender<LogChunk>,
        cancel: &CancellationToken,
    ) -> Result<RunOutcome, RuntimeError> {
        // Attach before start, as `docker run` does, so that not a byte of a
        // short-lived container's output is missed.
        let options = AttachContainerOptionsBuilder::new().stream(true).stdout(true).stderr(true).build();
        let attached = self
            .inner
            .attach_container(id, Some(options))
            .await
            .map_err(|e| self.fail(format!("attach to container `{id}`"), e))?;
        let exited = CancellationToken::new();
        let pump = AbortOnDrop(tokio::spawn(pump_logs(attached.output, logs, exited.clone())));

        let started_at = SystemTime::now();
        if cancel.is_cancelled() {
            return Ok(RunOutcome {
                outcome: Outcome::Cancelled,
                container_id: id.to_string(),
                started_at,
                finished_at: SystemTime::now(),
            });
        }
        self.inner.start_container(id, None).await.map_err(|e| self.fail(format!("start container `{id}`"), e))?;
        kliko_core::trace::mark("container started");

        let deadline = async {
            match spec.timeout {
                Some(limit) => tokio::time::sleep(limit).await,
                None => std::future::pending().await,
            }
        };
        // An exit seen at the same moment as the deadline or the cancellation
        // wins: the workload did finish, and its status is the truth.
        let outcome = tokio::select! {
            biased;
            code = self.wait_exit(id) => Outcome::Exited(code?),
            _ = cancel.cancelled() => {
                self.stop(id).await?;
                Outcome::Cancelled
            }
            _ = deadline => {
                self.stop(id).await?;
                Outcome::TimedOut
            }
        };
        let finished_at = SystemTime::now();
        exited.cancel();

        let pumped = pump.join().await;
        // Logs that broke off matter only for a run that ended by itself: a
        // stopped container's stream may end any which way.
        if let (Outcome::Exited(_), Err(e)) = (outcome, pumped) {
            return Err(self.fail(format!("stream the logs of container `{id}`"), e));
        }
        Ok(RunOutcome { outcome, container_id: id.to_string(), started_at, finished_at })
    }

    /// The exit status, from the first answer of the `wait` endpoint.
    async fn wait_exit(&self, id: &str) -> Result<i64, RuntimeError> {
        let mut wait = self.inner.wait_container(id, None::<bollard::query_parameters::WaitContainerOptions>);
        match wait.next().await {
            Some(Ok(response)) => match response.error.and_then(|e| e.message) {
                Some(message) if response.status_code == 0 && !message.is_empty() => Err(self.fail(
                    format!("wait for container `{id}`"),
                    BollardError::DockerContainerWaitError { error: message, code: 0 },
                )),
                _ => Ok(response.status_code),
            },
            // bollard turns a non-zero exit into this error: it is an outcome.
            Some(Err(BollardError::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(e)) => Err(self.fail(format!("wait for container `{id}`"), e)),
            None => Err(RuntimeError::NoExitStatus { container: id.to_string() }),
        }
    }

    /// `SIGTERM`, then `SIGKILL` after the stop grace; returns once it is down.
    async fn stop(&self, id: &str) -> Result<(), RuntimeError> {
        let grace = self.stop_grace.as_secs() + u64::from(self.stop_grace.subsec_nanos() > 0);
        let options = StopContainerOptionsBuilder::new().t(i32::try_from(grace).unwrap_or(i32::MAX)).build();
        match self.inner.stop_container(id, Some(options)).await {
            // 304: already stopped; 404: already gone. Both are what we wanted.
            Err(e) if is_status(&e, 404) || is_status(&e, 304) => Ok(()),
            Err(e) => Err(self.fail(format!("stop container `{id}`"), e)),
            Ok(()) => Ok(()),
        }
    }
}

/// Forward the attach stream to the caller until it ends, or until it has been
/// silent for [`LOG_LINGER`] after the container exited.
async fn pump_logs(
    mut output: LogStream,
    logs: mpsc::Sender<LogChunk>,
    exited: CancellationToken,
) -> Result<(), BollardError> {
    let mut receiver_open = true;
    loop {
        let item = tokio::select! {
            item = output.next() => item,
            _ = async {
                exited.cancelled().await;
                tokio::time::sleep(LOG_LINGER).await;
            } => None,
        };
        let chunk = match item {
            None => return Ok(()),
            Some(item) => match item? {
                LogOutput::StdOut { message } => LogChunk { stream: Stream::Stdout, bytes: message },
                LogOutput::StdErr { message } => LogChunk { stream: Stream::Stderr, bytes: message },
                // Only seen with a TTY, which we never allocate.
                LogOutput::Console { message } => LogChunk { stream: Stream::Stdout, bytes: message },
                LogOutput::StdIn { .. } => continue,
            },
        };
        // Keep draining after the receiver is gone so the daemon never blocks.
        if receiver_open && logs.send(chunk).await.is_err() {
            receiver_open = false;
        }
    }
}

/// A spawned task that does not outlive its owner.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl AbortOnDrop<Result<(), BollardError>> {
    async fn join(mut self) -> Result<(), BollardError> {
        let result = (&mut self.0).await;
        match result {
            Ok(r) => r,
            // Not aborted (we still own it): only a panic gets here.
            Err(e) => Err(BollardError::IOError { err: std::io::Error::other(e) }),
        }
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub(crate) fn container_body(spec: &ContainerSpec, dialect: Dialect) -> Result<ContainerCreateBody, RuntimeError> {
    let mut mounts = Vec::with_capacity(spec.mounts.len());
    for m in &spec.mounts {
        if !m.host.is_absolute() {
            return Err(RuntimeError::RelativeMount { path: m.host.clone() });
        }
        if !m.container.starts_with('/') {
            return Err(RuntimeError::RelativeMountTarget { target: m.container.clone() });
        }
        // Never a lossy conversion: `obs\xe9` would become `obs\u{fffd}`, another folder.
        let Some(source) = m.host.to_str() else {
            return Err(RuntimeError::PathNotUtf8 { path: m.host.clone() });
        };
        mounts.push(bollard::models::Mount {
            typ: Some(MountType::BIND),
            source: Some(source.to_string()),
            target: Some(m.container.clone()),
            read_only: Some(m.read_only),
            ..Default::default()
        });
    }
    let mut env = Vec::with_capacity(spec.env.len());
    for (name, value) in &spec.env {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(RuntimeError::InvalidEnvName { name: name.clone() });
        }
        env.push(format!("{name}={value}"));
    }
    let mut labels: HashMap<String, String> = spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    labels.insert(MANAGED_LABEL.to_string(), "true".to_string());

    Ok(ContainerCreateBody {
        image: Some(spec.image_id.clone()),
        cmd: (!spec.cmd.is_empty()).then(|| spec.cmd.clone()),
        env: Some(env),
        user: spec.user.clone(),
        working_dir: spec.workdir.clone(),
        labels: Some(labels),
        attach_stdin: Some(false),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        open_stdin: Some(false),
        tty: Some(false),
        host_config: Some(HostConfig {
            network_mode: Some(spec.network.clone().unwrap_or_else(|| "none".to_string())),
            mounts: Some(mounts),
            memory: spec.memory_bytes,
            nano_cpus: spec.cpus.map(|c| (c * 1e9) as i64),
            device_requests: spec
                .gpus
                .as_ref()
                .map(|g| vec![if dialect.podman { g.cdi_request() } else { g.docker_request() }]),
            // Rootless Podman maps the container's root to the invoking user, and every other
            // id to a subordinate one: a run as the invoking user's id keeps it instead, so
            // the outputs are that user's.
            userns_mode: (dialect.keep_id && spec.user.is_some()).then(|| "keep-id".to_string()),
            ..Default::default()
        }),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ContainerSpec {
        ContainerSpec { image_id: "sha256:abc".into(), cmd: vec!["/kliko".into()], ..Default::default() }
    }

    #[test]
    fn relative_mount_is_rejected() {
        let mut s = spec();
        s.mounts.push(Mount { host: "out".into(), container: "/output".into(), read_only: false });
        assert!(matches!(
            container_body(&s, Dialect::default()),
            Err(RuntimeError::RelativeMount { path }) if path.as_os_str() == "out"
        ));
    }

    #[test]
    fn a_host_path_that_is_not_utf8_is_refused_not_converted() {
        use std::os::unix::ffi::OsStrExt;
        let mut s = spec();
        let host = std::path::PathBuf::from(std::ffi::OsStr::from_bytes(b"/data/obs\xe9"));
        s.mounts.push(Mount { host: host.clone(), container: "/input".into(), read_only: true });
        assert!(
            matches!(container_body(&s, Dialect::default()), Err(RuntimeError::PathNotUtf8 { path }) if path == host)
        );
    }

    #[test]
    fn defaults_are_no_network_and_managed_label() {
        let mut s = spec();
        s.labels.insert("io.kliko.run".into(), "1".into());
        s.env.push(("INPUT".into(), "/input".into()));
        let body = container_body(&s, Dialect::default()).unwrap();
        let host = body.host_config.unwrap();
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        let labels = body.labels.unwrap();
        assert_eq!(labels.get(MANAGED_LABEL).map(String::as_str), Some("true"));
        assert_eq!(labels.get("io.kliko.run").map(String::as_str), Some("1"));
        assert_eq!(body.env.unwrap(), vec!["INPUT=/input".to_string()]);
        assert_eq!(body.tty, Some(false));
    }

    #[test]
    fn an_owner_label_names_this_process_until_it_is_gone() {
        let me = crate::this_process_owner();
        assert!(!crate::owner_is_gone(&me), "{me}");
        // Same host and pid, another start time: a reused pid is not us.
        let (rest, _) = me.rsplit_once('/').unwrap();
        assert!(crate::owner_is_gone(&format!("{rest}/1")));
        // A pid that cannot exist.
        let host = rest.rsplit_once('/').unwrap().0;
        assert!(crate::owner_is_gone(&format!("{host}/4194304/5")));
        // Another host's processes are never judged.
        assert!(!crate::owner_is_gone("some-other-host/4194304/5"));
        assert!(!crate::owner_is_gone("garbage"));
    }

    #[test]
    fn rootless_podman_keeps_the_users_id_and_gets_gpus_by_cdi() {
        let mut s = spec();
        s.user = Some("1001:1001".into());
        s.gpus = Some(crate::Gpus::Count(1));
        let docker = container_body(&s, Dialect::default()).unwrap().host_config.unwrap();
        assert_eq!(docker.userns_mode, None);
        assert_eq!(docker.device_requests.unwrap()[0].count, Some(1));
        let podman = container_body(&s, Dialect { podman: true, keep_id: true }).unwrap().host_config.unwrap();
        assert_eq!(podman.userns_mode.as_deref(), Some("keep-id"));
        let req = &podman.device_requests.unwrap()[0];
        assert_eq!(
            (req.driver.as_deref(), req.device_ids.clone()),
            (Some("cdi"), Some(vec!["nvidia.com/gpu=0".to_string()]))
        );
        // The image's own user: nothing to keep.
        s.user = None;
        let own = container_body(&s, Dialect { podman: true, keep_id: true }).unwrap().host_config.unwrap();
        assert_eq!(own.userns_mode, None);
    }

    #[test]
    fn bad_env_name_is_rejected() {
        let mut s = spec();
        s.env.push(("A=B".into(), "c".into()));
        assert!(matches!(container_body(&s, Dialect::default()), Err(RuntimeError::InvalidEnvName { .. })));
    }
}
