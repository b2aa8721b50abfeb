//! The `kliko` binary: argument parsing, the one tokio runtime, and error rendering.

// The crate's printing macros shadow std's: they never panic on a closed or failing stdout
// (see `out.rs`). Defined before the modules so that every one of them uses these.
macro_rules! println {
    () => { $crate::out::stdout(format_args!(""), true) };
    ($($arg:tt)*) => { $crate::out::stdout(format_args!($($arg)*), true) };
}
macro_rules! print {
    ($($arg:tt)*) => { $crate::out::stdout(format_args!($($arg)*), false) };
}
macro_rules! eprintln {
    () => { $crate::out::stderr(format_args!(""), true) };
    ($($arg:tt)*) => { $crate::out::stderr(format_args!($($arg)*), true) };
}

mod cli;
mod cmd_cache;
mod cmd_hash;
mod cmd_pipeline;
mod cmd_plan;
mod cmd_remote;
mod cmd_run;
mod cmd_serve;
mod cmd_store;
mod maintenance;
mod out;
mod progress;
mod render;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    kliko_core::trace::start();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = cli::Cli::parse_from(&args);
    let code = match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            render::error(&e);
            ExitCode::from(2)
        }
    };
    // A reader that stopped early (`| head`) is no error; lost output is.
    match out::finish() {
        Ok(()) => code,
        Err(e) => {
            eprintln!("error: cannot write to standard output: {e}");
            ExitCode::from(2)
        }
    }
}

/// The shared tier the command line names (`--remote`, `$KLIKO_REMOTE`), set once at start.
static REMOTE: std::sync::OnceLock<Option<(String, bool)>> = std::sync::OnceLock::new();
/// `--remote-async`.
static REMOTE_ASYNC: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The container runtime the command line names (`--runtime`, `$KLIKO_RUNTIME`).
static RUNTIME: std::sync::OnceLock<kliko_runtime::RuntimeKind> = std::sync::OnceLock::new();

/// The container runtime chosen for this command.
pub fn runtime_kind() -> kliko_runtime::RuntimeKind {
    RUNTIME.get().copied().unwrap_or_default()
}

/// The shared tier the command line names, with this user's keys, if one is configured.
pub fn remote() -> anyhow::Result<Option<kliko_remote::Remote>> {
    match REMOTE.get().cloned().flatten() {
        Some((url, read_only)) => Ok(Some(kliko_remote::Remote::open(&url, read_only)?.with_user_keys()?)),
        None => Ok(None),
    }
}

/// An engine on `store`, with the shared tier if one is configured.
pub fn engine(store: std::sync::Arc<kliko_store::Store>) -> anyhow::Result<kliko_engine::Engine> {
    engine_with(store, remote()?)
}

/// An engine on `store`, with shared tier `remote` if any.
pub fn engine_with(
    store: std::sync::Arc<kliko_store::Store>,
    remote: Option<kliko_remote::Remote>,
) -> anyhow::Result<kliko_engine::Engine> {
    let engine = kliko_engine::Engine::new(store).with_runtime_kind(runtime_kind());
    let Some(remote) = remote else { return Ok(engine) };
    // How long another machine trusts this one's lease without a heartbeat.
    let ttl = match std::env::var("KLIKO_REMOTE_LEASE_TTL") {
        Ok(v) if !v.is_empty() => kliko_core::units::parse_duration(&v)
            .map_err(|e| anyhow::anyhow!("`KLIKO_REMOTE_LEASE_TTL`: {e}"))?
            .max(std::time::Duration::from_secs(1)),
        _ => kliko_remote::lease::TTL,
    };
    let background = REMOTE_ASYNC.load(std::sync::atomic::Ordering::Relaxed);
    Ok(engine.with_remote_ttl(std::sync::Arc::new(remote), ttl).with_remote_async(background))
}

fn dispatch(cli: cli::Cli) -> anyhow::Result<ExitCode> {
    let _ = REMOTE.set(cli.remote.clone().filter(|u| !u.is_empty()).map(|u| (u, cli.remote_read_only)));
    REMOTE_ASYNC.store(cli.remote_async, std::sync::atomic::Ordering::Relaxed);
    let _ = RUNTIME.set(cli.runtime.unwrap_or_default());
    let store = cli.store.clone();
    let store_root = || {
        store.clone().or_else(kliko_store::Store::default_root).ok_or_else(|| {
            anyhow::anyhow!("cannot find a place for the store: set `KLIKO_STORE` or `HOME`, or give `--store DIR`")
        })
    };
    match cli.command {
        cli::Command::Run { args } => cmd_run::run(&store_root()?, args),
        cli::Command::Validate { files } => Ok(validate(&files)),
        cli::Command::Hash(a) => cmd_hash::run(&store_root()?, a),
        cli::Command::Store(a) => cmd_store::run(&store_root()?, a),
        cli::Command::Pipeline(a) => cmd_pipeline::run(&store_root()?, a),
        cli::Command::Serve(a) => cmd_serve::run(&store_root()?, a),
        cli::Command::Remote(a) => cmd_remote::run(store_root, a),
        cli::Command::Cache(a) => cmd_cache::run(&store_root()?, a),
        cli::Command::RunPlan { plan_json, plan } => cmd_plan::run(plan_json, plan),
    }
}

/// The one tokio runtime of the process.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn validate(files: &[std::path::PathBuf]) -> ExitCode {
    let mut ok = true;
    for f in files {
        match kliko_spec::validate_file(f) {
            Ok(spec) => {
                let fields = spec.fields().count();
                let version = if spec.schema_version_declared {
                    format!("schema version {}", spec.schema_version)
                } else {
                    format!(
                        "schema version {} (not declared: read as the 0.8 release's version 3)",
                        spec.schema_version
                    )
                };
                println!("ok: `{}`: {version}, io `{}`, {fields} fields", f.display(), spec.io);
            }
            Err(e) => {
                ok = false;
                eprintln!("error: {e}");
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Wait for the publishes `engine` left in the background (`--remote-async`) and say how each
/// ended, on stderr. Whether all succeeded.
pub async fn finish_background(engine: &kliko_engine::Engine) -> bool {
    let mut ok = true;
    for b in engine.finish_background().await {
        match b.outcome {
            Ok(p) => eprintln!(
                "kliko: published `{}` (key {}) to the shared tier in the background: {} new files, {}",
                b.image,
                b.key.short(16),
                p.uploaded,
                kliko_core::units::human_bytes(p.bytes)
            ),
            Err(e) => {
                ok = false;
                eprintln!(
                    "warning: `{}` (key {}) is stored here, but publishing it to the shared tier failed ({e}); \
                     `kliko remote push` publishes it later",
                    b.image,
                    b.key.short(16)
                );
            }
        }
    }
    ok
}

/// Cancel `cancel` on the first SIGINT (Ctrl-C) or SIGTERM, saying `message` on stderr.
pub fn cancel_on_signal(cancel: tokio_util::sync::CancellationToken, message: &'static str) {
    tokio::spawn(async move {
        let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else { return };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!("{message}");
        cancel.cancel();
    });
}
