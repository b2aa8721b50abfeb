//! Its own test binary: it changes `DOCKER_HOST` for the whole process.

use kliko_runtime::{Docker, RuntimeError};

#[tokio::test]
async fn unreachable_daemon_says_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("unix://{}/docker.sock", dir.path().display());
    std::env::set_var("DOCKER_HOST", &endpoint);
    let err = Docker::connect().await.unwrap_err();
    std::env::remove_var("DOCKER_HOST");
    match &err {
        RuntimeError::DaemonUnreachable { endpoint: e, .. } => assert_eq!(*e, endpoint),
        other => panic!("expected DaemonUnreachable, got {other:?}"),
    }
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(msg.contains(&format!("`{endpoint}`")), "{msg}");
    assert!(msg.contains("systemctl start docker"), "{msg}");
    assert!(msg.contains("DOCKER_HOST"), "{msg}");
}
