//! `kliko provenance`, `show`, `history`, `pin`, `unpin`, `gc`: the cache as a record.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context};
use kliko_core::Digest;
use kliko_engine::provenance::{self, Provenance};
use kliko_store::records::ActionResult;
use kliko_store::{GcOptions, ObjectKind, Store};

use crate::cli::CacheCommand;
use crate::cmd_run::human_ms;
use crate::cmd_store::human_bytes;

pub fn run(store_root: &Path, cmd: CacheCommand) -> anyhow::Result<ExitCode> {
    let store = std::sync::Arc::new(
        Store::open(store_root).with_context(|| format!("cannot open the store at `{}`", store_root.display()))?,
    );
    match cmd {
        CacheCommand::Provenance { arg, depth, json, dot, ro_crate, with_data, license } => {
            // Runs made on other machines too, when a shared tier is configured.
            let p = match crate::remote()? {
                Some(remote) => {
                    crate::runtime()?.block_on(provenance::provenance_with_tier(&store, Some(&remote), &arg, depth))?
                }
                None => provenance::provenance(&store, &arg, depth)?,
            };
            if let Some(out) = ro_crate {
                if p.runs.is_empty() {
                    bail!("no stored run produced `{arg}`: there is no provenance to write");
                }
                let opts = kliko_engine::rocrate::CrateOptions { with_data, license, ..Default::default() };
                let written = write_crate(&store, &p, &out, &opts)?;
                if json {
                    println!("{}", serde_json::to_string(&written)?);
                } else {
                    println!(
                        "wrote the RO-Crate `{}`: {} run(s), {} dataset(s), {} file(s) (Process Run Crate 0.5)",
                        out.display(),
                        written.runs,
                        written.datasets,
                        written.files
                    );
                }
            } else if json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else if dot {
                print!("{}", provenance::to_dot(&p));
            } else {
                print_provenance(&store, &p);
            }
            Ok(if p.runs.is_empty() { ExitCode::from(1) } else { ExitCode::SUCCESS })
        }
        CacheCommand::Show { key, json, no_logs } => {
            let key = match resolve_key(&store, &key) {
                Ok(k) => k,
                // A run made on another machine: its record on the shared tier.
                Err(e) => match (crate::remote()?, key.parse::<Digest>()) {
                    (Some(remote), Ok(k)) => {
                        let found = crate::runtime()?.block_on(remote.record_of(&k))?;
                        let kliko_remote::Record::Usable { result, signed_by } = found else { return Err(e) };
                        if json {
                            let mut v = serde_json::to_value(&result)?;
                            v["on_shared_tier"] = true.into();
                            v["signed_by"] = signed_by.map(|s| s.to_string()).into();
                            println!("{}", serde_json::to_string_pretty(&v)?);
                        } else {
                            println!("run `{}`", result.key);
                            print_run(&store, &result, "");
                            let by = signed_by.map(|k| format!(", signed by {k}")).unwrap_or_default();
                            println!("  where:       on the shared tier `{}`{by}; not in this store (a run here fetches it, logs too)", remote.url());
                        }
                        return Ok(ExitCode::SUCCESS);
                    }
                    _ => return Err(e),
                },
            };
            let db = store.db()?;
            let Some(r) = store.get_result(&db, &key)? else { bail!("no stored result has key `{key}`") };
            let complete = store.is_complete(&r);
            let pinned = store.is_pinned(&db, &key)?;
            drop(db);
            if json {
                let mut v = serde_json::to_value(&r)?;
                v["complete"] = complete.into();
                v["pinned"] = pinned.into();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            print_run(&store, &r, "");
            println!(
                "  complete:    {}",
                if complete { "yes" } else { "no (some objects are gone: a new run would be a miss)" }
            );
            println!("  pinned:      {}", if pinned { "yes" } else { "no" });
            if !no_logs {
                for (name, d) in [("stdout", r.stdout), ("stderr", r.stderr)] {
                    match store.get_bytes(ObjectKind::Blob, &d) {
                        Ok(b) if b.is_empty() => println!("--- {name}: empty"),
                        Ok(b) => {
                            println!("--- {name} ({d}):");
                            print!("{}", String::from_utf8_lossy(&b));
                            if !b.ends_with(b"\n") {
                                println!();
                            }
                        }
                        Err(e) => println!("--- {name}: unavailable: {e}"),
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        CacheCommand::History { image, limit, json } => {
            let db = store.db()?;
            let entries: Vec<_> = store
                .history(&db, usize::MAX)?
                .into_iter()
                .filter(|e| {
                    image
                        .as_ref()
                        .is_none_or(|i| &e.image_ref == i || &e.image_id == i || e.image_id.contains(i.as_str()))
                })
                .take(limit)
                .collect();
            drop(db);
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
                return Ok(ExitCode::SUCCESS);
            }
            if entries.is_empty() {
                println!("no runs recorded yet");
                return Ok(ExitCode::SUCCESS);
            }
            println!("{:<25} {:<6} {:>9} {:>9}  {:<16}  image", "when", "cache", "took", "saved", "key");
            let (mut took, mut saved) = (0u64, 0u64);
            for e in &entries {
                took += e.wall_ms;
                saved += e.saved_ms;
                println!(
                    "{:<25} {:<6} {:>9} {:>9}  {:<16}  {}",
                    e.at,
                    e.cache,
                    human_ms(e.wall_ms),
                    if e.saved_ms > 0 { human_ms(e.saved_ms) } else { "-".into() },
                    e.key.short(16),
                    e.image_ref
                );
            }
            println!("{} runs: {} spent, {} saved by the cache", entries.len(), human_ms(took), human_ms(saved));
            Ok(ExitCode::SUCCESS)
        }
        CacheCommand::Pin { key } => pin(&store, &key, true),
        CacheCommand::Unpin { key } => pin(&store, &key, false),
        CacheCommand::Gc { max_size, older_than, dry_run, grace, json } => {
            if max_size.is_none() && older_than.is_none() {
                bail!("say what to evict: `--max-size SIZE` (e.g. `50g`) and/or `--older-than AGE` (e.g. `30d`)");
            }
            let opts = GcOptions {
                max_bytes: max_size.as_deref().map(gc_size).transpose()?,
                older_than_ms: older_than.as_deref().map(gc_duration).transpose()?,
                dry_run,
                grace_ms: gc_duration(&grace)?,
            };
            let r = store.gc(&opts)?;
            let containers = if dry_run { Vec::new() } else { crate::maintenance::remove_dead_containers(&store) };
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                let verb = if dry_run { "would evict" } else { "evicted" };
                println!("{verb} {} of {} results ({} pinned kept)", r.evicted.len(), r.results_before, r.pinned_kept);
                for k in &r.evicted {
                    println!("  {k}");
                }
                let verb = if dry_run { "would delete" } else { "deleted" };
                println!(
                    "{verb} {} objects ({}); store objects: {} -> {}",
                    r.objects_deleted,
                    human_bytes(r.bytes_deleted),
                    human_bytes(r.bytes_before),
                    human_bytes(r.bytes_after)
                );
                if r.tmp_removed > 0 || r.scratch_removed > 0 {
                    println!(
                        "removed what dead processes left: {} temporary folders ({}), {} run folders",
                        r.tmp_removed,
                        human_bytes(r.tmp_bytes_removed),
                        r.scratch_removed
                    );
                }
                if r.index_not_updated {
                    println!(
                        "note: the disk is still too full to update the index: the evicted results are listed \
                         until the next `kliko gc` (a run that needs one runs again)"
                    );
                }
                if !containers.is_empty() {
                    println!("removed {} containers left by runs that were killed", containers.len());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `--older-than` and `--grace`: the shared duration grammar, zero included (`--grace 0s`
/// sweeps unnamed objects at once, `--older-than 0s` evicts every result), in milliseconds.
fn gc_duration(s: &str) -> anyhow::Result<u64> {
    let d = kliko_core::units::parse_duration(s).map_err(anyhow::Error::msg)?;
    Ok(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `--max-size`: a size as `--memory` takes it, or zero (evict every result not pinned).
fn gc_size(s: &str) -> anyhow::Result<u64> {
    kliko_core::units::parse_size(s).map_err(anyhow::Error::msg)
}

fn pin(store: &Store, key: &str, on: bool) -> anyhow::Result<ExitCode> {
    let key = resolve_key(store, key)?;
    let db = store.db()?;
    if store.get_result(&db, &key)?.is_none() {
        bail!("no stored result has key `{key}`");
    }
    store.set_pin(&db, &key, on)?;
    println!("{} {key}", if on { "pinned" } else { "unpinned" });
    Ok(ExitCode::SUCCESS)
}

/// A full key or an unambiguous prefix of one.
fn resolve_key(store: &Store, arg: &str) -> anyhow::Result<Digest> {
    let (d, kind) = provenance::resolve(store, arg)?;
    if kind != "key" {
        bail!("`{arg}` names a stored {kind}, not a run key; `kliko provenance {arg}` finds the runs that produced it");
    }
    Ok(d)
}

/// An RO-Crate folder, or a `.zip` of one (written beside it, then renamed into place).
pub fn write_crate(
    store: &Store,
    p: &Provenance,
    out: &Path,
    opts: &kliko_engine::rocrate::CrateOptions,
) -> anyhow::Result<kliko_engine::rocrate::CrateSummary> {
    Ok(if out.extension().is_some_and(|e| e == "zip") {
        kliko_engine::rocrate::write_ro_crate_zip(store, p, out, opts)?
    } else {
        kliko_engine::rocrate::write_ro_crate(store, p, out, opts)?
    })
}

fn print_provenance(store: &Store, p: &Provenance) {
    println!("{} `{}`", p.kind, p.digest);
    if p.runs.is_empty() {
        println!("no stored run produced it");
    }
    for run in &p.runs {
        let indent = "  ".repeat(run.depth);
        let head = match (run.depth, run.feeds) {
            (0, _) if p.kind == "key" => "run".to_string(),
            (0, _) => "produced by run".to_string(),
            (_, Some(f)) => format!("whose input came from run (feeds `{}`)", f.short(16)),
            _ => "run".to_string(),
        };
        println!();
        println!("{indent}{head} `{}`", run.result.key);
        print_run(store, &run.result, &indent);
        if run.from_tier {
            println!("{indent}  where:       on the shared tier (made on another machine; a run here fetches it)");
        } else if !run.complete {
            println!("{indent}  note:        some of its objects have been collected; a rerun would be a miss");
        }
    }
    if !p.used_by.is_empty() {
        println!();
        println!("used as the input of {} run(s):", p.used_by.len());
        for k in &p.used_by {
            println!("  {k}");
        }
    }
}

fn print_run(store: &Store, r: &ActionResult, indent: &str) {
    let _ = store;
    let tags = if r.repo_tags.is_empty() { String::new() } else { format!(" (tags: {})", r.repo_tags.join(", ")) };
    println!("{indent}  image:       {}{tags}", r.image_ref);
    println!("{indent}  image id:    {}", r.image_id);
    println!("{indent}  io:          {}", r.preimage.io);
    println!("{indent}  parameters:  {}", r.parameters_given);
    match (r.preimage.input, &r.input_path) {
        (Some(d), Some(p)) => println!("{indent}  input:       {d} (from `{p}`)"),
        (Some(d), None) => println!("{indent}  input:       {d}"),
        _ => {}
    }
    if let Some(s) = &r.preimage.salt {
        println!("{indent}  salt:        {s}");
    }
    println!("{indent}  output:      {} ({} files, {})", r.output, r.output_files, human_bytes(r.output_bytes));
    println!("{indent}  exit code:   {}", r.exit_code);
    println!("{indent}  started:     {}", r.started_at);
    println!("{indent}  finished:    {} (ran {})", r.finished_at, human_ms(r.wall_ms));
    println!("{indent}  by:          {} on `{}` (kliko {})", r.user, r.host, r.kliko_version);
    if let Some(rt) = &r.runtime {
        let gpus = r.gpus.as_ref().map(|g| format!(", GPUs `{g}`")).unwrap_or_default();
        println!("{indent}  runtime:     {rt}{gpus}");
    }
    println!(
        "{indent}  logs:        stdout {} ({}), stderr {} ({}); `kliko show {}`",
        r.stdout.short(16),
        human_bytes(r.stdout_bytes),
        r.stderr.short(16),
        human_bytes(r.stderr_bytes),
        r.key.short(16)
    );
}
