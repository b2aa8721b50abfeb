//! kliko-engine turns "run this image on this input with these parameters" into a memoized,
//! deduplicated run: it resolves the image to its content-addressed ID, reads and validates
//! its `/kliko.yml` (remembered per image ID), resolves parameters, hashes the input tree
//! and the file parameters, builds the action key, and then either serves a complete stored
//! result (a hit: no container is created) or takes the key's lease, runs the container,
//! ingests its output and records the result (a miss). Identical runs in flight wait on the
//! leader instead of running twice.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kliko_engine::EngineError> {
//! use std::sync::Arc;
//! use kliko_engine::{Engine, Input, RunRequest, NoObserver};
//! let store = Arc::new(kliko_store::Store::open("/tmp/kliko-store".as_ref())?);
//! let engine = Engine::new(store);
//! let req = RunRequest::new("my-image:latest", Input::Path("data".into()), Some("out".into()));
//! let report = engine.run(req, Arc::new(NoObserver), Default::default()).await?;
//! println!("{} {:?}", report.key, report.cache);
//! # Ok(()) }
//! ```

mod error;
pub mod explain;
mod fsutil;
pub mod provenance;
pub mod rocrate;
mod run;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kliko_core::Digest;
use kliko_runtime::ContainerRuntime;
use kliko_spec::{IoMode, ParamLayer, Params, Spec};
use kliko_store::lease::LeaseBackend;
use kliko_store::records::ActionResult;
use kliko_store::{MaterializeMode, Store};
use serde::Serialize;
use tokio::sync::OnceCell;

pub use error::{EngineError, Result};
pub use explain::Explanation;
pub use fsutil::{hostname, invoking_user, now_rfc3339};
pub use kliko_runtime::{Gpus, ImageInfo, LogChunk, RuntimeKind, Stream};
pub use kliko_store::lease::Holder;
pub use run::{Followed, IndexHold};

/// The command every kliko image is run with (its ENTRYPOINT, if any, stays in place).
pub const KLIKO_CMD: &str = "/kliko";
/// Label on every container kliko creates (besides the runtime's `io.kliko.managed`).
pub const KEY_LABEL: &str = "io.kliko.key";
/// Label on every run container: the store it was made for (whose leases tell if its run is over).
pub const STORE_LABEL: &str = "io.kliko.store";

/// The runner: one per process, shared by every run (it is cheap to clone behind an `Arc`).
///
/// It is written against three seams: the store (`kliko_store::Store`), a container runtime
/// ([`ContainerRuntime`]: Docker unless one is given) and the leases that let one of many
/// identical runs lead ([`LeaseBackend`]: the store's own unless one is given).
pub struct Engine {
    store: Arc<Store>,
    runtime: OnceCell<Arc<dyn ContainerRuntime>>,
    /// Which runtime [`Engine::runtime`] connects to, on first use.
    runtime_kind: kliko_runtime::RuntimeKind,
    /// Other runtimes that runs asked for ([`RunRequest::runtime`]), connected on first use.
    other_runtimes: std::sync::Mutex<BTreeMap<&'static str, Arc<RuntimeCell>>>,
    leases: Arc<dyn LeaseBackend>,
    remote: Option<Arc<kliko_remote::Remote>>,
    /// The tier's leases, when they are the engine's (for their warnings).
    tier_leases: Option<Arc<kliko_remote::lease::TierLeases>>,
    /// Whether the tier answered the first request made of it (asked on first use), and the
    /// warning when it did not.
    remote_ready: tokio::sync::OnceCell<(bool, Option<String>)>,
    remote_warned: std::sync::atomic::AtomicBool,
    /// Publish after the run is reported done, in the background.
    remote_async: bool,
    background: std::sync::Mutex<Vec<tokio::task::JoinHandle<Background>>>,
}

/// How a publish in the background ended.
#[derive(Debug)]
pub struct Background {
    pub key: Digest,
    pub image: String,
    pub outcome: std::result::Result<kliko_remote::Published, String>,
}

/// What a run reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// No input: an empty `/input` (the same key as an empty folder).
    None,
    /// A host folder: mounted read-only at `/input` (split), or copied privately as `/work`
    /// (join).
    Path(PathBuf),
    /// A tree already in the store (a pipeline step's input).
    Tree(Digest),
}

/// Who the container runs as.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum UserChoice {
    /// The invoking user's uid:gid, so outputs belong to them.
    #[default]
    Invoker,
    /// The image's own `USER`.
    Image,
    /// Exactly this (`uid:gid`, `uid`, or a name the image knows).
    Explicit(String),
}

/// One invocation.
#[derive(Clone, Debug)]
pub struct RunRequest {
    /// Image reference as the user wrote it (tag, ID or name@digest).
    pub image: String,
    pub input: Input,
    /// Split: where the output goes. Join: where the result goes; `None` with a host work
    /// folder means "back into the work folder, once stored".
    pub output: Option<PathBuf>,
    /// Which io mode the user's flags implied (`--input/--output` or `--work`); checked
    /// against the image. `None`: whatever the image declares.
    pub io_flags: Option<IoMode>,
    pub params: Vec<ParamLayer>,
    pub env: Vec<(String, String)>,
    pub network: Option<String>,
    pub user: UserChoice,
    pub memory_bytes: Option<i64>,
    /// CPU quota, in CPUs.
    pub cpus: Option<f64>,
    pub timeout: Option<Duration>,
    pub salt: Option<String>,
    /// Run even if a result is stored (and record the new one).
    pub no_cache: bool,
    /// Replace a non-empty output folder's contents.
    pub overwrite: bool,
    pub materialize: MaterializeMode,
    /// When the leader this run waited on failed, run it again here (once) instead of
    /// reporting the leader's failure.
    pub retry_failed: bool,
    pub labels: BTreeMap<String, String>,
    /// Keep the output only in the store (no host folder), even in join mode.
    pub store_only: bool,
    /// GPUs for the container (not part of the key; recorded in provenance).
    pub gpus: Option<Gpus>,
    /// The container runtime for this run, when not the engine's own (not part of the key:
    /// the image ID is the same under every runtime).
    pub runtime: Option<RuntimeKind>,
}

impl RunRequest {
    pub fn new(image: impl Into<String>, input: Input, output: Option<PathBuf>) -> RunRequest {
        RunRequest {
            image: image.into(),
            input,
            output,
            io_flags: None,
            params: Vec::new(),
            env: Vec::new(),
            network: None,
            user: UserChoice::Invoker,
            memory_bytes: None,
            cpus: None,
            timeout: None,
            salt: None,
            no_cache: false,
            overwrite: false,
            materialize: MaterializeMode::Auto,
            retry_failed: false,
            labels: BTreeMap::new(),
            store_only: false,
            gpus: None,
            runtime: None,
        }
    }
}

/// An image, resolved, with its validated kliko.yml.
#[derive(Clone, Debug)]
pub struct ImageMeta {
    pub reference: String,
    pub info: ImageInfo,
    pub spec: Spec,
    pub kliko_yml: Vec<u8>,
}

/// Everything computed before a run: the key and what went into it.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub image: ImageMeta,
    pub params: Params,
    pub preimage: kliko_core::key::ActionPreimage,
    pub key: Digest,
    pub input_digest: Digest,
    /// Host file parameter → content digest.
    pub file_digests: BTreeMap<PathBuf, Digest>,
    pub env: Vec<(String, String)>,
    /// The stat records hashing the input used, to check after the run, without the
    /// index, that the input did not change meanwhile.
    pub input_stat: Arc<kliko_core::hash::MemoryCache>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Cache {
    Hit,
    Miss,
}

/// Where a hit's result came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// This machine's store.
    Local,
    /// The shared tier (fetched, and now in the local store too).
    Remote,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    /// This run waited on another that failed, and did not retry.
    LeaderFailed,
}

/// What a run did.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub key: Digest,
    pub cache: Cache,
    pub status: Status,
    /// The container's exit code (124 for a timeout, 130 when cancelled).
    pub exit_code: i64,
    pub output: Option<Digest>,
    pub output_path: Option<PathBuf>,
    pub image_ref: String,
    pub image_id: String,
    pub wall_ms: u64,
    /// For a hit: the wall time of the run it reused.
    pub saved_ms: u64,
    /// The holder of the lease this run waited on, if it waited.
    pub waited_on: Option<Holder>,
    /// Last lines of the logs of a failed run (its own or its leader's).
    pub log_tail: Vec<String>,
    /// Whether the result was recorded in the cache.
    pub recorded: bool,
    /// For a hit: which tier had it.
    pub hit_from: Option<Tier>,
    /// For a miss with a shared tier: what was published there.
    pub published: Option<kliko_remote::Published>,
    /// Publishing goes on in the background ([`Engine::with_remote_async`]):
    /// [`Engine::finish_background`] says how it ended.
    pub publishing: bool,
    pub warnings: Vec<String>,
    /// Why the run failed, in words, where its status and exit code do not say it all (a
    /// cluster job stopped at its time limit, say).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip)]
    pub result: Option<ActionResult>,
}

impl RunReport {
    /// The report of run `prep` of `req` that did not (or not yet) produce a result: no
    /// output, nothing recorded, no time taken.
    pub fn unfinished(req: &RunRequest, prep: &Prepared, status: Status, exit_code: i64) -> RunReport {
        RunReport {
            key: prep.key,
            cache: Cache::Miss,
            status,
            exit_code,
            output: None,
            output_path: None,
            image_ref: req.image.clone(),
            image_id: prep.image.info.id.clone(),
            wall_ms: 0,
            saved_ms: 0,
            waited_on: None,
            log_tail: Vec::new(),
            recorded: false,
            hit_from: None,
            published: None,
            publishing: false,
            warnings: Vec::new(),
            reason: None,
            result: None,
        }
    }
}

/// A runtime, connected on first use.
type RuntimeCell = OnceCell<Arc<dyn ContainerRuntime>>;

/// What happens during a run, for a terminal or a web page.
#[derive(Clone, Debug)]
pub enum Event {
    Prepared {
        key: Digest,
    },
    Hit {
        key: Digest,
    },
    Waiting {
        holder: Holder,
    },
    Starting,
    Running {
        container_id: Option<String>,
    },
    Ingesting,
    Finished {
        status: Status,
        exit_code: i64,
    },
    Warning(String),
    /// The run was handed to a cluster's scheduler: its job and the job's state there
    /// (`pending`, `running`, ...), said on every change.
    Job {
        id: String,
        state: String,
    },
}

/// Receives live logs and events.
pub trait Observer: Send + Sync {
    fn log(&self, _stream: Stream, _bytes: &[u8]) {}
    fn event(&self, _event: &Event) {}
}

/// Ignores everything.
pub struct NoObserver;
impl Observer for NoObserver {}

/// A local image, as [`Engine::kliko_images`] sees it.
#[derive(Debug)]
pub enum Listed {
    /// A kliko image with a valid kliko.yml.
    Kliko(Box<ImageMeta>),
    /// A kliko image whose kliko.yml could not be read or is invalid: the reference, and why.
    Invalid { reference: String, reason: EngineError },
}

impl Engine {
    /// An engine on `store` that runs containers through Docker (connected on first use).
    pub fn new(store: Arc<Store>) -> Engine {
        Engine::on(store, OnceCell::new())
    }

    /// The same engine, connecting to `kind` (Docker, Podman) when it first needs a runtime.
    pub fn with_runtime_kind(mut self, kind: kliko_runtime::RuntimeKind) -> Engine {
        self.runtime_kind = kind;
        self
    }

    /// Which runtime this engine connects to.
    pub fn runtime_kind(&self) -> kliko_runtime::RuntimeKind {
        self.runtime_kind
    }

    /// An engine on `store` that runs containers through `runtime`.
    pub fn with_runtime(store: Arc<Store>, runtime: Arc<dyn ContainerRuntime>) -> Engine {
        Engine::on(store, OnceCell::new_with(Some(runtime)))
    }

    fn on(store: Arc<Store>, runtime: OnceCell<Arc<dyn ContainerRuntime>>) -> Engine {
        let leases = Arc::new(store.leases());
        Engine {
            store,
            runtime,
            runtime_kind: Default::default(),
            other_runtimes: Default::default(),
            leases,
            remote: None,
            tier_leases: None,
            remote_ready: Default::default(),
            remote_warned: Default::default(),
            remote_async: false,
            background: Default::default(),
        }
    }

    /// The same engine with other leases (a cluster's, say).
    pub fn with_leases(mut self, leases: Arc<dyn LeaseBackend>) -> Engine {
        self.leases = leases;
        self
    }

    /// The same engine with a shared tier: a local miss looks there before running, and a
    /// run's result is published there before the run is reported done. Unless the tier is
    /// read-only, its leases join this store's (made on the current tokio runtime), so
    /// identical runs started on different machines execute once.
    pub fn with_remote(self, remote: Arc<kliko_remote::Remote>) -> Engine {
        let ttl = kliko_remote::lease::TTL;
        self.with_remote_ttl(remote, ttl)
    }

    /// [`Engine::with_remote`], with this machine's leases trusted for `ttl` without a
    /// heartbeat (waiters elsewhere take over after that).
    pub fn with_remote_ttl(mut self, remote: Arc<kliko_remote::Remote>, ttl: Duration) -> Engine {
        if !remote.is_read_only() {
            if let Some(t) = kliko_remote::lease::TierLeases::new(self.store.leases(), remote.clone()) {
                let t = Arc::new(t.with_ttl(ttl));
                self.leases = t.clone();
                self.tier_leases = Some(t);
            }
        }
        self.remote = Some(remote);
        self
    }

    /// Publish each new result to the shared tier in the background, after its run is
    /// reported done (the lease on it is held until the upload ends, so machines waiting on it
    /// still find the result); [`Engine::finish_background`] waits for them.
    pub fn with_remote_async(mut self, on: bool) -> Engine {
        self.remote_async = on;
        self
    }

    /// Wait for every publish still going on in the background; how each ended.
    pub async fn finish_background(&self) -> Vec<Background> {
        let handles = std::mem::take(&mut *self.background.lock().unwrap_or_else(|p| p.into_inner()));
        let mut out = Vec::new();
        for h in handles {
            if let Ok(b) = h.await {
                out.push(b);
            }
        }
        out
    }

    pub fn remote(&self) -> Option<&Arc<kliko_remote::Remote>> {
        self.remote.as_ref()
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub(crate) fn leases(&self) -> &Arc<dyn LeaseBackend> {
        &self.leases
    }

    /// The container runtime, connected on first use.
    pub async fn runtime(&self) -> Result<&Arc<dyn ContainerRuntime>> {
        let rt = self
            .runtime
            .get_or_try_init(|| async { Ok::<_, EngineError>(self.runtime_kind.connect(self.store.root()).await?) })
            .await?;
        Ok(rt)
    }

    /// The runtime `kind` (`None`: this engine's own), connected on first use.
    pub async fn runtime_for(&self, kind: Option<RuntimeKind>) -> Result<Arc<dyn ContainerRuntime>> {
        let kind = match kind {
            Some(k) if k != self.runtime_kind => k,
            _ => return Ok(self.runtime().await?.clone()),
        };
        let cell = self.other_runtimes.lock().expect("runtimes lock").entry(kind.name()).or_default().clone();
        let rt =
            cell.get_or_try_init(|| async { Ok::<_, EngineError>(kind.connect(self.store.root()).await?) }).await?;
        Ok(rt.clone())
    }

    /// Every local image that is a kliko image (has a `/kliko.yml`), newest first; images
    /// without one are left out, images whose kliko.yml is broken are listed with the reason.
    /// `skip` is asked first for each image id: an id it answers `true` for is left out without
    /// being read (a caller remembers the images it found not to be kliko images).
    pub async fn kliko_images(&self, skip: impl Fn(&str) -> bool) -> Result<(Vec<Listed>, Vec<String>)> {
        let images = self.runtime().await?.list_images().await?;
        let mut listed = Vec::new();
        let mut not_kliko = Vec::new();
        for info in images {
            if skip(&info.id) {
                continue;
            }
            let reference =
                info.repo_tags.iter().find(|t| !t.contains("<none>")).cloned().unwrap_or_else(|| info.id.clone());
            match self.image(&reference).await {
                Ok(meta) => listed.push(Listed::Kliko(Box::new(meta))),
                Err(EngineError::Runtime(
                    kliko_runtime::RuntimeError::FileNotInImage { .. }
                    | kliko_runtime::RuntimeError::NotARegularFile { .. },
                )) => not_kliko.push(info.id),
                // Removed meanwhile: nothing to show.
                Err(EngineError::Runtime(kliko_runtime::RuntimeError::ImageNotFound { .. })) => {}
                Err(reason) => listed.push(Listed::Invalid { reference, reason }),
            }
        }
        Ok((listed, not_kliko))
    }

    /// Resolve an image and read its kliko.yml (from the store if this image ID was seen).
    pub async fn image(&self, reference: &str) -> Result<ImageMeta> {
        self.image_in(reference, None).await
    }

    /// [`Engine::image`], under runtime `kind` (`None`: this engine's own).
    pub async fn image_in(&self, reference: &str, kind: Option<RuntimeKind>) -> Result<ImageMeta> {
        let runtime = self.runtime_for(kind).await?;
        kliko_core::trace::mark("runtime connected");
        let info = runtime.inspect_image(reference).await?;
        kliko_core::trace::mark("image inspected");
        let cached = self.store.image_file(&info.id, "/kliko.yml")?;
        let source = format!("{reference}:/kliko.yml");
        let parse = |yml: &[u8]| Spec::parse(&source, &String::from_utf8_lossy(yml));
        if let Some(yml) = cached {
            let spec = parse(&yml)?;
            return Ok(ImageMeta { reference: reference.to_string(), info, spec, kliko_yml: yml });
        }
        // A machine that has never used the image: a read that needs no container first
        // (the runtime's own layer folders: no round trip to the tier, nothing to trust); then
        // the copy another machine left on the shared tier spares a container (one that does
        // not parse is ignored). (A misconfigured tier is reported by the run that needs it.)
        let local = runtime.read_file_cheaply(&info.id, "/kliko.yml").await;
        let remote = match self.checked_remote().await {
            Ok(Some((r, true, _))) => Some(r),
            _ => None,
        };
        let mut from_tier = None;
        if let (None, Some(r)) = (&local, remote) {
            if let Ok(Some(yml)) = r.image_kliko_yml(&info.id).await {
                match parse(&yml) {
                    Ok(spec) => from_tier = Some((yml, spec)),
                    Err(_) => kliko_core::trace::mark("the tier's kliko.yml does not parse"),
                }
            }
        }
        let (yml, spec) = match from_tier {
            Some(found) => {
                kliko_core::trace::mark("kliko.yml from the shared tier");
                found
            }
            None => {
                let yml = match local {
                    Some(yml) => {
                        kliko_core::trace::mark("kliko.yml read without a container");
                        yml
                    }
                    None => runtime.read_file(&info.id, "/kliko.yml").await?,
                };
                let spec = parse(&yml)?;
                if let Some(r) = remote {
                    // For the next machine (which may not read layers); losing it costs that
                    // machine one container.
                    let _ = r.publish_image_kliko_yml(&info.id, &yml).await;
                }
                (yml, spec)
            }
        };
        // Remembered for next time where the store can be written (not a read-only one).
        if !self.store.is_read_only() {
            self.store.put_image_file(&info.id, "/kliko.yml", &yml)?;
        }
        Ok(ImageMeta { reference: reference.to_string(), info, spec, kliko_yml: yml })
    }
}
