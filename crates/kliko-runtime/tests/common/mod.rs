//! Shared helpers for the integration tests (real daemon, no mocks).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

use kliko_runtime::{ContainerRuntime, ContainerSpec, Docker, LogChunk, RunOutcome, RuntimeError, Stream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub const TEST_LABEL: &str = "io.kliko.test";

pub async fn docker() -> Docker {
    Docker::connect().await.expect("a reachable docker daemon")
}

/// A label value no other test uses.
pub fn unique_value(what: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{what}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A spec for `image` running `cmd`, labelled for this test.
pub fn spec(image: &str, cmd: &[&str], label: &str) -> ContainerSpec {
    ContainerSpec {
        image_id: image.to_string(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        labels: BTreeMap::from([(TEST_LABEL.to_string(), label.to_string())]),
        ..Default::default()
    }
}

pub struct Collected {
    pub outcome: Result<RunOutcome, RuntimeError>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub chunks: Vec<LogChunk>,
}

impl Collected {
    /// How the run ended; panics (with the stderr) if it was an error.
    pub fn outcome(&self) -> kliko_runtime::Outcome {
        match &self.outcome {
            Ok(run) => run.outcome,
            Err(e) => panic!("run failed: {e:?}; stderr: {}", self.stderr()),
        }
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Run and gather the logs, reading them concurrently as a real caller would.
pub async fn run_collect<R: ContainerRuntime + ?Sized>(
    docker: &R,
    spec: &ContainerSpec,
    cancel: CancellationToken,
) -> Collected {
    let (tx, mut rx) = mpsc::channel(16);
    let reader = tokio::spawn(async move {
        let mut chunks = Vec::new();
        while let Some(chunk) = rx.recv().await {
            chunks.push(chunk);
        }
        chunks
    });
    let outcome = docker.run(spec, tx, cancel).await;
    let chunks = reader.await.expect("log reader");
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    for c in &chunks {
        match c.stream {
            Stream::Stdout => stdout.extend_from_slice(&c.bytes),
            Stream::Stderr => stderr.extend_from_slice(&c.bytes),
        }
    }
    Collected { outcome, stdout, stderr, chunks }
}

/// Containers (any state) that carry this test's label: must be none after a run.
pub async fn leftovers(docker: &Docker, label: &str) -> Vec<String> {
    docker.containers_with_label(TEST_LABEL, label).await.expect("list containers")
}

/// Containers created from `image` by this crate (read_file adds only the managed label).
pub async fn managed_from_image(docker: &Docker, image: &str) -> Vec<String> {
    use bollard::query_parameters::ListContainersOptionsBuilder;
    let filters = HashMap::from([
        ("label", vec![format!("{}=true", kliko_runtime::MANAGED_LABEL)]),
        ("ancestor", vec![image.to_string()]),
    ]);
    let _ = docker;
    bollard::Docker::connect_with_defaults()
        .expect("client")
        .list_containers(Some(ListContainersOptionsBuilder::new().all(true).filters(&filters).build()))
        .await
        .expect("list containers")
        .into_iter()
        .filter_map(|c| c.id)
        .collect()
}

pub const KLIKO_YML: &str = "schema_version: 3\nio: split\nsections: []\n";

/// A static `/kliko` for images without a shell.
pub const HELLO_C: &str = r#"
#include <stdio.h>
int main(int argc, char **argv) {
    printf("hello from c");
    for (int i = 1; i < argc; i++) printf(" %s", argv[i]);
    printf("\n");
    fprintf(stderr, "to stderr\n");
    return 0;
}
"#;
