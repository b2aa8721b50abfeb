//! Leases: one process runs a key, the others wait for its result.
//!
//! A lease is `leases/<key>.lock` in the store, held with an exclusive `flock`. The kernel
//! drops the lock when its holder dies (SIGKILL included), so a dead leader's lease expires at
//! once and a waiter takes over; on NFSv4 the server does the same when the client's lease
//! times out. The file holds the holder's pid, host and start time, for "waiting on …"
//! messages, and its mtime is renewed as a heartbeat. A leader that fails writes
//! `leases/<key>.failed` (exit code and log tail) before it lets go, so its waiters can
//! report the failure instead of silently re-running it.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kliko_core::Digest;
use serde::{Deserialize, Serialize};

/// Who holds a lease.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
    pub started_at: String,
    /// The leader's run folder once it has one: its `stdout.log` and `stderr.log` grow while
    /// the container runs, so waiters can show them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<PathBuf>,
}

impl Holder {
    /// This process, on this host, since `started_at` (RFC 3339).
    pub fn this_process(started_at: String, logs: Option<PathBuf>) -> Holder {
        Holder { pid: std::process::id(), host: crate::fsutil::hostname(), started_at, logs }
    }
}

/// What a failed leader leaves for its waiters.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Failure {
    pub holder: Holder,
    /// Milliseconds since the epoch.
    pub at_ms: u64,
    /// `exited 3`, `timed out`, `cancelled`, or an error message.
    pub outcome: String,
    pub exit_code: i64,
    pub log_tail: Vec<String>,
}

pub struct Lease {
    file: File,
    path: PathBuf,
    inherited: bool,
    /// What the file says about us.
    holder: Holder,
}

pub enum Attempt {
    Leader(Lease),
    Busy(Holder),
}

fn lock_path(dir: &Path, key: &Digest) -> PathBuf {
    dir.join(format!("{key}.lock"))
}

fn failed_path(dir: &Path, key: &Digest) -> PathBuf {
    dir.join(format!("{key}.failed"))
}

/// The holder record as JSON (which cannot carry a path that is not UTF-8: such a `logs` is left out).
fn holder_json(h: &Holder) -> Vec<u8> {
    let mut h = h.clone();
    h.logs = h.logs.filter(|p| p.to_str().is_some());
    serde_json::to_vec(&h).unwrap_or_default()
}

/// Try once to become the leader for `key`.
pub fn try_acquire(dir: &Path, key: &Digest, me: &Holder) -> io::Result<Attempt> {
    let path = lock_path(dir, key);
    loop {
        let file = File::options().create(true).truncate(false).read(true).write(true).open(&path)?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let holder = fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
                return Ok(Attempt::Busy(holder));
            }
            return Err(e);
        }
        // The previous holder may have unlinked the file between our open and our lock: then
        // we hold a lock on a file nobody else can find. Start again on the current file.
        let ours = file.metadata()?;
        match fs::metadata(&path) {
            Ok(m) if m.ino() == ours.ino() && m.dev() == ours.dev() => {}
            _ => continue,
        }
        // A holder writes its name before it creates any container and unlinks the file when
        // it lets go, so a file we lock that still names someone was left by a holder that
        // died (SIGKILL, power loss): only then can a container of this key be orphaned.
        let inherited = ours.len() > 0;
        let mut f = &file;
        f.set_len(0)?;
        f.write_all(&holder_json(me))?;
        return Ok(Attempt::Leader(Lease { file, path, inherited, holder: me.clone() }));
    }
}

impl Lease {
    /// Whether the previous holder of this lease died holding it (see [`try_acquire`]): its
    /// container, if it had started one, may still exist.
    pub fn inherited(&self) -> bool {
        self.inherited
    }

    /// Say in the lease file where the run's logs are (`stdout.log` and `stderr.log` in `dir`).
    pub fn announce_logs(&mut self, dir: &Path) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        // The file is JSON, which holds only UTF-8 paths; without it waiters show no logs.
        if dir.to_str().is_none() {
            return Ok(());
        }
        self.holder.logs = Some(dir.to_path_buf());
        self.file.set_len(0)?;
        self.file.write_all_at(&holder_json(&self.holder), 0)
    }

    /// A second handle on the lease file, for renewing its mtime (the heartbeat).
    pub fn heartbeat_handle(&self) -> Option<File> {
        self.file.try_clone().ok()
    }

    /// Release after success: any earlier failure record is obsolete.
    pub fn release_ok(self, dir: &Path, key: &Digest) {
        let _ = fs::remove_file(failed_path(dir, key));
        self.release();
    }

    /// Release after a failure, leaving the record for waiters.
    pub fn release_failed(self, dir: &Path, key: &Digest, failure: &Failure) {
        let tmp = dir.join(format!(".{key}.failed.{}", std::process::id()));
        let mut failure = failure.clone();
        failure.holder.logs = failure.holder.logs.filter(|p| p.to_str().is_some());
        if fs::write(&tmp, serde_json::to_vec(&failure).unwrap_or_default()).is_ok() {
            let _ = fs::rename(&tmp, failed_path(dir, key));
        }
        self.release();
    }

    /// Unlink while still holding the lock, then close (which unlocks).
    pub fn release(self) {
        let _ = fs::remove_file(&self.path);
        drop(self.file);
    }
}

/// Whether nobody holds the lease for `key` now (a shared probe never blocks the holder).
pub fn is_free(dir: &Path, key: &Digest) -> bool {
    match File::open(lock_path(dir, key)) {
        Err(_) => true,
        // SAFETY: flock on an fd we own.
        Ok(f) => unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) == 0 },
    }
}

/// The failure record a leader left, if it was written at or after `since_ms`.
pub fn failure_since(dir: &Path, key: &Digest, since_ms: u64) -> Option<Failure> {
    let f: Failure = serde_json::from_slice(&fs::read(failed_path(dir, key)).ok()?).ok()?;
    (f.at_ms >= since_ms).then_some(f)
}

/// Who holds the lease for `key` now, if the file can be read (it is rewritten in place).
pub fn holder(dir: &Path, key: &Digest) -> Option<Holder> {
    serde_json::from_slice(&fs::read(lock_path(dir, key)).ok()?).ok()
}

/// How often a waiter looks at the lease again.
pub const POLL: Duration = Duration::from_millis(100);
/// How often a leader renews its heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Holder {
        Holder { pid: std::process::id(), host: "test".into(), started_at: "now".into(), logs: None }
    }

    fn leader(dir: &Path, key: &Digest) -> Lease {
        match try_acquire(dir, key, &me()).unwrap() {
            Attempt::Leader(l) => l,
            Attempt::Busy(h) => panic!("busy: {h:?}"),
        }
    }

    #[test]
    fn a_lease_is_inherited_only_from_a_holder_that_died_holding_it() {
        let dir = tempfile::tempdir().unwrap();
        let key = Digest::of_bytes(b"key");
        let first = leader(dir.path(), &key);
        assert!(!first.inherited(), "nobody held it before");
        assert!(matches!(try_acquire(dir.path(), &key, &me()).unwrap(), Attempt::Busy(_)));
        first.release();
        let second = leader(dir.path(), &key);
        assert!(!second.inherited(), "the first holder let go properly");
        // Dying: the kernel drops the lock, the file with the holder's name stays.
        drop(second.file);
        let third = leader(dir.path(), &key);
        assert!(third.inherited(), "the second holder died holding it");
        third.release();
    }

    #[test]
    fn a_holder_can_say_where_its_logs_are() {
        let dir = tempfile::tempdir().unwrap();
        let key = Digest::of_bytes(b"logs");
        let mut lease = leader(dir.path(), &key);
        assert_eq!(holder(dir.path(), &key), Some(me()));
        lease.announce_logs(Path::new("/somewhere/run-1")).unwrap();
        assert_eq!(holder(dir.path(), &key), Some(Holder { logs: Some("/somewhere/run-1".into()), ..me() }));
        // Shorter than before: no stale bytes after the new record.
        lease.announce_logs(Path::new("/s")).unwrap();
        assert_eq!(holder(dir.path(), &key), Some(Holder { logs: Some("/s".into()), ..me() }));
        lease.release();
    }
}
