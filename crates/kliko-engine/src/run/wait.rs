//! Waiting on another process that leads the same key, showing its logs as they grow.

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use kliko_core::Digest;
use kliko_runtime::Stream;
use kliko_store::lease::{Holder, POLL};
use tokio_util::sync::CancellationToken;

use crate::error::{blocking, Result};
use crate::{Engine, Observer};

/// A waiter's view of the leader's log files: what it has read of each so far.
#[derive(Default)]
pub(super) struct LeaderLogs {
    dir: Option<PathBuf>,
    /// Open log files; an open file keeps being readable after ingest moves it into the store.
    files: Vec<(Stream, fs::File)>,
    /// Bytes read so far of a leader's logs on another machine (stdout, stderr).
    remote_from: [u64; 2],
}

impl LeaderLogs {
    /// Whatever the leader's logs gained since the last call, from the lease backend when the
    /// leader is on another machine, else from its local log files.
    pub(super) fn read(
        &mut self,
        leases: &dyn kliko_store::lease::LeaseBackend,
        key: &Digest,
    ) -> Vec<(Stream, Vec<u8>)> {
        match leases.remote_logs(key, self.remote_from) {
            Some([out, err]) => {
                self.remote_from[0] += out.len() as u64;
                self.remote_from[1] += err.len() as u64;
                [(Stream::Stdout, out), (Stream::Stderr, err)].into_iter().filter(|(_, b)| !b.is_empty()).collect()
            }
            None => self.read_new(leases.holder(key)),
        }
    }

    /// Whatever the leader's logs gained since the last call (a new leader starts afresh).
    fn read_new(&mut self, holder: Option<Holder>) -> Vec<(Stream, Vec<u8>)> {
        use std::io::Read;
        if let Some(dir) = holder.and_then(|h| h.logs) {
            if self.dir.as_ref() != Some(&dir) {
                self.dir = Some(dir);
                self.files.clear();
            }
        }
        let Some(dir) = &self.dir else { return Vec::new() };
        for (stream, name) in [(Stream::Stdout, "stdout.log"), (Stream::Stderr, "stderr.log")] {
            if !self.files.iter().any(|(s, _)| *s == stream) {
                if let Ok(f) = fs::File::open(dir.join(name)) {
                    self.files.push((stream, f));
                }
            }
        }
        let mut out = Vec::new();
        for (stream, f) in &mut self.files {
            let mut buf = Vec::new();
            if f.read_to_end(&mut buf).is_ok() && !buf.is_empty() {
                out.push((*stream, buf));
            }
        }
        out
    }
}

impl Engine {
    /// Wait until nobody holds the lease (or we are cancelled), showing the leader's logs as
    /// they grow. Never holds the index.
    pub(super) async fn wait_for_lease(
        &self,
        key: &Digest,
        cancel: &CancellationToken,
        obs: &Arc<dyn Observer>,
    ) -> Result<()> {
        let mut logs = LeaderLogs::default();
        loop {
            let (leases, k) = (self.leases().clone(), *key);
            let (free, chunks, l) = blocking(move || {
                let free = leases.is_free(&k);
                // After the probe, so the last lines are read once the leader is done.
                let chunks = logs.read(&*leases, &k);
                Ok((free, chunks, logs))
            })
            .await?;
            logs = l;
            for (stream, bytes) in chunks {
                obs.log(stream, &bytes);
            }
            if free {
                return Ok(());
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }
}
