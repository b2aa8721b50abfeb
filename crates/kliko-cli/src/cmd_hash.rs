use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::Ordering;

use anyhow::Context;
use kliko_core::hash::Hasher;
use kliko_store::Store;

use crate::cli::HashArgs;
use crate::progress::Bar;

pub fn run(store_root: &Path, a: HashArgs) -> anyhow::Result<ExitCode> {
    let store = if a.no_stat_cache { None } else { Some(Store::open(store_root)?) };
    for path in &a.paths {
        if crate::out::stdout_closed() {
            // Nobody reads the digests any more (`kliko hash … | head -1`).
            break;
        }
        let bar = Bar::new(&format!("hashing {}", path.display()));
        let h = match &store {
            Some(s) => s.hash_path(path, &bar),
            None => Hasher { progress: &bar, ..Hasher::default() }.hash_path(path).map_err(Into::into),
        }
        .with_context(|| format!("cannot hash `{}`", path.display()))?;
        bar.finish();
        if a.json {
            let v = serde_json::json!({
                "path": path,
                "digest": h.digest,
                "kind": if h.is_dir { "tree" } else { "file" },
                "files": h.stats.files.load(Ordering::Relaxed),
                "bytes_read": h.stats.bytes_read.load(Ordering::Relaxed),
                "bytes_cached": h.stats.bytes_cached.load(Ordering::Relaxed),
            });
            println!("{v}");
        } else {
            println!("{}  {}", h.digest, path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
