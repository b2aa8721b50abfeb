//! Error rendering: `error: …`, then each cause as `caused by: …`, then a `hint:` where one helps.

pub fn error(e: &anyhow::Error) {
    eprintln!("error: {e}");
    let mut hint =
        e.downcast_ref::<kliko_engine::EngineError>().and_then(|ee| ee.hint()).or_else(|| hint_for(&e.to_string()));
    for cause in e.chain().skip(1) {
        eprintln!("  caused by: {cause}");
        hint = hint.or_else(|| hint_for(&cause.to_string()));
    }
    if let Some(h) = hint {
        eprintln!("hint: {h}");
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
