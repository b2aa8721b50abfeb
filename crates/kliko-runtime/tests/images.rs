//! Image inspection and reading files out of images, against the real daemon.

mod common;

use common::*;
use kliko_runtime::RuntimeError;
use kliko_testkit::{ImageBuilder, TestImage};

fn is_sha256_id(id: &str) -> bool {
    id.strip_prefix("sha256:").is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn entrypoint_image() -> TestImage {
    ImageBuilder::new("rt-entrypoint")
        .kliko_yml(KLIKO_YML)
        .kliko_script("echo run")
        .entrypoint(vec!["/bin/echo".into(), "from-entrypoint".into()])
        .user("1234")
        .label("org.example.kind", "test")
        .build()
        .expect("build image")
}

#[tokio::test]
async fn connect_negotiates_and_answers() {
    let docker = docker().await;
    assert!(!docker.endpoint().is_empty());
    // Negotiated down to the daemon's version, so a plain call works.
    bollard::Docker::connect_with_defaults().expect("client").ping().await.expect("ping");
    docker.list_images().await.expect("a call through the negotiated client");
}

#[tokio::test]
async fn missing_image_is_image_not_found() {
    let docker = docker().await;
    let reference = "kliko-test-no-such-image:never";
    let err = docker.inspect_image(reference).await.unwrap_err();
    assert!(matches!(&err, RuntimeError::ImageNotFound { reference: r } if r == reference), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("`kliko-test-no-such-image:never` not found locally"), "{msg}");
    assert!(!msg.contains("docker pull"), "advice is the front end's: {msg}");

    let err = docker.read_file(reference, "/kliko.yml").await.unwrap_err();
    assert!(matches!(err, RuntimeError::ImageNotFound { .. }), "{err:?}");
}

#[tokio::test]
async fn inspect_resolves_tag_and_ids_to_the_same_image() {
    let docker = docker().await;
    let image = entrypoint_image();
    let by_tag = docker.inspect_image(&image.tag).await.unwrap();
    assert!(is_sha256_id(&by_tag.id), "{}", by_tag.id);
    assert_eq!(by_tag.id, image.id);
    let by_id = docker.inspect_image(&image.id).await.unwrap();
    let short = &image.id["sha256:".len().."sha256:".len() + 12];
    let by_short = docker.inspect_image(short).await.unwrap();
    assert_eq!(by_id, by_tag);
    assert_eq!(by_short, by_tag);

    assert!(by_tag.repo_tags.contains(&image.tag));
    assert_eq!(by_tag.entrypoint, Some(vec!["/bin/echo".to_string(), "from-entrypoint".to_string()]));
    assert_eq!(by_tag.user.as_deref(), Some("1234"));
    assert_eq!(by_tag.labels.get("org.example.kind").map(String::as_str), Some("test"));
    assert!(by_tag.created.is_some());

    let all = docker.list_images().await.unwrap();
    assert!(all.iter().any(|i| i.id == image.id && i.repo_tags.contains(&image.tag)));
}

#[tokio::test]
async fn read_file_works_without_a_shell() {
    let docker = docker().await;
    let image =
        ImageBuilder::new("rt-noshell").no_shell().kliko_yml(KLIKO_YML).kliko_c(HELLO_C).build().expect("build image");
    let bytes = docker.read_file(&image.id, "/kliko.yml").await.unwrap();
    assert_eq!(bytes, KLIKO_YML.as_bytes());
    assert!(managed_from_image(&docker, &image.id).await.is_empty());
}

#[tokio::test]
async fn read_file_ignores_the_entrypoint() {
    let docker = docker().await;
    let image = entrypoint_image();
    let bytes = docker.read_file(&image.id, "/kliko.yml").await.unwrap();
    assert_eq!(bytes, KLIKO_YML.as_bytes());
    // A tag is accepted as well as an id; a relative path is taken from `/`.
    let bytes = docker.read_file(&image.tag, "kliko.yml").await.unwrap();
    assert_eq!(bytes, KLIKO_YML.as_bytes());
    assert!(managed_from_image(&docker, &image.id).await.is_empty());
}

#[tokio::test]
async fn read_file_missing_and_non_regular_paths() {
    let docker = docker().await;
    let image = ImageBuilder::new("rt-missing")
        .kliko_script("true")
        .symlink("/dangling.yml", "/nowhere/at/all")
        .symlink("/loop-a", "/loop-b")
        .symlink("/loop-b", "/loop-a")
        .build()
        .expect("build image");

    let err = docker.read_file(&image.id, "/kliko.yml").await.unwrap_err();
    assert!(
        matches!(&err, RuntimeError::FileNotInImage { image: i, path } if *i == image.id && path == "/kliko.yml"),
        "{err:?}"
    );
    assert!(err.to_string().contains("`/kliko.yml`"), "{err}");

    let err = docker.read_file(&image.id, "/dangling.yml").await.unwrap_err();
    assert!(matches!(err, RuntimeError::FileNotInImage { .. }), "{err:?}");

    let err = docker.read_file(&image.id, "/bin").await.unwrap_err();
    assert!(matches!(err, RuntimeError::NotARegularFile { kind: "directory", .. }), "{err:?}");
    let err = docker.read_file(&image.id, "/").await.unwrap_err();
    assert!(matches!(err, RuntimeError::NotARegularFile { .. }), "{err:?}");

    let err = docker.read_file(&image.id, "/loop-a").await.unwrap_err();
    assert!(matches!(err, RuntimeError::SymlinkLoop { .. }), "{err:?}");

    // Every error path removed its container.
    assert!(managed_from_image(&docker, &image.id).await.is_empty());
}

#[tokio::test]
async fn read_file_follows_symlinks_inside_the_image() {
    let docker = docker().await;
    let image = ImageBuilder::new("rt-symlink")
        .no_shell()
        .file("/etc/kliko/real.yml", KLIKO_YML.as_bytes(), 0o600)
        // relative, then absolute, then relative with `..`
        .symlink("/kliko.yml", "etc/kliko/link1.yml")
        .symlink("/etc/kliko/link1.yml", "/opt/link2.yml")
        .symlink("/opt/link2.yml", "../etc/kliko/real.yml")
        .build()
        .expect("build image");
    let bytes = docker.read_file(&image.id, "/kliko.yml").await.unwrap();
    assert_eq!(bytes, KLIKO_YML.as_bytes());
    assert!(managed_from_image(&docker, &image.id).await.is_empty());
}

/// Containers created from `image` between `since` and now, as the daemon's event log has
/// them (any label, already removed or not).
fn creates_since(since: f64, image: &str) -> usize {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let out = std::process::Command::new("docker")
        .args(["events", "--since", &format!("{since:.3}"), "--until", &format!("{:.3}", now + 0.5)])
        .args(["--filter", "type=container", "--filter", "event=create", "--filter"])
        .arg(format!("image={image}"))
        .args(["--format", "{{.ID}}"])
        .output()
        .expect("docker events");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[tokio::test]
async fn read_file_sees_the_merged_layers_and_needs_no_container_when_it_may_read_them() {
    let docker = docker().await;
    let base = ImageBuilder::new("rt-layers-base").kliko_yml("old: 1\n").build().expect("build image");
    // Of another size: the daemon's naive layer diff (fuse-overlayfs) misses a file replaced
    // by one of the same size within the same second.
    let over =
        ImageBuilder::new("rt-layers-over").on(&base.tag).no_shell().kliko_yml("newer: 2\n").build().expect("build");
    let gone = ImageBuilder::new("rt-layers-gone")
        .on(&base.tag)
        .no_shell()
        .run_in_build(&["/bin/busybox", "rm", "/kliko.yml"])
        .build()
        .expect("build image");

    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64() - 0.5;
    assert_eq!(docker.read_file(&base.id, "/kliko.yml").await.unwrap(), b"old: 1\n");
    assert_eq!(docker.read_file(&over.id, "/kliko.yml").await.unwrap(), b"newer: 2\n");
    // Deleted in the top layer: a whiteout hides the base's file.
    let err = docker.read_file(&gone.id, "/kliko.yml").await.unwrap_err();
    assert!(matches!(err, RuntimeError::FileNotInImage { .. }), "{err:?}");

    // The container path gives the same answers.
    assert_eq!(docker.read_file_through_container(&over.id, "/kliko.yml").await.unwrap(), b"newer: 2\n");
    assert!(matches!(
        docker.read_file_through_container(&gone.id, "/kliko.yml").await,
        Err(RuntimeError::FileNotInImage { .. })
    ));
    // The event log sees the container that read (so a zero below is not for want of seeing).
    let over_creates = creates_since(since, &over.id);
    assert!(over_creates >= 1);
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } == 0 && docker.endpoint().starts_with("unix://") {
        // Root may read the daemon's layer folders: the found files needed no container.
        assert_eq!(over_creates, 1, "only the explicit container read created one");
        assert_eq!(creates_since(since, &base.id), 0, "the base image's file was read from its layers");
    }
    assert!(managed_from_image(&docker, &over.id).await.is_empty());
    assert!(managed_from_image(&docker, &gone.id).await.is_empty());
}
