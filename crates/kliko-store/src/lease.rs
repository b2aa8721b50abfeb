//! Leases: one process runs a key, the others wait for its result.
//!
//! [`LeaseBackend`] is the seam: the engine asks it to lead a key, to tell whether a key is
//! free, who holds it and how its last holder failed. [`FlockLeases`] is the store's own
//! implementation, for processes that share a filesystem ([`crate::Store::leases`]).
//!
//! A flock lease is `leases/<key>.lock` in the store, held with an exclusive `flock`. The
//! kernel drops the lock when its holder dies (SIGKILL included), so a dead leader's lease
//! expires at once and a waiter takes over; on NFSv4 the server does the same when the
//! client's lease times out. The file holds the holder's pid, host and start time, for
//! "waiting on …" messages, and its mtime is renewed as a heartbeat. A leader that fails
//! writes `leases/<key>.failed` (exit code and log tail) before it lets go, so its waiters can
//! report the failure instead of silently re-running it.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kliko_core::Digest;
use serde::{Deserialize, Serialize};

use crate::flock::{self, Mode};

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
        Holder { pid: std::process::id(), host: kliko_core::process::host_name(), started_at, logs }
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

/// How a leader lets go of its lease.
#[derive(Clone, Debug)]
pub enum Release {
    /// It recorded a result: any earlier failure record is obsolete.
    Succeeded,
    /// It failed: its waiters are told how.
    Failed(Failure),
    /// It stopped without an outcome (cancelled): nothing to tell.
    Abandoned,
}

/// One attempt to lead a key.
pub enum Attempt {
    Leader(Box<dyn Lease>),
    Busy(Holder),
}

/// A lease held: the key is ours until it is released (or this process dies).
///
/// Every method may block on I/O: call them off async threads.
pub trait Lease: Send + Sync {
    /// Whether the previous holder died holding it: its container, if it had started one,
    /// may still exist.
    fn inherited(&self) -> bool;

    /// Tell waiters where the run's logs are (`stdout.log` and `stderr.log` in `dir`).
    fn announce_logs(&mut self, dir: &Path) -> io::Result<()>;

    /// A handle that says the holder is still alive: called every [`Lease::heartbeat`] from
    /// another task while the run goes on (it may block briefly; a failure is ignored).
    fn renewer(&self) -> Box<dyn Fn() + Send + Sync>;

    /// How often [`Lease::renewer`] is called.
    fn heartbeat(&self) -> Duration {
        HEARTBEAT
    }

    /// Let go, saying how the run ended.
    fn release(self: Box<Self>, how: Release);
}

/// Where leases live: one key is led by one process at a time, among every process that
/// shares the backend.
///
/// Every method may block on I/O: call them off async threads.
pub trait LeaseBackend: Send + Sync {
    /// Try once to lead `key`.
    fn try_acquire(&self, key: &Digest, me: &Holder) -> io::Result<Attempt>;
    /// Whether nobody leads `key` now.
    fn is_free(&self, key: &Digest) -> bool;
    /// Who leads `key` now, if known.
    fn holder(&self, key: &Digest) -> Option<Holder>;
    /// The failure the last leader of `key` reported, if at or after `since_ms`.
    fn failure_since(&self, key: &Digest, since_ms: u64) -> Option<Failure>;
    /// The log bytes of `key`'s leader past `from` (offsets into its stdout and stderr) when
    /// the leader is on another machine and its logs reach this one through the backend.
    /// `None`: its logs, if any, are the local files its [`Holder::logs`] names.
    fn remote_logs(&self, _key: &Digest, _from: [u64; 2]) -> Option<[Vec<u8>; 2]> {
        None
    }
}

/// Leases as `flock`ed files in one folder (see the module docs).
#[derive(Clone, Debug)]
pub struct FlockLeases {
    dir: PathBuf,
}

impl FlockLeases {
    pub fn new(dir: impl Into<PathBuf>) -> FlockLeases {
        FlockLeases { dir: dir.into() }
    }

    fn lock_path(&self, key: &Digest) -> PathBuf {
        self.dir.join(format!("{key}.lock"))
    }

    fn failed_path(&self, key: &Digest) -> PathBuf {
        self.dir.join(format!("{key}.failed"))
    }
}

/// The holder record as JSON (which cannot carry a path that is not UTF-8: such a `logs` is left out).
fn holder_json(h: &Holder) -> Vec<u8> {
    let mut h = h.clone();
    h.logs = h.logs.filter(|p| p.to_str().is_some());
    serde_json::to_vec(&h).unwrap_or_default()
}

/// The holder named in a lock file someone holds. A holder writes its name just after it
/// takes the lock, so a file read in between is still empty: read again, briefly.
fn read_holder(path: &Path) -> Holder {
    for _ in 0..50 {
        if let Some(h) = fs::read(path).ok().and_then(|b| serde_json::from_slice::<Holder>(&b).ok()) {
            return h;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Holder::default()
}

impl LeaseBackend for FlockLeases {
    fn try_acquire(&self, key: &Digest, me: &Holder) -> io::Result<Attempt> {
        let path = self.lock_path(key);
        loop {
            let file = File::options().create(true).truncate(false).read(true).write(true).open(&path)?;
            if !flock::try_lock(&file, Mode::Exclusive)? {
                return Ok(Attempt::Busy(read_holder(&path)));
            }
            // The previous holder may have unlinked the file between our open and our lock:
            // then we hold a lock on a file nobody else can find. Start again on the current file.
            let ours = file.metadata()?;
            match fs::metadata(&path) {
                Ok(m) if m.ino() == ours.ino() && m.dev() == ours.dev() => {}
                _ => continue,
            }
            // A holder writes its name before it creates any container and unlinks the file
            // when it lets go, so a file we lock that still names someone was left by a holder
            // that died (SIGKILL, power loss): only then can a container of this key be orphaned.
            let inherited = ours.len() > 0;
            let mut f = &file;
            f.set_len(0)?;
            f.write_all(&holder_json(me))?;
            let lease = FlockLease { file, key: *key, leases: self.clone(), inherited, holder: me.clone() };
            return Ok(Attempt::Leader(Box::new(lease)));
        }
    }

    /// A shared probe, which never blocks the holder.
    fn is_free(&self, key: &Digest) -> bool {
        match File::open(self.lock_path(key)) {
            Err(_) => true,
            Ok(f) => flock::try_lock(&f, Mode::Shared).unwrap_or(false),
        }
    }

    /// Read from the lock file (which its holder rewrites in place).
    fn holder(&self, key: &Digest) -> Option<Holder> {
        serde_json::from_slice(&fs::read(self.lock_path(key)).ok()?).ok()
    }

    fn failure_since(&self, key: &Digest, since_ms: u64) -> Option<Failure> {
        let f: Failure = serde_json::from_slice(&fs::read(self.failed_path(key)).ok()?).ok()?;
        (f.at_ms >= since_ms).then_some(f)
    }
}

/// A [`FlockLeases`] lease.
pub struct FlockLease {
    file: File,
    key: Digest,
    leases: FlockLeases,
    inherited: bool,
    /// What the file says about us.
    holder: Holder,
}

impl Lease for FlockLease {
    fn inherited(&self) -> bool {
        self.inherited
    }

    fn announce_logs(&mut self, dir: &Path) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        // The file is JSON, which holds only UTF-8 paths; without it waiters show no logs.
        if dir.to_str().is_none() {
            return Ok(());
        }
        self.holder.logs = Some(dir.to_path_buf());
        self.file.set_len(0)?;
        self.file.write_all_at(&holder_json(&self.holder), 0)
    }

    fn renewer(&self) -> Box<dyn Fn() + Send + Sync> {
        let file = self.file.try_clone().ok();
        Box::new(move || {
            if let Some(f) = &file {
                let _ = f.set_modified(std::time::SystemTime::now());
            }
        })
    }

    fn release(self: Box<Self>, how: Release) {
        let failed = self.leases.failed_path(&self.key);
        match how {
            Release::Succeeded => {
                let _ = fs::remove_file(&failed);
            }
            Release::Failed(mut failure) => {
                let tmp = self.leases.dir.join(format!(".{}.failed.{}", self.key, std::process::id()));
                failure.holder.logs = failure.holder.logs.filter(|p| p.to_str().is_some());
                if fs::write(&tmp, serde_json::to_vec(&failure).unwrap_or_default()).is_ok() {
                    let _ = fs::rename(&tmp, &failed);
                }
            }
            Release::Abandoned => {}
        }
        // Unlink while still holding the lock, then close (which unlocks).
        let _ = fs::remove_file(self.leases.lock_path(&self.key));
        drop(self.file);
    }
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

    fn leader(leases: &FlockLeases, key: &Digest) -> Box<dyn Lease> {
        match leases.try_acquire(key, &me()).unwrap() {
            Attempt::Leader(l) => l,
            Attempt::Busy(h) => panic!("busy: {h:?}"),
        }
    }

    #[test]
    fn a_lease_is_inherited_only_from_a_holder_that_died_holding_it() {
        let dir = tempfile::tempdir().unwrap();
        let leases = FlockLeases::new(dir.path());
        let key = Digest::of_bytes(b"key");
        let first = leader(&leases, &key);
        assert!(!first.inherited(), "nobody held it before");
        assert!(matches!(leases.try_acquire(&key, &me()).unwrap(), Attempt::Busy(_)));
        assert!(!leases.is_free(&key));
        first.release(Release::Abandoned);
        assert!(leases.is_free(&key));
        let second = leader(&leases, &key);
        assert!(!second.inherited(), "the first holder let go properly");
        // Dying: the kernel drops the lock (as dropping it unreleased does); the file with the
        // holder's name stays.
        drop(second);
        let third = leader(&leases, &key);
        assert!(third.inherited(), "the second holder died holding it");
        third.release(Release::Abandoned);
    }

    #[test]
    fn a_holder_can_say_where_its_logs_are() {
        let dir = tempfile::tempdir().unwrap();
        let leases = FlockLeases::new(dir.path());
        let key = Digest::of_bytes(b"logs");
        let mut lease = leader(&leases, &key);
        assert_eq!(leases.holder(&key), Some(me()));
        lease.announce_logs(Path::new("/somewhere/run-1")).unwrap();
        assert_eq!(leases.holder(&key), Some(Holder { logs: Some("/somewhere/run-1".into()), ..me() }));
        // Shorter than before: no stale bytes after the new record.
        lease.announce_logs(Path::new("/s")).unwrap();
        assert_eq!(leases.holder(&key), Some(Holder { logs: Some("/s".into()), ..me() }));
        lease.release(Release::Succeeded);
    }

    #[test]
    fn a_failed_leader_tells_its_waiters_and_a_later_success_clears_it() {
        let dir = tempfile::tempdir().unwrap();
        let leases = FlockLeases::new(dir.path());
        let key = Digest::of_bytes(b"failing");
        let failure = Failure {
            holder: me(),
            at_ms: 1_000,
            outcome: "exited with code 3".into(),
            exit_code: 3,
            log_tail: vec![],
        };
        leader(&leases, &key).release(Release::Failed(failure.clone()));
        assert_eq!(leases.failure_since(&key, 999), Some(failure));
        assert_eq!(leases.failure_since(&key, 1_001), None, "older than the wait");
        leader(&leases, &key).release(Release::Succeeded);
        assert_eq!(leases.failure_since(&key, 0), None);
    }
}
