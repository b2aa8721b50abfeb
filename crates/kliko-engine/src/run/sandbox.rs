//! The container's sandbox: its run folder (parameters, parameter files, input, output or
//! work tree) and the spec that mounts it. Built in one go off the async threads.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kliko_runtime::{ContainerSpec, Mount};
use kliko_spec::IoMode;
use kliko_store::{IngestMode, MaterializeMode, Store};

use crate::error::{EngineError, IoContext, Result};
use crate::fsutil;
use crate::{Input, Prepared, RunRequest, UserChoice, KEY_LABEL, KLIKO_CMD, STORE_LABEL};

/// A sandbox ready to run: the spec, and the folder the container writes its result into.
pub(super) struct Sandbox {
    pub spec: ContainerSpec,
    pub output_dir: PathBuf,
}

/// Fill the run folder `scratch` and describe the container that runs in it.
pub(super) fn build(store: &Arc<Store>, req: &RunRequest, prep: &Prepared, scratch: &Path) -> Result<Sandbox> {
    let io = prep.image.spec.io;
    // Parameters and parameter files, private to this run.
    let params_json = scratch.join("parameters.json");
    fs::write(&params_json, prep.params.container_json()).at(&params_json)?;
    let param_files = scratch.join("param_files");
    fs::create_dir(&param_files).at(&param_files)?;
    for (host, rel) in prep.params.file_placements() {
        let dest = param_files.join(&rel);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).at(parent)?;
        }
        fs::copy(&host, &dest).at(&host)?;
        let meta = fs::metadata(&dest).at(&dest)?;
        let (d, _) = kliko_core::hash::hash_file_stable(&dest, &meta).map_err(kliko_store::StoreError::from)?;
        if prep.file_digests.get(&host) != Some(&d) {
            return Err(EngineError::ParamFileChanged { path: host });
        }
    }
    let mut mounts = vec![
        Mount { host: params_json.clone(), container: "/parameters.json".into(), read_only: true },
        Mount { host: param_files.clone(), container: "/param_files".into(), read_only: true },
    ];
    let output_dir = match io {
        IoMode::Split => scratch.join("output"),
        IoMode::Join => scratch.join("work"),
    };
    match io {
        IoMode::Split => {
            let input_mount = match &req.input {
                Input::Path(p) => {
                    let abs = std::path::absolute(p).at(p)?;
                    if abs.to_str().is_some() {
                        abs
                    } else {
                        // The runtime's API carries paths as UTF-8 strings: mount a name
                        // in the run folder that leads to the folder we hashed.
                        let link = scratch.join("input-link");
                        std::os::unix::fs::symlink(&abs, &link).at(&link)?;
                        link
                    }
                }
                Input::None | Input::Tree(_) => {
                    let dir = scratch.join("input");
                    let _gc = store.gc_shared()?;
                    store.materialize(&prep.input_digest, &dir, MaterializeMode::ReadOnlyMount)?;
                    dir
                }
            };
            mounts.push(Mount { host: input_mount, container: "/input".into(), read_only: true });
            fs::create_dir(&output_dir).at(&output_dir)?;
        }
        IoMode::Join => {
            // The container changes its work tree in place: give it a private copy, made
            // from the store so that what it sees is exactly the tree the key names (and
            // the user's original stays recoverable by digest).
            let _gc = store.gc_shared()?;
            if let Input::Path(p) = &req.input {
                let ingested = store.ingest(p, IngestMode::Copy)?;
                if ingested.digest != prep.input_digest {
                    return Err(EngineError::WorkChangedBeforeRun { path: p.clone() });
                }
            }
            store.materialize(&prep.input_digest, &output_dir, MaterializeMode::Copy)?;
        }
    }
    mounts.push(Mount {
        host: output_dir.clone(),
        container: format!("/{}", if io == IoMode::Split { "output" } else { "work" }),
        read_only: false,
    });
    if !matches!(req.user, UserChoice::Invoker) {
        // Another uid must be able to write the output folder.
        for e in walk_dirs(&output_dir) {
            let _ = fs::set_permissions(&e, fs::Permissions::from_mode(0o777));
        }
    }
    let user = match &req.user {
        UserChoice::Invoker => {
            let (u, g) = fsutil::uid_gid();
            Some(format!("{u}:{g}"))
        }
        UserChoice::Image => None,
        UserChoice::Explicit(u) => Some(u.clone()),
    };
    let mut labels = req.labels.clone();
    labels.insert(KEY_LABEL.into(), prep.key.to_hex());
    if let Some(root) = store.root().to_str() {
        labels.insert(STORE_LABEL.into(), root.to_string());
    }
    labels.insert("io.kliko.image".into(), req.image.clone());
    let spec = ContainerSpec {
        image_id: prep.image.info.id.clone(),
        cmd: vec![KLIKO_CMD.to_string()],
        env: prep.env.clone(),
        mounts,
        user,
        network: req.network.clone(),
        memory_bytes: req.memory_bytes,
        cpus: req.cpus,
        timeout: req.timeout,
        labels,
        name: None,
        workdir: None,
        gpus: req.gpus.clone(),
    };
    Ok(Sandbox { spec, output_dir })
}

fn walk_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(rd) = fs::read_dir(&out[i]) {
            out.extend(rd.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
        }
        i += 1;
    }
    out
}
