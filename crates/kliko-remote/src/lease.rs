//! Identical runs in flight on different machines execute once: leases on the shared tier,
//! beside the local `flock` leases (which still order the processes of one machine).
//!
//! A lease for key K is the object `leases/<K>/<generation>.json` (generations 1, 2, ...;
//! the highest is the current one), written with create-if-absent, so of two machines that
//! try at once exactly one wins. Its holder rewrites it every heartbeat (a new `seq`). A
//! waiter judges it dead when it has not changed for its `ttl_s`, **measured on the waiter's
//! own clock** since it first saw it so (so clocks that disagree between machines do not
//! matter), and then takes over by creating the next generation: again exactly one wins.
//! A holder lets go by deleting its generation, after publishing its result (or writing
//! `failed/<K>.json`). Correctness never depends on a lease: if two machines run the same
//! key anyway (a partition, a server that ignores conditional writes), the first record wins
//! and the results are equivalent.
//!
//! Every method blocks (it is called off the async threads, as [`LeaseBackend`] requires),
//! running the tier's requests on the runtime it was made on.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::TryStreamExt;
use kliko_core::Digest;
use kliko_store::lease::{Attempt, Failure, FlockLeases, Holder, Lease, LeaseBackend, Release};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::Remote;

/// How long a lease that does not change is trusted, by default.
pub const TTL: Duration = Duration::from_secs(60);
/// A waiter asks the tier at most this often (it polls its local lease much more often).
const REMOTE_POLL: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, Serialize, Deserialize)]
struct LeaseBody {
    holder: Holder,
    /// This acquisition, unique across machines.
    id: String,
    /// Bumped by every heartbeat.
    seq: u64,
    ttl_s: u64,
}

/// What a waiter last saw of a key's current lease, and since when (its own clock).
struct Seen {
    generation: u64,
    body: Bytes,
    since: Instant,
    ttl: Duration,
    /// When the tier was last asked.
    asked: Instant,
    free: bool,
}

/// Local `flock` leases, then the tier's.
pub struct TierLeases {
    local: FlockLeases,
    remote: Arc<Remote>,
    handle: tokio::runtime::Handle,
    ttl: Duration,
    /// Whether the tier honours create-if-absent (asked once, on first use).
    conditional: OnceLock<bool>,
    seen: Mutex<HashMap<Digest, Seen>>,
    /// Per key: the generation whose leader's logs a waiter here reads, and when it last asked.
    logs_seen: Mutex<HashMap<Digest, (u64, Instant)>>,
    warning: Mutex<Option<String>>,
}

impl TierLeases {
    /// Leases on `remote`, beside `local`; the tier's requests run on the current tokio
    /// runtime (`None` outside one).
    pub fn new(local: FlockLeases, remote: Arc<Remote>) -> Option<TierLeases> {
        Some(TierLeases {
            local,
            remote,
            handle: tokio::runtime::Handle::try_current().ok()?,
            ttl: TTL,
            conditional: OnceLock::new(),
            seen: Mutex::new(HashMap::new()),
            logs_seen: Mutex::new(HashMap::new()),
            warning: Mutex::new(None),
        })
    }

    /// How long this machine's leases are trusted without a heartbeat (its waiters on other
    /// machines take over after that).
    pub fn with_ttl(mut self, ttl: Duration) -> TierLeases {
        self.ttl = ttl;
        self
    }

    /// Something to tell the user once (the tier ignores conditional writes, say).
    pub fn take_warning(&self) -> Option<String> {
        self.warning.lock().expect("warning lock").take()
    }

    fn warn(&self, w: String) {
        let mut slot = self.warning.lock().expect("warning lock");
        if slot.is_none() {
            *slot = Some(w);
        }
    }

    fn dir(&self, key: &Digest) -> ObjPath {
        self.remote.base.clone().join("leases").join(key.to_hex())
    }

    fn generation_path(&self, key: &Digest, generation: u64) -> ObjPath {
        self.dir(key).join(format!("{generation:020}.json"))
    }

    /// The folder of generation `generation`'s log chunks.
    fn logs_dir(&self, key: &Digest, generation: u64) -> ObjPath {
        self.remote.base.clone().join("logs").join(key.to_hex()).join(format!("{generation:020}"))
    }

    fn failed_path(&self, key: &Digest) -> ObjPath {
        self.remote.failure_path(key)
    }

    fn os(&self) -> &Arc<dyn ObjectStore> {
        &self.remote.os
    }

    /// Use only the local leases from now on (the tier did not answer), without a warning.
    pub fn disable(&self) {
        let _ = self.conditional.set(false);
    }

    /// Whether the tier refuses a second create of one name (asked once).
    fn honours_conditional_writes(&self) -> bool {
        *self.conditional.get_or_init(|| {
            let honoured = self.handle.block_on(self.remote.honours_conditional_writes());
            if !honoured {
                self.warn(format!(
                    "the shared tier `{}` does not honour create-if-absent writes: identical runs started on \
                     different machines at once may each run (their results are equivalent)",
                    self.remote.url
                ));
            }
            honoured
        })
    }

    /// The key's current lease on the tier: its generation and body.
    fn current(&self, key: &Digest) -> Result<Option<(u64, Bytes)>, object_store::Error> {
        self.handle.block_on(async {
            let dir = self.dir(key);
            let listed: Vec<_> = self.os().list(Some(&dir)).try_collect().await?;
            let newest = listed.iter().filter_map(|m| generation_of(&m.location)).max();
            let Some(generation) = newest else { return Ok(None) };
            // Read, not just listed: a shared folder's attributes may be cached for a minute.
            match self.os().get(&self.generation_path(key, generation)).await {
                Ok(g) => Ok(Some((generation, g.bytes().await?))),
                // Released between the list and the read.
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    /// Whether the key's current lease on the tier is gone or dead, by what this process has
    /// seen of it; asks the tier at most every [`REMOTE_POLL`]. Returns the current
    /// generation too (0: none) and its holder.
    fn remote_state(&self, key: &Digest, fresh: bool) -> io::Result<(bool, u64, Option<Holder>)> {
        {
            let seen = self.seen.lock().expect("seen lock");
            if let Some(s) = seen.get(key) {
                if !fresh && s.asked.elapsed() < REMOTE_POLL {
                    return Ok((s.free, s.generation, holder_of(&s.body)));
                }
            }
        }
        let current = self.current(key).map_err(io::Error::other)?;
        let mut seen = self.seen.lock().expect("seen lock");
        let now = Instant::now();
        let Some((generation, body)) = current else {
            seen.remove(key);
            return Ok((true, 0, None));
        };
        let ttl =
            serde_json::from_slice::<LeaseBody>(&body).map(|b| Duration::from_secs(b.ttl_s.max(1))).unwrap_or(TTL);
        let entry = seen.entry(*key).or_insert_with(|| Seen {
            generation,
            body: body.clone(),
            since: now,
            ttl,
            asked: now,
            free: false,
        });
        if entry.generation != generation || entry.body != body {
            *entry = Seen { generation, body: body.clone(), since: now, ttl, asked: now, free: false };
        }
        entry.asked = now;
        entry.free = entry.since.elapsed() >= entry.ttl;
        self.logs_seen
            .lock()
            .expect("logs lock")
            .entry(*key)
            .or_insert((generation, now.checked_sub(REMOTE_POLL).unwrap_or(now)))
            .0 = generation;
        Ok((entry.free, generation, holder_of(&body)))
    }

    fn try_acquire_remote(&self, key: &Digest, me: &Holder, local: Box<dyn Lease>) -> io::Result<Attempt> {
        let (free, generation, holder) = self.remote_state(key, true)?;
        if !free {
            local.release(Release::Abandoned);
            return Ok(Attempt::Busy(holder.unwrap_or_default()));
        }
        let body = LeaseBody { holder: me.clone(), id: unique_id(), seq: 0, ttl_s: self.ttl.as_secs().max(1) };
        let path = self.generation_path(key, generation + 1);
        let bytes = serde_json::to_vec(&body).expect("a lease serializes");
        let create = PutOptions { mode: PutMode::Create, ..Default::default() };
        let put = self.handle.block_on(self.os().put_opts(&path, PutPayload::from(bytes), create));
        match put {
            Ok(_) => {
                self.seen.lock().expect("seen lock").remove(key);
                Ok(Attempt::Leader(Box::new(TierLease {
                    local,
                    body: Mutex::new(body),
                    dir: self.dir(key),
                    generation: generation + 1,
                    path,
                    failed: self.failed_path(key),
                    logs_dir: self.logs_dir(key, generation + 1),
                    shipper: None,
                    os: self.os().clone(),
                    handle: self.handle.clone(),
                })))
            }
            // Another machine took it first.
            Err(object_store::Error::AlreadyExists { .. }) => {
                local.release(Release::Abandoned);
                let (_, _, holder) = self.remote_state(key, true)?;
                Ok(Attempt::Busy(holder.unwrap_or_default()))
            }
            Err(e) => {
                local.release(Release::Abandoned);
                Err(io::Error::other(e))
            }
        }
    }
}

/// The holder named in a lease body, as a waiter on another machine sees it: its log folder
/// is on that machine, so it is left out.
fn holder_of(body: &[u8]) -> Option<Holder> {
    let b: LeaseBody = serde_json::from_slice(body).ok()?;
    Some(Holder { logs: None, ..b.holder })
}

/// `leases/<key>/<generation>.json` → the generation.
fn generation_of(location: &ObjPath) -> Option<u64> {
    location.filename()?.strip_suffix(".json")?.parse().ok()
}

/// Delete every object under `prefix` that `doomed` picks; best effort (a failure leaves it
/// for the next holder, or `kliko remote gc`).
async fn delete_under(os: &Arc<dyn ObjectStore>, prefix: &ObjPath, doomed: impl Fn(&ObjPath) -> bool) {
    let listed: Vec<ObjPath> = os
        .list(Some(prefix))
        .try_collect::<Vec<_>>()
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|m| m.location)
        .filter(|l| doomed(l))
        .collect();
    for l in listed {
        let _ = os.delete(&l).await;
    }
}

/// `a/b/c` → `a/b`.
fn parent_of(path: &ObjPath) -> ObjPath {
    let parts: Vec<_> = path.parts().collect();
    ObjPath::from_iter(parts[..parts.len().saturating_sub(1)].iter().cloned())
}

/// `logs/<key>/<generation>/<stream>-<offset>` → (0 stdout / 1 stderr, byte offset).
fn chunk_of(location: &ObjPath) -> Option<(usize, u64)> {
    let (stream, offset) = location.filename()?.split_once('-')?;
    let stream = match stream {
        "stdout" => 0,
        "stderr" => 1,
        _ => return None,
    };
    Some((stream, offset.parse().ok()?))
}

pub(crate) fn unique_id() -> String {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{}-{}-{nanos}", kliko_core::process::host_name(), std::process::id())
}

impl LeaseBackend for TierLeases {
    fn try_acquire(&self, key: &Digest, me: &Holder) -> io::Result<Attempt> {
        let local = match self.local.try_acquire(key, me)? {
            Attempt::Leader(l) => l,
            busy => return Ok(busy),
        };
        if !self.honours_conditional_writes() {
            return Ok(Attempt::Leader(local));
        }
        match self.try_acquire_remote(key, me, local) {
            Ok(a) => Ok(a),
            // The tier is down: lead on this machine alone (the first record wins anyway).
            Err(e) => {
                self.warn(format!("the shared tier's leases could not be used ({e}); leading this run here"));
                self.local.try_acquire(key, me)
            }
        }
    }

    fn is_free(&self, key: &Digest) -> bool {
        if !self.local.is_free(key) {
            return false;
        }
        if !self.honours_conditional_writes() {
            return true;
        }
        // A tier that cannot be asked holds nobody back.
        self.remote_state(key, false).map(|(free, _, _)| free).unwrap_or(true)
    }

    fn holder(&self, key: &Digest) -> Option<Holder> {
        self.local.holder(key).or_else(|| {
            let seen = self.seen.lock().expect("seen lock");
            seen.get(key).and_then(|s| holder_of(&s.body))
        })
    }

    fn remote_logs(&self, key: &Digest, from: [u64; 2]) -> Option<[Vec<u8>; 2]> {
        if self.local.holder(key).is_some() {
            return None;
        }
        let generation = {
            let mut seen = self.logs_seen.lock().expect("logs lock");
            let (generation, asked) = seen.get_mut(key)?;
            // Asked at most every REMOTE_POLL while the lease is held; once more when it is
            // free (the last lines are on the tier before the lease goes).
            let held = self.seen.lock().expect("seen lock").get(key).is_some_and(|s| !s.free);
            if held && asked.elapsed() < REMOTE_POLL {
                return Some([Vec::new(), Vec::new()]);
            }
            *asked = Instant::now();
            *generation
        };
        let dir = self.logs_dir(key, generation);
        let got = self.handle.block_on(async {
            let listed: Vec<_> = self.os().list(Some(&dir)).try_collect().await.ok()?;
            let mut chunks: Vec<(usize, u64, ObjPath)> =
                listed.into_iter().filter_map(|m| chunk_of(&m.location).map(|(s, o)| (s, o, m.location))).collect();
            chunks.sort();
            let mut out = [Vec::new(), Vec::new()];
            for (stream, offset, path) in chunks {
                let at = from[stream] + out[stream].len() as u64;
                // Chunks in order, from where this waiter is: a gap (a chunk not yet listed)
                // waits for the next ask.
                if offset < at {
                    continue;
                }
                if offset > at {
                    break;
                }
                let bytes = self.os().get(&path).await.ok()?.bytes().await.ok()?;
                out[stream].extend_from_slice(&bytes);
            }
            Some(out)
        });
        Some(got.unwrap_or_default())
    }

    fn failure_since(&self, key: &Digest, since_ms: u64) -> Option<Failure> {
        if let Some(f) = self.local.failure_since(key, since_ms) {
            return Some(f);
        }
        let bytes = self.handle.block_on(async {
            let g = self.os().get(&self.failed_path(key)).await.ok()?;
            g.bytes().await.ok()
        })?;
        let f: Failure = serde_json::from_slice(&bytes).ok()?;
        // Written by another machine's clock: allow for it to disagree with ours by a TTL.
        (f.at_ms + TTL.as_millis() as u64 >= since_ms)
            .then_some(Failure { holder: Holder { logs: None, ..f.holder.clone() }, ..f })
    }
}

/// A lease held on this machine and on the tier.
struct TierLease {
    local: Box<dyn Lease>,
    body: Mutex<LeaseBody>,
    dir: ObjPath,
    generation: u64,
    path: ObjPath,
    failed: ObjPath,
    /// Where this generation's log chunks go, for waiters on other machines.
    logs_dir: ObjPath,
    shipper: Option<Shipper>,
    os: Arc<dyn ObjectStore>,
    handle: tokio::runtime::Handle,
}

/// Copies a leader's growing log files to the tier in chunks, every [`SHIP_EVERY`], until
/// stopped (with a last copy).
struct Shipper {
    stop: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

/// How often a leader's new log lines go to the tier.
const SHIP_EVERY: Duration = Duration::from_secs(1);
/// At most this much of each log goes to the tier (a waiter elsewhere sees the start of a
/// huge log; the whole log is in the result).
const SHIP_AT_MOST: u64 = 16 << 20;

impl Shipper {
    fn start(os: Arc<dyn ObjectStore>, handle: &tokio::runtime::Handle, dir: ObjPath, logs: &Path) -> Shipper {
        let stop = Arc::new(tokio::sync::Notify::new());
        let files = [logs.join("stdout.log"), logs.join("stderr.log")];
        let stopped = stop.clone();
        let task = handle.spawn(async move {
            let mut open: [Option<std::fs::File>; 2] = [None, None];
            let mut sent = [0u64; 2];
            let mut last = false;
            loop {
                for (i, name) in ["stdout", "stderr"].iter().enumerate() {
                    if open[i].is_none() {
                        // Open once: an open file stays readable after ingest moves it.
                        open[i] = std::fs::File::open(&files[i]).ok();
                    }
                    let Some(f) = &mut open[i] else { continue };
                    let mut buf = Vec::new();
                    let room = SHIP_AT_MOST.saturating_sub(sent[i]);
                    let _ = std::io::Read::read_to_end(&mut std::io::Read::take(&mut *f, room), &mut buf);
                    if buf.is_empty() {
                        continue;
                    }
                    let path = dir.clone().join(format!("{name}-{:016}", sent[i]));
                    let n = buf.len() as u64;
                    if os.put(&path, PutPayload::from(buf)).await.is_ok() {
                        sent[i] += n;
                    } else {
                        // Read again next time from where the tier has it.
                        let _ = std::io::Seek::seek(f, std::io::SeekFrom::Start(sent[i]));
                    }
                }
                if last {
                    return;
                }
                tokio::select! {
                    _ = stopped.notified() => last = true,
                    _ = tokio::time::sleep(SHIP_EVERY) => {}
                }
            }
        });
        Shipper { stop, task }
    }

    /// Stop, after a last copy of what the files gained.
    async fn finish(self) {
        self.stop.notify_one();
        let _ = self.task.await;
    }
}

impl Lease for TierLease {
    fn inherited(&self) -> bool {
        // Only a holder on this machine could have left a container here.
        self.local.inherited()
    }

    fn announce_logs(&mut self, dir: &Path) -> io::Result<()> {
        if self.shipper.is_none() {
            self.shipper = Some(Shipper::start(self.os.clone(), &self.handle, self.logs_dir.clone(), dir));
        }
        self.local.announce_logs(dir)
    }

    fn heartbeat(&self) -> Duration {
        // Three heartbeats within a lease's life: one lost request does not lose it.
        let ttl = Duration::from_secs(self.body.lock().expect("body lock").ttl_s);
        self.local.heartbeat().min(ttl / 3)
    }

    fn renewer(&self) -> Box<dyn Fn() + Send + Sync> {
        let local = self.local.renewer();
        let (os, path, handle) = (self.os.clone(), self.path.clone(), self.handle.clone());
        let body = Arc::new(Mutex::new(self.body.lock().expect("body lock").clone()));
        Box::new(move || {
            local();
            let bytes = {
                let mut b = body.lock().expect("body lock");
                b.seq += 1;
                serde_json::to_vec(&*b).expect("a lease serializes")
            };
            // Only this holder ever writes this generation's name.
            let _ = handle.block_on(os.put(&path, PutPayload::from(bytes)));
        })
    }

    fn release(self: Box<Self>, how: Release) {
        let TierLease { local, dir, generation, path, failed, logs_dir, shipper, os, handle, .. } = *self;
        handle.block_on(async {
            // The last lines reach the tier before the lease goes, so waiters see them.
            if let Some(s) = shipper {
                s.finish().await;
            }
            match &how {
                Release::Succeeded => {
                    let _ = os.delete(&failed).await;
                }
                Release::Failed(f) => {
                    let bytes = serde_json::to_vec(f).unwrap_or_default();
                    let _ = os.put(&failed, PutPayload::from(bytes)).await;
                }
                Release::Abandoned => {}
            }
            let _ = os.delete(&path).await;
            // And the generations this one took over from (holders that died): left, they
            // would make the next machine to run this key wait out their expiry again.
            delete_under(&os, &dir, |l| generation_of(l).is_some_and(|g| g < generation)).await;
            // The log chunks of generations before this one (this one's stay for waiters that
            // are reading them now; the next holder, or `kliko remote gc`, removes them).
            delete_under(&os, &parent_of(&logs_dir), |l| !l.prefix_matches(&logs_dir)).await;
        });
        local.release(how);
    }
}
