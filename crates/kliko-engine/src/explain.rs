//! `--explain`: the key's pre-image, and how it differs from the nearest earlier run.

use serde::Serialize;
use serde_json::Value;

use kliko_core::Digest;
use kliko_store::records::ActionResult;
use kliko_store::Store;

use crate::error::{blocking, Result};
use crate::{Engine, RunRequest};

#[derive(Debug, Serialize)]
pub struct Explanation {
    pub key: Digest,
    /// Whether a complete result is stored for the key.
    pub stored: bool,
    pub preimage: Value,
    /// The stored result of the same image reference or ID whose pre-image differs least.
    pub nearest: Option<Digest>,
    /// `field: earlier → now`, one per difference from `nearest`.
    pub differences: Vec<String>,
    /// What the shared tier holds for the key, in words (when one is configured and the
    /// local store has no result).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
}

impl Engine {
    pub async fn explain(&self, req: &RunRequest) -> Result<Explanation> {
        let prep = self.prepare(req).await?;
        let store = self.store.clone();
        let key = prep.key;
        let image_ref = req.image.clone();
        let pre = serde_json::to_value(&prep.preimage).unwrap_or(Value::Null);
        let pre2 = pre.clone();
        let image_id = prep.image.info.id.clone();
        let explanation = blocking(move || {
            let db = store.db()?;
            let stored = store.lookup(&db, &key)?.is_some();
            let (nearest, differences) =
                nearest(store.results(&db)?, &key, &image_ref, &image_id, &pre2, |_| true).unzip();
            let differences = differences.unwrap_or_default();
            Ok(Explanation { key, stored, preimage: pre, nearest, differences, remote: None })
        })
        .await;
        let mut x = explanation?;
        if let (false, Some(remote)) = (x.stored, &self.remote) {
            use kliko_remote::Record;
            x.remote = Some(match remote.record_of(&key).await {
                Ok(Record::Absent) => "no machine has recorded a result for this key".into(),
                Ok(Record::Usable { signed_by: Some(k), .. }) => {
                    format!("a result signed by {k} (trusted): a run would fetch it")
                }
                Ok(Record::Usable { signed_by: None, .. }) => "an unsigned result: a run would fetch it".into(),
                Ok(Record::Ignored { reason }) => format!("a result that is ignored: {reason}"),
                Ok(Record::Unusable { reason }) => format!("a result that cannot be used: {reason}"),
                Err(e) => format!("it could not be read ({})", crate::error::chain(&e)),
            });
        }
        Ok(x)
    }
}

/// The stored result of the same image reference or ID (other than `key`, and passing
/// `keep`) whose pre-image differs least from `pre`, and the differences.
fn nearest(
    results: Vec<ActionResult>,
    key: &Digest,
    image_ref: &str,
    image_id: &str,
    pre: &Value,
    keep: impl Fn(&ActionResult) -> bool,
) -> Option<(Digest, Vec<String>)> {
    let mut best: Option<(usize, Digest, Vec<String>)> = None;
    for r in results {
        if r.key == *key || (r.image_ref != image_ref && r.image_id != image_id) || !keep(&r) {
            continue;
        }
        let old = serde_json::to_value(&r.preimage).unwrap_or(Value::Null);
        let mut diffs = Vec::new();
        diff("", &old, pre, &mut diffs);
        if best.as_ref().is_none_or(|(n, _, _)| diffs.len() < *n) {
            best = Some((diffs.len(), r.key, diffs));
        }
    }
    best.map(|(_, k, d)| (k, d))
}

/// Why `result` had to run: the nearest run of the same image recorded before it started,
/// and how its pre-image differed (`None`: no earlier run of that image is stored). What
/// `--explain` says before a run, said of a run that happened.
pub fn why_missed(store: &Store, result: &ActionResult) -> kliko_store::Result<Option<(Digest, Vec<String>)>> {
    let db = store.db()?;
    let pre = serde_json::to_value(&result.preimage).unwrap_or(Value::Null);
    let at = |s: &str| time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok();
    let started = at(&result.started_at);
    let before = |r: &ActionResult| match (at(&r.started_at), started) {
        (Some(a), Some(b)) => a < b,
        _ => r.started_at < result.started_at,
    };
    Ok(nearest(store.results(&db)?, &result.key, &result.image_ref, &result.image_id, &pre, before))
}

fn show(v: Option<&Value>) -> String {
    match v {
        None => "(absent)".into(),
        Some(v) => v.to_string(),
    }
}

/// Field-by-field differences between two JSON values, with dotted paths.
pub(crate) fn diff(path: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => diff(&p, x, y, out),
                    (x, y) => out.push(format!("{p}: {} → {}", show(x), show(y))),
                }
            }
        }
        _ if old != new => out.push(format!("{path}: {old} → {new}")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_names_each_changed_field() {
        let a: Value = serde_json::json!({"input": "aa", "parameters": {"x": 1, "y": "s"}, "salt": null});
        let b: Value = serde_json::json!({"input": "bb", "parameters": {"x": 2, "y": "s", "z": true}, "salt": null});
        let mut out = Vec::new();
        diff("", &a, &b, &mut out);
        assert_eq!(
            out,
            vec![
                "input: \"aa\" → \"bb\"".to_string(),
                "parameters.x: 1 → 2".to_string(),
                "parameters.z: (absent) → true".to_string()
            ]
        );
    }
}
