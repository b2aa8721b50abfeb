//! The action key: what identifies one run of one image.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::canonical::canonical_json;
use crate::Digest;

/// The version of everything that goes into a key. Bump it whenever the pre-image changes
/// (what goes in, or how it is encoded), so old results are never served for new semantics.
pub const ACTION_FORMAT: &str = "kliko-action-v1";
/// The BLAKE3 key-derivation context of action keys.
pub const ACTION_CONTEXT: &str = "kliko 2026-11-26 action key v1";

/// Everything a run's result depends on, and nothing else (no host paths, timestamps, user,
/// resource limits or timeout).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActionPreimage {
    /// Always [`ACTION_FORMAT`].
    pub format: String,
    /// The image's content-addressed ID (`sha256:…`), never a tag.
    pub image_id: String,
    /// `split` or `join`.
    pub io: String,
    /// The command given to the container (the image's entrypoint is part of the image ID).
    pub cmd: Vec<String>,
    /// The environment given to the container.
    pub env: BTreeMap<String, String>,
    /// The version of the canonical parameter encoding (kliko-spec's `CANONICAL_PARAMS_FORMAT`).
    pub parameters_format: u32,
    /// Canonical parameters: file parameters replaced by their content digests.
    pub parameters: serde_json::Value,
    /// The tree digest of the input (split) or work (join) tree; `None` if there is none.
    pub input: Option<Digest>,
    /// An operator's salt to disown earlier results.
    pub salt: Option<String>,
}

impl ActionPreimage {
    /// The canonical bytes: JSON, object keys sorted by bytes, no insignificant whitespace.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let v = serde_json::to_value(self).expect("pre-image is plain data");
        canonical_json(&v)
    }

    pub fn key(&self) -> Digest {
        Digest::derive(ACTION_CONTEXT, &self.canonical_bytes())
    }
}
