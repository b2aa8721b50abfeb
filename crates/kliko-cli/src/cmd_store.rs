use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use kliko_core::Digest;
use kliko_store::{FsckOptions, IngestMode, Store};

use crate::cli::StoreCommand;
use crate::progress::Bar;

pub fn run(store_root: &Path, cmd: StoreCommand) -> anyhow::Result<ExitCode> {
    let store =
        Store::open(store_root).with_context(|| format!("cannot open the store at `{}`", store_root.display()))?;
    match cmd {
        StoreCommand::Repair { json } => crate::maintenance::repair(&store, json),
        StoreCommand::Fsck { repair, json } => {
            let r = store.fsck(&FsckOptions { repair, check_image_file: Some(check_image_file) })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "checked {} blobs and {} trees ({}), {} results",
                    r.blobs,
                    r.trees,
                    human_bytes(r.bytes),
                    r.results
                );
                for c in &r.corrupt {
                    println!("corrupt: {c}");
                }
                for s in &r.stray {
                    println!("stray file: {}", s.display());
                }
                if r.removed_stray > 0 {
                    println!("moved {} stray files to quarantine/", r.removed_stray);
                }
                for b in &r.bad_image_files {
                    println!("unusable cached image file: {b}");
                }
                if r.removed_image_files > 0 {
                    println!(
                        "moved {} cached image files to quarantine/ (read from the image again on next use)",
                        r.removed_image_files
                    );
                }
                for i in &r.incomplete_results {
                    println!("incomplete result: {i}");
                }
                if r.removed_results > 0 {
                    println!("removed {} incomplete results", r.removed_results);
                }
                if r.temp_files > 0 {
                    println!(
                        "{} temporary files left by interrupted writes ({} removed){}",
                        r.temp_files,
                        r.removed_temp_files,
                        if repair { "" } else { "; `--repair` removes those of dead processes" }
                    );
                }
                println!("{}", if r.is_clean() { "store is consistent" } else { "store has problems (see above)" });
            }
            Ok(if r.is_clean() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        StoreCommand::Stats { json } => {
            let s = store.stats()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("store:        {}", s.root.display());
                println!("blobs:        {} ({})", s.blobs, human_bytes(s.blob_bytes));
                println!("trees:        {} ({})", s.trees, human_bytes(s.tree_bytes));
                println!("results:      {} ({} pinned)", s.results, s.pinned);
                println!("history:      {} runs", s.history_entries);
                println!("stat cache:   {} folders", s.stat_cache_dirs);
                println!("index:        {}", human_bytes(s.index_bytes));
                println!("scratch:      {} entries", s.scratch_entries);
                println!("quarantined:  {} objects", s.quarantined);
            }
            Ok(ExitCode::SUCCESS)
        }
        StoreCommand::Ingest { path, json } => {
            let bar = Bar::new(&format!("ingesting {}", path.display()));
            let i = store
                .ingest_with_progress(&path, IngestMode::Copy, &bar)
                .with_context(|| format!("cannot ingest `{}`", path.display()))?;
            bar.finish();
            if json {
                let v = serde_json::json!({
                    "digest": i.digest, "kind": if i.is_dir { "tree" } else { "file" },
                    "files": i.files, "bytes": i.bytes, "new_objects": i.new_objects, "new_bytes": i.new_bytes,
                });
                println!("{v}");
            } else {
                println!("{}  {}", i.digest, path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        StoreCommand::Materialize { digest, dest, mode } => {
            let d: Digest = digest.parse()?;
            store
                .materialize(&d, &dest, mode.into())
                .with_context(|| format!("cannot materialize `{d}` into `{}`", dest.display()))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub use kliko_core::units::human_bytes;

/// A cached `/kliko.yml` must parse as the engine will parse it when it runs the image.
fn check_image_file(path: &str, bytes: &[u8]) -> Result<(), String> {
    if path != "/kliko.yml" {
        return Ok(());
    }
    kliko_spec::Spec::parse(path, &String::from_utf8_lossy(bytes)).map(|_| ()).map_err(|e| e.to_string())
}
