//! Error rendering: `error: …`, then each cause as `caused by: …`, then a `hint:` where one helps.

pub fn error(e: &anyhow::Error) {
    eprintln!("error: {e}");
    for cause in e.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
    // The most specific advice first: the engine's, then what the operating system said (a
    // full disk, a permission), then the store's.
    let hint = e
        .downcast_ref::<kliko_engine::EngineError>()
        .and_then(|ee| ee.hint())
        .or_else(|| e.chain().find_map(|c| hint_for(&c.to_string())))
        .or_else(|| e.chain().find_map(store_hint));
    if let Some(h) = hint {
        eprintln!("hint: {h}");
    }
}

/// Advice for the store's own errors, wherever they are in the chain (an engine error wraps
/// them transparently).
fn store_hint(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    use kliko_store::StoreError;
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

fn hint_for(msg: &str) -> Option<String> {
    if msg.contains("No space left on device") {
        return Some("the disk is full: free space, or run `kliko gc --max-size SIZE` to shrink the store".into());
    }
    if msg.contains("Permission denied") {
        return Some("check the permissions of the path above, or choose another store with `--store DIR`".into());
    }
    None
}
