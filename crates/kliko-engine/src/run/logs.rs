//! A run's logs: to the observer live, to files for the store, and a tail for messages.

use std::collections::VecDeque;
use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kliko_runtime::{LogChunk, Stream};
use tokio::sync::mpsc;

use crate::error::{EngineError, IoContext, Result};
use crate::Observer;

/// Log lines kept for the message of a failed run.
const TAIL_LINES: usize = 20;

/// Where a run's logs went.
pub(super) struct RunLogs {
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    pub tail: Arc<Mutex<Tail>>,
}

/// The last lines of both streams, for the message of a failed run.
#[derive(Default)]
pub(super) struct Tail {
    lines: VecDeque<String>,
    partial: [Vec<u8>; 2],
}

impl Tail {
    fn push(&mut self, stream: Stream, bytes: &[u8]) {
        let buf = &mut self.partial[stream as usize];
        buf.extend_from_slice(bytes);
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            self.lines.push_back(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
            if self.lines.len() > TAIL_LINES {
                self.lines.pop_front();
            }
        }
    }

    pub(super) fn lines(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lines.iter().cloned().collect();
        for p in &self.partial {
            if !p.is_empty() {
                v.push(String::from_utf8_lossy(p).into_owned());
            }
        }
        let skip = v.len().saturating_sub(TAIL_LINES);
        v.into_iter().skip(skip).collect()
    }
}

impl RunLogs {
    /// Start writing what arrives on `rx` (on a blocking thread: the files are written and
    /// synced there, never on the async threads). The task ends when every sender is gone.
    pub(super) fn pump(
        &self,
        rx: mpsc::Receiver<LogChunk>,
        obs: Arc<dyn Observer>,
    ) -> tokio::task::JoinHandle<Result<()>> {
        let (stdout, stderr, tail) = (self.stdout.clone(), self.stderr.clone(), self.tail.clone());
        tokio::task::spawn_blocking(move || pump(rx, obs, stdout, stderr, tail))
    }

    /// Wait for [`RunLogs::pump`]'s task.
    pub(super) async fn finished(task: tokio::task::JoinHandle<Result<()>>) -> Result<()> {
        task.await.map_err(|e| EngineError::Join(e.to_string()))?
    }
}

fn pump(
    mut rx: mpsc::Receiver<LogChunk>,
    obs: Arc<dyn Observer>,
    stdout: PathBuf,
    stderr: PathBuf,
    tail: Arc<Mutex<Tail>>,
) -> Result<()> {
    let mut out = fs::File::create(&stdout).at(&stdout)?;
    let mut err = fs::File::create(&stderr).at(&stderr)?;
    while let Some(chunk) = rx.blocking_recv() {
        obs.log(chunk.stream, &chunk.bytes);
        tail.lock().unwrap_or_else(|p| p.into_inner()).push(chunk.stream, &chunk.bytes);
        match chunk.stream {
            Stream::Stdout => out.write_all(&chunk.bytes).at(&stdout)?,
            Stream::Stderr => err.write_all(&chunk.bytes).at(&stderr)?,
        }
    }
    out.sync_all().at(&stdout)?;
    err.sync_all().at(&stderr)?;
    Ok(())
}
