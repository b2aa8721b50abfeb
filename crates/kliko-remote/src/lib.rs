//! kliko-remote is the shared tier: a second cache, on infrastructure a cluster already has
//! (S3 or an S3-compatible server such as Ceph RGW, MinIO or SeaweedFS; or a shared folder on
//! NFS, Lustre or BeeGFS), that every machine reads and writes beside its own local store.
//! RocksDB stays local: the tier holds only content-addressed objects and result records,
//! in the layout `cache-format.md` specifies (`kliko-remote-v1/`).
//!
//! - [`Remote::fetch`]: a result recorded by any machine, with exactly the objects this
//!   store lacks, downloaded in parallel and hashed while they stream; it is then recorded in
//!   the local store, so the next hit on this machine is local. A missing or corrupt object
//!   makes it [`Fetched::Unusable`]: the caller runs the step, never hands out a partial tree.
//! - [`Remote::publish`]: after a run, the objects the tier lacks (big ones in parts), then
//!   the record last, created only if absent, so a record always names objects that exist
//!   and the first of two racing machines keeps its record.
//!
//! One library, `object_store`, speaks to every backend.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kliko_remote::RemoteError> {
//! use std::sync::Arc;
//! let store = Arc::new(kliko_store::Store::open("/tmp/kliko-store".as_ref())?);
//! let remote = kliko_remote::Remote::open("s3://group-bucket/kliko", false)?;
//! let key: kliko_core::Digest = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262".parse().unwrap();
//! match remote.fetch(&store, &key).await? {
//!     kliko_remote::Fetched::Hit { result, .. } => println!("reused {}", result.output),
//!     other => println!("{other:?}"),
//! }
//! # Ok(()) }
//! ```

pub mod admin;
mod aws_files;
#[cfg(feature = "fake")]
pub mod fake;
pub mod lease;
pub mod trust;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use kliko_core::tree::{Entry, Tree};
use kliko_core::Digest;
use kliko_store::records::ActionResult;
use kliko_store::{ObjectKind, Store, StoreError};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};

/// The folder under the tier's prefix that holds everything kliko writes there.
pub const LAYOUT: &str = "kliko-remote-v1";
/// Objects transferred at once.
pub const PARALLEL: usize = 8;
/// Objects larger than this are uploaded in parts.
pub const MULTIPART_ABOVE: u64 = 16 << 20;
/// The size of each part of a multipart upload.
const PART: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("`{url}` is not a shared tier kliko can use: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("the shared tier `{url}` failed to {action}")]
    Backend {
        url: String,
        action: String,
        #[source]
        source: object_store::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("i/o error on `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a background task failed: {0}")]
    Join(String),
    #[error("the shared tier `{url}` cannot be used: {problem}; {fix}")]
    Config { url: String, problem: String, fix: String },
    #[error("{0}")]
    Unreachable(String),
    #[error("the shared tier `{0}` is read-only here (`--remote-read-only`)")]
    ReadOnly(String),
    #[error(transparent)]
    Trust(#[from] trust::TrustError),
    #[error("the shared tier `{url}` lacks part of {what}: {reason}")]
    Incomplete { url: String, what: String, reason: String },
}

pub(crate) use kliko_core::error_chain as chain;

pub type Result<T, E = RemoteError> = std::result::Result<T, E>;

/// What [`Remote::fetch`] found.
#[derive(Debug)]
pub enum Fetched {
    /// A complete result, now in the local store too.
    Hit {
        result: Box<ActionResult>,
        /// Objects downloaded (the rest were local already).
        objects: usize,
        bytes: u64,
    },
    /// No machine has recorded this key.
    Absent,
    /// A record exists but cannot be used (an object is missing or does not match its
    /// digest, or the record is unreadable): treat as a miss.
    Unusable { reason: String },
    /// A record exists but is not trusted (unsigned, or signed by a key this reader does
    /// not trust, or its signature fails): ignored, a miss.
    Ignored { reason: String },
}

/// A result record on the tier, as [`Remote::record_of`] judged it.
#[derive(Debug)]
pub enum Record {
    Absent,
    /// Trusted, and signed by this key if signed.
    Usable {
        result: Box<ActionResult>,
        signed_by: Option<trust::PublicKey>,
    },
    /// Not trusted: see [`Fetched::Ignored`].
    Ignored {
        reason: String,
    },
    /// Unreadable, or for another key.
    Unusable {
        reason: String,
    },
}

/// An image's kliko.yml as the tier keeps it (`images/<image id>/kliko.yml.json`).
#[derive(serde::Serialize, serde::Deserialize)]
struct ImageFile {
    image_id: String,
    kliko_yml: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signed_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signature: Option<String>,
}

/// A record as it is stored on the tier: the result exactly as it was signed, and its
/// signature (both absent when the writer had no key).
#[derive(serde::Serialize, serde::Deserialize)]
struct Envelope {
    result: Box<serde_json::value::RawValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signed_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signature: Option<String>,
}

/// What [`Remote::publish`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Published {
    /// Objects uploaded, and their bytes.
    pub uploaded: usize,
    pub bytes: u64,
    /// Objects the tier had already (not uploaded again).
    pub present: usize,
    /// Another machine recorded this key first: its record is kept.
    pub raced: bool,
    /// The tier held a record for this key that this machine would not use (unreadable,
    /// for another key, or not trusted): it was replaced by this one.
    pub replaced: bool,
    /// Signed with this key.
    pub signed_by: Option<String>,
}

/// A shared tier.
pub struct Remote {
    os: Arc<dyn ObjectStore>,
    base: ObjPath,
    url: String,
    read_only: bool,
    /// The folder, for a shared-folder tier.
    folder: Option<PathBuf>,
    signer: Option<Arc<trust::SigningKey>>,
    trust: trust::Trust,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("url", &self.url)
            .field("read_only", &self.read_only)
            .field("signer", &self.signer.as_ref().map(|k| k.public()))
            .field("trust", &self.trust)
            .finish()
    }
}

impl Remote {
    /// The tier at `url`: `s3://bucket/prefix` (credentials, region and endpoint from the
    /// standard `AWS_*` variables: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
    /// `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, ..., else from `~/.aws/credentials` and
    /// `~/.aws/config`, profile `$AWS_PROFILE`), or a shared folder as `file:///path` or a
    /// plain absolute path (created if absent). `read_only`: fetch, never publish.
    pub fn open(url: &str, read_only: bool) -> Result<Remote> {
        Remote::open_with(url, read_only, &[])
    }

    /// [`Remote::open`] with S3 options that win over the environment, named as
    /// `object_store` names them (`aws_endpoint`, `aws_allow_http`, `aws_access_key_id`, ...).
    pub fn open_with(url: &str, read_only: bool, options: &[(&str, &str)]) -> Result<Remote> {
        let bad = |reason: &str| RemoteError::BadUrl { url: url.to_string(), reason: reason.to_string() };
        let mut folder = None;
        let (os, base): (Arc<dyn ObjectStore>, ObjPath) = if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("it names no bucket (`s3://BUCKET/PREFIX`)"));
            }
            let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
            // `AWS_ENDPOINT_URL` is the variable the AWS tools read; object_store's own is
            // `AWS_ENDPOINT`. Either works.
            if let Ok(e) = std::env::var("AWS_ENDPOINT_URL") {
                b = b.with_endpoint(e);
            }
            // What `aws configure` wrote, for what the environment does not say.
            for (k, v) in aws_files::settings() {
                let key = k.parse::<object_store::aws::AmazonS3ConfigKey>().map_err(|e| bad(&e.to_string()))?;
                b = b.with_config(key, v);
            }
            for (k, v) in options {
                let key = k.parse::<object_store::aws::AmazonS3ConfigKey>().map_err(|e| bad(&e.to_string()))?;
                b = b.with_config(key, *v);
            }
            // A tier that does not answer costs a miss a few seconds, not object_store's
            // default three minutes of retries.
            b = b.with_retry(object_store::RetryConfig {
                backoff: Default::default(),
                max_retries: 3,
                retry_timeout: std::time::Duration::from_secs(20),
            });
            let s3 = b.build().map_err(|e| bad(&e.to_string()))?;
            (Arc::new(s3), ObjPath::parse(prefix.trim_matches('/')).map_err(|e| bad(&e.to_string()))?)
        } else if url.contains("://") && !url.starts_with("file://") {
            let scheme = url.split("://").next().unwrap_or("");
            return Err(bad(&format!(
                "`{scheme}://` is not supported (yet): use `s3://BUCKET/PREFIX` or a shared folder"
            )));
        } else {
            let path = PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
            if !path.is_absolute() {
                return Err(bad("a shared folder must be given as an absolute path"));
            }
            std::fs::create_dir_all(&path).map_err(|source| RemoteError::Io { path: path.clone(), source })?;
            let fs = object_store::local::LocalFileSystem::new_with_prefix(&path).map_err(|e| bad(&e.to_string()))?;
            folder = Some(path);
            (Arc::new(fs), ObjPath::default())
        };
        Ok(Remote {
            os,
            base: base.join(LAYOUT),
            url: url.to_string(),
            read_only,
            folder,
            signer: None,
            trust: trust::Trust::default(),
        })
    }

    /// The same tier, reached through `wrap(its object store)` (tests put a misbehaving
    /// server in between).
    pub fn map_object_store(mut self, wrap: impl FnOnce(Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore>) -> Remote {
        self.os = wrap(self.os);
        self
    }

    /// Sign every record this machine publishes with `key`.
    pub fn with_signer(mut self, key: Option<trust::SigningKey>) -> Remote {
        self.signer = key.map(Arc::new);
        self
    }

    /// Use only the records `trust` accepts.
    pub fn with_trust(mut self, trust: trust::Trust) -> Remote {
        self.trust = trust;
        self
    }

    /// The signing key and trusted keys of this user's configuration
    /// (see [`trust`]): their own key if they made one, `$KLIKO_TRUSTED_KEYS`.
    pub fn with_user_keys(self) -> Result<Remote, trust::TrustError> {
        let key = trust::SigningKey::load_default()?;
        let trust = trust::Trust::from_env(key.as_ref().map(|k| k.public()))?;
        Ok(self.with_signer(key).with_trust(trust))
    }

    pub fn signer(&self) -> Option<trust::PublicKey> {
        self.signer.as_ref().map(|k| k.public())
    }

    pub fn trust(&self) -> &trust::Trust {
        &self.trust
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn object(&self, kind: ObjectKind, d: &Digest) -> ObjPath {
        let h = d.to_hex();
        self.base.clone().join(kind.dir()).join(&h[..2]).join(&h[2..])
    }

    fn record(&self, key: &Digest) -> ObjPath {
        self.base.clone().join("ac").join(format!("{}.json", key.to_hex()))
    }

    fn backend(&self, action: impl Into<String>) -> impl FnOnce(object_store::Error) -> RemoteError + '_ {
        let action = action.into();
        move |source| RemoteError::Backend { url: self.url.clone(), action, source }
    }

    /// The object at `path`, or `None` if there is none.
    async fn get(&self, path: &ObjPath, what: &str) -> Result<Option<Bytes>> {
        match self.os.get(path).await {
            Ok(g) => Ok(Some(g.bytes().await.map_err(self.backend(format!("read {what}")))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.backend(format!("read {what}"))(e)),
        }
    }

    /// The record for `key` on the tier, judged: readable, for this key, and trusted.
    pub async fn record_of(&self, key: &Digest) -> Result<Record> {
        let Some(bytes) = self.get(&self.record(key), "a result record").await? else { return Ok(Record::Absent) };
        Ok(self.judge(key, &bytes))
    }

    fn judge(&self, key: &Digest, bytes: &[u8]) -> Record {
        let envelope: Envelope = match serde_json::from_slice(bytes) {
            Ok(e) => e,
            Err(e) => return Record::Unusable { reason: format!("its record is unreadable ({e})") },
        };
        let raw = envelope.result.get().as_bytes();
        let signed_by = match self.trust.judge(raw, envelope.signed_by.as_deref(), envelope.signature.as_deref()) {
            trust::Verdict::Trusted(k) => k,
            trust::Verdict::Ignored(reason) => return Record::Ignored { reason },
        };
        let result: ActionResult = match serde_json::from_slice(raw) {
            Ok(r) => r,
            Err(e) => return Record::Unusable { reason: format!("its record is unreadable ({e})") },
        };
        if result.key != *key {
            return Record::Unusable { reason: format!("its record is for another key ({})", result.key) };
        }
        Record::Usable { result: Box::new(result), signed_by }
    }

    /// Where the tier keeps an image's kliko.yml.
    fn image_file(&self, image_id: &str) -> ObjPath {
        let name: String = image_id.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
        self.base.clone().join("images").join(name).join("kliko.yml.json")
    }

    /// The kliko.yml of image `image_id` (its content ID) as a machine that read it out of the
    /// image left it on the tier, if this reader trusts it: a machine that has never used the
    /// image then needs no container to read it. `None`: absent, or not trusted.
    pub async fn image_kliko_yml(&self, image_id: &str) -> Result<Option<Vec<u8>>> {
        let Some(bytes) = self.get(&self.image_file(image_id), "an image's kliko.yml").await? else { return Ok(None) };
        let Ok(f) = serde_json::from_slice::<ImageFile>(&bytes) else { return Ok(None) };
        if f.image_id != image_id {
            return Ok(None);
        }
        let verdict = self.trust.judge_image_file(
            image_id,
            f.kliko_yml.as_bytes(),
            f.signed_by.as_deref(),
            f.signature.as_deref(),
        );
        Ok(matches!(verdict, trust::Verdict::Trusted(_)).then(|| f.kliko_yml.into_bytes()))
    }

    /// Leave image `image_id`'s kliko.yml on the tier (signed, if this machine has a key), for
    /// machines that have not read it yet, over any copy there (this machine read the file out
    /// of the image because it found no copy it could use).
    pub async fn publish_image_kliko_yml(&self, image_id: &str, yml: &[u8]) -> Result<()> {
        let Ok(text) = std::str::from_utf8(yml) else { return Ok(()) };
        if self.read_only {
            return Ok(());
        }
        let (signed_by, signature) = match &self.signer {
            Some(k) => (Some(k.public().to_string()), Some(k.sign_image_file(image_id, yml))),
            None => (None, None),
        };
        let f = ImageFile { image_id: image_id.to_string(), kliko_yml: text.to_string(), signed_by, signature };
        let body = serde_json::to_vec(&f).expect("an image file serializes");
        self.os
            .put(&self.image_file(image_id), PutPayload::from(body))
            .await
            .map(|_| ())
            .map_err(self.backend("leave an image's kliko.yml"))
    }

    /// Where the tier says which run made an output tree: `prov/<tree hex>.json`.
    fn producer_path(&self, output: &Digest) -> ObjPath {
        self.base.clone().join("prov").join(format!("{}.json", output.to_hex()))
    }

    /// The (usable, trusted) result of the run that made output tree `output`, by any machine.
    pub async fn producer_of(&self, output: &Digest) -> Result<Option<ActionResult>> {
        let Some(bytes) = self.get(&self.producer_path(output), "a provenance entry").await? else { return Ok(None) };
        let Some(key) = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["key"].as_str().and_then(|k| k.parse::<Digest>().ok()))
        else {
            return Ok(None);
        };
        Ok(match self.record_of(&key).await? {
            Record::Usable { result, .. } if result.output == *output => Some(*result),
            _ => None,
        })
    }

    /// The result recorded for `key` by any machine, with its objects, into `store`.
    pub async fn fetch(&self, store: &Arc<Store>, key: &Digest) -> Result<Fetched> {
        let result = match self.record_of(key).await? {
            Record::Absent => return Ok(Fetched::Absent),
            Record::Ignored { reason } => return Ok(Fetched::Ignored { reason }),
            Record::Unusable { reason } => return Ok(Fetched::Unusable { reason }),
            Record::Usable { result, .. } => *result,
        };
        let extra = [(result.stdout, result.stdout_bytes), (result.stderr, result.stderr_bytes)];
        let (objects, total) = match self.fetch_objects(store, result.output, &extra).await? {
            Ok(got) => got,
            Err(reason) => return Ok(Fetched::Unusable { reason }),
        };
        let (s, r) = (store.clone(), result.clone());
        tokio::task::spawn_blocking(move || s.journal_result(&r, None))
            .await
            .map_err(|e| RemoteError::Join(e.to_string()))??;
        Ok(Fetched::Hit { result: Box::new(result), objects, bytes: total })
    }

    /// Every object of tree `root` (and the blobs `extra`) that `store` lacks, from the tier,
    /// into `store`: `Ok(Ok((objects, bytes)))` fetched; `Ok(Err(reason))` one is missing
    /// from the tier or does not match its digest (nothing partial is placed: trees and
    /// files enter the store only once verified).
    async fn fetch_objects(
        &self,
        store: &Arc<Store>,
        root: Digest,
        extra: &[(Digest, u64)],
    ) -> Result<Result<(usize, u64), String>> {
        let (mut objects, mut total) = (0usize, 0u64);
        // Trees first, level by level: a tree names the objects under it.
        let mut files = BTreeSet::new();
        let mut seen = BTreeSet::new();
        let mut stack = vec![root];
        while let Some(t) = stack.pop() {
            if !seen.insert(t) {
                continue;
            }
            let encoded = match store.get_bytes(ObjectKind::Tree, &t) {
                Ok(b) => b,
                Err(StoreError::Missing { .. } | StoreError::Corrupt { .. }) => {
                    let Some(b) = self.get(&self.object(ObjectKind::Tree, &t), "a tree").await? else {
                        return Ok(Err(format!("its tree {t} is missing from the tier")));
                    };
                    if ObjectKind::Tree.digest_of(&b) != t {
                        return Ok(Err(format!("its tree {t} does not match its digest")));
                    }
                    store.put_bytes(ObjectKind::Tree, &b)?;
                    objects += 1;
                    total += b.len() as u64;
                    b.to_vec()
                }
                Err(e) => return Err(e.into()),
            };
            let tree = match Tree::decode(&encoded) {
                Ok(tree) => tree,
                Err(e) => return Ok(Err(format!("its tree {t} is unreadable ({e})"))),
            };
            for e in tree.entries.values() {
                match e {
                    Entry::Dir { digest } => stack.push(*digest),
                    Entry::File { size, digest, .. } => {
                        files.insert((*digest, *size));
                    }
                    Entry::Symlink { .. } => {}
                }
            }
        }
        files.extend(extra.iter().copied());
        let missing: Vec<(Digest, u64)> = files.into_iter().filter(|(d, size)| !store.has_blob(d, *size)).collect();
        let outcomes: Vec<Result<(tempfile::TempPath, Digest), String>> =
            futures_util::stream::iter(missing.iter().copied())
                .map(|(d, size)| self.fetch_blob(store, d, size))
                .buffer_unordered(PARALLEL)
                .try_collect()
                .await?;
        // In the order they finished (`buffer_unordered`): each names its own digest.
        let mut fetched = Vec::with_capacity(outcomes.len());
        for outcome in outcomes {
            match outcome {
                Ok(file) => fetched.push(file),
                Err(reason) => return Ok(Err(reason)),
            }
        }
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.adopt_blobs(fetched))
            .await
            .map_err(|e| RemoteError::Join(e.to_string()))??;
        objects += missing.len();
        total += missing.iter().map(|(_, s)| s).sum::<u64>();
        Ok(Ok((objects, total)))
    }

    /// Tree `tree` and everything under it, from the tier into `store` (a cluster job's
    /// input, put there by the dispatcher with [`Remote::push_tree`]). `Err` with
    /// [`RemoteError::Incomplete`] when the tier lacks part of it.
    pub async fn fetch_tree(&self, store: &Arc<Store>, tree: &Digest) -> Result<(usize, u64)> {
        match self.fetch_objects(store, *tree, &[]).await? {
            Ok(got) => Ok(got),
            Err(reason) => Err(RemoteError::Incomplete { url: self.url.clone(), what: format!("tree {tree}"), reason }),
        }
    }

    /// Put tree `tree` of `store`, and everything under it, on the tier (only what it lacks):
    /// how a dispatcher hands a run's input to a machine that does not share its store.
    /// Returns how many objects were uploaded and their bytes.
    pub async fn push_tree(&self, store: &Arc<Store>, tree: &Digest) -> Result<(usize, u64)> {
        if self.read_only {
            return Err(RemoteError::ReadOnly(self.url.clone()));
        }
        self.upload_tree(store, tree, Default::default()).await.map(|p| (p.uploaded, p.bytes))
    }

    /// Forget the failure record of `key` (a new attempt is about to start elsewhere, and must
    /// not be judged by the last one's failure).
    pub async fn forget_failure(&self, key: &Digest) -> Result<()> {
        match self.os.delete(&self.failure_path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.backend("remove a failure record")(e)),
        }
    }

    /// Where a failed leader of `key` says how it failed: `failed/<key>.json`.
    pub(crate) fn failure_path(&self, key: &Digest) -> ObjPath {
        self.base.clone().join("failed").join(format!("{}.json", key.to_hex()))
    }

    /// Download blob `d` into a file in `store`'s tmp/, hashing while it streams. `Err(reason)`:
    /// it is missing or does not match.
    async fn fetch_blob(
        &self,
        store: &Arc<Store>,
        d: Digest,
        size: u64,
    ) -> Result<Result<(tempfile::TempPath, Digest), String>> {
        let path = self.object(ObjectKind::Blob, &d);
        let mut stream = match self.os.get(&path).await {
            Ok(g) => g.into_stream(),
            Err(object_store::Error::NotFound { .. }) => {
                return Ok(Err(format!("its file {d} is missing from the tier")));
            }
            Err(e) => return Err(self.backend("read a file")(e)),
        };
        let tmp_dir = store.tmp_dir();
        let mut tmp = tempfile::Builder::new()
            .prefix(".r-")
            .tempfile_in(&tmp_dir)
            .map_err(|source| RemoteError::Io { path: tmp_dir.clone(), source })?;
        let mut hasher = blake3::Hasher::new();
        let mut got = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(self.backend("read a file"))?;
            got += chunk.len() as u64;
            if got > size {
                return Ok(Err(format!("its file {d} is larger on the tier than recorded")));
            }
            hasher.update(&chunk);
            tmp.write_all(&chunk).map_err(|source| RemoteError::Io { path: tmp.path().to_path_buf(), source })?;
        }
        if got != size || Digest::from(hasher.finalize()) != d {
            return Ok(Err(format!("its file {d} does not match its digest on the tier")));
        }
        // Flushed here, while other files still stream (one flush of everything at the end
        // measured 1.4x slower), then closed (an output may have 100,000 files) until adopted.
        let tmp = tokio::task::spawn_blocking(move || tmp.as_file().sync_data().map(|()| tmp))
            .await
            .map_err(|e| RemoteError::Join(e.to_string()))?
            .map_err(|source| RemoteError::Io { path: tmp_dir, source })?;
        Ok(Ok((tmp.into_temp_path(), d)))
    }

    /// Put `result` and every object it names on the tier: objects first (those the tier
    /// lacks), the record last, created only if no machine recorded the key before.
    pub async fn publish(&self, store: &Arc<Store>, result: &ActionResult) -> Result<Published> {
        if self.read_only {
            return Ok(Published::default());
        }
        let extra = [(result.stdout, result.stdout_bytes), (result.stderr, result.stderr_bytes)];
        let mut p = self.upload_tree(store, &result.output, extra.into_iter().collect()).await?;
        let record = self.envelope(result);
        p.signed_by = self.signer().map(|k| k.to_string());
        let path = self.record(&result.key);
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.os.put_opts(&path, PutPayload::from(record.clone()), opts).await {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                // A record this machine would not use must not keep a good one off the tier
                // (a planted or damaged record would otherwise make the key a miss forever).
                let existing = self.get(&path, "a result record").await?;
                let keep = match existing.map(|b| self.judge(&result.key, &b)) {
                    // The same output: every object it names was just made sure of.
                    Some(Record::Usable { result: theirs, .. }) if theirs.output == result.output => true,
                    // Another output (a step that is not deterministic): kept while its root
                    // tree is there (gc removes a record's objects, never only some of them).
                    Some(Record::Usable { result: theirs, .. }) => {
                        match self.os.head(&self.object(ObjectKind::Tree, &theirs.output)).await {
                            Ok(_) => true,
                            Err(object_store::Error::NotFound { .. }) => false,
                            Err(e) => return Err(self.backend("look for an object")(e)),
                        }
                    }
                    _ => false,
                };
                if keep {
                    p.raced = true;
                } else {
                    self.os.put(&path, PutPayload::from(record)).await.map_err(self.backend("record a result"))?;
                    p.replaced = true;
                }
            }
            Err(e) => return Err(self.backend("record a result")(e)),
        }
        // Which run made this output, for `kliko provenance` on other machines (the entry is
        // only a pointer: the record it names is judged when it is read).
        let entry = serde_json::json!({ "key": result.key }).to_string();
        self.os
            .put(&self.producer_path(&result.output), PutPayload::from(entry.into_bytes()))
            .await
            .map_err(self.backend("record a provenance entry"))?;
        Ok(p)
    }

    /// Upload tree `tree` of `store`, everything under it, and the blobs `files`, skipping
    /// what the tier has.
    async fn upload_tree(
        &self,
        store: &Arc<Store>,
        tree: &Digest,
        mut files: BTreeSet<(Digest, u64)>,
    ) -> Result<Published> {
        let (s, out) = (store.clone(), *tree);
        let (trees, walked) = tokio::task::spawn_blocking(move || s.walk_tree(&out))
            .await
            .map_err(|e| RemoteError::Join(e.to_string()))??;
        files.extend(walked);
        let objects: Vec<(ObjectKind, Digest, u64)> = trees
            .into_iter()
            .map(|t| (ObjectKind::Tree, t, 0))
            .chain(files.into_iter().map(|(d, size)| (ObjectKind::Blob, d, size)))
            .collect();
        let sent: Vec<Option<u64>> = futures_util::stream::iter(objects)
            .map(|(kind, d, size)| self.upload(store, kind, d, size))
            .buffer_unordered(PARALLEL)
            .try_collect()
            .await?;
        let mut p = Published::default();
        for s in sent {
            match s {
                Some(bytes) => {
                    p.uploaded += 1;
                    p.bytes += bytes;
                }
                None => p.present += 1,
            }
        }
        Ok(p)
    }

    /// The stored form of `result`'s record, signed if this machine has a key.
    fn envelope(&self, result: &ActionResult) -> Vec<u8> {
        let raw = serde_json::to_string(result).expect("a result serializes");
        let (signed_by, signature) = match &self.signer {
            Some(k) => (Some(k.public().to_string()), Some(k.sign(raw.as_bytes()))),
            None => (None, None),
        };
        let result = serde_json::value::RawValue::from_string(raw).expect("a result is JSON");
        serde_json::to_vec(&Envelope { result, signed_by, signature }).expect("a record serializes")
    }

    /// Upload one object unless the tier has it: `Some(bytes)` uploaded, `None` present.
    async fn upload(&self, store: &Arc<Store>, kind: ObjectKind, d: Digest, size: u64) -> Result<Option<u64>> {
        let path = self.object(kind, &d);
        match self.os.head(&path).await {
            Ok(meta) if kind == ObjectKind::Tree || meta.size == size => return Ok(None),
            Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.backend("look for an object")(e)),
        }
        let local = store.object_path(kind, &d);
        let io = |source| RemoteError::Io { path: local.clone(), source };
        let len = std::fs::metadata(&local).map_err(io)?.len();
        if len <= MULTIPART_ABOVE {
            let bytes = tokio::fs::read(&local).await.map_err(io)?;
            self.os.put(&path, PutPayload::from(bytes)).await.map_err(self.backend("upload an object"))?;
        } else {
            let upload = self.os.put_multipart(&path).await.map_err(self.backend("start an upload"))?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
            let mut file = tokio::fs::File::open(&local).await.map_err(io)?;
            let mut buf = vec![0u8; PART];
            loop {
                let n = tokio::io::AsyncReadExt::read(&mut file, &mut buf).await.map_err(io)?;
                if n == 0 {
                    break;
                }
                w.wait_for_capacity(PARALLEL).await.map_err(self.backend("upload a part"))?;
                w.write(&buf[..n]);
            }
            w.finish().await.map_err(self.backend("finish an upload"))?;
        }
        Ok(Some(len))
    }
}
