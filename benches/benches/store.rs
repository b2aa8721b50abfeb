//! Ingest and materialize: 64 MiB in 16 files plus 1,000 small files, into a fresh store;
//! materialize as links and as copies into a fresh folder.

mod common;

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kliko_store::{IngestMode, MaterializeMode, Store};

fn ingest_materialize(c: &mut Criterion) {
    let dir = common::bench_dir();
    let src = dir.path().join("src");
    let mut bytes = common::small_files(&src.join("small"), 20, 1000);
    fs::create_dir_all(src.join("big")).unwrap();
    for i in 0..16u64 {
        fs::write(src.join("big").join(format!("b{i:02}")), common::bytes(100 + i, 4 << 20)).unwrap();
        bytes += 4 << 20;
    }
    let runs = dir.path().join("runs");
    fs::create_dir(&runs).unwrap();
    let fresh = move || tempfile::tempdir_in(&runs).unwrap();

    let mut g = c.benchmark_group("store_64MiB");
    g.sample_size(10).measurement_time(Duration::from_secs(8)).throughput(Throughput::Bytes(bytes));
    g.bench_function("ingest_copy", |b| {
        b.iter_batched(
            &fresh,
            |t| {
                let store = Store::open(&t.path().join("store")).unwrap();
                store.ingest(&src, IngestMode::Copy).unwrap();
                t
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("ingest_then_materialize_link", |b| {
        b.iter_batched(
            &fresh,
            |t| {
                let store = Store::open(&t.path().join("store")).unwrap();
                let d = store.ingest(&src, IngestMode::Copy).unwrap().digest;
                store.materialize(&d, &t.path().join("out"), MaterializeMode::Link).unwrap();
                t
            },
            BatchSize::PerIteration,
        )
    });

    // Materialize alone, from one filled store into a fresh folder each time.
    let filled = fresh();
    let store = Store::open(&filled.path().join("store")).unwrap();
    let d = store.ingest(&src, IngestMode::Copy).unwrap().digest;
    for (name, mode) in [("materialize_link", MaterializeMode::Link), ("materialize_copy", MaterializeMode::Copy)] {
        g.bench_function(name, |b| {
            b.iter_batched(
                &fresh,
                |t| {
                    let out: PathBuf = t.path().join("out");
                    store.materialize(&d, &out, mode).unwrap();
                    t
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, ingest_materialize);
criterion_main!(benches);
