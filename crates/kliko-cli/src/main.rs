//! The `kliko` binary: argument parsing, the one tokio runtime, and error rendering.

mod cli;
mod cmd_hash;
mod cmd_store;
mod progress;
mod render;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = cli::Cli::parse_from(&args);
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            render::error(&e);
            ExitCode::from(2)
        }
    }
}

fn dispatch(cli: cli::Cli) -> anyhow::Result<ExitCode> {
    let store_root = cli.store.clone().unwrap_or_else(kliko_store::Store::default_root);
    match cli.command {
        cli::Command::Hash(a) => cmd_hash::run(&store_root, a),
        cli::Command::Store(a) => cmd_store::run(&store_root, a),
    }
}
