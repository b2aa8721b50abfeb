//! Its own test binary: it changes `DOCKER_HOST` for the whole process.

use kliko_runtime::{Docker, RuntimeError, Unreachable};

#[tokio::test]
async fn unreachable_daemon_says_where_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("unix://{}/docker.sock", dir.path().display());
    std::env::set_var("DOCKER_HOST", &endpoint);
    let err = Docker::connect().await.unwrap_err();
    std::env::remove_var("DOCKER_HOST");
    match &err {
        RuntimeError::Unreachable { endpoint: e, runtime, .. } => {
            assert_eq!(*e, endpoint);
            assert_eq!(runtime, "docker");
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    // No socket there: the front end's advice ("start the daemon") depends on knowing that.
    assert_eq!(err.unreachable_reason(), Some(Unreachable::NotRunning));
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(msg.contains(&format!("`{endpoint}`")), "{msg}");
    assert!(msg.contains("nothing answers there"), "{msg}");
}
