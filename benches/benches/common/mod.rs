//! Test data for the benches, written once per bench binary into a temporary folder on the
//! store's filesystem (`/tmp` unless `KLIKO_BENCH_DIR` says otherwise).

#![allow(dead_code)]

use std::fs;
use std::path::Path;

pub fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("KLIKO_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).expect("temporary folder in KLIKO_BENCH_DIR"),
        None => tempfile::tempdir().expect("temporary folder"),
    }
}

/// Deterministic, incompressible bytes.
pub fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// `files` files of 1–4 KiB spread over `dirs` folders; returns the total size.
pub fn small_files(root: &Path, dirs: usize, files: usize) -> u64 {
    let mut total = 0;
    for i in 0..files {
        let d = root.join(format!("d{:04}", i % dirs));
        fs::create_dir_all(&d).unwrap();
        let size = 1024 + (i * 7919) % 3072;
        fs::write(d.join(format!("f{i:06}")), bytes(i as u64, size)).unwrap();
        total += size as u64;
    }
    total
}
