//! Looking after a shared tier: [`Remote::check`] (is it usable, and how fast),
//! [`Remote::preflight`] (the one request made before a run), [`Remote::stats`],
//! [`Remote::push`] (publish what the local store has and the tier lacks) and
//! [`Remote::gc`] (explicit and conservative: old records first, then only objects no record
//! names that are older than a grace period).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use kliko_core::tree::{Entry, Tree};
use kliko_core::Digest;
use kliko_store::records::ActionResult;
use kliko_store::{ObjectKind, Store};
use object_store::path::Path as ObjPath;
use object_store::{ObjectMeta, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::Serialize;

use crate::{Published, Record, Remote, RemoteError, Result, PARALLEL};

/// What [`Remote::check`] found.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub url: String,
    pub read_only: bool,
    /// Median time of a small read, in ms.
    pub latency_ms: f64,
    /// Whether a small file could be written, read back and deleted (not tried when read-only).
    pub writable: Option<bool>,
    /// Whether a second create of one name is refused, as leases need (not tried when read-only).
    pub conditional_writes: Option<bool>,
    /// MiB/s of one upload and one download of [`CheckReport::probe_bytes`].
    pub upload_mib_s: Option<f64>,
    pub download_mib_s: Option<f64>,
    pub probe_bytes: u64,
    pub signing_key: Option<String>,
    pub trusted_keys: Vec<String>,
}

/// What the tier holds.
#[derive(Debug, Default, Serialize)]
pub struct TierStats {
    pub records: u64,
    pub trees: u64,
    pub blobs: u64,
    pub bytes: u64,
    pub leases: u64,
    pub failures: u64,
}

/// What [`Remote::push`] did.
#[derive(Debug, Default, Serialize)]
pub struct Pushed {
    /// Local results the tier had no usable record of, now published.
    pub published: usize,
    /// Local results the tier already had.
    pub present: usize,
    pub uploaded: usize,
    pub bytes: u64,
    /// Results that could not be published (a local object missing), with why.
    pub failed: Vec<String>,
}

/// What [`Remote::gc`] removed (or, dry, would remove).
#[derive(Debug, Default, Serialize)]
pub struct TierGc {
    pub records_removed: u64,
    pub records_kept: u64,
    pub objects_removed: u64,
    pub bytes_removed: u64,
    /// Unnamed objects younger than the grace period, kept.
    pub objects_young: u64,
    pub objects_kept: u64,
    /// Leaders' log chunks and failure records older than the grace period.
    pub logs_removed: u64,
    pub dry_run: bool,
}

impl Remote {
    /// The request made before a run: can this tier be read (and written, unless read-only)?
    /// `Err` is a configuration the user must fix (no such bucket, refused credentials, a
    /// folder they may not write); a server that does not answer is `Ok(Some(warning))`:
    /// runs go on without the tier.
    pub async fn preflight(&self) -> Result<Option<String>> {
        if let Some(dir) = &self.folder {
            let mode = if self.read_only { libc::R_OK | libc::X_OK } else { libc::R_OK | libc::W_OK | libc::X_OK };
            let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str()))
                .map_err(|_| RemoteError::BadUrl { url: self.url.clone(), reason: "a NUL in the path".into() })?;
            // SAFETY: access() on a NUL-terminated path.
            if unsafe { libc::access(c.as_ptr(), mode) } != 0 {
                let what = if self.read_only { "read" } else { "read and write" };
                return Err(RemoteError::Config {
                    url: self.url.clone(),
                    problem: format!("this user may not {what} the shared folder `{}`", dir.display()),
                    fix: "ask its owner for access (the group that shares results needs `rwx` on it and \
                          `g+s` so new files stay in the group), or give another `--remote`"
                        .into(),
                });
            }
            return Ok(None);
        }
        let probe = self.base.clone().join("ac");
        let first = self.os.list(Some(&probe)).next().await;
        match first {
            None | Some(Ok(_)) => Ok(None),
            Some(Err(e)) => self.classify(e, "list its results"),
        }
    }

    /// A failed request, as a configuration error or (the server did not answer) a warning.
    fn classify(&self, e: object_store::Error, action: &str) -> Result<Option<String>> {
        let text = crate::chain(&e);
        let config = |problem: &str, fix: &str| {
            Err(RemoteError::Config { url: self.url.clone(), problem: problem.into(), fix: fix.into() })
        };
        if text.contains("NoSuchBucket") || text.contains("bucket does not exist") {
            return config(
                "the bucket does not exist",
                "create it (for example `aws s3 mb s3://BUCKET`) or correct the URL",
            );
        }
        if matches!(e, object_store::Error::Unauthenticated { .. } | object_store::Error::PermissionDenied { .. })
            || ["InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403 Forbidden"]
                .iter()
                .any(|w| text.contains(w))
        {
            return config(
                "the server refused the credentials",
                "check `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (or `~/.aws/credentials`) and that they may use this bucket",
            );
        }
        Ok(Some(format!("the shared tier `{}` could not {action} ({text}); going on without it", self.url)))
    }

    /// Reachability, credentials, writes, conditional writes, latency and throughput.
    pub async fn check(&self, probe_bytes: u64) -> Result<CheckReport> {
        if let Some(warning) = self.preflight().await? {
            return Err(RemoteError::Unreachable(warning));
        }
        let mut report = CheckReport {
            url: self.url.clone(),
            read_only: self.read_only,
            latency_ms: 0.0,
            writable: None,
            conditional_writes: None,
            upload_mib_s: None,
            download_mib_s: None,
            probe_bytes,
            signing_key: self.signer().map(|k| k.to_string()),
            trusted_keys: self.trust.keys().iter().map(|k| k.to_string()).collect(),
        };
        let probe = self.base.clone().join("probe").join(crate::lease::unique_id());
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            match self.os.head(&probe).await {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.backend("read")(e)),
            }
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        report.latency_ms = times[times.len() / 2];
        if self.read_only {
            return Ok(report);
        }
        let written = self.os.put(&probe, PutPayload::from_static(b"kliko")).await;
        let read = match written {
            Ok(_) => self.os.get(&probe).await.ok().map(|g| g.bytes()),
            Err(e) => return Err(self.backend("write a small file")(e)),
        };
        let read_back = match read {
            Some(f) => f.await.is_ok_and(|b| &b[..] == b"kliko"),
            None => false,
        };
        let deleted = self.os.delete(&probe).await.is_ok();
        report.writable = Some(read_back && deleted);
        report.conditional_writes = Some(self.honours_conditional_writes().await);
        if probe_bytes > 0 {
            let big = self.base.clone().join("probe").join(format!("{}-big", crate::lease::unique_id()));
            let payload = vec![0x5au8; probe_bytes as usize];
            let mib = probe_bytes as f64 / (1 << 20) as f64;
            let t = Instant::now();
            self.os.put(&big, PutPayload::from(payload)).await.map_err(self.backend("upload a test file"))?;
            report.upload_mib_s = Some(mib / t.elapsed().as_secs_f64());
            let t = Instant::now();
            let got = async { self.os.get(&big).await?.bytes().await }.await;
            let elapsed = t.elapsed().as_secs_f64();
            let _ = self.os.delete(&big).await;
            got.map_err(self.backend("download a test file"))?;
            report.download_mib_s = Some(mib / elapsed);
        }
        Ok(report)
    }

    /// Whether the tier refuses a second create of one name (Garage, for one, does not).
    pub async fn honours_conditional_writes(&self) -> bool {
        let probe = self.base.clone().join("probe").join(crate::lease::unique_id());
        let create = PutOptions { mode: PutMode::Create, ..Default::default() };
        let first = self.os.put_opts(&probe, PutPayload::from_static(b"1"), create.clone()).await;
        let second = self.os.put_opts(&probe, PutPayload::from_static(b"2"), create).await;
        let _ = self.os.delete(&probe).await;
        first.is_ok() && matches!(second, Err(object_store::Error::AlreadyExists { .. }))
    }

    async fn list(&self, dir: &str) -> Result<Vec<ObjectMeta>> {
        let prefix = self.base.clone().join(dir);
        self.os.list(Some(&prefix)).try_collect().await.map_err(self.backend(format!("list its {dir}/")))
    }

    pub async fn stats(&self) -> Result<TierStats> {
        let mut s = TierStats { records: self.list("ac").await?.len() as u64, ..Default::default() };
        for m in self.list(ObjectKind::Tree.dir()).await? {
            s.trees += 1;
            s.bytes += m.size;
        }
        for m in self.list(ObjectKind::Blob.dir()).await? {
            s.blobs += 1;
            s.bytes += m.size;
        }
        s.leases = self.list("leases").await?.len() as u64;
        s.failures = self.list("failed").await?.len() as u64;
        Ok(s)
    }

    /// Publish every result of `store` the tier has no usable record of.
    pub async fn push(&self, store: &Arc<Store>) -> Result<Pushed> {
        if self.read_only {
            return Err(RemoteError::ReadOnly(self.url.clone()));
        }
        let s = store.clone();
        let results: Vec<ActionResult> = tokio::task::spawn_blocking(move || s.results(&s.db_nowait()?))
            .await
            .map_err(|e| RemoteError::Join(e.to_string()))??;
        let mut pushed = Pushed::default();
        for r in results {
            if matches!(self.record_of(&r.key).await?, Record::Usable { .. }) {
                pushed.present += 1;
                continue;
            }
            match self.publish(store, &r).await {
                Ok(Published { uploaded, bytes, .. }) => {
                    pushed.published += 1;
                    pushed.uploaded += uploaded;
                    pushed.bytes += bytes;
                }
                Err(RemoteError::Io { path, source }) => {
                    pushed.failed.push(format!("{}: {} ({source})", r.key, path.display()));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(pushed)
    }

    /// Remove records last written more than `older_than` ago, then the objects no remaining
    /// record names that are older than `grace` (an object a machine is publishing right now
    /// is younger). `dry_run`: count, remove nothing.
    pub async fn gc(&self, older_than: Duration, grace: Duration, dry_run: bool) -> Result<TierGc> {
        if self.read_only && !dry_run {
            return Err(RemoteError::ReadOnly(self.url.clone()));
        }
        let now = chrono_now();
        let age = |m: &ObjectMeta| (now - m.last_modified.timestamp_millis()).max(0) as u64;
        let mut g = TierGc { dry_run, ..Default::default() };
        for m in self.list("ac").await? {
            if age(&m) > older_than.as_millis() as u64 {
                g.records_removed += 1;
                if !dry_run {
                    self.delete(&m.location).await?;
                }
            } else {
                g.records_kept += 1;
            }
        }
        // Listed again just before objects go: a record written meanwhile keeps its objects.
        let records: Vec<ObjPath> = self.list("ac").await?.into_iter().map(|m| m.location).collect();
        let named = self.named_objects(&records).await?;
        for kind in [ObjectKind::Tree, ObjectKind::Blob] {
            for m in self.list(kind.dir()).await? {
                let digest = digest_of(&m.location);
                if digest.is_some_and(|d| named.contains(&(kind, d))) {
                    g.objects_kept += 1;
                } else if age(&m) < grace.as_millis() as u64 {
                    g.objects_young += 1;
                } else {
                    g.objects_removed += 1;
                    g.bytes_removed += m.size;
                    if !dry_run {
                        self.delete(&m.location).await?;
                    }
                }
            }
        }
        // Leaders' log chunks (for waiters on other machines) and failure records: only
        // while they may still be read.
        for dir in ["logs", "failed"] {
            for m in self.list(dir).await? {
                if age(&m) >= grace.as_millis() as u64 {
                    g.logs_removed += 1;
                    if !dry_run {
                        self.delete(&m.location).await?;
                    }
                }
            }
        }
        Ok(g)
    }

    async fn delete(&self, path: &ObjPath) -> Result<()> {
        match self.os.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.backend("delete an object")(e)),
        }
    }

    /// Every object the records at `records` name (trees read from the tier).
    async fn named_objects(&self, records: &[ObjPath]) -> Result<BTreeSet<(ObjectKind, Digest)>> {
        let mut named = BTreeSet::new();
        let mut trees = Vec::new();
        for path in records {
            let Some(key) = path.filename().and_then(|f| f.strip_suffix(".json")).and_then(|h| h.parse().ok()) else {
                continue;
            };
            if let Record::Usable { result, .. } = self.record_of(&key).await? {
                named.insert((ObjectKind::Blob, result.stdout));
                named.insert((ObjectKind::Blob, result.stderr));
                trees.push(result.output);
            }
        }
        while !trees.is_empty() {
            let batch: Vec<Digest> =
                std::mem::take(&mut trees).into_iter().filter(|t| named.insert((ObjectKind::Tree, *t))).collect();
            let got: Vec<Option<bytes::Bytes>> = futures_util::stream::iter(batch)
                .map(|t| async move { self.get(&self.object(ObjectKind::Tree, &t), "a tree").await })
                .buffer_unordered(PARALLEL)
                .try_collect()
                .await?;
            for tree in got.into_iter().flatten().filter_map(|b| Tree::decode(&b).ok()) {
                for e in tree.entries.values() {
                    match e {
                        Entry::Dir { digest } => trees.push(*digest),
                        Entry::File { digest, .. } => {
                            named.insert((ObjectKind::Blob, *digest));
                        }
                        Entry::Symlink { .. } => {}
                    }
                }
            }
        }
        Ok(named)
    }
}

/// The digest an object's path ends in (`.../ab/cdef...`).
fn digest_of(path: &ObjPath) -> Option<Digest> {
    let mut parts: Vec<String> = path.parts().map(|p| p.as_ref().to_string()).collect();
    let rest = parts.pop()?;
    let head = parts.pop()?;
    format!("{head}{rest}").parse().ok()
}

/// Now, in ms since the epoch (the tier's times are compared with it).
fn chrono_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
