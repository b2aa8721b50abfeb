//! Runs started by this server process: each one is a background task with its state, a log
//! buffer for late viewers, and a broadcast channel for live ones.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use kliko_core::Digest;
use kliko_engine::{Event, Observer, RunReport, Status};
use kliko_runtime::Stream;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

/// Log bytes kept per run for viewers who arrive late (the full logs are in the store).
const LOG_KEEP: usize = 4 << 20;

/// What a live viewer is sent.
#[derive(Clone, Debug)]
pub enum LiveMsg {
    Log { stderr: bool, text: String },
    Phase(String),
    Done,
}

/// One run's state.
#[derive(Clone, Debug)]
pub struct RunState {
    pub phase: String,
    pub key: Option<Digest>,
    pub report: Option<RunReport>,
    /// The run could not start or failed before the container (not a non-zero exit).
    pub error: Option<String>,
    pub finished: bool,
}

pub struct RunEntry {
    pub id: String,
    pub image: String,
    pub started: SystemTime,
    pub input: Option<String>,
    pub output: Option<String>,
    pub state: Mutex<RunState>,
    log: Mutex<LogBuf>,
    tx: broadcast::Sender<LiveMsg>,
    done_tx: watch::Sender<bool>,
    pub cancel: CancellationToken,
}

#[derive(Default)]
struct LogBuf {
    chunks: Vec<(bool, String)>,
    bytes: usize,
    dropped: bool,
}

impl RunEntry {
    pub fn new(id: String, image: String, input: Option<String>, output: Option<String>) -> RunEntry {
        let (tx, _) = broadcast::channel(1024);
        let (done_tx, _) = watch::channel(false);
        RunEntry {
            id,
            image,
            started: SystemTime::now(),
            input,
            output,
            state: Mutex::new(RunState {
                phase: "queued".into(),
                key: None,
                report: None,
                error: None,
                finished: false,
            }),
            log: Mutex::new(LogBuf::default()),
            tx,
            done_tx,
            cancel: CancellationToken::new(),
        }
    }

    pub fn snapshot(&self) -> RunState {
        self.state.lock().expect("run state lock").clone()
    }

    /// The logs so far (and whether older ones were dropped), and a receiver for what
    /// follows: taken under one lock so nothing falls between them.
    pub fn subscribe(&self) -> (Vec<(bool, String)>, bool, broadcast::Receiver<LiveMsg>) {
        let log = self.log.lock().expect("log lock");
        let rx = self.tx.subscribe();
        (log.chunks.clone(), log.dropped, rx)
    }

    pub fn logs(&self) -> (Vec<(bool, String)>, bool) {
        let log = self.log.lock().expect("log lock");
        (log.chunks.clone(), log.dropped)
    }

    fn set_phase(&self, phase: &str) {
        self.state.lock().expect("run state lock").phase = phase.to_string();
        let _log = self.log.lock().expect("log lock");
        let _ = self.tx.send(LiveMsg::Phase(phase.to_string()));
    }

    /// Record the end of the run and wake everyone waiting.
    pub fn finish(&self, result: Result<RunReport, String>) {
        {
            let mut st = self.state.lock().expect("run state lock");
            match result {
                Ok(report) => {
                    st.phase = phase_of(&report).into();
                    st.key = Some(report.key);
                    st.report = Some(report);
                }
                Err(e) => {
                    st.phase = "error".into();
                    st.error = Some(e);
                }
            }
            st.finished = true;
        }
        {
            let _log = self.log.lock().expect("log lock");
            let _ = self.tx.send(LiveMsg::Done);
        }
        // `send` would not store the value while nobody is subscribed.
        self.done_tx.send_replace(true);
    }

    /// Wait until the run has finished.
    pub async fn wait(&self) {
        let mut rx = self.done_tx.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    pub fn is_finished(&self) -> bool {
        *self.done_tx.borrow()
    }
}

pub fn phase_of(report: &RunReport) -> &'static str {
    match report.status {
        Status::Succeeded => "succeeded",
        Status::Failed => "failed",
        Status::TimedOut => "timed out",
        Status::Cancelled => "cancelled",
        Status::LeaderFailed => "failed (identical run failed)",
    }
}

/// Feeds the engine's events into a [`RunEntry`].
pub struct RunObserver(pub Arc<RunEntry>);

impl Observer for RunObserver {
    fn log(&self, stream: Stream, bytes: &[u8]) {
        let stderr = matches!(stream, Stream::Stderr);
        let text = String::from_utf8_lossy(bytes).into_owned();
        let mut log = self.0.log.lock().expect("log lock");
        log.bytes += text.len();
        log.chunks.push((stderr, text.clone()));
        while log.bytes > LOG_KEEP && log.chunks.len() > 1 {
            let (_, t) = log.chunks.remove(0);
            log.bytes -= t.len();
            log.dropped = true;
        }
        let _ = self.0.tx.send(LiveMsg::Log { stderr, text });
    }

    fn event(&self, event: &Event) {
        match event {
            Event::Prepared { key } => {
                self.0.state.lock().expect("run state lock").key = Some(*key);
                self.0.set_phase("prepared");
            }
            Event::Hit { .. } => self.0.set_phase("cache hit"),
            Event::Waiting { holder } => {
                self.0.set_phase(&format!("waiting for the identical run by pid {} on {}", holder.pid, holder.host))
            }
            Event::Starting => self.0.set_phase("starting"),
            Event::Running { .. } => self.0.set_phase("running"),
            Event::Ingesting => self.0.set_phase("storing the output"),
            Event::Job { id, state } => self.0.set_phase(&format!("cluster job {id}: {state}")),
            Event::Finished { .. } => {}
            Event::Warning(w) => {
                let text = format!("warning: {w}\n");
                self.log(Stream::Stderr, text.as_bytes());
            }
        }
    }
}

/// The runs of this process.
#[derive(Default)]
pub struct Registry {
    runs: Mutex<HashMap<String, Arc<RunEntry>>>,
    order: Mutex<Vec<String>>,
}

impl Registry {
    pub fn insert(&self, entry: Arc<RunEntry>) {
        self.order.lock().expect("order lock").push(entry.id.clone());
        self.runs.lock().expect("runs lock").insert(entry.id.clone(), entry);
    }

    pub fn get(&self, id: &str) -> Option<Arc<RunEntry>> {
        self.runs.lock().expect("runs lock").get(id).cloned()
    }

    /// Newest first.
    pub fn recent(&self, n: usize) -> Vec<Arc<RunEntry>> {
        let order = self.order.lock().expect("order lock");
        let runs = self.runs.lock().expect("runs lock");
        order.iter().rev().take(n).filter_map(|id| runs.get(id).cloned()).collect()
    }

    pub fn all(&self) -> Vec<Arc<RunEntry>> {
        self.runs.lock().expect("runs lock").values().cloned().collect()
    }
}
