//! Hashing: one big file (BLAKE3 on all cores, memory-mapped), and a tree of many small files
//! cold (every file read) and warm (the persistent stat cache answers).

mod common;

use std::fs;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kliko_core::hash::{Hasher, NoProgress};
use kliko_store::Store;

const BIG: usize = 256 << 20;
const TREE_DIRS: usize = 100;
const TREE_FILES: usize = 10_000;

fn big_file(c: &mut Criterion) {
    let dir = common::bench_dir();
    let path = dir.path().join("big");
    fs::write(&path, common::bytes(1, BIG)).unwrap();
    let mut g = c.benchmark_group("hash_big_file");
    g.sample_size(10).measurement_time(Duration::from_secs(5)).throughput(Throughput::Bytes(BIG as u64));
    g.bench_function("256MiB", |b| b.iter(|| Hasher::default().hash_path(&path).unwrap().digest));
    g.finish();
}

fn small_files(c: &mut Criterion) {
    let dir = common::bench_dir();
    let tree = dir.path().join("tree");
    let bytes = common::small_files(&tree, TREE_DIRS, TREE_FILES);
    let store = Store::open(&dir.path().join("store")).unwrap();
    // Files younger than the racy window are never trusted from the cache; a bench may wait.
    std::thread::sleep(Duration::from_millis(2100));
    store.hash_path(&tree, &NoProgress).unwrap();

    let mut g = c.benchmark_group("hash_10k_small_files");
    g.sample_size(10).measurement_time(Duration::from_secs(5)).throughput(Throughput::Bytes(bytes));
    g.bench_function("cold", |b| b.iter(|| Hasher::default().hash_path(&tree).unwrap().digest));
    g.bench_function("warm_stat_cache_reopening_index", |b| {
        b.iter(|| {
            // Each call opens and closes the RocksDB index, as one `kliko hash` process does.
            let h = store.hash_path(&tree, &NoProgress).unwrap();
            assert_eq!(h.stats.bytes_read.load(std::sync::atomic::Ordering::Relaxed), 0);
            h.digest
        })
    });
    // With the index held open: the walk and the lookups alone.
    let _db = store.db().unwrap();
    g.bench_function("warm_stat_cache", |b| {
        b.iter(|| {
            let h = store.hash_path(&tree, &NoProgress).unwrap();
            assert_eq!(h.stats.bytes_read.load(std::sync::atomic::Ordering::Relaxed), 0);
            h.digest
        })
    });
    g.finish();
}

criterion_group!(benches, big_file, small_files);
criterion_main!(benches);
