//! `kliko remote ...`: the shared tier, and this user's signing key.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use kliko_remote::trust::SigningKey;

use crate::cli::{KeyCommand, RemoteCommand};
use crate::cmd_store::human_bytes;

pub fn run(store_root: impl Fn() -> anyhow::Result<PathBuf>, cmd: RemoteCommand) -> anyhow::Result<ExitCode> {
    if let RemoteCommand::Key(k) = cmd {
        return key(k);
    }
    let Some(remote) = crate::remote()? else {
        anyhow::bail!("no shared tier is configured: give `--remote URL` (before the command) or set `KLIKO_REMOTE`");
    };
    let rt = crate::runtime()?;
    rt.block_on(async move {
        match cmd {
            RemoteCommand::Check { probe_size, json } => {
                let bytes = kliko_core::units::parse_size(&probe_size).map_err(anyhow::Error::msg)?;
                let r = remote.check(bytes).await?;
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                    return Ok(ExitCode::SUCCESS);
                }
                println!("shared tier: {}{}", r.url, if r.read_only { " (read-only here)" } else { "" });
                println!("reachable, credentials accepted: yes");
                println!("latency: {:.1} ms", r.latency_ms);
                let yes = |b: Option<bool>| match b {
                    Some(true) => "yes",
                    Some(false) => "NO",
                    None => "not tried (read-only)",
                };
                println!("writable: {}", yes(r.writable));
                println!(
                    "conditional writes honoured: {}{}",
                    yes(r.conditional_writes),
                    if r.conditional_writes == Some(false) {
                        " (identical runs started at once on different machines may each run)"
                    } else {
                        ""
                    }
                );
                if let (Some(up), Some(down)) = (r.upload_mib_s, r.download_mib_s) {
                    println!("throughput ({}): upload {up:.0} MiB/s, download {down:.0} MiB/s", human_bytes(r.probe_bytes));
                }
                match &r.signing_key {
                    Some(k) => println!("records published from here are signed by {k}"),
                    None => println!("records published from here are not signed (`kliko remote key new` makes a key)"),
                }
                if r.trusted_keys.is_empty() {
                    println!("records used from the tier: every one (`KLIKO_TRUSTED_KEYS` restricts them to signers you trust)");
                } else {
                    println!("records used from the tier: only those signed by one of {} trusted keys", r.trusted_keys.len());
                }
                let ok = r.writable != Some(false);
                Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
            }
            RemoteCommand::Stats { json } => {
                let s = remote.stats().await?;
                if json {
                    println!("{}", serde_json::to_string(&s)?);
                } else {
                    println!(
                        "{}: {} results; {} trees and {} files ({}); {} leases held, {} failures recorded",
                        remote.url(),
                        s.records,
                        s.trees,
                        s.blobs,
                        human_bytes(s.bytes),
                        s.leases,
                        s.failures
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            RemoteCommand::Push { json } => {
                let root = store_root()?;
                let store = kliko_store::Store::open(&root)
                    .with_context(|| format!("cannot open the store at `{}`", root.display()))?;
                let p = remote.push(&Arc::new(store)).await?;
                if json {
                    println!("{}", serde_json::to_string(&p)?);
                } else {
                    println!(
                        "published {} results ({} files, {}); {} were on the shared tier already",
                        p.published,
                        p.uploaded,
                        human_bytes(p.bytes),
                        p.present
                    );
                    for f in &p.failed {
                        eprintln!("error: not published: {f}");
                    }
                }
                Ok(if p.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
            }
            RemoteCommand::Gc { older_than, grace, dry_run, json } => {
                let age = kliko_core::units::parse_duration(&older_than).map_err(anyhow::Error::msg)?;
                let grace = kliko_core::units::parse_duration(&grace).map_err(anyhow::Error::msg)?;
                let g = remote.gc(age, grace, dry_run).await?;
                if json {
                    println!("{}", serde_json::to_string(&g)?);
                } else {
                    let verb = if dry_run { "would remove" } else { "removed" };
                    println!(
                        "{verb} {} results (kept {}) and {} objects ({}); kept {} objects still named and {} too young to remove",
                        g.records_removed,
                        g.records_kept,
                        g.objects_removed,
                        human_bytes(g.bytes_removed),
                        g.objects_kept,
                        g.objects_young
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            RemoteCommand::Key(_) => unreachable!("handled above"),
        }
    })
}

fn key(cmd: KeyCommand) -> anyhow::Result<ExitCode> {
    let path = SigningKey::default_path()?;
    match cmd {
        KeyCommand::New => {
            let k = SigningKey::create(&path)?;
            println!("{}", k.public());
            eprintln!(
                "made a signing key at `{}` (keep it private); records you publish are signed with it. \
                 Others trust them by adding the line above to their `KLIKO_TRUSTED_KEYS`.",
                path.display()
            );
        }
        KeyCommand::Show => match SigningKey::load_default()? {
            Some(k) => println!("{}", k.public()),
            None => anyhow::bail!(
                "no signing key at `{}`: `kliko remote key new` makes one (or set `KLIKO_SIGNING_KEY` to its file)",
                path.display()
            ),
        },
    }
    Ok(ExitCode::SUCCESS)
}
