//! Error rendering: `error: …`, then each cause as `caused by: …`, then a `hint:` where one helps.
//!
//! The libraries describe what went wrong; advice that names a flag or a command is given
//! here, chosen by the typed errors anywhere in the chain (never by their text, except for
//! RocksDB's, which reports as text).

use kliko_engine::EngineError;
use kliko_runtime::{RuntimeError, Unreachable};
use kliko_store::StoreError;

type Dyn<'a> = &'a (dyn std::error::Error + 'static);

pub fn error(e: &anyhow::Error) {
    eprintln!("error: {e}");
    for cause in e.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
    if let Some(h) = hint(e) {
        eprintln!("hint: {h}");
    }
}

/// The most specific advice first: the engine's, then the runtime's, then what the operating
/// system said (a full disk, a permission), then the store's.
fn hint(e: &anyhow::Error) -> Option<String> {
    let chain = || e.chain();
    chain()
        .find_map(|c| c.downcast_ref::<EngineError>().and_then(engine_hint))
        .or_else(|| chain().find_map(|c| runtime_error(c).and_then(runtime_hint)))
        .or_else(|| chain().find_map(io_hint))
        .or_else(|| chain().find_map(store_hint))
}

fn engine_hint(e: &EngineError) -> Option<String> {
    use kliko_spec::IoMode;
    Some(match e {
        EngineError::OutputNotEmpty { .. } => {
            "choose an empty or new folder, or pass `--overwrite` to replace its contents".into()
        }
        EngineError::Params { image, .. } => format!("`kliko run {image} --help` lists the parameters"),
        EngineError::StoreNotUtf8 { .. } => {
            "put the store in a folder whose path is valid UTF-8 (`--store DIR` or `KLIKO_STORE`)".into()
        }
        EngineError::IoMode { mode: IoMode::Split, .. } => "give `--input DIR --output DIR`, not `--work`".into(),
        EngineError::IoMode { mode: IoMode::Join, .. } => "give `--work DIR`, not `--input`/`--output`".into(),
        EngineError::WorkFolderChanged { result, .. } => {
            format!("`kliko store materialize {result} DIR` writes the result out")
        }
        _ => return None,
    })
}

fn runtime_error(e: Dyn<'_>) -> Option<&RuntimeError> {
    e.downcast_ref::<RuntimeError>().or_else(|| match e.downcast_ref::<EngineError>() {
        Some(EngineError::Runtime(r)) => Some(r),
        _ => None,
    })
}

fn runtime_hint(e: &RuntimeError) -> Option<String> {
    let podman = crate::runtime_kind() == kliko_runtime::RuntimeKind::Podman;
    let group = "add your user to the `docker` group (`sudo usermod -aG docker $USER`, then log in again)";
    let start = "is the daemon running? start it with `systemctl start docker`";
    Some(match e {
        RuntimeError::Unreachable { runtime, endpoint, .. } if podman || runtime == "podman" => format!(
            "is Podman's service running at `{}`? unset `DOCKER_HOST` to let kliko find your own socket or start one",
            endpoint.strip_prefix("unix://").unwrap_or(endpoint)
        ),
        RuntimeError::Unreachable { endpoint, reason, .. } => {
            let socket = endpoint.strip_prefix("unix://").unwrap_or("/var/run/docker.sock");
            match reason {
                Unreachable::PermissionDenied => {
                    format!("permission denied on `{socket}`: {group}; or run without root: `--runtime podman`")
                }
                Unreachable::NotRunning => format!("{start}, or point `DOCKER_HOST` at a running daemon"),
                _ => format!("{start}; if `{socket}` refuses you, {group}; check `DOCKER_HOST` if you set it"),
            }
        }
        RuntimeError::ImageNotFound { reference } if podman => format!(
            "Podman keeps its own images: build it with `podman build -t {reference} .`, or copy it from Docker with \
             `docker save {reference} | podman load` (it keeps its image ID, so results made under Docker are reused)"
        ),
        RuntimeError::ImageNotFound { reference } => {
            format!("build it with `docker build -t {reference} .` or fetch it with `docker pull {reference}`")
        }
        RuntimeError::RuntimeUnavailable { runtime, .. } if runtime == "podman" => {
            "install Podman (Debian: `apt-get install podman uidmap slirp4netns`), or choose `--runtime docker`".into()
        }
        RuntimeError::NoGpu { .. } => {
            "run it on a machine with GPUs (a Slurm step asks for them with `resources: {gpus: N}`), or drop `--gpus`"
                .into()
        }
        RuntimeError::RemovalInterrupted { container, .. } if podman => {
            format!("remove it with `podman rm -f {container}`")
        }
        RuntimeError::RemovalInterrupted { container, .. } => format!("remove it with `docker rm -f {container}`"),
        _ => return None,
    })
}

/// What the operating system said, wherever it is in the chain.
fn io_hint(e: Dyn<'_>) -> Option<String> {
    let kind = e.downcast_ref::<std::io::Error>().map(|io| io.kind());
    // RocksDB reports its I/O errors as text.
    let db_text = match e.downcast_ref::<StoreError>() {
        Some(StoreError::Db { .. }) => e.to_string(),
        _ => String::new(),
    };
    if kind == Some(std::io::ErrorKind::StorageFull) || db_text.contains("No space left on device") {
        return Some("the disk is full: free space, or run `kliko gc --max-size SIZE` to shrink the store".into());
    }
    if kind == Some(std::io::ErrorKind::PermissionDenied) {
        return Some("check the permissions of the path above, or choose another store with `--store DIR`".into());
    }
    None
}

/// Advice for the store's own errors, wherever they are in the chain (an engine error wraps
/// them transparently).
fn store_hint(e: Dyn<'_>) -> Option<String> {
    let se = e.downcast_ref::<StoreError>().or_else(|| match e.downcast_ref::<kliko_engine::EngineError>() {
        Some(kliko_engine::EngineError::Store(s)) => Some(s),
        _ => None,
    })?;
    match se {
        StoreError::IndexLost { .. } => Some(
            "`kliko store repair` rebuilds the index from the result files kept beside it, and says what it could not recover"
                .into(),
        ),
        StoreError::ReadOnly { .. } => Some(
            "a read-only store serves the results it holds; to run and record new ones, use a writable store \
             (`--store DIR` or `KLIKO_STORE`)"
                .into(),
        ),
        StoreError::Db { .. } => Some("if this persists, `kliko store repair` rebuilds the index (nothing is deleted)".into()),
        _ => None,
    }
}
