//! kliko's command-line tests against the real Docker daemon (and, under the scripts that
//! start them, a real S3 server, a real Slurm and rootless Podman), in one test binary: one
//! module per area. Each module used to be a binary of its own, and each of those linked
//! RocksDB.
//!
//! `cargo test --release -p kliko-cli --test cli -- slurm_cli::` runs one module.

mod common;
mod data_safety;
mod hardening;
mod inflight_gc_provenance;
mod pipeline_cli;
mod podman_cli;
mod remote_cli;
mod ro_crate;
mod run_basic;
mod run_cache;
mod run_errors;
mod run_failures;
mod run_params;
mod slurm_cli;
mod store_cli;
mod torture;
