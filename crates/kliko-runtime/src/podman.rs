//! Podman, through its Docker-compatible API: the same [`Docker`] client, pointed at Podman's
//! socket, which this module finds or starts.
//!
//! Where: `DOCKER_HOST` when it is set (it always wins); else the invoking user's socket,
//! `$XDG_RUNTIME_DIR/podman/podman.sock` (`/run/podman/podman.sock` for root), when something
//! answers there; else this process starts `podman system service` on a private socket and
//! stops it when the runtime is dropped (or this process dies: the service gets `SIGTERM`
//! then). Rootless Podman runs each container in a user namespace that keeps the invoking
//! user's id (`keep-id`), so files a container writes to `/output` belong to that user.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::docker::{Docker, Flavor};
use crate::error::RuntimeError;

/// How long a started service may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The sockets a user's Podman listens on, in the order they are tried.
pub fn candidate_sockets(uid: u32, xdg_runtime_dir: Option<&Path>) -> Vec<PathBuf> {
    let mut c = Vec::new();
    if uid == 0 {
        c.push(PathBuf::from("/run/podman/podman.sock"));
    } else {
        if let Some(dir) = xdg_runtime_dir {
            c.push(dir.join("podman/podman.sock"));
        }
        let run_user = PathBuf::from(format!("/run/user/{uid}/podman/podman.sock"));
        if !c.contains(&run_user) {
            c.push(run_user);
        }
    }
    c
}

/// Connect to Podman (see the module docs).
pub async fn connect() -> Result<Docker, RuntimeError> {
    if let Some(host) = std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()) {
        return Docker::connect_to(&host).await;
    }
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let xdg = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()).map(PathBuf::from);
    for sock in candidate_sockets(uid, xdg.as_deref()) {
        if sock.exists() {
            // `connect_to` succeeds only once the server has answered.
            if let Ok(d) = Docker::connect_to(&format!("unix://{}", sock.display())).await {
                if d.flavor() == Flavor::Podman {
                    return Ok(d);
                }
            }
        }
    }
    let service = Service::start(uid, xdg.as_deref()).await?;
    let mut d = Docker::connect_to(&format!("unix://{}", service.socket.display())).await?;
    d.service = Some(Arc::new(service));
    Ok(d)
}

/// A `podman system service` this process started.
#[derive(Debug)]
pub struct Service {
    child: Mutex<Child>,
    socket: PathBuf,
    dir: PathBuf,
}

impl Service {
    /// `podman system service --time=0 unix://<private folder>/podman.sock`, answering.
    async fn start(uid: u32, xdg: Option<&Path>) -> Result<Service, RuntimeError> {
        let base = xdg
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("TMPDIR").filter(|t| !t.is_empty()).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        let dir = base.join(format!("kliko-podman-{uid}-{}", std::process::id()));
        let unavailable = |message: String| RuntimeError::RuntimeUnavailable { runtime: "podman".into(), message };
        {
            use std::os::unix::fs::DirBuilderExt;
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .map_err(|e| unavailable(format!("cannot make a folder for its socket at `{}`: {e}", dir.display())))?;
        }
        let socket = dir.join("podman.sock");
        let log = dir.join("service.log");
        let log_file =
            std::fs::File::create(&log).map_err(|e| unavailable(format!("cannot write `{}`: {e}", log.display())))?;
        let mut cmd = Command::new("podman");
        cmd.args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    // The service ends with this process, however it ends.
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().map_err(|e| {
            let _ = std::fs::remove_dir_all(&dir);
            unavailable(match e.kind() {
                std::io::ErrorKind::NotFound => "`podman` is not installed (it is not on PATH), and no Podman socket \
                                                 answers"
                    .to_string(),
                _ => format!("cannot start `podman system service`: {e}"),
            })
        })?;
        let service = Service { child: Mutex::new(child), socket, dir };
        let t0 = Instant::now();
        loop {
            if service.socket.exists() && std::os::unix::net::UnixStream::connect(&service.socket).is_ok() {
                return Ok(service);
            }
            let exited = service.child.lock().expect("service lock").try_wait().ok().flatten();
            if exited.is_some() || t0.elapsed() > START_TIMEOUT {
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                let said = said.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("it said nothing").to_string();
                let what = match exited {
                    Some(status) => format!("`podman system service` stopped at once ({status}): {said}"),
                    None => format!("`podman system service` did not answer in {} s: {said}", START_TIMEOUT.as_secs()),
                };
                return Err(unavailable(what));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The socket it listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let mut child = self.child.lock().expect("service lock");
        // SAFETY: a plain signal to our own child.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_users_own_socket_is_tried_first() {
        assert_eq!(candidate_sockets(0, None), [PathBuf::from("/run/podman/podman.sock")]);
        assert_eq!(
            candidate_sockets(1001, Some(Path::new("/run/user/1001"))),
            [PathBuf::from("/run/user/1001/podman/podman.sock")]
        );
        assert_eq!(
            candidate_sockets(1001, Some(Path::new("/tmp/xdg"))),
            [PathBuf::from("/tmp/xdg/podman/podman.sock"), PathBuf::from("/run/user/1001/podman/podman.sock")]
        );
        assert_eq!(candidate_sockets(1001, None), [PathBuf::from("/run/user/1001/podman/podman.sock")]);
    }
}
