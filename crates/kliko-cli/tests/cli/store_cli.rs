//! The store through the `kliko` binary: ingest, materialize, fsck exit codes, the stat cache
//! as `kliko hash --json` reports it, and crash safety: ingests killed with SIGKILL at random
//! moments never leave a partial or writable object behind.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

fn kliko(store: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kliko"));
    c.env_remove("KLIKO_STORE").arg("--store").arg(store);
    c
}

fn run(c: &mut Command) -> Output {
    c.output().expect("kliko runs")
}

fn ok(c: &mut Command) -> String {
    let o = run(c);
    assert!(o.status.success(), "{c:?} failed: {}\n{}", o.status, String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn ingest(store: &Path, src: &Path) -> String {
    let v = json(&ok(kliko(store).args(["store", "ingest", "--json"]).arg(src)));
    v["digest"].as_str().unwrap().to_string()
}

/// The tree digest, computed without the store.
fn hash_uncached(store: &Path, p: &Path) -> String {
    let v = json(&ok(kliko(store).args(["hash", "--no-stat-cache", "--json"]).arg(p)));
    v["digest"].as_str().unwrap().to_string()
}

fn fsck_json(store: &Path) -> (bool, serde_json::Value) {
    let o = run(kliko(store).args(["store", "fsck", "--json"]));
    (o.status.success(), json(&String::from_utf8_lossy(&o.stdout)))
}

/// A small PRNG (splitmix64): enough for test data and delays.
struct Rng(u64);

impl Rng {
    fn from_time() -> Rng {
        let t = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as u64;
        Rng(t ^ (u64::from(std::process::id()) << 32))
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// 300 files in 10 folders: mostly 1–16 KiB, six of 4 MiB, a few executables. All content
/// derives from `seed`, so each seed gives new blobs.
fn write_tree(root: &Path, seed: u64) {
    let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x5eed);
    for i in 0..300u32 {
        let dir = root.join(format!("d{:02}", i % 10));
        fs::create_dir_all(&dir).unwrap();
        let size = if i % 50 == 7 { 4 << 20 } else { 1024 + rng.below(15 * 1024) as usize };
        let p = dir.join(format!("f{i:03}"));
        fs::write(&p, rng.bytes(size)).unwrap();
        let mode = if i % 37 == 0 { 0o755 } else { 0o644 };
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }
}

/// Every object file is a regular file without any write bit, in a two-hex-character shard.
fn assert_objects_read_only(store: &Path) -> usize {
    let mut n = 0;
    for dir in ["blobs-v1", "trees-v1"] {
        for shard in fs::read_dir(store.join(dir)).unwrap() {
            let shard = shard.unwrap();
            assert!(shard.file_type().unwrap().is_dir(), "{:?} in {dir}", shard.path());
            for obj in fs::read_dir(shard.path()).unwrap() {
                let p = obj.unwrap().path();
                let m = fs::symlink_metadata(&p).unwrap();
                assert!(m.is_file(), "{} is not a regular file", p.display());
                assert_eq!(m.mode() & 0o222, 0, "{} is writable (mode {:o})", p.display(), m.mode());
                n += 1;
            }
        }
    }
    n
}

fn assert_clean(store: &Path, when: &str) -> serde_json::Value {
    let (success, r) = fsck_json(store);
    assert!(success, "fsck not clean {when}: {r:#}");
    assert_eq!(r["corrupt"], serde_json::json!([]), "{when}: {r:#}");
    assert_eq!(r["stray"], serde_json::json!([]), "{when}: {r:#}");
    let objects = assert_objects_read_only(store);
    // fsck re-hashed every object, and each matched its name.
    assert_eq!((r["blobs"].as_u64().unwrap() + r["trees"].as_u64().unwrap()) as usize, objects, "{when}");
    r
}

#[test]
fn killed_ingests_never_leave_partial_or_writable_objects() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let src = t.path().join("src");
    let mut rng = Rng::from_time();
    let run_seed = rng.next();
    eprintln!("seed {run_seed:#x}");
    let mut rng = Rng(run_seed);

    // How long one ingest of a tree of new blobs takes (the fastest of three: the first, into
    // an empty store, is slower than the rest).
    let mut full = Duration::MAX;
    for _ in 0..3 {
        write_tree(&src, rng.next());
        let started = Instant::now();
        ingest(&store, &src);
        full = full.min(started.elapsed());
    }
    assert_clean(&store, "after the first ingests");
    eprintln!("one ingest takes {full:?}");

    let budget = Instant::now();
    let planned = 30u32;
    let (mut killed, mut finished, mut iterations) = (0, 0, 0);
    for i in 0..planned {
        if i >= 10 && budget.elapsed() > Duration::from_secs(40) {
            break;
        }
        iterations += 1;
        write_tree(&src, rng.next());
        // Stratified: iteration i kills somewhere in the i-th slice of the ingest's duration
        // (10% past it for the last slices, in case this run is slower).
        let slice = full.mul_f64(1.1) / planned;
        let delay = slice * i + slice.mul_f64(rng.unit());
        let mut child = kliko(&store)
            .args(["store", "ingest"])
            .arg(&src)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        match child.try_wait().unwrap() {
            Some(_) => {
                // Faster than measured (the measurement may have shared the cores with other
                // tests): aim the remaining kills inside the shorter duration.
                finished += 1;
                full = full.min(delay.mul_f64(1.0 / 1.1));
            }
            None => {
                child.kill().unwrap();
                killed += 1;
            }
        }
        child.wait().unwrap();
        assert_clean(&store, &format!("after kill {i} at {delay:?}"));
    }
    eprintln!("{iterations} iterations: {killed} killed mid-ingest, {finished} had finished");
    assert!(killed >= iterations / 3, "too few kills landed mid-ingest ({killed} of {iterations})");

    // The last tree, ingested without interruption, is complete.
    let want = hash_uncached(&store, &src);
    assert_eq!(ingest(&store, &src), want);
    assert_clean(&store, "after the final ingest");
    let out = t.path().join("out");
    ok(kliko(&store).args(["store", "materialize", &want]).arg(&out).args(["--mode", "copy"]));
    assert_eq!(hash_uncached(&store, &out), want);
}

#[test]
fn concurrent_ingests_of_overlapping_trees() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    // The same 300 files in both, plus a folder of its own in each.
    write_tree(&a, 1);
    write_tree(&b, 1);
    write_tree(&a.join("own"), 2);
    write_tree(&b.join("own"), 3);
    let want_a = hash_uncached(&store, &a);
    let want_b = hash_uncached(&store, &b);
    let spawn = |src: &Path| {
        kliko(&store)
            .args(["store", "ingest", "--json"])
            .arg(src)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (ca, cb) = (spawn(&a), spawn(&b));
    let (oa, ob) = (ca.wait_with_output().unwrap(), cb.wait_with_output().unwrap());
    for (o, want) in [(&oa, &want_a), (&ob, &want_b)] {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(json(&String::from_utf8_lossy(&o.stdout))["digest"].as_str().unwrap(), want);
    }
    let r = assert_clean(&store, "after concurrent ingests");
    // 300 shared + 2 × 300 own contents, each stored once (the seeds give distinct contents).
    assert_eq!(r["blobs"].as_u64().unwrap(), 900, "{r:#}");
    for (want, name) in [(&want_a, "out-a"), (&want_b, "out-b")] {
        let out = t.path().join(name);
        ok(kliko(&store).args(["store", "materialize", want]).arg(&out).args(["--mode", "link"]));
        assert_eq!(&hash_uncached(&store, &out), want);
    }
}

fn small_tree(root: &Path) -> u64 {
    fs::create_dir_all(root.join("sub")).unwrap();
    fs::write(root.join("a.txt"), b"hello\n").unwrap();
    fs::write(root.join("victim"), b"this blob will be damaged\n").unwrap();
    fs::write(root.join("sub/run.sh"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(root.join("sub/run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("nowhere", root.join("dangling")).unwrap();
    fs::create_dir(root.join("empty")).unwrap();
    6 + 26 + 10
}

fn blob_path(store: &Path, content: &[u8]) -> PathBuf {
    let h = kliko_core::Digest::of_bytes(content).to_hex();
    store.join("blobs-v1").join(&h[..2]).join(&h[2..])
}

#[test]
fn cli_round_trip_in_every_mode_and_refuses_a_non_empty_destination() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let src = t.path().join("src");
    small_tree(&src);
    let d = ingest(&store, &src);
    assert_eq!(d, hash_uncached(&store, &src));
    for mode in ["auto", "link", "copy"] {
        let out = t.path().join(format!("out-{mode}"));
        ok(kliko(&store).args(["store", "materialize", &d]).arg(&out).args(["--mode", mode]));
        assert_eq!(hash_uncached(&store, &out), d, "--mode {mode}");
    }
    let busy = t.path().join("busy");
    fs::create_dir(&busy).unwrap();
    fs::write(busy.join("keep"), b"mine").unwrap();
    let o = run(kliko(&store).args(["store", "materialize", &d]).arg(&busy));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(fs::read_dir(&busy).unwrap().count(), 1);
    assert_eq!(fs::read(busy.join("keep")).unwrap(), b"mine");
}

#[test]
fn cli_fsck_fails_on_a_corrupt_blob_then_is_clean() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let src = t.path().join("src");
    small_tree(&src);
    let d = ingest(&store, &src);
    assert_clean(&store, "after ingest");
    let blob = blob_path(&store, b"this blob will be damaged\n");
    fs::set_permissions(&blob, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&blob, b"THIS BLOB WILL BE DAMAGED\n").unwrap();

    // Copy-mode materialize refuses it and leaves nothing in its place.
    let out = t.path().join("out");
    let o = run(kliko(&store).args(["store", "materialize", &d]).arg(&out).args(["--mode", "copy"]));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("corrupt"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(fs::symlink_metadata(out.join("victim")).is_err());
    // The copy that found it set it aside at once (every result naming it is a miss now).
    assert!(!blob.exists());
    let stats = json(&ok(kliko(&store).args(["store", "stats", "--json"])));
    assert_eq!(stats["quarantined"], 1);
    assert_clean(&store, "after quarantine");

    // One that no placement has met yet is found by fsck.
    let blob = blob_path(&store, b"hello\n");
    fs::set_permissions(&blob, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&blob, b"HELLO\n").unwrap();
    let o = run(kliko(&store).args(["store", "fsck"]));
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(text.contains("corrupt") && text.contains("quarantine"), "{text}");
    assert!(!blob.exists());
    assert_clean(&store, "after fsck");
    let o = run(kliko(&store).args(["store", "fsck"]));
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("store is consistent"));
}

#[test]
fn cli_fsck_fails_on_garbage_in_the_blob_folder() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let src = t.path().join("src");
    small_tree(&src);
    ingest(&store, &src);
    fs::write(store.join("blobs-v1").join("garbage"), b"junk").unwrap();
    let (success, r) = fsck_json(&store);
    assert!(!success);
    assert_eq!(r["stray"].as_array().unwrap().len(), 1, "{r:#}");
}

#[test]
fn cli_hash_json_reads_fresh_files_every_time() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let src = t.path().join("src");
    let total = small_tree(&src);
    let want = hash_uncached(&store, &src);
    for pass in 0..2 {
        let v = json(&ok(kliko(&store).args(["hash", "--json"]).arg(&src)));
        assert_eq!(v["digest"], want.as_str());
        assert_eq!(v["kind"], "tree");
        assert_eq!(v["files"], 3);
        // Written within the racy window: never trusted from the cache, on any pass.
        assert_eq!(v["bytes_read"], total, "pass {pass}: {v}");
        assert_eq!(v["bytes_cached"], 0, "pass {pass}: {v}");
    }
    let stats = json(&ok(kliko(&store).args(["store", "stats", "--json"])));
    assert_eq!(stats["stat_cache_dirs"], 3, "{stats:#}");
    // A file's digest is plain BLAKE3.
    let v = json(&ok(kliko(&store).args(["hash", "--json"]).arg(src.join("a.txt"))));
    assert_eq!(v["digest"], kliko_core::Digest::of_bytes(b"hello\n").to_hex().as_str());
}

/// Every entry in the store's `tmp/` (the folders of processes, and what they hold).
fn tmp_entries(store: &Path) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(store.join("tmp")) else { return Vec::new() };
    let mut out = Vec::new();
    for e in rd.flatten() {
        out.push(e.path());
        if e.path().is_dir() {
            out.extend(fs::read_dir(e.path()).unwrap().flatten().map(|e| e.path()));
        }
    }
    out
}

/// Copies being staged: files in the processes' folders in `tmp/`, other than the lock files.
fn staged_copies(store: &Path) -> usize {
    tmp_entries(store)
        .iter()
        .filter(|p| p.parent().unwrap().file_name().unwrap().to_string_lossy().starts_with("proc-"))
        .filter(|p| p.is_file() && !p.file_name().unwrap().to_string_lossy().starts_with(".kliko-lock"))
        .count()
}

#[test]
fn an_ingest_killed_mid_copy_leaves_temporary_files_that_the_next_ingest_and_gc_remove() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let src = t.path().join("src");
    let mut rng = Rng::from_time();
    for round in 0..2 {
        // New content every round, large enough that copying it into tmp/ takes a while:
        // 48 files of 2 MiB.
        for i in 0..48 {
            fs::create_dir_all(src.join(format!("d{}", i % 4))).unwrap();
            fs::write(src.join(format!("d{}/f{i}", i % 4)), rng.bytes(2 << 20)).unwrap();
        }
        let mut child = kliko(&store)
            .args(["store", "ingest"])
            .arg(&src)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait for the event (copies appearing in tmp/), not for a guessed time.
        let deadline = Instant::now() + Duration::from_secs(60);
        while staged_copies(&store) == 0 {
            assert!(child.try_wait().unwrap().is_none(), "the ingest finished before it could be killed");
            assert!(Instant::now() < deadline, "no temporary copy appeared in tmp/");
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let litter = staged_copies(&store);
        assert!(litter > 0, "the kill left no temporary copies: {:?}", tmp_entries(&store));
        eprintln!("round {round}: killed with {litter} copies in tmp/");
        if round == 0 {
            // The next ingest (a new tree, so it stages copies of its own) cleans up.
            let other = t.path().join("other");
            small_tree(&other);
            ingest(&store, &other);
        } else {
            ok(kliko(&store).args(["gc", "--older-than", "30d"]));
        }
        assert_eq!(tmp_entries(&store), Vec::<PathBuf>::new(), "round {round}");
        // And fsck has nothing to say about it.
        assert_clean(&store, &format!("round {round}"));
    }
}

#[test]
fn cli_gc_accepts_the_same_durations_as_every_other_option() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    for args in [["--older-than", "1ms"], ["--older-than", "0s"], ["--older-than", "1.5h"], ["--older-than", "30d"]] {
        ok(kliko(&store).arg("gc").args(args).args(["--grace", "500ms"]));
    }
    ok(kliko(&store).args(["gc", "--older-than", "90", "--grace", "0"]));
    ok(kliko(&store).args(["gc", "--max-size", "0"]));
    let o = run(kliko(&store).args(["gc", "--older-than", "2 weeks"]));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("`2 weeks` is not a duration") && err.contains("500ms"), "{err}");
}

#[test]
fn cli_fsck_checks_the_cached_kliko_yml_of_each_image_and_repair_removes_a_bad_one() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    ok(kliko(&store).args(["store", "stats"]));
    let images = store.join("images-v1");
    fs::create_dir_all(&images).unwrap();
    fs::write(images.join(format!("{}-kliko.yml", "ab".repeat(32))), "schema_version: 3\nio: join\nsections: []\n")
        .unwrap();
    let bad = images.join(format!("{}-kliko.yml", "cd".repeat(32)));
    fs::write(&bad, "schema_version: 3\nio: [unclosed\n").unwrap();
    let o = run(kliko(&store).args(["store", "fsck"]));
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(text.contains("unusable cached image file") && text.contains(&"cd".repeat(32)), "{text}");
    assert!(!text.contains(&"ab".repeat(32)), "{text}");
    let o = run(kliko(&store).args(["store", "fsck", "--repair"]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(!bad.exists());
    let (success, r) = fsck_json(&store);
    assert!(success, "{r:#}");
    assert_eq!(r["image_files"], 1, "{r:#}");
}

/// Staging folders of placements (`.NAME.kliko-new-…`) in `dir`.
fn staging_folders(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".kliko-new-"))
        .map(|e| e.path())
        .collect()
}

#[test]
fn a_placement_killed_mid_copy_leaves_a_staging_folder_that_the_next_placement_removes() {
    let w = crate::common::World::new();
    // 48 files of 2 MiB: copying them out of the store takes a while.
    let img = crate::common::split_image(
        "placement-kill",
        "",
        "i=0; while [ $i -lt 48 ]; do dd if=/dev/urandom of=/output/f$i bs=1048576 count=2 2>/dev/null; i=$((i+1)); done",
    );
    let input = w.folder("in", &[("a.txt", "x\n")]);
    let args = |out: &str| -> Vec<std::ffi::OsString> {
        ["run", img.tag.as_str(), "--input", input.to_str().unwrap(), "--output", w.path(out).to_str().unwrap()]
            .iter()
            .map(Into::into)
            .collect()
    };
    let o = w.kliko().args(args("out1")).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A hit: copied out of the store into a staging folder beside `out2`. Kill it there.
    let mut child = w.kliko().args(args("out2")).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let copying = || {
        staging_folders(w.dir.path()).iter().any(|s| fs::read_dir(s.join("t")).is_ok_and(|mut it| it.next().is_some()))
    };
    while !copying() {
        assert!(child.try_wait().unwrap().is_none(), "the placement finished before it could be killed");
        assert!(Instant::now() < deadline, "no staging folder appeared");
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let left = staging_folders(w.dir.path());
    assert_eq!(left.len(), 1, "{left:?}");
    // The next placement into the same folder (for another output) removes it.
    let o = w.kliko().args(args("out3")).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(staging_folders(w.dir.path()), Vec::<PathBuf>::new());
    assert_eq!(fs::read_dir(w.path("out3")).unwrap().count(), 48);
    crate::common::assert_no_containers(&img);
}
