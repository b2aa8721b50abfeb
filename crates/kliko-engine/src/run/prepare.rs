//! Everything up to the key: the image's io mode checked, parameters resolved, the input
//! tree and every file parameter hashed, the action pre-image built.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;

use kliko_core::key::{ActionPreimage, ACTION_FORMAT};
use kliko_core::tree::Tree;
use kliko_spec::{IoMode, CANONICAL_PARAMS_FORMAT};
use kliko_store::ObjectKind;

use crate::error::{blocking, EngineError, IoContext, Result};
use crate::{Engine, Input, Prepared, RunRequest, KLIKO_CMD};

/// The environment every kliko container gets (the in-image kliko library reads it).
pub(crate) fn base_env() -> Vec<(String, String)> {
    [
        ("INPUT", "/input"),
        ("OUTPUT", "/output"),
        ("WORK", "/work"),
        ("PARAM_FILES", "/param_files"),
        ("PARAM_FILE", "/parameters.json"),
        ("KLIKO_FILE", "/kliko.yml"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

impl Engine {
    /// Everything up to the key: image, parameters, digests of the input and file parameters.
    pub async fn prepare(&self, req: &RunRequest) -> Result<Prepared> {
        let image = self.image_in(&req.image, req.runtime).await?;
        self.prepare_with(req, image).await
    }

    /// [`Engine::prepare`] for an image already resolved.
    pub async fn prepare_with(&self, req: &RunRequest, image: crate::ImageMeta) -> Result<Prepared> {
        let io = image.spec.io;
        if let Some(flags) = req.io_flags {
            if flags != io {
                return Err(EngineError::IoMode { image: req.image.clone(), mode: io, given: Some(flags) });
            }
        }
        if io == IoMode::Join && req.input == Input::None {
            return Err(EngineError::IoMode { image: req.image.clone(), mode: io, given: None });
        }
        let params = image
            .spec
            .resolve(&req.params)
            .map_err(|errors| EngineError::Params { image: req.image.clone(), errors })?;

        let store = self.store.clone();
        let input = req.input.clone();
        let (checked, image_ref) = (params.clone(), req.image.clone());
        let input_stat = Arc::new(kliko_core::hash::MemoryCache::default());
        let stat_copy = input_stat.clone();
        let (input_digest, file_digests) = blocking(move || {
            let mut digests = BTreeMap::new();
            // Each file parameter as given, and the regular file it resolves to (links followed).
            let files = checked.resolve_files().map_err(|errors| EngineError::Params { image: image_ref, errors })?;
            for (f, real) in files {
                let meta = fs::metadata(&real).at(&real)?;
                let (d, _) = kliko_core::hash::hash_file_stable(&real, &meta).map_err(kliko_store::StoreError::from)?;
                digests.insert(f, d);
            }
            let input_digest = match input {
                Input::None => store.put_bytes(ObjectKind::Tree, &Tree::new().encode())?,
                Input::Tree(d) => d,
                Input::Path(p) => {
                    let m = fs::metadata(&p).map_err(|_| EngineError::NoSuchPath { path: p.clone() })?;
                    if !m.is_dir() {
                        return Err(EngineError::NotADir { path: p });
                    }
                    store.hash_path_remembering(&p, &kliko_core::hash::NoProgress, &stat_copy)?.digest
                }
            };
            Ok((input_digest, digests))
        })
        .await?;

        let canonical = params
            .canonical_key_json(|p: &Path| file_digests.get(p).map(|d| d.to_hex()).ok_or(()))
            .map_err(|_| EngineError::Internal("a file parameter was not hashed".into()))?;
        let mut env: BTreeMap<String, String> = base_env().into_iter().collect();
        for (k, v) in &req.env {
            env.insert(k.clone(), v.clone());
        }
        let preimage = ActionPreimage {
            format: ACTION_FORMAT.to_string(),
            image_id: image.info.id.clone(),
            io: io.to_string(),
            cmd: vec![KLIKO_CMD.to_string()],
            env: env.clone(),
            parameters_format: CANONICAL_PARAMS_FORMAT,
            parameters: serde_json::from_slice(&canonical)
                .map_err(|e| EngineError::Internal(format!("canonical parameters are not JSON: {e}")))?,
            input: Some(input_digest),
            salt: req.salt.clone(),
        };
        let key = preimage.key();
        Ok(Prepared {
            image,
            params,
            preimage,
            key,
            input_digest,
            file_digests,
            env: env.into_iter().collect(),
            input_stat,
        })
    }
}
