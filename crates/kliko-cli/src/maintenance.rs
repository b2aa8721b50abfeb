//! Upkeep beyond the store itself: `kliko store repair` (rebuild a lost or damaged index) and
//! the containers `kliko gc` removes.

use std::process::ExitCode;
use std::sync::Arc;

use kliko_store::{Recovered, Store};

/// Remove the containers of this store's runs that are over (left by a process killed at the
/// wrong moment). Docker being unreachable is no reason for gc to fail: it says so.
pub fn remove_dead_containers(store: &Store) -> Vec<String> {
    let result = (|| -> anyhow::Result<Vec<String>> {
        let engine =
            kliko_engine::Engine::new(Arc::new(Store::open(store.root())?)).with_runtime_kind(crate::runtime_kind());
        Ok(crate::runtime()?.block_on(engine.remove_dead_containers())?)
    })();
    match result {
        Ok(ids) => ids,
        Err(e) => {
            eprintln!("kliko: warning: left-over containers were not looked for: {e:#}");
            Vec::new()
        }
    }
}

pub fn repair(store: &Store, json: bool) -> anyhow::Result<ExitCode> {
    let r = store.repair_index()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(c) = &r.saved_copy {
        println!("the index as it was found is saved in `{}`", c.display());
    }
    println!(
        "{}",
        match r.recovered {
            Recovered::Whole => "the old index could be read whole: its results, pins and history are kept",
            Recovered::Rebuilt => "the old index was rebuilt from what could be read of it",
            Recovered::New => "nothing of the old index could be read: a new one was made from the result files",
        }
    );
    println!(
        "{} results ({} restored from their result files), {} pins, {} history entries",
        r.results, r.restored, r.pins, r.history
    );
    if r.unreadable > 0 {
        println!("{} result files could not be read (moved to the store's `quarantine/`)", r.unreadable);
    }
    if !r.lost.is_empty() {
        println!("lost with the old index:");
        for l in &r.lost {
            println!("  - {l}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
