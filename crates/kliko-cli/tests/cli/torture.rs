//! Kill `kliko run` at random moments, with gc collecting alongside, and check that nothing
//! a user could see is ever wrong: every output folder is absent, empty, or whole and right;
//! every cached result is right; the store checks clean; no container and no litter is left
//! once gc has run.
//!
//! Bounded for the suite: `KLIKO_TORTURE_KILLS` kills (default 30) within
//! `KLIKO_TORTURE_SECONDS` (default 150), each at a random moment in the first
//! `KLIKO_TORTURE_MAX_DELAY_MS` (default 2500) of a run. `scripts/torture.sh` runs it with 1,000.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;

/// The outputs for parameter `n`: what a correct run of the image below writes.
fn expected(n: u64) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    m.insert("all.txt".to_string(), b"alpha\nbeta\n".to_vec());
    m.insert("n.txt".to_string(), format!("{n}\n").into_bytes());
    m.insert("part/".to_string(), Vec::new());
    for i in 0..8 {
        m.insert(format!("part/{i}.txt"), format!("{n}-{i}\n").repeat(200).into_bytes());
    }
    m
}

/// A small xorshift generator: reproducible from the seed printed on failure.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[test]
fn killed_runs_with_gc_alongside_never_leave_anything_wrong() {
    let kills = env_u64("KLIKO_TORTURE_KILLS", 30);
    let budget = Duration::from_secs(env_u64("KLIKO_TORTURE_SECONDS", 150));
    // Kills land anywhere in the first this-many milliseconds of a run (runs that finish
    // sooner are checked too).
    let max_delay_ms = env_u64("KLIKO_TORTURE_MAX_DELAY_MS", 2500);
    let seed = env_u64(
        "KLIKO_TORTURE_SEED",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1,
    );
    eprintln!("torture: {kills} kills, seed {seed} (KLIKO_TORTURE_SEED={seed} repeats it)");
    let mut rng = Rng(seed);
    let w = Arc::new(World::new());
    let img = split_image(
        "torture",
        "      - name: n\n        type: int\n",
        "n=$(sed -n 's/.*\"n\": *\\([0-9]*\\).*/\\1/p' /parameters.json)\n\
         cat /input/* > /output/all.txt\n\
         mkdir /output/part\n\
         for i in 0 1 2 3 4 5 6 7; do\n\
           j=0; while [ $j -lt 200 ]; do echo \"$n-$i\"; j=$((j+1)); done > /output/part/$i.txt\n\
         done\n\
         echo \"$n\" > /output/n.txt",
    );
    let input = w.folder("in", &[("a.txt", "alpha\n"), ("b.txt", "beta\n")]);

    // gc as hard as it goes (no grace period, evict everything) while runs are killed.
    let stop = Arc::new(AtomicBool::new(false));
    let gc = {
        let (w, stop) = (w.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let o = Out::of(w.kliko().args(["gc", "--max-size", "1", "--grace", "0s"]));
                assert_eq!(o.code, 0, "gc failed alongside the runs: {}", o.stderr);
            }
        })
    };

    let start = Instant::now();
    let (mut killed, mut finished) = (0u64, 0u64);
    let mut i = 0;
    while killed < kills && start.elapsed() < budget {
        i += 1;
        let n = rng.below(4);
        let out = w.path(&format!("out-{i}"));
        let mut c = w.kliko();
        c.args(["run", &img.tag, "--quiet", "--input"]).arg(&input).arg("--output").arg(&out);
        c.args(["--n", &n.to_string()]).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawn kliko");
        // Anywhere from before the index opens to after the output is placed.
        let delay = Duration::from_millis(rng.below(max_delay_ms));
        let deadline = Instant::now() + delay;
        let mut status = None;
        while Instant::now() < deadline {
            if let Some(s) = child.try_wait().expect("try_wait") {
                status = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if status.is_none() {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            killed += 1;
            if killed % 100 == 0 {
                eprintln!(
                    "torture: {killed} killed, {finished} finished, {:.0?}, nothing wrong so far",
                    start.elapsed()
                );
            }
        } else {
            finished += 1;
        }
        let o = child.wait_with_output().expect("wait");
        // Whatever happened, the output folder is absent, empty, or whole and right.
        if out.exists() {
            let got = read_tree(&out);
            assert!(
                got.is_empty() || got == expected(n),
                "seed {seed}, run {i} (n={n}, killed: {}): a partial or wrong output: {:?}",
                status.is_none(),
                got.keys().collect::<Vec<_>>()
            );
        }
        if let Some(s) = status {
            assert!(s.success(), "seed {seed}, run {i}: {}", String::from_utf8_lossy(&o.stderr));
        }
    }
    stop.store(true, Ordering::Relaxed);
    gc.join().expect("gc thread");
    eprintln!("torture: {killed} killed, {finished} finished in {:.0?}", start.elapsed());
    assert!(killed > 0, "no run was killed: nothing was tested");

    // Afterwards: every cached result is right, and a run of each parameter gives it.
    for n in 0..4 {
        let out = w.path(&format!("final-{n}"));
        w.run(&[&img.tag, &"--quiet", &"--input", &input, &"--output", &out, &"--n", &n.to_string()]).ok();
        assert!(read_tree(&out) == expected(n), "seed {seed}: a wrong result for n={n}");
    }
    // One gc sweeps what killed runs left (their scratch folders, staged copies, containers).
    Out::of(w.kliko().args(["gc", "--max-size", "100g", "--grace", "0s"])).ok();
    let fsck = Out::of(w.kliko().args(["store", "fsck"]));
    fsck.ok();
    assert!(fsck.stdout.contains("store is consistent"), "seed {seed}: {}", fsck.stdout);
    assert_no_containers(&img);
    for dir in ["scratch", "tmp"] {
        let left: Vec<_> = std::fs::read_dir(w.store.join(dir)).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(left.is_empty(), "seed {seed}: litter in the store's {dir}/: {left:?}");
    }
    let beside: Vec<_> = std::fs::read_dir(w.dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("kliko-new"))
        .collect();
    assert!(beside.is_empty(), "seed {seed}: half-placed outputs left beside the outputs: {beside:?}");
}
